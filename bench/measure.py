"""The worker: times the workloads in one mode, and probes memory and a large in-flight set.

Per workload it reports the median of its repetitions, in microseconds per task, of wall time
and of process CPU time (all threads: the span export thread included).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import tracemalloc
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from modes import ASYNCTRACE_OPTIONS, Mode
from workloads import WORKLOAD_FUNCS, Spawn, leaf


async def run_once(func: Callable[[int, Spawn], Any], n: int, mode: Mode) -> int:
    """One workload, its tasks freed and its spans flushed: the whole life of n tasks."""
    tasks: int = await func(n, mode.spawn)
    # gather's finished children stay referenced until the loop runs its callback once
    # more; without this turn they would still be alive, for the collector to walk, while
    # the next repetition builds its own.
    await asyncio.sleep(0)
    mode.flush()
    return tasks


async def _time_workloads(mode: Mode, workloads: list[str], n: int, repeat: int) -> dict:
    out: dict[str, Any] = {}
    for wl in workloads:
        func = WORKLOAD_FUNCS[wl]
        samples = []
        for i in range(repeat + 1):  # the first is a warm-up
            gc.collect()
            with mode.section():
                t0, c0 = time.perf_counter(), time.process_time()
                tasks = await run_once(func, n, mode)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if tasks and i:
                samples.append((wall / tasks * 1e6, cpu / tasks * 1e6))
        if samples:
            out[wl] = {
                "wall_us": statistics.median(s[0] for s in samples),
                "cpu_us": statistics.median(s[1] for s in samples),
            }
    return out


async def _memory(mode: Mode, n: int, finished: int = 200_000) -> dict[str, float]:
    """Bytes added per in-flight task, and growth over many finished tasks."""
    ev = asyncio.Event()

    async def waiter() -> None:
        await ev.wait()

    # The timed rounds' spans exported first: an export request built while the window is
    # open (its buffer, ~100 B a span of those rounds) is not memory the waiting tasks hold.
    mode.flush()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # Made 1,000 at a time, a loop turn between: made in one step, 20,000 tasks block the loop
    # for longer than the loop monitor allows, and its report of the blocked loop (the loop
    # thread's stack, formatted: linecache reads and keeps the source files) then fell in the
    # window at random, 15-80 B "a task" that no task holds.
    tasks: list[asyncio.Task[None]] = []
    while len(tasks) < n:
        tasks += [asyncio.create_task(waiter()) for _ in range(min(1_000, n - len(tasks)))]
        await asyncio.sleep(0)
    in_flight = (tracemalloc.get_traced_memory()[0] - before) / n
    ev.set()
    await asyncio.gather(*tasks)
    del tasks
    # Many finished tasks: memory must stay flat (nothing kept per finished task).
    size = 10_000
    batches = max(3, finished // size)
    marks = []
    for b in range(batches):
        await asyncio.gather(*(leaf() for _ in range(size)))
        mode.flush()
        if b in (1, batches - 1):
            gc.collect()
            marks.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    return {
        "bytes_per_in_flight_task": in_flight,
        "growth_bytes_per_finished_task": (marks[1] - marks[0]) / ((batches - 2) * size),
        "finished_tasks": batches * size,
    }


async def _in_flight_100k(mode: Mode, n: int) -> dict[str, float]:
    """With n tasks in flight: scrape, uninstall and install times; the loop lag under load."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    import asynctrace  # noqa: PLC0415

    ev = asyncio.Event()

    async def waiter() -> None:
        await ev.wait()

    tasks = [asyncio.create_task(waiter()) for _ in range(n)]
    await asyncio.sleep(0)
    out: dict[str, float] = {}
    registry = ASYNCTRACE_OPTIONS.get("registry")
    if registry is not None:
        t0 = time.perf_counter()
        body = generate_latest(registry)
        out["scrape_ms"] = (time.perf_counter() - t0) * 1e3
        out["scrape_bytes"] = len(body)
        t0 = time.perf_counter()
        asynctrace.uninstall()
        out["uninstall_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        asynctrace.install(**ASYNCTRACE_OPTIONS)
        out["install_ms"] = (time.perf_counter() - t0) * 1e3
    # Lag: a 5 ms probe timer while all n tasks finish at once.
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = False

    def probe(expected: float) -> None:
        lags.append(loop.time() - expected)
        if not stop:
            loop.call_at(loop.time() + 0.005, probe, loop.time() + 0.005)

    loop.call_at(loop.time() + 0.005, probe, loop.time() + 0.005)
    await asyncio.sleep(0.02)
    t0 = time.perf_counter()
    ev.set()
    await asyncio.gather(*tasks)
    mode.flush()
    out["drain_ms"] = (time.perf_counter() - t0) * 1e3
    await asyncio.sleep(0.02)
    stop = True
    out["max_lag_ms"] = max(lags) * 1e3 if lags else 0.0
    return out


async def _accuracy(mode: Mode, n: int) -> dict[str, float]:
    """Recorded end against a timestamp the coroutine takes just before it returns.

    An n-task fan-out, each task created by the mode's spawn. On the record path the record's
    ``finished_ns`` is compared; on the lean path (no record) the duration the metrics got, added
    to the creation time asynctrace noted. Also the share of durations that land in another
    histogram bucket than the true duration's.

    On the lean path a spy joins the ``task_finished`` hooks (called, like the metrics' own,
    with the metadata and the duration, by the C or the Python ``LeanDone``); each probe task
    gets a correlation id of its own, so its metadata object tells which task it was.
    """
    import asynctrace  # noqa: PLC0415
    from asynctrace._introspect import lean_starts, started_of  # noqa: PLC0415
    from asynctrace._state import STATE  # noqa: PLC0415
    from asynctrace.sinks.task_metrics import DURATION_BUCKETS  # noqa: PLC0415
    from asynctrace.testing import record_of  # noqa: PLC0415

    perf_ns = time.perf_counter_ns
    observed: dict[int, int] = {}  # id(metadata) -> duration the lean instruments got

    def spy(metadata: Any, outcome: str, duration_ns: int) -> None:  # noqa: ANN401, ARG001
        observed[id(metadata)] = duration_ns

    hooks = STATE.hooks
    saved = hooks.finished
    hooks.finished = (spy, *saved)
    ends = [0] * n

    async def leaf_acc(i: int) -> None:
        await asyncio.sleep(0)
        ends[i] = perf_ns()

    starts = lean_starts(asyncio.get_running_loop())
    created = [0] * n
    tasks, records, metas = [], [], []
    for i in range(n):
        task = asynctrace.create_task(
            leaf_acc(i), operation_name="leaf", correlation_id=f"acc-{i:06d}"
        )
        tasks.append(task)
        records.append(record_of(task))  # found while the task runs
        metas.append(asynctrace.task_metadata(task))
        created[i] = started_of(task, None, starts)[0] or 0  # what the lean path noted
    await asyncio.gather(*tasks)
    await asyncio.sleep(0)
    mode.flush()
    hooks.finished = saved
    errors, wrong = [], 0
    bounds = [round(b * 1e9) for b in DURATION_BUCKETS]
    for i in range(len(tasks)):
        record = records[i]
        if record is not None and record.finished_ns:
            start, end = record.created_ns, record.finished_ns
        elif id(metas[i]) in observed and created[i]:
            start, end = created[i], created[i] + observed[id(metas[i])]
        else:
            continue
        errors.append((end - ends[i]) / 1e3)
        wrong += bisect_left(bounds, end - start) != bisect_left(bounds, ends[i] - start)
    if not errors:
        return {}
    errors.sort()
    return {
        "median_error_us": statistics.median(errors),
        "p99_error_us": errors[min(len(errors) - 1, round(0.99 * len(errors)))],
        "max_error_us": errors[-1],
        "wrong_bucket_pct": 100 * wrong / len(errors),
        "tasks": len(errors),
    }


def worker(args: argparse.Namespace) -> None:
    async def main() -> dict[str, Any]:
        mode = Mode(args.mode)
        await mode.setup()
        result: dict[str, Any] = {"workloads": await _time_workloads(
            mode, args.workloads, args.tasks, args.repeat
        )}  # fmt: skip
        if args.memory:
            result["memory"] = await _memory(mode, args.memory, args.finished)
        if args.in_flight and (args.mode == "bare" or args.mode.startswith("asynctrace")):
            result["in_flight"] = await _in_flight_100k(mode, args.in_flight)
        if args.accuracy and args.mode.startswith("asynctrace"):
            result["accuracy"] = await _accuracy(mode, args.accuracy)
        registry = ASYNCTRACE_OPTIONS.get("registry")
        if registry is not None and args.mode.endswith("-otlp"):
            # Nothing hidden: spans the export could not keep up with would show here.
            dropped = registry.get_sample_value("asynctrace_spans_dropped_total") or 0.0
            result["export"] = {"dropped_spans": dropped}
        return result

    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415

        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    print(json.dumps(result))
