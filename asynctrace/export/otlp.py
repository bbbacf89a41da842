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

import threading
from collections.abc import Sequence
from typing import Final, final

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from asynctrace._state import STATE
from asynctrace.export.options import ExportOptions

__all__ = ["MAX_QUEUE_SIZE", "CountingExporter", "CountingProcessor", "SpanDrops", "otlp_exporter"]

MAX_QUEUE_SIZE: Final = 2048
"""Spans waiting for export at most (the SDK's default); more are dropped and counted."""


@final
class SpanDrops:
    """Counts of one export pipeline: spans handed on, spans at the exporter, spans dropped."""

    __slots__ = ("_lock", "dropped", "handed", "reached")

    def __init__(self) -> None:
        """Start at zero."""
        self._lock = threading.Lock()
        self.handed = 0
        self.reached = 0
        self.dropped = 0

    def admit(self, limit: int) -> bool:
        """Count one span handed on, unless ``limit`` are waiting already: then one dropped."""
        with self._lock:
            if self.handed - self.reached >= limit:
                self.dropped += 1
                return False
            self.handed += 1
            return True

    def arrive(self, count: int) -> None:
        """``count`` spans reached the exporter."""
        with self._lock:
            self.reached += count

    def drop(self, count: int) -> None:
        """``count`` spans were dropped (a failed export)."""
        with self._lock:
            self.dropped += count

    def drop_waiting(self) -> None:
        """Count every span handed on that never reached the exporter as dropped."""
        with self._lock:
            self.dropped += self.handed - self.reached
            self.reached = self.handed

    def total_dropped(self) -> int:
        """Spans dropped so far."""
        return self.dropped


@final
class CountingExporter(SpanExporter):
    """Wraps an exporter: a failure or exception is counted and logged, never raised."""

    def __init__(self, inner: SpanExporter, source: str, drops: SpanDrops) -> None:
        """Export with ``inner``; failures count under ``source``, dropped spans in ``drops``."""
        self._inner = inner
        self._source = source
        self._drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export one batch; a failed one is counted as dropped."""
        self._drops.arrive(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            result = SpanExportResult.FAILURE
            STATE.errors.count(self._source, exc)
        else:
            if result is not SpanExportResult.SUCCESS:
                STATE.errors.count(self._source)
        if result is not SpanExportResult.SUCCESS:
            self._drops.drop(len(spans))
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
        """Export what is queued (within the SDK's timeout); count the rest as dropped."""
        self._closed = True
        self._inner.shutdown()  # type: ignore[no-untyped-call]
        self._drops.drop_waiting()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued, within ``timeout_millis``."""
        return self._inner.force_flush(timeout_millis)


def otlp_exporter(options: ExportOptions) -> SpanExporter:
    """The OTLP span exporter for ``options`` (HTTP/protobuf, or gRPC with its extra)."""
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
