"""Fault injection: telemetry that fails in every way leaves the app's results unchanged.

Every test is bounded in time (pytest-timeout, and each test's own deadlines), checks that
the application computed what it computes without asynctrace, and that what asynctrace
dropped is counted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult, TraceIdRatioBased
from prometheus_client import CollectorRegistry

import asynctrace
from tests import faulty_collectors

ROOT = Path(__file__).resolve().parent.parent
TASKS = 600


async def leaf(i: int) -> int:
    await asyncio.sleep(0)
    return i


async def workload() -> list[int]:
    return await asyncio.gather(
        *(asynctrace.create_task(leaf(i), operation_name="leaf") for i in range(TASKS))
    )


@pytest.mark.parametrize(
    "collector",
    [faulty_collectors.refused, faulty_collectors.status, faulty_collectors.garbage],
    ids=["refused", "500", "garbage"],
)
def test_a_failing_collector_drops_are_all_counted(
    collector: Callable[[], AbstractContextManager[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused, 500, garbage: results unchanged; every span ended is counted as dropped."""
    # seconds, as the Python SDK reads it: each batch's retries end within 1 s
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    with collector() as url:
        registry = CollectorRegistry()
        asynctrace.install(otlp_endpoint=url, registry=registry, loop_monitor=False)
        assert asyncio.run(workload()) == list(range(TASKS))
        assert asynctrace.flush(30) is True  # every queued span was tried
        dropped = registry.get_sample_value("asynctrace_spans_dropped_total")
        created = registry.get_sample_value("asynctrace_tasks_created_total", {"operation": "leaf"})
        errors = asynctrace.telemetry_errors()
    assert created == TASKS
    assert dropped == TASKS + 1  # the leaves and asyncio.run's main task: none exported
    (source,) = errors
    assert source.startswith("OTLP exporter (http/protobuf, http://127.0.0.1:")


def test_a_hung_collector_never_hangs_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """A collector that never answers: shutdown() returns within shutdown_timeout; what was
    still queued is dropped, counted and logged.
    """
    with faulty_collectors.silent() as url:
        asynctrace.install(
            otlp_endpoint=url, registry=CollectorRegistry(), loop_monitor=False, shutdown_timeout=1
        )
        assert asyncio.run(workload()) == list(range(TASKS))
        with caplog.at_level(logging.WARNING, logger="asynctrace"):
            start = time.monotonic()
            asynctrace.shutdown()
            took = time.monotonic() - start
    assert took < 2.5, f"shutdown took {took:.1f} s"
    (message,) = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    lost = int(re.search(r"(\d+) span\(s\) not exported", message)[1])  # type: ignore[index]
    # every span ended (the leaves and the main task): waiting, or in the export that hangs
    assert lost == TASKS + 1


def test_process_exit_is_bounded_with_a_hung_collector() -> None:
    """The interpreter exits promptly (atexit, bounded) though the collector never answers."""
    with faulty_collectors.silent() as url:
        script = textwrap.dedent(
            f"""
            import asyncio, asynctrace
            from prometheus_client import CollectorRegistry

            asynctrace.install(otlp_endpoint={url!r}, registry=CollectorRegistry(),
                               shutdown_timeout=1)

            async def leaf():
                await asyncio.sleep(0)

            async def main():
                await asyncio.gather(*(leaf() for _ in range(2000)))

            asyncio.run(main())
            print("app done", flush=True)
            """
        )
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app done"
    assert took < 8, f"the process took {took:.1f} s to exit"  # start-up, imports, 1 s bound
    assert "did not finish within 1.0 s" in result.stderr


def test_uninstall_inside_a_loop_never_waits_for_the_collector() -> None:
    """uninstall() in a running loop returns at once; the export ends in the background."""
    lags: list[float] = []

    async def main() -> float:
        asynctrace.install(
            otlp_endpoint=url, registry=CollectorRegistry(), loop_monitor=False, shutdown_timeout=2
        )
        await workload()
        start = time.monotonic()
        assert asynctrace.uninstall() is True
        took = time.monotonic() - start
        loop = asyncio.get_running_loop()
        for _ in range(10):  # the loop keeps its pace while the export ends elsewhere
            before = loop.time()
            await asyncio.sleep(0.05)
            lags.append(loop.time() - before - 0.05)
        return took

    with faulty_collectors.silent() as url:
        took = asyncio.run(main())
        closers = [t for t in threading.enumerate() if t.name == "asynctrace-close"]
        for thread in closers:
            thread.join(5)  # bounded by shutdown_timeout
    assert took < 0.5, f"uninstall() held the loop {took:.2f} s"
    assert max(lags) < 0.5
    assert closers  # the export was ended off the loop
    assert not any(t.is_alive() for t in closers)


class FlakySampler(Sampler):
    """Raises on every third decision, samples the rest."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = TraceIdRatioBased(1.0)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("sampler bug")
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "FlakySampler"


def test_a_raising_sampler_or_filter_costs_one_span_each_time() -> None:
    """A sampler or task filter that raises: that task has no span, the next ones do."""
    for kind in ("sampler", "filter"):
        asynctrace.testing.reset()
        sampler = FlakySampler()
        provider = TracerProvider(sampler=sampler if kind == "sampler" else None)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        calls = [0]

        def task_filter(metadata: asynctrace.TaskMetadata, calls: list[int] = calls) -> bool:
            calls[0] += 1
            if calls[0] % 3 == 0:
                raise RuntimeError("filter bug")
            return metadata.operation_name == "leaf"

        asynctrace.install(
            tracer_provider=provider,
            registry=CollectorRegistry(),
            loop_monitor=False,
            task_filter=task_filter if kind == "filter" else None,
        )
        assert asyncio.run(workload()) == list(range(TASKS))
        leaves = [s for s in exporter.get_finished_spans() if s.name == "leaf"]
        failures = asynctrace.telemetry_errors()["instrument SpanSink"]
        raised = (sampler.calls if kind == "sampler" else calls[0]) // 3
        assert failures == raised, kind
        assert len(leaves) >= TASKS - failures  # only the tasks whose call raised: no span
        assert len(leaves) >= TASKS * 0.6


def _blocks_growth(warm: int, measured: int, **options: Any) -> tuple[int, float | None]:
    """Memory blocks added over ``measured`` batches of 10,000 tasks, after ``warm`` ones."""
    registry = CollectorRegistry()

    async def batches(count: int) -> None:
        for _ in range(count):
            await asyncio.gather(
                *(asynctrace.create_task(leaf(i), operation_name="leaf") for i in range(10_000))
            )

    async def main() -> int:
        asynctrace.install(registry=registry, loop_monitor=False, **options)
        await batches(warm)  # caches and pools warm
        before = sys.getallocatedblocks()
        await batches(measured)
        return sys.getallocatedblocks() - before

    growth = asyncio.run(main())
    finished = registry.get_sample_value(
        "asynctrace_task_duration_seconds_count", {"operation": "leaf", "outcome": "finished"}
    )
    return growth, finished


def test_a_million_tasks_keep_memory_flat() -> None:
    """Metrics for 1,000,000 tasks: nothing is kept per finished task (blocks stay flat)."""
    growth, finished = _blocks_growth(20, 80)
    assert finished == 1_000_000
    # 800,000 tasks later: well under one block per 100 tasks (a leak is >= 1 per task)
    assert growth < 8_000, f"{growth} memory blocks more"


def test_traced_tasks_keep_memory_flat() -> None:
    """Spans too (exported to a sink that keeps nothing): 250,000 tasks, memory flat."""

    class Discard(InMemorySpanExporter):
        def export(self, spans: Any) -> Any:
            del spans  # kept nowhere
            return super().export([])

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    growth, finished = _blocks_growth(5, 20, tracer_provider=provider)
    assert finished == 250_000
    assert growth < 2_000, f"{growth} memory blocks more"


def test_an_unreadable_context_never_reaches_the_app() -> None:
    """An instrument reading a span context that raises: counted, the task unaffected."""

    class Broken(asynctrace.Instrument):
        def task_context(self, record: asynctrace.TaskRecord) -> None:  # noqa: ARG002
            raise Context.__new__(Context)  # type: ignore[misc]  # not even an exception

    asynctrace.install(instruments=[Broken()], metrics=False)
    assert asyncio.run(workload()) == list(range(TASKS))
    assert asynctrace.telemetry_errors()["instrument Broken"] >= TASKS
