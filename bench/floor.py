"""Where the floor is: a flat fan-out, bare, with the least a design must do, and asynctrace.

    python bench/floor.py [--tasks 20000] [--rounds 7]

One process, modes interleaved round by round; the garbage collector on, then off.

- ``noop-callback``: a task factory that only adds a done callback doing nothing, the least
  any design that sees every task end without wrapping its coroutine can cost;
- ``span-at-end``: that callback also hands an SDK ``ReadableSpan`` (name, ids, times, the
  task name) to the provider's ``BatchSpanProcessor``: the least a span per task costs;
- ``span-in-context``: and the span is made current in the task's context when it is
  created, as spans opened inside the task need to nest under it: the least a span per task
  that parents its children costs;
- ``asynctrace-metrics`` and ``asynctrace-tracing``, beside them.

The span modes flush the processor inside the timing, so the export thread's CPU counts. Also
printed: the objects the collector tracks per pending task, which is what makes the
collector's share grow with a fan-out's size.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Coroutine
from contextvars import Context, copy_context
from typing import Any

from modes import discarding_provider
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from workloads import leaf

import asynctrace
from asynctrace.testing import reset

MODES = [
    "bare",
    "noop-callback",
    "span-at-end",
    "span-in-context",
    "asynctrace-metrics",
    "asynctrace-tracing",
]

TIMES = "\N{MULTIPLICATION SIGN}"


def _noop(task: asyncio.Task[Any]) -> None:
    pass


def _task_context(kwargs: dict[str, Any]) -> Context:
    """The new task's context, made here when not given.

    Callbacks run in it, as asynctrace's do: without context=, add_done_callback would copy
    the current context, one more object per task.
    """
    context = kwargs.get("context")
    if context is None:
        context = kwargs["context"] = copy_context()
    return context


def callback_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    **kwargs: Any,  # noqa: ANN401 - asyncio's own create_task keywords
) -> asyncio.Task[Any]:
    context = _task_context(kwargs)
    task = asyncio.Task(coro, loop=loop, **kwargs)
    task.add_done_callback(_noop, context=context)
    return task


def span_factory(provider: TracerProvider, *, in_context: bool) -> Any:  # noqa: ANN401
    """A factory giving each task a span: ended at its end, current inside it if asked."""
    tracer = provider.get_tracer("floor")
    new_span_id = tracer.id_generator.generate_span_id
    new_trace_id = tracer.id_generator.generate_trace_id
    processor = tracer.span_processor
    resource, scope = provider.resource, InstrumentationScope("floor")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    starts: dict[int, tuple[int, SpanContext, SpanContext | None]] = {}
    offset = time.time_ns() - time.perf_counter_ns()

    def done(task: asyncio.Task[Any]) -> None:
        start, span_context, parent = starts.pop(id(task))
        processor.on_end(
            ReadableSpan(
                name=task.get_name(),
                context=span_context,
                parent=parent,
                resource=resource,
                attributes={"asyncio.task.name": task.get_name()},
                start_time=start,
                end_time=time.perf_counter_ns() + offset,
                instrumentation_scope=scope,
            )
        )

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        **kwargs: Any,  # noqa: ANN401 - asyncio's own create_task keywords
    ) -> asyncio.Task[Any]:
        parent: SpanContext | None = trace.get_current_span().get_span_context()
        trace_id = parent.trace_id if parent.is_valid else new_trace_id()
        if not parent.is_valid:
            parent = None
        span_context = SpanContext(trace_id, new_span_id(), is_remote=False, trace_flags=sampled)
        context = _task_context(kwargs)
        if in_context:
            span = NonRecordingSpan(span_context)
            context.run(otel_context.attach, trace.set_span_in_context(span))
        task = asyncio.Task(coro, loop=loop, **kwargs)
        starts[id(task)] = (time.perf_counter_ns() + offset, span_context, parent)
        task.add_done_callback(done, context=context)
        return task

    return factory


async def _setup(mode: str) -> TracerProvider | None:
    loop = asyncio.get_running_loop()
    if mode == "noop-callback":
        loop.set_task_factory(callback_factory)
    elif mode.startswith("span-"):
        provider = discarding_provider()
        loop.set_task_factory(span_factory(provider, in_context=mode == "span-in-context"))
        return provider
    elif mode.startswith("asynctrace"):
        provider = discarding_provider() if mode == "asynctrace-tracing" else None
        asynctrace.install(
            registry=CollectorRegistry(), loop_monitor=False, tracer_provider=provider
        )
        return provider
    return None


async def _fanout(n: int, provider: TracerProvider | None) -> tuple[float, float]:
    gc.collect()
    before = len(gc.get_objects())
    c0 = time.process_time()
    outer = asyncio.gather(*(leaf() for _ in range(n)))
    tracked = len(gc.get_objects()) - before if not gc.isenabled() else float("nan")
    await outer
    await asyncio.sleep(0)  # gather's children are freed one loop turn later: inside the timing
    if provider is not None:
        provider.force_flush()  # the export thread's work counts
    return (time.process_time() - c0) / n * 1e6, tracked / n


def _run(mode: str, n: int, gc_on: bool) -> tuple[float, float]:
    providers: list[TracerProvider] = []

    async def main() -> tuple[float, float]:
        provider = await _setup(mode)
        if provider is not None:
            providers.append(provider)
        await _fanout(n, provider)  # warm-up
        return await _fanout(n, provider)

    if not gc_on:
        gc.disable()
    try:
        return asyncio.run(main())
    finally:
        gc.enable()
        reset()
        for provider in providers:
            provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    modes = MODES
    print(f"flat fan-out of {args.tasks} tasks, CPU µs per task (median of {args.rounds})")
    print("| mode | gc on | gc off | tracked objects per pending task |")
    print("|---|---|---|---|")
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for gc_on in (True, False):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                results.setdefault((mode, gc_on), []).append(_run(mode, args.tasks, gc_on))
    base = {g: statistics.median(c for c, _ in results["bare", g]) for g in (True, False)}
    for mode in modes:
        on = statistics.median(c for c, _ in results[mode, True])
        off = statistics.median(c for c, _ in results[mode, False])
        tracked = statistics.median(t for _, t in results[mode, False])
        print(
            f"| {mode} | {on:.1f} ({on / base[True]:.2f}{TIMES}) "
            f"| {off:.1f} ({off / base[False]:.2f}{TIMES})"
            f" | {tracked:.1f} |"
        )


if __name__ == "__main__":
    main()
