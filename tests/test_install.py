"""install()/uninstall(): where the factory goes, chaining, idempotence, exact restore."""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace.testing import TaskCapture, capture_tasks, record_of
from tests.conftest import PY312, PY314

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop has no wheel for this Python
    uvloop = None


async def _meta_of_new_task() -> asynctrace.TaskMetadata | None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    return asynctrace.task_metadata(task)


def test_install_inside_running_loop() -> None:
    """Inside a running loop, install() instruments that loop now, and only it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        installation = asynctrace.install()
        assert installation.loop is loop
        assert installation.active
        assert await _meta_of_new_task() is not None
        other = asyncio.new_event_loop()
        try:
            assert other.get_task_factory() is None
        finally:
            other.close()

    asyncio.run(main())


def test_process_wide_covers_run_runner_and_new_loop() -> None:
    """Before any loop, install() instruments asyncio.run, asyncio.Runner and new_event_loop."""
    installation = asynctrace.install()
    assert installation.loop is None
    assert asyncio.run(_meta_of_new_task()) is not None
    with asyncio.Runner() as runner:
        assert runner.run(_meta_of_new_task()) is not None
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(_meta_of_new_task()) is not None
    finally:
        loop.close()
    assert asynctrace.uninstall() is True
    assert asyncio.run(_meta_of_new_task()) is None


def test_idempotent_never_wraps_twice() -> None:
    """A second install() returns the same installation; the factory is not wrapped again."""
    first = asynctrace.install()
    assert asynctrace.install() is first

    async def main() -> None:
        here = asynctrace.install()
        assert asynctrace.install() is here
        factory = asyncio.get_running_loop().get_task_factory()
        assert factory is not None
        assert factory.__wrapped__ is None  # type: ignore[attr-defined]

    asyncio.run(main())


def test_conflicting_options_are_refused_naming_what_differs() -> None:
    """Installing again with other options raises, naming only the options that differ."""
    first, second = CollectorRegistry(), CollectorRegistry()
    installation = asynctrace.install(id_generator=None, registry=first)
    with pytest.raises(ValueError, match="already installed with other options") as raised:
        asynctrace.install(id_generator=None, registry=second, max_operations=7)
    message = str(raised.value)
    assert "export.registry (" in message
    assert "export.max_operations (100 now, 7 asked for)" in message
    assert "id_generator" not in message  # the same on both sides: not named
    assert len(message) < 400, message
    # the same options again: the same installation, nothing wrapped twice
    assert asynctrace.install(id_generator=None, registry=first) is installation
    asynctrace.uninstall()
    asynctrace.install(registry=second)  # nothing installed any more: new options are fine


def test_bare_install_joins_the_options_in_force() -> None:
    """A bare install() where asynctrace is installed joins it, whatever its options."""
    registry = CollectorRegistry()

    async def main() -> object:
        asynctrace.install()  # a library making sure: joins, does not conflict
        await asynctrace.create_task(asyncio.sleep(0), operation_name="joined")
        return asynctrace.correlation_id()

    asynctrace.install(registry=registry, id_generator=lambda: "fixed-id", loop_monitor=False)
    assert asyncio.run(main()) == "fixed-id"
    assert registry.get_sample_value("asynctrace_tasks_created_total", {"operation": "joined"})


def test_bad_options() -> None:
    """Wrong option types and a generator returning a bad id are refused up front."""
    with pytest.raises(TypeError, match="Invalid id_generator: 5"):
        asynctrace.install(id_generator=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="returned an invalid id"):
        asynctrace.install(id_generator=lambda: "")
    with pytest.raises(TypeError, match="Invalid instrument: 'x'"):
        asynctrace.install(instruments=["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Invalid loop: 3"):
        asynctrace.install(loop=3)  # type: ignore[arg-type]
    assert asynctrace.uninstall() is False


class SubTask(asyncio.Task):  # type: ignore[type-arg]
    pass


def test_chains_a_task_subclass_factory() -> None:
    """A factory installed before still builds the tasks; uninstall restores it exactly."""

    def sub_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> SubTask:
        return SubTask(coro, loop=loop, **kw)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(sub_factory)
        installation = asynctrace.install()
        task = asynctrace.create_task(asyncio.sleep(0), operation_name="sub", name="s")
        assert type(task) is SubTask
        assert task.get_name() == "s"
        assert asynctrace.task_metadata(task) is not None
        await task
        installation.uninstall()
        assert loop.get_task_factory() is sub_factory
        installation.uninstall()  # twice is harmless
        assert loop.get_task_factory() is sub_factory

    asyncio.run(main())


@pytest.mark.skipif(not PY314, reason="3.14 forwards extra keywords to the factory it chains")
def test_chained_factory_gets_its_own_keywords_314() -> None:
    """On 3.14 keywords asynctrace does not know go on to the chained factory."""
    got: dict[str, Any] = {}

    def framework_factory(
        loop: asyncio.AbstractEventLoop, coro: Any, *, tenant: str = "-", **kw: Any
    ) -> asyncio.Task[Any]:
        got.setdefault("tenant", tenant)
        return asyncio.Task(coro, loop=loop, **kw)

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(framework_factory)
        asynctrace.install()
        t = asyncio.create_task(asyncio.sleep(0), tenant="acme", operation_name="op")  # type: ignore[call-arg]
        await t
        meta = asynctrace.task_metadata(t)
        assert meta is not None
        assert meta.operation_name == "op"
        assert got == {"tenant": "acme"}

    asyncio.run(main())


def test_uninstall_refuses_to_remove_someone_elses_factory() -> None:
    """If another factory replaced asynctrace's, uninstall says so and leaves it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        installation = asynctrace.install()

        def theirs(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(theirs)
        with pytest.raises(RuntimeError, match="task factory was replaced"):
            installation.uninstall()
        assert loop.get_task_factory() is theirs
        loop.set_task_factory(None)

    asyncio.run(main())


def test_process_uninstall_restores_policy_and_loops() -> None:
    """Uninstalling the process-wide installation restores the policy and the loops' factory."""
    get_policy = getattr(asyncio.events, "_get_event_loop_policy", asyncio.get_event_loop_policy)
    before = get_policy()
    asynctrace.install()
    assert get_policy() is not before
    loop = asyncio.new_event_loop()
    try:
        assert loop.get_task_factory() is not None
        asynctrace.uninstall()
        assert get_policy() is before
        assert loop.get_task_factory() is None
    finally:
        loop.close()


def test_loop_factory_wrapper() -> None:
    """Runners given a loop_factory bypass the policy; loop_factory() instruments them."""
    with pytest.raises(RuntimeError, match="needs a process-wide"):
        asynctrace.loop_factory()()
    asynctrace.install()
    with asyncio.Runner(loop_factory=asynctrace.loop_factory(asyncio.SelectorEventLoop)) as r:
        assert r.run(_meta_of_new_task()) is not None
    with pytest.raises(TypeError, match="Invalid factory: 3"):
        asynctrace.loop_factory(3)  # type: ignore[arg-type]


@pytest.mark.skipif(uvloop is None, reason="uvloop has no wheel for this Python")
def test_uvloop_loops() -> None:
    """uvloop: its policy wrapped by a process-wide install, or install() inside its loop."""
    assert uvloop is not None

    async def main() -> tuple[Any, ...]:
        asynctrace.install()
        helper = asynctrace.create_task(asyncio.sleep(0), operation_name="uv", name="uv-task")
        await helper
        return asynctrace.task_metadata(helper), helper.get_name()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        meta, name = runner.run(main())
    assert meta is not None
    assert meta.operation_name == "uv"
    assert name == "uv-task"
    asynctrace.uninstall()

    asynctrace.install()
    with asyncio.Runner(loop_factory=asynctrace.loop_factory(uvloop.new_event_loop)) as runner:
        assert runner.run(_meta_of_new_task()) is not None


@pytest.mark.skipif(uvloop is None, reason="uvloop has no wheel for this Python")
def test_uvloop_policy_is_wrapped() -> None:
    """A process-wide install over uvloop's policy instruments the loops that policy makes."""
    assert uvloop is not None
    events: Any = asyncio.events
    get_policy = getattr(events, "_get_event_loop_policy", asyncio.get_event_loop_policy)
    set_policy = getattr(events, "_set_event_loop_policy", asyncio.set_event_loop_policy)
    before = get_policy()
    with warnings.catch_warnings():  # 3.14 deprecates policies; uvloop's still subclasses one
        warnings.simplefilter("ignore", DeprecationWarning)
        uv_policy = uvloop.EventLoopPolicy()
    set_policy(uv_policy)  # what uvloop.install() does
    try:
        asynctrace.install()
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, uvloop.Loop)
            assert loop.run_until_complete(_meta_of_new_task()) is not None
        finally:
            loop.close()
        asynctrace.uninstall()
        assert isinstance(get_policy(), uvloop.EventLoopPolicy)  # restored exactly
    finally:
        set_policy(before)


def _uncovered_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "had no asynctrace factory" in r.getMessage()]


@pytest.mark.skipif(uvloop is None, reason="uvloop has no wheel for this Python")
def test_uvloop_run_after_a_process_wide_install_is_covered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop.run() bypasses the policy: the first asynctrace call in it instruments it.

    The running task is adopted, later tasks carry metadata, and a warning says once what
    happened and what to do instead.
    """
    assert uvloop is not None

    async def main() -> tuple[Any, Any, Any]:
        before = asynctrace.task_metadata()  # nothing yet: the loop bypassed the policy
        task = asynctrace.create_task(asyncio.sleep(0), operation_name="uv")
        await task
        plain = asyncio.ensure_future(asyncio.sleep(0))  # after the first call: covered too
        await plain
        return before, asynctrace.task_metadata(task), asynctrace.task_metadata(plain)

    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    with caplog.at_level(logging.WARNING, logger="asynctrace"):
        for _ in range(2):
            before, meta, plain = uvloop.run(main())
            assert before is None
            assert meta is not None
            assert meta.operation_name == "uv"
            assert plain is not None
            assert plain.correlation_id == meta.correlation_id  # both from the adopted main
    (warning,) = _uncovered_warnings(caplog)  # once, not once per loop
    assert "made without the event loop policy" in warning


@pytest.mark.skipif(uvloop is None, reason="uvloop has no wheel for this Python")
def test_uvloop_install_after_a_process_wide_install_is_covered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop.install() replaces asynctrace's policy: noticed at the first call, then covered."""
    assert uvloop is not None
    events: Any = asyncio.events
    get_policy = getattr(events, "_get_event_loop_policy", asyncio.get_event_loop_policy)
    set_policy = getattr(events, "_set_event_loop_policy", asyncio.set_event_loop_policy)
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    ours = get_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        uv_policy = uvloop.EventLoopPolicy()
    set_policy(uv_policy)  # what uvloop.install() does

    async def main() -> Any:
        with asynctrace.correlation("req-uv"):
            return asynctrace.task_metadata(asyncio.ensure_future(asyncio.sleep(0)))

    try:
        with caplog.at_level(logging.WARNING, logger="asynctrace"):
            meta = asyncio.run(main())
    finally:
        set_policy(ours)  # so that uninstall finds its own policy again
    assert meta is not None
    assert meta.correlation_id == "req-uv"
    (warning,) = _uncovered_warnings(caplog)
    assert "policy was replaced" in warning


class Boom(asynctrace.Instrument):
    """An instrument whose task_done hook raises."""

    def __init__(self) -> None:
        self.calls = 0

    def task_done(self, task: asyncio.Task[Any], record: asynctrace.TaskRecord) -> None:  # noqa: ARG002
        self.calls += 1
        raise RuntimeError("instrument bug")


def test_raising_instrument_costs_one_call_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook that raises never changes a task's result, and is still called for later tasks.

    Each failure costs that one call: counted every time, logged once (then rate limited),
    and the next task is recorded normally by every instrument.
    """
    boom = Boom()
    capture = TaskCapture()

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def main() -> list[int]:
        asynctrace.install(instruments=[boom, capture])
        return await asyncio.gather(*(work(i) for i in range(10)))

    with caplog.at_level(logging.ERROR, logger="asynctrace"):
        assert asyncio.run(main()) == list(range(10))
    # called for every task (the 10, and asyncio.run's own shutdown tasks), not disabled
    assert boom.calls >= 10
    assert boom.calls == len(capture.done)  # the healthy instrument saw the same tasks
    assert asynctrace.telemetry_errors() == {"instrument Boom": boom.calls}
    assert sum("instrument Boom failed" in r.getMessage() for r in caplog.records) == 1


def test_only_overridden_hooks_are_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instrument overriding only task_done is not called on creation (zero-cost hooks)."""
    inherited_calls: list[str] = []

    class DoneOnly(asynctrace.Instrument):
        def __init__(self) -> None:
            self.done = 0

        def task_done(self, task: asyncio.Task[Any], record: asynctrace.TaskRecord) -> None:  # noqa: ARG002
            self.done += 1

    done_only = DoneOnly()

    async def main() -> None:
        asynctrace.install(instruments=[done_only], metrics=False)
        # Were the hooks DoneOnly inherits called per task, these would record it.
        for hook in ("task_context", "task_created"):
            monkeypatch.setattr(
                asynctrace.Instrument, hook, lambda *_, _h=hook: inherited_calls.append(_h)
            )
        await asyncio.gather(*(asyncio.sleep(0) for _ in range(5)))

    asyncio.run(main())
    assert done_only.done >= 5
    assert inherited_calls == []


def test_capture_records_outcomes() -> None:
    """Records carry outcome, exception and duration; eager-finished tasks are recorded too."""

    async def ok() -> int:
        return 1

    async def bad() -> None:
        raise KeyError("k")

    async def main() -> None:
        with capture_tasks() as captured:
            t_ok = asynctrace.create_task(ok(), operation_name="ok", name="ok")
            t_bad = asyncio.create_task(bad(), name="bad")
            t_cancel = asyncio.create_task(asyncio.sleep(5), name="cancel")
            await asyncio.sleep(0)
            running = record_of(t_cancel)
            assert running is not None
            assert running.outcome is None
            t_cancel.cancel()
            await asyncio.wait([t_ok, t_bad, t_cancel])
            await asyncio.sleep(0)
            outcomes = {name: r.outcome for name, r in captured.done}
            assert outcomes == {"ok": "finished", "bad": "exception", "cancel": "cancelled"}
            assert record_of(t_ok) is None  # done: the record went to the instruments
            rec = dict(captured.done)["ok"]
            assert rec.duration_s is not None
            assert rec.duration_s >= 0
            assert rec.metadata.operation_name == "ok"
            assert isinstance(t_bad.exception(), KeyError)

    asyncio.run(main())


@pytest.mark.skipif(not PY312, reason="eager tasks exist from Python 3.12")
def test_eager_finished_task_is_recorded() -> None:
    """An eager task that completes in its first step is recorded without a done callback."""

    async def quick() -> int:
        return 5

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        with capture_tasks() as captured:
            task = asynctrace.create_task(quick(), name="quick")
            assert task.done()
            assert [(n, r.outcome) for n, r in captured.done] == [("quick", "finished")]
        asyncio.get_running_loop().set_task_factory(None)

    asyncio.run(main())


class Closing(asynctrace.Instrument):
    """Counts close() calls."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("how", ["shutdown", "uninstall"])
def test_user_instruments_are_closed_once(how: str) -> None:
    """shutdown(), or removing the last installation, closes each user instrument once."""
    instrument = Closing()
    asynctrace.install(instruments=[instrument], metrics=False)
    assert asyncio.run(_meta_of_new_task()) is not None
    if how == "shutdown":
        asynctrace.shutdown()
        asynctrace.shutdown()  # twice is harmless
    else:
        asynctrace.uninstall()
    assert instrument.closed == 1
