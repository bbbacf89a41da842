"""Benchmark harness: asynctrace against bare asyncio and the peers, side by side, as ratios.

    python bench/run.py                 # full run: table on stdout, JSON in bench/results/
    python bench/run.py --quick         # small sizes (CI's coarse guard uses this)
    python bench/run.py --guard         # exit 1 on a gross regression (ratios far above target)

Each mode runs in its own worker process (bench/modes.py; the peers patch asyncio globally)
running the workloads (bench/workloads.py) through bench/measure.py, and rounds are
interleaved: round r runs every mode once, in a rotated order, so drift on a shared machine hits
all modes alike. Per (mode, workload) the worker reports the median of its repetitions, in
microseconds per task, of wall time and of process CPU time (all threads: the span export
thread included). bench/report.py makes the table: medians over rounds and ratios to bare asyncio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from measure import worker
from modes import MODE_ENV, MODES, RECEIVER_ENV
from report import guard, render, summarize
from workloads import WORKLOADS

HERE = Path(__file__).resolve().parent


def _run_worker(mode: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, **MODE_ENV.get(mode, {})}
    cmd = [
        sys.executable, __file__, "--worker", "--mode", mode, "--tasks", str(args.tasks),
        "--repeat", str(args.repeat), "--loop", args.loop, "--workloads", *args.workloads, *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    if out.returncode != 0:
        print(f"[{mode}] failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available(mode: str) -> bool:
    module = {"otel-asyncio": "opentelemetry.instrumentation.asyncio", "sentry": "sentry_sdk"}
    for prefix, name in module.items():
        if mode.startswith(prefix):
            try:
                __import__(name)
            except ImportError:
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="bare")
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--memory", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=0)
    parser.add_argument("--finished", type=int, default=200_000,
                        help="tasks run through for the memory-growth probe")  # fmt: skip
    parser.add_argument("--accuracy", type=int, default=20_000,
                        help="tasks in the end-time accuracy probe (0: none)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    parser.add_argument("--guard", action="store_true", help="fail on a gross regression")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.tasks, args.rounds, args.repeat = 5_000, 3, 3
        args.accuracy = 0
    modes = [m for m in args.modes if _available(m)]
    receiver = _start_receiver() if any(m.endswith("-otlp") for m in modes) else None
    try:
        return _run(args, modes)
    finally:
        if receiver is not None:
            receiver.kill()
            receiver.wait(10)


def _start_receiver() -> subprocess.Popen[str]:
    """The real OTLP/HTTP receiver (bench/receiver.py), in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "receiver.py")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None  # noqa: S101
    os.environ[RECEIVER_ENV] = proc.stdout.readline().strip()
    return proc


def _received() -> int:
    """Spans the receiver has decoded so far."""
    from urllib.request import urlopen  # noqa: PLC0415

    with urlopen(f"http://127.0.0.1:{os.environ[RECEIVER_ENV]}/count", timeout=10) as r:
        return int(r.read())


def _run(args: argparse.Namespace, modes: list[str]) -> int:
    skipped = sorted(set(args.modes) - set(modes))
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    extras: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            extra = []
            if r == 0 and mode in ("bare", "asynctrace-metrics", "asynctrace-tracing-otlp"):
                if args.memory:
                    extra += ["--memory", str(args.memory), "--finished", str(args.finished)]
                if args.in_flight:
                    extra += ["--in-flight", str(args.in_flight)]
            extra += ["--accuracy", str(args.accuracy if r == 0 else 0)]
            before = _received() if mode.endswith("-otlp") else 0
            result = _run_worker(mode, args, extra)
            if mode.endswith("-otlp") and result:
                # Summed over the rounds: what the receiver decoded, what asynctrace dropped.
                export = extras[mode].setdefault("export", {"received": 0.0})
                export["received"] += _received() - before
                dropped = result.get("export", {}).get("dropped_spans")
                if dropped is not None:
                    export["dropped"] = export.get("dropped", 0.0) + dropped
            if result:
                rounds[mode].append(result["workloads"])
                for key in ("memory", "in_flight", "accuracy"):
                    if key in result:
                        extras[mode][key] = result[key]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    table = summarize(rounds, args.workloads)

    env = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "loop": args.loop,
        "tasks": args.tasks,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "skipped_modes": skipped,
    }
    print(render(table, args.workloads, env))
    for mode, extra in extras.items():
        for key, value in extra.items():
            print(f"{mode} {key}: " + ", ".join(f"{k}={v:.1f}" for k, v in value.items()))
    path = args.json or HERE / "results" / (
        f"bench-py{platform.python_version()}-{args.loop}{'-quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "table": table, "extras": extras}, indent=2))
    print(f"written: {path}")
    if args.guard:
        return guard(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
