"""The benchmark's modes: bare asyncio, asynctrace, and the peers, each set up in its worker.

Each mode runs in its own worker process (the peers patch asyncio globally).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

MODES = [
    "bare",
    "asynctrace-metrics",
    "asynctrace-metrics-pure",
    "asynctrace-metrics-handle",
    "asynctrace-metrics-unbatched",
    "asynctrace-metrics-stuck",
    "asynctrace-metrics-sites",
    "asynctrace-tracing",
    "asynctrace-tracing-otlp",
    "otel-asyncio-metrics",
    "otel-asyncio-spans",
    "otel-asyncio-spans-otlp",
    "sentry",
]
# What a mode's worker process gets in its environment (read when asynctrace is imported or
# installed): the pure-Python twin, the previous releases' paths (ends from a Handle; a done
# callback on every task, no batched check).
MODE_ENV = {
    "asynctrace-metrics-pure": {"ASYNCTRACE_PURE_PYTHON": "1"},
    "asynctrace-metrics-handle": {"ASYNCTRACE_TAP": "0"},
    "asynctrace-metrics-unbatched": {"ASYNCTRACE_BATCH_CHECK": "0"},
}
# The real OTLP/HTTP receiver (bench/receiver.py) the "-otlp" modes export to.
RECEIVER_ENV = "ASYNCTRACE_BENCH_RECEIVER"
# Coroutine names the OTel asyncio instrumentation is told to trace (its opt-in list).
TRACED_NAMES = "leaf,node,process,eager_leaf,handle,validate,enrich,store,consumer,producer"
# The options asynctrace was installed with in this worker (workloads reinstall with them).
ASYNCTRACE_OPTIONS: dict[str, Any] = {}


class Mode:
    """Sets a mode up inside the worker's running loop; flush() ends a timed section."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.provider: Any = None
        self.flushes: Any = None
        self.sentry_tx: Any = None
        # asynctrace.create_task once set up (asynctrace modes); else asyncio.create_task. Read
        # here, not imported at each task: an import statement per task (about 100 ns on 3.11)
        # was the harness's cost, charged to asynctrace's modes.
        self.create_task: Any = None

    def spawn(self, coro: Any, op: str) -> asyncio.Task[Any]:  # noqa: ANN401
        create_task = self.create_task
        if create_task is not None:
            return create_task(coro, operation_name=op)
        return asyncio.create_task(coro)

    async def setup(self) -> None:
        name = self.name
        if name == "bare":
            return
        if name.startswith("asynctrace"):
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            import asynctrace  # noqa: PLC0415

            ASYNCTRACE_OPTIONS.update(registry=CollectorRegistry())
            if name == "asynctrace-metrics-stuck":  # the stuck-task watch walking the loop
                ASYNCTRACE_OPTIONS["stuck_after"] = 60.0
            elif name == "asynctrace-metrics-sites":  # a creation site noted for every task
                ASYNCTRACE_OPTIONS["creation_sites"] = True
            elif name == "asynctrace-tracing":
                self.provider = discarding_provider()
                ASYNCTRACE_OPTIONS["tracer_provider"] = self.provider
            elif name == "asynctrace-tracing-otlp":
                # What users run: asynctrace's own provider, OTLP/HTTP protobuf to a receiver.
                ASYNCTRACE_OPTIONS["otlp_endpoint"] = receiver_url()
                self.flushes = asynctrace.flush
            asynctrace.install(**ASYNCTRACE_OPTIONS)
            self.create_task = asynctrace.create_task
            return
        if name.startswith("otel-asyncio"):
            from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor  # noqa: PLC0415
            from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415

            if name.startswith("otel-asyncio-spans"):
                os.environ["OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE"] = TRACED_NAMES
                self.provider = discarding_provider(otlp=name.endswith("-otlp"))
            AsyncioInstrumentor().instrument(
                meter_provider=MeterProvider(), tracer_provider=self.provider
            )
            return
        if name == "sentry":
            import sentry_sdk  # noqa: PLC0415
            from sentry_sdk.integrations.asyncio import AsyncioIntegration  # noqa: PLC0415
            from sentry_sdk.transport import Transport  # noqa: PLC0415

            class Discard(Transport):
                def capture_envelope(self, envelope: Any) -> None:  # noqa: ANN401
                    pass

            sentry_sdk.init(
                dsn="http://public@127.0.0.1:9/1",
                transport=Discard,
                traces_sample_rate=1.0,
                integrations=[AsyncioIntegration()],
                default_integrations=False,
            )
            return
        raise SystemExit(f"unknown mode {name!r}")

    @contextlib.contextmanager
    def section(self) -> Any:  # noqa: ANN401
        if self.name == "sentry":
            import sentry_sdk  # noqa: PLC0415

            with sentry_sdk.start_transaction(name="bench", op="bench"):
                yield
        else:
            yield

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()
        if self.flushes is not None:
            self.flushes()


def receiver_url() -> str:
    port = os.environ.get(RECEIVER_ENV)
    if not port:
        raise SystemExit(f"the -otlp modes need a receiver: {RECEIVER_ENV} is not set")
    return f"http://127.0.0.1:{port}"


def discarding_provider(*, otlp: bool = False) -> Any:  # noqa: ANN401
    """An SDK provider with a batch processor; its exporter discards, or sends OTLP/HTTP."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Any) -> SpanExportResult:  # noqa: ANN401
            self.count += len(spans)
            return SpanExportResult.SUCCESS

    exporter: Any = Discard()
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(endpoint=receiver_url() + "/v1/traces")
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=1 << 16, max_export_batch_size=2048)
    )
    return provider
