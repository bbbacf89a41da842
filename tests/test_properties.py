"""Property: on random task trees with failures and cancellations, instrumented == bare.

Each run logs every step of every task (start, each resumption, spawn, outcome) and the final
result. asynctrace must reproduce the bare run's log exactly: same values, same exceptions,
same cancellations, same interleaving.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asynctrace


@dataclass(frozen=True)
class Node:
    steps: int
    action: str  # "return" | "raise" | "hang" (cancelled by its parent)
    spawn: str  # "gather" | "taskgroup" | "create_task" | "helper"
    children: tuple[Node, ...] = field(default=())


nodes = st.recursive(
    st.builds(
        Node,
        steps=st.integers(0, 3),
        action=st.sampled_from(["return", "raise", "hang"]),
        spawn=st.just("gather"),
    ),
    lambda kids: st.builds(
        Node,
        steps=st.integers(0, 3),
        action=st.sampled_from(["return", "raise", "return", "hang"]),
        spawn=st.sampled_from(["gather", "taskgroup", "create_task", "helper"]),
        children=st.lists(kids, min_size=1, max_size=4).map(tuple),
    ),
    max_leaves=25,
)


async def run_tree(root: Node) -> list[Any]:
    log: list[Any] = []

    async def visit(node: Node, path: str) -> str:
        log.append(("start", path))
        for i in range(node.steps):
            await asyncio.sleep(0)
            log.append(("step", path, i))
        kids = [visit(child, f"{path}.{k}") for k, child in enumerate(node.children)]
        hanging = [c.action == "hang" for c in node.children]
        try:
            if node.spawn == "gather":
                futures = [asyncio.ensure_future(k) for k in kids]
                await asyncio.sleep(0)
                for f, hang in zip(futures, hanging, strict=True):
                    if hang:
                        f.cancel()
                out = await asyncio.gather(*futures, return_exceptions=True)
                log.append(("gathered", path, [repr(o) for o in out]))
            elif node.spawn == "taskgroup":
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(k) for k in kids]
                    for t, hang in zip(tasks, hanging, strict=True):
                        if hang:
                            t.cancel()
                log.append(
                    ("grouped", path, ["cancelled" if t.cancelled() else t.result() for t in tasks])
                )
            else:
                make = (
                    asyncio.create_task
                    if node.spawn == "create_task"
                    else lambda c: asynctrace.create_task(c, operation_name="op")
                )
                tasks = [make(k) for k in kids]
                await asyncio.sleep(0)
                for t, hang in zip(tasks, hanging, strict=True):
                    if hang:
                        t.cancel()
                for t in tasks:
                    try:
                        log.append(("awaited", path, await t))
                    except ValueError as exc:
                        log.append(("awaited", path, repr(exc), t.cancelled()))
                    except asyncio.CancelledError as exc:
                        me = asyncio.current_task()
                        if me is not None and me.cancelling():
                            raise  # our own cancellation, not the child's: never swallow it
                        log.append(("awaited", path, repr(exc), t.cancelled()))
        except* ValueError as eg:
            log.append(("group-error", path, sorted(str(e) for e in eg.exceptions)))
        if node.action == "raise":
            log.append(("raise", path))
            raise ValueError(path)
        if node.action == "hang" and path:
            log.append(("hang", path))
            await asyncio.Event().wait()
        log.append(("return", path))
        return path

    try:
        log.append(("result", await visit(root, "")))
    except ValueError as exc:
        log.append(("error", str(exc)))
    return log


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(tree=nodes)
def test_random_trees_behave_identically(tree: Node) -> None:
    """Random trees of gather/TaskGroup/create_task with failures and cancellations.

    The garbage collector is paused during both runs: abandoned pending tasks (cancelled
    parents leave some) are finalized whenever a collection happens, and finalizing a coroutine
    suspended in a TaskGroup schedules callbacks. When that happens depends on how many objects
    were allocated, which any library changes; it is not scheduling semantics.
    """
    gc.collect()
    gc.disable()
    try:
        bare = asyncio.run(run_tree(tree))
        asynctrace.install()
        try:
            instrumented = asyncio.run(run_tree(tree))
        finally:
            asynctrace.uninstall()
    finally:
        gc.enable()
    assert instrumented == bare
