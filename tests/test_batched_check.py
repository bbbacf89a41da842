"""The batched check: a task awaited by a callback asyncio never removes gets none of ours.

The loop's tap holds the tasks the factory makes while a check is pending and schedules the
first one's first step through the check, which runs after the step that made them and
before any of their first steps; it gives asynctrace's done callback to each task that has
no callback known to be kept (an awaiting task's wakeup, ``gather``'s, a ``TaskGroup``'s),
and the tap takes the other tasks' ends when their first callback is scheduled. Every test
here checks what counts: each task's end recorded once, exactly when it ends, and asyncio's
results, exceptions, cancellations and order unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _native, _speedups_py, _tap
from asynctrace._factory import LeanDone
from asynctrace.sinks.tracing import _FREE_THREADED as FREE_THREADED

IMPLEMENTATIONS: list[types.ModuleType] = [_speedups_py]
with contextlib.suppress(ImportError):
    from asynctrace import _speedups

    IMPLEMENTATIONS.append(_speedups)

BATCHED = _native.IMPLEMENTATION == "c" and not FREE_THREADED
needs_batch = pytest.mark.skipif(
    not BATCHED, reason="the batched check runs with the C extension, with a GIL"
)


def ours(task: asyncio.Future[Any]) -> int:
    """How many of asynctrace's lean done callbacks ``task`` has."""
    return sum(type(cb).__name__ == "LeanDone" for cb, _ in task._callbacks or ())  # type: ignore[attr-defined]


async def leaf(i: int, log: list[str] | None = None) -> int:
    if log is not None:
        log.append(f"start {i}")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    if log is not None:
        log.append(f"end {i}")
    if i % 7 == 3:
        raise ValueError(i)
    return i


async def every_way(log: list[str]) -> list[object]:
    """Tasks awaited every way asyncio offers; what each way gave, in order."""
    out: list[object] = []
    gathered = [asyncio.create_task(leaf(i, log)) for i in range(10)]
    out.append(await asyncio.gather(*gathered, return_exceptions=True))
    try:
        async with asyncio.TaskGroup() as group:
            for i in (1, 2, 3):
                group.create_task(leaf(i, log))
    except* ValueError as failed:
        out.append(repr(failed.exceptions))
    for i in range(4):
        try:
            out.append(await asyncio.create_task(leaf(i, log)))
        except ValueError as exc:
            out.append(repr(exc))
    waited = [asyncio.create_task(leaf(i, log)) for i in range(5)]
    done, pending = await asyncio.wait(waited, timeout=0)  # removes its callbacks
    out.append((len(done), len(pending)))
    late = [asyncio.create_task(leaf(i, log)) for i in range(5)]
    await asyncio.sleep(0)  # their first steps ran: gather's callbacks come after the check
    later = asyncio.gather(*late, return_exceptions=True)
    never_started = asyncio.create_task(leaf(0, log))
    never_started.cancel()
    mid = asyncio.create_task(leaf(1, log))
    loose = [asyncio.create_task(leaf(i, log)) for i in range(4)]  # never awaited
    await asyncio.sleep(0)
    mid.cancel()
    timed = [asyncio.create_task(leaf(i, log)) for i in range(3)]
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*timed), timeout=0)
    for f in asyncio.as_completed([asyncio.create_task(leaf(i, log)) for i in range(4)]):
        try:
            out.append(await f)
        except ValueError as exc:
            out.append(repr(exc))
    shielded = [asyncio.create_task(leaf(i, log)) for i in range(3)]
    out.append(await asyncio.gather(*map(asyncio.shield, shielded), return_exceptions=True))
    for task in (never_started, mid):
        try:
            await task
        except asyncio.CancelledError:
            out.append("cancelled")
    out.append(await later)
    out.append([t.cancelled() or repr(t.exception()) for t in [*timed, *waited]])
    await asyncio.gather(*loose, return_exceptions=True)
    return [repr(x) for x in out]  # exceptions compare by identity: by what they say


def counted(registry: CollectorRegistry) -> tuple[float, float]:
    """Tasks created and tasks whose end was recorded, over every operation and outcome."""
    created = finished = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "asynctrace_tasks_created_total":
                created += sample.value
            elif sample.name == "asynctrace_task_duration_seconds_count":
                finished += sample.value
    return created, finished


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop_name: str) -> Any:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    if loop_name == "eager":
        if sys.version_info < (3, 12):
            pytest.skip("eager tasks exist from Python 3.12")

        async def eagerly() -> Any:
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
            return await main()

        return asyncio.run(eagerly())
    return asyncio.run(main(), debug=loop_name == "debug")


LOOPS = ["asyncio", "debug", "uvloop", "eager"]


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("batch", ["on", "off"])
def test_every_task_is_counted_once_and_asyncio_is_unchanged(
    loop_name: str, batch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if batch == "off":
        monkeypatch.setenv(_tap.BATCH_ENV, "0")

    async def bare() -> tuple[list[object], list[str]]:
        log: list[str] = []
        return await every_way(log), log

    async def instrumented() -> tuple[list[object], list[str], tuple[float, float]]:
        registry = CollectorRegistry()
        asynctrace.install(registry=registry, loop_monitor=False)
        try:
            log: list[str] = []
            out = await every_way(log)
            await asyncio.sleep(0.01)  # the last callbacks' turns
            return out, log, counted(registry)
        finally:
            asynctrace.uninstall()

    expected, expected_log = run(bare, loop_name)
    got, log, (created, finished) = run(instrumented, loop_name)
    assert got == expected
    assert log == expected_log  # the same steps in the same order
    assert created == finished
    assert created >= 43  # the tasks every_way makes


@needs_batch
@pytest.mark.parametrize("loop_name", LOOPS)
def test_tasks_awaited_by_kept_callbacks_get_none_of_ours(loop_name: str) -> None:
    async def main() -> dict[str, list[int]]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            tap = vars(asyncio.get_running_loop())["call_soon"]
            gate = asyncio.Event()
            gathered = [asyncio.create_task(gate.wait()) for _ in range(3)]
            outer = asyncio.gather(*gathered)
            loose = asyncio.create_task(gate.wait())
            assert tap.pending  # the check is scheduled, not run: no callback of ours yet
            assert [ours(t) for t in [*gathered, loose]] == [0, 0, 0, 0]
            awaited = asyncio.create_task(leaf(2))
            got = await awaited  # the check ran before its first step
            assert got == 2
            async with asyncio.TaskGroup() as group:
                grouped = [group.create_task(gate.wait()) for _ in (4, 5)]
                await asyncio.sleep(0)
                seen = {
                    "gathered": [ours(t) for t in gathered],
                    "grouped": [ours(t) for t in grouped],
                    "loose": [ours(loose)],
                }
                gate.set()
            await outer
            await loose
            return seen
        finally:
            asynctrace.uninstall()

    seen = run(main, loop_name)
    assert seen == {"gathered": [0, 0, 0], "grouped": [0, 0], "loose": [1]}


@pytest.mark.parametrize("batch", ["on", "off"])
def test_a_batched_tasks_end_is_taken_when_it_ends(
    batch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended through gather's callback: the 30 ms callback queued behind the end is not in."""
    if batch == "off":
        monkeypatch.setenv(_tap.BATCH_ENV, "0")
    registry = CollectorRegistry()
    labels = {"operation": "unnamed", "outcome": "finished"}

    async def main() -> tuple[bool, float | None, float | None]:
        asynctrace.install(registry=registry, loop_monitor=False)
        loop = asyncio.get_running_loop()
        try:

            async def quick() -> None:
                await asyncio.sleep(0)
                loop.call_soon(time.sleep, 0.03)  # holds the loop, behind this task's end

            tasks = [asyncio.create_task(quick(), name=f"q{i}") for i in range(5)]
            await asyncio.gather(*tasks)
            await asyncio.sleep(0)
            return (
                _tap.is_tapped(loop),
                registry.get_sample_value("asynctrace_task_duration_seconds_count", labels),
                registry.get_sample_value(
                    "asynctrace_task_duration_seconds_bucket", {**labels, "le": "0.025"}
                ),
            )
        finally:
            asynctrace.uninstall()

    tapped, count, fast = asyncio.run(main())
    assert count == 5
    # The five end in one loop turn, before any of the 30 ms callbacks queued behind them;
    # untapped (the pure-Python runtime's default), their ends wait for those callbacks.
    assert fast == (5 if tapped else 0)


@needs_batch
def test_uninstalled_with_a_check_pending() -> None:
    """The check still runs the step it stands for; nothing from the ended installation."""
    first, second = CollectorRegistry(), CollectorRegistry()

    async def main() -> tuple[list[int], tuple[float, float], tuple[float, float]]:
        asynctrace.install(registry=first, loop_monitor=False)
        tap = vars(asyncio.get_running_loop())["call_soon"]
        tasks = [asyncio.create_task(leaf(i)) for i in (1, 2)]
        assert tap.pending
        before = counted(first)
        asynctrace.uninstall()
        assert not _tap.is_tapped(asyncio.get_running_loop())
        asynctrace.install(registry=second, loop_monitor=False)
        more = [asyncio.create_task(leaf(i)) for i in (4, 5)]
        try:
            got = await asyncio.gather(*tasks, *more)
            await asyncio.sleep(0)
            return got, before, counted(second)
        finally:
            asynctrace.uninstall()

    got, before, after = asyncio.run(main())
    assert got == [1, 2, 4, 5]
    assert before == (2, 0)
    assert after == (2, 2)  # the two made under it; the first two are not its to count


@needs_batch
@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks exist from Python 3.12")
def test_eager_tasks_are_checked_before_their_second_step() -> None:
    """An eager task's first step runs in its constructor: the check is scheduled before it."""
    registry = CollectorRegistry()

    async def main() -> tuple[list[int], list[int], tuple[float, float]]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        asynctrace.install(registry=registry, loop_monitor=False)
        try:
            tap = vars(loop)["call_soon"]
            gate = asyncio.Event()
            gathered = [asyncio.create_task(gate.wait()) for _ in range(3)]
            outer = asyncio.gather(*gathered)
            loose = asyncio.create_task(gate.wait())
            finished = asyncio.create_task(asyncio.sleep(0, result=7))  # pending: sleep(0)
            at_once = asyncio.create_task(leaf_now())  # done in its first step
            assert at_once.done()
            assert tap.pending
            await asyncio.sleep(0)  # the check ran
            counts = [ours(t) for t in [*gathered, loose]]
            gate.set()
            got = [*(await outer), await loose, await finished, await at_once]
            await asyncio.sleep(0)
            return counts, got, counted(registry)
        finally:
            asynctrace.uninstall()

    counts, got, (created, finished) = asyncio.run(main())
    assert counts == [0, 0, 0, 1]
    assert got == [True, True, True, True, 7, 5]
    assert created == finished == 6


async def leaf_now() -> int:
    return 5


def test_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_tap.BATCH_ENV, "0")

    async def main() -> list[int]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            tap = vars(asyncio.get_running_loop()).get("call_soon")
            tasks = [asyncio.create_task(leaf(i)) for i in (1, 2)]
            assert tap is None or tap.kept is None
            return [ours(t) for t in tasks] + await asyncio.gather(*tasks)
        finally:
            asynctrace.uninstall()

    assert asyncio.run(main()) == [1, 1, 1, 2]


# -- the specification (the twin) against the C pieces ---------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def impl(request: pytest.FixtureRequest) -> types.ModuleType:
    return request.param  # type: ignore[no-any-return]


class Pieces:
    """One implementation's LeanFactory, LeanDone and Tap, set on the running loop."""

    def __init__(
        self, impl: types.ModuleType, loop: asyncio.AbstractEventLoop, task_type: Any = asyncio.Task
    ) -> None:
        import contextvars  # noqa: PLC0415

        self.ended: list[tuple[str, str]] = []
        self.metadata: list[object] = []
        self.lean_finished: list[object] = []
        self.errors: list[object] = []
        meta_var: contextvars.ContextVar[object] = contextvars.ContextVar("meta")
        pieces = self

        def finished(metadata: Any, outcome: str, duration: int) -> None:
            pieces.ended.append((asyncio.current_task().get_name(), outcome))  # type: ignore[union-attr]
            pieces.metadata.append(metadata)

        hooks = types.SimpleNamespace(
            lean=True, started=(), begin=None, end=None, finished=(finished,)
        )
        state = types.SimpleNamespace(hooks=hooks)
        self.done = impl.LeanDone(
            metadata_var=meta_var, no_metadata=None, state=state,
            on_error=lambda _hook, exc: pieces.errors.append(exc), on_cancelled=lambda *_: None,
        )  # fmt: skip
        self.factory = impl.LeanFactory(
            fallback=lambda *a, **k: pytest.fail(f"fallback {a} {k}"), state=state,
            slot=types.SimpleNamespace(value=None), cid_var=contextvars.ContextVar("cid"),
            metadata_var=meta_var, make_metadata=lambda *a: a, new_cid=lambda: "c",
            validate=lambda *_: None, task_type=task_type, lean_done=self.done,
            starts=self.done.starts, on_error=lambda _hook, exc: pieces.errors.append(exc),
            lean_finish=lambda *a: pieces.lean_finished.append(a),
        )  # fmt: skip
        self.tap = impl.Tap(loop.call_soon, (impl.LeanDone,), kept=_tap.kept_callbacks())
        loop.call_soon = self.tap  # type: ignore[method-assign]
        loop.set_task_factory(self.factory)

    def undo(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_task_factory(None)
        del loop.call_soon  # type: ignore[method-assign]


def test_the_check_gives_the_callback_only_where_needed(impl: types.ModuleType) -> None:
    if FREE_THREADED:
        pytest.skip("a free-threaded build keeps the callback on every task")

    async def named(name: str, gate: asyncio.Event | None) -> None:
        asyncio.current_task().set_name(name)  # type: ignore[union-attr]
        await asyncio.sleep(0)
        if gate is not None:
            await gate.wait()

    async def main() -> Pieces:
        loop = asyncio.get_running_loop()
        pieces = Pieces(impl, loop)
        try:
            gate = asyncio.Event()
            gathered = [asyncio.create_task(named(f"g{i}", gate)) for i in range(3)]
            outer = asyncio.gather(*gathered)
            loose = asyncio.create_task(named("loose", gate))
            assert pieces.tap.pending
            assert pieces.tap.done is pieces.done
            assert [ours(t) for t in [*gathered, loose]] == [0, 0, 0, 0]
            awaited = asyncio.create_task(named("awaited", None))
            await awaited
            assert not pieces.tap.pending
            assert [ours(t) for t in gathered] == [0, 0, 0]
            assert ours(loose) == 1
            gate.set()
            await outer
            await loose
            await asyncio.sleep(0)
            assert len(pieces.done.starts) == 0
        finally:
            pieces.undo(loop)
        return pieces

    pieces = asyncio.run(main())
    assert pieces.errors == []
    # each end once, inside the task's own last step (its name is the current task's)
    assert sorted(pieces.ended) == sorted(
        [(n, "finished") for n in ("g0", "g1", "g2", "loose", "awaited")]
    )


def test_a_tap_without_kept_batches_nothing(impl: types.ModuleType) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pieces = Pieces(impl, loop)
        tap = impl.Tap(pieces.tap.call_soon, (impl.LeanDone,))
        loop.call_soon = tap  # type: ignore[method-assign]
        try:
            tasks = [asyncio.create_task(asyncio.sleep(0)) for _ in range(2)]
            counts = [ours(t) for t in tasks]
            assert tap.kept is None
            assert not tap.pending
            await asyncio.gather(*tasks)
            return counts
        finally:
            pieces.undo(loop)

    assert asyncio.run(main()) == [1, 1]


def test_kept_must_be_a_tuple(impl: types.ModuleType) -> None:
    with pytest.raises(TypeError, match=r"Tap: kept must be a tuple or None, got \[1\]"):
        impl.Tap(print, (int,), kept=[1])


def test_kept_callbacks_name_gather_and_task_group() -> None:
    kept = _tap.kept_callbacks()
    codes = [k for k in kept if isinstance(k, types.CodeType)]
    assert [c.co_name for c in codes] == ["_done_callback"]
    functions = [k for k in kept if isinstance(k, types.FunctionType)]
    assert functions
    assert all(f.__name__ == "_on_task_done" for f in functions)
    assert LeanDone is _native.LeanDone


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2 or FREE_THREADED, reason="the C check, with a GIL")
def test_the_c_check_reads_the_futures_fields_where_its_probe_found_them() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        pieces = Pieces(_speedups, loop)
        try:
            assert pieces.tap.layout == 0
            tasks = [asyncio.create_task(asyncio.sleep(0)) for _ in range(2)]
            await asyncio.gather(*tasks)
            return int(pieces.tap.layout)
        finally:
            pieces.undo(loop)

    # 3.11 to 3.14 share the fields read (their callbacks as task._callbacks lists them)
    assert asyncio.run(main()) == (1 if sys.version_info < (3, 15) else -1)


@pytest.mark.skipif(not FREE_THREADED, reason="the free-threaded build's path")
def test_a_free_threaded_build_gives_every_task_the_callback(impl: types.ModuleType) -> None:
    """No batch without the GIL: the tap's check state is per loop, without a lock."""
    assert impl.Tap(print, (int,), kept=_tap.kept_callbacks()).kept is None

    async def main() -> list[int]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            tasks = [asyncio.create_task(leaf(i)) for i in (1, 2)]
            outer = asyncio.gather(*tasks)
            await asyncio.sleep(0)
            counts = [ours(t) for t in tasks]
            return counts + await outer
        finally:
            asynctrace.uninstall()

    assert asyncio.run(main()) == [1, 1, 1, 2]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks exist from Python 3.12")
def test_an_eager_task_done_at_once_is_recorded_by_the_lean_done(impl: types.ModuleType) -> None:
    """What ``lean_finish`` does, done by the factory's ``LeanDone`` (no Python call in C)."""
    import functools  # noqa: PLC0415

    async def at_once() -> int:
        return 3

    async def main() -> tuple[int, Pieces]:
        loop = asyncio.get_running_loop()
        eager = functools.partial(asyncio.Task, eager_start=True)
        pieces = Pieces(impl, loop, task_type=eager)
        try:
            task = asyncio.create_task(at_once())
            assert task.done()
            assert len(pieces.done.starts) == 0  # never noted
            return await task, pieces
        finally:
            pieces.undo(loop)

    got, pieces = asyncio.run(main())
    assert got == 3
    assert pieces.lean_finished == []
    assert [outcome for _, outcome in pieces.ended] == ["finished"]
    assert pieces.metadata == [(None, "c", None)]  # the task's (make_metadata's tuple)
