"""What ``install()`` sets up for one configuration: sinks, providers, the ``/metrics`` server.

Resolution, for traces:

1. ``tracer_provider=`` given: use it.
2. Else an SDK ``TracerProvider`` already set globally by the app: use it (the app keeps it).
3. Else, when export is asked for (``otlp_endpoint=``, ``traces_file=``, or the standard
   variables: an OTLP endpoint, ``OTEL_TRACES_EXPORTER``; see ``export.options``): make an
   SDK provider with one counting batch processor per exporter: OTLP (HTTP/protobuf,
   HTTP/JSON, or gRPC with its extra), the console, and the OTLP-JSON file when one is named.
   The provider is set as the global one, since none was.
4. Else no spans (metrics only). OpenTelemetry is then not imported at all. A service name
   alone asks for no export, and ``OTEL_SDK_DISABLED=true`` turns spans off.

Metrics go to ``registry`` (default: prometheus_client's global ``REGISTRY``). With
``prometheus_port`` (or ``ASYNCTRACE_PROMETHEUS_PORT``) an HTTP endpoint serves them, on
127.0.0.1 unless ``prometheus_addr`` says otherwise.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from asynctrace._hooks import Instrument
from asynctrace._metadata import TaskMetadata
from asynctrace._state import STATE
from asynctrace.export.drops import SpanDrops
from asynctrace.export.options import ExportOptions, redact_url
from asynctrace.export.summary import Summary
from asynctrace.sinks.health import CreationSites, StuckWatch
from asynctrace.sinks.task_metrics import TaskMetrics

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import TracerProvider as ApiTracerProvider


__all__ = ["Telemetry"]

# Providers asynctrace made (and has shut down since): never reused as "the app's own".
_MADE_HERE: Final[weakref.WeakSet[Any]] = weakref.WeakSet()
LANE_ENV: Final = "ASYNCTRACE_OTLP_LANE"
"""``0``: task spans take the SDK's path even when asynctrace owns the OTLP/HTTP export."""


class _Pipeline(Protocol):
    """What closing needs of an export pipeline (``export.otlp.CountingProcessor``)."""

    def force_flush(self, timeout_millis: int = 30000) -> bool: ...

    def shutdown_within(self, timeout_s: float) -> bool: ...


def _only_named(metadata: TaskMetadata) -> bool:
    return metadata.operation_name is not None


@final
class Telemetry(Instrument):
    """The sinks of one configuration, and the provider and server it started itself.

    It observes no task: its ``close()`` (called after the sinks') stops the ``/metrics``
    server and flushes and shuts down the provider asynctrace made.
    """

    def __init__(self, options: ExportOptions, version: str) -> None:
        """Set up from ``options``; undo everything if a step fails."""
        self.options = options
        self._version = version
        self._owned_provider: TracerProvider | None = None
        self._http_server: Any = None
        self._http_thread: Any = None
        self.metrics_url: str | None = None
        self.traces_file: str | None = None
        self.otlp_endpoint: str | None = None
        self.metrics: TaskMetrics | None = None
        self.sinks: list[Instrument] = []
        self.tracing = "off"
        self._unfinished = SpanDrops()  # task spans whose tasks outlived the installation
        self._drops: list[SpanDrops] = [self._unfinished]
        self._processors: list[_Pipeline] = []
        try:
            self._setup(version)
        except BaseException:
            for sink in self.sinks:
                sink.close()
            self.close()
            raise
        atexit.register(self.close)

    def _setup(self, version: str) -> None:
        options = self.options
        provider = self._tracer_provider()
        if provider is not None:
            from asynctrace.sinks.tracing import SpanSink  # noqa: PLC0415

            tf = options.task_filter
            task_filter = _only_named if tf == "operation" else tf
            self.sinks.append(
                SpanSink(
                    provider,
                    task_filter,
                    version,
                    exception_messages=options.exception_messages,
                    on_unfinished=self._unfinished.drop,
                )
            )
        if options.creation_sites:
            self.sinks.append(CreationSites())
        if options.metrics:
            self._setup_metrics()
        elif options.stuck_after:
            self.sinks.append(self._stuck_watch(None))
        if options.meter_provider is not None:
            from asynctrace.sinks.otel_metrics import OTelMetricsSink  # noqa: PLC0415

            self.sinks.append(
                OTelMetricsSink(options.meter_provider, version, options.max_operations)
            )

    def _setup_metrics(self) -> None:
        from prometheus_client import REGISTRY  # noqa: PLC0415

        from asynctrace.sinks.prometheus import PrometheusSink  # noqa: PLC0415

        options = self.options
        registry = options.registry if options.registry is not None else REGISTRY
        self.metrics = TaskMetrics(options.max_operations)
        self.sinks.append(self.metrics)
        stuck = None
        if options.stuck_after:
            watch = self._stuck_watch(self.metrics.label)
            self.sinks.append(watch)
            stuck = watch.stuck_now
        monitor = None
        if options.loop_monitor:
            from asynctrace.sinks.loop_monitor import LoopMonitor  # noqa: PLC0415

            monitor = LoopMonitor(self.metrics, options.lag_interval, options.blocked_threshold)
        blocked_for = monitor.blocked_for if monitor is not None else None
        self.sinks.append(
            PrometheusSink(self.metrics, registry, self._dropped_spans, blocked_for, stuck)
        )
        if monitor is not None:
            self.sinks.append(monitor)
        if options.prometheus_port is not None:
            daemon = _daemon_threads_allowed()
            try:
                server, thread = _serve(
                    options.prometheus_port, options.prometheus_addr, registry, daemon=daemon
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

    def _stuck_watch(self, label: Any) -> StuckWatch:  # noqa: ANN401 - a label function
        return StuckWatch(self.options.stuck_after, label)

    def _dropped_spans(self) -> int:
        return sum(drops.total_dropped() for drops in self._drops)

    def _tracer_provider(self) -> ApiTracerProvider | None:
        options = self.options
        if options.tracer_provider is not None:
            self.tracing = "the tracer_provider given to install()"
            return options.tracer_provider
        if options.sdk_disabled:
            self.tracing = "disabled by OTEL_SDK_DISABLED"
            return None
        if not options.export_requested and "opentelemetry.sdk.trace" not in sys.modules:
            return None  # no SDK loaded: the app cannot have set an SDK provider
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider) and current not in _MADE_HERE:
            self.tracing = "the application's TracerProvider"
            return current
        if not options.export_requested:
            return None
        options.validate_export()
        provider = self._make_provider()
        if not isinstance(current, TracerProvider):  # OpenTelemetry allows setting it once
            trace.set_tracer_provider(provider)
        return provider

    def _make_provider(self) -> TracerProvider:
        """A provider exporting where the options say, each exporter behind a counting gate."""
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

        from asynctrace.export.lane import ThreadBatchProcessor  # noqa: PLC0415
        from asynctrace.export.otlp import (  # noqa: PLC0415
            CountingExporter,
            CountingProcessor,
            otlp_exporter,
        )

        options = self.options
        exporters: list[tuple[SpanExporter, str, SpanDrops]] = []  # each its own count
        if "otlp" in options.traces_exporters:
            assert options.otlp_url is not None  # noqa: S101 - resolved with "otlp"
            self.otlp_endpoint = redact_url(options.otlp_url)
            protocol = options.otlp_protocol or "http/protobuf"
            source = f"OTLP exporter ({protocol}, {self.otlp_endpoint})"
            exporters.append((otlp_exporter(options), source, SpanDrops()))
        if "console" in options.traces_exporters:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

            # sys.stdout as it is now: the SDK's default is the one it saw when first imported
            console = ConsoleSpanExporter(out=sys.stdout)
            exporters.append((console, "console exporter", SpanDrops()))
        if options.traces_file:
            from asynctrace.export.files import OTLPJsonFileSpanExporter  # noqa: PLC0415

            file_drops = SpanDrops()  # also what rotation loses
            file_exporter = OTLPJsonFileSpanExporter(options.traces_file, on_drop=file_drops.drop)
            self.traces_file = str(file_exporter.path.resolve())
            source = f"OTLP JSON file ({self.traces_file})"
            exporters.append((file_exporter, source, file_drops))
        resource = Resource.create(
            {SERVICE_NAME: options.service_name} if options.service_name else {}
        )
        # Not shut down by the SDK at exit: close() does it, within shutdown_timeout.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter, source, drops in exporters:
            self._drops.append(drops)
            processor: Any  # a span processor with shutdown_within(): a _Pipeline
            lane = self._lane(exporter, source, drops, resource)
            if lane is not None:
                processor = lane
            elif _daemon_threads_allowed():
                processor = CountingProcessor(CountingExporter(exporter, source, drops), drops)
            else:  # the SDK's batch processor needs a daemon thread: a plain one instead
                processor = ThreadBatchProcessor(CountingExporter(exporter, source, drops), drops)
                _stop_before_threads_join(processor, self.options.shutdown_timeout)
            self._processors.append(processor)
            provider.add_span_processor(processor)
        self.tracing = "; ".join(source for _, source, _ in exporters)
        self._owned_provider = provider
        _MADE_HERE.add(provider)
        return provider

    def _lane(
        self, exporter: SpanExporter, source: str, drops: SpanDrops, resource: Resource
    ) -> Any:  # noqa: ANN401 - an export.lane.OTLPLane, or None
        """The fast lane for the OTLP/HTTP protobuf exporter (see ``export.lane``), if usable."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        from asynctrace.export.lane import OTLPLane, lane_sender  # noqa: PLC0415

        if type(exporter) is not OTLPSpanExporter or os.environ.get(LANE_ENV, "1") == "0":
            return None
        send = lane_sender(exporter)
        if send is None:
            return None  # an SDK without the client the lane sends with: the SDK's path
        daemon = _daemon_threads_allowed()
        lane = OTLPLane(
            send,
            source,
            drops,
            (dict(resource.attributes), resource.schema_url or ""),
            ("asynctrace", self._version),
            daemon=daemon,
        )
        if not daemon:
            _stop_before_threads_join(lane, self.options.shutdown_timeout)
        return lane

    def instruments(self) -> tuple[Instrument, ...]:
        """The sinks, in the order they are called (spans before metrics, for exemplars)."""
        return tuple(self.sinks)

    def summary(self) -> Summary:
        """Per-operation statistics so far."""
        rows = self.metrics.stats() if self.metrics is not None else []
        return Summary(
            rows, self.metrics_url, self.traces_file, self.otlp_endpoint, tracing=self.tracing
        )

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Export the spans queued now in the provider made here, within ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000
        done = True
        for processor in self._processors:
            left_ms = max(0.0, deadline - time.monotonic()) * 1000
            done = processor.force_flush(round(left_ms)) and done
        return done

    def after_fork(self) -> None:
        """In a forked child: close the inherited /metrics socket, wait for and flush nothing.

        The server's thread, the export's and the provider's queue are the parent's (the SDK
        empties the child's copy of its queue itself).
        """
        atexit.unregister(self.close)
        server, self._http_server = self._http_server, None
        if server is not None:
            server.socket.close()  # no shutdown(): it would wait for the parent's thread
        self._owned_provider = None
        self._processors = []

    def close(self) -> None:
        """Stop the ``/metrics`` server; end the export within ``shutdown_timeout``. Idempotent.

        Called on a thread running an event loop, the export ends in a background thread
        (not a daemon: the process waits for it at exit, at most ``shutdown_timeout``), so
        the loop never waits for a collector.
        """
        atexit.unregister(self.close)
        if self._http_server is not None:
            server, self._http_server = self._http_server, None
            server.shutdown()
            server.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
        if self._owned_provider is None:
            return
        provider, self._owned_provider = self._owned_provider, None
        processors, self._processors = self._processors, []
        if _in_running_loop():
            threading.Thread(
                target=self._end_export,
                args=(provider, processors),
                name="asynctrace-close",
                daemon=False,
            ).start()
        else:
            self._end_export(provider, processors)

    def _end_export(self, provider: TracerProvider, processors: list[_Pipeline]) -> None:
        deadline = time.monotonic() + self.options.shutdown_timeout
        try:
            for processor in processors:
                processor.shutdown_within(max(0.0, deadline - time.monotonic()))
            provider.shutdown()  # its processors are shut already: nothing left to wait for
        except Exception as exc:
            STATE.errors.count("tracer provider shutdown", exc)


def _stop_before_threads_join(processor: Any, timeout_s: float) -> None:  # noqa: ANN401
    """In an isolated subinterpreter: end ``processor``'s plain thread as the interpreter ends.

    ``threading._register_atexit`` (what ``concurrent.futures`` uses) runs before the
    interpreter joins its threads, so ``Interpreter.close()`` never waits on the export.
    """
    threading._register_atexit(processor.shutdown_within, timeout_s)  # type: ignore[attr-defined]


def _daemon_threads_allowed() -> bool:
    """False in an isolated subinterpreter (Python 3.14), which refuses daemon threads."""
    try:
        threading.Thread(target=int, daemon=True)  # made, never started
    except RuntimeError:
        return False
    return True


def _serve(
    port: int,
    addr: str,
    registry: Any,  # noqa: ANN401
    *,
    daemon: bool,
) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` (prometheus_client's WSGI app) and ``/tasks`` (the task view).

    As prometheus_client's ``start_http_server`` does, with daemon threads where allowed.
    Where daemon threads are refused (an isolated subinterpreter) the threads are plain ones,
    and the server is shut down by ``threading._register_atexit`` (what ``concurrent.futures``
    uses): it runs before the interpreter joins its threads, which would otherwise wait for
    the server forever.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server  # noqa: PLC0415

    from prometheus_client import make_wsgi_app  # noqa: PLC0415
    from prometheus_client.exposition import ThreadingWSGIServer  # noqa: PLC0415

    from asynctrace.export.tasks import tasks_app  # noqa: PLC0415

    class Server(ThreadingWSGIServer):
        daemon_threads = daemon

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401
            """No access log."""

    app = tasks_app(make_wsgi_app(registry))
    httpd = make_server(addr, port, app, Server, handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="asynctrace-metrics", daemon=daemon)
    thread.start()
    register = getattr(threading, "_register_atexit", None)
    if not daemon and register is not None:
        register(httpd.shutdown)
    return httpd, thread


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
