"""One trace per correlation id: requests get their own traces, linked to where they began.

A server's long-lived task (its accept loop) spawns a task per request; each request enters
its own correlation block. Each request's tasks form a trace of their own, whose first span
links back to the span current at the boundary; the server's trace holds none of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from prometheus_client import CollectorRegistry

import asynctrace


class OnStart(SpanProcessor):
    """Acts in on_start: forces the full path (real SDK spans)."""

    def on_start(self, span: object, parent_context: object = None) -> None:  # type: ignore[override]  # noqa: ARG002
        self.started = True


@pytest.fixture(params=["fast", "full"])
def provider(request: pytest.FixtureRequest) -> tuple[TracerProvider, InMemorySpanExporter]:
    p = TracerProvider()
    exporter = InMemorySpanExporter()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    if request.param == "full":
        p.add_span_processor(OnStart())
    return p, exporter


def correlation_of(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("asynctrace.correlation_id")


def traces_by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, list[ReadableSpan]]:
    out: dict[int, list[ReadableSpan]] = defaultdict(list)
    for s in spans:
        assert s.context is not None
        out[s.context.trace_id].append(s)
    return out


async def work(n: int) -> int:
    await asyncio.sleep(0)
    return n


async def handle(request_id: str) -> int:
    with asynctrace.correlation(request_id, span_name="handle"):
        parts = await asyncio.gather(
            asynctrace.create_task(work(1), operation_name="parse"),
            asynctrace.create_task(work(2), operation_name="store"),
        )
        return sum(parts)


def test_each_request_is_a_trace_linked_to_the_server(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """N requests through one long-lived server task: N traces, each linked to its spawner."""
    p, exporter = provider

    async def server() -> list[int]:
        # the accept loop: one task per request, created in the server's own context
        handlers = [
            asynctrace.create_task(handle(f"req-{n}"), operation_name="connection")
            for n in range(5)
        ]
        return await asyncio.gather(*handlers)

    async def main() -> list[int]:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        return await asynctrace.create_task(server(), operation_name="serve")

    assert asyncio.run(main()) == [3] * 5
    spans = exporter.get_finished_spans()
    traces = traces_by_id(spans)
    by_span = {s.context.span_id: s for s in spans if s.context is not None}
    request_traces = [t for t in traces.values() if any(s.name == "handle" for s in t)]
    assert len(request_traces) == 5
    for t in request_traces:
        assert {s.name for s in t} == {"handle", "parse", "store"}
        assert len({correlation_of(s) for s in t}) == 1  # one id per trace
        (root,) = [s for s in t if s.parent is None]
        assert root.name == "handle"
        (link,) = root.links
        assert by_span[link.context.span_id].name == "connection"  # linked to its spawner
    (serve,) = [s for s in spans if s.name == "serve"]
    assert serve.context is not None
    server_trace = traces[serve.context.trace_id]
    assert {s.name for s in server_trace} == {"serve", "connection"}  # no request's spans
    assert len({correlation_of(s) for s in server_trace}) == 1


def test_create_task_with_a_new_id_starts_a_linked_trace(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """create_task(..., correlation_id=other): the task roots a new trace, linked to its creator."""
    p, exporter = provider

    async def spawner() -> None:
        await asynctrace.create_task(work(0), operation_name="background", correlation_id="bg-1")
        await asynctrace.create_task(work(0), operation_name="same")  # inherits: same trace

    async def main() -> None:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        await asynctrace.create_task(spawner(), operation_name="spawner", correlation_id="r-1")

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    bg, same, spawner_span = spans["background"], spans["same"], spans["spawner"]
    assert bg.parent is None
    assert [ln.context.span_id for ln in bg.links] == [spawner_span.context.span_id]
    assert bg.context.trace_id != spawner_span.context.trace_id
    assert same.parent is not None
    assert same.parent.span_id == spawner_span.context.span_id
    assert same.links == ()


def test_a_span_made_current_inside_the_scope_parents_its_tasks(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The app's (or another instrumentation's) span inside the block is the tasks' parent."""
    p, exporter = provider
    tracer = p.get_tracer("app")

    async def request() -> None:
        with asynctrace.correlation("req-9"), tracer.start_as_current_span("db query"):
            await asynctrace.create_task(work(0), operation_name="fetch")

    async def main() -> None:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        await asynctrace.create_task(request(), operation_name="request")

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    fetch, query, block = spans["fetch"], spans["db query"], spans["correlation"]
    assert fetch.parent is not None
    assert fetch.parent.span_id == query.context.span_id
    assert query.parent is not None
    assert query.parent.span_id == block.context.span_id
    assert fetch.context.trace_id == block.context.trace_id
    assert block.parent is None  # the block cut the request task's trace
    assert block.links


def test_one_rule_for_the_correlation_id_inside_a_block(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Inside correlation("b") in a task created with "a": ids, metadata, logs, spans agree on b.

    The task itself keeps the id it was created with, seen from outside.
    """
    p, exporter = provider
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("test.one-rule")
    handler = Keep()
    handler.addFilter(asynctrace.TaskContextFilter())
    log.addHandler(handler)
    seen: dict[str, object] = {}

    async def task_a() -> None:
        with asynctrace.correlation("b"):
            seen["id"] = asynctrace.correlation_id()
            meta = asynctrace.task_metadata()
            assert meta is not None
            seen["metadata"] = meta.correlation_id
            seen["operation"] = meta.operation_name
            log.warning("inside b")
            seen["child"] = await asynctrace.create_task(child(), operation_name="child")
            current = asyncio.current_task()
            assert current is not None
            own = asynctrace.task_metadata(current)
            assert own is not None
            seen["own"] = own.correlation_id

    async def child() -> str | None:
        return asynctrace.correlation_id()

    async def main() -> None:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        await asynctrace.create_task(task_a(), operation_name="a-task", correlation_id="a")

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(handler)
    assert seen == {
        "id": "b",
        "metadata": "b",
        "operation": "a-task",
        "child": "b",
        "own": "a",  # the task's own metadata: the id it was created with
    }
    spans = {s.name: s for s in exporter.get_finished_spans()}
    block, child_span, a_span = spans["correlation"], spans["child"], spans["a-task"]
    assert correlation_of(block) == correlation_of(child_span) == "b"
    assert correlation_of(a_span) == "a"
    (record,) = records
    assert record.correlation_id == "b"  # type: ignore[attr-defined]
    assert record.trace_id == f"{block.context.trace_id:032x}"  # type: ignore[attr-defined]
    assert record.span_id == f"{block.context.span_id:016x}"  # type: ignore[attr-defined]
    assert child_span.context.trace_id == block.context.trace_id != a_span.context.trace_id


def test_exemplars_point_to_the_tasks_own_trace() -> None:
    """A request's duration exemplar carries the request's trace, not the server's."""
    p = TracerProvider()
    exporter = InMemorySpanExporter()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()

    async def main() -> None:
        asynctrace.install(tracer_provider=p, registry=registry, loop_monitor=False)
        await asynctrace.create_task(handle("req-x"), operation_name="connection")

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    from prometheus_client.openmetrics.exposition import generate_latest  # noqa: PLC0415

    text = generate_latest(registry).decode()
    parse_line = next(
        line for line in text.splitlines() if 'operation="parse"' in line and "trace_id" in line
    )
    assert f'trace_id="{spans["parse"].context.trace_id:032x}"' in parse_line
    assert spans["parse"].context.trace_id == spans["handle"].context.trace_id


def test_a_block_that_raises_marks_its_span_and_restores_the_context() -> None:
    """The block's span ends with the error; the span current before is current again."""
    p = TracerProvider()
    exporter = InMemorySpanExporter()
    p.add_span_processor(SimpleSpanProcessor(exporter))

    async def task() -> tuple[object, object]:
        before = trace.get_current_span()
        with pytest.raises(KeyError), asynctrace.correlation("req-e"):
            raise KeyError("k")
        return before, trace.get_current_span()

    async def main() -> tuple[object, object]:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        return await asynctrace.create_task(task(), operation_name="t")

    before, after = asyncio.run(main())
    assert before is after
    (block,) = [s for s in exporter.get_finished_spans() if s.name == "correlation"]
    assert block.status.status_code is trace.StatusCode.ERROR
    assert [e.name for e in block.events] == ["exception"]


def test_a_sampler_decides_the_new_trace_with_its_link() -> None:
    """A non-default sampler is asked for the new trace's root, and sees the link."""
    p = TracerProvider(sampler=TraceIdRatioBased(1.0))
    exporter = InMemorySpanExporter()
    p.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> None:
        asynctrace.install(tracer_provider=p, registry=CollectorRegistry(), loop_monitor=False)
        await asynctrace.create_task(handle("req-s"), operation_name="connection")

    asyncio.run(main())
    (block,) = [s for s in exporter.get_finished_spans() if s.name == "handle"]
    assert block.parent is None
    assert len(block.links) == 1
