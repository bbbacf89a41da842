"""The OTLP span exporter asynctrace makes, and the wrappers that count what export drops.

Drops are counted by asynctrace's own wrappers, never by reading the SDK's internals:

- :class:`CountingExporter` counts the spans that reach the exporter, and those in batches
  that failed or raised (logged once per source, then rate limited; never raised).
- :class:`CountingProcessor` puts a ``BatchSpanProcessor`` behind a gate: it counts the
  sampled spans it hands on, and holds at most ``max_queue_size`` of them not yet at the
  exporter. A span over that bound is dropped and counted here, so the SDK's queue, of the
  same size, never overflows where nobody counts. At shutdown the spans that never reached
  the exporter are counted as dropped too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, final

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from asynctrace._state import STATE
from asynctrace.export.drops import SpanDrops
from asynctrace.export.options import ExportOptions

__all__ = [
    "MAX_QUEUE_SIZE",
    "CountingExporter",
    "CountingProcessor",
    "OTLPJsonHttpSpanExporter",
    "otlp_exporter",
]

logger: Final = logging.getLogger("asynctrace")

DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
"""How long shutting an export pipeline down may take in all, unless configured."""
EXPORT_TIMEOUT_S: Final = 5.0
"""How long one export request may take, unless OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT says."""
_RETRYABLE: Final = frozenset({429, 502, 503, 504})

MAX_QUEUE_SIZE: Final = 2048
"""Spans waiting for export at most (the SDK's default); more are dropped and counted."""


@final
class CountingExporter(SpanExporter):
    """Wraps an exporter: a failure or exception is counted and logged, never raised."""

    def __init__(self, inner: SpanExporter, source: str, drops: SpanDrops) -> None:
        """Export with ``inner``; failures count under ``source``, dropped spans in ``drops``."""
        STATE.errors.declare(source)  # served from 0: the first failure shows as an increase
        self._inner = inner
        self._source = source
        self._drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export one batch; a failed one is counted as dropped, a late one refused."""
        if not self._drops.arrive(len(spans)):
            return SpanExportResult.FAILURE  # past the shutdown deadline: counted already
        result = SpanExportResult.FAILURE
        failure: BaseException | None = None
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            failure = exc
        finally:
            self._drops.settle(len(spans), exported=result is SpanExportResult.SUCCESS)
        # An export that ends after the pipeline closed was counted then, as not exported;
        # its failure belongs to an installation that has ended: not reported again.
        if result is not SpanExportResult.SUCCESS and not self._drops.closed:
            STATE.errors.count(self._source, failure)
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down; a failure is counted."""
        try:
            self._inner.shutdown()
        except Exception as exc:
            STATE.errors.count(self._source, exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self._inner.force_flush(timeout_millis)


@final
class CountingProcessor(SpanProcessor):
    """A ``BatchSpanProcessor`` behind a gate that counts what it cannot take.

    It keeps the base class's ``on_start``, which does nothing, so task spans take the span
    sink's fast path.
    """

    def __init__(
        self, exporter: CountingExporter, drops: SpanDrops, max_queue_size: int = MAX_QUEUE_SIZE
    ) -> None:
        """Batch to ``exporter``; hold at most ``max_queue_size`` spans not yet exported."""
        self._inner = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(512, max_queue_size),  # the SDK's default batch, or less
        )
        self._drops = drops
        self._limit = max_queue_size
        self._closed = False

    def on_end(self, span: ReadableSpan) -> None:
        """Hand a sampled span on, or count it dropped when the queue is full or closed."""
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return  # the batch processor exports sampled spans only
        if self._closed:
            self._drops.drop(1)
            return
        if self._drops.admit(self._limit):
            self._inner.on_end(span)

    def shutdown(self) -> None:
        """Export what is queued within the default deadline; count the rest as dropped."""
        self.shutdown_within(DEFAULT_SHUTDOWN_TIMEOUT_S)

    def shutdown_within(self, timeout_s: float) -> bool:
        """Export what is queued, stop, all within ``timeout_s``; count what is left.

        The SDK's batch processor waits up to 30 s for its thread and exports in the
        caller's thread: it runs in a helper thread here, waited for at most ``timeout_s``.
        Returns whether everything finished in time.
        """
        if self._closed:
            return True
        self._closed = True
        done = _within(self._inner.shutdown, timeout_s, "asynctrace-export-shutdown")
        waiting = self._drops.close()  # a batch the thread takes later is refused
        if waiting:
            logger.warning(
                "asynctrace: span export did not finish within %.1f s; %d span(s) not "
                "exported by then are counted as dropped (asynctrace_spans_dropped_total)",
                timeout_s,
                waiting,
            )
        return done

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued, waiting at most ``timeout_millis``.

        The SDK's own flush waits without bound: it runs in a helper thread here.
        """
        if self._closed:
            return True
        return _within(self._inner.force_flush, timeout_millis / 1000, "asynctrace-flush")


def _within(call: Callable[[], object], timeout_s: float, name: str) -> bool:
    """Run ``call`` in a daemon thread; wait at most ``timeout_s``; whether it returned.

    A daemon thread, since one stuck on a hanging collector must not hold up process exit;
    the exporter's own timeout ends it soon after.
    """
    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    thread.join(max(0.0, timeout_s))
    return not thread.is_alive()


def _headers(env: Mapping[str, str]) -> dict[str, str]:
    from opentelemetry.util.re import parse_env_headers  # noqa: PLC0415

    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    return dict(parse_env_headers(raw, liberal=True)) if raw else {}


def _timeout(env: Mapping[str, str]) -> float:
    """The export timeout in seconds, read as OpenTelemetry's Python exporters read it.

    The specification says milliseconds; the Python SDK's exporters (1.45) read seconds. One
    variable configures both, so asynctrace reads it as they do.
    """
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    try:
        return float(raw) if raw else EXPORT_TIMEOUT_S
    except ValueError:
        return EXPORT_TIMEOUT_S


@final
class OTLPJsonHttpSpanExporter(SpanExporter):
    """OTLP over HTTP with a JSON body (``OTEL_EXPORTER_OTLP_PROTOCOL=http/json``).

    The encoding is the one :class:`~asynctrace.OTLPJsonFileSpanExporter` writes (the OTLP/JSON
    mapping). A refused batch is retried while the timeout lasts, on 429, 502, 503 and 504 as
    the specification says; anything else fails the batch (the caller counts it).
    """

    def __init__(self, url: str, headers: Mapping[str, str], timeout_s: float) -> None:
        """POST batches to ``url`` with ``headers``, each within ``timeout_s`` seconds."""
        import requests  # noqa: PLC0415 - the HTTP/protobuf exporter's own dependency

        self._url = url
        self._timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers.update({**headers, "Content-Type": "application/json"})

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send one batch; SUCCESS only on a 2xx answer."""
        from asynctrace.export.files import encode_json  # noqa: PLC0415

        body = encode_json(spans).encode()
        deadline = time.monotonic() + self._timeout_s
        delay = 0.1
        while True:
            left = deadline - time.monotonic()
            response = self._session.post(self._url, data=body, timeout=max(0.05, left))
            if response.ok:
                return SpanExportResult.SUCCESS
            if response.status_code not in _RETRYABLE or left <= delay:
                return SpanExportResult.FAILURE
            time.sleep(delay)
            delay *= 2

    def shutdown(self) -> None:
        """Close the connection pool."""
        self._session.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:  # noqa: ARG002
        """Nothing is buffered here."""
        return True


def otlp_exporter(options: ExportOptions, env: Mapping[str, str] = os.environ) -> SpanExporter:
    """The OTLP span exporter for ``options``: HTTP/protobuf, HTTP/JSON, or gRPC (its extra).

    The exporter is given the URL (see ``export.options``); headers, TLS and compression are
    read from the standard variables by the SDK's exporters as usual.
    """
    url = options.otlp_url
    assert url is not None  # noqa: S101 - resolved with "otlp" among the exporters
    timeout = None if options.timeout_from_env else EXPORT_TIMEOUT_S
    if options.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            if "subinterpreter" in str(exc):  # grpcio's extension refuses isolated interpreters
                raise ValueError(
                    f"Invalid otlp_protocol: 'grpc' in this subinterpreter ({exc}); use "
                    "'http/protobuf' (the default) or 'http/json' there."
                ) from None
            raise ValueError(
                "Invalid otlp_protocol: 'grpc'; install the extra: pip install 'asynctrace[grpc]'."
            ) from None
        return GrpcExporter(endpoint=url, insecure=url.startswith("http://"), timeout=timeout)
    if options.otlp_protocol == "http/json":
        return OTLPJsonHttpSpanExporter(url, _headers(env), _timeout(env))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=url, timeout=timeout)
