"""Where the floor is: a flat fan-out, bare, with a no-op done callback, and with asynctrace.

    python bench/floor.py [--tasks 20000] [--rounds 7]

One process, modes interleaved round by round; the garbage collector on, then off. A task
factory that only adds a no-op done callback is the least any completion-observing design can
cost without wrapping the coroutine; the table shows how far asynctrace is above it. Also
printed: the objects the collector tracks per pending task, which is what makes the
collector's share grow with a fan-out's size.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace.testing import reset

TIMES = "\N{MULTIPLICATION SIGN}"


async def leaf() -> None:
    await asyncio.sleep(0)


def _noop(task: asyncio.Task[Any]) -> None:
    pass


def callback_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    **kwargs: Any,  # noqa: ANN401 - asyncio's own create_task keywords
) -> asyncio.Task[Any]:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    task.add_done_callback(_noop)
    return task


async def _setup(mode: str) -> None:
    loop = asyncio.get_running_loop()
    if mode == "noop-callback":
        loop.set_task_factory(callback_factory)
    elif mode == "asynctrace-metrics":
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)


async def _fanout(n: int) -> tuple[float, float]:
    gc.collect()
    before = len(gc.get_objects())
    c0 = time.process_time()
    outer = asyncio.gather(*(leaf() for _ in range(n)))
    tracked = len(gc.get_objects()) - before if not gc.isenabled() else float("nan")
    await outer
    await asyncio.sleep(0)  # gather's children are freed one loop turn later: inside the timing
    return (time.process_time() - c0) / n * 1e6, tracked / n


def _run(mode: str, n: int, gc_on: bool) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        await _setup(mode)
        await _fanout(n)  # warm-up
        return await _fanout(n)

    if not gc_on:
        gc.disable()
    try:
        return asyncio.run(main())
    finally:
        gc.enable()
        reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    modes = ["bare", "noop-callback", "asynctrace-metrics"]
    print(f"flat fan-out of {args.tasks} tasks, CPU µs per task (median of {args.rounds})")
    print("| mode | gc on | gc off | tracked objects per pending task |")
    print("|---|---|---|---|")
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for gc_on in (True, False):
            for mode in modes[r % 3 :] + modes[: r % 3]:
                results.setdefault((mode, gc_on), []).append(_run(mode, args.tasks, gc_on))
    base = {g: statistics.median(c for c, _ in results["bare", g]) for g in (True, False)}
    for mode in modes:
        on = statistics.median(c for c, _ in results[mode, True])
        off = statistics.median(c for c, _ in results[mode, False])
        tracked = statistics.median(t for _, t in results[mode, False])
        print(
            f"| {mode} | {on:.1f} ({on / base[True]:.2f}{TIMES}) "
            f"| {off:.1f} ({off / base[False]:.2f}{TIMES})"
            f" | {tracked:.1f} |"
        )


if __name__ == "__main__":
    main()
