"""The tracing fast lane: when asynctrace owns the OTLP/HTTP export, task spans skip the SDK.

The SDK's path builds a ``ReadableSpan`` per task, queues it in a ``BatchSpanProcessor`` and
encodes it with protobuf message objects: 50-70 µs a span, several times what the task
itself costs. Here the span sink hands each finished task span over as a tuple
(``otlp_encode.TaskSpan``); an export thread of the lane's own writes the OTLP bytes straight
from those tuples (``otlp_encode``) and sends them with the SDK exporter's own HTTP client:
the same endpoint, headers, compression, TLS settings, timeout and retries as the SDK's
exporter. Other spans (correlation blocks, spans of other instrumentations on asynctrace's
provider) reach :meth:`OTLPLane.on_end` as ``ReadableSpan`` and are encoded by the SDK's
encoder into the same request.

What is dropped is counted as on the SDK path (``SpanDrops``): over ``max_queue_size`` spans
waiting, a failed export, or what is still waiting when the lane is shut down.

The HTTP client is the SDK exporter's private ``_client`` (opentelemetry-exporter-otlp-proto-
http 1.40 and later, ``_OTLPHTTPClient.export(bytes)``). :func:`lane_sender` checks for it;
without it asynctrace keeps the SDK's path (tests/test_lane.py covers both).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, final

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

from asynctrace import _native
from asynctrace._state import STATE
from asynctrace.export import otlp_encode
from asynctrace.export.drops import SpanDrops

__all__ = [
    "LANE_BATCH_SIZE",
    "LANE_QUEUE_SIZE",
    "MAX_QUEUE_SIZE",
    "OTLPLane",
    "ThreadBatchProcessor",
    "lane_sender",
]

logger: Final = logging.getLogger("asynctrace")

MAX_QUEUE_SIZE: Final = 2048
"""Spans waiting at most in a :class:`ThreadBatchProcessor` (the SDK's default)."""
LANE_QUEUE_SIZE: Final = 32768
"""Spans waiting for export at most; more are dropped and counted. Larger than the SDK's
2048: a waiting task span is a small tuple here, and a 20k-task fan-out ends in one burst."""
BATCH_SIZE: Final = 512
"""Spans per request on the SDK's path (the SDK's default batch)."""
LANE_BATCH_SIZE: Final = 8192
"""Spans per request from the lane. Each time the export thread takes the GIL back while the
loop's thread is busy costs it far more CPU than the work it does then (the loop thread
releases the GIL at every ``select()``, and each release wakes the waiting thread, mostly for
nothing, until the switch interval forces the hand-over); a request takes it back several
times (the wake, the HTTP client's socket calls). 2,048 spans a request took 10% off the
traced fan-out's CPU against the SDK's 512 (3.11, alternated in one process); 8,192 took
another 10% off the traced queue (3.14, one process: 15.9 against 14.3 µs a task). About
1.9 MB a request: under the OpenTelemetry Collector's default limits (4 MiB for a gRPC
message, 20 MiB for an HTTP body)."""
SCHEDULE_DELAY_S: Final = 1.0
"""How long spans may wait for a batch to fill before they are sent anyway."""

Sender = Callable[[bytes], bool]


def lane_sender(exporter: object) -> Sender | None:
    """A function that sends encoded bytes with ``exporter``'s HTTP client; None if it has none.

    ``exporter`` is the SDK's ``OTLPSpanExporter`` (HTTP/protobuf). Its client does the
    retries, compression and headers; True when the collector took the request.
    """
    client = getattr(exporter, "_client", None)
    export = getattr(client, "export", None)
    if not callable(export):
        return None

    def send(body: bytes) -> bool:
        return bool(getattr(export(body), "success", False))

    return send


class _ExportThread(SpanProcessor):
    """A bounded queue of finished spans and the thread that exports them in batches.

    The SDK's ``BatchSpanProcessor`` does the same with a daemon thread, which an isolated
    subinterpreter refuses; this thread is a daemon only where ``daemon`` says so, and ends at
    :meth:`shutdown_within` either way.
    """

    def __init__(
        self,
        drops: SpanDrops,
        *,
        name: str,
        daemon: bool,
        max_queue_size: int,
        batch_size: int,
        schedule_delay_s: float,
    ) -> None:
        self._drops = drops
        self._batch = batch_size
        self._delay = schedule_delay_s
        self._wake = threading.Event()
        # Counts what it queues and refuses (the limit, and after close) for ``drops``.
        self._queue = _native.LaneQueue(max_queue_size, batch_size, self._wake.set)
        drops.through(self._queue)
        self._idle = threading.Condition()
        # Set by force_flush (and shutdown): send what waits now, a partial batch too.
        self._flush_asked = False
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=daemon)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a sampled span, or count it dropped when the queue is full or closed."""
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        self._queue(span)

    def _run(self) -> None:
        # Full batches as they fill; a partial one only when ``schedule_delay_s`` has passed
        # or a flush asks (the SDK's batch processor does the same). Sending whatever waited
        # at each wake made requests ever smaller under steady load: spans keep coming while
        # a request is on the wire, and the next request took just those. A request costs
        # this thread the GIL several times whatever its size (each socket call gives it up,
        # and taking it back while the loop's thread is busy takes hundreds of wake-ups).
        # Traced queue, uvloop, 3.14, a 20k-task round: 11-200 requests before, 3 now.
        queue, wake, size, delay = self._queue, self._wake, self._batch, self._delay
        due = time.monotonic() + delay
        while True:
            wake.wait(max(0.0, due - time.monotonic()))
            wake.clear()
            partial = self._flush_asked or self._stopping or time.monotonic() >= due
            self._flush_asked = False
            # A partial pass sends what waited when it began; what comes meanwhile waits
            # for a full batch or the next delay, as under steady load.
            waited = len(queue) if partial else 0
            sent = False
            try:
                while (len(queue) >= size or waited > 0) and not self._closed:
                    batch = queue.take(size)
                    if not batch:
                        break
                    if not sent:
                        # At work: the loops' threads hand the GIL over now and then, which
                        # this thread wants back after each socket call (_speedups_py.exporting).
                        _native.exporting(1)
                        sent = True
                    waited -= len(batch)
                    self._export(batch)
            finally:
                if sent:
                    _native.exporting(-1)
            if sent or partial:
                # What a full batch left waits for the next batch, or the delay from now:
                # either is shorter than the delay it would have waited from the last.
                due = time.monotonic() + delay
            with self._idle:
                self._idle.notify_all()
            if self._stopping:
                return

    def _export(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now; whether it was done within ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._idle:
            while self._drops.pending():
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or not self._thread.is_alive():
                    return False
                self._flush_asked = True
                self._wake.set()
                self._idle.wait(min(left, 0.05))
        return True

    def shutdown(self) -> None:
        """Export what is queued within 5 s; count the rest as dropped."""
        self.shutdown_within(5.0)

    def shutdown_within(self, timeout_s: float) -> bool:
        """Export what is queued, stop the thread, all within ``timeout_s``; count the rest."""
        if self._closed:
            return True
        deadline = time.monotonic() + timeout_s
        done = self.force_flush(round(max(0.0, timeout_s) * 1000))
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._closed = True
        done = done and not self._thread.is_alive()
        lost = self._drops.close()
        if lost:
            logger.warning(
                "asynctrace: span export did not finish within %.1f s; %d span(s) not "
                "exported by then are counted as dropped (asynctrace_spans_dropped_total)",
                timeout_s,
                lost,
            )
        self._after_shutdown()
        return done

    def _after_shutdown(self) -> None:
        pass


@final
class OTLPLane(_ExportThread):
    """A span processor with a fast entry for task spans: OTLP bytes written directly."""

    def __init__(
        self,
        send: Sender,
        source: str,
        drops: SpanDrops,
        resource: tuple[Mapping[str, object], str],
        scope: tuple[str, str],
        *,
        daemon: bool = True,
        max_queue_size: int = LANE_QUEUE_SIZE,
        batch_size: int = LANE_BATCH_SIZE,
        schedule_delay_s: float = SCHEDULE_DELAY_S,
    ) -> None:
        """Send with ``send``; failures count under ``source``, dropped spans in ``drops``.

        ``resource`` is the provider's (attributes, schema URL); ``scope`` the (name, version)
        of asynctrace's task spans. ``daemon=False`` where daemon threads are refused (an
        isolated subinterpreter): the thread then ends at :meth:`shutdown`.
        """
        STATE.errors.declare(source)
        self._send = send
        self._source = source
        self._resource = otlp_encode.resource_bytes(*resource)
        self._scope = otlp_encode.scope_bytes(*scope)
        super().__init__(
            drops,
            name="asynctrace-otlp-lane",
            daemon=daemon,
            max_queue_size=max_queue_size,
            batch_size=batch_size,
            schedule_delay_s=schedule_delay_s,
        )
        # Queue a finished, sampled task span (see ``otlp_encode.TaskSpan``): the queue
        # itself, which the span sink's C end puts into without a Python call.
        self.add_task: Callable[[tuple[Any, ...]], None] = self._queue

    def _export(self, batch: list[Any]) -> None:
        if not self._drops.arrive(len(batch)):
            return  # closed: counted then
        exported = False
        failure: BaseException | None = None
        try:
            exported = self._send(self._encode(batch))
        except Exception as exc:  # the collector's failure, never the app's
            failure = exc
        finally:
            self._drops.settle(len(batch), exported=exported)
        if not exported and not self._drops.closed:
            STATE.errors.count(self._source, failure)

    def _encode(self, batch: list[Any]) -> bytes:
        # The batch sorted in C: no Python loop over it here. Each bytecode run in this thread
        # while the loop's thread is busy may hand the GIL over (and take it back), which
        # costs more than the encoding itself.
        others: list[Any] = []
        tasks = otlp_encode.encode_task_spans(batch, others)
        body = otlp_encode.encode_request(self._resource, self._scope, (tasks,)) if tasks else b""
        if others:
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: PLC0415
                encode_spans,
            )

            body += encode_spans(others).SerializePartialToString()  # messages concatenate
        return body


@final
class ThreadBatchProcessor(_ExportThread):
    """Any exporter's batches from a plain thread: the batch processor where daemons are refused.

    ``exporter`` is asynctrace's ``CountingExporter``, which counts what reaches it and what
    fails; this counts what the queue refuses and what is left at shutdown.
    """

    def __init__(self, exporter: SpanExporter, drops: SpanDrops, *, daemon: bool = False) -> None:
        """Batch to ``exporter`` (512 a batch, at least every second)."""
        self._exporter = exporter
        super().__init__(
            drops,
            name="asynctrace-export",
            daemon=daemon,
            max_queue_size=MAX_QUEUE_SIZE,
            batch_size=BATCH_SIZE,
            schedule_delay_s=SCHEDULE_DELAY_S,
        )

    def _export(self, batch: list[Any]) -> None:
        self._exporter.export(batch)  # counts, and never raises

    def _after_shutdown(self) -> None:
        self._exporter.shutdown()
