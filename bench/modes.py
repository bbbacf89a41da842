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
    "asynctrace-tracing",
    "otel-asyncio-metrics",
    "otel-asyncio-spans",
    "sentry",
]
# Coroutine names the OTel asyncio instrumentation is told to trace (its opt-in list).
TRACED_NAMES = "leaf,node,process,eager_leaf,handle,validate,enrich,store,consumer,producer"
# The options asynctrace was installed with in this worker (workloads reinstall with them).
ASYNCTRACE_OPTIONS: dict[str, Any] = {}


class Mode:
    """Sets a mode up inside the worker's running loop; flush() ends a timed section."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.provider: Any = None
        self.sentry_tx: Any = None

    def spawn(self, coro: Any, op: str) -> asyncio.Task[Any]:  # noqa: ANN401
        if self.name.startswith("asynctrace"):
            import asynctrace  # noqa: PLC0415

            return asynctrace.create_task(coro, operation_name=op)
        return asyncio.create_task(coro)

    async def setup(self) -> None:
        name = self.name
        if name == "bare":
            return
        if name.startswith("asynctrace"):
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            import asynctrace  # noqa: PLC0415

            ASYNCTRACE_OPTIONS.update(registry=CollectorRegistry())
            if name == "asynctrace-tracing":
                self.provider = discarding_provider()
                ASYNCTRACE_OPTIONS["tracer_provider"] = self.provider
            asynctrace.install(**ASYNCTRACE_OPTIONS)
            return
        if name.startswith("otel-asyncio"):
            from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor  # noqa: PLC0415
            from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415

            if name == "otel-asyncio-spans":
                os.environ["OTEL_PYTHON_ASYNCIO_COROUTINE_NAMES_TO_TRACE"] = TRACED_NAMES
                self.provider = discarding_provider()
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


def discarding_provider() -> Any:  # noqa: ANN401
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

    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(Discard(), max_queue_size=1 << 16, max_export_batch_size=2048)
    )
    return provider
