"""asynctrace: observability for asyncio tasks.

One call, :func:`install`, puts a task factory on the event loop. Every task created from then
on carries a :class:`TaskMetadata` (``operation_name``, ``correlation_id``,
``priority_hint``), readable from the task (:func:`task_metadata`) and, inside it, from context
variables (:func:`correlation_id`), while asyncio behaves exactly as before.

Exceptions: asynctrace raises only built-in ones, at the edge (bad arguments):
``TypeError`` for a wrong type or an unknown keyword, ``ValueError`` for a bad value,
``RuntimeError`` for a call in the wrong state. Inside running tasks it never raises: telemetry
failures are logged once and counted (:func:`telemetry_errors`).
"""

from __future__ import annotations

from asynctrace._factory import create_task, task_metadata
from asynctrace._install import Installation, install, loop_factory, uninstall
from asynctrace._instrument import Instrument, TaskRecord
from asynctrace._logs import TaskContextFilter, add_task_context
from asynctrace._metadata import (
    TaskMetadata,
    correlation,
    correlation_id,
    random_correlation_id,
)
from asynctrace._state import STATE as _STATE
from asynctrace._telemetry import OTLPJsonFileSpanExporter, Summary, summary
from asynctrace._version import __version__

__all__ = [
    "Installation",
    "Instrument",
    "OTLPJsonFileSpanExporter",
    "Summary",
    "TaskContextFilter",
    "TaskMetadata",
    "TaskRecord",
    "__version__",
    "add_task_context",
    "correlation",
    "correlation_id",
    "create_task",
    "install",
    "loop_factory",
    "random_correlation_id",
    "shutdown",
    "summary",
    "task_metadata",
    "telemetry_errors",
    "uninstall",
]


def telemetry_errors() -> dict[str, int]:
    """Return how many telemetry failures each source had (an instrument, an exporter, ...).

    Failures never reach the application; each source's first one is logged on the
    ``asynctrace`` logger.

    Since: 0.1.0
    """
    with _STATE.lock:
        return dict(_STATE.errors)


def shutdown() -> None:
    """Flush and stop what :func:`install` started, and uninstall everywhere.

    Exports the spans still queued (when asynctrace made the TracerProvider), stops the
    ``/metrics`` server and the loop watchdog, unregisters the metrics and restores the previous
    task factories and policy. Registered to run at interpreter exit; calling it twice is
    harmless.

    Since: 0.1.0
    """
    from asynctrace._install import reset  # noqa: PLC0415 - keeps the import graph one-way

    reset()  # the last uninstall stops telemetry, which flushes the provider it made
