"""`make demo DEMO_ARGS=--keep`: the service stays up for a look after the load, until Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "ingestion_service" / "demo.py"


@pytest.mark.e2e
def test_keep_leaves_metrics_served_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--duration", "1", "--rate", "10", "--out", str(tmp_path),
         "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = seen = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen += line
            if "still running" in line or not line:
                break
        match = re.search(r"metrics on (http://\S+/metrics)", line)
        assert match, line
        time.sleep(0.5)
        body = urllib.request.urlopen(match.group(1), timeout=5).read().decode()
        assert "asynctrace_tasks_created_total" in body
        tasks = match.group(1).replace("/metrics", "/tasks")
        view = urllib.request.urlopen(tasks, timeout=5).read().decode()
        assert '"loops"' in view
        assert f"{tasks}.html in a browser" in seen
        page = urllib.request.urlopen(tasks + ".html", timeout=5).read().decode()
        assert "<title>asynctrace: tasks in flight</title>" in page
        assert proc.poll() is None  # still up after the load
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "where to look" in rest
    assert proc.returncode == 0
