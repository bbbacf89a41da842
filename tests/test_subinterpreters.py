"""asynctrace inside Python 3.14's isolated subinterpreters (PEP 734), as far as it goes now.

Each scenario runs in a fresh process (bounded in time), whose interpreters are closed at
the end: a thread left behind would hang ``Interpreter.close()`` or the process's exit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 14), reason="concurrent.interpreters is new in Python 3.14"
)
ROOT = Path(__file__).resolve().parent.parent


def run_driver(code: str, *args: str, timeout: float) -> Any:
    """Run ``code`` in a fresh Python (bounded in time); the JSON of its last output line."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# What runs inside each interpreter: metrics, the loop monitor, a task that blocks the loop.
INSIDE = """
import asyncio, json, logging, time
import asynctrace
from prometheus_client import CollectorRegistry

logged = []

class Keep(logging.Handler):
    def emit(self, record):
        logged.append(record.getMessage())

logging.getLogger("asynctrace").addHandler(Keep())
registry = CollectorRegistry()

async def blocker():
    time.sleep(0.5)  # blocks this interpreter's loop

async def main():
    asynctrace.install(registry=registry, lag_interval=0.05, blocked_threshold=0.1)
    await asyncio.gather(*(asynctrace.create_task(asyncio.sleep(0.01), operation_name="w")
                           for _ in range(TASKS)))
    await asynctrace.create_task(blocker(), operation_name="blocker")
    await asyncio.sleep(0.2)

asyncio.run(main())
value = registry.get_sample_value
result = json.dumps({
    "created": value("asynctrace_tasks_created_total", {"operation": "w"}),
    "lag_beats": value("asynctrace_event_loop_lag_seconds_count"),
    "blocked": sum(value("asynctrace_event_loop_blocked_total", {"operation": op}) or 0
                   for op in ("blocker", "unknown")),
    "stack_logged": any("the loop thread is at" in m and "blocker" in m for m in logged),
    "errors": asynctrace.telemetry_errors(),
})
asynctrace.shutdown()
"""

DRIVER = """
import json, sys, threading
from concurrent import interpreters

def run(tasks, out, index):
    interp = interpreters.create()
    try:
        interp.exec("TASKS = %d" % tasks)
        interp.exec(sys.argv[1])
        out[index] = json.loads(interp.call(eval, "result"))
    finally:
        interp.close()

counts = [int(n) for n in sys.argv[2:]]
out = {}
threads = [threading.Thread(target=run, args=(n, out, i)) for i, n in enumerate(counts)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
print(json.dumps([out.get(i) for i in range(len(counts))]))
"""


def run_interpreters(*tasks: int) -> list[dict[str, object]]:
    reports: list[dict[str, object]] = run_driver(
        DRIVER, textwrap.dedent(INSIDE), *map(str, tasks), timeout=120
    )
    return reports


def test_the_loop_monitor_works_in_an_isolated_interpreter() -> None:
    """Lag heartbeats and blocked-loop detection (with the stack), no error, a clean close."""
    (report,) = run_interpreters(10)
    assert report["created"] == 10
    lag_beats, blocked = report["lag_beats"], report["blocked"]
    assert isinstance(lag_beats, int | float)
    assert lag_beats > 0  # was 0: the watchdog thread was refused
    assert isinstance(blocked, int | float)
    assert blocked >= 1
    assert report["stack_logged"] is True
    assert report["errors"] == {}


def test_interpreters_at_once_count_their_own() -> None:
    """Two interpreters in two threads at once: each its own exact counts, no cross-talk."""
    first, second = run_interpreters(7, 13)
    assert first["created"] == 7
    assert second["created"] == 13
    assert first["errors"] == second["errors"] == {}


METRICS_DRIVER = """
import importlib.util
import json
import os
from concurrent import interpreters

code = '''
import asyncio, urllib.request, asynctrace
from prometheus_client import CollectorRegistry
asynctrace.install(registry=CollectorRegistry(), prometheus_port=0)

async def main():
    await asynctrace.create_task(asyncio.sleep(0), operation_name="w")

asyncio.run(main())
url = asynctrace.summary().metrics_url
body = urllib.request.urlopen(url, timeout=5).read().decode()
served = 'asynctrace_tasks_created_total{operation="w"} 1.0' in body
if SHUTDOWN:
    asynctrace.shutdown()
'''
out = []
for shutdown in (True, False):
    interp = interpreters.create()
    interp.exec("SHUTDOWN = %s" % shutdown)
    interp.exec(code)
    out.append([interp.call(eval, "served"), interp.call(eval, "url")])
    interp.close()  # with the server still running when shutdown() was not called
print(json.dumps(out))
"""


def test_metrics_are_served_in_an_isolated_interpreter() -> None:
    """prometheus_port in an isolated interpreter: served (plain threads), and the
    interpreter closes whether or not shutdown() was called.
    """
    (with_shutdown, without) = run_driver(METRICS_DRIVER, timeout=60)
    assert with_shutdown[0] is True
    assert without[0] is True
    assert with_shutdown[1] != without[1]  # each interpreter its own port


EXPORT_DRIVER = """
import json, sys
from concurrent import interpreters
from concurrent.futures import InterpreterPoolExecutor
from tests.otlp_receivers import http_receiver
from tests.subinterp_export import export_spans

receiver = http_receiver()
url, received = next(receiver)
names = ["alpha", "beta", "gamma"]
with InterpreterPoolExecutor(max_workers=3) as pool:
    reports = list(pool.map(export_spans, [url] * 3, names, [20, 30, 40]))
# one more, left installed: its interpreter's end must stop the export thread
interp = interpreters.create()
interp.exec("from tests.subinterp_export import export_spans")
left = interp.call(export_spans, url, "delta", 5, False)
interp.close()
spans = received.snapshot()
receiver.close()  # stop the server before exit
print(json.dumps({"reports": [json.loads(r) for r in reports], "left": json.loads(left),
                  "spans": [[s["resource"].get("service.name"), s["name"],
                             s["attributes"].get("asynctrace.correlation_id")] for s in spans]}))
"""


def test_spans_are_exported_from_isolated_interpreters() -> None:
    """OTLP export in three pooled interpreters at once, and one closed while installed:
    every span arrives, each interpreter's under its own service and id, no thread left.
    """
    out = run_driver(EXPORT_DRIVER, timeout=120)
    built = importlib.util.find_spec("asynctrace._speedups") is not None
    native = "c" if built and os.environ.get("ASYNCTRACE_PURE_PYTHON") != "1" else "python"
    for report, count in zip(out["reports"], (20, 30, 40), strict=True):
        assert report["implementation"] == native  # the C extension loads in each
        assert report["flushed"] is True
        assert report["created"] == count
        assert report["errors"] == {}
        assert "asynctrace-otlp-lane" in report["threads"]
        assert "asynctrace-otlp-lane" not in report["threads_after"]
    assert out["left"]["created"] == 5
    by_service: dict[str, list[list[str]]] = {}
    for service, name, cid in out["spans"]:
        by_service.setdefault(service, []).append([name, cid])
    for service, count in (("alpha", 20), ("beta", 30), ("gamma", 40), ("delta", 5)):
        tasks = [s for s in by_service[service] if s[0] == service]
        assert len(tasks) == count, service
        # no cross-talk: the block's span and its tasks carry this interpreter's id only
        ids = {cid for name, cid in by_service[service] if not name.endswith("main")}
        assert ids == {f"cid-{service}"}


OTHER_EXPORTERS_DRIVER = """
import json, sys
from concurrent import interpreters
from tests.otlp_receivers import http_receiver
from tests.subinterp_export import export_json_and_file

receiver = http_receiver()
url, received = next(receiver)
interp = interpreters.create()
interp.exec("from tests.subinterp_export import export_json_and_file")
report = interp.call(export_json_and_file, url, sys.argv[1], 12)
interp.close()  # still installed: the interpreter's end flushes both exporters
spans = received.snapshot()
receiver.close()
print(json.dumps({"report": json.loads(report), "posted": received.posts,
                  "names": [s["name"] for s in spans]}))
"""


def test_other_exporters_work_in_an_isolated_interpreter(tmp_path: Path) -> None:
    """OTLP/JSON over HTTP and the traces file, where the SDK's batch processor (a daemon
    thread) is refused: plain threads export, and the interpreter's end flushes them.
    """
    traces = tmp_path / "traces.jsonl"
    out = run_driver(OTHER_EXPORTERS_DRIVER, str(traces), timeout=120)
    assert out["report"]["threads"].count("asynctrace-export") == 2
    assert {ct for _, ct in out["posted"]} == {"application/json"}
    assert out["names"].count("j") == 12
    lines = [json.loads(line) for line in traces.read_text().splitlines()]
    names = [
        span["name"]
        for line in lines
        for rs in line["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]
    assert names.count("j") == 12


GRPC_DRIVER = """
from concurrent import interpreters

interp = interpreters.create()
interp.exec("from tests.subinterp_export import try_grpc")
print(interp.call(eval, "try_grpc()"))
interp.close()
"""


def test_grpc_in_an_isolated_interpreter_is_a_clear_error() -> None:
    """grpcio's extension cannot load in an isolated interpreter: install() says so, names
    the protocols that work there, and leaves nothing installed.
    """
    pytest.importorskip("grpc", reason="grpcio is not installed (no 3.14t wheel)")
    out = run_driver(GRPC_DRIVER, timeout=60)
    assert "otlp_protocol: 'grpc' in this subinterpreter" in out["error"]
    assert "'http/protobuf'" in out["error"]
    assert out["installed"] is False
    assert out["threads"] == ["MainThread"]
