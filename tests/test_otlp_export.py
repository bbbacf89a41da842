"""The one-call export: OTLP to real receivers, the OTLP/JSON file, /metrics, shutdown, summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from tests.otlp_receivers import Received, grpc_receiver, http_receiver


@pytest.fixture
def otlp_http() -> Iterator[tuple[str, Received]]:
    yield from http_receiver()


@pytest.fixture
def otlp_grpc() -> Iterator[tuple[str, Received]]:
    yield from grpc_receiver()


async def leaf() -> None:
    await asyncio.sleep(0)


async def failing() -> None:
    await asyncio.sleep(0)
    raise ValueError("source down")


async def request(n: int) -> None:
    with asynctrace.correlation(f"req-{n}"):
        await asyncio.gather(
            asynctrace.create_task(leaf(), operation_name="normalize"),
            asynctrace.create_task(failing(), operation_name="fetch"),
            return_exceptions=True,
        )


MAIN = "run_requests.<locals>.main"


def run_requests(count: int = 3) -> None:
    async def main() -> None:
        for n in range(count):
            await asynctrace.create_task(request(n), operation_name="request")

    asyncio.run(main())


def test_otlp_http_export(otlp_http: tuple[str, Received]) -> None:
    """install(service_name, otlp_endpoint) sends every task span over OTLP/HTTP."""
    url, received = otlp_http
    asynctrace.install(service_name="ingest", otlp_endpoint=url, registry=CollectorRegistry())
    run_requests()
    asynctrace.shutdown()  # flushes
    spans = received.snapshot()
    names = sorted(s["name"] for s in spans)
    # asyncio.run's main task is a task too; each request() enters its own correlation block
    assert names == sorted(["request", "correlation", "normalize", "fetch"] * 3 + [MAIN])
    assert {s["resource"]["service.name"] for s in spans} == {"ingest"}
    by_id = {s["span_id"]: s for s in spans}
    (main,) = [s for s in spans if s["name"] == MAIN]
    for s in spans:
        if s["name"] == "request":  # the server's own tasks: in main's trace
            assert by_id[s["parent_span_id"]]["name"] == MAIN
            assert s["trace_id"] == main["trace_id"]
        elif s["name"] == "correlation":  # each request: a trace of its own, linked back
            assert s["parent_span_id"] is None
            assert s["trace_id"] != main["trace_id"]
            (link,) = s["links"]
            assert by_id[link[1]]["name"] == "request"
            assert link[0] == main["trace_id"]
        elif s["name"] != MAIN:
            parent = by_id[s["parent_span_id"]]
            assert parent["name"] == "correlation"
            assert parent["trace_id"] == s["trace_id"]
    # one trace per correlation id, and each id in one trace only
    traces: dict[str, set[str]] = {}
    for s in spans:
        traces.setdefault(s["trace_id"], set()).add(s["attributes"]["asynctrace.correlation_id"])
    assert all(len(ids) == 1 for ids in traces.values()), traces
    assert len(traces) == 4
    assert {s["status_code"] for s in spans if s["name"] == "fetch"} == {2}  # ERROR


def test_otlp_grpc_export_from_env(
    otlp_grpc: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard OTEL_* variables configure the export (gRPC here)."""
    url, received = otlp_grpc
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    asynctrace.install(registry=CollectorRegistry())
    run_requests(1)
    asynctrace.shutdown()
    spans = received.snapshot()
    assert len(spans) == 5  # main, request, its correlation block, normalize, fetch
    assert {s["resource"]["service.name"] for s in spans} == {"from-env"}


def test_file_is_the_embedded_default(tmp_path: Path) -> None:
    """With no endpoint, spans go to an OTLP/JSON file (hex ids, one request per line)."""
    path = tmp_path / "traces.jsonl"
    asynctrace.install(service_name="local", traces_file=str(path), registry=CollectorRegistry())
    run_requests(2)
    asynctrace.shutdown()
    lines = path.read_text().splitlines()
    assert lines
    spans = []
    for line in lines:
        doc = json.loads(line)
        for rs in doc["resourceSpans"]:
            attrs = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
            assert attrs["service.name"] == {"stringValue": "local"}
            for ss in rs["scopeSpans"]:
                spans.extend(ss["spans"])
    assert len(spans) == 9  # main and 2 x (request, correlation, normalize, fetch)
    assert all(len(s["traceId"]) == 32 and len(s["spanId"]) == 16 for s in spans)
    int(spans[0]["traceId"], 16)  # hex, not base64
    assert {s["name"] for s in spans} == {"request", "correlation", "normalize", "fetch", MAIN}


def test_collector_down_never_breaks_the_app(caplog: pytest.LogCaptureFixture) -> None:
    """An unreachable collector: tasks run on unchanged; the failure is logged once, counted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once we leave the block
    registry = CollectorRegistry()

    async def main() -> list[int]:
        asynctrace.install(otlp_endpoint=dead, registry=registry)

        async def work(i: int) -> int:
            await asyncio.sleep(0)
            return i

        return await asyncio.gather(*(work(i) for i in range(50)))

    with caplog.at_level(logging.ERROR, logger="asynctrace"):
        assert asyncio.run(main()) == list(range(50))
        asynctrace.shutdown()
    errors = asynctrace.telemetry_errors()
    assert errors == {}  # shutdown reset the counts; check what was logged instead
    logged = [
        r for r in caplog.records if f"OTLP exporter (http/protobuf, {dead}" in r.getMessage()
    ]
    assert len(logged) == 1


def test_collector_down_is_counted_in_metrics() -> None:
    """Failed exports show up in asynctrace_telemetry_errors_total and spans_dropped_total."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    registry = CollectorRegistry()
    asynctrace.install(otlp_endpoint=dead, registry=registry, loop_monitor=False)
    run_requests(2)
    assert asynctrace.flush(10) is True  # every queued span went to the (dead) exporter
    source = f"OTLP exporter (http/protobuf, {dead}/v1/traces)"
    assert (registry.get_sample_value("asynctrace_telemetry_errors_total", {"source": source})
            or 0) >= 1  # fmt: skip
    dropped = registry.get_sample_value("asynctrace_spans_dropped_total")
    assert dropped is not None
    assert dropped >= 6


def test_metrics_endpoint_serves_and_stops() -> None:
    """prometheus_port serves /metrics on 127.0.0.1; shutdown closes it."""
    asynctrace.install(prometheus_port=0, registry=CollectorRegistry(), loop_monitor=False)
    summary = asynctrace.summary()
    assert summary.metrics_url is not None
    assert summary.metrics_url.startswith("http://127.0.0.1:")
    run_requests(1)
    with urllib.request.urlopen(summary.metrics_url, timeout=5) as response:
        body = response.read().decode()
    assert 'asynctrace_tasks_created_total{operation="normalize"} 1.0' in body
    asynctrace.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(summary.metrics_url, timeout=2)


def test_summary_table() -> None:
    """summary() gives count, quantiles, errors and cancelled per operation."""
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    run_requests(4)
    summary = asynctrace.summary()
    rows = {r.operation: r for r in summary.rows}
    assert rows["fetch"].count == 4
    assert rows["fetch"].errors == 4
    assert rows["normalize"].errors == 0
    p50 = rows["request"].quantile(0.5)
    assert p50 is not None
    assert p50 > 0
    text = str(summary)
    assert text.splitlines()[0].split() == [
        "operation", "count", "p50", "ms", "p95", "ms", "p99", "ms", "errors", "cancelled",
    ]  # fmt: skip
    assert any(line.startswith("fetch ") for line in text.splitlines())


def test_summary_needs_install() -> None:
    """summary() without an installation says what is missing."""
    with pytest.raises(RuntimeError, match="needs asynctrace.install"):
        asynctrace.summary()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"otlp_protocol": "thrift"}, ValueError, "Invalid otlp_protocol: 'thrift'"),
        ({"prometheus_port": 70000}, ValueError, "Invalid prometheus_port: 70000"),
        ({"task_filter": 5}, TypeError, "Invalid task_filter: 5"),
        ({"registry": "r"}, TypeError, "Invalid registry: 'r'"),
        ({"max_operations": 0}, ValueError, "Invalid max_operations: 0"),
        ({"lag_interval": -1}, ValueError, "Invalid lag_interval: -1"),
    ],
)
def test_bad_telemetry_options(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Bad options fail at install, naming the value, with nothing installed or started."""
    with pytest.raises(error, match=re.escape(message)):
        asynctrace.install(**kwargs)  # type: ignore[arg-type]
    assert asynctrace.uninstall() is False


def test_bad_port_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad ASYNCTRACE_PROMETHEUS_PORT is reported with its value."""
    monkeypatch.setenv("ASYNCTRACE_PROMETHEUS_PORT", "nine")
    with pytest.raises(ValueError, match="Invalid ASYNCTRACE_PROMETHEUS_PORT: 'nine'"):
        asynctrace.install()


def test_app_provider_is_kept(tmp_path: Path) -> None:
    """An app that set its own TracerProvider keeps it (fresh process: the global is set once)."""
    script = textwrap.dedent(
        """
        import asyncio, asynctrace
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        exporter = InMemorySpanExporter()
        app = TracerProvider()
        app.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(app)
        asynctrace.install(service_name="ignored", traces_file="should-not-exist.jsonl")
        async def work():
            await asyncio.sleep(0)
        async def main():
            await asynctrace.create_task(work(), operation_name="w")
        asyncio.run(main())
        assert trace.get_tracer_provider() is app
        assert "w" in [s.name for s in exporter.get_finished_spans()]
        asynctrace.shutdown()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert not (tmp_path / "should-not-exist.jsonl").exists()


def test_busy_metrics_port_is_named_and_nothing_is_left() -> None:
    """A port already in use fails install() naming it; nothing stays installed or running."""
    import threading  # noqa: PLC0415

    threads_before = threading.active_count()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"Cannot serve /metrics on 127.0.0.1:{port}"):
            asynctrace.install(prometheus_port=port, registry=CollectorRegistry())
    assert asynctrace.uninstall() is False
    assert threading.active_count() == threads_before


def test_meter_provider_records_otel_metrics() -> None:
    """With meter_provider=, task metrics are also recorded as OpenTelemetry instruments."""
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    asynctrace.install(meter_provider=provider, registry=CollectorRegistry(), loop_monitor=False)
    run_requests(2)
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    created = {
        p.attributes["asynctrace.operation"]: p.value
        for p in metrics["asynctrace.task.created"].data.data_points
    }
    assert created["fetch"] == 2
    durations = {
        (p.attributes["asynctrace.operation"], p.attributes["asyncio.task.outcome"]): p.count
        for p in metrics["asynctrace.task.duration"].data.data_points
    }
    assert durations[("fetch", "exception")] == 2
    assert durations[("normalize", "finished")] == 2
    in_flight = {
        p.attributes["asynctrace.operation"]: p.value
        for p in metrics["asynctrace.task.in_flight"].data.data_points
    }
    assert in_flight["fetch"] == 0
    provider.shutdown()


def test_meter_provider_counts_cancellations_by_reason() -> None:
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    asynctrace.install(meter_provider=provider, registry=CollectorRegistry(), loop_monitor=False)

    async def main() -> None:
        task = asynctrace.create_task(asyncio.sleep(10), operation_name="slow")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 0.01)

    try:
        asyncio.run(main())
    finally:
        asynctrace.uninstall()
    data = reader.get_metrics_data()
    assert data is not None
    (metric,) = [
        m
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "asynctrace.task.cancellations"
    ]
    points = {
        (p.attributes["asynctrace.operation"], p.attributes["asyncio.task.cancel.reason"]): p.value
        for p in metric.data.data_points
    }
    assert points == {("slow", "timeout"): 1}
    provider.shutdown()


def test_spans_are_flushed_at_exit(tmp_path: Path) -> None:
    """Without an explicit shutdown(), the spans still queued are written at interpreter exit."""
    script = textwrap.dedent(
        """
        import asyncio, asynctrace
        asynctrace.install(service_name="exit", traces_file="t.jsonl")
        async def work():
            await asyncio.sleep(0)
        async def main():
            await asyncio.gather(*(asynctrace.create_task(work(), operation_name="w")
                                   for _ in range(5)))
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = [
        s["name"]
        for line in (tmp_path / "t.jsonl").read_text().splitlines()
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    ]
    assert names.count("w") == 5


def test_every_span_is_exported_or_counted_when_the_queue_is_full() -> None:
    """asynctrace's own processor gate counts what does not fit: exported + dropped = ended.

    The exporter blocks until released, so spans pile up beyond the queue's bound; nothing is
    read from the SDK's internals.
    """
    import threading  # noqa: PLC0415

    from opentelemetry.sdk.trace import ReadableSpan  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: PLC0415
    from opentelemetry.trace import SpanContext, TraceFlags  # noqa: PLC0415

    from asynctrace.export.otlp import (  # noqa: PLC0415
        CountingExporter,
        CountingProcessor,
        SpanDrops,
    )

    release = threading.Event()
    exported: list[ReadableSpan] = []

    class Blocked(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)
            exported.extend(spans)
            return SpanExportResult.SUCCESS

    drops = SpanDrops()
    processor = CountingProcessor(CountingExporter(Blocked(), "blocked", drops), drops, 10)
    ended = 30
    for i in range(1, ended + 1):
        context = SpanContext(i, i, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        processor.on_end(ReadableSpan(name=f"s{i}", context=context))
    # at most the queue's 10 wait, and at most one batch (the queue's size) is being exported
    assert drops.total_dropped() >= ended - 2 * 10
    release.set()
    processor.shutdown()
    assert len(exported) + drops.total_dropped() == ended
    assert len({s.name for s in exported}) == len(exported)
