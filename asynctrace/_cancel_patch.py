"""asyncio's cancellers, wrapped to say why they cancel (see ``_cancel``) while installed.

Each wrapper notes a :class:`Cancellation` on the tasks about to be cancelled, then calls
asyncio's own function unchanged: what the cancellers do, and when, stays asyncio's. They run
only when something is cancelled, so tasks that are not pay nothing.

- ``asyncio.timeouts.Timeout._on_timeout``: the tasks the timed-out task awaits (the task
  itself gets ``TimeoutError``, not a cancellation); Python 3.12+ ``wait_for`` uses it.
- Python 3.11's ``asyncio.tasks._cancel_and_wait``, what its ``wait_for`` cancels with.
- ``asyncio.taskgroups.TaskGroup._abort`` (and ``_on_task_done``, to know the failed sibling).
- ``asyncio.runners._cancel_all_tasks``: ``asyncio.run`` or a ``Runner`` ending with tasks
  still pending; they are also reported (one log record, a count by operation).

These are private functions of asyncio; each is wrapped only where it exists with the
expected signature (checked on 3.11 to 3.14 by tests/test_cancellation.py), and put back
when the last installation ends.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from asynctrace._cancel import Cancellation, mark
from asynctrace._introspect import task_metadata
from asynctrace._state import STATE

__all__ = ["patch", "unpatch", "waited_on"]

_DEPTH: Final = 100  # a bound for awaiting chains


def waited_on(task: asyncio.Future[Any]) -> list[asyncio.Future[Any]]:
    """The tasks ``task`` is waiting for now: the one it awaits, or a gather's children."""
    waiter = getattr(task, "_fut_waiter", None)
    if waiter is None:
        return []
    children = getattr(waiter, "_children", None)  # gather's _GatheringFuture
    if isinstance(children, list):
        return [c for c in children if isinstance(c, asyncio.Future)]
    return [waiter] if isinstance(waiter, asyncio.Task) else []


def _mark_below(task: asyncio.Future[Any], cancellation: Cancellation) -> None:
    """Note ``cancellation`` on what ``task`` waits for, and on what that waits for."""
    todo, seen = waited_on(task), 0
    while todo and seen < _DEPTH:
        inner = todo.pop()
        seen += 1
        if not inner.done():
            mark(inner, cancellation)
            todo += waited_on(inner)


def _guard(note: Callable[..., None]) -> Callable[..., None]:
    """A note that fails is counted, never raised into asyncio's canceller."""

    @functools.wraps(note)
    def guarded(*args: Any) -> None:  # noqa: ANN401
        try:
            note(*args)
        except Exception as exc:
            STATE.errors.count("cancellation reasons", exc)

    return guarded


@_guard
def _note_timeout(timeout: Any) -> None:  # noqa: ANN401 - an asyncio.Timeout
    task = getattr(timeout, "_task", None)
    if isinstance(task, asyncio.Future):
        _mark_below(task, Cancellation("timeout", by=task_metadata(task)))


@_guard
def _note_wait_for(future: Any) -> None:  # noqa: ANN401
    # Python 3.11's wait_for cancels the future on a timeout, or when its own task is
    # cancelled (then the reason is that task's).
    current = asyncio.current_task()
    if isinstance(future, asyncio.Future) and (current is None or not current.cancelling()):
        cancellation = Cancellation("timeout", by=task_metadata(current) if current else None)
        mark(future, cancellation)
        _mark_below(future, cancellation)


_failed = threading.local()  # the TaskGroup child whose failure is being handled


@_guard
def _note_abort(group: Any) -> None:  # noqa: ANN401 - an asyncio.TaskGroup
    failed = getattr(_failed, "task", None)
    by = task_metadata(failed) if failed is not None else None
    cancellation = Cancellation("taskgroup", by=by)
    for task in list(getattr(group, "_tasks", ())):
        if isinstance(task, asyncio.Future) and not task.done():
            mark(task, cancellation)
            _mark_below(task, cancellation)


_on_shutdown: list[Callable[[asyncio.AbstractEventLoop, list[asyncio.Task[Any]], str], None]] = []


@_guard
def _note_shutdown(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    cancellation = Cancellation("shutdown")
    for task in pending:
        mark(task, cancellation)
    for report in _on_shutdown:
        report(loop, pending, "asyncio.run ended")


def _wrapper(original: Callable[..., Any], note: Callable[[Any], None]) -> Callable[..., Any]:
    """Call ``note`` with the first argument (the object, or the loop), then ``original``."""

    @functools.wraps(original)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        note(first)
        return original(first, *args, **kwargs)

    wrapper.__asynctrace_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _failure_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``TaskGroup._on_task_done``: its ``_abort()`` call then knows the failed sibling."""

    @functools.wraps(original)
    def _on_task_done(self: Any, task: Any) -> Any:  # noqa: ANN401
        before = getattr(_failed, "task", None)
        _failed.task = task
        try:
            return original(self, task)
        finally:
            _failed.task = before

    _on_task_done.__asynctrace_original__ = original  # type: ignore[attr-defined]
    return _on_task_done


def _targets() -> list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
    """(owner, attribute, how to wrap what is there) on this Python."""
    from asyncio import runners, taskgroups, tasks, timeouts  # noqa: PLC0415

    def noting(note: Callable[[Any], None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda original: _wrapper(original, note)

    targets = [
        (timeouts.Timeout, "_on_timeout", noting(_note_timeout)),
        (taskgroups.TaskGroup, "_abort", noting(_note_abort)),
        (taskgroups.TaskGroup, "_on_task_done", _failure_wrapper),
        (runners, "_cancel_all_tasks", noting(_note_shutdown)),
    ]
    if sys.version_info < (3, 12):
        targets.append((tasks, "_cancel_and_wait", noting(_note_wait_for)))
    return targets


_lock: Final = threading.Lock()
_patched: list[tuple[Any, str, Any]] = []  # (owner, name, what was there)


def patch(
    on_shutdown: Callable[[asyncio.AbstractEventLoop, list[asyncio.Task[Any]], str], None],
) -> None:
    """Wrap asyncio's cancellers (once); ``on_shutdown`` hears of tasks pending at the end."""
    with _lock:
        _on_shutdown[:] = [on_shutdown]
        if _patched:
            return
        for owner, name, wrap in _targets():
            current = vars(owner).get(name)
            if not callable(current) or hasattr(current, "__asynctrace_original__"):
                continue  # not there on this Python, or wrapped already
            _patched.append((owner, name, current))
            setattr(owner, name, wrap(current))


def unpatch() -> None:
    """Put asyncio's own functions back (those still ours: a later wrapper stays)."""
    with _lock:
        for owner, name, original in reversed(_patched):
            current = owner.__dict__.get(name)
            if getattr(current, "__asynctrace_original__", None) is original:
                setattr(owner, name, original)
        _patched.clear()
        _on_shutdown.clear()
