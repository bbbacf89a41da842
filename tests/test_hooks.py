"""Hook isolation: a failure costs one call, counted per source, logged first then rate limited."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace._errors import ErrorCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_error_log_is_rate_limited_per_source(caplog: pytest.LogCaptureFixture) -> None:
    """First failure of a source logged with its traceback; then at most once per interval.

    Every failure is counted; a later log line says how many went unlogged since.
    """
    clock = Clock()
    errors = ErrorCounts(clock=clock, log_every=60.0)
    with caplog.at_level(logging.ERROR, logger="asynctrace"):
        for _ in range(5):
            errors.count("instrument A", RuntimeError("a"))
        errors.count("instrument B", RuntimeError("b"))  # another source: its own first log
        clock.now += 59.0
        errors.count("instrument A", RuntimeError("a"))  # still inside the minute: silent
        clock.now += 1.0
        errors.count("instrument A", KeyError("k"))  # a minute after the first log: logged
    assert errors.snapshot() == {"instrument A": 7, "instrument B": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].startswith("asynctrace: instrument A failed;")
    assert caplog.records[0].exc_info is not None
    assert messages[1].startswith("asynctrace: instrument B failed;")
    assert "instrument A failed 6 more time(s)" in messages[2]
    assert "(7 in all)" in messages[2]
    assert "KeyError" in messages[2]


class Meddler(asynctrace.Instrument):
    """A user instrument that tries to keep its own state on the record (no slot for it)."""

    def __init__(self) -> None:
        self.calls = 0

    def task_context(self, record: asynctrace.TaskRecord) -> None:
        self.calls += 1
        record.sink_data = "mine"  # type: ignore[attr-defined]


async def leaf(i: int) -> int:
    await asyncio.sleep(0)
    return i


def test_user_instrument_cannot_break_tracing() -> None:
    """An instrument writing on the record fails alone: spans and its later calls go on."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    meddler = Meddler()

    async def main() -> list[int]:
        asynctrace.install(
            tracer_provider=provider, registry=CollectorRegistry(), instruments=[meddler]
        )
        return await asyncio.gather(*(leaf(i) for i in range(10)))

    assert asyncio.run(main()) == list(range(10))
    assert len([s for s in exporter.get_finished_spans() if s.name == "leaf"]) == 10
    assert meddler.calls >= 10
    assert asynctrace.telemetry_errors() == {"instrument Meddler": meddler.calls}


def test_raising_id_generator_costs_one_id() -> None:
    """An id generator that raises once: that task has no id, the next ones get theirs."""
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 2:  # the first call is install()'s validation sample
            raise RuntimeError("entropy")
        return f"id-{len(calls)}"

    async def child() -> str | None:
        return asynctrace.correlation_id()

    async def main() -> list[Any]:
        asynctrace.install(id_generator=flaky, metrics=False)
        return [await asynctrace.create_task(child()) for _ in range(3)]

    # main itself is adopted first (call 2, which raises); its children each get a new id
    ids = asyncio.run(main())
    assert ids == ["id-3", "id-4", "id-5"]
    assert asynctrace.telemetry_errors() == {"id_generator": 1}


def test_a_raising_scope_hook_costs_only_its_call() -> None:
    """A correlation_scope hook (or what it returns) raising: the block runs, counted by name."""
    ended: list[object] = []

    class Scoper(asynctrace.Instrument):
        def correlation_scope(self, correlation_id: str, name: str | None) -> Any:  # noqa: ARG002
            if correlation_id == "bad-open":
                raise RuntimeError("open")

            def end(exc: BaseException | None) -> None:
                ended.append(exc)
                raise RuntimeError("end")

            return end

    async def main() -> list[str | None]:
        asynctrace.install(instruments=[Scoper()], metrics=False)
        seen = []
        for cid in ("bad-open", "bad-end"):
            with asynctrace.correlation(cid):
                seen.append(asynctrace.correlation_id())
        return seen

    assert asyncio.run(main()) == ["bad-open", "bad-end"]
    assert ended == [None]
    assert asynctrace.telemetry_errors() == {"instrument Scoper": 2}
