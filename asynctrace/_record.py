"""The record the factory keeps for each observed task, and how a task ended."""

from __future__ import annotations

from typing import Final, Literal

from asynctrace._cancel import Cancellation
from asynctrace._metadata import TaskMetadata

__all__ = ["CANCELLED", "EXCEPTION", "FINISHED", "Outcome", "TaskRecord"]

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
        cancellation: Why the task was cancelled (a :class:`Cancellation`), set when it
            ended cancelled; else None.
        site: Where the task was created (``file:line in function``) when
            ``install(creation_sites=True)``; else None.
        trace_id: The trace id of the task's span when the task is traced and sampled, else 0.
        span_id: The span id of that span, else 0.

    Every field is asynctrace's: instruments read them and write none. An instrument that
    needs per-task state of its own keeps it in a mapping keyed by the record (records hash
    by identity), and drops the entry in ``task_done``.

    Since: 0.1.0
    """

    __slots__ = (
        "_span",
        "cancellation",
        "created_ns",
        "exception",
        "finished_ns",
        "metadata",
        "outcome",
        "site",
        "span_id",
        "trace_id",
    )

    def __init__(self, metadata: TaskMetadata, created_ns: int) -> None:
        """Record a task created at ``created_ns`` with ``metadata``."""
        self.metadata = metadata
        self.created_ns = created_ns
        self.finished_ns = 0
        self.outcome: Outcome | None = None
        self.exception: BaseException | None = None
        self.cancellation: Cancellation | None = None
        self.site: str | None = None
        self.trace_id = 0
        self.span_id = 0
        # The span sink's own per-task state (its span handle); nobody else's.
        self._span: object = None

    @property
    def duration_s(self) -> float | None:
        """Seconds from creation to completion, or None while the task runs."""
        if not self.finished_ns:
            return None
        return (self.finished_ns - self.created_ns) / 1e9

    def __repr__(self) -> str:
        """Show the metadata and the outcome."""
        return f"<TaskRecord {self.metadata!r} outcome={self.outcome!r}>"
