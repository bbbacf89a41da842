"""The backend side under exporters/: the compose stack is whole, the dashboard is scoped.

- Every host the shipped Alertmanager and Prometheus configs send to is a service of
  docker-compose.yml (the webhook once pointed at an ``alert-sink`` nobody defined).
- The alert sink (exporters/alert-sink/sink.py) receives a real Alertmanager's notification,
  routed by the shipped alertmanager.yml (pages to /on-call).
- The Grafana dashboard has job and instance variables, every query filters on both, and
  every query is valid PromQL (promtool).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_e2e_backend import _need, free_port

EXPORTERS = Path(__file__).resolve().parent.parent / "exporters"
SINK = EXPORTERS / "alert-sink" / "sink.py"


def _compose_services() -> set[str]:
    text = (EXPORTERS / "docker-compose.yml").read_text()
    services = text.split("\nservices:\n", 1)[1]
    return set(re.findall(r"^  ([a-z][a-z0-9-]*):\s*$", services, re.MULTILINE))


def test_every_host_the_configs_send_to_is_a_compose_service() -> None:
    services = _compose_services()
    assert {"ingestion", "jaeger", "prometheus", "alertmanager", "alert-sink"} <= services
    alertmanager = (EXPORTERS / "alertmanager" / "alertmanager.yml").read_text()
    prometheus = (EXPORTERS / "prometheus" / "prometheus.yml").read_text()
    hosts = set(re.findall(r"url: http://([a-z][a-z0-9-]*):\d+", alertmanager))
    hosts |= set(re.findall(r"[\"' \[]([a-z][a-z0-9-]*):\d{4}\b", prometheus)) - {"localhost"}
    assert hosts
    assert hosts <= services, hosts - services


def _start_sink(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(SINK), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["listening"]
    return proc, port


def test_alert_sink_prints_each_notification(tmp_path: Path) -> None:
    proc, port = _start_sink(tmp_path)
    try:
        payload = {
            "status": "firing",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "AsynctraceEventLoopHung", "job": "svc"},
                    "annotations": {"summary": "loop hung"},
                }
            ],
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/on-call",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/x", data=b"not json")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=5)
        refused.value.close()
        assert refused.value.code == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    first, second = (json.loads(line) for line in out.splitlines()[:2])
    assert first["path"] == "/on-call"
    assert first["alerts"][0]["alertname"] == "AsynctraceEventLoopHung"
    assert first["alerts"][0]["summary"] == "loop hung"
    assert "error" in second


@pytest.mark.e2e
def test_shipped_alertmanager_config_pages_the_sink(tmp_path: Path) -> None:
    """A real Alertmanager with the shipped routing (only the sink's host and the waits
    changed) delivers a page to the sink's /on-call and a ticket to /team-queue.
    """
    alertmanager = _need("prometheus-alertmanager")
    sink, sink_port = _start_sink(tmp_path)
    config = (EXPORTERS / "alertmanager" / "alertmanager.yml").read_text()
    config = config.replace("alert-sink:8080", f"127.0.0.1:{sink_port}")
    config = config.replace("group_wait: 30s", "group_wait: 1s")
    (tmp_path / "am.yml").write_text(config)
    am_port = free_port()
    am = subprocess.Popen(
        [
            alertmanager, f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        alerts = [
            {"labels": {"alertname": "AsynctraceEventLoopHung", "job": "svc", "severity": "page"}},
            {"labels": {"alertname": "AsynctraceTaskP99DurationHigh", "job": "svc",
                        "operation": "fetch", "severity": "ticket"}},
        ]  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{am_port}/api/v2/alerts",
                    data=json.dumps(alerts).encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(request, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert sink.stdout is not None
        seen: dict[str, Any] = {}
        while len(seen) < 2 and time.monotonic() < deadline + 30:
            line = json.loads(sink.stdout.readline())
            seen[line["path"]] = line
    finally:
        am.terminate()
        am.wait(10)
        sink.terminate()
        sink.communicate(timeout=10)
    assert seen["/on-call"]["alerts"][0]["alertname"] == "AsynctraceEventLoopHung"
    assert seen["/team-queue"]["alerts"][0]["alertname"] == "AsynctraceTaskP99DurationHigh"


def _dashboard_queries() -> tuple[dict[str, Any], list[str]]:
    dashboard = json.loads((EXPORTERS / "grafana" / "dashboards" / "asynctrace.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    return dashboard, exprs


def test_dashboard_has_job_and_instance_variables() -> None:
    dashboard, exprs = _dashboard_queries()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"job", "instance"}
    assert "label_values(asynctrace_tasks_created_total, job)" in variables["job"]["definition"]
    assert "$job" in variables["instance"]["definition"]
    assert exprs
    for expr in exprs:
        for metric in re.findall(r"asynctrace_[a-z_]+(?:\{[^}]*\})?", expr):
            assert 'job=~"$job"' in metric, metric
            assert 'instance=~"$instance"' in metric, metric


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _need("promtool")
    _, exprs = _dashboard_queries()
    rules = tmp_path / "dashboard.rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        concrete = concrete.replace("$instance", ".*")
        lines += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(concrete)}"]
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
