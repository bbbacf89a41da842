"""The native accelerator and its pure-Python twin; exact end times through the loop's tap.

Every test of ``Tap`` runs against both implementations. The order-based tests below need no
clock: a callback queued just before a task returns runs before the task's done callback gets
its turn, so an end time taken from the done callback comes after the callback's, and one
taken on the spot (the tap) comes before it.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _native, _speedups_py, _tap
from asynctrace.testing import TaskCapture, record_of

IMPLEMENTATIONS: list[ModuleType] = [_speedups_py]
try:
    from asynctrace import _speedups
except ImportError:  # not built here: CI requires it (ASYNCTRACE_REQUIRE_NATIVE)
    if os.environ.get("ASYNCTRACE_REQUIRE_NATIVE") == "1":
        raise
else:
    IMPLEMENTATIONS.append(_speedups)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def tap_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Install with this implementation's Tap on the loops (on by request for the twin)."""
    monkeypatch.setattr(_tap, "Tap", request.param.Tap)
    monkeypatch.setenv(_tap.TAP_ENV, "1")
    return request.param  # type: ignore[no-any-return]


class Marker:
    def __init__(self, result: object = True) -> None:
        self.result = result
        self.marked: list[object] = []
        self.called: list[object] = []

    def mark(self, future: object) -> object:
        self.marked.append(future)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def __call__(self, future: object) -> None:
        self.called.append(future)


# -- the Tap itself ---------------------------------------------------------------------------


def test_implementation_names(impl: ModuleType) -> None:
    assert impl.IMPLEMENTATION in {"c", "python"}
    assert sorted(impl.__all__) == [
        "Counts",
        "CreateTask",
        "IMPLEMENTATION",
        "LaneQueue",
        "LeanDone",
        "LeanFactory",
        "SpanHooks",
        "SpanIds",
        "Starts",
        "Tap",
        "ThreadSlot",
        "encode_task_span",
        "encode_task_spans",
        "exporting",
        "untracked_copy",
    ]


def test_other_calls_pass_through_unchanged(impl: ModuleType) -> None:
    calls: list[tuple[Any, ...]] = []

    def call_soon(callback: object, *args: object, context: object = None) -> str:
        calls.append((callback, args, context))
        return "handle"

    tap = impl.Tap(call_soon, (Marker,))
    assert tap(print, 1, 2) == "handle"
    assert tap(print, context="ctx") == "handle"
    marker = Marker()
    assert tap(marker, 1, 2) == "handle"  # two arguments: not a completion
    assert calls == [(print, (1, 2), None), (print, (), "ctx"), (marker, (1, 2), None)]
    assert marker.marked == []
    assert tap.call_soon is call_soon
    assert tap.markers == (Marker,)
    assert "Tap of" in repr(tap)


def test_marker_runs_on_the_spot(impl: ModuleType) -> None:
    scheduled: list[object] = []
    tap = impl.Tap(lambda cb, *_, **__: scheduled.append(cb), (Marker,))
    marker = Marker(result=True)
    assert tap(marker, "fut", context="ctx") is None
    assert marker.marked == ["fut"]
    assert scheduled == []


def test_marker_that_declines_is_scheduled(impl: ModuleType) -> None:
    scheduled: list[object] = []
    tap = impl.Tap(lambda cb, *a, context=None: scheduled.append((cb, a, context)), (Marker,))
    marker = Marker(result=False)
    tap(marker, "fut", context="ctx")
    assert marker.marked == ["fut"]
    assert scheduled == [(marker, ("fut",), "ctx")]


def test_raising_marker_is_reported_and_scheduled(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    scheduled: list[object] = []
    tap = impl.Tap(lambda cb, *_, **__: scheduled.append(cb), (Marker,))
    marker = Marker(result=ValueError("boom"))
    tap(marker, "fut")  # never raises into the caller (a task's last step)
    assert scheduled == [marker]
    assert len(reported) == 1
    assert isinstance(reported[0].exc_value, ValueError)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, ()), "call_soon must be callable, got 1"),
        ((print, [int]), "markers must be a tuple of types, got [<class 'int'>]"),
        ((print, (int, "x")), "markers must be a tuple of types, got (<class 'int'>, 'x')"),
    ],
)
def test_bad_arguments(impl: ModuleType, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(TypeError) as info:
        impl.Tap(*args)
    assert message in str(info.value)


def test_pure_python_is_forced_by_the_environment() -> None:
    code = "import asynctrace._native as n; print(n.IMPLEMENTATION)"
    env = {**os.environ, "ASYNCTRACE_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"
    assert _native.load(pure_python=True) is _speedups_py
    expected = "c" if len(IMPLEMENTATIONS) == 2 else "python"
    assert expected == _native.load(pure_python=False).IMPLEMENTATION


# -- exact end times on an instrumented loop -------------------------------------------------


async def _ends_and_probe(n: int = 50) -> list[tuple[int, int]]:
    """(record end, time a callback queued just before the task returned ran) per task."""
    loop = asyncio.get_running_loop()
    probes: list[int] = []

    async def work() -> None:
        await asyncio.sleep(0)
        loop.call_soon(lambda: probes.append(time.perf_counter_ns()))

    tasks = [asyncio.create_task(work()) for _ in range(n)]
    records = [record_of(t) for t in tasks]
    await asyncio.gather(*tasks)
    await asyncio.sleep(0)
    return [(r.finished_ns, p) for r, p in zip(records, probes, strict=True) if r is not None]


# -- the GIL handed to an export thread at work ------------------------------------------------


def test_exporting_counts_the_threads_at_work(impl: ModuleType) -> None:
    for wrong in (0, 2, True, 1.0, "1", None):
        with pytest.raises(ValueError, match=rf"must be 1 .* or -1 .*, got {wrong!r}"):
            impl.exporting(wrong)
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert impl.exporting(1) is None  # no GIL to hand over
        return
    assert impl.exporting(1) == 1
    assert impl.exporting(1) == 2
    assert impl.exporting(-1) == 1
    assert impl.exporting(-1) == 0


FORK_EXPORTING = """
import importlib, os, sys
m = importlib.import_module(sys.argv[1])
m.exporting(1)  # the parent's export thread at work when the process forks
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, repr(m.exporting(1)).encode())  # the child has no export thread
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 100).decode(), m.exporting(-1))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")), reason="no GIL to hand over")
def test_a_forked_child_starts_with_no_export_thread_at_work(impl: ModuleType) -> None:
    """The parent's export thread does not exist in the child: its loops hand nothing over."""
    out = subprocess.run(
        [sys.executable, "-c", FORK_EXPORTING, impl.__name__],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["1", "0"], out


async def _gil_taken_by_a_waiting_thread(at_work: bool, seconds: float = 0.3) -> int:
    """How often a thread that gives the GIL up and wants it back gets it, the loop busy."""

    async def leaf() -> int:
        return 1

    stop = False
    got = 0

    def waiter() -> None:
        nonlocal got
        while not stop:
            time.sleep(0)  # gives the GIL up and wants it back, as a socket call does
            got += 1

    thread = threading.Thread(target=waiter)
    thread.start()
    if at_work:
        _native.exporting(1)
    try:
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            await asyncio.gather(*[asyncio.create_task(leaf()) for _ in range(100)])
    finally:
        if at_work:
            _native.exporting(-1)
        stop = True
        thread.join()
    return got


@pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")), reason="no GIL to hand over")
@pytest.mark.asyncio
async def test_a_busy_loop_hands_the_gil_to_an_export_thread_at_work(
    tap_impl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that wants the GIL back gets it about once a millisecond.

    Without the hand-over it got it 1-3 times in 0.3 s here (3.11 and 3.14): the loop's
    thread takes it back at each select() before the other has woken.
    """
    monkeypatch.setattr(_native, "exporting", tap_impl.exporting)
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    try:
        assert _tap.is_tapped(asyncio.get_running_loop())
        alone = await _gil_taken_by_a_waiting_thread(at_work=False)
        handed = await _gil_taken_by_a_waiting_thread(at_work=True)
    finally:
        asynctrace.uninstall()
    # About once a millisecond; alone, 1-3 times with the C tap. The twin's tap runs Python,
    # which lets the switch interval force a hand-over now and then (40-140 times alone, from
    # run to run): its hand-over is checked on a hand-moved clock below.
    assert handed >= 100, (alone, handed)
    if tap_impl.IMPLEMENTATION == "c":
        assert handed > 5 * alone, (alone, handed)


class _Clock:
    """A stand-in for ``time`` in the twin: a clock moved by hand, and the sleeps asked for."""

    def __init__(self) -> None:
        self.now = 10**12
        self.slept: list[float] = []

    def perf_counter_ns(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")), reason="no GIL to hand over")
def test_the_twin_hands_over_after_the_end_and_once_a_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(_speedups_py, "time", clock)
    scheduled: list[object] = []
    order: list[str] = []

    def call_soon(*args: object, context: object = None) -> None:
        scheduled.append(args)

    class Ordered(Marker):
        def mark(self, future: object) -> object:  # noqa: ARG002
            order.append("mark")
            return True

    tap = _speedups_py.Tap(call_soon, (Ordered,))
    marker = Ordered()
    clock.sleep = lambda _seconds: order.append("sleep")  # type: ignore[method-assign]

    tap(marker, "f")
    assert order == ["mark"]  # nobody at work: no hand-over
    assert _speedups_py.exporting(1) == 1
    try:
        tap(marker, "f")
        assert order == ["mark", "mark", "sleep"]  # after the end is marked
        clock.now += _speedups_py.COURTESY_PERIOD_NS - 1
        tap(marker, "f")
        tap(print, "other")  # a call passed on counts too
        assert order.count("sleep") == 1
        clock.now += 1
        tap(print, "other")
        assert order.count("sleep") == 2
        # At work for 64.5 ms: a 64th of that, about 1 ms, between hand-overs.
        clock.now += 64 * 1_000_000
        tap(print, "other")
        assert order.count("sleep") == 3
        clock.now += 1_000_000  # 1 ms later: the period is 65.5 ms / 64 = 1.023 ms
        tap(print, "other")
        assert order.count("sleep") == 3
        clock.now += 100_000  # 1.1 ms: over 65.6 ms / 64 = 1.025 ms
        tap(print, "other")
        assert order.count("sleep") == 4
    finally:
        assert _speedups_py.exporting(-1) == 0
    clock.now += 10**9
    tap(print, "other")
    assert order.count("sleep") == 4
    assert scheduled == [(print, "other")] * 6


@pytest.mark.asyncio
async def test_end_is_taken_when_the_task_ends(tap_impl: ModuleType) -> None:
    capture = TaskCapture()
    asynctrace.install(instruments=[capture], metrics=False, loop_monitor=False)
    try:
        assert _tap.is_tapped(asyncio.get_running_loop())
        pairs = await _ends_and_probe()
    finally:
        asynctrace.uninstall()
    assert len(pairs) == 50
    assert all(end < probe for end, probe in pairs), tap_impl.IMPLEMENTATION


@pytest.mark.asyncio
async def test_without_the_tap_the_end_waits_for_the_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_tap.TAP_ENV, "0")
    asynctrace.install(instruments=[TaskCapture()], metrics=False, loop_monitor=False)
    try:
        assert not _tap.is_tapped(asyncio.get_running_loop())
        pairs = await _ends_and_probe()
    finally:
        asynctrace.uninstall()
    assert len(pairs) == 50
    assert all(end > probe for end, probe in pairs)


@pytest.mark.asyncio
@pytest.mark.parametrize("tapped", [True, False], ids=["tap", "no-tap"])
async def test_lean_path_histogram_on_the_spot(
    tap_impl: ModuleType, tapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics only: with the tap, the duration excludes the callbacks queued behind its end."""
    if not tapped:
        monkeypatch.setenv(_tap.TAP_ENV, "0")
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    loop = asyncio.get_running_loop()
    try:
        assert _tap.is_tapped(loop) is tapped

        async def quick() -> None:
            # Behind this task's end: a callback that holds the loop for 30 ms.
            loop.call_soon(time.sleep, 0.03)

        await asyncio.create_task(quick())
        await asyncio.sleep(0)
        labels = {"operation": "unnamed", "outcome": "finished"}
        count = registry.get_sample_value("asynctrace_task_duration_seconds_count", labels)
        fast = registry.get_sample_value(
            "asynctrace_task_duration_seconds_bucket", {**labels, "le": "0.025"}
        )
    finally:
        asynctrace.uninstall()
    assert count == 1
    # With the tap the 30 ms callback runs after the end was taken; without, before.
    assert fast == (1 if tapped else 0)


@pytest.mark.asyncio
async def test_your_instruments_still_run_from_a_handle(tap_impl: ModuleType) -> None:
    seen: list[object] = []

    class Mine(asynctrace.Instrument):
        def task_done(self, task: asyncio.Task[Any], record: Any) -> None:  # noqa: ARG002
            seen.append((asyncio.current_task(), record.finished_ns))

    asynctrace.install(instruments=[Mine()], metrics=False, loop_monitor=False)
    try:
        pairs = await _ends_and_probe(5)
    finally:
        asynctrace.uninstall()
    assert len(seen) == 5
    assert all(current is None for current, _ in seen)  # not inside the task's last step
    assert all(end < probe for end, probe in pairs)  # but its end was taken on the spot


@pytest.mark.asyncio
async def test_uninstall_puts_call_soon_back(tap_impl: ModuleType) -> None:
    loop = asyncio.get_running_loop()
    assert "call_soon" not in vars(loop)
    asynctrace.install(instruments=[TaskCapture()], metrics=False, loop_monitor=False)
    assert isinstance(vars(loop)["call_soon"], tap_impl.Tap)
    asynctrace.uninstall()
    assert "call_soon" not in vars(loop)
    assert loop.call_soon.__func__ is type(loop).call_soon  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_someone_elses_call_soon_is_kept(tap_impl: ModuleType) -> None:
    loop = asyncio.get_running_loop()
    original = loop.call_soon
    calls: list[object] = []

    def theirs(callback: Any, *args: Any, context: Any = None) -> Any:
        calls.append(callback)
        return original(callback, *args, context=context)

    loop.call_soon = theirs  # type: ignore[method-assign]
    try:
        asynctrace.install(instruments=[TaskCapture()], metrics=False, loop_monitor=False)
        await asyncio.sleep(0)
        assert calls  # still called, through the tap
        asynctrace.uninstall()
        assert vars(loop)["call_soon"] is theirs
    finally:
        del loop.call_soon


class ReadOnlyCallSoonLoop(asyncio.SelectorEventLoop):
    """A loop whose call_soon cannot be set on the instance."""

    @property
    def call_soon(self) -> Any:
        return super().call_soon


class OwnFutureLoop(asyncio.SelectorEventLoop):
    """A loop whose futures do not find call_soon on the instance (the tap cannot see them)."""

    def create_future(self) -> asyncio.Future[Any]:
        loop = self

        class Future(asyncio.futures._PyFuture):  # type: ignore[name-defined,misc]
            def add_done_callback(self, fn: Any, *, context: Any = None) -> None:  # noqa: ARG002
                self._cbs = [*getattr(self, "_cbs", []), fn]

            def set_result(self, result: Any) -> None:
                super().set_result(result)
                for fn in getattr(self, "_cbs", []):
                    type(loop).call_soon(loop, fn, self)

        return Future(loop=self)


@pytest.mark.parametrize("loop_type", [ReadOnlyCallSoonLoop, OwnFutureLoop])
def test_fallback_when_the_loop_does_not_allow_it(loop_type: type, tap_impl: ModuleType) -> None:
    """Detected at install: no tap, and ends are still recorded (from the callback's turn)."""
    loop = loop_type()
    capture = TaskCapture()
    try:
        asynctrace.install(loop=loop, instruments=[capture], metrics=False, loop_monitor=False)
        assert not _tap.is_tapped(loop)
        assert "call_soon" not in vars(loop)

        async def main() -> int:
            await asyncio.sleep(0)
            return 7

        assert loop.run_until_complete(loop.create_task(main())) == 7
        loop.run_until_complete(asyncio.sleep(0))
        done = [r for _, r in capture.done if r.outcome == "finished"]
        assert done
        assert all(r.finished_ns >= r.created_ns for r in done)
    finally:
        asynctrace.uninstall(loop)
        loop.close()


def test_uvloop_is_tapped(tap_impl: ModuleType) -> None:
    uvloop = pytest.importorskip("uvloop")
    capture = TaskCapture()

    async def main() -> list[tuple[int, int]]:
        asynctrace.install(instruments=[capture], metrics=False, loop_monitor=False)
        try:
            assert _tap.is_tapped(asyncio.get_running_loop())
            return await _ends_and_probe(20)
        finally:
            asynctrace.uninstall()

    pairs = uvloop.run(main())
    assert len(pairs) == 20
    assert all(end < probe for end, probe in pairs)


@pytest.mark.skipif(sys.version_info < (3, 14), reason="concurrent.interpreters is new in 3.14")
@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="the C extension is not built here")
def test_c_extension_loads_in_isolated_subinterpreters() -> None:
    from concurrent import interpreters  # noqa: PLC0415 - 3.14 only

    interp = interpreters.create()
    try:
        interp.exec(
            "import asynctrace._speedups as s\n"
            "assert s.IMPLEMENTATION == 'c'\n"
            "t = s.Tap(print, (int,))\n"
            "assert t.call_soon is print\n"
        )
        # the same implementation as here (ASYNCTRACE_PURE_PYTHON is inherited)
        here = _native.IMPLEMENTATION
        interp.exec(f"import asynctrace._native as n\nassert n.IMPLEMENTATION == {here!r}\n")
    finally:
        interp.close()


def test_this_process_runs_what_the_environment_asks() -> None:
    """CI runs the hot-path tests twice: with the C extension, and forced to the twin."""
    if os.environ.get("ASYNCTRACE_PURE_PYTHON", "") not in ("", "0"):
        expected = "python"
    else:  # the C extension whenever it was built (CI requires it to be)
        expected = "c" if len(IMPLEMENTATIONS) == 2 else "python"
    assert expected == _native.IMPLEMENTATION
    assert _native.Tap is (_speedups_py.Tap if expected == "python" else IMPLEMENTATIONS[1].Tap)


def test_tap_by_default_only_with_the_c_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """The twin's tap costs more than it saves: off unless asked for (ASYNCTRACE_TAP=1)."""
    monkeypatch.delenv(_tap.TAP_ENV, raising=False)
    assert _tap.enabled() is (_native.IMPLEMENTATION == "c")
    monkeypatch.setattr(_tap, "IMPLEMENTATION", "python")
    assert _tap.enabled() is False
    monkeypatch.setenv(_tap.TAP_ENV, "1")
    assert _tap.enabled() is True
    monkeypatch.setattr(_tap, "IMPLEMENTATION", "c")
    monkeypatch.setenv(_tap.TAP_ENV, "0")
    assert _tap.enabled() is False


# -- LeanFactory: the factory's common path (C), against its specification (the twin) ------


class Meta:
    def __init__(self, op: object, cid: object, prio: object) -> None:
        self.operation_name, self.correlation_id, self.priority_hint = op, cid, prio


class LeanParts:
    """A LeanFactory's collaborators, recording what they were asked."""

    def __init__(
        self, impl: ModuleType, *, lean: bool = True, metadata_type: type | None = None
    ) -> None:
        import contextvars  # noqa: PLC0415
        import types  # noqa: PLC0415

        self.started: list[object] = []
        self.validated: list[object] = []
        self.fallback_calls: list[tuple[object, ...]] = []
        self.errors: list[tuple[object, BaseException]] = []
        self.finished: list[object] = []
        self.done: list[object] = []
        self.made = 0
        self.hooks = types.SimpleNamespace(
            lean=lean, started=(self.started.append,), begin=None, end=None
        )
        self.state = types.SimpleNamespace(hooks=self.hooks)
        self.slot = types.SimpleNamespace(value=None)
        self.cid_var: contextvars.ContextVar[str] = contextvars.ContextVar("cid")
        self.meta_var: contextvars.ContextVar[Meta] = contextvars.ContextVar("meta")
        self.starts = impl.Starts()
        parts = self

        def make(op: object, cid: object, prio: object) -> Meta:
            parts.made += 1
            return Meta(op, cid, prio)

        def validate(op: object, cid: object, prio: object) -> None:
            parts.validated.append(op)
            if op == "":
                raise ValueError("Invalid operation_name: ''")

        def fallback(loop: Any, coro: Any, **kwargs: Any) -> Any:
            parts.fallback_calls.append(tuple(sorted(kwargs)))
            return asyncio.Task(coro, loop=loop)

        self.factory = impl.LeanFactory(
            fallback=fallback, state=self.state, slot=self.slot, cid_var=self.cid_var,
            metadata_var=self.meta_var, make_metadata=make, new_cid=lambda: "fresh",
            validate=validate, task_type=asyncio.Task, lean_done=self.done.append,
            starts=self.starts, on_error=lambda hook, exc: parts.errors.append((hook, exc)),
            lean_finish=lambda task, meta, ns, _entry: parts.finished.append((task, meta, ns)),
            metadata_type=metadata_type,
        )  # fmt: skip


async def _peek(parts: LeanParts) -> tuple[object, object]:
    return parts.cid_var.get(None), parts.meta_var.get(None)


def test_lean_factory_validates_each_operation_name_once(impl: ModuleType) -> None:
    """Names used in turn are each validated once; at 256 remembered the factory starts anew.

    Keyword names are found by identity when interned (as written in code), by comparison
    otherwise: a name built at run time is still the factory's keyword.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        parts = LeanParts(impl)
        for op in ["validate", "enrich", "store"] * 3:
            await parts.factory(loop, asyncio.sleep(0), operation_name=op)
        assert parts.validated == ["validate", "enrich", "store"]
        built = "".join(["operation", "_name"])  # noqa: FLY002 - a keyword name not interned
        assert built is not sys.intern("operation_name")
        await parts.factory(loop, asyncio.sleep(0), **{built: "store"})
        assert parts.fallback_calls == []
        assert len(parts.validated) == 3
        parts.validated.clear()
        names = [f"op{i}" for i in range(300)]
        for op in names:
            await parts.factory(loop, asyncio.sleep(0), operation_name=op)
        await parts.factory(loop, asyncio.sleep(0), operation_name="op299")  # remembered
        await parts.factory(loop, asyncio.sleep(0), operation_name="op0")  # forgotten at 256
        assert parts.validated == [*names, "op0"]
        for _ in range(2):  # refused: to the fallback (which raises it), never remembered
            await parts.factory(loop, asyncio.sleep(0), operation_name="")
        assert parts.validated[-2:] == ["", ""]
        assert len(parts.fallback_calls) == 2

    asyncio.run(main())


def test_lean_factory_makes_metadata_of_the_given_type(impl: ModuleType) -> None:
    """With metadata_type the C factory makes TaskMetadata itself: equal objects, no call."""
    from asynctrace._metadata import TaskMetadata  # noqa: PLC0415

    async def main() -> tuple[object, object, int]:
        loop = asyncio.get_running_loop()
        parts = LeanParts(impl, metadata_type=TaskMetadata)
        cid, meta = await parts.factory(loop, _peek(parts), operation_name="x", priority_hint=2)
        return cid, meta, parts.made

    cid, meta, made = asyncio.run(main())
    assert cid == "fresh"
    if impl.IMPLEMENTATION == "c":
        assert type(meta) is TaskMetadata
        assert meta == TaskMetadata("x", "fresh", 2)
        assert made == 0  # no Python call
    else:  # the specification: make_metadata always
        assert isinstance(meta, Meta)
        assert (meta.operation_name, meta.correlation_id, meta.priority_hint) == ("x", "fresh", 2)
        assert made == 1
    for bad in (int, Meta, "TaskMetadata"):
        with pytest.raises(TypeError, match="metadata_type must be a class with operation_name"):
            LeanParts(impl, metadata_type=bad)  # type: ignore[arg-type]


def test_lean_factory_common_path(impl: ModuleType) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        parts = LeanParts(impl)
        parts.slot.value = ("fetch", None, 3, None, None)  # the helper's call, 3.11-3.13
        task = parts.factory(loop, _peek(parts))
        assert parts.slot.value is None
        cid, meta = await task
        assert cid == "fresh"  # nothing to inherit: a new id
        assert isinstance(meta, Meta)
        assert (meta.operation_name, meta.correlation_id, meta.priority_hint) == (
            "fetch",
            "fresh",
            3,
        )
        assert parts.started == [meta]
        assert parts.done == [task]  # the shared done callback, once
        assert id(task) in parts.starts
        assert parts.fallback_calls == []
        # 3.14's keywords, inside a request: the id is inherited, the metadata object reused
        parts.cid_var.set("req-1")
        one = parts.factory(loop, _peek(parts), operation_name="fetch", name="n1", context=None)
        two = parts.factory(loop, _peek(parts), operation_name="fetch")
        (cid1, meta1), (cid2, meta2) = await one, await two
        assert (cid1, cid2) == ("req-1", "req-1")
        assert meta1 is meta2
        assert one.get_name() == "n1"
        made = parts.made
        # no operation, and the creator's metadata says the same: inherited as it is
        parts.meta_var.set(Meta(None, "req-1", None))
        _, meta3 = await parts.factory(loop, _peek(parts))
        assert meta3 is parts.meta_var.get()
        assert parts.made == made
        assert parts.fallback_calls == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("keywords", "pending", "lean"),
    [
        ({"context": "explicit"}, None, True),
        ({"eager_start": True}, None, True),
        ({"unknown": 1}, None, True),
        ({"operation_name": ""}, None, True),  # invalid: the fallback raises it
        ({}, ("op", None, None, "named", None), True),
        ({}, None, False),  # records needed (spans, your instruments)
    ],
)
def test_lean_factory_hands_everything_else_to_the_fallback(
    impl: ModuleType, keywords: dict[str, Any], pending: object, lean: bool
) -> None:
    async def main() -> None:
        import contextvars  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        parts = LeanParts(impl, lean=lean)
        parts.slot.value = pending
        if keywords.get("context") == "explicit":
            keywords["context"] = contextvars.copy_context()
        await parts.factory(loop, asyncio.sleep(0), **keywords)
        assert parts.fallback_calls == [tuple(sorted(keywords))]
        assert parts.started == []
        assert parts.slot.value is pending  # left for the fallback to take

    asyncio.run(main())


def test_lean_factory_hook_errors_and_eager_tasks(impl: ModuleType) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        parts = LeanParts(impl)

        def broken(meta: object) -> None:
            raise ValueError("hook")

        parts.hooks.started = (broken, parts.started.append)
        task = parts.factory(loop, asyncio.sleep(0))
        await task
        ((hook, exc),) = parts.errors
        assert hook is broken
        assert isinstance(exc, ValueError)
        assert len(parts.started) == 1  # the next hook still ran

        class Done:  # a task type whose tasks are done at once (an eager one's first step)
            def __init__(self, coro: Any, **_: Any) -> None:
                coro.close()

            def done(self) -> bool:
                return True

        eager = LeanParts(impl)
        eager_factory = type(eager.factory)(
            fallback=eager.factory.fallback, state=eager.state, slot=eager.slot,
            cid_var=eager.cid_var, metadata_var=eager.meta_var, make_metadata=Meta,
            new_cid=lambda: None, validate=lambda *_: None, task_type=Done,
            lean_done=eager.done.append, starts=eager.starts,
            on_error=lambda *_: None,
            lean_finish=lambda task, meta, ns, _entry: eager.finished.append((task, meta, ns)),
        )  # fmt: skip
        made = eager_factory(loop, asyncio.sleep(0))
        ((task2, meta, ns),) = eager.finished
        assert task2 is made
        assert ns >= 0
        assert meta.correlation_id is None  # no id generator: none
        assert len(eager.starts) == 0
        assert eager.done == []

    asyncio.run(main())


def test_starts_table_notes_and_forgets_tasks(impl: ModuleType) -> None:
    """The lean path's table: id(task) -> creation time or entry, as a dict would keep them."""
    table, model = impl.Starts(), {}
    entry = object()
    base = id(entry)
    keys = [base + 16 * i for i in range(3000)]  # addresses, as id(task) gives
    for i, key in enumerate(keys):
        table[key] = model[key] = entry if i % 3 == 0 else time.perf_counter_ns() + i
    for key in keys[::2]:
        assert table.pop(key) == model.pop(key)
    table[keys[1]] = model[keys[1]] = 7  # replaced
    assert len(table) == len(model) == 1500
    for key in keys:
        assert (key in table) == (key in model)
        assert table.get(key) == model.get(key)
        assert table.get(key, "absent") == model.get(key, "absent")
    assert table.pop(keys[0], "absent") == "absent"
    with pytest.raises(KeyError):
        table.pop(keys[0])
    with pytest.raises(KeyError):
        table[keys[0]]
    del table[keys[1]]
    assert keys[1] not in table
    table.clear()
    assert len(table) == 0
    assert table.get(keys[3]) is None
    table[keys[3]] = 5
    assert table[keys[3]] == 5
    if impl.IMPLEMENTATION == "c":  # times kept as integers in the table, not int objects
        table[keys[4]] = entry
        assert [o for o in gc.get_referents(table) if not isinstance(o, type)] == [entry]
        with pytest.raises(TypeError, match="a key is a task's id \\(an int\\), got 'x'"):
            table["x"] = 1
        with pytest.raises(ValueError, match="a key is a task's id, got -1"):
            table[-1] = 1
        assert len(table) == 2


def test_starts_table_shrinks_to_a_floor_not_below() -> None:
    """The C table follows the tasks pending down to 4,096 slots, then keeps them.

    Tasks made in batches (a server's requests) would otherwise grow and shrink it, rehashing
    and zeroing it, at every batch; a burst's capacity is still given back.
    """
    native = [m for m in IMPLEMENTATIONS if m.IMPLEMENTATION == "c"]
    if not native:
        pytest.skip("the C table only (the twin's is a dict)")
    table = native[0].Starts()
    empty = sys.getsizeof(table)
    keys = [16 * (i + 1) for i in range(100_000)]
    for key in keys[:2_000]:  # a batch: 4,096 slots at a load under 3/4
        table[key] = 1
    batch = sys.getsizeof(table)
    assert batch - empty == 4_096 * 16
    for _ in range(3):  # batches come and go: the table stays as it is
        for key in keys[:2_000]:
            table.pop(key)
        assert sys.getsizeof(table) == batch
        for key in keys[:2_000]:
            table[key] = 1
    for key in keys:  # a burst: 100,000 at once, then none
        table[key] = 1
    assert sys.getsizeof(table) - empty == 262_144 * 16
    for key in keys:
        table.pop(key)
    assert len(table) == 0
    assert sys.getsizeof(table) == batch  # the burst given back, down to the floor


def test_starts_table_may_be_read_while_it_releases_its_entries(impl: ModuleType) -> None:
    """Releasing an entry can run code that reads the table (a weakref callback): safe."""

    class Entry:
        pass

    table, seen = impl.Starts(), []
    entry = Entry()
    table[id(entry)] = entry
    table[id(seen)] = 5

    def read_back(_: object) -> None:
        seen.append((table.get(id(seen)), id(seen) in table, len(table)))
        table[id(read_back)] = 7

    probe = weakref.ref(entry, read_back)
    del entry
    table.clear()
    assert probe() is None
    assert seen == [(None, False, 0)]
    assert table[id(read_back)] == 7  # the table took a note again after being emptied


def test_lean_factory_rejects_bad_parts(impl: ModuleType) -> None:
    parts = LeanParts(impl)
    with pytest.raises(TypeError, match="cid_var and metadata_var must be ContextVars"):
        impl.LeanFactory(
            fallback=print, state=parts.state, slot=parts.slot, cid_var="x",
            metadata_var=parts.meta_var, make_metadata=Meta, new_cid=print, validate=print,
            task_type=asyncio.Task, lean_done=print, starts=impl.Starts(), on_error=print,
            lean_finish=print,
        )  # fmt: skip
    with pytest.raises(TypeError, match=r"starts must be a (dict|Starts table).*, got \[\]"):
        impl.LeanFactory(
            fallback=print, state=parts.state, slot=parts.slot, cid_var=parts.cid_var,
            metadata_var=parts.meta_var, make_metadata=Meta, new_cid=print, validate=print,
            task_type=asyncio.Task, lean_done=print, starts=[], on_error=print,
            lean_finish=print,
        )  # fmt: skip


def test_installed_factory_is_the_c_one_with_the_extension() -> None:
    async def main() -> str:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            return type(asyncio.get_running_loop().get_task_factory()).__name__
        finally:
            asynctrace.uninstall()

    expected = "LeanFactory" if _native.IMPLEMENTATION == "c" else "function"
    assert asyncio.run(main()) == expected


# -- Counts and LeanDone: the lean path's completion, against the twin ----------------------


def test_counts_buckets_labels_and_fold(impl: ModuleType) -> None:
    asked: list[object] = []

    def label(name: object) -> str:
        asked.append(name)
        return "unnamed" if name is None else str(name)

    counts = impl.Counts((10, 20, 30), label)
    fetch, other = Meta("fetch", "c", None), Meta(None, "c", None)
    counts.started(fetch)
    counts.started(fetch)
    counts.started(other)
    for duration in (0, 10, 11, 20, 31, -5):  # bisect_left: 10 is in the first bucket
        counts.finished(fetch, "finished", duration)
    counts.finished(fetch, "exception", 25)
    counts.finished(other, "cancelled", 5)
    created, series = counts.fold()
    assert created == {"fetch": 2, "unnamed": 1}
    assert series == {
        ("fetch", "finished"): ([3, 2, 0, 1], 0 + 10 + 11 + 20 + 31 + 0),
        ("fetch", "exception"): ([0, 0, 1, 0], 25),
        ("unnamed", "cancelled"): ([1, 0, 0, 0], 5),
    }
    assert asked == ["fetch", None]  # asked once per operation name
    with pytest.raises(ValueError, match="Invalid outcome: 'lost'"):
        counts.finished(fetch, "lost", 1)
    with pytest.raises(ValueError, match="bounds_ns must increase"):
        impl.Counts((10, 10), label)
    with pytest.raises(ValueError, match="bounds_ns must be a tuple of 1 to 64 ints"):
        impl.Counts((), label)
    with pytest.raises(TypeError, match="label must be callable"):
        impl.Counts((1,), "x")


def test_counts_from_threads_add_up(impl: ModuleType) -> None:
    import threading  # noqa: PLC0415

    counts = impl.Counts((1_000,), str)
    meta = Meta("t", None, None)

    def work() -> None:
        for _ in range(2_000):
            counts.started(meta)
            counts.finished(meta, "finished", 5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created, series = counts.fold()
    assert created == {"t": 8_000}
    assert series[("t", "finished")] == ([8_000, 0], 40_000)


def test_span_ids_read_back_what_was_set(impl: ModuleType) -> None:
    """SpanIds: the span handle's base; each id and the creation time reads as the int set."""

    class Handle(impl.SpanIds):  # type: ignore[name-defined,misc]
        __slots__ = ("other",)

    handle = Handle()
    values = {"trace_id": 2**128 - 1, "span_id": 2**64 - 1, "created_ns": -(2**63)}
    for name, value in values.items():
        setattr(handle, name, value)
    handle.other = "kept"
    assert {name: getattr(handle, name) for name in values} == values
    handle.trace_id, handle.span_id, handle.created_ns = 2**64 + 3, 1, 12_345
    assert (handle.trace_id, handle.span_id, handle.created_ns) == (2**64 + 3, 1, 12_345)
    assert handle.other == "kept"
    if impl.IMPLEMENTATION == "c":  # native integers: no int object kept, a range checked
        assert not any(isinstance(o, int) for o in gc.get_referents(handle))
        with pytest.raises(ValueError, match=r"trace_id must be an int in \[0, 2\*\*128\), got -1"):
            handle.trace_id = -1
        with pytest.raises(
            ValueError, match=r"span_id must be an int in \[0, 2\*\*64\), got 18446744073709551616"
        ):
            handle.span_id = 2**64
        with pytest.raises(TypeError, match="created_ns must be an int, got '7'"):
            handle.created_ns = "7"
        with pytest.raises(ValueError, match=r"created_ns must be an int in \[-2\*\*63, 2\*\*63\)"):
            handle.created_ns = 2**63
        with pytest.raises(AttributeError, match="span_id cannot be deleted"):
            del handle.span_id
        assert (handle.trace_id, handle.span_id, handle.created_ns) == (2**64 + 3, 1, 12_345)


def test_span_ids_can_be_weakly_referenced(impl: ModuleType) -> None:
    """A handle can be weakly referenced (as any span can) with no slot of its own for it."""

    class Handle(impl.SpanIds):  # type: ignore[name-defined,misc]
        __slots__ = ("other",)

    freed: list[object] = []
    handle = Handle()
    handle.other = handle  # a cycle: freed by the collector, weak references cleared first
    ref = weakref.ref(handle, freed.append)
    assert ref() is handle
    with pytest.raises(TypeError, match="__weakref__ slot disallowed"):
        type("Twice", (impl.SpanIds,), {"__slots__": ("__weakref__",)})
    del handle
    gc.collect()
    assert ref() is None
    assert freed == [ref]


def test_c_factory_metadata_of_plain_values_is_not_tracked() -> None:
    """The C factory's TaskMetadata holding only str, int or None is hidden from the collector.

    Frozen, with such values, it is in no cycle (as a tuple of them, which CPython untracks);
    one with a value of another type (a str subclass here) stays tracked.
    """
    if _native.IMPLEMENTATION != "c":
        pytest.skip("the twin's metadata is made in Python: always tracked")

    class Name(str):
        __slots__ = ()

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            plain = asynctrace.create_task(asyncio.sleep(0), operation_name="op", priority_hint=3)
            odd = asynctrace.create_task(asyncio.sleep(0), operation_name=Name("op2"))
            await asyncio.gather(plain, odd)
            made, other = asynctrace.task_metadata(plain), asynctrace.task_metadata(odd)
            assert made is not None
            assert other is not None
            assert (made.operation_name, made.priority_hint) == ("op", 3)
            assert other.operation_name == "op2"
            assert not gc.is_tracked(made)
            assert gc.is_tracked(other)
        finally:
            asynctrace.uninstall()

    asyncio.run(main())


def test_untracked_copy_makes_handles_without_a_gc_header(impl: ModuleType) -> None:
    """The handle class again, its instances with no collector's header (C), working alike."""

    class Handle(impl.SpanIds):  # type: ignore[name-defined,misc]
        """A handle."""

        __slots__ = ()

        def __init__(self, span_id: int) -> None:
            self.span_id = span_id
            self.parent = None

        @property
        def doubled(self) -> int:
            return 2 * self.span_id

        def __repr__(self) -> str:
            return f"Handle({self.span_id})"

    copy = impl.untracked_copy(Handle)
    handle = copy(21)
    assert (handle.doubled, repr(handle), handle.parent) == (42, "Handle(21)", None)
    assert (copy.__name__, copy.__qualname__, copy.__module__, copy.__doc__) == (
        "Handle",
        Handle.__qualname__,
        __name__,
        "A handle.",
    )
    assert isinstance(handle, impl.SpanIds)
    assert not hasattr(handle, "__dict__")
    with pytest.raises(AttributeError):
        handle.other = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = handle.inherited  # a field not set reads as a missing slot
    handle.inherited = [handle.parent]
    ref = weakref.ref(handle)
    if impl.IMPLEMENTATION == "c":
        assert copy is not Handle
        assert not copy.__flags__ & (1 << 14)  # Py_TPFLAGS_HAVE_GC: none
        assert Handle.__flags__ & (1 << 14)  # what a class statement makes
        assert sys.getsizeof(handle) == copy.__basicsize__ == impl.SpanIds.__basicsize__
        # the header saved (a free-threaded build keeps the collector's state in the object
        # header: no header before it to save)
        saved = 0 if sysconfig.get_config_var("Py_GIL_DISABLED") else 16
        assert sys.getsizeof(Handle(1)) == copy.__basicsize__ + saved
    else:
        assert copy is Handle
    del handle
    assert ref() is None  # freed by its count, no collection needed


@pytest.mark.parametrize(
    "bad",
    [
        int,
        "x",
        pytest.param("slots", id="adds-a-slot"),
        pytest.param("dict", id="has-a-dict"),
        pytest.param("two", id="two-bases"),
    ],
)
def test_untracked_copy_refuses_other_classes_by_name(impl: ModuleType, bad: object) -> None:
    class Base:
        __slots__ = ()

    shapes: dict[object, Any] = {
        "slots": type("Slotted", (impl.SpanIds,), {"__slots__": ("other",)}),
        "dict": type("Open", (impl.SpanIds,), {}),
        "two": type("Two", (impl.SpanIds, Base), {"__slots__": ()}),
    }
    cls = shapes.get(bad, bad)
    with pytest.raises(TypeError, match=r"untracked_copy: cls must be a class whose one base is "
                       r"SpanIds and which adds no slot \(__slots__ = \(\)\), got "):  # fmt: skip
        impl.untracked_copy(cls)


def test_counts_keep_the_latest_exemplar_per_bucket(impl: ModuleType) -> None:
    import threading  # noqa: PLC0415

    counts = impl.Counts((10, 20), str)
    fetch = Meta("fetch", "c", None)
    assert counts.fold_exemplars() == {}
    before = time.time()
    counts.exemplar(fetch, "finished", 5, 0xA1, 0xB1)
    counts.exemplar(fetch, "finished", 7, 0xA2, 0xB2)  # the same bucket: the latest wins
    counts.exemplar(fetch, "finished", 25, 1 << 127, 1 << 63)  # past the last bound
    counts.exemplar(fetch, "exception", -3, 0xA3, 0xB3)  # a negative duration: the first
    folded = counts.fold_exemplars()
    after = time.time()
    assert set(folded) == {("fetch", "finished"), ("fetch", "exception")}
    first, middle, last = folded[("fetch", "finished")]
    assert middle is None
    assert first[:3] == (0xA2, 0xB2, 7)
    assert last[:3] == (1 << 127, 1 << 63, 25)
    assert before <= first[3] <= last[3] <= after
    assert [e and e[:3] for e in folded[("fetch", "exception")]] == [(0xA3, 0xB3, -3), None, None]

    # From another thread (a shard of its own in the twin): the latest of the two is folded.
    def later() -> None:
        counts.exemplar(fetch, "finished", 6, 0xC1, 0xD1)

    thread = threading.Thread(target=later)
    thread.start()
    thread.join()
    assert counts.fold_exemplars()[("fetch", "finished")][0][:3] == (0xC1, 0xD1, 6)
    counts.exemplar(fetch, "finished", 8, 0xE1, 0xF1)
    assert counts.fold_exemplars()[("fetch", "finished")][0][:3] == (0xE1, 0xF1, 8)
    with pytest.raises(ValueError, match="Invalid outcome: 'lost'"):
        counts.exemplar(fetch, "lost", 1, 1, 1)
    with pytest.raises(TypeError, match="trace_id and span_id must be ints, got 'x'"):
        counts.exemplar(fetch, "finished", 1, "x", 1)
    with pytest.raises(ValueError, match=r"trace_id must be an int in \[0, 2\*\*128\), got -1"):
        counts.exemplar(fetch, "finished", 1, -1, 1)
    with pytest.raises(ValueError, match=r"span_id must be an int in \[1, 2\*\*64\), got 0"):
        counts.exemplar(fetch, "finished", 1, 1, 0)
    with pytest.raises(ValueError, match=r"span_id must be an int in \[1, 2\*\*64\), got 184"):
        counts.exemplar(fetch, "finished", 1, 1, 1 << 64)
    assert counts.fold_exemplars()[("fetch", "finished")][0][:3] == (0xE1, 0xF1, 8)  # kept
    assert counts.fold()[1] == {}  # an exemplar counts no task


class DoneTask:
    def __init__(self, *, cancelled: bool = False, exception: BaseException | None = None) -> None:
        self._cancelled, self._exception = cancelled, exception

    def cancelled(self) -> bool:
        return self._cancelled


class Entry:
    """What a begin hook returns: the factory keeps it in place of the creation time."""

    def __init__(self, created_ns: int, cid: object) -> None:
        self.created_ns, self.cid = created_ns, cid


def test_lean_factory_begin_runs_in_the_task_context_and_its_entry_is_kept(
    impl: ModuleType,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        parts = LeanParts(impl)
        asked: list[object] = []

        def begin(meta: Meta, created_ns: int) -> Entry | None:
            asked.append(meta)
            if meta.operation_name == "skip":
                return None  # nothing to end: the creation time is kept
            if meta.operation_name == "broken":
                raise ValueError("begin")
            # inside the new task's context: its id is set there, not in the creator's
            return Entry(created_ns, parts.cid_var.get(None))

        parts.hooks.begin = begin
        parts.slot.value = ("op", "req-7", None, None, None)
        before = time.perf_counter_ns()
        task = parts.factory(loop, asyncio.sleep(0))
        entry = parts.starts[id(task)]
        assert isinstance(entry, Entry)
        assert entry.cid == "req-7"
        assert parts.cid_var.get(None) is None  # the creator's context is untouched
        assert before <= entry.created_ns <= time.perf_counter_ns()
        assert asked == parts.started  # the same metadata, begun then started
        parts.slot.value = ("skip", None, None, None, None)
        skipped = parts.factory(loop, asyncio.sleep(0))
        assert type(parts.starts[id(skipped)]) is int
        parts.slot.value = ("broken", None, None, None, None)
        broken = parts.factory(loop, asyncio.sleep(0))  # counted, the task made anyway
        assert type(parts.starts[id(broken)]) is int
        ((hook, exc),) = parts.errors
        assert hook is begin
        assert isinstance(exc, ValueError)
        await asyncio.gather(task, skipped, broken)

        class Done:  # done at once (an eager task's first step): the entry goes to lean_finish
            def __init__(self, coro: Any, **_: Any) -> None:
                coro.close()

            def done(self) -> bool:
                return True

        finished: list[tuple[object, ...]] = []
        eager = LeanParts(impl)
        eager.hooks.begin = lambda _meta, ns: Entry(ns, None)
        eager_factory = type(eager.factory)(
            fallback=eager.factory.fallback, state=eager.state, slot=eager.slot,
            cid_var=eager.cid_var, metadata_var=eager.meta_var, make_metadata=Meta,
            new_cid=lambda: None, validate=lambda *_: None, task_type=Done,
            lean_done=eager.done.append, starts=eager.starts, on_error=lambda *_: None,
            lean_finish=lambda *args: finished.append(args),
        )  # fmt: skip
        made = eager_factory(loop, asyncio.sleep(0))
        ((task2, _, ns, entry2),) = finished
        assert task2 is made
        assert isinstance(entry2, Entry)
        assert ns >= 0
        assert len(eager.starts) == 0

    asyncio.run(main())


def test_lean_done_hands_an_entry_to_the_end_hook(impl: ModuleType) -> None:
    import contextvars  # noqa: PLC0415
    import types  # noqa: PLC0415

    ended: list[tuple[object, ...]] = []
    seen: list[tuple[object, ...]] = []
    errors: list[tuple[object, BaseException]] = []
    meta_var: contextvars.ContextVar[object] = contextvars.ContextVar("meta")
    none = Meta(None, None, None)

    def end(*args: object) -> None:
        ended.append(args)
        if len(ended) == 2:
            raise RuntimeError("end")

    hooks = types.SimpleNamespace(finished=(lambda *a: seen.append(a),), end=end)
    done = impl.LeanDone(
        metadata_var=meta_var, no_metadata=none, state=types.SimpleNamespace(hooks=hooks),
        on_error=lambda hook, exc: errors.append((hook, exc)), on_cancelled=lambda *_: None,
    )  # fmt: skip
    ok, failed, plain = DoneTask(), DoneTask(exception=ValueError()), DoneTask()
    start = time.perf_counter_ns()
    entry_ok, entry_failed = Entry(start, "a"), Entry(start, "b")
    done.starts[id(ok)] = entry_ok
    done.starts[id(failed)] = entry_failed
    done.starts[id(plain)] = start  # a creation time: no end hook
    assert done.mark(ok) is True
    assert done(failed) is None
    assert done.mark(plain) is True
    assert [(t, e, m, o) for t, e, m, o, _ in ended] == [
        (ok, entry_ok, none, "finished"), (failed, entry_failed, none, "exception")
    ]  # fmt: skip
    for (*_, finished_ns), (_, _, duration) in zip(ended, seen, strict=False):
        assert finished_ns - start == duration  # the one end time, for both
    assert len(seen) == 3
    ((hook, exc),) = errors
    assert hook is end
    assert isinstance(exc, RuntimeError)
    assert len(done.starts) == 0


def test_lean_done_records_each_outcome(impl: ModuleType) -> None:
    import contextvars  # noqa: PLC0415
    import types  # noqa: PLC0415

    seen: list[tuple[object, ...]] = []
    cancelled: list[tuple[object, object]] = []
    errors: list[tuple[object, BaseException]] = []
    meta_var: contextvars.ContextVar[object] = contextvars.ContextVar("meta")
    none = Meta(None, None, None)

    def broken(*_: object) -> None:
        raise RuntimeError("hook")

    hooks = types.SimpleNamespace(finished=(broken, lambda *a: seen.append(a)), end=None)
    done = impl.LeanDone(
        metadata_var=meta_var, no_metadata=none, state=types.SimpleNamespace(hooks=hooks),
        on_error=lambda hook, exc: errors.append((hook, exc)),
        on_cancelled=lambda task, meta: cancelled.append((task, meta)),
    )  # fmt: skip
    ok, failed, stopped, unknown = (
        DoneTask(), DoneTask(exception=ValueError()), DoneTask(cancelled=True), DoneTask()
    )  # fmt: skip
    start = time.perf_counter_ns()
    for task in (ok, failed, stopped):
        done.starts[id(task)] = start
    meta = Meta("op", "c", None)
    ctx = contextvars.copy_context()
    ctx.run(meta_var.set, meta)
    assert ctx.run(done.mark, ok) is True
    assert done(failed) is None  # from a Handle: the same, nothing returned
    assert done.mark(stopped) is True  # no metadata in this context: no_metadata
    assert done.mark(unknown) is True  # not noted (forgotten at uninstall): nothing
    assert [(m, o) for m, o, _ in seen] == [
        (meta, "finished"), (none, "exception"), (none, "cancelled")
    ]  # fmt: skip
    assert all(isinstance(ns, int) and ns >= 0 for _, _, ns in seen)
    assert cancelled == [(stopped, none)]
    assert len(errors) == 3
    assert all(isinstance(e, RuntimeError) for _, e in errors)
    assert len(done.starts) == 0
    with pytest.raises(TypeError, match="metadata_var must be a ContextVar"):
        impl.LeanDone(
            metadata_var="x", no_metadata=none, state=None, on_error=print, on_cancelled=print
        )


def _helper_task(
    monkeypatch: pytest.MonkeyPatch, coro: Any, **kwargs: Any
) -> tuple[asyncio.Task[Any], bool]:
    """``asynctrace.create_task(coro, **kwargs)``, and whether it took the checked path (the
    slot, ``loop.create_task``) rather than calling the C factory itself.
    """
    from asynctrace import _create_task  # noqa: PLC0415

    checked = _create_task._create_checked
    took: list[object] = []

    def counted(*args: Any) -> Any:
        took.append(args[0])
        return checked(*args)

    monkeypatch.setattr(_create_task, "_create_checked", counted)
    try:
        return asynctrace.create_task(coro, **kwargs), bool(took)
    finally:
        monkeypatch.setattr(_create_task, "_create_checked", checked)


def test_helper_calls_the_c_factory_directly_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asynctrace.create_task's common call goes straight to the C factory (3.11, 3.12, 3.14)."""

    async def main() -> tuple[bool, object, str]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            with asynctrace.correlation("req-9"):
                task, took = _helper_task(monkeypatch, asyncio.sleep(0, "ok"), operation_name="op")
            meta = asynctrace.task_metadata(task)
            result = await task
            bad = asyncio.sleep(0)
            with pytest.raises(ValueError, match="Invalid operation_name: ''"):
                asynctrace.create_task(bad, operation_name="")
            assert bad.cr_frame is None  # closed: no "never awaited" warning
            return not took, meta, result
        finally:
            asynctrace.uninstall()

    here, meta, result = asyncio.run(main())
    fast = _native.IMPLEMENTATION == "c" and sys.version_info[:2] != (3, 13)
    assert here == fast
    assert result == "ok"
    assert meta == asynctrace.TaskMetadata("op", "req-9", None)


def test_helper_calls_the_c_factory_directly_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's create_task only calls the factory too: the helper's common call skips it.

    The fast path never takes the checked path (the slot, loop.create_task); a call with a
    name still does, with the same result as before.
    """
    uvloop = pytest.importorskip("uvloop")
    if _native.IMPLEMENTATION != "c":
        pytest.skip("the C factory is not in use")

    async def main() -> tuple[object, str, str]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        try:
            with asynctrace.correlation("req-3"):
                task, took = _helper_task(monkeypatch, asyncio.sleep(0, "ok"), operation_name="op")
                assert not took
                named, took = _helper_task(
                    monkeypatch, asyncio.sleep(0, "n"), name="x", operation_name="op"
                )
                assert took
            meta = asynctrace.task_metadata(task)
            assert asynctrace.task_metadata(named) == meta
            return meta, await task, await named
        finally:
            asynctrace.uninstall()

    meta, result, named_result = uvloop.run(main())
    assert meta == asynctrace.TaskMetadata("op", "req-3", None)
    assert (result, named_result) == ("ok", "n")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks exist from Python 3.12")
def test_eager_task_factory_chained_takes_the_c_path_and_stays_eager() -> None:
    registry = CollectorRegistry()
    first_step: list[object] = []

    async def leaf() -> str:
        first_step.append(asynctrace.task_metadata())  # runs inside create_task: eager
        await asyncio.sleep(0)
        return "done"

    async def main() -> tuple[str, list[str]]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        asynctrace.install(registry=registry, loop_monitor=False)
        try:
            kind = type(loop.get_task_factory()).__name__
            task = asynctrace.create_task(leaf(), operation_name="eager-op")
            ran_at_once = len(first_step) == 1
            results = [await task, str(ran_at_once)]
            created = registry.get_sample_value(
                "asynctrace_tasks_created_total", {"operation": "eager-op"}
            )
            return kind, [*results, str(int(created or 0))]
        finally:
            asynctrace.uninstall()
            loop.set_task_factory(None)

    kind, results = asyncio.run(main())
    assert kind == ("LeanFactory" if _native.IMPLEMENTATION == "c" else "function")
    assert results == ["done", "True", "1"]
    (meta,) = first_step
    assert meta is not None
    assert meta.operation_name == "eager-op"  # type: ignore[attr-defined]


# -- sibling tasks share their variables (LeanFactory) ---------------------------------------

_APP_VAR: contextvars.ContextVar[object] = contextvars.ContextVar("app_var", default=None)


def test_siblings_see_their_creators_variables_as_they_were_at_creation() -> None:
    """Tasks made with the same metadata may share one derived context's variables: only
    while the creator's are the very same. A value replaced, even by an equal one, is seen.
    """

    async def read() -> object:
        await asyncio.sleep(0)
        return _APP_VAR.get()

    async def sets_its_own() -> object:
        _APP_VAR.set("mine")
        await asyncio.sleep(0)
        return _APP_VAR.get()

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        first_value, equal_value = [1], [1]
        _APP_VAR.set(first_value)
        a = asynctrace.create_task(read(), operation_name="op")
        b = asynctrace.create_task(read(), operation_name="op")
        own = asynctrace.create_task(sets_its_own(), operation_name="op")
        _APP_VAR.set(equal_value)  # equal, not the same object
        c = asynctrace.create_task(read(), operation_name="op")
        _APP_VAR.set("other")
        d = asynctrace.create_task(read(), operation_name="op")
        assert await a is first_value
        assert await b is first_value
        assert await own == "mine"
        assert await c is equal_value
        assert await d == "other"
        # each task has metadata of its own operation, and the creator's correlation id
        meta = asynctrace.task_metadata(d)
        assert meta is not None
        assert (meta.operation_name, meta.correlation_id) == ("op", asynctrace.correlation_id())
        after = asynctrace.create_task(read(), operation_name="op")
        assert await after == "other"  # the sibling that set its own value changed nothing here

    asyncio.run(main())


# -- LaneQueue: the export thread's queue, against the twin -----------------------------------


class _Item:
    """A span stand-in that can be weakly referenced (to see the queue let it go)."""


def test_lane_queue_keeps_order_counts_and_wakes_once_a_batch(impl: ModuleType) -> None:
    wakes: list[int] = []
    queue = impl.LaneQueue(10, 3, lambda: wakes.append(len(queue)))
    for i in range(5):
        queue(i)
    assert (len(queue), queue.handed, queue.refused, wakes) == (5, 5, 0, [3])  # once
    assert queue.take(2) == [0, 1]
    assert queue.take(0) == []
    queue(5)  # 4 wait: a batch again since the take
    assert wakes == [3, 4]
    assert queue.take(100) == [2, 3, 4, 5]
    assert (len(queue), queue.handed, queue.closed) == (0, 6, False)
    assert (queue.limit, queue.batch) == (10, 3)


def test_lane_queue_is_first_in_first_out_across_wraps(impl: ModuleType) -> None:
    """Puts outrun takes a little: the ring wraps, then grows (to its limit) while wrapped."""
    queue = impl.LaneQueue(100, 1000, lambda: None)
    got: list[object] = []
    for turn in range(40):
        for i in range(13):
            queue(turn * 13 + i)
        got += queue.take(11)
    assert len(queue) == 80
    got += queue.take(1000)
    assert got == list(range(40 * 13))
    assert (queue.handed, queue.refused) == (520, 0)


def test_lane_queue_refuses_over_its_limit_and_after_close(impl: ModuleType) -> None:
    queue = impl.LaneQueue(3, 100, lambda: None)
    items = [_Item() for _ in range(6)]
    refs = [weakref.ref(item) for item in items]
    for item in items[:5]:
        queue(item)
    assert (len(queue), queue.handed, queue.refused) == (3, 3, 2)
    queue.close()
    queue(items[5])
    assert (len(queue), queue.handed, queue.refused, queue.closed) == (0, 3, 3, True)
    assert queue.take(10) == []
    del items, item
    gc.collect()
    assert [ref() for ref in refs] == [None] * 6  # the waiting ones were let go at close


def test_lane_queue_wakes_outside_its_lock(impl: ModuleType) -> None:
    """wake() may use the queue (the twin's lock is not reentrant: this would hang)."""
    seen: list[int] = []
    queue = impl.LaneQueue(10, 2, lambda: seen.append(len(queue.take(0)) + len(queue)))
    queue(1)
    queue(2)
    assert seen == [2]


def test_lane_queue_counts_every_span_from_many_threads(impl: ModuleType) -> None:
    import threading  # noqa: PLC0415

    queue = impl.LaneQueue(500, 50, lambda: None)
    taken: list[object] = []
    stop = threading.Event()

    def put(k: int) -> None:
        for i in range(5000):
            queue((k, i))

    def take() -> None:
        while not stop.is_set() or len(queue):
            taken.extend(queue.take(64))

    taker = threading.Thread(target=take)
    taker.start()
    putters = [threading.Thread(target=put, args=(k,)) for k in range(4)]
    for t in putters:
        t.start()
    for t in putters:
        t.join()
    stop.set()
    taker.join()
    assert queue.handed + queue.refused == 20_000
    assert len(taken) == queue.handed
    for k in range(4):  # each thread's spans in the order it put them
        mine = [i for (j, i) in taken if j == k]  # type: ignore[misc]
        assert mine == sorted(mine)


def test_lane_queue_collects_a_cycle_through_it(impl: ModuleType) -> None:
    queue = impl.LaneQueue(10, 10, lambda: None)
    item = _Item()
    item.queue = queue  # type: ignore[attr-defined]
    queue(item)
    ref = weakref.ref(item)
    del queue, item
    gc.collect()
    assert ref() is None


def test_lane_queue_refuses_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(
        ValueError, match=r"limit and batch must be 1 or more, got limit=0, batch=1"
    ):
        impl.LaneQueue(0, 1, print)
    with pytest.raises(TypeError, match=r"limit and batch must be ints, got '5'"):
        impl.LaneQueue(5, "5", print)
    with pytest.raises(TypeError, match=r"limit and batch must be ints, got 2.0"):
        impl.LaneQueue(2.0, 5, print)
    with pytest.raises(TypeError, match=r"wake must be callable, got 3"):
        impl.LaneQueue(5, 5, 3)
    queue = impl.LaneQueue(5, 5, print)
    with pytest.raises(ValueError, match=r"n must be 0 or more, got -1"):
        queue.take(-1)
    with pytest.raises(TypeError, match=r"n must be an int, got 'x'"):
        queue.take("x")
    with pytest.raises(TypeError):
        queue(1, 2)
    assert (len(queue), queue.handed, queue.refused) == (0, 0, 0)


# -- ThreadSlot: the helper's value per thread, against the twin -----------------------------


def test_thread_slot_holds_a_value_per_thread(impl: ModuleType) -> None:
    import threading  # noqa: PLC0415

    slot = impl.ThreadSlot()
    assert slot.value is None
    slot.value = ("op", None, None, None, None)
    seen: list[object] = []

    def other() -> None:
        seen.append(slot.value)  # not this thread's
        slot.value = "theirs"
        seen.append(slot.value)
        slot.value = None

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [None, "theirs"]
    assert slot.value == ("op", None, None, None, None)
    slot.value = None
    assert slot.value is None
    slot.value = None  # unset twice: still none
    assert slot.value is None
    if impl.IMPLEMENTATION == "c":
        assert slot.filled == 0


def test_thread_slot_counts_the_threads_that_hold_one(impl: ModuleType) -> None:
    if impl.IMPLEMENTATION != "c":
        pytest.skip("the twin is a threading.local: it counts nothing")
    import threading  # noqa: PLC0415

    slot, other = impl.ThreadSlot(), impl.ThreadSlot()
    hold, release = threading.Barrier(5), threading.Event()

    def holder(k: int) -> None:
        slot.value = k
        hold.wait(10)
        release.wait(10)
        assert slot.value == k
        slot.value = None

    threads = [threading.Thread(target=holder, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    hold.wait(10)
    assert (slot.filled, other.filled, slot.value) == (4, 0, None)
    release.set()
    for thread in threads:
        thread.join()
    assert slot.filled == 0
    with pytest.raises(TypeError, match=r"ThreadSlot\(\) takes no arguments"):
        impl.ThreadSlot(1)


def test_factory_takes_the_helpers_keywords_through_the_slot(tap_impl: ModuleType) -> None:
    """The helper's checked path hands its keywords through the slot; nothing is left in it."""
    from asynctrace._create_task import PENDING  # noqa: PLC0415

    async def main() -> tuple[object, object]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        task = asynctrace.create_task(
            asyncio.sleep(0), operation_name="slot-op", name="named", priority_hint=3
        )
        await task
        async with asyncio.TaskGroup() as group:  # the factory's own read of the slot
            grouped = asynctrace.create_task(
                asyncio.sleep(0), operation_name="in-group", task_group=group
            )
        meta, in_group = asynctrace.task_metadata(task), asynctrace.task_metadata(grouped)
        assert meta is not None
        assert in_group is not None
        assert in_group.operation_name == "in-group"
        return (meta.operation_name, meta.priority_hint, task.get_name()), PENDING.value

    assert asyncio.run(main()) == (("slot-op", 3, "named"), None)


# -- CreateTask: the helper's common call ----------------------------------------------------


class _Factory:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, loop: object, coro: object, **kwargs: object) -> str:
        self.calls.append((loop, coro, kwargs))
        return "made"


class _Other(_Factory):
    pass


def _plain_create_task(self: object, coro: object, **kwargs: object) -> None:
    raise AssertionError("the loop's create_task is never called on the common path")


class _Loop:
    create_task = _plain_create_task

    def __init__(self, factory: object) -> None:
        self._task_factory = factory


class _MethodLoop:
    """A loop whose factory is private, read by get_task_factory() (as uvloop's)."""

    def create_task(self, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"not called on the common path: {args}, {kwargs}")

    def __init__(self, factory: object) -> None:
        self._private = factory

    def get_task_factory(self) -> object:
        return self._private


class _ReplacedLoop(_Loop):
    def create_task(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise AssertionError(f"not called: the helper would call it with {args}, {kwargs}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def test_create_task_calls_the_factory_on_the_common_call_only(impl: ModuleType) -> None:
    """Only metadata keywords, a running loop with asyncio's plain create_task and a factory
    of factory_type: the factory is called with loop, coro and all three metadata keywords.
    Anything else goes to the helper (slow) as it was made.
    """
    slow_calls: list[tuple[Any, ...]] = []

    def slow(*args: object, **kwargs: object) -> str:
        slow_calls.append((args, kwargs))
        return "slow"

    factory = _Factory()
    running: list[object] = [_Loop(factory)]
    readers = {_plain_create_task: True}
    create = impl.CreateTask(
        slow=slow, running=lambda: running[0], readers=readers, factory_type=_Factory
    )
    assert create("c1", operation_name="op", priority_hint=3) == "made"
    assert create("c2") == "made"
    none = {"operation_name": None, "correlation_id": None, "priority_hint": None}
    assert factory.calls == [
        (running[0], "c1", {**none, "operation_name": "op", "priority_hint": 3}),
        (running[0], "c2", none),
    ]
    assert create("c3", name="n") == "slow"  # an asyncio keyword
    assert create("c4", operation_name="op", unknown=1) == "slow"  # an unknown one
    assert create(coro="c5") == "slow"  # no positional coroutine
    running[0] = None
    assert create("c6") == "slow"  # no running loop
    running[0] = _ReplacedLoop(factory)
    assert create("c7") == "slow"  # a create_task that does more than call the factory
    running[0] = _Loop(_Other())
    assert create("c8") == "slow"  # another factory
    running[0] = _Loop(None)
    assert create("c9") == "slow"  # none
    method_loop = _MethodLoop(factory)
    running[0] = method_loop
    assert create("c10") == "slow"  # a create_task not (yet) among the readers
    readers[_MethodLoop.create_task] = False  # as the helper adds uvloop's when it meets one
    assert create("c11", correlation_id="r") == "made"
    assert factory.calls[-1] == (method_loop, "c11", {**none, "correlation_id": "r"})
    assert [c[0] or c[1] for c in slow_calls] == [
        ("c3",), ("c4",), {"coro": "c5"}, ("c6",), ("c7",), ("c8",), ("c9",), ("c10",),
    ]  # fmt: skip
    assert slow_calls[0][1] == {"name": "n"}
    assert slow_calls[1][1] == {"operation_name": "op", "unknown": 1}
    assert len(factory.calls) == 3


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def test_create_task_refuses_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(TypeError, match="slow must be callable, got 5"):
        impl.CreateTask(slow=5, running=print, readers={}, factory_type=int)
    with pytest.raises(TypeError, match="readers must be a dict, got None"):
        impl.CreateTask(slow=print, running=print, readers=None, factory_type=int)
    with pytest.raises(TypeError, match="factory_type must be a type, got 'x'"):
        impl.CreateTask(slow=print, running=print, readers={}, factory_type="x")


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C factory is not in use")
def test_helper_is_the_c_common_call_in_front_of_the_function() -> None:
    """In C builds asynctrace.create_task is CreateTask in front of the Python helper, with its
    name, docs and signature.
    """
    import inspect  # noqa: PLC0415

    from asynctrace import _create_task  # noqa: PLC0415

    helper = asynctrace.create_task
    assert type(helper).__name__ == "CreateTask"
    assert helper.__name__ == "create_task"
    assert helper.__doc__ == helper.slow.__doc__
    assert inspect.signature(helper) == inspect.signature(helper.slow)
    assert helper is _create_task.create_task

    async def leaf() -> str:
        await asyncio.sleep(0)
        meta = asynctrace.task_metadata()
        return meta.operation_name if meta else "none"

    async def main() -> list[str]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        tasks = [helper(leaf(), operation_name="fast")]
        tasks.append(helper(leaf(), operation_name="slow", name="named"))  # the function's
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == ["fast", "slow"]


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="the C factory is not in use")
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_helper_common_call_runs_no_python_on_asyncio_and_uvloop(loop_name: str) -> None:
    """The helper's common call reaches the C factory without the Python function: on asyncio's
    loop at once, on uvloop's once the function met that loop (it adds uvloop's create_task to
    CreateTask's readers). The tasks carry their metadata either way.
    """
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Any = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.endswith("_create_task.py"):
            calls.append(frame.f_code.co_name)

    async def leaf() -> str | None:
        meta = asynctrace.task_metadata()
        return meta.operation_name if meta else None

    async def main() -> list[str | None]:
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
        first = await asynctrace.create_task(leaf(), operation_name="first")
        sys.setprofile(profile)
        try:
            tasks = [asynctrace.create_task(leaf(), operation_name=f"op{i}") for i in range(5)]
        finally:
            sys.setprofile(None)
        return [first, *await asyncio.gather(*tasks)]

    loop = new_loop()
    try:
        got = loop.run_until_complete(main())
    finally:
        asynctrace.uninstall()
        loop.close()
    assert got == ["first", "op0", "op1", "op2", "op3", "op4"]
    if loop_name == "asyncio" and sys.version_info[:2] == (3, 13):
        assert "create_task" in calls  # 3.13's create_task is more than a factory call
    else:
        assert calls == []
