"""What ``install()`` sets up for export, and ``shutdown()`` / ``summary()``.

Resolution, for traces:

1. ``tracer_provider=`` given: use it.
2. Else an SDK ``TracerProvider`` already set globally by the app: use it (the app keeps it).
3. Else, when export is asked for (``service_name``, ``otlp_endpoint``, ``traces_file``, or
   ``OTEL_SERVICE_NAME`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` in the environment): make an SDK
   provider with a ``BatchSpanProcessor``. It exports OTLP over HTTP/protobuf (or gRPC with
   ``otlp_protocol="grpc"``, the ``grpc`` extra) to the endpoint, or, with no endpoint, to an
   OTLP-JSON file. The provider is set as the global one, since none was.
4. Else no spans (metrics only).

Metrics go to ``registry`` (default: prometheus_client's global ``REGISTRY``). With
``prometheus_port`` (or ``ASYNCTRACE_PROMETHEUS_PORT``) an HTTP endpoint serves them, on
127.0.0.1 unless ``prometheus_addr`` says otherwise.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, final

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from asynctrace._instrument import Instrument
from asynctrace._loopmon import LoopMonitor
from asynctrace._metadata import TaskMetadata
from asynctrace._metrics import MetricsSink, OperationStats
from asynctrace._state import STATE, instrument_source
from asynctrace._tracing import SpanSink

__all__ = [
    "OTLPJsonFileSpanExporter",
    "Summary",
    "Telemetry",
    "TelemetryOptions",
    "summary",
]

logger: Final = logging.getLogger("asynctrace")
Protocol = Literal["http/protobuf", "grpc"]
TaskFilterOption = Callable[[TaskMetadata], bool] | Literal["operation"] | None
DEFAULT_TRACES_FILE: Final = "asynctrace-traces.jsonl"


# Providers asynctrace made (and has shut down since): never reused as "the app's own".
_MADE_HERE: Final[weakref.WeakSet[TracerProvider]] = weakref.WeakSet()


def _only_named(metadata: TaskMetadata) -> bool:
    return metadata.operation_name is not None


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    """install()'s telemetry options, after the environment is read (once, at install)."""

    tracer_provider: trace.TracerProvider | None = None
    registry: CollectorRegistry | None = None
    meter_provider: Any = None
    service_name: str | None = None
    otlp_endpoint: str | None = None
    otlp_protocol: Protocol | None = None
    traces_file: str | None = None
    prometheus_port: int | None = None
    prometheus_addr: str = "127.0.0.1"
    task_filter: TaskFilterOption = None
    metrics: bool = True
    max_operations: int = 100
    loop_monitor: bool = True
    lag_interval: float = 0.25
    blocked_threshold: float = 0.1

    @classmethod
    def resolve(cls, env: Mapping[str, str], **given: Any) -> TelemetryOptions:  # noqa: ANN401
        """Fill unset options from ``env`` and validate all of them."""
        if given.get("service_name") is None:
            given["service_name"] = env.get("OTEL_SERVICE_NAME") or None
        if given.get("otlp_endpoint") is None:
            given["otlp_endpoint"] = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or None
            )
        if given.get("otlp_protocol") is None:
            proto = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL"
            )
            given["otlp_protocol"] = proto or None
        if given.get("prometheus_port") is None and env.get("ASYNCTRACE_PROMETHEUS_PORT"):
            raw = env["ASYNCTRACE_PROMETHEUS_PORT"]
            try:
                given["prometheus_port"] = int(raw)
            except ValueError:
                raise ValueError(
                    f"Invalid ASYNCTRACE_PROMETHEUS_PORT: {raw!r}; expected a port number."
                ) from None
        options = cls(**given)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad option."""
        if self.otlp_protocol not in (None, "http/protobuf", "grpc"):
            raise ValueError(
                f"Invalid otlp_protocol: {self.otlp_protocol!r}; expected 'http/protobuf' or "
                "'grpc'."
            )
        port = self.prometheus_port
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535  # noqa: PLR2004
        ):
            raise ValueError(f"Invalid prometheus_port: {port!r}; expected 0 to 65535.")
        if self.registry is not None and not isinstance(self.registry, CollectorRegistry):
            raise TypeError(
                f"Invalid registry: {self.registry!r}; expected a prometheus_client "
                "CollectorRegistry."
            )
        if self.tracer_provider is not None and not isinstance(
            self.tracer_provider, trace.TracerProvider
        ):
            raise TypeError(
                f"Invalid tracer_provider: {self.tracer_provider!r}; expected an OpenTelemetry "
                "TracerProvider."
            )
        tf = self.task_filter
        if tf is not None and tf != "operation" and not callable(tf):
            raise TypeError(
                f"Invalid task_filter: {tf!r}; expected 'operation', a callable taking "
                "TaskMetadata, or None."
            )
        if not isinstance(self.max_operations, int) or self.max_operations < 1:
            raise ValueError(
                f"Invalid max_operations: {self.max_operations!r}; expected an int >= 1."
            )
        for name in ("lag_interval", "blocked_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Invalid {name}: {value!r}; expected seconds > 0.")

    @property
    def export_requested(self) -> bool:
        """Whether the user asked asynctrace to set up trace export."""
        return bool(self.service_name or self.otlp_endpoint or self.traces_file)


class _CountingExporter(SpanExporter):
    """Wraps an exporter: a failure or exception is logged once, counted, never raised."""

    def __init__(self, inner: SpanExporter, source: str) -> None:
        self._inner = inner
        self._source = source

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            result = SpanExportResult.FAILURE
            STATE.count_error(self._source, exc)
        else:
            if result is not SpanExportResult.SUCCESS:
                STATE.count_error(self._source)
        if result is not SpanExportResult.SUCCESS:
            with STATE.lock:
                STATE.dropped_spans += len(spans)
        return result

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception as exc:
            STATE.count_error(self._source, exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _CountingBatchProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops because its queue is full."""

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        maxlen = getattr(queue, "maxlen", None)
        if queue is not None and maxlen is not None and len(queue) >= maxlen:
            with STATE.lock:
                STATE.dropped_spans += 1
        super().on_end(span)


def _hex_ids(node: Any) -> Any:  # noqa: ANN401 - JSON tree
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping uses base64."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                out[key] = base64.b64decode(value).hex()
            else:
                out[key] = _hex_ids(value)
        return out
    if isinstance(node, list):
        return [_hex_ids(v) for v in node]
    return node


@final
class OTLPJsonFileSpanExporter(SpanExporter):
    """Appends spans to a file in OTLP/JSON, one ``ExportTraceServiceRequest`` per line.

    The encoding the OpenTelemetry Collector's ``file`` exporter writes and its
    ``otlpjsonfile`` receiver reads, so a file can be replayed into Jaeger or Tempo later.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Append to ``path`` (created with its folder if missing)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one line for this batch."""
        from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: PLC0415
            encode_spans,
        )

        message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
        line = json.dumps(_hex_ids(message), separators=(",", ":"))
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: each export opens and closes the file."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:  # noqa: ARG002
        """Writes are synchronous: nothing is pending."""
        return True


def _otlp_exporter(options: TelemetryOptions) -> SpanExporter:
    endpoint = options.otlp_endpoint
    assert endpoint is not None  # noqa: S101 - checked by the caller
    if options.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise ValueError(
                "Invalid otlp_protocol: 'grpc'; install the extra: pip install 'asynctrace[grpc]'."
            ) from None
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpExporter,
    )

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    return HttpExporter(endpoint=url, timeout=5)


@final
class Summary:
    """Per-operation task statistics: count, p50/p95/p99, errors, cancelled, and where to look.

    ``str(summary)`` is a table. Quantiles are estimated from the duration histogram the way
    PromQL's ``histogram_quantile`` does.
    """

    def __init__(
        self,
        rows: list[OperationStats],
        metrics_url: str | None,
        traces_file: str | None,
        otlp_endpoint: str | None,
    ) -> None:
        """Hold ``rows`` and the places telemetry goes."""
        self.rows = rows
        self.metrics_url = metrics_url
        self.traces_file = traces_file
        self.otlp_endpoint = otlp_endpoint

    def __str__(self) -> str:
        """Render the table."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.2f}"

        header = ("operation", "count", "p50 ms", "p95 ms", "p99 ms", "errors", "cancelled")
        lines = [header]
        lines += [
            (
                r.operation,
                str(r.count),
                ms(r.quantile(0.5)),
                ms(r.quantile(0.95)),
                ms(r.quantile(0.99)),
                str(r.errors),
                str(r.cancelled),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in lines
        )


@final
class Telemetry:
    """What install() set up: sinks, and the providers and servers it started itself."""

    def __init__(self, options: TelemetryOptions, version: str) -> None:
        """Set up from ``options``; undo everything if a step fails."""
        self.options = options
        self._owned_provider: TracerProvider | None = None
        self._http_server: Any = None
        self._http_thread: threading.Thread | None = None
        self.metrics_url: str | None = None
        self.traces_file: str | None = None
        self.otlp_endpoint: str | None = None
        self.metrics: MetricsSink | None = None
        self.spans: SpanSink | None = None
        self.monitor: LoopMonitor | None = None
        self._instruments: list[Instrument] = []
        try:
            self._setup(version)
        except BaseException:
            self.shutdown()
            raise
        atexit.register(self.shutdown)

    def _setup(self, version: str) -> None:
        options = self.options
        provider = self._tracer_provider()
        if provider is not None:
            tf = options.task_filter
            task_filter = _only_named if tf == "operation" else tf
            self.spans = SpanSink(provider, task_filter, version)
            self._instruments.append(self.spans)
        if options.metrics:
            registry = options.registry if options.registry is not None else REGISTRY
            self.metrics = MetricsSink(registry, options.max_operations)
            self._instruments.append(self.metrics)
            if options.loop_monitor:
                self.monitor = LoopMonitor(
                    self.metrics, options.lag_interval, options.blocked_threshold
                )
                self._instruments.append(self.monitor)
            if options.prometheus_port is not None:
                try:
                    server, thread = start_http_server(
                        options.prometheus_port, options.prometheus_addr, registry
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"Cannot serve /metrics on {options.prometheus_addr}:"
                        f"{options.prometheus_port} (prometheus_port): {exc.strerror}",
                    ) from exc
                self._http_server, self._http_thread = server, thread
                port = server.server_address[1]
                self.metrics_url = f"http://{options.prometheus_addr}:{port}/metrics"
        if options.meter_provider is not None:
            from asynctrace._otelmetrics import OTelMetricsSink  # noqa: PLC0415

            self._instruments.append(OTelMetricsSink(options.meter_provider, version))

    def _tracer_provider(self) -> trace.TracerProvider | None:
        options = self.options
        if options.tracer_provider is not None:
            return options.tracer_provider
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider) and current not in _MADE_HERE:
            return current
        if not options.export_requested:
            return None
        resource = Resource.create(
            {SERVICE_NAME: options.service_name} if options.service_name else {}
        )
        provider = TracerProvider(resource=resource)
        if options.otlp_endpoint:
            exporter = _otlp_exporter(options)
            self.otlp_endpoint = options.otlp_endpoint
            source = f"OTLP exporter ({options.otlp_endpoint})"
        else:
            path = options.traces_file or DEFAULT_TRACES_FILE
            exporter = OTLPJsonFileSpanExporter(path)
            self.traces_file = str(Path(path).resolve())
            source = f"OTLP JSON file exporter ({path})"
        provider.add_span_processor(_CountingBatchProcessor(_CountingExporter(exporter, source)))
        self._owned_provider = provider
        _MADE_HERE.add(provider)
        if not isinstance(current, TracerProvider):  # OpenTelemetry allows setting it once
            trace.set_tracer_provider(provider)
        return provider

    def instruments(self) -> tuple[Instrument, ...]:
        """The sinks, in the order they are called (spans before metrics, for exemplars)."""
        return tuple(self._instruments)

    def summary(self) -> Summary:
        """Per-operation statistics so far."""
        rows = self.metrics.stats() if self.metrics is not None else []
        return Summary(rows, self.metrics_url, self.traces_file, self.otlp_endpoint)

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Export the spans still queued in the provider asynctrace made (if it made one)."""
        if self._owned_provider is not None:
            return self._owned_provider.force_flush(timeout_millis)
        return True

    def shutdown(self) -> None:
        """Flush and stop what install() started. Idempotent."""
        atexit.unregister(self.shutdown)
        for instrument in self._instruments:
            try:
                instrument.close()
            except Exception as exc:
                STATE.count_error(instrument_source(instrument), exc)
        self._instruments = []
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http_server = None
        if self._owned_provider is not None:
            provider, self._owned_provider = self._owned_provider, None
            try:
                provider.force_flush(10_000)
                provider.shutdown()
            except Exception as exc:
                STATE.count_error("tracer provider shutdown", exc)


def summary() -> Summary:
    """Per-operation task statistics since install: count, p50/p95/p99, errors, cancelled.

    Raises:
        RuntimeError: asynctrace is not installed with metrics.

    Since: 0.1.0
    """
    telemetry: Telemetry | None = STATE.telemetry
    if telemetry is None or telemetry.metrics is None:
        raise RuntimeError("asynctrace.summary() needs asynctrace.install() with metrics on.")
    return telemetry.summary()
