"""SpanHooks: the span sink's begin and end for the common task, in C and in its Python twin.

The sink's own ``task_begin``/``task_end`` are the specification. The same program runs three
times from the same random seed: with the sink's own methods, with the Python twin and with
the C version; every span handed to the lane and to the processors must be the same (ids,
parents, names, attributes, links), and only the uncommon tasks may reach the sink's methods.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import random
import re
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _native
from asynctrace._state import STATE
from asynctrace.sinks.tracing import _FREE_THREADED as FREE_THREADED
from asynctrace.sinks.tracing import SpanSink, _TaskSpan
from tests.test_native import IMPLEMENTATIONS

# The C hooks write the ids into the C SpanIds fields of the sink's handle class; a process
# running pure Python builds that class on the twin's SpanIds, so only the twin runs there.
HOOKS = [
    pytest.param(
        impl,
        id=impl.IMPLEMENTATION,
        marks=pytest.mark.skipif(
            impl.IMPLEMENTATION == "c" and _native.IMPLEMENTATION != "c",
            reason="the sink's handle class is built on the twin's SpanIds",
        ),
    )
    for impl in IMPLEMENTATIONS
]

pytestmark = pytest.mark.skipif(
    FREE_THREADED, reason="free-threaded builds keep the sink's own methods (counts with a lock)"
)


class Lane(SpanProcessor):
    """A processor that takes task spans as tuples, as asynctrace's OTLP lane does."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Any, ...]] = []
        self.spans: list[ReadableSpan] = []

    def add_task(self, span: tuple[Any, ...]) -> None:
        self.tasks.append(span)

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


async def leaf(value: int) -> int:
    await asyncio.sleep(0)
    return value


async def boom() -> None:
    raise ValueError("boom")


async def sleeper() -> None:
    await asyncio.sleep(10)


async def parent() -> None:
    await asyncio.create_task(leaf(1))  # a child of a traced task: its trace
    await asyncio.create_task(leaf(2), name="named")  # a name the user gave
    await asynctrace.create_task(leaf(6), operation_name="other-id", correlation_id="other")
    assert trace.get_current_span().get_span_context().is_valid  # now current in its context
    await asynctrace.create_task(leaf(7), operation_name="after-asking")  # still its child


async def program(tracer: trace.Tracer) -> None:
    await asyncio.create_task(parent())
    await asynctrace.create_task(leaf(3), operation_name="op")
    with asynctrace.correlation("req-1"):  # a correlation block's span is current
        await asynctrace.create_task(leaf(4), operation_name="in-block")
    with tracer.start_as_current_span("app"):  # the app's span is current
        await asynctrace.create_task(leaf(5), operation_name="under-app")
    with pytest.raises(ValueError, match="boom"):
        await asyncio.create_task(boom())
    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def run(
    monkeypatch: pytest.MonkeyPatch, hooks: Callable[[SpanSink], Any]
) -> tuple[Lane, list[str | None], list[str]]:
    """Run the program with ``hooks`` as the sink's lean_hooks; what the lane got, and who
    reached the sink's own methods (begin: operation names; end: coroutine names).
    """
    begun: list[str | None] = []
    ended: list[str] = []
    task_begin, task_end = SpanSink.task_begin, SpanSink.task_end

    def counted_begin(self: SpanSink, metadata: Any, created_ns: int) -> object:
        begun.append(metadata.operation_name)
        return task_begin(self, metadata, created_ns)

    def counted_end(self: SpanSink, task: asyncio.Task[Any], *args: Any) -> None:
        ended.append(task.get_coro().__qualname__)  # type: ignore[union-attr]
        task_end(self, task, *args)

    monkeypatch.setattr(SpanSink, "task_begin", counted_begin)
    monkeypatch.setattr(SpanSink, "task_end", counted_end)
    monkeypatch.setattr(SpanSink, "lean_hooks", hooks)
    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)
    tracer = provider.get_tracer("app")
    random.seed(1234)

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await program(tracer)
        asynctrace.uninstall()

    asyncio.run(main())
    monkeypatch.undo()
    return lane, begun, ended


def spec_hooks(sink: SpanSink) -> tuple[Callable[..., Any], Callable[..., Any]]:
    return sink.task_begin, sink.task_end


def seen(lane: Lane) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What the lane got, without the times (start, end: taken at each run) and the numbers
    of default task names (a count per process).
    """
    tasks = [
        (*span[:6], re.sub(r"^Task-\d+$", "Task-N", span[8]), *span[9:]) for span in lane.tasks
    ]
    spans = [
        (
            s.name,
            s.context.trace_id if s.context else None,
            s.context.span_id if s.context else None,
            s.parent.span_id if s.parent else None,
            {
                k: re.sub(r"^Task-\d+$", "Task-N", v) if isinstance(v, str) else v
                for k, v in (s.attributes or {}).items()
            },
            [link.context.span_id for link in s.links],
            s.status.status_code,
        )
        for s in lane.spans
    ]
    return tasks, spans


@pytest.mark.parametrize("impl", HOOKS)
def test_span_hooks_give_what_the_sinks_methods_give(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, spec_begun, spec_ended = run(monkeypatch, spec_hooks)
    lean_hooks = SpanSink.lean_hooks
    lane, begun, ended = run(monkeypatch, lambda sink: lean_hooks(sink, impl))
    assert seen(lane) == seen(spec)
    assert len(spec_begun) == len(spec_ended) == 10  # the program's tasks
    # Only the uncommon tasks reach the sink's own methods: a span of another trace (linked),
    # or under a span that is not asynctrace's (the app's)...
    assert sorted(begun) == ["other-id", "under-app"]
    # ...and the ends with an exception, cancelled, or linked.
    assert sorted(ended) == ["boom", "leaf", "sleeper"]


@pytest.mark.parametrize("impl", HOOKS)
def test_span_hooks_follow_a_processor_added_later(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processor that is not a lane added while tasks run: the sink looks again and tells
    the hooks (sync); later spans are built for both processors, none is a lane's tuple.
    """
    lean_hooks = SpanSink.lean_hooks
    monkeypatch.setattr(SpanSink, "lean_hooks", lambda sink: lean_hooks(sink, impl))
    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)
    exporter = InMemorySpanExporter()

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        await asynctrace.create_task(leaf(1), operation_name="before")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        await asynctrace.create_task(leaf(2), operation_name="after")
        asynctrace.uninstall()

    asyncio.run(main())
    assert [span[5] for span in lane.tasks] == ["before"]
    assert [span.name for span in lane.spans] == ["after"]
    assert [span.name for span in exporter.get_finished_spans()] == ["after"]


@pytest.mark.parametrize("impl", HOOKS)
def test_span_hooks_count_and_report_failing_exemplars(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exemplar hooks get the span's ids; one that raises is counted, never raised."""
    got: list[tuple[Any, ...]] = []

    def exemplar(*args: Any) -> None:
        got.append(args)
        raise RuntimeError("exemplar hook failed")

    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)
    sink = SpanSink(provider)
    try:
        begin, end = sink.lean_hooks(impl)
        assert type(begin.__self__) is impl.SpanHooks
        hooks = STATE.hooks
        monkeypatch.setattr(hooks, "exemplars", (exemplar,))
        before = sum(STATE.errors.snapshot().values())

        async def main() -> None:
            meta = asynctrace.TaskMetadata(correlation_id="c-1")
            task = asyncio.create_task(leaf(1))
            entry = contextvars.copy_context().run(begin, meta, 100)
            # Where the C extension runs, the handle class has no GC header (it is in no
            # cycle), whichever hooks made it; the C hooks untrack a subclass's handles too.
            assert gc.is_tracked(entry) is (_native.IMPLEMENTATION == "python")
            await task
            assert end(task, entry, meta, "finished", 350) is None
            assert got == [(meta, "finished", 250, entry.trace_id, entry.span_id)]
            assert lane.tasks[0][:2] == (entry.trace_id, entry.span_id)

        asyncio.run(main())
        assert sum(STATE.errors.snapshot().values()) == before + 1
    finally:
        sink.close()
    if _native.IMPLEMENTATION == "c" and impl.IMPLEMENTATION == "c":
        assert (begin.__self__.started, begin.__self__.ended) == (1, 1)


def _hooks_of(impl: ModuleType, sink: SpanSink, **given: Any) -> Any:
    arguments: dict[str, Any] = {
        "sink": sink,
        "handle_type": _TaskSpan,
        "task_span": contextvars.ContextVar("task_span"),
        "context_module": None,
        "random_module": random,
        "sampled": None,
        "finished": "finished",
        "internal": frozenset(),
        "unnamed": None,
        "provisional": "asyncio.task",
        "state": STATE,
        "on_error": print,
        "span_key": "current-span",
    }
    return impl.SpanHooks(**{**arguments, **given})


@pytest.mark.parametrize("impl", HOOKS)
def test_span_hooks_refuse_what_is_not_a_context_var(impl: ModuleType) -> None:
    sink = SpanSink(TracerProvider())
    try:
        with pytest.raises(TypeError, match="task_span must be a ContextVar, got 'nope'"):
            _hooks_of(impl, sink, task_span="nope")
    finally:
        sink.close()


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C extension is not built")
def test_c_span_hooks_refuse_a_handle_class_without_native_ids() -> None:
    """The C hooks write the ids into SpanIds's fields: any other class is refused, named."""
    sink = SpanSink(TracerProvider())
    try:
        with pytest.raises(TypeError, match="subclass of SpanIds, got <class 'object'>"):
            _hooks_of(_native, sink, handle_type=object)
    finally:
        sink.close()


def _lane_ids(seed: int | None, patch: Callable[[], None] | None = None) -> list[tuple[int, int]]:
    """(trace id, span id) of three root tasks' spans, random seeded with seed after install
    (no correlation ids: nothing else draws from random), patch called after install.
    """
    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)

    async def main() -> None:
        asynctrace.install(
            tracer_provider=provider, registry=CollectorRegistry(), id_generator=None
        )
        if patch is not None:
            patch()
        if seed is not None:
            random.seed(seed)
        for i in range(3):
            # a new root each time: created outside any task span (the helper's context)
            await asyncio.get_running_loop().create_task(leaf(i), context=contextvars.Context())
        asynctrace.uninstall()

    asyncio.run(main())
    return [(span[0], span[1]) for span in lane.tasks]


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C extension is not built")
def test_c_span_hooks_draw_ids_from_randoms_generator_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C hooks take the words random.getrandbits would from random's own generator: the
    same ids as getrandbits(128) then getrandbits(64) from a generator seeded alike, a seed
    set after install seen; a getrandbits replaced later (or before: not drawn in place) is
    called instead.
    """
    sink = SpanSink(TracerProvider())
    try:
        assert _hooks_of(_native, sink).draws_in_place is random.getrandbits
    finally:
        sink.close()
    expected = random.Random(42)
    assert _lane_ids(42) == [
        (expected.getrandbits(128), expected.getrandbits(64)) for _ in range(3)
    ]

    asked: list[int] = []
    real = random.getrandbits

    def counting(bits: int) -> int:
        asked.append(bits)
        return real(bits)

    ids = _lane_ids(None, lambda: monkeypatch.setattr(random, "getrandbits", counting))
    assert asked == [128, 64] * 3
    assert len(set(ids)) == 3
    monkeypatch.undo()

    # Not a _random.Random's C method at construction: never drawn in place.
    system = random.SystemRandom()
    monkeypatch.setattr(random, "getrandbits", system.getrandbits)
    sink = SpanSink(TracerProvider())
    try:
        assert _hooks_of(_native, sink).draws_in_place is None
    finally:
        sink.close()


async def own_name() -> str:
    task = asyncio.current_task()
    assert task is not None
    return task.get_name()  # the very str the task keeps: found twice among its pointers


class SubTask(asyncio.Task):  # type: ignore[type-arg]
    pass


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C extension is not built")
@pytest.mark.parametrize("case", ["subclass", "ambiguous"])
def test_c_span_hooks_read_a_tasks_fields_only_where_found_once(case: str) -> None:
    """The name and coroutine are read in place only from the C task, where one pointer field
    holds what get_name()/get_coro() return: not for a Task subclass, not when the name is
    also the task's result (found twice, 8 times over); the getters give the names then.
    """
    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)

    async def main() -> tuple[list[asyncio.Task[Any]], dict[str, bool]]:
        if case == "subclass":
            asyncio.get_running_loop().set_task_factory(
                lambda loop, coro, **kw: SubTask(coro, loop=loop, **kw)
            )
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        tasks = [asyncio.create_task(own_name()) for _ in range(12)]
        await asyncio.gather(*tasks)
        (sink,) = [i for i in STATE.hooks.instruments if isinstance(i, SpanSink)]
        reads: dict[str, bool] = sink._synced[-1].reads_task_fields
        asynctrace.uninstall()
        return tasks, reads

    tasks, reads = asyncio.run(main())
    assert not reads["name"]
    assert reads["coro"] == (case == "ambiguous")  # the coroutine is found once there
    assert [span[8] for span in lane.tasks] == [t.get_name() for t in tasks]
    assert {span[5] for span in lane.tasks} == {own_name.__qualname__}


@pytest.mark.parametrize("impl", HOOKS)
def test_a_dropped_pending_task_is_collected_with_its_span_handle(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A handle whose current context was made is in no cycle: it goes with its task.

    The context holding the span is kept in the task's context, not in the handle; so the
    C version's handles stay hidden from the cycle collector even then.
    """
    if impl.IMPLEMENTATION != _native.IMPLEMENTATION:
        pytest.skip("the sink's handle class is built on one implementation's SpanIds")
    lean_hooks = SpanSink.lean_hooks
    monkeypatch.setattr(SpanSink, "lean_hooks", lambda sink: lean_hooks(sink, impl))
    provider = TracerProvider()
    provider.add_span_processor(Lane())

    async def main() -> weakref.ref[Any]:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        spans: list[Any] = []

        async def stuck(future: asyncio.Future[None]) -> None:
            spans.append(trace.get_current_span())  # its current context: refers to it
            await future

        task = asyncio.create_task(stuck(never))
        await asyncio.sleep(0)
        handle = spans.pop()
        assert type(handle).__name__ == "_TaskSpan"
        assert gc.is_tracked(handle) is (impl.IMPLEMENTATION == "python")
        assert handle not in gc.get_referents(handle.inherited)
        ref = weakref.ref(handle)
        del task, never, handle
        gc.collect()  # the task: its destruction lets the factory's table go of the handle
        gc.collect()  # the handle and its current context
        return ref

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        ref = asyncio.run(main())
    assert "Task was destroyed but it is pending!" in caplog.text
    assert ref() is None


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C hooks' reads")
def test_c_span_hooks_read_a_parents_context_without_python_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parent's SpanContext is read as the tuple it is (its layout checked once, when the
    hooks are made), and the context a parent's handle made is taken from the handle: one
    ``get_span_context()`` call for a parent's five children, no property call.
    """
    from opentelemetry.trace.span import SpanContext  # noqa: PLC0415

    calls: list[str] = []
    lane = Lane()
    provider = TracerProvider()
    provider.add_span_processor(lane)

    def counted(name: str) -> property:
        real = getattr(SpanContext, name)
        return property(lambda self: (calls.append(name), real.fget(self))[1])

    async def fan_out() -> None:
        await asyncio.gather(*(asyncio.create_task(leaf(i)) for i in range(5)))

    async def main() -> None:
        asynctrace.install(tracer_provider=provider, registry=CollectorRegistry())
        # after the hooks were made: their check saw the real properties
        for name in ("span_id", "is_remote", "trace_state"):
            monkeypatch.setattr(SpanContext, name, counted(name))
        get = _TaskSpan.get_span_context
        monkeypatch.setattr(
            _TaskSpan, "get_span_context", lambda self: (calls.append("get"), get(self))[1]
        )
        await asyncio.create_task(fan_out())
        monkeypatch.undo()
        asynctrace.uninstall()

    asyncio.run(main())
    [top] = [span for span in lane.tasks if span[5].endswith("fan_out")]
    children = [span for span in lane.tasks if span[5] == "leaf"]
    assert len(children) == 5
    assert {(span[0], span[2], span[3]) for span in children} == {(top[0], top[1], False)}
    assert calls == ["get"]
