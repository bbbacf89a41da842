"""The standard OpenTelemetry variables mean what the specification says, to a real receiver."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from tests.otlp_receivers import Received, http_receiver


async def request() -> None:
    with asynctrace.correlation("req-env"):
        await asynctrace.create_task(asyncio.sleep(0), operation_name="work")


def run_and_flush() -> asynctrace.Summary:
    asyncio.run(request())
    asynctrace.flush(10)
    return asynctrace.summary()


@pytest.fixture
def custom_path_receiver() -> Iterator[tuple[str, Received]]:
    yield from http_receiver("/otlp/custom/traces")


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    yield from http_receiver()


def names(received: Received) -> set[str]:
    return {s["name"] for s in received.snapshot()}


def test_traces_endpoint_is_used_as_given(
    custom_path_receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the full URL: nothing is appended to it."""
    url, received = custom_path_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{url}/otlp/custom/traces")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    summary = run_and_flush()
    assert {"correlation", "work"} <= names(received)
    assert {path for path, _ in received.posts} == {"/otlp/custom/traces"}
    assert summary.otlp_endpoint == f"{url}/otlp/custom/traces"


def test_generic_endpoint_gets_the_signal_path(
    receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT is a base URL: /v1/traces is added."""
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url + "/")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    run_and_flush()
    assert {path for path, _ in received.posts} == {"/v1/traces"}
    assert "work" in names(received)


def test_http_json_protocol_exports_json(
    receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/json: spans arrive as OTLP/JSON, ids intact."""
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    run_and_flush()
    assert {ct for _, ct in received.posts} == {"application/json"}
    spans = {s["name"]: s for s in received.snapshot()}
    assert spans["work"]["parent_span_id"] == spans["correlation"]["span_id"]
    assert len(spans["work"]["trace_id"]) == 32


def test_a_protocol_for_other_sdk_parts_does_not_break_metrics_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A protocol variable asynctrace does not export with is not checked without export."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    assert run_and_flush().tracing == "off"
    asynctrace.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)  # no export: fine
    asynctrace.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="Invalid otlp_protocol .* 'thrift'"):
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    assert asynctrace.uninstall() is False  # nothing half-installed


def test_traces_exporter_none_turns_export_off(
    receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_TRACES_EXPORTER=none: no spans leave, even with an endpoint set."""
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    assert run_and_flush().tracing == "off"
    assert received.posts == []


def test_traces_exporter_console_prints_spans(
    receiver: tuple[str, Received],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """OTEL_TRACES_EXPORTER=otlp,console: both, each behind its own counting gate."""
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    summary = run_and_flush()
    assert "work" in names(received)
    assert '"name": "work"' in capsys.readouterr().out
    assert "console exporter" in summary.tracing


def test_unknown_traces_exporter_is_refused_when_asynctrace_exports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exporter asynctrace cannot make is named in the error."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="Invalid OTEL_TRACES_EXPORTER entry: 'zipkin'"):
        asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    assert asynctrace.uninstall() is False


def test_sdk_disabled_is_reflected(
    receiver: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_SDK_DISABLED=true: no spans, and summary() says why."""
    url, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    summary = run_and_flush()
    assert summary.tracing == "disabled by OTEL_SDK_DISABLED"
    assert "spans: disabled by OTEL_SDK_DISABLED" in str(summary)
    assert received.posts == []


def test_service_name_alone_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SERVICE_NAME (platforms set it) asks for no export: no file appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "platform-set")
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False)
    assert run_and_flush().tracing == "off"
    asynctrace.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_traces_file_is_private_and_never_followed_through_a_symlink(tmp_path: Path) -> None:
    """The file is created 0600; a symlink in its place is refused, nothing installed."""
    path = tmp_path / "t.jsonl"
    asynctrace.install(traces_file=str(path), registry=CollectorRegistry(), loop_monitor=False)
    run_and_flush()
    asynctrace.shutdown()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        asynctrace.install(traces_file=str(link), registry=CollectorRegistry())
    assert asynctrace.uninstall() is False
    assert target.read_text() == "keep me\n"


def test_traces_file_is_bounded_and_rotation_losses_are_counted(tmp_path: Path) -> None:
    """Past max_bytes the file moves to .1; spans in a replaced .1 are counted as dropped."""
    from opentelemetry.sdk.trace import ReadableSpan  # noqa: PLC0415
    from opentelemetry.trace import SpanContext, TraceFlags  # noqa: PLC0415

    lost: list[int] = []
    path = tmp_path / "t.jsonl"
    exporter = asynctrace.OTLPJsonFileSpanExporter(path, max_bytes=2048, on_drop=lost.append)
    context = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    batch = [ReadableSpan(name="x" * 50, context=context) for _ in range(3)]
    for _ in range(40):
        exporter.export(batch)
        assert path.stat().st_size <= 2048
    backup = path.with_name("t.jsonl.1")
    assert backup.stat().st_size <= 2048
    kept = sum(len(p.read_text().splitlines()) for p in (path, backup))
    assert sum(lost) + 3 * kept == 3 * 40  # every span written is in a file or counted
    assert sum(lost) > 0
