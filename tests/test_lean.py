"""The lean path: with only metrics observing tasks, the factory keeps nothing per task.

What makes instrumentation cheap on a large fan-out is not allocating objects the garbage
collector must traverse. These tests count objects (deterministic), never time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import gc
import logging
import statistics
import sys
import weakref
from collections.abc import Awaitable, Callable

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _native
from asynctrace.sinks.tracing import _FREE_THREADED as FREE_THREADED
from asynctrace.sinks.tracing import _TaskSpan
from asynctrace.testing import TaskCapture, record_of

N = 2000


async def ok() -> None:
    await asyncio.sleep(0)


async def fail() -> None:
    await asyncio.sleep(0)
    raise ValueError("x")


BATCHED = _native.IMPLEMENTATION == "c" and not FREE_THREADED
"""Whether the tap's batched check runs here (the C extension, with a GIL; see ``_tap``)."""

HAMT_TYPES = frozenset({"hamt", "hamt_bitmap_node", "hamt_array_node", "hamt_collision_node"})


def added_objects_per_pending_task(
    setup: Callable[[], Awaitable[None]], baseline: Callable[[], Awaitable[None]]
) -> dict[str, float]:
    """Objects the collector tracks per pending task with ``setup`` over ``baseline``, by type.

    The nodes of context-variable mappings (``hamt*``) are summed under ``"hamt"``: how many
    one ``ContextVar.set`` adds depends on the variables' hashes, which CPython derives from
    their addresses. Two variables whose hashes share the first five bits take one more node
    (about 2 in 32 processes: the 8 seen for 7 in 4 of 91 runs on 3.14t was this).

    The two sides are counted in turn, three rounds, and the median per type is taken, so a
    transient allocation in another thread during one count cannot move the result.
    """
    rounds = []
    for _ in range(3):
        with_setup, without = _tracked_once(setup), _tracked_once(baseline)
        rounds.append({k: with_setup.get(k, 0) - without.get(k, 0) for k in with_setup | without})
    types = set().union(*rounds)
    medians = {k: statistics.median(r.get(k, 0) for r in rounds) for k in types}
    return {k: v for k, v in medians.items() if abs(v) >= 0.05}


def _tracked_once(setup: Callable[[], Awaitable[None]]) -> dict[str, float]:
    def by_type() -> collections.Counter[str]:
        return collections.Counter(
            "hamt" if (name := type(o).__name__) in HAMT_TYPES else name for o in gc.get_objects()
        )

    async def main() -> dict[str, float]:
        await setup()
        await asyncio.sleep(0)
        gc.collect()
        before = by_type()
        outer = asyncio.gather(*(ok() for _ in range(N)))
        await asyncio.sleep(0)  # after the tasks' first steps (and the batched check)
        gc.collect()
        after = by_type()
        await outer
        after.subtract(before)
        return {k: n / N for k, n in after.items() if n}

    gc.disable()
    try:
        # In an empty context: how many nodes a context variable set copies depends on how
        # many variables the creator's context holds, which earlier tests may have added to.
        return contextvars.Context().run(asyncio.run, main())
    finally:
        gc.enable()
        asynctrace.testing.reset()


def memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK provider on the fast path, exporting to memory as each span ends."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_metrics_only_allocates_nothing_per_task() -> None:
    """Metrics only: per task, nothing, or only the done callback's slot (a list, a tuple)."""

    async def bare() -> None:
        pass

    async def installed() -> None:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)

    added = added_objects_per_pending_task(installed, bare)
    # Batched: gather's callback reports each task's end, asynctrace adds none. Else asyncio
    # stores a second done callback (gather's) in a list of (callback, context) tuples; a
    # record, a metadata object or a context variable set would add more.
    assert added == ({} if BATCHED else pytest.approx({"list": 1, "tuple": 1}, abs=0.05))


def test_records_exist_when_a_task_hook_is_installed() -> None:
    """Any instrument with task hooks switches the factory back to records."""

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        task = asyncio.create_task(asyncio.sleep(1))
        assert record_of(task) is None  # lean: nothing kept per task
        task.cancel()
        asynctrace.testing.reset()
        asynctrace.install(
            registry=CollectorRegistry(), loop_monitor=False, instruments=[TaskCapture()]
        )
        task = asyncio.create_task(asyncio.sleep(1))
        assert isinstance(record_of(task), asynctrace.TaskRecord)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_pending_task_dropped_is_still_collected_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lean table holds ids, not tasks: a task dropped while pending is still collected."""

    async def main() -> weakref.ref[asyncio.Task[None]]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def stuck(future: asyncio.Future[None]) -> None:
            await future

        task = asyncio.create_task(stuck(never))
        await asyncio.sleep(0)
        ref = weakref.ref(task)
        del task, never
        gc.collect()
        return ref

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        ref = asyncio.run(main())
    assert ref() is None
    assert "Task was destroyed but it is pending!" in caplog.text


def test_task_metadata_after_the_task_is_done() -> None:
    """Metadata is read from the task's context, so it outlives the task's run (3.11 too)."""

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        task = asynctrace.create_task(ok(), operation_name="op", priority_hint=3)
        await task
        meta = asynctrace.task_metadata(task)
        assert meta is not None
        assert (meta.operation_name, meta.priority_hint) == ("op", 3)
        assert meta.correlation_id == asynctrace.correlation_id()
        # a task asynctrace never saw has none
        plain = asyncio.get_running_loop().create_future()
        assert asynctrace.task_metadata(plain) is None

    asyncio.run(main())


def test_install_inside_a_task_adopts_it() -> None:
    """install() in a running task gives it an id and metadata; its children inherit the id."""

    async def main() -> None:
        assert asynctrace.correlation_id() is None
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        mine = asynctrace.correlation_id()
        assert mine is not None
        meta = asynctrace.task_metadata()
        assert meta is not None
        assert meta.correlation_id == mine
        assert meta.operation_name is None
        children = [asyncio.create_task(ok()) for _ in range(3)]
        await asyncio.gather(*children)
        assert {asynctrace.task_metadata(t).correlation_id for t in children} == {mine}  # type: ignore[union-attr]

    asyncio.run(main())


def test_install_inside_a_correlation_keeps_its_id() -> None:
    """Adoption keeps an id the task already has."""

    async def main() -> None:
        with asynctrace.correlation("req-1"):
            asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
            meta = asynctrace.task_metadata()
            assert meta is not None
            assert meta.correlation_id == "req-1"

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks exist from Python 3.12")
def test_eager_task_done_in_its_first_step_is_counted() -> None:
    """An eager task that finishes before the factory returns is counted on the lean path."""
    registry = CollectorRegistry()

    async def instant() -> int:
        return 1

    async def main() -> None:
        asynctrace.install(registry=registry, loop_monitor=False)
        task = asynctrace.create_task(instant(), operation_name="now", eager_start=True)
        assert task.done()
        with pytest.raises(ValueError, match="x"):
            await asynctrace.create_task(fail(), operation_name="later", eager_start=True)

    asyncio.run(main())
    assert (
        registry.get_sample_value(
            "asynctrace_task_duration_seconds_count", {"operation": "now", "outcome": "finished"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "asynctrace_task_duration_seconds_count", {"operation": "later", "outcome": "exception"}
        )
        == 1
    )


def test_tasks_outliving_an_installation_are_not_counted_by_the_next() -> None:
    """Tasks started under an installation that is gone are not counted by the next one."""
    first, second = CollectorRegistry(), CollectorRegistry()

    async def main() -> None:
        release = asyncio.Event()

        async def wait() -> None:
            await release.wait()

        asynctrace.install(registry=first, loop_monitor=False)
        tasks = [asynctrace.create_task(wait(), operation_name="w") for _ in range(3)]
        await asyncio.sleep(0)
        asynctrace.uninstall()
        asynctrace.install(registry=second, loop_monitor=False)
        release.set()
        await asyncio.gather(*tasks)
        await asynctrace.create_task(asyncio.sleep(0), operation_name="w")

    asyncio.run(main())
    assert second.get_sample_value("asynctrace_tasks_created_total", {"operation": "w"}) == 1
    # 1, not 4: finished counts must not outrun created ones (the in-flight gauge would be <0)
    assert (
        second.get_sample_value(
            "asynctrace_task_duration_seconds_count", {"operation": "w", "outcome": "finished"}
        )
        == 1
    )


def test_traced_task_keeps_one_span_handle() -> None:
    """Fast-path tracing: per pending task, one span handle and no record; no Context.

    The factory keeps the handle (the span sink's ``task_begin``) in its table in place of
    the creation time, as it keeps the time for metrics alone: no record per task. The
    handle builds its ``SpanContext`` only when asked, so a leaf that never looks at its span
    holds none while it waits. The OpenTelemetry ``Context`` holding the span is made only
    when code asks for the current span (asynctrace_context), so a leaf that never does
    holds none either.
    """
    provider, _ = memory_provider()

    async def bare() -> None:
        pass

    async def traced() -> None:
        asynctrace.install(
            registry=CollectorRegistry(), loop_monitor=False, tracer_provider=provider
        )

    added = added_objects_per_pending_task(traced, bare)
    # the span handle, the callback list and tuple; and the context variables set: a HAMT
    # and its nodes (see added_objects_per_pending_task)
    hamt = added.pop("hamt")
    assert hamt == pytest.approx(2, abs=0.05) or hamt == pytest.approx(3, abs=0.05), hamt
    expected = {"_TaskSpan": 1, "list": 1, "tuple": 1}
    if _native.IMPLEMENTATION == "c":
        del expected["_TaskSpan"]  # no GC header (untracked_copy): not the collector's
    if BATCHED:
        del expected["list"], expected["tuple"]  # no callback of asynctrace's (see above)
    assert added == pytest.approx(expected, abs=0.05)


def test_a_span_handle_is_a_non_recording_span_with_no_dict() -> None:
    """To OpenTelemetry the handle is a NonRecordingSpan; it carries no ``__dict__``.

    (``Span`` gives its subclasses one: 8 bytes a handle on 3.11, about 140 on 3.13+.)
    """
    handle = _TaskSpan(7, 9, trace.TraceFlags(1), None, None, None, "cid", ())
    assert not hasattr(handle, "__dict__")
    assert weakref.ref(handle)() is handle  # as any span can be
    assert isinstance(handle, trace.NonRecordingSpan)
    assert isinstance(handle, trace.Span)
    assert not handle.is_recording()
    handle.set_attribute("key", 1)
    handle.set_attributes({"key": 2})
    handle.add_event("event")
    handle.update_name("name")
    handle.set_status(trace.Status(trace.StatusCode.ERROR))
    handle.record_exception(ValueError("x"))
    with trace.use_span(handle) as used:
        assert used is handle
        assert trace.get_current_span() is handle
    with handle as entered:
        assert entered is handle
    context = handle.get_span_context()
    assert (context.trace_id, context.span_id, context.trace_flags.sampled) == (7, 9, True)


def test_a_common_span_handle_keeps_its_uncommon_state_nowhere() -> None:
    """Sampled, its parent's trace state, no sampler attributes, links or late events: the
    handle's one slot for all of these stays None; anything else is kept in an object of its
    own (unsampled handles share one, which a late event does not change).
    """
    sampled, unsampled = trace.TraceFlags(1), trace.TraceFlags(0)
    state = trace.TraceState([("vendor", "x")])
    remote = trace.SpanContext(1, 2, is_remote=True, trace_flags=sampled, trace_state=state)
    root = _TaskSpan(7, 9, sampled, None, None, None, "cid", ())
    child = _TaskSpan(7, 10, sampled, state, remote, None, "cid", ())
    assert root._rare is None
    assert child._rare is None
    assert (root.trace_flags, root.trace_state, root.sampler_attributes, root.links, root.late) == (
        sampled,
        None,
        None,
        (),
        None,
    )
    assert child.trace_state is state  # its parent's
    assert child.get_span_context().trace_state is state
    link = trace.Link(remote)
    own = trace.TraceState([("mine", "y")])
    odd = _TaskSpan(7, 11, sampled, own, remote, {"a": 1}, "cid", (link,))
    assert (odd.trace_state, odd.sampler_attributes, odd.links) == (own, {"a": 1}, (link,))
    cleared = _TaskSpan(7, 12, sampled, None, remote, None, "cid", ())  # the sampler's: none
    assert cleared.trace_state is not None
    assert not cleared.trace_state
    assert not cleared.get_span_context().trace_state
    first = _TaskSpan(7, 13, unsampled, None, None, None, "cid", ())
    second = _TaskSpan(7, 14, unsampled, None, None, None, "cid", ())
    assert first._rare is second._rare
    assert not first.trace_flags.sampled
    event = Event("asynctrace.stuck", {}, 1)
    first.add_late(event)
    root.add_late(event)
    assert (first.late, second.late, root.late) == ([event], None, [event])
    assert not first.trace_flags.sampled
    assert root.trace_flags == sampled
    assert root.trace_state is None


def test_a_traced_task_that_asked_for_its_span_leaves_no_cycle() -> None:
    """The handle caches the context holding its span (a cycle); its end drops the cache.

    So the handle is freed with its task, by reference counting: else every task that asked
    for its span (or whose span a processor attached) would wait for the cycle collector.
    """
    from asynctrace._introspect import lean_entry  # noqa: PLC0415

    provider, _ = memory_provider()

    async def asks() -> None:
        assert trace.get_current_span().get_span_context().is_valid
        await asyncio.sleep(0)

    async def main() -> list[weakref.ref[object]]:
        asynctrace.install(registry=CollectorRegistry(), tracer_provider=provider)
        tasks = [asynctrace.create_task(asks()) for _ in range(100)]
        handles = [weakref.ref(lean_entry(t)) for t in tasks]  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
        del tasks
        return handles

    gc.disable()
    try:
        handles = asyncio.run(main())
        alive = sum(h() is not None for h in handles)
    finally:
        gc.enable()
    assert alive == 0


def test_span_handle_context_is_the_exported_one() -> None:
    """The lazily built SpanContext is built once and is the exported span's own."""
    provider, exporter = memory_provider()
    seen: list[trace.SpanContext] = []

    async def look() -> None:
        span = trace.get_current_span()
        seen.extend((span.get_span_context(), span.get_span_context()))
        await asyncio.sleep(0)

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), tracer_provider=provider)
        await asynctrace.create_task(look(), operation_name="look")

    asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "look"]
    assert seen[0] is seen[1]
    assert seen[0] == span.context
    assert not seen[0].is_remote
    assert seen[0].trace_flags.sampled
