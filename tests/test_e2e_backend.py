"""End to end: the example service, a real Prometheus with the shipped rules, a real
Alertmanager, and the service's spans over real OTLP/gRPC and OTLP/HTTP.

Needs Debian's `prometheus` and `prometheus-alertmanager` (CI installs them). Without them the
tests are skipped locally and fail in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.otlp_receivers import grpc_receiver, http_receiver

ROOT = Path(__file__).resolve().parent.parent
EXPORTERS = ROOT / "exporters"
SERVICE = ROOT / "examples" / "ingestion_service" / "service.py"
LOAD = ROOT / "examples" / "ingestion_service" / "load.py"

pytestmark = pytest.mark.e2e


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed; .ci/run installs it from Debian's packages")
        pytest.skip(
            f"{binary} is not installed (apt-get install prometheus prometheus-alertmanager)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class Processes:
    """Starts processes and always stops them (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.procs.append((name, proc))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self, name: str | None = None) -> None:
        for n, proc in self.procs:
            if (name is None or n == name) and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for n, proc in self.procs:
            if name is None or n == name:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def start_service(
    procs: Processes, name: str, sources: list[str], env: dict[str, str] | None = None
) -> tuple[str, str]:
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, str(SERVICE), "--port", str(port), "--metrics-port", str(metrics),
           "--service-name", f"ingestion-{name}", "--no-summary"]  # fmt: skip
    for s in sources:
        cmd += ["--source", s]
    procs.start(name, cmd, env)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{name} /health", lambda: get_json(f"{url}/health")["ok"], 30)
    return url, f"127.0.0.1:{metrics}"


# -- configuration checks with the real tools --------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    """promtool accepts the scrape config and the rules, and the rule unit tests pass."""
    promtool = _need("promtool")
    for args in (
        ["check", "config", str(EXPORTERS / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(EXPORTERS / "prometheus" / "rules" / "asynctrace.rules.yml")],
        ["test", "rules", str(EXPORTERS / "prometheus" / "tests" / "asynctrace.rules.test.yml")],
    ):
        out = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_amtool_checks_alertmanager_config() -> None:
    """amtool accepts the Alertmanager configuration."""
    amtool = _need("amtool")
    out = subprocess.run(
        [amtool, "check-config", str(EXPORTERS / "alertmanager" / "alertmanager.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_has_firing_and_quiet_unit_tests() -> None:
    """Each alert in the rules file appears in the promtool tests with and without alerts."""
    rules = (EXPORTERS / "prometheus" / "rules" / "asynctrace.rules.yml").read_text()
    tests = (EXPORTERS / "prometheus" / "tests" / "asynctrace.rules.test.yml").read_text()
    names = re.findall(r"- alert: (\w+)", rules)
    assert len(names) == 10
    for name in names:
        blocks = [b for b in tests.split("- eval_time") if f"alertname: {name}" in b]
        assert any("exp_alerts: []" in b for b in blocks), f"{name} has no quiet test"
        assert any("exp_labels" in b for b in blocks), f"{name} has no firing test"


# -- alerts, end to end ----------------------------------------------------------------------


def _shortened_rules(tmp: Path) -> Path:
    """The shipped rules with windows and for-durations scaled down to test time."""
    text = (EXPORTERS / "prometheus" / "rules" / "asynctrace.rules.yml").read_text()
    text = re.sub(r"\[(5|10|15)m\]", "[20s]", text)
    text = re.sub(r"offset (5|10|15)m", "offset 20s", text)
    text = re.sub(r"for: \d+m", "for: 3s", text)
    path = tmp / "rules.yml"
    path.write_text(text)
    return path


class _AlertSink:
    """Alertmanager's webhook receiver: keeps every notification."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _start_prometheus(
    processes: Processes, tmp: Path, port: int, jobs: dict[str, str], am_port: int | None = None
) -> str:
    """A real Prometheus scraping ``jobs`` every second with the shortened rules; its URL."""
    prometheus = _need("prometheus")
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_shortened_rules(tmp))],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in jobs.items()
        ],
    }
    if am_port is not None:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        }
    (tmp / "prom.yml").write_text(json.dumps(config))
    processes.start("prometheus", [
        prometheus, f"--config.file={tmp / 'prom.yml'}",
        f"--storage.tsdb.path={tmp / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(
        "Prometheus ready",
        lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,
        30,
    )
    return url


HUNG_APP = """
import asyncio, sys, time, asynctrace
asynctrace.install(prometheus_port=int(sys.argv[1]), lag_interval=0.1, blocked_threshold=0.1)

async def main():
    await asyncio.sleep(float(sys.argv[2]))  # Prometheus scrapes a healthy loop first
    time.sleep(float(sys.argv[3]))  # then the loop hangs (sync work on the loop)

asyncio.run(main())
"""


def test_a_hung_loop_fires_in_prometheus(processes: Processes, tmp_path: Path) -> None:
    """A loop hung in sync work: /metrics (another thread) shows it, the Hung alert fires."""
    app_port, prom_port = free_port(), free_port()
    processes.start("hung", [sys.executable, "-c", HUNG_APP, str(app_port), "3", "40"])
    wait_for("the app's /metrics", lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{app_port}/metrics", timeout=2).status == 200, 20)  # fmt: skip
    prom = _start_prometheus(processes, tmp_path, prom_port, {"hung": f"127.0.0.1:{app_port}"})

    def firing() -> list[dict[str, Any]]:
        alerts = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts
                if a["labels"]["alertname"] == "AsynctraceEventLoopHung"
                and a["state"] == "firing"]  # fmt: skip

    (alert,) = wait_for("the hung-loop alert to fire", firing, 40)
    assert alert["labels"]["job"] == "hung"
    assert float(alert["value"]) > 5


def test_error_alert_fires_in_prometheus_and_reaches_alertmanager(
    processes: Processes, tmp_path: Path
) -> None:
    """Failing load fires the error-ratio alert for that service only; Alertmanager gets it."""
    alertmanager = _need("prometheus-alertmanager")
    sink = _AlertSink()
    try:
        healthy_url, healthy_metrics = start_service(
            processes, "healthy", ["crm:latency=0.002", "web:latency=0.002"]
        )
        failing_url, failing_metrics = start_service(
            processes, "failing", ["crm:latency=0.002,fail=1.0", "web:latency=0.002"]
        )
        am_port, prom_port = free_port(), free_port()
        (tmp_path / "am.yml").write_text(
            "route: {receiver: sink, group_by: [alertname, job], group_wait: 1s,"
            " group_interval: 1s, repeat_interval: 1h}\n"
            f"receivers: [{{name: sink, webhook_configs: [{{url: '{sink.url}'}}]}}]\n"
        )
        processes.start("alertmanager", [
            alertmanager, f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
        ])  # fmt: skip
        prom = _start_prometheus(
            processes, tmp_path, prom_port,
            {"healthy": healthy_metrics, "failing": failing_metrics}, am_port,
        )  # fmt: skip
        for name, url in (("load-healthy", healthy_url), ("load-failing", failing_url)):
            processes.start(name, [sys.executable, str(LOAD), "--url", url, "--duration", "60",
                                   "--rate", "15"])  # fmt: skip

        def firing() -> list[dict[str, Any]]:
            alerts = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "AsynctraceTaskErrorRatioHigh"
                    and a["state"] == "firing"]  # fmt: skip

        alerts = wait_for("the error-ratio alert to fire", firing, 60)
        assert {a["labels"]["job"] for a in alerts} == {"failing"}
        assert {a["labels"]["operation"] for a in alerts} <= {"fetch", "normalize"}

        am_alerts = wait_for(
            "Alertmanager to hold the alert",
            lambda: [a for a in get_json(f"http://127.0.0.1:{am_port}/api/v2/alerts")
                     if a["labels"]["alertname"] == "AsynctraceTaskErrorRatioHigh"],
            30,
        )  # fmt: skip
        assert {a["labels"]["job"] for a in am_alerts} == {"failing"}
        wait_for("the webhook notification", lambda: sink.notifications, 30)
        assert sink.notifications[0]["status"] == "firing"

        # The healthy service fired none of the error alerts, not even pending.
        alerts = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
        error_alerts = ("AsynctraceTaskErrorRatioHigh", "AsynctraceTelemetryDropped")
        healthy_errors = [
            a for a in alerts
            if a["labels"].get("job") == "healthy" and a["labels"]["alertname"] in error_alerts
        ]  # fmt: skip
        assert healthy_errors == []
    finally:
        sink.close()


# -- traces over real OTLP ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_request_tree_over_otlp(processes: Processes, protocol: str) -> None:
    """One request: one trace continuing the caller's, parent links, ids, error on failure."""
    if protocol == "grpc":
        pytest.importorskip("grpc", reason="grpcio is not installed (no 3.14t wheel)")
    receiver = grpc_receiver() if protocol == "grpc" else http_receiver()
    endpoint, received = next(receiver)
    try:
        url, _ = start_service(
            processes, "traced", ["crm:latency=0.002,fail=1.0", "web:latency=0.002"],
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol},
        )  # fmt: skip
        trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"documents": [
            {"source": "crm", "id": "1", "body": "A  b"},
            {"source": "web", "id": "2", "body": "C d"},
            {"source": "web", "id": "3", "body": "E"},
        ]}).encode()  # fmt: skip
        request = urllib.request.Request(
            f"{url}/ingest", data=body, method="POST",
            headers={"Content-Type": "application/json", "X-Request-ID": "req-e2e-1",
                     "traceparent": f"00-{trace_id}-{caller_span}-01"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = json.loads(r.read())
            assert r.headers["X-Request-ID"] == "req-e2e-1"
        assert answer == {"stored": 2, "failed_sources": ["crm"], "sources": ["crm", "web"],
                          "request_id": "req-e2e-1"}  # fmt: skip
        processes.stop("traced")  # SIGTERM: the service flushes its spans on the way out
        spans = [s for s in received.snapshot() if s["trace_id"] == trace_id]
        names = sorted(s["name"] for s in spans)
        assert names == sorted(
            ["POST /ingest", "normalize", "normalize", "fetch", "fetch", "store"]
        )
        by_id = {s["span_id"]: s for s in spans}
        root = next(s for s in spans if s["name"] == "POST /ingest")
        assert root["parent_span_id"] == caller_span  # continues the caller's trace
        for s in spans:
            assert s["resource"]["service.name"] == "ingestion-traced"
            if s is not root:
                parent = by_id[s["parent_span_id"]]
                expected = {"normalize": "POST /ingest", "store": "POST /ingest",
                            "fetch": "normalize"}[s["name"]]  # fmt: skip
                assert parent["name"] == expected
                assert s["attributes"]["asynctrace.correlation_id"] == "req-e2e-1"
        failed = [s for s in spans if s["status_code"] == 2]  # ERROR
        assert sorted(s["name"] for s in failed) == ["fetch", "normalize"]
        assert all(s["attributes"]["asyncio.task.outcome"] == "exception" for s in failed)
    finally:
        receiver.close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    request = urllib.request.Request(
        f"{url}/ingest", data=body, method="POST",
        headers={"Content-Type": "application/json", **headers},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers["X-Request-ID"]
    except urllib.error.HTTPError as err:
        with err:  # an HTTPError holds the response open
            return err.code, json.loads(err.read()), err.headers["X-Request-ID"]


def test_service_correlation_ids_and_bad_input(processes: Processes) -> None:
    """X-Request-ID wins; else traceparent's trace id; else a fresh id; bad bodies get a 400."""
    url, _ = start_service(processes, "ids", ["web:latency=0.001"])
    docs = json.dumps({"documents": [{"source": "web", "id": "1", "body": "x"}]}).encode()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"

    status, body, rid = _post(url, docs, {"X-Request-ID": "given-1", "traceparent": traceparent})
    assert (status, rid, body["request_id"]) == (200, "given-1", "given-1")
    status, body, rid = _post(url, docs, {"traceparent": traceparent})
    assert (status, rid) == (200, trace_id)
    status, body, rid = _post(url, docs, {})
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert rid != trace_id

    status, body, rid = _post(url, b'{"documents": 5}', {"X-Request-ID": "bad-1"})
    assert status == 400
    assert rid == "bad-1"
    assert '"documents" must be a list' in body["error"]
    status, body, _ = _post(url, b"not json", {})
    assert status == 400
    assert body["error"].startswith("invalid body:")


def test_service_exits_on_sigterm_promptly_with_a_hung_collector(processes: Processes) -> None:
    """The collector accepts and never answers: SIGTERM still ends the service within its
    shutdown bound (5 s by default), the queued spans dropped and counted.
    """
    from tests import faulty_collectors  # noqa: PLC0415

    with faulty_collectors.silent() as collector:
        url, _ = start_service(
            processes, "sigterm", ["web:latency=0.001"],
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector},
        )  # fmt: skip
        docs = json.dumps({"documents": [{"source": "web", "id": "1", "body": "x"}]}).encode()
        for _ in range(20):
            assert _post(url, docs, {})[0] == 200
        start = time.monotonic()
        processes.stop("sigterm")
        took = time.monotonic() - start
    assert took < 9, f"the service took {took:.1f} s to exit after SIGTERM"
    log = processes.log("sigterm")
    # The spans are reported lost either way: still queued when the bound ran out, or in a
    # request that timed out (5 s) before it did (the lane sends within 1 s of a span's end,
    # so its first request may already be hanging when SIGTERM comes).
    cut_off = "did not finish within 5.0 s" in log
    failed = "OTLP exporter (http/protobuf" in log and "telemetry goes on" in log
    assert cut_off or failed, log[-2000:]


def test_service_refuses_bad_input_without_a_500(processes: Processes) -> None:
    """Bad ids get a fresh one (the rejection logged, escaped); bad bodies 400/413, as JSON."""
    url, _ = start_service(processes, "bad", ["web:latency=0.001"])
    docs = json.dumps({"documents": [{"source": "web", "id": "1", "body": "x"}]}).encode()
    for bad in ("x" * 129, "has\ttab", "\xff\xfe not utf-8"):
        status, body, rid = _post(url, docs, {"X-Request-ID": bad})
        assert status == 200, bad
        assert rid == body["request_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid  # a fresh id, not the bad one
    log = processes.log("bad")
    assert log.count("rejected X-Request-ID") == 3
    assert "\\t" in log  # the tab was logged escaped, not as a tab

    cases = [
        (b'{"documents": [1]}', 400, "documents[0] must be an object"),
        (b'{"documents": [null]}', 400, "documents[0] must be an object"),
        (b'{"documents": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "invalid body"),
        (json.dumps({"documents": [[[[[[[[[1]]]]]]]]]}).encode(), 400, "nested deeper"),
        (json.dumps({"documents": [{"source": f"s{i}"} for i in range(33)]}).encode(),
         400, "33 sources; at most 32"),
        (json.dumps({"documents": [{"source": "web"}] * 2001}).encode(), 400, "at most 2000"),
        (json.dumps({"documents": [{"source": "web", "body": "x" * 600_000}]}).encode(),
         413, "body over"),
    ]  # fmt: skip
    for body_bytes, expected, text in cases:
        status, body, rid = _post(url, body_bytes, {"X-Request-ID": "bad-body"})
        assert (status, rid) == (expected, "bad-body"), (body_bytes[:40], body)
        assert text in body["error"], body
    assert "Traceback" not in processes.log("bad")
    status, _, _ = _post(url, docs, {})  # and the service still serves
    assert status == 200


def _load_module() -> Any:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("ingestion_load", SERVICE.parent / "load.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_each_request_under_load_is_its_own_trace(processes: Processes) -> None:
    """The example under the load generator, spans by OTLP to a real receiver: N requests,
    N traces, each holding that request's tasks only; the server's own tasks hold none.
    """
    import asyncio  # noqa: PLC0415

    receiver = http_receiver()
    endpoint, received = next(receiver)
    try:
        url, _ = start_service(
            processes, "load", ["crm:latency=0.002,fail=0.3", "web:latency=0.002", "mobile"],
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        )  # fmt: skip
        stats = asyncio.run(_load_module().run_load(url, duration=3.0, rate=20.0))
        processes.stop("load")  # SIGTERM: the service flushes its spans on the way out
    finally:
        receiver.close()
    assert stats.errors == 0
    assert stats.statuses == {200: stats.requests}
    assert stats.requests >= 20
    request_ids = set(stats.request_ids)
    assert len(request_ids) == stats.requests
    request_names = {"POST /ingest", "normalize", "fetch", "store"}
    traces: dict[str, list[dict[str, Any]]] = {}
    for s in received.snapshot():
        traces.setdefault(s["trace_id"], []).append(s)
    request_traces = {t: spans for t, spans in traces.items()
                      if any(s["name"] == "POST /ingest" for s in spans)}  # fmt: skip
    assert len(request_traces) == stats.requests  # N requests, N traces
    seen_ids = set()
    for spans in request_traces.values():
        ids = {s["attributes"].get("asynctrace.correlation_id") for s in spans}
        assert len(ids) == 1, ids  # one request per trace
        seen_ids |= ids
        assert {s["name"] for s in spans} <= request_names
        assert sum(s["name"] == "POST /ingest" for s in spans) == 1
        assert any(s["name"] == "normalize" for s in spans)
    assert seen_ids == request_ids  # every request's trace, and no other
    for t, spans in traces.items():
        if t not in request_traces:  # the server's own tasks
            assert not {s["name"] for s in spans} & request_names
            ids = {s["attributes"].get("asynctrace.correlation_id") for s in spans}
            assert not ids & request_ids
