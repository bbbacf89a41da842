"""Where the time goes: a py-spy profile, native frames included, of one workload per mode.

    python bench/profile.py [--modes bare asynctrace-metrics asynctrace-tracing-otlp]
                            [--workload fanout] [--tasks 20000] [--seconds 8] [--out FILE]

Each mode runs in a child process that sets the mode up, warms up, and then waits. py-spy
attaches to it (so imports and setup stay out of the profile), the child runs the workload in
a loop for the given seconds, and py-spy's raw stacks are grouped by who is running:

- the garbage collector (any stack under ``gc_collect_main``), whatever triggered it;
- a thread other than the main one (the span export thread);
- otherwise the package of the innermost Python frame: asynctrace, OpenTelemetry,
  prometheus_client, asyncio's own Python code (the loop, ``Handle``, ``gather``; the C task
  step it calls counts here too) or the workload's coroutines.

Waits (a thread blocked on a lock, the child outside its event loop) are left out. Each
group's share of the samples times the CPU the child measured per task gives µs per task. The
collector is also timed exactly, per generation, with ``gc.callbacks``: that is the figure to
read where the interpreter has no native symbols (Debian's 3.14), so py-spy cannot name it.
py-spy's ptrace stops inflate system calls (``getpid``, ``read``) in the innermost-frame
lists; the harness (bench/run.py) is the reference for the ratios, this is for the shares.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import run_once
from modes import Mode
from run import _start_receiver
from workloads import WORKLOAD_FUNCS

HERE = Path(__file__).resolve().parent

_RUNNERS = str(Path(asyncio.__file__).parent / "runners.py")

GROUPS = (
    "garbage collector",
    "other threads (span export)",
    "asynctrace",
    "OpenTelemetry",
    "prometheus_client",
    "asyncio (Python loop, Handle, gather; C task step)",
    "workload coroutines",
    "other",
)


def _package_dirs() -> tuple[tuple[str, str], ...]:
    """(path prefix, group) for the packages whose frames are told apart, most specific first."""
    import opentelemetry.trace  # noqa: PLC0415 - the API is always there, the SDK beside it
    import prometheus_client  # noqa: PLC0415

    import asynctrace  # noqa: PLC0415

    otel = Path(opentelemetry.trace.__file__).parent.parent
    return (
        (str(Path(asynctrace.__file__).parent) + os.sep, "asynctrace"),
        (str(otel) + os.sep, "OpenTelemetry"),
        (str(Path(prometheus_client.__file__).parent) + os.sep, "prometheus_client"),
        (str(Path(asyncio.__file__).parent) + os.sep, GROUPS[5]),
        (str(HERE / "workloads.py"), "workload coroutines"),
    )


# -- the child: set up, wait for the profiler, run the workload for a while ---------------


def child(args: argparse.Namespace) -> None:
    async def main() -> dict[str, float]:
        mode = Mode(args.mode)
        await mode.setup()
        func = WORKLOAD_FUNCS[args.workload]
        await run_once(func, args.tasks, mode)  # warm-up
        gc.collect()
        print("ready", flush=True)
        sys.stdin.readline()
        in_gc = [0.0, 0.0, 0.0]  # CPU seconds collecting, per generation
        started = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.process_time()
            else:
                in_gc[info["generation"]] += time.process_time() - started[0]

        gc.callbacks.append(on_gc)
        tasks, c0, deadline = 0, time.process_time(), time.monotonic() + args.seconds
        with mode.section():
            while time.monotonic() < deadline:
                tasks += await run_once(func, args.tasks, mode)
        cpu = time.process_time() - c0
        gc.callbacks.remove(on_gc)
        return {
            "cpu_us": cpu / tasks * 1e6,
            "gc_us": [t / tasks * 1e6 for t in in_gc],
            "tasks": tasks,
        }

    result = asyncio.run(main())
    print(json.dumps(result), flush=True)
    sys.stdin.readline()  # stay idle (unsampled) until the profiler has written its output


# -- the parent: attach py-spy, group the stacks --------------------------------------------


def _profile(
    mode: str, args: argparse.Namespace, py_spy: str | None
) -> tuple[dict[str, Any], Path]:
    raw = Path(tempfile.mkstemp(prefix=f"profile-{mode}-", suffix=".txt")[1])
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--workload", args.workload,
           "--tasks", str(args.tasks), "--seconds", str(args.seconds)]  # fmt: skip
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None  # noqa: S101 - piped above
        assert proc.stdout is not None  # noqa: S101
        try:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"[{mode}] the child did not start")
            if args.no_spy:  # the collector's timing alone, nothing attached to the child
                proc.stdin.write("go\n")
                proc.stdin.flush()
                result = json.loads(proc.stdout.readline())
                return result, raw
            assert py_spy is not None  # noqa: S101 - main() checked it
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--native",
                    "--full-filenames",
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.5)  # py-spy attaches; the idle child is not sampled meanwhile
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
            if spy.returncode not in (0, -signal.SIGINT) or not raw.stat().st_size:
                raise SystemExit(f"[{mode}] py-spy failed: {err.decode()[-1000:]}")
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.wait(timeout=60)
    return result, raw


# Where a thread waits rather than runs: py-spy samples blocked threads too. Native names
# where the interpreter has symbols, else the Python frame that called into the wait.
_WAITS = frozenset({
    "PyThread_acquire_lock_timed", "pthread_cond_timedwait", "pthread_cond_wait",
    "sem_timedwait", "sem_wait", "select", "poll", "epoll_wait", "read", "clock_nanosleep",
    "Condition.wait", "Event.wait",
})  # fmt: skip


def _path(frame: str) -> str | None:
    """The file of a Python frame (``func (/path/file.py:12)``), None for a native one."""
    where = frame[frame.rfind("(") + 1 : -1]
    path, _, line = where.rpartition(":")
    return path if line.isdigit() and path.endswith(".py") else None


def _other_thread(stack: list[str]) -> bool:
    return any(f.startswith(("thread_run ", "Thread._bootstrap ")) for f in stack)


def _idle(stack: list[str]) -> bool:
    """A wait in another thread, or the main thread outside the event loop (its own waits)."""
    if _other_thread(stack):
        return _leaf(stack).split(" (")[0] in _WAITS
    return not any(_path(f) == _RUNNERS for f in stack)


def _group(stack: list[str], packages: tuple[tuple[str, str], ...]) -> str:
    if any(frame.startswith("gc_collect") for frame in stack):
        return GROUPS[0]
    if _other_thread(stack):
        return GROUPS[1]
    for frame in reversed(stack):
        path = _path(frame)
        if path is not None:
            return next((group for prefix, group in packages if path.startswith(prefix)), "other")
    return "other"


def _leaf(stack: list[str]) -> str:
    """The innermost named frame: a Python function with its file, or a native function."""
    for frame in reversed(stack):
        if not frame.startswith("0x"):
            name, _, where = frame.partition(" (")
            return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"
    return "unknown"


def _summarize(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    groups: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    packages = _package_dirs()
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack = stack_text.split(";")
        if _idle(stack):
            continue
        groups[_group(stack, packages)] += int(count)
        leaves[_leaf(stack)] += int(count)
    return groups, leaves, sum(groups.values())


Results = dict[str, tuple[dict[str, Any], Path]]


def _head(results: Results, title: str) -> list[str]:
    """The title, the table's header and its first row: CPU per task of each mode."""
    modes = list(results)
    return [
        f"**Python {platform.python_version()}**, {title}",
        "",
        "| | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
        "| **CPU per task** | "
        + " | ".join(f"**{results[m][0]['cpu_us']:.1f}**" for m in modes)
        + " |",
    ]


def _gc_rows(results: Results, label: str) -> list[str]:
    """One row per generation: the collector's CPU per task, timed by ``gc.callbacks``."""
    return [
        f"| collections of generation {gen}{label} | "
        + " | ".join(f"{result['gc_us'][gen]:.1f}" for result, _ in results.values())
        + " |"
        for gen in range(3)
    ]


def _render_gc(results: Results, args: argparse.Namespace) -> str:
    """``--no-spy``: CPU per task and the collector's share of it, timed by ``gc.callbacks``."""
    modes = list(results)
    title = (
        f"`{args.workload}` of {args.tasks} tasks for {args.seconds} s per mode, "
        "no profiler attached. CPU µs per task"
    )
    lines = _head(results, title) + _gc_rows(results, "")
    cells = []
    for m in modes:
        in_gc, cpu = sum(results[m][0]["gc_us"]), results[m][0]["cpu_us"]
        cells.append(f"{in_gc:.1f} ({in_gc / cpu:.0%})")
    lines.append("| the collector, all generations (share) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _render(results: Results, args: argparse.Namespace) -> str:
    modes = list(results)
    summaries = {m: _summarize(raw) for m, (_, raw) in results.items()}
    title = (
        f"`{args.workload}` of {args.tasks} tasks, py-spy --native at {args.rate} Hz for "
        f"{args.seconds} s per mode. CPU µs per task (share of the samples)"
    )
    lines = _head(results, title)
    for group in GROUPS:
        cells = []
        for m in modes:
            groups, _, total = summaries[m]
            share = groups[group] / total if total else 0.0
            cells.append(f"{share * results[m][0]['cpu_us']:.1f} ({share:.0%})" if share else "")
        if any(cells):
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += _gc_rows(results, ", timed by `gc.callbacks`")
    lines.append("| samples | " + " | ".join(str(summaries[m][2]) for m in modes) + " |")
    if not any(summaries[m][0][GROUPS[0]] for m in modes):
        lines += [
            "",
            (
                "No native symbols in this interpreter: the collector's samples are inside "
                "the groups above; the `gc.callbacks` rows time it."
            ),
        ]
    for m in modes:
        _, leaves, total = summaries[m]
        lines += ["", f"Innermost frames, `{m}` (top {args.top}, share of samples):", ""]
        lines += [f"- {n / total:.1%} `{leaf}`" for leaf, n in leaves.most_common(args.top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="bare", help=argparse.SUPPRESS)
    parser.add_argument(
        "--modes", nargs="+", default=["bare", "asynctrace-metrics", "asynctrace-tracing-otlp"]
    )
    parser.add_argument("--workload", default="fanout", choices=list(WORKLOAD_FUNCS))
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--no-spy", action="store_true", help="no py-spy: CPU and the collector's time only"
    )
    parser.add_argument(
        "--keep-raw", type=Path, default=None, help="keep py-spy's raw stacks in this folder"
    )
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    py_spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))  # fmt: skip
    if py_spy is None and not args.no_spy:
        raise SystemExit("py-spy not found: pip install py-spy (the 'bench' extra has it)")
    # The "-otlp" modes export to the real receiver, as in bench/run.py.
    receiver = _start_receiver() if any(m.endswith("-otlp") for m in args.modes) else None
    try:
        results = {m: _profile(m, args, py_spy) for m in args.modes}
    finally:
        if receiver is not None:
            receiver.kill()
            receiver.wait(10)
    text = _render_gc(results, args) if args.no_spy else _render(results, args)
    print(text)
    for m, (_, raw) in results.items():
        if args.no_spy:
            raw.unlink()
            continue
        if args.keep_raw:
            args.keep_raw.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, args.keep_raw / f"profile-{m}-py{platform.python_version()}.txt")
        raw.unlink()
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
