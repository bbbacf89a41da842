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
from asynctrace._metadata import (
    TaskMetadata,
    correlation,
    correlation_id,
    random_correlation_id,
)
from asynctrace._state import STATE as _STATE

__all__ = [
    "Installation",
    "Instrument",
    "TaskMetadata",
    "TaskRecord",
    "__version__",
    "correlation",
    "correlation_id",
    "create_task",
    "install",
    "loop_factory",
    "random_correlation_id",
    "task_metadata",
    "telemetry_errors",
    "uninstall",
]

__version__ = "0.1.0"


def telemetry_errors() -> dict[str, int]:
    """Return how many telemetry failures each source had (an instrument, an exporter, ...).

    Failures never reach the application; each source's first one is logged on the
    ``asynctrace`` logger.

    Since: 0.1.0
    """
    with _STATE.lock:
        return dict(_STATE.errors)
