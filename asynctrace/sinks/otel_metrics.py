"""Task metrics through an OpenTelemetry ``MeterProvider`` (when ``meter_provider=`` is given).

The same measurements as the Prometheus sink, named the OpenTelemetry way:
``asynctrace.task.duration`` (s, histogram), ``asynctrace.task.created`` (counter) and
``asynctrace.task.in_flight`` (up-down counter), ``asynctrace.task.cancellations`` (counter,
with ``asyncio.task.cancel.reason``), with attributes ``asynctrace.operation`` and
``asyncio.task.outcome``. This path calls the OpenTelemetry API per task, so it costs more
than the Prometheus sink.
"""

from __future__ import annotations

from typing import Final, final

from opentelemetry.metrics import MeterProvider

from asynctrace._cancel import Cancellation
from asynctrace._hooks import LeanInstrument
from asynctrace._metadata import TaskMetadata
from asynctrace._record import Outcome
from asynctrace.sinks.task_metrics import DURATION_BUCKETS, OperationLabels

__all__ = ["OTelMetricsSink"]

_BOUNDARIES: Final = list(DURATION_BUCKETS)


@final
class OTelMetricsSink(LeanInstrument):
    """Records task metrics on ``meter_provider``."""

    def __init__(
        self, meter_provider: MeterProvider, version: str, max_operations: int = 100
    ) -> None:
        """Create the instruments on a meter named ``asynctrace``.

        At most ``max_operations`` distinct ``asynctrace.operation`` values, the rest as
        ``_other`` (as the Prometheus sink does).
        """
        self._labels = OperationLabels(max_operations)
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
        self._cancellations = meter.create_counter(
            "asynctrace.task.cancellations",
            unit="{task}",
            description="Tasks that ended cancelled, by why.",
        )

    def task_started(self, metadata: TaskMetadata) -> None:
        """Count the task and add it to the in-flight count."""
        attributes = {"asynctrace.operation": self._labels.label(metadata.operation_name)}
        self._created.add(1, attributes)
        self._in_flight.add(1, attributes)

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Record the duration and take the task off the in-flight count."""
        op = self._labels.label(metadata.operation_name)
        self._in_flight.add(-1, {"asynctrace.operation": op})
        self._duration.record(
            duration_ns / 1e9, {"asynctrace.operation": op, "asyncio.task.outcome": outcome}
        )

    def task_cancelled(self, metadata: TaskMetadata, cancellation: Cancellation) -> None:
        """Count the cancellation by operation and reason."""
        self._cancellations.add(
            1,
            {
                "asynctrace.operation": self._labels.label(metadata.operation_name),
                "asyncio.task.cancel.reason": cancellation.reason,
            },
        )
