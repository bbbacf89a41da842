"""Sinks: instruments that turn each task's record into telemetry.

``tracing`` (OpenTelemetry spans), ``task_metrics`` (per-thread histograms and counters, pure
Python), ``prometheus`` (those, as a prometheus_client collector), ``otel_metrics`` (the same
through an OpenTelemetry MeterProvider), ``loop_monitor`` (loop lag and blocked loops) and
``logs`` (ids in log records). Each imports the core, never the export layer; each imports its
third-party library only when it is imported itself.
"""

__all__: list[str] = []
