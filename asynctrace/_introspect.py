"""Reading back what the factory attached: ``task_metadata()`` and ``task_record()``."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref
from collections.abc import Callable
from typing import Any, Final

from asynctrace._factory import STARTS_ATTR, LiveRecord, Starts
from asynctrace._metadata import _CORRELATION_ID, _METADATA, TaskMetadata, _make_metadata
from asynctrace._record import TaskRecord

__all__ = [
    "SLICE",
    "creation_site",
    "lean_entry",
    "lean_starts",
    "loop_tasks",
    "started_of",
    "task_metadata",
    "task_record",
    "walk_tasks",
]

_EMPTY_CONTEXT: Final = contextvars.Context()
SLICE: Final = 1000
"""Tasks :func:`walk_tasks` visits per loop turn."""


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


def lean_starts(loop: asyncio.AbstractEventLoop) -> Starts | None:
    """The lean path's table of ``loop``'s factory (``id(task)`` to what it keeps), or None."""
    return getattr(loop.get_task_factory(), STARTS_ATTR, None)


def lean_entry(task: asyncio.Future[Any]) -> object:
    """What the lean path keeps for a running task; None when it keeps nothing for it.

    The task's creation time, or an instrument's entry (a span handle, see ``Hooks.begin``).
    """
    try:
        starts = lean_starts(task.get_loop())
    except (AttributeError, RuntimeError):
        return None
    return starts.get(id(task)) if starts is not None else None


def started_of(
    task: asyncio.Future[Any], record: TaskRecord | None, starts: Starts | None
) -> tuple[int | None, int]:
    """When a running task was created (``perf_counter_ns``; None: unknown) and its trace id.

    From its record, else from what the lean path keeps in ``starts`` (the factory's table):
    the creation time itself, or an instrument's entry with ``created_ns`` (a span handle,
    with ``trace_id`` too). The trace id is 0 when the task has no sampled span.
    """
    if record is not None:
        return record.created_ns, record.trace_id
    entry = starts.get(id(task)) if starts is not None else None
    if entry is None or type(entry) is int:
        return entry, 0
    return getattr(entry, "created_ns", None), getattr(entry, "trace_id", 0)


def creation_site(task: asyncio.Future[Any]) -> str | None:
    """Where a running task was created (``install(creation_sites=True)``), else None."""
    record = task_record(task)
    return record.site if record is not None else None


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
    found: TaskMetadata | None = _context_of(task).get(_METADATA)  # no typing.cast: a call
    return found


def _context_of(task: asyncio.Future[Any]) -> contextvars.Context:
    """The context a task runs in (empty for a plain future)."""
    get_context = getattr(task, "get_context", None)
    if get_context is not None:  # Python 3.12+
        return get_context()  # type: ignore[no-any-return]
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


def loop_tasks(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The loop's tasks, or (3.11-3.13) weak references to every loop's, gathered fast.

    Python 3.14 keeps tasks per thread in C: ``asyncio.all_tasks`` is quick. Before, it
    iterates a ``WeakSet`` in Python (about 50 ms for 100,000 tasks, all in one loop turn);
    copying the set of weak references under it is a C copy, and the references are resolved
    (and filtered by loop) in slices. Private state, so only where it has that shape.
    """
    if sys.version_info >= (3, 14):
        return list(asyncio.all_tasks(loop))
    tasks_module: Any = asyncio.tasks
    weak = getattr(tasks_module, "_scheduled_tasks", None) or getattr(
        tasks_module, "_all_tasks", None
    )
    data = getattr(weak, "data", None)
    if not isinstance(weak, weakref.WeakSet) or not isinstance(data, set):
        return list(asyncio.all_tasks(loop))
    refs: list[Any] = list(data)
    eager = getattr(tasks_module, "_eager_tasks", None)  # 3.12-3.13: a plain set
    if isinstance(eager, set):
        refs += [t for t in list(eager) if t.get_loop() is loop]
    return refs


def walk_tasks(
    loop: asyncio.AbstractEventLoop,
    visit: Callable[[asyncio.Task[Any]], None],
    done: Callable[[], None],
    failed: Callable[[BaseException], None],
) -> None:
    """Call ``visit`` with each of ``loop``'s tasks, :data:`SLICE` per loop turn, then ``done``.

    Call it on the loop's own thread (asyncio's structures are not safe to walk from
    another). Between slices the loop runs its other callbacks, so a walk over 100,000 tasks
    never holds it for long. ``failed`` gets what a step raised; the walk then stops.
    """
    items = iter(loop_tasks(loop))

    def step() -> None:
        try:
            for _ in range(SLICE):
                item = next(items, None)
                if item is None:
                    done()
                    return
                if isinstance(item, weakref.ref):
                    item = item()
                    if item is None or item.get_loop() is not loop:
                        continue
                visit(item)
            loop.call_soon(step)  # the next slice
        except BaseException as exc:  # a broken walk must not break the loop
            failed(exc)

    step()
