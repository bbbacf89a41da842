"""What asynctrace must not change: each test runs the same code bare and instrumented."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import asynctrace
from tests.conftest import PY312, PY313, PY314


def run_both(main: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[Any, Any]:
    """Run `main` on a bare loop, then on an instrumented one; return both results."""
    bare = asyncio.run(main())
    asynctrace.install()
    try:
        instrumented = asyncio.run(main())
    finally:
        asynctrace.uninstall()
    return bare, instrumented


def test_results_and_gather_order() -> None:
    """Results are unchanged and gather keeps argument order whatever the finishing order."""

    async def work(i: int) -> int:
        await asyncio.sleep((5 - i) / 1000)
        return i * i

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(5)))

    bare, inst = run_both(main)
    assert bare == inst == [0, 1, 4, 9, 16]


def test_same_exception_object() -> None:
    """Awaiting a failed task raises the very exception object the coroutine raised."""
    raised: list[BaseException] = []

    async def fail() -> None:
        exc = ValueError("boom")
        raised.append(exc)
        raise exc

    async def main() -> bool:
        task = asyncio.create_task(fail())
        try:
            await task
        except ValueError as exc:
            return exc is raised[-1] and task.exception() is exc
        return False

    assert run_both(main) == (True, True)


def test_cancellation_and_counts() -> None:
    """Cancellation, cancel messages and cancelling()/uncancel() counts are asyncio's."""

    async def sleeper() -> None:
        await asyncio.sleep(10)

    async def main() -> tuple[Any, ...]:
        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0)
        task.cancel("first")
        task.cancel("second")
        counts = task.cancelling()
        try:
            await task
        except asyncio.CancelledError as exc:
            message = exc.args
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            uncancelled = me.uncancel()
        return counts, message, task.cancelled(), uncancelled, me.cancelling()

    bare, inst = run_both(main)
    assert bare == inst
    assert bare[2] is True


def test_taskgroup_error_aggregation() -> None:
    """TaskGroup gathers the same errors and cancels the same siblings."""

    async def fail(i: int) -> None:
        await asyncio.sleep(0)
        raise ValueError(i)

    async def slow() -> None:
        await asyncio.sleep(10)

    async def main() -> tuple[Any, ...]:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(fail(1))
                tg.create_task(fail(2))
                s = tg.create_task(slow())
        except ExceptionGroup as eg:
            return sorted(e.args[0] for e in eg.exceptions), s.cancelled()
        return ()

    bare, inst = run_both(main)
    assert bare == inst == ([1, 2], True)


def test_contextvar_isolation_between_siblings() -> None:
    """A contextvar set in one task is not seen by its sibling or its parent."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def setter() -> str:
        var.set("mine")
        await asyncio.sleep(0)
        return var.get()

    async def reader() -> str:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return var.get()

    async def main() -> tuple[str, ...]:
        a, b = await asyncio.gather(setter(), reader())
        return a, b, var.get()

    assert run_both(main) == (("mine", "unset", "unset"), ("mine", "unset", "unset"))


def test_current_task_and_coroutine_not_wrapped() -> None:
    """current_task() is the task itself and get_coro() is the coroutine the user passed."""

    async def who() -> asyncio.Task[Any] | None:
        return asyncio.current_task()

    async def main() -> bool:
        coro = who()
        task = asyncio.create_task(coro)
        return (await task) is task and task.get_coro() is coro

    assert run_both(main) == (True, True)


@pytest.mark.xfail(
    PY313,
    reason="CPython 3.13 renames unnamed tasks of any task factory 'None' (cpython#130033)",
    strict=True,
)
def test_names_from_the_start() -> None:
    """A name= given is the task's name; unnamed tasks keep asyncio's Task-N naming."""

    async def own_name() -> str:
        task = asyncio.current_task()
        assert task is not None
        return task.get_name()

    async def main() -> tuple[str, ...]:
        named = await asyncio.create_task(own_name(), name="worker")
        helper = await asynctrace.create_task(own_name(), name="helper")
        plain = asyncio.create_task(own_name())
        return named, helper, (await plain).startswith("Task-")

    assert run_both(main) == (("worker", "helper", True),) * 2


@pytest.mark.skipif(not PY312, reason="eager tasks exist from Python 3.12")
def test_eager_task_factory_is_chained() -> None:
    """Under asyncio.eager_task_factory the first step runs synchronously and sees the id."""
    seen: list[Any] = []

    async def first_step() -> str:
        task = asyncio.current_task()
        assert task is not None
        seen.append((asynctrace.correlation_id(), asynctrace.task_metadata(), task.get_name()))
        await asyncio.sleep(0)
        return "done"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        asynctrace.install()
        assert loop.get_task_factory().__wrapped__ is asyncio.eager_task_factory  # type: ignore[union-attr]
        task = asynctrace.create_task(
            first_step(), correlation_id="eager-1", operation_name="op", name="eager-name"
        )
        assert seen == [("eager-1", asynctrace.TaskMetadata("op", "eager-1", None), "eager-name")]
        assert await task == "done"
        asynctrace.uninstall()
        assert loop.get_task_factory() is asyncio.eager_task_factory

    asyncio.run(main())


@pytest.mark.skipif(not PY314, reason="eager_start= on create_task is new in 3.14")
def test_eager_start_keyword_314() -> None:
    """On 3.14 create_task(eager_start=True) runs the first step synchronously, with the id."""
    seen: list[Any] = []

    async def first_step() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append((asynctrace.correlation_id(), task.get_name()))

    async def main() -> None:
        asynctrace.install()
        t = asyncio.create_task(  # type: ignore[call-arg]
            first_step(), eager_start=True, correlation_id="e-314", name="eager"
        )
        assert t.done()
        assert seen == [("e-314", "eager")]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(first_step(), eager_start=True, name="tg-eager")  # type: ignore[call-arg]
            assert seen[-1][1] == "tg-eager"

    asyncio.run(main())


@pytest.mark.skipif(not PY312, reason="eager tasks exist from Python 3.12")
def test_helper_eager_start_everywhere() -> None:
    """The helper's eager_start=True works through the factory on 3.12+ (TaskGroup too)."""
    seen: list[str | None] = []

    async def first_step() -> None:
        seen.append(asynctrace.correlation_id())
        await asyncio.sleep(0)

    async def main() -> None:
        asynctrace.install()
        task = asynctrace.create_task(first_step(), eager_start=True, correlation_id="h1")
        assert seen == ["h1"]
        async with asyncio.TaskGroup() as tg:
            asynctrace.create_task(
                first_step(), task_group=tg, eager_start=True, correlation_id="h2"
            )
            assert seen == ["h1", "h2"]
        await task

    asyncio.run(main())


def test_never_retrieved_exception_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    """A fire-and-forget task's exception is still logged as never retrieved by asyncio."""

    async def fail() -> None:
        raise RuntimeError("lost")

    async def main() -> None:
        asyncio.create_task(fail())
        await asyncio.sleep(0.01)

    def count() -> int:
        gc.collect()
        return sum("never retrieved" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()  # earlier tests' abandoned tasks must not be counted here
        caplog.clear()
        asyncio.run(main())
        bare = count()
        caplog.clear()
        asynctrace.install()
        asyncio.run(main())
        asynctrace.uninstall()
        instrumented = count()
    assert bare == instrumented == 1


@pytest.mark.skipif(not PY314, reason="asyncio.capture_call_graph is new in 3.14")
def test_call_graph_is_clean_314() -> None:
    """capture_call_graph shows the user's coroutines with no asynctrace frames."""

    async def leaf(ev: asyncio.Event) -> None:
        await ev.wait()

    async def main() -> str:
        ev = asyncio.Event()
        task = asyncio.create_task(leaf(ev), name="leaf")  # type: ignore[call-arg]
        await asyncio.sleep(0)
        graph = asyncio.capture_call_graph(task)  # type: ignore[attr-defined]
        text = asyncio.format_call_graph(task)  # type: ignore[attr-defined]
        ev.set()
        await task
        assert graph is not None
        return text.replace(hex(id(task)), "").split("\n")[0] + str(len(graph.call_stack))

    bare, inst = run_both(main)
    assert bare == inst
    assert "asynctrace" not in inst


def test_loops_in_four_threads() -> None:
    """Four instrumented loops in four threads create tasks at once; ids never cross."""
    import threading  # noqa: PLC0415

    asynctrace.install()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    async def leaf(i: int, j: int) -> tuple[str | None, int]:
        await asyncio.sleep(0)
        return asynctrace.correlation_id(), i * 1000 + j

    async def thread_main(i: int) -> None:
        barrier.wait()
        for round_ in range(20):
            with asynctrace.correlation(f"t{i}-r{round_}"):
                results = await asyncio.gather(*(leaf(i, j) for j in range(50)))
            assert results == [(f"t{i}-r{round_}", i * 1000 + j) for j in range(50)]
            tasks = [asynctrace.create_task(leaf(i, j), operation_name=f"op{i}") for j in range(50)]
            for t in tasks:
                meta = asynctrace.task_metadata(t)
                assert meta is not None
                assert meta.operation_name == f"op{i}"
            await asyncio.gather(*tasks)

    def target(i: int) -> None:
        try:
            asyncio.run(thread_main(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
