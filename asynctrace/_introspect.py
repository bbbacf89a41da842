"""Reading back what the factory attached: ``task_metadata()`` and ``task_record()``."""

from __future__ import annotations

import asyncio
import contextvars
import gc
from typing import Any, Final, cast

from asynctrace._factory import LiveRecord
from asynctrace._metadata import _CORRELATION_ID, _METADATA, TaskMetadata, _make_metadata
from asynctrace._record import TaskRecord

__all__ = ["task_metadata", "task_record"]

_EMPTY_CONTEXT: Final = contextvars.Context()


def task_record(task: asyncio.Future[Any]) -> TaskRecord | None:
    """Return the :class:`TaskRecord` of a task still running, or None.

    The record is the task's done callback, so it is found while the task runs; after that,
    instruments have had it in ``task_done``.
    """
    for callback in getattr(task, "_callbacks", None) or ():
        fn = callback[0] if isinstance(callback, tuple) else callback
        if isinstance(fn, LiveRecord):
            return fn
    return None


def task_metadata(task: asyncio.Future[Any] | None = None) -> TaskMetadata | None:
    """Return a task's :class:`TaskMetadata`, or None for a task the factory never saw.

    Args:
        task: The task; by default the code running now: the current task, or the task
            whose context this code runs in (a callback it scheduled, a worker thread
            started with :func:`asynctrace.run_in_executor`). None outside any.

    With no argument it describes the code running now: inside a
    :func:`asynctrace.correlation` block its ``correlation_id`` is the block's, as
    :func:`asynctrace.correlation_id` says. Given a task, it is the metadata the task was
    created with.

    The metadata is read from the task's context (nothing is stored on the task), while it
    runs and after it is done. So a task built by calling ``asyncio.Task(...)`` directly
    (bypassing ``create_task`` and so the factory) inside an instrumented task reports the
    metadata of the task that created it.

    Since: 0.1.0
    """
    if task is None:
        # Inside a task (even during an eager first step, before the factory has returned
        # the task) the metadata is in the context; so it is in a context copied from one
        # (a callback the task scheduled, a thread run by run_in_executor). Elsewhere: None.
        metadata = _METADATA.get()
        correlation_id = _CORRELATION_ID.get()
        if metadata is not None and metadata.correlation_id != correlation_id:
            # inside a correlation() block: one rule, the innermost id
            return _make_metadata(metadata.operation_name, correlation_id, metadata.priority_hint)
        return metadata
    return cast("TaskMetadata | None", _context_of(task).get(_METADATA))


def _context_of(task: asyncio.Future[Any]) -> contextvars.Context:
    """The context a task runs in (empty for a plain future)."""
    get_context = getattr(task, "get_context", None)
    if get_context is not None:  # Python 3.12+
        return cast("contextvars.Context", get_context())
    context = getattr(task, "_context", None)  # the pure-Python Task
    if isinstance(context, contextvars.Context):
        return context
    # Python 3.11's C Task keeps its context private, but hands it to the garbage collector
    # first (TaskObj_traverse visits task_context before anything else; a subclass's own
    # slots, __dict__ and type come before that).
    if isinstance(task, asyncio.Task):
        for referent in gc.get_referents(task):
            if type(referent) is contextvars.Context:
                return referent
    return _EMPTY_CONTEXT
