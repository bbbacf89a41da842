"""Benchmark harness: asynctrace against bare asyncio and the peers, side by side, as ratios.

    python bench/run.py                 # full run: table on stdout, JSON in bench/results/
    python bench/run.py --quick         # small sizes (CI's coarse guard uses this)
    python bench/run.py --guard         # exit 1 on a gross regression (ratios far above target)

Each mode runs in its own worker process (the peers patch asyncio globally), and rounds are
interleaved: round r runs every mode once, in a rotated order, so drift on a shared machine hits
all modes alike. Per (mode, workload) the worker reports the median of its repetitions, in
microseconds per task, of wall time and of process CPU time (all threads: the span export
thread included). The table shows medians over rounds and ratios to bare asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = [
    "bare",
    "asynctrace-metrics",
    "asynctrace-tracing",
    "otel-asyncio-metrics",
    "otel-asyncio-spans",
    "sentry",
]
WORKLOADS = ["fanout", "tree", "queue", "eager", "http"]
# Coroutine names the OTel asyncio instrumentation is told to trace (its opt-in list).
TRACED_NAMES = "leaf,node,process,eager_leaf,handle,validate,enrich,store,consumer,producer"
# Targets from the performance issue, and the coarse CI guard (far above them: noise never
# fails CI, a gross regression does).
TARGETS = {"asynctrace-metrics": 1.25, "asynctrace-tracing": 2.0}
GUARD = {"asynctrace-metrics": 5.0, "asynctrace-tracing": 10.0}

Spawn = Callable[..., "asyncio.Task[Any]"]


# -- workloads: each returns the number of tasks it created ---------------------------------


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
            asynctrace.install(loop=loop, **_ASYNCTRACE_OPTIONS)
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
_ASYNCTRACE_OPTIONS: dict[str, Any] = {}


# -- modes ---------------------------------------------------------------------------------


class _Mode:
    """Sets a mode up inside the worker's running loop; flush() ends a timed section."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.provider: Any = None
        self.sentry_tx: Any = None

    def spawn(self, coro: Any, op: str) -> asyncio.Task[Any]:  # noqa: ANN401
        if self.name.startswith("asynctrace"):
            import asynctrace  # noqa: PLC0415

            return asynctrace.create_task(coro, operation_name=op)
        return asyncio.create_task(coro)

    async def setup(self) -> None:
        name = self.name
        if name == "bare":
            return
        if name.startswith("asynctrace"):
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            import asynctrace  # noqa: PLC0415

            _ASYNCTRACE_OPTIONS.update(registry=CollectorRegistry())
            if name == "asynctrace-tracing":
                self.provider = _discarding_provider()
                _ASYNCTRACE_OPTIONS["tracer_provider"] = self.provider
            asynctrace.install(**_ASYNCTRACE_OPTIONS)
            return
        if name.startswith("otel-asyncio"):
            from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor  # noqa: PLC0415
            from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415

            if name == "otel-asyncio-spans":
                os.environ["OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE"] = TRACED_NAMES
                self.provider = _discarding_provider()
            AsyncioInstrumentor().instrument(
                meter_provider=MeterProvider(), tracer_provider=self.provider
            )
            return
        if name == "sentry":
            import sentry_sdk  # noqa: PLC0415
            from sentry_sdk.integrations.asyncio import AsyncioIntegration  # noqa: PLC0415
            from sentry_sdk.transport import Transport  # noqa: PLC0415

            class Discard(Transport):
                def capture_envelope(self, envelope: Any) -> None:  # noqa: ANN401
                    pass

            sentry_sdk.init(
                dsn="http://public@127.0.0.1:9/1",
                transport=Discard,
                traces_sample_rate=1.0,
                integrations=[AsyncioIntegration()],
                default_integrations=False,
            )
            return
        raise SystemExit(f"unknown mode {name!r}")

    @contextlib.contextmanager
    def section(self) -> Any:  # noqa: ANN401
        if self.name == "sentry":
            import sentry_sdk  # noqa: PLC0415

            with sentry_sdk.start_transaction(name="bench", op="bench"):
                yield
        else:
            yield

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()


async def run_once(func: Callable[[int, Spawn], Any], n: int, mode: _Mode) -> int:
    """One workload, its tasks freed and its spans flushed: the whole life of n tasks."""
    tasks: int = await func(n, mode.spawn)
    # gather's finished children stay referenced until the loop runs its callback once
    # more; without this turn they would still be alive, for the collector to walk, while
    # the next repetition builds its own.
    await asyncio.sleep(0)
    mode.flush()
    return tasks


def _discarding_provider() -> Any:  # noqa: ANN401
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Any) -> SpanExportResult:  # noqa: ANN401
            self.count += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(Discard(), max_queue_size=1 << 16, max_export_batch_size=2048)
    )
    return provider


# -- the worker ----------------------------------------------------------------------------


async def _time_workloads(mode: _Mode, workloads: list[str], n: int, repeat: int) -> dict:
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


async def _memory(mode: _Mode, n: int, finished: int = 200_000) -> dict[str, float]:
    """Bytes added per in-flight task, and growth over many finished tasks."""
    ev = asyncio.Event()

    async def waiter() -> None:
        await ev.wait()

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(waiter()) for _ in range(n)]
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


async def _in_flight_100k(mode: _Mode, n: int) -> dict[str, float]:
    """With n tasks in flight: scrape, uninstall and install times; the loop lag under load."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    import asynctrace  # noqa: PLC0415

    ev = asyncio.Event()

    async def waiter() -> None:
        await ev.wait()

    tasks = [asyncio.create_task(waiter()) for _ in range(n)]
    await asyncio.sleep(0)
    out: dict[str, float] = {}
    registry = _ASYNCTRACE_OPTIONS.get("registry")
    if registry is not None:
        t0 = time.perf_counter()
        body = generate_latest(registry)
        out["scrape_ms"] = (time.perf_counter() - t0) * 1e3
        out["scrape_bytes"] = len(body)
        t0 = time.perf_counter()
        asynctrace.uninstall()
        out["uninstall_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        asynctrace.install(**_ASYNCTRACE_OPTIONS)
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


def worker(args: argparse.Namespace) -> None:
    async def main() -> dict[str, Any]:
        mode = _Mode(args.mode)
        await mode.setup()
        result: dict[str, Any] = {"workloads": await _time_workloads(
            mode, args.workloads, args.tasks, args.repeat
        )}  # fmt: skip
        if args.memory:
            result["memory"] = await _memory(mode, args.memory, args.finished)
        if args.in_flight and (args.mode == "bare" or args.mode.startswith("asynctrace")):
            result["in_flight"] = await _in_flight_100k(mode, args.in_flight)
        return result

    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415

        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    print(json.dumps(result))


# -- the parent ----------------------------------------------------------------------------


def _run_worker(mode: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--mode", mode, "--tasks", str(args.tasks),
        "--repeat", str(args.repeat), "--loop", args.loop, "--workloads", *args.workloads, *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
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
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    parser.add_argument("--guard", action="store_true", help="fail on a gross regression")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.tasks, args.rounds, args.repeat = 5_000, 3, 3
    modes = [m for m in args.modes if _available(m)]
    skipped = sorted(set(args.modes) - set(modes))
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    extras: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            extra = []
            if r == 0 and mode in ("bare", "asynctrace-metrics", "asynctrace-tracing"):
                if args.memory:
                    extra += ["--memory", str(args.memory), "--finished", str(args.finished)]
                if args.in_flight:
                    extra += ["--in-flight", str(args.in_flight)]
            result = _run_worker(mode, args, extra)
            if result:
                rounds[mode].append(result["workloads"])
                for key in ("memory", "in_flight"):
                    if key in result:
                        extras[mode][key] = result[key]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode, results in rounds.items():
        for wl in args.workloads:
            vals = [res[wl] for res in results if wl in res]
            if vals:
                table.setdefault(mode, {})[wl] = {
                    "wall_us": statistics.median(v["wall_us"] for v in vals),
                    "cpu_us": statistics.median(v["cpu_us"] for v in vals),
                }
    bare = table.get("bare", {})
    for row in table.values():
        for wl, cell in row.items():
            if wl in bare:
                cell["ratio_cpu"] = cell["cpu_us"] / bare[wl]["cpu_us"]
                cell["added_cpu_us"] = cell["cpu_us"] - bare[wl]["cpu_us"]

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
    print(_render(table, args.workloads, env))
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
        return _guard(table)
    return 0


def _render(table: dict[str, Any], workloads: list[str], env: dict[str, Any]) -> str:
    title = (
        f"Python {env['python']} ({'GIL' if env['gil'] else 'free-threaded'}), loop "
        f"{env['loop']}, {env['tasks']} tasks, {env['rounds']} interleaved rounds; "
        "CPU µs per task (ratio to bare)"
    )
    lines = [
        title,
        f"{'mode':<22}" + "".join(f"{wl:>18}" for wl in workloads),
    ]
    for mode, row in table.items():
        cells = []
        for wl in workloads:
            cell = row.get(wl)
            if cell is None:
                cells.append(f"{'n/a':>18}")
            else:
                ratio = cell.get("ratio_cpu")
                text = f"{cell['cpu_us']:.2f}" + (f" ({ratio:.2f}x)" if ratio else "")
                cells.append(f"{text:>18}")
        lines.append(f"{mode:<22}" + "".join(cells))
    return "\n".join(lines)


def _guard(table: dict[str, Any]) -> int:
    failed = []
    for mode, limit in GUARD.items():
        for wl, cell in table.get(mode, {}).items():
            ratio = cell.get("ratio_cpu")
            if ratio is not None and ratio > limit:
                failed.append(f"{mode}/{wl}: {ratio:.2f}x > guard {limit}x")
    if failed:
        print("GUARD FAILED (gross regression):\n  " + "\n  ".join(failed))
        return 1
    print(f"guard ok (limits {GUARD}; targets {TARGETS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
