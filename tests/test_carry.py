"""carry()/resume(): a queue item's correlation id and trace reach the worker that handles it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asynctrace


@pytest.mark.asyncio
async def test_worker_takes_on_each_items_id_and_trace(caplog: pytest.LogCaptureFixture) -> None:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    asynctrace.install(tracer_provider=provider, metrics=False)
    log = logging.getLogger("test.carry")
    log.addFilter(asynctrace.TaskContextFilter())
    caplog.set_level(logging.INFO, logger="test.carry")
    queue: asyncio.Queue[tuple[str, asynctrace.Carried] | None] = asyncio.Queue()
    handled: list[tuple[str, str | None, str | None, int]] = []

    async def store(item: str) -> None:
        await asyncio.sleep(0)
        log.info("stored %s", item)

    async def worker() -> None:
        while (entry := await queue.get()) is not None:
            item, carried = entry
            plain = asynctrace.correlation_id()  # the worker's own, from its start
            with asynctrace.resume(carried, span_name="handle item") as cid:
                await asynctrace.create_task(store(item), operation_name="store")
                span = trace.get_current_span().get_span_context()
                handled.append((item, plain, cid, span.trace_id))

    with asynctrace.correlation("worker-boot"):
        consumer = asynctrace.create_task(worker(), operation_name="worker")
    producer_traces = {}
    for rid in ("req-1", "req-2"):
        with asynctrace.correlation(rid, span_name="POST /ingest"):
            producer_traces[rid] = trace.get_current_span().get_span_context().trace_id
            await queue.put((f"item-{rid}", asynctrace.carry()))
    await queue.put(None)
    await consumer
    asynctrace.uninstall()

    assert [(i, p, c) for i, p, c, _ in handled] == [
        ("item-req-1", "worker-boot", "req-1"),
        ("item-req-2", "worker-boot", "req-2"),
    ]
    for item, _, cid, trace_id in handled:
        assert trace_id == producer_traces[cid], item  # the producer's trace continues
    stored = {r.getMessage(): r.correlation_id for r in caplog.records}
    assert stored == {"stored item-req-1": "req-1", "stored item-req-2": "req-2"}
    spans = memory.get_finished_spans()
    for rid in ("req-1", "req-2"):
        blocks = [
            s for s in spans
            if s.name == "handle item" and s.context.trace_id == producer_traces[rid]
        ]  # fmt: skip
        assert len(blocks) == 1
        stores = [s for s in spans if s.name == "store" and s.parent is not None
                  and s.parent.span_id == blocks[0].context.span_id]  # fmt: skip
        assert len(stores) == 1


def test_without_tracing_only_the_id_is_carried() -> None:
    with asynctrace.correlation("req-9"):
        carried = asynctrace.carry()
    assert carried.correlation_id == "req-9"
    with asynctrace.resume(carried) as cid:
        assert cid == asynctrace.correlation_id() == "req-9"
    assert asynctrace.correlation_id() is None
    with asynctrace.resume(asynctrace.Carried(None)) as none:
        assert none is None


def test_bad_input() -> None:
    with (
        pytest.raises(TypeError, match=r"Invalid carried: 'req-1'; expected what asynctrace"),
        asynctrace.resume("req-1"),  # type: ignore[arg-type]
    ):
        pass
