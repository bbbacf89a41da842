"""Take the walkthrough's screenshots with headless Chromium (Debian's package).

Starts the service with a failing source plus a real Prometheus with the shipped rules (windows
shortened so alerts fire within a minute), drives load, then captures: the summary, the
/metrics page and Prometheus's alerts page, into docs/img/.

    python examples/ingestion_service/screenshots.py
"""

from __future__ import annotations

import html
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
IMG = ROOT / "docs" / "img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shoot(url: str, path: Path, size: str = "1280,860") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
             f"--window-size={size}", "--virtual-time-budget=8000", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(f"written: {path}")


def main() -> int:
    IMG.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    port, metrics, prom_port = free_port(), free_port(), free_port()
    rules = (ROOT / "exporters/prometheus/rules/asynctrace.rules.yml").read_text()
    rules = re.sub(r"for: \d+m", "for: 5s", re.sub(r"\[(5|10|15)m\]", "[30s]", rules))
    (tmp / "rules.yml").write_text(rules)
    (tmp / "prom.yml").write_text(json.dumps({
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [{"job_name": "ingestion-service",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}],
    }))  # fmt: skip
    service = subprocess.Popen(
        [sys.executable, str(HERE / "service.py"), "--port", str(port), "--metrics-port",
         str(metrics), "--traces-file", str(tmp / "traces.jsonl"),
         "--source", "partner:latency=0.12,fail=0.4", "--source", "web:latency=0.005",
         "--source", "crm:latency=0.01", "--source", "mobile:latency=0.02"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prom.yml'}", f"--storage.tsdb.path={tmp / 'db'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(3)
        load = subprocess.run(
            [sys.executable, str(HERE / "load.py"), "--url", f"http://127.0.0.1:{port}",
             "--duration", "45", "--rate", "30"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        print(load.stdout.strip())
        shoot(f"http://127.0.0.1:{metrics}/metrics", IMG / "metrics-page.png", "1280,900")
        # Debian's Prometheus 2.42 serves the classic UI under /classic.
        alerts = f"http://127.0.0.1:{prom_port}/classic/alerts"
        shoot(alerts, IMG / "prometheus-alerts.png", "1280,1000")
        shoot(
            f"http://127.0.0.1:{prom_port}/graph?g0.expr="
            + urllib.request.quote(
                "histogram_quantile(0.99, sum by (operation, le) "
                "(rate(asynctrace_task_duration_seconds_bucket[30s])))"
            )
            + "&g0.tab=0&g0.range_input=5m",
            IMG / "prometheus-p99.png",
        )
    finally:
        prometheus.send_signal(signal.SIGTERM)
        service.send_signal(signal.SIGTERM)
        summary, _ = service.communicate(timeout=30)
        prometheus.wait(timeout=30)
    page = tmp / "summary.html"
    page.write_text(
        "<html><body style='background:#111;color:#eee;margin:16px'><pre style='font-size:15px'>"
        "$ make demo\n...\n" + html.escape(summary) + "</pre></body></html>"
    )
    shoot(page.as_uri(), IMG / "summary.png", "900,260")
    return 0


if __name__ == "__main__":
    sys.exit(main())
