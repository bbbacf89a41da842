"""One tracing change measured alone: flipped at run time in one process, alternated.

    python bench/ab_tracing.py --switch lazy    # the current span made lazily, or attached
    python bench/ab_tracing.py --switch batch   # the lane's requests: 2,048 spans, or 512
    python bench/ab_tracing.py --switch records # a record per traced task, or none (lean)

asynctrace is installed with OTLP export to the real receiver (bench/receiver.py), and a
20,000-task fan-out (``asynctrace.create_task(..., operation_name=)``) runs twice per turn,
flushed, for each variant in turn, the order alternating. CPU of the whole process (export
thread included) per task, median over the turns. The switch is flipped on the live objects
(the span sink's runtime context, the lane's batch size), so nothing else differs: the
harness (bench/run.py) compares modes across processes, where this machine's noise is larger
than either change.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from typing import Any

from modes import RECEIVER_ENV
from prometheus_client import CollectorRegistry
from run import _start_receiver

import asynctrace


def _live(type_name: str) -> Any:  # noqa: ANN401 - asynctrace's own object, found by type
    found = [o for o in gc.get_objects() if type(o).__name__ == type_name]
    if len(found) != 1:
        raise SystemExit(f"expected one {type_name}, found {len(found)}")
    return found[0]


async def _leaf() -> None:
    await asyncio.sleep(0)


async def _fanout(n: int) -> None:
    await asyncio.gather(
        *[asynctrace.create_task(_leaf(), operation_name="leaf") for _ in range(n)]
    )


async def _main(args: argparse.Namespace, port: str) -> dict[str, list[float]]:
    asynctrace.install(registry=CollectorRegistry(), otlp_endpoint=f"http://127.0.0.1:{port}")
    if args.switch == "lazy":
        sink = _live("SpanSink")
        runtime = sink._runtime
        if runtime is None:
            raise SystemExit("the lazy current span is not in use here")
        variants = {"attached": lambda: setattr(sink, "_runtime", None),
                    "lazy": lambda: setattr(sink, "_runtime", runtime)}  # fmt: skip
    elif args.switch == "records":
        from asynctrace._hooks import Hooks  # noqa: PLC0415
        from asynctrace._state import STATE  # noqa: PLC0415
        from asynctrace.sinks.tracing import SpanSink  # noqa: PLC0415

        lean = STATE.hooks
        if not lean.lean or lean.begin is None:
            raise SystemExit("traced tasks do not take the lean path here")
        SpanSink._lean_span = False  # the table as it was before: a record per task
        records = Hooks(lean.instruments)
        SpanSink._lean_span = True
        variants = {"records": lambda: setattr(STATE, "hooks", records),
                    "lean": lambda: setattr(STATE, "hooks", lean)}  # fmt: skip
    else:
        lane = _live("OTLPLane")
        variants = {"512": lambda: setattr(lane, "_batch", 512),
                    "2048": lambda: setattr(lane, "_batch", 2048)}  # fmt: skip
    for _ in range(2):  # warm-up
        await _fanout(args.tasks)
        asynctrace.flush()
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for turn in range(args.turns):
        for name in names if turn % 2 else names[::-1]:
            variants[name]()
            started = time.process_time()
            for _ in range(2):
                await _fanout(args.tasks)
                asynctrace.flush()
            results[name].append((time.process_time() - started) / (2 * args.tasks) * 1e6)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=["lazy", "batch", "records"], required=True)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--turns", type=int, default=8)
    args = parser.parse_args()
    receiver = _start_receiver()
    try:
        results = asyncio.run(_main(args, os.environ[RECEIVER_ENV]))
    finally:
        receiver.kill()
        receiver.wait(10)
    print(f"Python {sys.version.split()[0]}, {args.tasks}-task fan-out, {args.turns} turns")
    for name, values in results.items():
        turns = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:>9}: median {statistics.median(values):.1f} µs per task  ({turns})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
