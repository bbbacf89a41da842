"""Fork safety: a forked child starts clean, exits promptly, and never exports twice.

Each child reports over a pipe (or a multiprocessing result) and must end within a bound.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from tests.otlp_receivers import Received, http_receiver

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    yield from http_receiver()


async def work(n: int) -> int:
    return await asynctrace.create_task(asyncio.sleep(0, n), operation_name="work")


def run_work(n: int) -> list[int]:
    async def main() -> list[int]:
        return list(await asyncio.gather(*(work(i) for i in range(n))))

    return asyncio.run(main())


def _child_report() -> dict[str, object]:
    """What the child sees: nothing installed; a new install works and counts only its own."""
    report: dict[str, object] = {"uninstall": asynctrace.uninstall()}
    try:
        asynctrace.summary()
    except RuntimeError:
        report["summary"] = "not installed"
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    report["results"] = run_work(3)
    report["created"] = registry.get_sample_value(
        "asynctrace_tasks_created_total", {"operation": "work"}
    )
    asynctrace.shutdown()
    return report


FORK_SCRIPT = """
import asyncio, json, os, select, sys, time, urllib.request
import asynctrace
from prometheus_client import CollectorRegistry
from tests.test_fork import _child_report, run_work

asynctrace.install(otlp_endpoint=sys.argv[1], registry=CollectorRegistry(), prometheus_port=0,
                   shutdown_timeout=2)
assert run_work(5) == list(range(5))  # spans queued in the parent, not yet exported
metrics_url = asynctrace.summary().metrics_url
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child reports, then exits normally: its atexit handlers run
    os.close(read)
    os.write(write, json.dumps(_child_report()).encode())
    os.close(write)
    sys.exit(0)
os.close(write)
start = time.monotonic()
assert select.select([read], [], [], 20)[0], "no report from the child"
report = json.loads(os.read(read, 65536))
_, status = os.waitpid(pid, 0)
took = time.monotonic() - start
with urllib.request.urlopen(metrics_url, timeout=5) as r:
    serving = b"asynctrace_tasks_created_total" in r.read()
flushed = asynctrace.flush(10)
print(json.dumps({"report": report, "status": os.waitstatus_to_exitcode(status),
                  "took": took, "serving": serving, "flushed": flushed}))
"""


def test_os_fork_child_starts_clean_and_exits_promptly(receiver: tuple[str, Received]) -> None:
    """The child: nothing installed, no parent's counts, a prompt normal exit; spans once.

    Run in a fresh interpreter, so that the child exits as a program does (atexit handlers
    and all), which used to wait forever for the parent's /metrics server thread.
    """
    url, received = receiver
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == 0
    assert out["took"] < 10, out
    assert out["report"] == {
        "uninstall": False,
        "summary": "not installed",
        "results": [0, 1, 2],
        "created": 3.0,  # its own tasks only
    }
    assert out["serving"] is True  # the parent is untouched
    assert out["flushed"] is True
    spans = received.snapshot()
    ops = [s for s in spans if s["attributes"].get("asynctrace.operation") == "work"]
    # the parent's five tasks, once each: the child never exported the parent's queue (and
    # its own tasks were not traced: it installed metrics only)
    assert len(ops) == 5
    assert len({s["span_id"] for s in spans}) == len(spans)


def _mp_worker(n: int) -> dict[str, object]:
    return {"installed_before": asynctrace.uninstall(), **_child_report(), "n": n}


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers(method: str) -> None:
    """multiprocessing's fork and spawn workers start clean; the parent keeps its telemetry."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False, shutdown_timeout=2)
    assert run_work(2) == [0, 1]
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        reports = pool.map_async(_mp_worker, [1, 2]).get(timeout=60)
    for n, report in enumerate(reports, start=1):
        assert report["installed_before"] is False
        assert report["summary"] == "not installed"
        assert report["created"] == 3.0
        assert report["n"] == n
    assert registry.get_sample_value("asynctrace_tasks_created_total", {"operation": "work"}) == 2
