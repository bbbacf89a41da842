"""OpenTelemetry's instrumentor for asynctrace: ``opentelemetry-instrument python app.py``.

Registered in the ``opentelemetry_instrumentor`` entry point group, which
``opentelemetry-instrument`` loads (after its distro has configured the SDK from the
``OTEL_*`` variables): asynctrace is then installed process-wide, before the application
runs, on the tracer provider that was set up (or the one given as ``tracer_provider``).
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=asynctrace`` leaves it out.

Needs ``opentelemetry-instrumentation`` (which ``opentelemetry-instrument`` comes with).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

__all__ = ["AsynctraceInstrumentor"]


class AsynctraceInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``instrument()`` installs asynctrace process-wide; ``uninstrument()`` shuts it down."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing to check: asyncio is part of Python."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:  # noqa: ANN401
        import asynctrace  # noqa: PLC0415

        options = {}
        if kwargs.get("tracer_provider") is not None:
            options["tracer_provider"] = kwargs["tracer_provider"]
        if kwargs.get("meter_provider") is not None:
            options["meter_provider"] = kwargs["meter_provider"]
        asynctrace.install(**options)

    def _uninstrument(self, **kwargs: Any) -> None:  # noqa: ANN401, ARG002
        import asynctrace  # noqa: PLC0415

        asynctrace.shutdown()
