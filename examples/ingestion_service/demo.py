"""`make demo`: the ingestion service under load for a bounded time, then what it recorded.

Starts the service (a subprocess, instrumented by asynctrace) with one slow and one flaky
source, drives it with the load generator for --duration seconds (default 20, or until Ctrl-C),
stops it, and prints the per-operation summary and where to look: with no backend, the OTLP/JSON
file and the metrics URL; with OTEL_EXPORTER_OTLP_ENDPOINT set, Jaeger.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited early with code {proc.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=1).close()  # noqa: S310
            return
        time.sleep(0.1)
    raise SystemExit("the service did not become ready in time")


# How to run this Python from here, for the commands the demo prints (.venv/bin/python).
PYTHON = (
    os.path.relpath(sys.executable)
    if not os.path.relpath(sys.executable).startswith("..")
    else sys.executable
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument(
        "--keep",
        action="store_true",
        help="after the load, keep the service running (and /metrics served) until Ctrl-C",
    )
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    port, metrics_port = free_port(), free_port()
    traces = (args.out / "traces.jsonl").resolve()
    traces.unlink(missing_ok=True)
    log_path = (args.out / "service.log").resolve()
    cmd = [
        sys.executable, str(HERE / "service.py"), "--port", str(port),
        "--metrics-port", str(metrics_port), "--traces-file", str(traces),
        "--source", "crm:latency=0.01,priority=3",
        "--source", "partner:latency=0.12,fail=0.3,priority=0",
        "--source", "web:latency=0.005,fail=0.02,priority=2",
        "--source", "mobile:latency=0.02,priority=1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
        try:
            wait_ready(url, proc)
            print(f"service on {url}, metrics on {metrics_url}; load for {args.duration:.0f} s "
                  "(Ctrl-C stops early)")  # fmt: skip
            tasks_url = metrics_url.replace("/metrics", "/tasks")
            print(f"tasks in flight: {tasks_url}.html in a browser, {tasks_url} as JSON "
                  f"(or: {PYTHON} -m asynctrace ps {metrics_url})", flush=True)  # fmt: skip
            stop = asyncio.Event()
            loop = asyncio.new_event_loop()
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGINT, stop.set)
            stats = loop.run_until_complete(run_load(url, args.duration, args.rate, stop=stop))
            loop.close()
            metrics_text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            (args.out / "metrics.txt").write_text(metrics_text)
            if args.keep:
                print(f"load done; the service is still running on {url}, metrics on "
                      f"{metrics_url}, tasks on {tasks_url}: Ctrl-C stops it",
                      flush=True)  # fmt: skip
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    print(f"\nload: {stats.requests} requests, HTTP statuses {dict(stats.statuses)}, "
          f"failed sources {dict(stats.failed_sources)}\n")  # fmt: skip
    print(out.strip())
    print("\nwhere to look:")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        print(f"  traces: sent by OTLP to {os.environ['OTEL_EXPORTER_OTLP_ENDPOINT']}; in Jaeger "
              "(http://localhost:16686) pick service 'ingestion-service'")  # fmt: skip
    else:
        print(f"  traces: {traces} (OTLP/JSON; replay into Jaeger with the Collector's "
              "otlpjsonfile receiver, see docs/walkthrough.md)")  # fmt: skip
        print(f"    in this terminal: {PYTHON} -m asynctrace traces {traces} "
              "--slowest 5   (or --errors, --correlation-id ID)")  # fmt: skip
    print(f"  metrics: were served on {metrics_url}; the last scrape is in "
          f"{(args.out / 'metrics.txt').resolve()}")  # fmt: skip
    print(f"  logs (structlog JSON with correlation_id, trace_id): {log_path}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
