"""Install and uninstall from any thread while other threads run loops: no race shows.

The races (found on a free-threaded build, and there with the GIL too: they are
check-then-act) each get a deterministic test that forces the interleaving with events,
then a bounded churn test runs them all at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import warnings
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _install

TOGGLES = 30
_events: Any = asyncio.events
get_policy = getattr(_events, "_get_event_loop_policy", asyncio.get_event_loop_policy)
set_policy = getattr(_events, "_set_event_loop_policy", asyncio.set_event_loop_policy)


def test_a_loop_made_during_an_uninstall_is_left_alone() -> None:
    """The policy wrapper checks its installation is still current before instrumenting."""
    with warnings.catch_warnings():  # 3.14 deprecates the policy classes
        warnings.simplefilter("ignore", DeprecationWarning)
        base: Any = asyncio.DefaultEventLoopPolicy

    entered, release = threading.Event(), threading.Event()

    class SlowPolicy(base):  # type: ignore[misc]
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            entered.set()
            release.wait(5)
            return super().new_event_loop()

    before = get_policy()
    set_policy(SlowPolicy())
    made: list[asyncio.AbstractEventLoop] = []
    try:
        asynctrace.install(metrics=False)
        maker = threading.Thread(target=lambda: made.append(asyncio.new_event_loop()))
        maker.start()
        assert entered.wait(5)  # the loop is being made, through asynctrace's policy
        assert asynctrace.uninstall() is True  # meanwhile, uninstalled
        release.set()
        maker.join(5)
        (loop,) = made
        try:
            assert loop.get_task_factory() is None  # not instrumented after the uninstall
            assert asynctrace.uninstall(loop) is False
        finally:
            loop.close()
    finally:
        release.set()
        set_policy(before)


def test_a_loop_switches_factories_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """uninstall() from another thread never changes a running loop's factory itself."""
    monkeypatch.setattr(_install, "SWITCH_WAIT_S", 0.2)
    loop = asyncio.new_event_loop()
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:  # the loop is busy: it cannot run the switch yet
        busy.set()
        release.wait(5)

    thread = threading.Thread(target=loop.run_forever)
    asynctrace.install(loop=loop, metrics=False)
    ours = loop.get_task_factory()
    thread.start()
    try:
        loop.call_soon_threadsafe(hold)
        assert busy.wait(5)
        assert asynctrace.uninstall(loop) is True  # returns after the wait: the loop is busy
        assert loop.get_task_factory() is ours  # not changed from this thread
        release.set()
        deadline = time.monotonic() + 5
        while loop.get_task_factory() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.get_task_factory() is None  # the loop switched, on its own thread
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.parametrize("change", ["uninstall", "install"])
def test_create_task_keeps_its_keywords_when_another_thread_changes_the_loop_midway(
    change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the helper's check for a factory and its create_task, another thread
    uninstalls (or installs): the task still gets its id and operation.

    uninstall: the loop switches on its own thread, so the factory is still there. install:
    the helper fills its slot either way, so the new factory gets the keywords (it used to
    make the task without its operation).
    """
    from asynctrace import _create_task  # noqa: PLC0415

    monkeypatch.setattr(_install, "SWITCH_WAIT_S", 0.2, raising=False)
    real = _create_task.is_asynctrace_factory
    loops: list[asyncio.AbstractEventLoop] = []

    def changes_after_the_check(factory: object) -> bool:
        found = real(factory)
        if change == "uninstall":
            other = threading.Thread(target=asynctrace.uninstall, args=(loops[0],))
        else:
            other = threading.Thread(
                target=lambda: asynctrace.install(loop=loops[0], metrics=False)
            )
        other.start()
        other.join(5)
        return found

    async def child() -> str | None:
        return asynctrace.correlation_id()

    async def main() -> tuple[str | None, Any]:
        loops.append(asyncio.get_running_loop())
        if change == "uninstall":
            asynctrace.install(metrics=False)
        monkeypatch.setattr(_create_task, "is_asynctrace_factory", changes_after_the_check)
        task = asynctrace.create_task(child(), correlation_id="given", operation_name="op")
        monkeypatch.setattr(_create_task, "is_asynctrace_factory", real)
        return await task, asynctrace.task_metadata(task)

    correlation_id, metadata = asyncio.run(main())
    assert correlation_id == "given"  # the task's own id, not its creator's
    assert metadata is not None
    assert metadata.operation_name == "op"


def test_spans_of_tasks_running_at_uninstall_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A traced task still running at uninstall: never exported, and counted as dropped."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> None:
        release = asyncio.Event()

        async def wait() -> None:
            await release.wait()

        asynctrace.install(tracer_provider=provider, metrics=False)
        tasks = [asynctrace.create_task(wait(), operation_name="outlives") for _ in range(7)]
        await asyncio.sleep(0)
        with caplog.at_level(logging.WARNING, logger="asynctrace"):
            asynctrace.uninstall()
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [s for s in exporter.get_finished_spans() if s.name == "outlives"] == []
    (message,) = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert message.startswith("asynctrace: 7 traced task(s) were still running")


def test_churn_install_uninstall_while_loops_run() -> None:
    """3 loops creating tasks, a thread making loops through the policy (asyncio.run over and
    over), and this thread toggling per-loop and process-wide installs.

    No exception in any loop, no task with another task's id, every uninstall's return
    value and every installation's ``active`` truthful, and the policy restored at the end.
    """
    stop = threading.Event()
    problems: list[str] = []
    counts = [0, 0, 0]
    loops: list[asyncio.AbstractEventLoop] = []
    ready = threading.Barrier(4)

    def run_loop(index: int) -> None:
        async def child(expected: str) -> None:
            if asynctrace.correlation_id() != expected:
                problems.append(f"id {asynctrace.correlation_id()!r}, expected {expected!r}")

        async def main() -> None:
            loops.append(asyncio.get_running_loop())
            ready.wait(5)
            n = 0
            while not stop.is_set():
                n += 1
                expected = f"l{index}-{n}"
                try:
                    await asynctrace.create_task(child(expected), correlation_id=expected)
                    await asyncio.create_task(asyncio.sleep(0))
                except Exception as exc:
                    problems.append(f"{type(exc).__name__}: {exc}")
                counts[index] += 1

        asyncio.run(main())

    runs = [0]

    def policy_loops() -> None:  # each asyncio.run: a loop made through the policy
        async def short() -> None:
            await asyncio.gather(asyncio.sleep(0), asynctrace.create_task(asyncio.sleep(0)))

        while not stop.is_set():
            try:
                asyncio.run(short())
            except Exception as exc:
                problems.append(f"asyncio.run: {type(exc).__name__}: {exc}")
            runs[0] += 1

    policy_before = get_policy()
    threads = [threading.Thread(target=run_loop, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=policy_loops))
    for thread in threads:
        thread.start()
    ready.wait(5)
    deadline = time.monotonic() + 60  # a bound, not a pace: a loaded machine is slower
    toggles = 0
    try:
        while toggles < TOGGLES and time.monotonic() < deadline:
            toggles += 1
            loop = loops[toggles % 3]
            installation = asynctrace.install(
                loop=loop, registry=CollectorRegistry(), metrics=False
            )
            if not installation.active:
                problems.append("a fresh installation is not active")
            if asynctrace.uninstall(loop) is not True:
                problems.append("uninstall() of an installed loop returned False")
            if installation.active:
                problems.append("an uninstalled installation is still active")
            if asynctrace.uninstall(loop) is not False:
                problems.append("a second uninstall() returned True")
            process = asynctrace.install(registry=CollectorRegistry(), metrics=False)
            if not process.active:
                problems.append("the process-wide installation is not active")
            if asynctrace.uninstall() is not True:
                problems.append("uninstall() of the process-wide installation returned False")
            if process.active:
                problems.append("an uninstalled process-wide installation is still active")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert problems == []
    assert toggles == TOGGLES, f"{toggles} of {TOGGLES} toggles in 60 s"
    assert all(n > 0 for n in counts), counts  # every loop kept working throughout
    assert runs[0] > 0
    assert get_policy() is policy_before


def test_churn_every_traced_span_is_exported_or_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Traced per-loop installs toggled from another thread while 3 loops create tasks:
    every traced task's span is exported, or counted as dropped when its installation ended.
    """
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stop = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    traced = [0, 0, 0]
    ready = threading.Barrier(4)

    def run_loop(index: int) -> None:
        async def child() -> None:
            if trace.get_current_span().get_span_context().is_valid:
                traced[index] += 1  # created under a traced installation

        async def main() -> None:
            loops.append(asyncio.get_running_loop())
            ready.wait(5)
            while not stop.is_set():
                await asynctrace.create_task(child(), operation_name="child")

        asyncio.run(main())

    threads = [threading.Thread(target=run_loop, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    ready.wait(5)
    caplog.set_level(logging.WARNING, logger="asynctrace")
    try:
        for toggle in range(60):
            loop = loops[toggle % 3]
            asynctrace.install(loop=loop, tracer_provider=provider, metrics=False)
            time.sleep(0.005)  # the loop works under it a little
            assert asynctrace.uninstall(loop) is True
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    exported = sum(s.name == "child" for s in exporter.get_finished_spans())
    counted = sum(
        int(re.match(r"asynctrace: (\d+) traced task", r.getMessage())[1])  # type: ignore[index]
        for r in caplog.records
        if "were still running when asynctrace was uninstalled" in r.getMessage()
    )
    # a task that ends just as its installation closes may be both; none may be neither
    assert exported <= sum(traced) <= exported + counted, (exported, sum(traced), counted)
    assert exported > 100
