"""The hooks that sinks (spans, metrics, yours) implement, their table, and the one isolated call.

Only the hooks an instrument's class overrides go into the table (trio's model), so an unused
hook costs nothing. :func:`call_each` is the only place a hook is called: a hook that raises
costs that one call. The failure is counted under the instrument's name and logged (the first
time, then at most once a minute); the hook is called again for the next task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar, Final, final

from asynctrace._cancel import Cancellation
from asynctrace._errors import ErrorCounts
from asynctrace._metadata import TaskMetadata
from asynctrace._record import FINISHED, Outcome, TaskRecord

__all__ = [
    "TASK_HOOKS",
    "Hooks",
    "Instrument",
    "LeanInstrument",
    "call_each",
    "overrides",
    "source_of",
]


class Instrument:
    """Base class for task observers: override the hooks you need, leave the rest.

    Only hooks a subclass overrides are ever called, so an unused hook costs nothing. Hooks run
    on the event loop's thread, synchronously, and must be quick: record, don't export. A hook
    that raises costs that one call: the failure is counted under the instrument's class name
    (:func:`asynctrace.telemetry_errors`) and logged on the ``asynctrace`` logger the first time
    (then at most once a minute); the hook is still called for later tasks, and the task is
    never affected.

    Since: 0.1.0
    """

    # Whether this instrument's task_done may run inside the task's last step, the moment it
    # is done (the loop's tap, see _speedups_py.Tap), rather than from a Handle. Only
    # asynctrace's own sinks say so: yours keep asyncio's usual callback turn.
    _instant: ClassVar[bool] = False
    # Whether this instrument also has task_begin/task_end, the lean path's per-task pair
    # (see Hooks.begin), which its lean_hooks() returns: asynctrace's span sink. The factory
    # then keeps no record for it.
    _lean_span: ClassVar[bool] = False

    def task_context(self, record: TaskRecord) -> None:
        """Called inside the new task's context before the task is built.

        Context variables set here are what the task's first step sees (even an eager one);
        the task object does not exist yet.
        """

    def loop_attached(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called when asynctrace's factory is put on ``loop`` (to start per-loop monitors)."""

    def correlation_scope(
        self,
        correlation_id: str,  # noqa: ARG002
        name: str | None,  # noqa: ARG002
    ) -> Callable[[BaseException | None], None] | None:
        """Called inside a :func:`asynctrace.correlation` block that sets a new id.

        ``name`` is the block's ``span_name``. Return a callable to run when the block ends
        (given the exception that ends it, or None), or None.
        """
        return None

    def task_created(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Called right after the factory built ``task`` (an eager task may be done already)."""

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """Called once ``task`` is done; ``record.outcome`` and ``finished_ns`` are set."""

    def task_destroyed(self, task: asyncio.Future[Any], metadata: TaskMetadata) -> None:
        """Called when ``task`` was destroyed while still pending: it will never be done.

        asyncio reports it (and still logs "Task was destroyed but it is pending!"); the
        task had ``metadata``. Called on the thread that collected the task.
        """

    def task_never_retrieved(self, task: asyncio.Future[Any], metadata: TaskMetadata) -> None:
        """Called when ``task`` ended with an exception nobody retrieved, as it is collected.

        asyncio reports it ("Task exception was never retrieved", still logged, now with
        the task's ids); called on the thread that collected the task.
        """

    def task_stuck(self, task: asyncio.Task[Any], metadata: TaskMetadata, age_s: float) -> None:
        """Called once when ``task`` has been pending longer than its ``stuck_after``.

        Called on the task's loop thread, between steps, with the task's age in seconds.
        """

    def tasks_pending_at_close(
        self,
        loop: asyncio.AbstractEventLoop,
        pending: list[tuple[asyncio.Task[Any], TaskMetadata]],
        when: str,
    ) -> None:
        """Called with the tasks still pending when ``loop`` closes or ``asyncio.run`` ends.

        ``when`` says which. At the end of ``asyncio.run`` they are about to be cancelled
        (reason ``"shutdown"``); at a ``loop.close()`` they will never run again.
        """

    def close(self) -> None:
        """Flush and release what the instrument holds.

        Called once, by :func:`asynctrace.shutdown` or when the last installation is removed.
        """

    def after_fork(self) -> None:
        """Called in a child process after ``os.fork()``, instead of :meth:`close`.

        The child starts with nothing installed. Release what the child inherited (sockets,
        registrations) without waiting on threads, which exist only in the parent; flush
        nothing, the parent exports its own data.
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

    _instant = True

    def task_started(self, metadata: TaskMetadata) -> None:
        """Called right after the factory built a task with ``metadata``."""

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Called once a task is done, ``duration_ns`` after its creation."""

    def task_cancelled(self, metadata: TaskMetadata, cancellation: Cancellation) -> None:
        """Called after :meth:`task_finished` for a task that ended cancelled: why it was."""

    def task_exemplar(
        self,
        metadata: TaskMetadata,
        outcome: Outcome,
        duration_ns: int,
        trace_id: int,
        span_id: int,
    ) -> None:
        """Called after :meth:`task_finished` for a task whose span was sampled: its ids."""

    def task_created(self, task: asyncio.Task[Any], record: TaskRecord) -> None:  # noqa: ARG002
        """Forward to :meth:`task_started` (the path with records)."""
        self.task_started(record.metadata)

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:  # noqa: ARG002
        """Forward to :meth:`task_finished` (the path with records)."""
        outcome = record.outcome or FINISHED
        duration = record.finished_ns - record.created_ns
        self.task_finished(record.metadata, outcome, duration)
        if record.trace_id:
            self.task_exemplar(record.metadata, outcome, duration, record.trace_id, record.span_id)
        if record.cancellation is not None:
            self.task_cancelled(record.metadata, record.cancellation)


TASK_HOOKS: Final = ("task_context", "task_created", "task_done")


def overrides(instrument: Instrument, hook: str) -> bool:
    """Tell whether ``instrument``'s class overrides ``hook`` of :class:`Instrument`."""
    return getattr(type(instrument), hook) is not getattr(Instrument, hook)


def source_of(hook: Callable[..., object]) -> str:
    """How telemetry errors name the instrument a hook belongs to (a label value)."""
    owner = getattr(hook, "__self__", hook)
    owner = getattr(owner, "instrument", owner)  # a SpanHooks: its span sink's
    return f"instrument {type(owner).__name__}"


def call_each(hooks: tuple[Callable[..., None], ...], errors: ErrorCounts, *args: object) -> None:
    """Call each hook with ``args``; a hook that raises is counted and logged, never re-raised.

    CancelledError is caught too: a hook runs inside a task's completion or creation, where a
    stray cancellation must not change what the task does.
    """
    for hook in hooks:
        try:
            hook(*args)
        except (Exception, asyncio.CancelledError) as exc:
            errors.count(source_of(hook), exc)


_Hook = Callable[..., None]


@final
class Hooks:
    """The hook table of one set of instruments: replaced whole, never mutated.

    The factory reads these tuples without a lock, which is safe with and without the GIL.

    Attributes:
        instruments: Every instrument, in the order given (closed in this order).
        context: ``task_context`` of the instruments that override it.
        created: ``task_created`` likewise.
        done: ``task_done`` likewise.
        attached: ``loop_attached`` likewise.
        destroyed: ``task_destroyed`` likewise.
        never_retrieved: ``task_never_retrieved`` likewise.
        scope: ``correlation_scope`` likewise.
        lean: True when every task-observing instrument is a :class:`LeanInstrument`, but
            for at most one with ``task_begin``/``task_end`` (the span sink): the factory then
            keeps no record and calls ``started``, ``begin``, ``finished`` and ``end``.
        instant: True when every ``task_done`` may run inside the task's last step (all are
            asynctrace's own); else the done hooks run from a ``Handle``.
        started: ``task_started`` of the lean instruments (on the lean path).
        begin: On the lean path, the span sink's ``task_begin(metadata, created_ns)`` (or
            its shortcut, from ``lean_hooks()``), or None. Called in the new task's context;
            what it returns (None: nothing) is kept for the task in place of its creation
            time, and has a ``created_ns``.
        end: The same instrument's ``task_end(task, entry, metadata, outcome,
            finished_ns)`` (likewise), called with that entry once the task is done.
        exemplars: ``task_exemplar`` of the lean instruments that override it.
        finished: ``task_finished`` of the lean instruments.
        cancelled: ``task_cancelled`` of the lean instruments that override it.
        stuck: ``task_stuck`` likewise (of every instrument).
        pending_at_close: ``tasks_pending_at_close`` likewise.
    """

    __slots__ = (
        "attached",
        "begin",
        "cancelled",
        "context",
        "created",
        "destroyed",
        "done",
        "end",
        "exemplars",
        "finished",
        "instant",
        "instruments",
        "lean",
        "never_retrieved",
        "pending_at_close",
        "scope",
        "started",
        "stuck",
    )

    def __init__(self, instruments: tuple[Instrument, ...] = ()) -> None:
        """Build the table for ``instruments``."""
        self.instruments = instruments

        def overridden(hook: str) -> tuple[_Hook, ...]:
            return tuple(getattr(i, hook) for i in instruments if overrides(i, hook))

        self.attached = overridden("loop_attached")
        self.destroyed = overridden("task_destroyed")
        self.never_retrieved = overridden("task_never_retrieved")
        self.stuck = overridden("task_stuck")
        self.pending_at_close = overridden("tasks_pending_at_close")
        self.scope: tuple[Callable[..., Callable[[BaseException | None], None] | None], ...] = (
            tuple(i.correlation_scope for i in instruments if overrides(i, "correlation_scope"))
        )
        observers = [i for i in instruments if any(overrides(i, h) for h in TASK_HOOKS)]
        lean = [i for i in observers if isinstance(i, LeanInstrument)]
        paired = [i for i in observers if type(i)._lean_span and i not in lean]
        self.lean = len(paired) <= 1 and 0 < len(lean) + len(paired) == len(observers)
        self.begin: _Hook | None = None
        self.end: _Hook | None = None
        if self.lean and paired:
            self.begin, self.end = paired[0].lean_hooks()  # type: ignore[attr-defined]
        self.exemplars: tuple[_Hook, ...] = tuple(
            i.task_exemplar
            for i in lean
            if type(i).task_exemplar is not LeanInstrument.task_exemplar
        )
        self.started: tuple[_Hook, ...] = tuple(i.task_started for i in lean)
        self.finished: tuple[_Hook, ...] = tuple(i.task_finished for i in lean)
        self.cancelled: tuple[_Hook, ...] = tuple(
            i.task_cancelled
            for i in lean
            if type(i).task_cancelled is not LeanInstrument.task_cancelled
        )
        self.context: tuple[_Hook, ...] = () if self.lean else overridden("task_context")
        self.created: tuple[_Hook, ...] = () if self.lean else overridden("task_created")
        self.done: tuple[_Hook, ...] = () if self.lean else overridden("task_done")
        self.instant = all(type(i)._instant for i in instruments if overrides(i, "task_done"))
