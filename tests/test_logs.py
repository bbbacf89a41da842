"""Logs carry the task's ids: structlog processor and stdlib filter."""

from __future__ import annotations

import asyncio
import logging

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import asynctrace


def test_structlog_processor_adds_ids() -> None:
    """Events logged inside a task carry correlation id, operation, task name, trace and span."""
    provider = TracerProvider()

    async def work() -> None:
        structlog.get_logger().info("working")

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asynctrace.create_task(
            work(), operation_name="normalize", correlation_id="req-5", name="w1"
        )

    with structlog.testing.capture_logs(processors=[asynctrace.add_task_context]) as logs:
        asyncio.run(main())
    (event,) = logs
    assert event["event"] == "working"
    assert event["correlation_id"] == "req-5"
    assert event["operation_name"] == "normalize"
    assert event["task_name"] == "w1"
    assert len(event["trace_id"]) == 32
    assert len(event["span_id"]) == 16


def test_structlog_outside_tasks_adds_nothing_unknown() -> None:
    """Outside any task and span, only what is known is added."""
    with (
        structlog.testing.capture_logs(processors=[asynctrace.add_task_context]) as logs,
        asynctrace.correlation("c-1"),
    ):
        structlog.get_logger().info("plain")
    assert logs == [{"event": "plain", "log_level": "info", "correlation_id": "c-1"}]


def test_stdlib_filter_adds_attributes(caplog: pytest.LogCaptureFixture) -> None:
    """The logging.Filter sets the ids as record attributes for format strings."""
    log = logging.getLogger("app.test")
    task_filter = asynctrace.TaskContextFilter()
    caplog.handler.addFilter(task_filter)

    async def work() -> None:
        log.warning("hello")

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry())
        await asynctrace.create_task(work(), operation_name="store", correlation_id="req-6")

    try:
        asyncio.run(main())
    finally:
        caplog.handler.removeFilter(task_filter)
    (record,) = [r for r in caplog.records if r.name == "app.test"]
    assert record.correlation_id == "req-6"  # type: ignore[attr-defined]
    assert record.operation_name == "store"  # type: ignore[attr-defined]
    assert record.trace_id is None  # type: ignore[attr-defined]  # no tracer provider here
    formatter = logging.Formatter("%(correlation_id)s %(operation_name)s %(message)s")
    assert formatter.format(record) == "req-6 store hello"


def test_a_broken_span_never_breaks_a_log_call() -> None:
    """The filter and the processor with a span that raises: the line is logged, ids None."""
    from opentelemetry import trace  # noqa: PLC0415

    class Broken(trace.NonRecordingSpan):
        def get_span_context(self) -> trace.SpanContext:
            raise RuntimeError("broken span")

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("test.broken-span")
    handler = Keep()
    handler.addFilter(asynctrace.TaskContextFilter())
    log.addHandler(handler)
    try:
        with trace.use_span(Broken(trace.INVALID_SPAN_CONTEXT)):
            log.warning("still logged")
            event = asynctrace.add_task_context(None, "info", {"event": "e"})
    finally:
        log.removeHandler(handler)
    (record,) = records
    assert record.getMessage() == "still logged"
    assert record.correlation_id is None  # type: ignore[attr-defined]
    assert event == {"event": "e"}
    assert asynctrace.telemetry_errors() == {"log context": 2}
