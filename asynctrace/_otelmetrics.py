"""Task metrics through an OpenTelemetry ``MeterProvider`` (when ``meter_provider=`` is given).

The same measurements as the Prometheus sink, named the OpenTelemetry way:
``asynctrace.task.duration`` (s, histogram), ``asynctrace.task.created`` (counter) and
``asynctrace.task.in_flight`` (up-down counter), with attributes ``asynctrace.operation`` and
``asyncio.task.outcome``. This path calls the OpenTelemetry API per task, so it costs more
than the Prometheus sink.
"""

from __future__ import annotations

from typing import Final, final

from opentelemetry.metrics import MeterProvider

from asynctrace._instrument import LeanInstrument, Outcome
from asynctrace._metadata import TaskMetadata

__all__ = ["OTelMetricsSink"]

_BOUNDARIES: Final = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
]  # fmt: skip


@final
class OTelMetricsSink(LeanInstrument):
    """Records task metrics on ``meter_provider``."""

    def __init__(self, meter_provider: MeterProvider, version: str) -> None:
        """Create the instruments on a meter named ``asynctrace``."""
        meter = meter_provider.get_meter("asynctrace", version)
        self._duration = meter.create_histogram(
            "asynctrace.task.duration",
            unit="s",
            description="Time from task creation to completion.",
            explicit_bucket_boundaries_advisory=_BOUNDARIES,
        )
        self._created = meter.create_counter(
            "asynctrace.task.created", unit="{task}", description="Tasks created."
        )
        self._in_flight = meter.create_up_down_counter(
            "asynctrace.task.in_flight", unit="{task}", description="Tasks not yet done."
        )

    def task_started(self, metadata: TaskMetadata) -> None:
        """Count the task and add it to the in-flight count."""
        attributes = {"asynctrace.operation": metadata.operation_name or "unnamed"}
        self._created.add(1, attributes)
        self._in_flight.add(1, attributes)

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Record the duration and take the task off the in-flight count."""
        op = metadata.operation_name or "unnamed"
        self._in_flight.add(-1, {"asynctrace.operation": op})
        self._duration.record(
            duration_ns / 1e9, {"asynctrace.operation": op, "asyncio.task.outcome": outcome}
        )
