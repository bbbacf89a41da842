"""Installations that come and go with their loops, as in a real service and a test suite."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace.testing import TaskCapture


async def work() -> None:
    await asyncio.sleep(0)


def created(registry: CollectorRegistry, operation: str) -> float | None:
    return registry.get_sample_value("asynctrace_tasks_created_total", {"operation": operation})


def test_each_loop_may_install_with_its_own_options() -> None:
    """A loop per test, install(registry=...) in each: the closed loop's options pin nothing."""
    registries = [CollectorRegistry() for _ in range(3)]
    for n, registry in enumerate(registries):

        async def main(registry: CollectorRegistry = registry, n: int = n) -> None:
            asynctrace.install(registry=registry, loop_monitor=False)
            for _ in range(n + 1):
                await asynctrace.create_task(work(), operation_name="step")

        asyncio.run(main())
        # read right after the loop closed: the registry still holds its loop's metrics
        assert created(registry, "step") == n + 1
    assert asynctrace.uninstall() is False  # every installation ended with its loop


def test_repeated_asyncio_run_keeps_no_closed_loop() -> None:
    """Under one process-wide install, closed loops are not kept: memory stays flat."""
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await asynctrace.create_task(work(), operation_name="w")

    for _ in range(200):
        asyncio.run(main())
    gc.collect()
    alive = [ref for ref in loops if ref() is not None]
    assert len(alive) <= 1, f"{len(alive)} of 200 closed loops are still referenced"


def test_tasks_in_flight_at_uninstall_are_not_recorded_by_the_next_installation() -> None:
    """A task started under one installation never reaches the next one's instruments."""
    first, second = TaskCapture(), TaskCapture()
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> None:
        release = asyncio.Event()

        async def wait() -> None:
            await release.wait()

        asynctrace.install(instruments=[first], metrics=False)
        tasks = [asynctrace.create_task(wait(), operation_name="old") for _ in range(5)]
        await asyncio.sleep(0)
        asynctrace.uninstall()
        asynctrace.install(instruments=[second], tracer_provider=provider, metrics=False)
        release.set()
        await asyncio.gather(*tasks)
        await asynctrace.create_task(work(), operation_name="new")

    asyncio.run(main())
    assert [r.metadata.operation_name for _, r in first.created] == ["old"] * 5
    assert first.done == []  # they ended after their installation did
    named = [r.metadata.operation_name for _, r in second.done if r.metadata.operation_name]
    assert named == ["new"]
    assert [s.name for s in exporter.get_finished_spans()] == ["new"]


def _drop_pending_tasks(count: int, capture: TaskCapture | None = None) -> CollectorRegistry:
    """Make ``count`` tasks that wait forever, drop every reference, collect them."""
    registry = CollectorRegistry()

    async def spawn() -> None:
        never = asyncio.get_running_loop().create_future()

        async def stuck() -> None:
            await never

        for _ in range(count):
            asynctrace.create_task(stuck(), operation_name="stuck")
        await asyncio.sleep(0)  # each now waits on `never`, which only they reference

    async def main() -> None:
        instruments = [capture] if capture is not None else []
        asynctrace.install(registry=registry, loop_monitor=False, instruments=instruments)
        await spawn()
        gc.collect()  # the tasks, their coroutines and `never` form garbage cycles
        await asyncio.sleep(0)

    asyncio.run(main())
    return registry


def _in_flight(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("asynctrace_tasks_in_flight", {"operation": "stuck"})


def test_tasks_destroyed_while_pending_are_counted_and_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Metrics only (no record per task): destroyed tasks leave nothing behind.

    They are counted by operation, no longer in flight, and asyncio still logs its warning.
    """
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        registry = _drop_pending_tasks(50)
    destroyed = registry.get_sample_value(
        "asynctrace_tasks_destroyed_pending_total", {"operation": "stuck"}
    )
    assert destroyed == 50
    assert created(registry, "stuck") == 50
    assert _in_flight(registry) == 0
    warnings = [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    assert len(warnings) == 50


def test_tasks_destroyed_while_pending_with_records() -> None:
    """With records (an instrument observing tasks) the same: counted, not in flight."""
    capture = TaskCapture()
    registry = _drop_pending_tasks(20, capture)
    assert (
        registry.get_sample_value(
            "asynctrace_tasks_destroyed_pending_total", {"operation": "stuck"}
        )
        == 20
    )
    assert _in_flight(registry) == 0
    assert [r.metadata.operation_name for _, r in capture.done].count("stuck") == 0


def test_the_apps_exception_handler_still_gets_every_call() -> None:
    """The handler set before install() sees every report; uninstall puts it back."""
    seen: list[str] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        seen.append(str(context.get("message")))

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(handler)
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        loop.call_exception_handler({"message": "from the app"})
        asynctrace.uninstall()
        return loop.get_exception_handler() is handler

    assert asyncio.run(main()) is True
    assert seen == ["from the app"]
