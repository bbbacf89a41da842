"""Metadata and correlation ids: where they come from, where they can be read, bad input."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import itertools
from typing import Any

import pytest

import asynctrace
from asynctrace import TaskMetadata
from tests.conftest import PY314


async def _report() -> tuple[str | None, TaskMetadata | None]:
    await asyncio.sleep(0)
    return asynctrace.correlation_id(), asynctrace.task_metadata()


def test_metadata_is_frozen_and_slotted() -> None:
    """TaskMetadata is an immutable, slotted record with the three documented fields."""
    m = TaskMetadata("normalize", "req-7", 2)
    assert [f.name for f in dataclasses.fields(m)] == [
        "operation_name",
        "correlation_id",
        "priority_hint",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.operation_name = "x"  # type: ignore[misc]
    assert not hasattr(m, "__dict__")


def test_helper_attaches_metadata_to_task_and_context() -> None:
    """asynctrace.create_task puts metadata on the task object and in the task's contextvars."""

    async def main() -> None:
        asynctrace.install()
        task = asynctrace.create_task(
            _report(), operation_name="normalize", correlation_id="req-7", priority_hint=2
        )
        cid, inside = await task
        assert cid == "req-7"
        assert inside == TaskMetadata("normalize", "req-7", 2)
        assert asynctrace.task_metadata(task) == inside

    asyncio.run(main())


def test_helper_sees_a_create_task_replaced_on_the_loops_type() -> None:
    """The helper's fast path skips create_task only while the loop type's create_task is the
    one it checked: replaced later, the replacement is called (and the metadata still set).
    """
    calls: list[str] = []

    class Loop(asyncio.SelectorEventLoop):
        pass

    async def main() -> list[TaskMetadata | None]:
        asynctrace.install()
        got = [asynctrace.task_metadata(asynctrace.create_task(_report(), operation_name="a"))]
        plain = Loop.create_task

        def create_task(self: Loop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            calls.append("replaced")
            return plain(self, coro, **kwargs)

        Loop.create_task = create_task  # type: ignore[method-assign]
        try:
            task = asynctrace.create_task(_report(), operation_name="b")
            got.append(asynctrace.task_metadata(task))
            await task
        finally:
            del Loop.create_task  # type: ignore[misc]
        got.append(asynctrace.task_metadata(asynctrace.create_task(_report(), operation_name="c")))
        await asyncio.sleep(0.01)
        return got

    loop = Loop()
    try:
        got = loop.run_until_complete(main())
    finally:
        asynctrace.uninstall()
        loop.close()
    assert calls == ["replaced"]
    assert [m.operation_name if m else None for m in got] == ["a", "b", "c"]


@pytest.mark.skipif(not PY314, reason="3.14 forwards create_task keywords to the factory")
def test_plain_create_task_keywords_on_314() -> None:
    """On 3.14 asyncio.create_task, loop.create_task and TaskGroup.create_task carry metadata."""

    async def main() -> None:
        asynctrace.install()
        loop = asyncio.get_running_loop()
        t1 = asyncio.create_task(_report(), operation_name="a", correlation_id="c1")  # type: ignore[call-arg]
        t2 = loop.create_task(_report(), operation_name="b", priority_hint=5)  # type: ignore[call-arg]
        async with asyncio.TaskGroup() as tg:
            t3 = tg.create_task(_report(), operation_name="c", correlation_id="c3", name="n3")  # type: ignore[call-arg]
        assert (await t1)[1] == TaskMetadata("a", "c1", None)
        m2 = asynctrace.task_metadata(t2)
        assert m2 is not None
        assert (m2.operation_name, m2.priority_hint) == ("b", 5)
        assert m2.correlation_id is not None  # main predates install: a fresh id
        assert t3.result()[1] == TaskMetadata("c", "c3", None)
        assert t3.get_name() == "n3"
        await t2

    asyncio.run(main())


def test_correlation_block_sets_and_restores() -> None:
    """`with correlation(...)` sets the id for the block and its tasks, then restores it."""

    async def main() -> None:
        asynctrace.install()
        before = asynctrace.correlation_id()
        with asynctrace.correlation("req-9") as value:
            assert value == "req-9"
            assert asynctrace.correlation_id() == "req-9"
            results = await asyncio.gather(_report(), _report())
            assert [cid for cid, _ in results] == ["req-9", "req-9"]
        assert asynctrace.correlation_id() == before
        with pytest.raises(KeyError), asynctrace.correlation("req-10"):
            raise KeyError
        assert asynctrace.correlation_id() == before

    asyncio.run(main())


def test_correlation_block_works_without_install() -> None:
    """The context manager is plain contextvars: tasks inherit it with or without the factory."""

    async def main() -> None:
        with asynctrace.correlation("plain"):
            assert (await asyncio.create_task(_report()))[0] == "plain"

    asyncio.run(main())


def test_explicit_id_is_inherited_by_children() -> None:
    """A task created with correlation_id= runs with it, and the tasks it creates inherit it."""

    async def parent() -> list[str | None]:
        kids = await asyncio.gather(_report(), asyncio.create_task(_report()))
        return [asynctrace.correlation_id(), *(cid for cid, _ in kids)]

    async def main() -> None:
        asynctrace.install()
        ids = await asynctrace.create_task(parent(), correlation_id="req-1")
        assert ids == ["req-1", "req-1", "req-1"]
        assert asynctrace.correlation_id() != "req-1"

    asyncio.run(main())


def test_fresh_id_where_none_is_set() -> None:
    """A task created where no id is set gets a fresh one; siblings from one parent share it."""
    counter = itertools.count()

    def gen() -> str:
        return f"gen-{next(counter)}"

    async def root() -> list[str | None]:
        return [cid for cid, _ in await asyncio.gather(_report(), _report())]

    async def main() -> None:
        asynctrace.install(id_generator=gen)
        ctx = contextvars.Context()  # no id set here
        a = await asyncio.get_running_loop().create_task(root(), context=ctx)
        b = await asyncio.get_running_loop().create_task(root(), context=contextvars.Context())
        assert a[0] == a[1]
        assert b[0] == b[1]
        assert a[0] != b[0]
        assert a[0] is not None
        assert a[0].startswith("gen-")

    asyncio.run(main())


def test_default_ids_are_random_hex() -> None:
    """The default generator makes 32-hex-digit ids, different each time."""
    ids = {asynctrace.random_correlation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_id_generation_can_be_turned_off() -> None:
    """id_generator=None: tasks created where no id is set have none."""

    async def main() -> None:
        asynctrace.install(id_generator=None)
        task = asyncio.get_running_loop().create_task(_report(), context=contextvars.Context())
        cid, meta = await task
        assert cid is None
        assert meta == TaskMetadata(None, None, None)

    asyncio.run(main())


def test_task_metadata_none_for_unseen_task() -> None:
    """task_metadata() is None for tasks created before install and outside any task."""

    async def main() -> None:
        early = asyncio.create_task(asyncio.sleep(0))
        asynctrace.install()
        assert asynctrace.task_metadata(early) is None
        await early

    asyncio.run(main())
    assert asynctrace.task_metadata() is None


def test_no_factory_fallback_sets_correlation_id() -> None:
    """Without an installed factory the helper still creates the task, with the id set."""

    async def main() -> None:
        task = asynctrace.create_task(_report(), correlation_id="fallback", name="fb")
        cid, meta = await task
        assert cid == "fallback"
        assert meta is None
        assert task.get_name() == "fb"
        async with asyncio.TaskGroup() as tg:
            t2 = asynctrace.create_task(_report(), task_group=tg, correlation_id="fb2")
        assert t2.result()[0] == "fb2"

    asyncio.run(main())


BAD_INPUTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"corelation_id": "x"}, TypeError, "'corelation_id' (did you mean 'correlation_id'?)"),
    ({"operation": "x"}, TypeError, "accepted: context, correlation_id, eager_start"),
    ({"correlation_id": 7}, TypeError, "Invalid correlation_id: 7; expected a str or None"),
    ({"correlation_id": ""}, ValueError, "Invalid correlation_id: ''; expected 1 to 128"),
    ({"correlation_id": "x" * 129}, ValueError, "expected 1 to 128 characters, got 129"),
    ({"correlation_id": "a\x00b"}, ValueError, "expected printable characters only"),
    ({"operation_name": "tab\there"}, ValueError, "Invalid operation_name: 'tab\\there'"),
    ({"priority_hint": "2"}, TypeError, "Invalid priority_hint: '2'; expected an int or None"),
    ({"priority_hint": True}, TypeError, "Invalid priority_hint: True"),
    ({"eager_start": "yes"}, TypeError, "Invalid eager_start: 'yes'"),
    ({"task_group": object()}, TypeError, "Invalid task_group: <object"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS)
@pytest.mark.parametrize("installed", [True, False])
def test_bad_input_is_rejected_cleanly(
    kwargs: dict[str, Any], error: type[Exception], message: str, installed: bool
) -> None:
    """Bad keywords raise a clear error, close the coroutine and leave the loop running."""

    async def main() -> None:
        if installed:
            asynctrace.install()
        survivor = asyncio.create_task(_report())
        coro = _report()
        with pytest.raises(error) as info:
            asynctrace.create_task(coro, **kwargs)
        assert message in str(info.value)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        assert len(asyncio.all_tasks()) == 2  # main and survivor: nothing half-made
        await survivor

    asyncio.run(main())


@pytest.mark.skipif(not PY314, reason="3.14 forwards create_task keywords to the factory")
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS[:9])
def test_bad_input_on_plain_create_task_314(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """On 3.14, plain create_task with a typo or a bad value fails the same way, cleanly."""

    async def main() -> None:
        asynctrace.install()
        coro = _report()
        with pytest.raises(error) as info:
            asyncio.create_task(coro, **kwargs)
        assert message.replace("asynctrace.create_task()", "create_task()") in str(info.value)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        async with asyncio.TaskGroup() as tg:
            coro2 = _report()
            with pytest.raises(error):
                tg.create_task(coro2, **kwargs)
            assert inspect.getcoroutinestate(coro2) == inspect.CORO_CLOSED
            tg.create_task(_report())

    asyncio.run(main())


def test_correlation_rejects_bad_values() -> None:
    """correlation() validates like the factory, naming the value."""
    with pytest.raises(TypeError, match="Invalid correlation_id: None"):
        asynctrace.correlation(None).__enter__()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 1 to 128"):
        asynctrace.correlation("").__enter__()


def test_task_metadata_validates_on_construction() -> None:
    """Building TaskMetadata by hand validates the same way."""
    with pytest.raises(TypeError, match="priority_hint"):
        TaskMetadata(priority_hint=1.5)  # type: ignore[arg-type]


def test_validate_metadata_checks_each_operation_name_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names used in turn are checked once each (the pure-Python factory's hot path)."""
    from asynctrace import _metadata  # noqa: PLC0415

    checked: list[tuple[str, object]] = []
    check_text = _metadata.check_text
    monkeypatch.setattr(_metadata, "_VALID_OPERATIONS", set())
    monkeypatch.setattr(
        _metadata,
        "check_text",
        lambda what, value: (checked.append((what, value)), check_text(what, value)),
    )
    for op in ["validate", "enrich", "store"] * 3:
        _metadata.validate_metadata(op, None, None)
    assert [v for what, v in checked if what == "operation_name"] == ["validate", "enrich", "store"]
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid operation_name"):
            _metadata.validate_metadata("", None, None)
    assert [v for what, v in checked if what == "operation_name"][-2:] == ["", ""]


# -- the context variables' places in a context's mapping ---------------------------------------


def _root_children(*variables: contextvars.ContextVar[Any]) -> list[str]:
    """The types under the first level of a context holding ``variables`` (CPython's HAMT)."""
    import gc  # noqa: PLC0415

    context = contextvars.Context()
    for i, variable in enumerate(variables):
        context.run(variable.set, i)
    (hamt,) = (r for r in gc.get_referents(context) if type(r).__name__ == "hamt")
    (root,) = (r for r in gc.get_referents(hamt) if type(r).__name__.startswith("hamt_"))
    return sorted(type(r).__name__ for r in gc.get_referents(root))


def test_first_level_slot_is_where_the_hamt_puts_a_variable() -> None:
    """Two variables in one slot share a node under the first level; in two, they do not."""
    from asynctrace._metadata import first_level_slot  # noqa: PLC0415

    first = contextvars.ContextVar("first")
    others = [contextvars.ContextVar(f"other{i}") for i in range(400)]
    same = next(v for v in others if first_level_slot(v) == first_level_slot(first))
    apart = next(v for v in others if first_level_slot(v) != first_level_slot(first))
    assert _root_children(first, same) == ["hamt_bitmap_node"]  # one node more
    assert _root_children(first, apart) == ["ContextVar", "ContextVar", "int", "int"]


def test_spread_var_keeps_out_of_the_slots_taken() -> None:
    """A variable made by spread_var lands in none of the taken first-level slots."""
    from asynctrace._metadata import first_level_slot, spread_var  # noqa: PLC0415

    made = [contextvars.ContextVar(f"v{i}") for i in range(200)]
    taken: dict[int, contextvars.ContextVar[Any]] = {}
    for variable in made:
        taken.setdefault(first_level_slot(variable), variable)
        if len(taken) == 16:  # half the slots: a free one is found within the tries
            break
    for _ in range(20):
        spread = spread_var("spread", taken.values())
        assert first_level_slot(spread) not in taken
        assert spread.name == "spread"
        assert spread.get() is None  # default None


@pytest.mark.parametrize("first", ["asynctrace", "asynctrace_context"])
def test_asynctrace_variables_take_three_slots_whichever_is_imported_first(first: str) -> None:
    """The correlation id, the metadata and the task's span: three first-level slots.

    Then a traced task's context is one node of three entries (64 bytes less than when two
    share a slot, as the variables' addresses made them in about one process in ten).
    """
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        f"import {first}, asynctrace, asynctrace_context\n"
        "from asynctrace._metadata import CONTEXT_VARS, first_level_slot\n"
        "vs = (*CONTEXT_VARS, asynctrace_context.TASK_SPAN)\n"
        "print(len({first_level_slot(v) for v in vs}))\n"
    )
    for _ in range(3):  # each process places them anew
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        assert out.stdout.split() == ["3"], out.stderr
