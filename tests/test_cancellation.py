"""Why a task was cancelled: on its span, and counted by operation and reason (3.11 to 3.14)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _factory
from tests.otlp_receivers import Received, http_receiver


async def forever() -> None:
    await asyncio.Event().wait()


async def fails() -> None:
    await asyncio.sleep(0.01)
    raise ValueError("sibling failed")


def cancellations(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for metric in registry.collect():
        if metric.name == "asynctrace_task_cancellations":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["operation"], sample.labels["reason"]] = sample.value
    return out


KEPT: list[asyncio.Task[None]] = []


async def each_reason() -> dict[str, Any]:
    """One task cancelled for each reason but shutdown; what the app saw."""
    KEPT.clear()
    seen: dict[str, Any] = {}
    waited = asynctrace.create_task(forever(), operation_name="waited")
    with pytest.raises(TimeoutError):
        await asynctrace.create_task(
            asyncio.wait_for(waited, 0.01), operation_name="deadline-owner"
        )
    inner = asynctrace.create_task(forever(), operation_name="timed")

    async def under_timeout() -> None:
        async with asyncio.timeout(0.01):
            await inner

    with pytest.raises(TimeoutError):
        await asynctrace.create_task(under_timeout(), operation_name="timeout-owner")

    async def group() -> None:
        async with asyncio.TaskGroup() as g:
            # not the group's: pending when asyncio.run ends (kept: the loop's refs are weak)
            KEPT.append(asynctrace.create_task(forever(), operation_name="sibling"))
            g.create_task(forever(), name="grouped")
            g.create_task(fails(), name="failing")

    with pytest.raises(ExceptionGroup):
        await asynctrace.create_task(group(), operation_name="group-owner")
    explicit = asynctrace.create_task(forever(), operation_name="explicit")
    await asyncio.sleep(0)
    explicit.cancel("no longer needed")
    try:
        await explicit
    except asyncio.CancelledError as exc:
        seen["explicit_args"] = exc.args  # the app still gets the message
    seen["waited"] = waited.cancelled()
    seen["inner"] = inner.cancelled()
    return seen


def test_each_reason_is_counted_by_operation() -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    try:
        seen = asyncio.run(each_reason())
        counts = cancellations(registry)
    finally:
        asynctrace.uninstall()
    assert seen == {"explicit_args": ("no longer needed",), "waited": True, "inner": True}
    assert counts[("waited", "timeout")] == 1  # wait_for(task) cancelled the task
    assert counts[("timed", "timeout")] == 1  # awaited under asyncio.timeout()
    # The TaskGroup's child (no operation of its own) was aborted when its sibling failed.
    assert counts[("unnamed", "taskgroup")] == 1
    assert counts[("explicit", "explicit")] == 1
    # The stray task was pending when asyncio.run ended: cancelled by the shutdown.
    assert counts[("sibling", "shutdown")] == 1
    assert sum(counts.values()) == 5


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    asynctrace.install(tracer_provider=provider, registry=CollectorRegistry(), loop_monitor=False)
    yield exporter
    asynctrace.uninstall()


def test_reason_and_cause_are_on_the_span(spans: InMemorySpanExporter) -> None:
    asyncio.run(each_reason())
    attrs = {s.name: dict(s.attributes or {}) for s in spans.get_finished_spans()}
    assert attrs["waited"]["asyncio.task.cancel.reason"] == "timeout"
    # caused by the task whose deadline expired: wait_for's own (3.11) or its caller's
    assert attrs["waited"]["asynctrace.cancelled_by.operation"] == "deadline-owner"
    assert attrs["timed"]["asynctrace.cancelled_by.operation"] == "timeout-owner"
    assert attrs["grouped"]["asyncio.task.cancel.reason"] == "taskgroup"
    # the sibling whose failure aborted the group
    assert (
        attrs["grouped"]["asynctrace.cancelled_by.correlation_id"]
        == (attrs["failing"]["asynctrace.correlation_id"])
    )
    assert attrs["explicit"]["asyncio.task.cancel.reason"] == "explicit"
    assert attrs["explicit"]["asyncio.task.cancel.message"] == "no longer needed"
    assert attrs["sibling"]["asyncio.task.cancel.reason"] == "shutdown"
    assert "asyncio.task.cancel.reason" not in attrs["failing"]  # not cancelled: no reason
    assert attrs["failing"]["asyncio.task.outcome"] == "exception"


def test_reason_reaches_a_real_otlp_receiver() -> None:
    """asynctrace's own OTLP lane sends cancelled spans by the SDK's path, reason included."""
    for url, received in http_receiver():
        asynctrace.install(otlp_endpoint=url, registry=CollectorRegistry(), loop_monitor=False)
        try:
            asyncio.run(each_reason())
        finally:
            asynctrace.shutdown()
        check_received(received)


def check_received(received: Received) -> None:
    by_name = {s["name"]: s for s in received.snapshot()}
    assert by_name["explicit"]["attributes"]["asyncio.task.cancel.message"] == "no longer needed"
    assert by_name["timed"]["attributes"]["asyncio.task.cancel.reason"] == "timeout"
    assert by_name["sibling"]["attributes"]["asyncio.task.cancel.reason"] == "shutdown"


def test_asyncio_behaves_the_same_and_is_restored() -> None:
    """While installed the cancellers are wrapped; after, asyncio's own are back."""
    originals = (
        asyncio.timeouts.Timeout._on_timeout,
        asyncio.TaskGroup._abort,
        asyncio.TaskGroup._on_task_done,
        asyncio.runners._cancel_all_tasks,  # type: ignore[attr-defined]
    )
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    try:
        wrapped = (
            asyncio.timeouts.Timeout._on_timeout,
            asyncio.TaskGroup._abort,
            asyncio.TaskGroup._on_task_done,
            asyncio.runners._cancel_all_tasks,  # type: ignore[attr-defined]
        )
        assert all(w is not o for w, o in zip(wrapped, originals, strict=True))
        seen = asyncio.run(each_reason())
    finally:
        asynctrace.uninstall()
    after = (
        asyncio.timeouts.Timeout._on_timeout,
        asyncio.TaskGroup._abort,
        asyncio.TaskGroup._on_task_done,
        asyncio.runners._cancel_all_tasks,  # type: ignore[attr-defined]
    )
    assert after == originals
    assert seen == asyncio.run(each_reason())  # the same outcomes without asynctrace


def test_tasks_that_are_not_cancelled_pay_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason is looked up only for cancelled tasks."""
    looked_up: list[object] = []
    monkeypatch.setattr(_factory, "cancellation_of", looked_up.append)
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)

    async def main() -> None:
        await asyncio.gather(*(asynctrace.create_task(asyncio.sleep(0)) for _ in range(50)))

    try:
        asyncio.run(main())
    finally:
        asynctrace.uninstall()
    assert looked_up == []


def test_reasons_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    try:
        with asyncio.Runner(loop_factory=asynctrace.loop_factory(uvloop.new_event_loop)) as runner:
            seen = runner.run(each_reason())
        counts = cancellations(registry)
    finally:
        asynctrace.uninstall()
    assert seen["explicit_args"] == ("no longer needed",)
    assert counts[("waited", "timeout")] == 1
    assert counts[("timed", "timeout")] == 1
    assert counts[("unnamed", "taskgroup")] == 1
    assert counts[("explicit", "explicit")] == 1
    assert counts[("sibling", "shutdown")] == 1


def test_stuck_event_reaches_a_real_otlp_receiver() -> None:
    """A stuck task's span leaves the lane for the SDK's path, with its asynctrace.stuck event."""

    async def main() -> None:
        await asynctrace.create_task(asyncio.sleep(0.3), operation_name="slow")
        await asynctrace.create_task(asyncio.sleep(0), operation_name="quick")

    for url, received in http_receiver():
        asynctrace.install(
            otlp_endpoint=url,
            registry=CollectorRegistry(),
            loop_monitor=False,
            stuck_after={"slow": 0.1},
        )
        try:
            asyncio.run(main())
        finally:
            asynctrace.shutdown()
        by_name = {s["name"]: s for s in received.snapshot()}
        ((name, attributes),) = by_name["slow"]["events"]
        assert name == "asynctrace.stuck"
        assert attributes["asynctrace.age_s"] >= 0.1
        assert by_name["quick"]["events"] == []
