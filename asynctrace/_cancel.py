"""Why a task was cancelled: the reasons asyncio's cancellers leave, read when a task ends.

asyncio's own cancellers (a timeout expiring, a TaskGroup aborting, ``asyncio.run`` shutting
down) are wrapped by ``_cancel_patch`` to note, on each task they cancel, a
:class:`Cancellation`. When a task ends cancelled, :func:`cancellation_of` takes its note,
or says ``"explicit"``: somebody called ``task.cancel()`` (directly, or on a task awaiting
it). Nothing is read for tasks that are not cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any, Final, Literal, final

from asynctrace._metadata import TaskMetadata

__all__ = ["REASONS", "Cancellation", "Reason", "cancellation_of", "mark"]

Reason = Literal["timeout", "taskgroup", "shutdown", "explicit"]
REASONS: Final = ("timeout", "taskgroup", "shutdown", "explicit")
_MESSAGE_MAX: Final = 200


@final
class Cancellation:
    """Why a task was cancelled (on :class:`TaskRecord` as ``cancellation``).

    Attributes:
        reason: ``"timeout"`` (an ``asyncio.timeout`` or ``wait_for`` expired in the task
            awaiting it), ``"taskgroup"`` (its TaskGroup aborted: a sibling failed, or the
            group's body raised or was cancelled), ``"shutdown"`` (``asyncio.run`` or a
            ``Runner`` ended with it pending), or ``"explicit"`` (``task.cancel()`` called,
            on it or on a task awaiting it).
        message: The message given to ``cancel(msg)``, if any (at most 200 characters).
        by: The metadata of the task that caused it, where asyncio shows one: the task whose
            timeout expired, the sibling that failed; else None.

    Since: 0.3.0
    """

    __slots__ = ("by", "message", "reason")

    def __init__(
        self, reason: Reason, message: str | None = None, by: TaskMetadata | None = None
    ) -> None:
        """A cancellation for ``reason``."""
        self.reason = reason
        self.message = message
        self.by = by

    def __repr__(self) -> str:
        """Show the reason, the message and who caused it."""
        return f"<Cancellation {self.reason} message={self.message!r} by={self.by!r}>"


_lock: Final = threading.Lock()
_notes: Final[weakref.WeakKeyDictionary[asyncio.Future[Any], Cancellation]] = (
    weakref.WeakKeyDictionary()
)


def mark(task: asyncio.Future[Any], cancellation: Cancellation) -> None:
    """Note why ``task`` is being cancelled (the first note stands)."""
    with _lock:
        _notes.setdefault(task, cancellation)


def _message(task: asyncio.Future[Any]) -> str | None:
    """The ``cancel(msg)`` message, read without consuming the task's CancelledError.

    ``task.result()`` would hand the stored CancelledError over (and the app's own ``await``
    would then get one without the message); the C task shows it only to the garbage
    collector, whose ``get_referents`` reads it in place.
    """
    stored = getattr(task, "_cancelled_exc", None)  # the pure-Python Task
    if not isinstance(stored, asyncio.CancelledError):
        stored = next(
            (r for r in gc.get_referents(task) if isinstance(r, asyncio.CancelledError)), None
        )
    if stored is None or not stored.args or stored.args[0] is None:
        return None
    return str(stored.args[0])[:_MESSAGE_MAX]


def cancellation_of(task: asyncio.Future[Any]) -> Cancellation:
    """Why ``task``, which ended cancelled, was: its note, else ``"explicit"``.

    The note stays (it goes with the task): the metrics and the span each ask.
    """
    with _lock:
        note = _notes.get(task)
    message = _message(task)
    if note is None:
        return Cancellation("explicit", message)
    if message is not None and note.message is None:
        return Cancellation(note.reason, message, note.by)  # notes can be shared: a copy
    return note
