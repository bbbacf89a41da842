"""Many loops in many threads under one process-wide install: exact counts, no cross-talk.

On a free-threaded build (3.14t) the GIL must stay off through all of it: asynctrace and
the libraries it imports declare that they need none.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
import threading
from collections import Counter

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace

THREADS = 4
TASKS = int(os.environ.get("ASYNCTRACE_STRESS_TASKS", "2000"))  # per thread and repetition
REPEAT = int(os.environ.get("ASYNCTRACE_STRESS_REPEAT", "2"))
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


async def ok(i: int) -> int:
    await asyncio.sleep(0)
    return i


async def bad(i: int) -> None:
    await asyncio.sleep(0)
    raise ValueError(i)


async def hang() -> None:
    await asyncio.sleep(3600)


def one_thread(index: int, results: dict[int, list[bool]]) -> None:
    async def main() -> list[bool]:
        with asynctrace.correlation(f"thread-{index}"):
            oks = [asynctrace.create_task(ok(i), operation_name="ok") for i in range(TASKS)]
            bads = [asynctrace.create_task(bad(i), operation_name="bad") for i in range(TASKS // 4)]
            hangs = [
                asynctrace.create_task(hang(), operation_name="hang") for _ in range(TASKS // 4)
            ]
            await asyncio.sleep(0)
            for task in hangs:
                task.cancel()
            done = await asyncio.gather(*oks)
            failed = await asyncio.gather(*bads, return_exceptions=True)
            cancelled = await asyncio.gather(*hangs, return_exceptions=True)
        return [
            done == list(range(TASKS)),
            [e.args[0] for e in failed if isinstance(e, ValueError)] == list(range(TASKS // 4)),
            all(isinstance(e, asyncio.CancelledError) for e in cancelled),
        ]

    results[index] = asyncio.run(main())


def test_loops_in_threads_count_exactly() -> None:
    """4 threads, each its own loop: every result right, every span and count exact."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    asynctrace.install(tracer_provider=provider, registry=registry, loop_monitor=False)
    for _ in range(REPEAT):
        results: dict[int, list[bool]] = {}
        threads = [threading.Thread(target=one_thread, args=(i, results)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == {i: [True, True, True] for i in range(THREADS)}
    if FREE_THREADED:
        assert not sys._is_gil_enabled()

    def count(operation: str, outcome: str) -> float | None:
        return registry.get_sample_value(
            "asynctrace_task_duration_seconds_count", {"operation": operation, "outcome": outcome}
        )

    runs = THREADS * REPEAT
    assert count("ok", "finished") == runs * TASKS
    assert count("bad", "exception") == runs * (TASKS // 4)
    assert count("hang", "cancelled") == runs * (TASKS // 4)
    for operation in ("ok", "bad", "hang"):
        in_flight = registry.get_sample_value(
            "asynctrace_tasks_in_flight", {"operation": operation}
        )
        assert in_flight == 0
    spans = [s for s in exporter.get_finished_spans() if s.name in ("ok", "bad", "hang")]
    assert Counter(s.name for s in spans) == {
        "ok": runs * TASKS,
        "bad": runs * (TASKS // 4),
        "hang": runs * (TASKS // 4),
    }
    # no cross-talk: each thread's spans carry its id, in its own traces
    by_id = Counter((s.attributes or {}).get("asynctrace.correlation_id") for s in spans)
    assert by_id == {f"thread-{i}": REPEAT * (TASKS + TASKS // 2) for i in range(THREADS)}
    traces: dict[int, set[object]] = {}
    for s in spans:
        assert s.context is not None
        traces.setdefault(s.context.trace_id, set()).add(
            (s.attributes or {}).get("asynctrace.correlation_id")
        )
    assert all(len(ids) == 1 for ids in traces.values())
