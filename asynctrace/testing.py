"""Helpers for testing code that uses asynctrace (and for asynctrace's own tests).

Since: 0.1.0
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, final

from asynctrace._api import install
from asynctrace._hooks import Instrument
from asynctrace._install import configured_options, reset
from asynctrace._introspect import task_record
from asynctrace._record import TaskRecord

__all__ = ["TaskCapture", "capture_tasks", "record_of", "reset"]


@final
class TaskCapture(Instrument):
    """An instrument that keeps every created and finished task's record, in order.

    Attributes:
        created: ``(task name, record)`` in creation order.
        done: ``(task name, record)`` in completion order.
    """

    def __init__(self) -> None:
        """Start with nothing captured."""
        self.created: list[tuple[str, TaskRecord]] = []
        self.done: list[tuple[str, TaskRecord]] = []

    def task_created(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Keep the record of a new task."""
        self.created.append((task.get_name(), record))

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Keep the record of a finished task."""
        self.done.append((task.get_name(), record))


@contextlib.contextmanager
def capture_tasks() -> Iterator[TaskCapture]:
    """Install asynctrace on the running loop (or process-wide) and capture task records.

    Everything is uninstalled on exit::

        with asynctrace.testing.capture_tasks() as captured:
            await asyncio.gather(work(), work())
        assert [r.outcome for _, r in captured.done] == ["finished", "finished"]
    """
    if configured_options() is not None:
        raise RuntimeError("capture_tasks() needs asynctrace not to be installed already.")
    capture = TaskCapture()
    install(instruments=[capture])
    try:
        yield capture
    finally:
        reset()


def record_of(task: asyncio.Future[Any]) -> TaskRecord | None:
    """Return the record asynctrace keeps for ``task`` (None when its factory never saw it)."""
    return task_record(task)
