"""Task spans: one per task, parented where the task was created, with outcome and ids."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

import asynctrace
from tests.conftest import PY312


class OnStartProcessor(SpanProcessor):
    """A processor that acts in on_start: forces the full (real SDK span) path."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:  # noqa: ARG002
        self.started += 1


@pytest.fixture(params=["fast", "full"])
def traced(request: pytest.FixtureRequest) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider exporting to memory synchronously; `full` adds an on_start processor."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if request.param == "full":
        provider.add_span_processor(OnStartProcessor())
    return provider, exporter


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    out = {s.name: s for s in spans}
    assert len(out) == len(spans), [s.name for s in spans]
    return out


async def leaf(n: int) -> int:
    await asyncio.sleep(0)
    return n


async def branch(n: int) -> int:
    return await asynctrace.create_task(leaf(n), operation_name=f"leaf-{n}")


def test_gather_fan_out_forms_one_tree(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """Request span -> gather'd tasks -> their children: one trace, right parents and names."""
    provider, exporter = traced
    tracer = provider.get_tracer("app")

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        with tracer.start_as_current_span("request") as request, asynctrace.correlation("req-1"):
            tasks = [
                asynctrace.create_task(branch(i), operation_name=f"branch-{i}", priority_hint=i)
                for i in range(3)
            ]
            assert await asyncio.gather(*tasks) == [0, 1, 2]
        rid = request.get_span_context()
        spans = by_name(exporter.get_finished_spans())
        # the app's span decides the trace: asynctrace never cuts a trace it did not make
        assert {s.context.trace_id for s in spans.values()} == {rid.trace_id}
        block = spans["correlation"]  # the correlation block's span, under the app's span
        assert block.parent is not None
        assert block.parent.span_id == rid.span_id
        assert block.links == ()
        for i in range(3):
            b, lf = spans[f"branch-{i}"], spans[f"leaf-{i}"]
            assert b.parent is not None
            assert b.parent.span_id == block.context.span_id
            assert lf.parent is not None
            assert lf.parent.span_id == b.context.span_id
            assert b.attributes is not None
            assert b.attributes["asynctrace.operation"] == f"branch-{i}"
            assert b.attributes["asynctrace.correlation_id"] == "req-1"
            assert b.attributes["asynctrace.priority_hint"] == i
            assert b.attributes["asyncio.task.outcome"] == "finished"
            assert b.status.status_code is StatusCode.UNSET
            assert b.start_time is not None
            assert lf.start_time is not None
            assert b.end_time is not None
            assert lf.end_time is not None
            assert b.start_time <= lf.start_time <= lf.end_time <= b.end_time
            assert b.instrumentation_scope is not None
            assert b.instrumentation_scope.name == "asynctrace"

    asyncio.run(main())


def test_span_names_fall_back(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """Name: operation_name, else the user's task name, else the coroutine's qualname."""
    provider, exporter = traced

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asynctrace.create_task(leaf(1), operation_name="op", name="ignored-name")
        await asyncio.create_task(leaf(2), name="my-name")
        await asyncio.create_task(leaf(3))

    asyncio.run(main())
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"op", "my-name", "leaf"} <= names


def test_taskgroup_and_outcomes(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """TaskGroup children nest under the creating task; errors are ERROR, cancels are not."""
    provider, exporter = traced

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad input")

    async def hang() -> None:
        await asyncio.sleep(10)

    async def parent() -> None:
        async with asyncio.TaskGroup() as tg:
            asynctrace.create_task(fail(), task_group=tg, operation_name="fail")
            asynctrace.create_task(hang(), task_group=tg, operation_name="hang")

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        with pytest.raises(ExceptionGroup):
            await asynctrace.create_task(parent(), operation_name="parent")

    asyncio.run(main())
    spans = by_name(exporter.get_finished_spans())
    p, f, h = spans["parent"], spans["fail"], spans["hang"]
    assert f.parent is not None
    assert h.parent is not None
    assert f.parent.span_id == h.parent.span_id == p.context.span_id
    assert f.status.status_code is StatusCode.ERROR
    assert f.status.description == "ValueError"  # the message is in the exception event only
    assert [e.name for e in f.events] == ["exception"]
    assert f.events[0].attributes is not None
    assert f.events[0].attributes["exception.type"] == "ValueError"
    assert f.events[0].attributes["exception.message"] == "bad input"
    assert h.attributes is not None
    assert h.attributes["asyncio.task.outcome"] == "cancelled"
    assert h.status.status_code is StatusCode.UNSET
    assert p.status.status_code is StatusCode.ERROR  # the ExceptionGroup


def test_task_span_is_current_inside(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """Spans other code opens inside a task (HTTP client, DB driver) nest under the task span."""
    provider, exporter = traced
    tracer = provider.get_tracer("db-driver")

    async def query() -> None:
        with tracer.start_as_current_span("SELECT"):
            await asyncio.sleep(0)

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asynctrace.create_task(query(), operation_name="store")

    asyncio.run(main())
    spans = by_name(exporter.get_finished_spans())
    select = spans["SELECT"]
    assert select.parent is not None
    assert select.parent.span_id == spans["store"].context.span_id


@pytest.mark.skipif(not PY312, reason="eager tasks exist from Python 3.12")
def test_eager_first_step_sees_its_span(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """An eager task's first step already runs inside its own span."""
    provider, exporter = traced
    seen: list[int] = []

    async def first() -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        task = asynctrace.create_task(first(), operation_name="eager")
        assert task.done()
        asynctrace.uninstall()
        asyncio.get_running_loop().set_task_factory(None)

    asyncio.run(main())
    assert seen == [by_name(exporter.get_finished_spans())["eager"].context.span_id]


def test_sampler_is_followed() -> None:
    """Spans follow the provider's sampler: a dropped root drops its task subtree."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asyncio.gather(branch(1), branch(2))

    asyncio.run(main())
    assert exporter.get_finished_spans() == ()


def test_ratio_sampler_keeps_whole_trees() -> None:
    """With a ratio sampler, a sampled task's children are sampled too (parent-based)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def root(i: int) -> int:
        return await branch(i)

    async def main() -> None:
        asynctrace.install(
            tracer_provider=provider, registry=CollectorRegistry(), id_generator=None
        )
        for i in range(40):
            await asyncio.get_running_loop().create_task(
                root(i), context=__import__("contextvars").Context()
            )

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    assert not [s.name for s in spans if s.name.startswith("BaseEventLoop.")]  # asyncio's own
    traces: dict[int, int] = {}
    for s in spans:
        traces[s.context.trace_id] = traces.get(s.context.trace_id, 0) + 1
    assert 0 < len(traces) < 40
    assert set(traces.values()) == {2}  # root task + its leaf, always together


def test_task_filter_operation_only(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """task_filter='operation' spans only named tasks; their children skip unnamed parents."""
    provider, exporter = traced

    async def unnamed() -> int:
        return await asynctrace.create_task(leaf(1), operation_name="named-child")

    async def main() -> None:
        asynctrace.install(
            tracer_provider=provider, registry=CollectorRegistry(), task_filter="operation"
        )
        await asynctrace.create_task(wrapper(), operation_name="top")

    async def wrapper() -> int:
        return await asyncio.create_task(unnamed())

    asyncio.run(main())
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"top", "named-child"}
    child = spans["named-child"]
    assert child.parent is not None
    assert child.parent.span_id == spans["top"].context.span_id


def test_full_path_is_used_when_a_processor_needs_on_start() -> None:
    """A processor acting in on_start gets real spans (and sees every task start)."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    watcher = OnStartProcessor()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(watcher)

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asyncio.gather(leaf(1), leaf(2))

    asyncio.run(main())
    exported = [s.name for s in exporter.get_finished_spans()]
    assert exported.count("leaf") == 2
    # every exported task span was started as a real span; asyncio's own shutdown tasks
    # were started too but are never ended, so never exported
    assert watcher.started >= len(exported)


def test_processor_that_raises_never_reaches_the_app() -> None:
    """A span processor raising in on_end: results unchanged, each failure costs one call.

    The sink is not disabled: every later task still reaches the processors (the healthy one
    before the broken one exports all of them), and every failure is counted.
    """

    class Broken(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:  # noqa: ARG002
            raise RuntimeError("exporter bug")

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(Broken())

    async def main() -> list[int]:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        return await asyncio.gather(*(leaf(i) for i in range(20)))

    assert asyncio.run(main()) == list(range(20))
    exported = [s for s in exporter.get_finished_spans() if s.name == "leaf"]
    assert len(exported) == 20
    assert asynctrace.telemetry_errors() == {"instrument SpanSink": 20}


def test_task_span_ids_are_drawn_as_the_sdk_draws_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path draws the default generator's ids itself: the same random stream, the
    same retry on an all-zero id as ``RandomIdGenerator``; another generator is still asked.
    """
    drawn: list[int] = []
    real = random.getrandbits

    def getrandbits(k: int) -> int:
        value = 0 if len(drawn) < 2 else real(k)  # the first trace id and span id: all zero
        drawn.append(value)
        return value

    def trace_of(provider: TracerProvider) -> ReadableSpan:
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        async def main() -> None:
            asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
            await asyncio.create_task(leaf(1))

        asyncio.run(main())
        asynctrace.uninstall()
        (span,) = exporter.get_finished_spans()
        return span

    # From random.getrandbits, as the SDK draws them; a zero id is drawn again, never used.
    monkeypatch.setattr(random, "getrandbits", getrandbits)
    span = trace_of(TracerProvider())
    assert span.context is not None
    assert drawn[:2] == [0, 0]
    assert span.context.trace_id == drawn[2] != 0
    assert span.context.span_id == drawn[3] != 0
    monkeypatch.undo()

    # Any other id generator is asked for each id.
    class Counting(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            return 0xABC

        def generate_span_id(self) -> int:
            return 0xDEF

    span = trace_of(TracerProvider(id_generator=Counting()))
    assert span.context is not None
    assert (span.context.trace_id, span.context.span_id) == (0xABC, 0xDEF)
