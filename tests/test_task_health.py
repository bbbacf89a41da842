"""Task health: exceptions never retrieved counted by operation; asyncio's reports carry ids."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace._introspect import lean_entry
from asynctrace._state import STATE


async def boom() -> None:
    raise ValueError("lost")


async def forever() -> None:
    await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_never_retrieved_is_counted_and_logged_with_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    caplog.set_level(logging.ERROR, logger="asyncio")
    with asynctrace.correlation("req-lost"):
        task = asynctrace.create_task(boom(), operation_name="dropped")
    await asyncio.sleep(0.01)
    assert task.done()
    del task
    gc.collect()  # asyncio reports it as the task is collected
    await asyncio.sleep(0)
    value = registry.get_sample_value(
        "asynctrace_task_exceptions_never_retrieved_total", {"operation": "dropped"}
    )
    asynctrace.uninstall()
    assert value == 1
    (record,) = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    text = record.getMessage()
    assert "Task exception was never retrieved" in text  # asyncio's own message stays
    assert "correlation_id: 'req-lost'" in text
    assert "operation: 'dropped'" in text


@pytest.mark.asyncio
async def test_retrieved_exceptions_are_not_counted() -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    task = asynctrace.create_task(boom(), operation_name="handled")
    with pytest.raises(ValueError, match="lost"):
        await task
    del task
    gc.collect()
    await asyncio.sleep(0)
    value = registry.get_sample_value(
        "asynctrace_task_exceptions_never_retrieved_total", {"operation": "handled"}
    )
    asynctrace.uninstall()
    assert value == 0


def test_destroyed_pending_is_logged_with_ids(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    loop = asyncio.new_event_loop()
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        asynctrace.install(loop=loop, registry=registry, loop_monitor=False)

        async def start() -> None:
            with asynctrace.correlation("req-gone"):
                asynctrace.create_task(forever(), operation_name="abandoned")
            await asyncio.sleep(0)

        loop.run_until_complete(start())
        gc.collect()  # the pending task is collected while installed: asyncio reports it
        destroyed = registry.get_sample_value(
            "asynctrace_tasks_destroyed_pending_total", {"operation": "abandoned"}
        )
        asynctrace.uninstall(loop)
    finally:
        loop.close()
    assert destroyed == 1
    records = [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    assert records
    text = records[0].getMessage()
    assert "correlation_id: 'req-gone'" in text
    assert "operation: 'abandoned'" in text


def stuck_gauge(registry: CollectorRegistry, operation: str) -> float | None:
    return registry.get_sample_value("asynctrace_tasks_stuck", {"operation": operation})


@pytest.mark.asyncio
@pytest.mark.parametrize("sites", [True, False], ids=["records", "lean"])
async def test_stuck_tasks_are_counted_logged_once_and_get_a_span_event(
    caplog: pytest.LogCaptureFixture, sites: bool
) -> None:
    """With creation sites the factory keeps records; without, the lean path (no record)."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    asynctrace.install(
        registry=registry,
        tracer_provider=provider,
        loop_monitor=False,
        stuck_after={"slow": 0.1, "*": 30},
        creation_sites=sites,
    )
    caplog.set_level(logging.WARNING, logger="asynctrace")
    assert STATE.hooks.lean is not sites
    try:
        with asynctrace.correlation("req-stuck"):
            slow = asynctrace.create_task(forever(), operation_name="slow")
            quick = asynctrace.create_task(forever(), operation_name="quick")
        await asyncio.sleep(0.4)  # several walks: still one log record
        during = stuck_gauge(registry, "slow"), stuck_gauge(registry, "quick")
        slow.cancel()
        quick.cancel()
        await asyncio.gather(slow, quick, return_exceptions=True)
        await asyncio.sleep(0.1)
        after = stuck_gauge(registry, "slow")
    finally:
        asynctrace.uninstall()
    assert during == (1, None)  # "quick" waits 30 s: not stuck yet
    assert after == 0  # done: no longer stuck, and the series stays (alerts resolve)
    (record,) = [r for r in caplog.records if "stuck" in r.getMessage()]
    text = record.getMessage()
    assert "operation=slow" in text
    assert "correlation_id=req-stuck" in text
    assert ("created at " in text) is sites
    assert "test_task_health.py" in text  # where it was created (or is), and where it waits
    assert "forever" in text
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "slow"]
    assert f"trace_id={span.context.trace_id:032x}" in text
    (event,) = [e for e in span.events if e.name == "asynctrace.stuck"]
    assert event.attributes is not None
    assert event.attributes["asynctrace.age_s"] >= 0.1


@pytest.mark.asyncio
async def test_stuck_watch_is_off_by_default() -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    try:
        task = asynctrace.create_task(forever(), operation_name="slow")
        await asyncio.sleep(0.05)
        families = {m.name for m in registry.collect()}
        task.cancel()
    finally:
        asynctrace.uninstall()
    assert "asynctrace_tasks_stuck" not in families
    assert "asynctrace_task_cancellations" in families


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, r"Invalid stuck_after\['\*'\]: -1; expected more than 0"),
        ("10", TypeError, r"Invalid stuck_after: '10'; expected None, seconds"),
        ({"a": float("nan")}, ValueError, r"Invalid stuck_after\['a'\]: nan"),
        ({1: 5}, TypeError, r"Invalid stuck_after key: 1"),
        ({"a": True}, TypeError, r"Invalid stuck_after\['a'\]: True"),
    ],
)
def test_bad_stuck_after_is_refused_with_its_value(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        asynctrace.install(stuck_after=value, registry=CollectorRegistry())  # type: ignore[arg-type]
    assert STATE.options is None  # nothing installed, nothing half-done


def test_pending_when_asyncio_run_ends_is_listed_in_one_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False, creation_sites=True)
    caplog.set_level(logging.WARNING, logger="asynctrace")

    kept: list[asyncio.Task[None]] = []  # referenced: pending, not garbage (the loop's are weak)

    async def main() -> None:
        with asynctrace.correlation("req-left"):
            for _ in range(3):
                kept.append(asynctrace.create_task(forever(), operation_name="left-behind"))
        kept.append(asynctrace.create_task(forever(), operation_name="also-left"))
        await asyncio.sleep(0)

    try:
        asyncio.run(main())
        left = registry.get_sample_value(
            "asynctrace_tasks_pending_at_close_total", {"operation": "left-behind"}
        )
        also = registry.get_sample_value(
            "asynctrace_tasks_pending_at_close_total", {"operation": "also-left"}
        )
    finally:
        asynctrace.uninstall()
    assert (left, also) == (3, 1)
    (record,) = [r for r in caplog.records if "still pending" in r.getMessage()]
    text = record.getMessage()
    assert "4 task(s) still pending when asyncio.run ended" in text
    assert "also-left=1, left-behind=3" in text
    assert "correlation_id=req-left" in text
    assert "created at " in text


def test_pending_when_a_loop_closes_is_listed(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    loop = asyncio.new_event_loop()
    asynctrace.install(loop, registry=registry, loop_monitor=False)
    caplog.set_level(logging.WARNING, logger="asynctrace")

    async def start() -> asyncio.Task[None]:
        return asynctrace.create_task(forever(), operation_name="abandoned")

    task = loop.run_until_complete(start())
    loop.close()  # the task never ran to the end
    value = registry.get_sample_value(
        "asynctrace_tasks_pending_at_close_total", {"operation": "abandoned"}
    )
    asynctrace.uninstall()
    assert value == 1
    (record,) = [r for r in caplog.records if "still pending" in r.getMessage()]
    assert "1 task(s) still pending when the loop closed (abandoned=1)" in record.getMessage()
    assert "close" not in vars(loop)  # the loop's own close() again
    task.get_coro().close()  # type: ignore[union-attr]
    del task


@pytest.mark.asyncio
async def test_destroyed_pending_task_is_logged_with_its_creation_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False, creation_sites=True)
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def waits_on(future: asyncio.Future[None]) -> None:
        await future

    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asynctrace.create_task(waits_on(future), operation_name="orphan")
    await asyncio.sleep(0)
    del future  # nothing holds the task any more: it is destroyed pending
    gc.collect()
    await asyncio.sleep(0)
    value = registry.get_sample_value(
        "asynctrace_tasks_destroyed_pending_total", {"operation": "orphan"}
    )
    asynctrace.uninstall()
    assert value == 1
    (text,) = [
        r.getMessage()
        for r in caplog.records
        if "destroyed but it is pending" in r.getMessage() and "orphan" in r.getMessage()
    ]
    assert "operation: 'orphan'" in text
    assert "created_at: '" in text
    assert "test_task_health.py" in text


@pytest.mark.asyncio
async def test_stuck_watch_stops_after_fork(caplog: pytest.LogCaptureFixture) -> None:
    """A forked child inherits the loop and its scheduled walks: they end, nothing is logged."""
    from asynctrace.sinks.health import StuckWatch  # noqa: PLC0415

    watch = StuckWatch((("*", 0.05),))
    watch.loop_attached(asyncio.get_running_loop())
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    caplog.set_level(logging.WARNING, logger="asynctrace")
    try:
        task = asynctrace.create_task(forever(), operation_name="in-child")
        watch.after_fork()  # what a forked child's installation calls
        await asyncio.sleep(0.3)
        task.cancel()
    finally:
        asynctrace.uninstall()
    assert watch.stuck_now() == {}
    assert not [r for r in caplog.records if "stuck" in r.getMessage()]


@pytest.mark.asyncio
async def test_stuck_event_of_a_task_destroyed_pending_is_dropped() -> None:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

    from asynctrace.sinks.tracing import SpanSink  # noqa: PLC0415

    asynctrace.install(
        registry=CollectorRegistry(),
        tracer_provider=TracerProvider(),
        loop_monitor=False,
        stuck_after=0.05,
    )
    try:
        (sink,) = [i for i in STATE.hooks.instruments if isinstance(i, SpanSink)]

        async def waits_on(future: asyncio.Future[None]) -> None:
            await future

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asynctrace.create_task(waits_on(future), operation_name="orphan")
        await asyncio.sleep(0.3)  # stuck: an event noted for its span, on its handle
        handle = lean_entry(task)
        noted = [e.name for e in handle.late]  # type: ignore[attr-defined]
        gone = weakref.ref(handle)
        del future, task, handle  # destroyed pending: its span never ends
        gc.collect()
        await asyncio.sleep(0)
    finally:
        asynctrace.uninstall()
    assert noted == ["asynctrace.stuck"]
    assert gone() is None  # the event went with the task: the sink keeps nothing for it
    assert not hasattr(sink, "_late_events")
