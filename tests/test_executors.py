"""Context across executors: run_in_executor carries ids, metadata and the current span."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asynctrace


def _seen_in_thread() -> tuple[str | None, str | None, int]:
    metadata = asynctrace.task_metadata()
    span = trace.get_current_span().get_span_context()
    return (
        asynctrace.correlation_id(),
        metadata.operation_name if metadata is not None else None,
        span.span_id,
    )


@pytest.mark.asyncio
async def test_ids_and_span_reach_the_worker_thread() -> None:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    asynctrace.install(tracer_provider=provider, metrics=False)
    tracer = provider.get_tracer("test")

    def child_span() -> None:
        with tracer.start_as_current_span("in-thread"):
            pass

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    # The pool's thread starts here, outside the request: on free-threaded 3.14t a new thread
    # starts with its creator's context (sys.flags.thread_inherit_context).
    await loop.run_in_executor(pool, _seen_in_thread)

    async def handler() -> tuple[object, object, int]:
        here = trace.get_current_span().get_span_context().span_id
        carried = await asynctrace.run_in_executor(pool, _seen_in_thread)
        plain = await loop.run_in_executor(pool, _seen_in_thread)
        await asynctrace.run_in_executor(pool, child_span)
        return carried, plain, here

    try:
        with asynctrace.correlation("req-42"):
            task = asynctrace.create_task(handler(), operation_name="handle")
            carried, plain, here = await task
    finally:
        pool.shutdown()
        asynctrace.uninstall()
    assert carried == ("req-42", "handle", here)
    assert plain[0] != "req-42"  # what loop.run_in_executor loses: the caller's id
    assert plain[2] != here
    spans = {s.name: s for s in memory.get_finished_spans()}
    assert spans["in-thread"].parent is not None
    assert spans["in-thread"].parent.span_id == here  # nested under the task's span


@pytest.mark.asyncio
async def test_log_records_in_the_thread_carry_the_id(caplog: pytest.LogCaptureFixture) -> None:
    asynctrace.install(metrics=False)
    log = logging.getLogger("test.executors")
    log.addFilter(asynctrace.TaskContextFilter())
    caplog.set_level(logging.INFO, logger="test.executors")
    with asynctrace.correlation("req-7"):
        await asynctrace.run_in_executor(None, log.info, "hashed")
    asynctrace.uninstall()
    (record,) = [r for r in caplog.records if r.getMessage() == "hashed"]
    assert record.correlation_id == "req-7"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None, 5), "Invalid func: 5; expected a callable."),
        (("pool", print), "Invalid executor: 'pool'; expected a concurrent.futures.Executor"),
    ],
)
async def test_bad_arguments(args: tuple[object, object], message: str) -> None:
    with pytest.raises(TypeError) as raised:
        asynctrace.run_in_executor(*args)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        asynctrace.run_in_executor(None, print)
