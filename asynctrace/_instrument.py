"""The record kept for each task, and the hooks that sinks (spans, metrics, yours) implement.

Flow: ``create_task`` -> factory (validate, context, a :class:`TaskRecord`) -> done callback ->
each installed :class:`Instrument`. The core knows nothing of OpenTelemetry or Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Literal

from asynctrace._metadata import TaskMetadata

__all__ = ["FINISHED", "TASK_HOOKS", "Instrument", "LeanInstrument", "Outcome", "TaskRecord"]

logger: Final = logging.getLogger("asynctrace")

Outcome = Literal["finished", "exception", "cancelled"]
FINISHED: Final = "finished"
EXCEPTION: Final = "exception"
CANCELLED: Final = "cancelled"


class TaskRecord:
    """What the factory records for one task; handed to :class:`Instrument` hooks.

    Attributes:
        metadata: The task's :class:`TaskMetadata`.
        created_ns: ``time.perf_counter_ns()`` when ``create_task`` was called.
        finished_ns: ``time.perf_counter_ns()`` when the task was done; 0 while it runs.
        outcome: ``"finished"``, ``"exception"`` or ``"cancelled"``; None while it runs.
        exception: The exception the task ended with, or None. Reading it here does not mark
            it retrieved: asyncio still warns about exceptions nobody awaited.
        sink_data: One slot a sink may use for its per-task state (the span sink keeps the
            span's identity there). None unless a sink sets it.

    Since: 0.1.0
    """

    __slots__ = (
        "created_ns",
        "exception",
        "finished_ns",
        "metadata",
        "outcome",
        "sink_data",
    )

    def __init__(self, metadata: TaskMetadata, created_ns: int) -> None:
        """Record a task created at ``created_ns`` with ``metadata``."""
        self.metadata = metadata
        self.created_ns = created_ns
        self.finished_ns = 0
        self.outcome: Outcome | None = None
        self.exception: BaseException | None = None
        self.sink_data: Any = None

    @property
    def duration_s(self) -> float | None:
        """Seconds from creation to completion, or None while the task runs."""
        if not self.finished_ns:
            return None
        return (self.finished_ns - self.created_ns) / 1e9

    def __repr__(self) -> str:
        """Show the metadata and the outcome."""
        return f"<TaskRecord {self.metadata!r} outcome={self.outcome!r}>"


class Instrument:
    """Base class for task observers: override the hooks you need, leave the rest.

    Only hooks a subclass overrides are ever called, so an unused hook costs nothing. Hooks run
    on the event loop's thread, synchronously, and must be quick: record, don't export. A hook
    that raises is disabled for the rest of the process, logged once on the ``asynctrace``
    logger and counted (:func:`asynctrace.telemetry_errors`); the task is never affected.

    Since: 0.1.0
    """

    def task_context(self, record: TaskRecord) -> None:
        """Called inside the new task's context before the task is built.

        Context variables set here are what the task's first step sees (even an eager one);
        the task object does not exist yet.
        """

    def loop_attached(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called when asynctrace's factory is put on ``loop`` (to start per-loop monitors)."""

    def task_created(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Called right after the factory built ``task`` (an eager task may be done already)."""

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Called once ``task`` is done; ``record.outcome`` and ``finished_ns`` are set."""

    def close(self) -> None:
        """Flush and release what the instrument holds.

        Called once, by :func:`asynctrace.shutdown` or when the last installation is removed.
        """


class LeanInstrument(Instrument):
    """An instrument that needs only each task's metadata, outcome and duration (internal).

    When every installed instrument that observes tasks is lean, the factory keeps no
    :class:`TaskRecord` at all: it notes the creation time in a per-loop table keyed by the
    task's id and reads the metadata back from the task's context when it is done. No object
    is allocated per task, so a large fan-out does not feed the garbage collector. Any other
    task-observing instrument (spans, yours) switches the factory back to records, and these
    hooks are then called from ``task_created``/``task_done``.
    """

    def task_started(self, metadata: TaskMetadata) -> None:
        """Called right after the factory built a task with ``metadata``."""

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Called once a task is done, ``duration_ns`` after its creation."""

    def task_created(self, task: asyncio.Task[Any], record: TaskRecord) -> None:  # noqa: ARG002
        """Forward to :meth:`task_started` (the path with records)."""
        self.task_started(record.metadata)

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:  # noqa: ARG002
        """Forward to :meth:`task_finished` (the path with records)."""
        self.task_finished(
            record.metadata, record.outcome or FINISHED, record.finished_ns - record.created_ns
        )


TASK_HOOKS: Final = ("task_context", "task_created", "task_done")


def overrides(instrument: Instrument, hook: str) -> bool:
    """Tell whether ``instrument``'s class overrides ``hook`` of :class:`Instrument`."""
    return getattr(type(instrument), hook) is not getattr(Instrument, hook)
