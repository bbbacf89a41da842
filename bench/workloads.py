"""The benchmark's workloads: each creates tasks the way a kind of app does, and returns how many.

``spawn(coro, operation)`` is how a workload creates a task it names (asynctrace's helper in
the asynctrace modes, plain ``asyncio.create_task`` elsewhere); gather and TaskGroup create
the rest.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from modes import ASYNCTRACE_OPTIONS

Spawn = Callable[..., "asyncio.Task[Any]"]
WORKLOADS = ["fanout", "tree", "queue", "eager", "http"]


async def leaf() -> None:
    await asyncio.sleep(0)


async def w_fanout(n: int, spawn: Spawn) -> int:  # noqa: ARG001 - gather makes the tasks
    await asyncio.gather(*(leaf() for _ in range(n)))
    return n


async def node(depth: int, branching: int) -> None:
    if depth == 0:
        await asyncio.sleep(0)
        return
    async with asyncio.TaskGroup() as tg:
        for _ in range(branching):
            tg.create_task(node(depth - 1, branching))


async def w_tree(n: int, spawn: Spawn) -> int:  # noqa: ARG001
    b = max(2, round(n ** (1 / 3)))
    await node(3, b)
    return b + b * b + b * b * b


async def process(item: int) -> int:
    await asyncio.sleep(0)
    return item * 2


async def w_queue(n: int, spawn: Spawn) -> int:
    q: asyncio.Queue[int | None] = asyncio.Queue(256)

    async def producer(k: int) -> None:
        for i in range(k):
            await q.put(i)

    async def consumer() -> None:
        while (item := await q.get()) is not None:
            await spawn(process(item), "process")

    consumers = [asyncio.create_task(consumer()) for _ in range(4)]
    await asyncio.gather(*(producer(n // 4) for _ in range(4)))
    for _ in consumers:
        await q.put(None)
    await asyncio.gather(*consumers)
    return (n // 4) * 4 + 8


async def eager_leaf() -> int:
    return 1


async def w_eager(n: int, spawn: Spawn) -> int:  # noqa: ARG001
    if sys.version_info < (3, 12):
        return 0  # no eager tasks before 3.12
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if previous is None:
        loop.set_task_factory(asyncio.eager_task_factory)
    else:  # asynctrace (or a peer) installed: make the factory it chains eager
        inner = getattr(previous, "__wrapped__", "missing")
        if inner is None:
            # asynctrace's factory chains None: rebuild it over the eager factory
            import asynctrace  # noqa: PLC0415

            asynctrace.uninstall(loop)
            loop.set_task_factory(asyncio.eager_task_factory)
            asynctrace.install(loop=loop, **ASYNCTRACE_OPTIONS)
    try:
        await asyncio.gather(*(eager_leaf() for _ in range(n)))
    finally:
        if previous is None:
            loop.set_task_factory(None)
    return n


async def validate(doc: dict[str, Any]) -> bool:
    await asyncio.sleep(0)
    return all(isinstance(k, str) for k in doc)


async def enrich(doc: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {**doc, "length": sum(len(str(v)) for v in doc.values())}


async def store(doc: dict[str, Any]) -> int:
    await asyncio.sleep(0)
    return len(json.dumps(doc))


async def handle(payload: str, spawn: Spawn) -> str:
    doc = json.loads(payload)
    ok, enriched, size = await asyncio.gather(
        spawn(validate(doc), "validate"), spawn(enrich(doc), "enrich"), spawn(store(doc), "store")
    )
    return json.dumps({"ok": ok, "size": size, "fields": len(enriched)})


async def w_http(n: int, spawn: Spawn) -> int:
    payload = json.dumps({"source": "crm", "id": 7, "body": "x" * 200, "tags": ["a", "b"]})
    requests = n // 4
    done = 0
    while done < requests:
        batch = min(500, requests - done)
        await asyncio.gather(*(spawn(handle(payload, spawn), "handle") for _ in range(batch)))
        done += batch
    return requests * 4


WORKLOAD_FUNCS: dict[str, Callable[[int, Spawn], Awaitable[int]]] = {
    "fanout": w_fanout,
    "tree": w_tree,
    "queue": w_queue,
    "eager": w_eager,
    "http": w_http,
}
