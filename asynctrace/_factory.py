"""The task factory: the hot path, run for every task created on an instrumented loop.

How metadata reaches the factory (see docs/design.md): Python 3.14 forwards the keywords of
``create_task``; everywhere, the helper in ``_create_task`` hands them over in a thread-local
slot.

The factory never wraps the coroutine: it prepares the task's context (correlation id and
metadata set in it), lets asyncio (or the factory it chains) build the task, and adds one done
callback that records the outcome without marking exceptions as retrieved.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, Protocol, cast, final

from asynctrace import _native
from asynctrace._cancel import cancellation_of
from asynctrace._create_task import (
    ASYNCIO_KEYWORDS,
    FACTORY_MARK,
    METADATA_KEYWORDS,
    PENDING,
    check_context,
    close_coro,
    unknown_keywords_message,
)
from asynctrace._hooks import Hooks, call_each, source_of
from asynctrace._metadata import (
    _CORRELATION_ID,
    _METADATA,
    TaskMetadata,
    _make_metadata,
    validate_metadata,
)
from asynctrace._native import IMPLEMENTATION, LeanFactory
from asynctrace._record import CANCELLED, EXCEPTION, FINISHED, Outcome, TaskRecord
from asynctrace._state import STATE

__all__ = [
    "MARKERS",
    "STARTS_ATTR",
    "LeanDone",
    "LiveRecord",
    "Starts",
    "TapProbe",
    "TaskFactory",
    "forget_running",
    "forget_task",
    "hook_failed",
    "make_factory",
    "new_correlation_id",
    "outcome_of",
]

TaskFactory = Callable[..., "asyncio.Future[Any]"]

STARTS_ATTR: Final = "_asynctrace_starts"
"""The attribute of asynctrace's factory holding its lean path's ``starts`` table."""


class Starts(Protocol):
    """The lean path's table, ``LeanDone.starts``: ``id(task)`` -> creation time or entry.

    A ``dict`` in the pure-Python twin, a table of the C extension's otherwise
    (``_speedups.Starts``); both are read through this much of a mapping.
    """

    def get(self, key: int, default: object = None, /) -> Any: ...  # noqa: ANN401
    def pop(self, key: int, default: object, /) -> Any: ...  # noqa: ANN401
    def clear(self) -> None: ...
    def __setitem__(self, key: int, value: object, /) -> None: ...


_NO_METADATA: Final = TaskMetadata()
_UNSET: Final = object()
_EAGER: Final[dict[str, Any]] = {"eager_start": True}  # a Task keyword of 3.12+
_perf_ns: Final = time.perf_counter_ns


@final
class LiveRecord(TaskRecord):
    """The record of a task the factory made. It is also the task's done callback.

    It keeps the hook table it was created under: a task that ends after that configuration
    ended (uninstalled, or its loops closed) is not recorded by the next one, whose
    instruments never saw it start.
    """

    __slots__ = ("_hooks",)

    def __init__(self, metadata: TaskMetadata, created_ns: int, hooks: Hooks) -> None:
        """Record a task created at ``created_ns``, under ``hooks``."""
        TaskRecord.__init__(self, metadata, created_ns)
        self._hooks = hooks

    def __call__(self, task: asyncio.Task[Any]) -> None:
        """Record the outcome (without marking an exception retrieved), call the done hooks.

        Called through a ``Handle`` (the loop has no tap, or :meth:`mark` left the hooks to
        it), or directly for an eager task done in its first step.
        """
        if not self.finished_ns:
            self.finished_ns = _perf_ns()
        self.outcome = outcome = outcome_of(task)
        hooks = self._hooks
        if hooks is not STATE.hooks:
            return  # its configuration has ended
        if outcome == EXCEPTION:
            self.exception = task._exception
        elif outcome == CANCELLED:
            self.cancellation = cancellation_of(task)
        call_each(hooks.done, STATE.errors, task, self)
        self.exception = None

    def mark(self, task: asyncio.Task[Any]) -> bool:
        """Called by the loop's tap the moment ``task`` is done, inside its last step.

        Notes the exact end time. When every done hook is asynctrace's own (``instant``),
        calls them now and returns True; else returns False and the tap schedules this
        record as usual, so your instruments' hooks still run from a ``Handle``.
        """
        self.finished_ns = _perf_ns()
        if not self._hooks.instant:
            return False
        self(task)  # the end is taken: the rest is the Handle path's, now
        return True


LeanDone: Final = _native.LeanDone
"""The done callback of every task on one factory's lean path (``_speedups_py.LeanDone``)."""


def new_lean_done() -> Any:  # noqa: ANN401 - a LeanDone, C or Python
    """A factory's lean done callback, reading and reporting through asynctrace's state."""
    return LeanDone(
        metadata_var=_METADATA,
        no_metadata=_NO_METADATA,
        state=STATE,
        on_error=hook_failed,
        on_cancelled=_cancelled,
    )


def _cancelled(task: asyncio.Future[Any], metadata: TaskMetadata) -> None:
    """A lean-path task ended cancelled: why, to the instruments that want it."""
    hooks = STATE.hooks
    if hooks.cancelled:
        call_each(hooks.cancelled, STATE.errors, metadata, cancellation_of(task))


def lean_finish(
    task: asyncio.Future[Any],
    metadata: TaskMetadata,
    duration_ns: int,
    entry: Any = None,  # noqa: ANN401
) -> None:
    """Call the lean instruments' ``task_finished`` for a task that ended (in its first step).

    ``entry`` is what ``hooks.begin`` gave for it (None: nothing), handed to ``hooks.end``.
    """
    outcome = outcome_of(task)
    hooks = STATE.hooks
    call_each(hooks.finished, STATE.errors, metadata, outcome, duration_ns)
    if outcome == CANCELLED:
        _cancelled(task, metadata)
    if entry is not None and hooks.end is not None:
        finished_ns = entry.created_ns + duration_ns
        call_each((hooks.end,), STATE.errors, task, entry, metadata, outcome, finished_ns)


@final
class TapProbe:
    """A marker used once, to check that a loop's futures reach its tap (see ``_install``)."""

    __slots__ = ("marked",)

    def __init__(self) -> None:
        """Not marked yet."""
        self.marked = False

    def __call__(self, future: asyncio.Future[Any]) -> None:
        """Called from a Handle: the tap was bypassed."""

    def mark(self, future: asyncio.Future[Any]) -> bool:  # noqa: ARG002
        """Called by the tap: it works on this loop."""
        self.marked = True
        return True


MARKERS: Final = (LiveRecord, LeanDone, TapProbe)
"""The done callbacks a loop's tap runs on the spot."""


def outcome_of(task: asyncio.Future[Any]) -> Outcome:
    """How a done task ended, without marking its exception retrieved."""
    if task.cancelled():
        return CANCELLED
    # Read the slot, not task.exception(): that would mark the exception retrieved and
    # silence asyncio's "Task exception was never retrieved".
    return FINISHED if task._exception is None else EXCEPTION


def new_correlation_id() -> str | None:
    """A fresh id from the installed generator; None when there is none or it failed."""
    new_id = STATE.id_generator
    if new_id is None:
        return None
    try:
        return new_id()
    except Exception as exc:
        STATE.errors.count("id_generator", exc)
        return None


def make_factory(  # noqa: C901, PLR0915 - the hot path stays one closure: no extra calls
    installation: object, inner: TaskFactory | None
) -> TaskFactory:
    """Build the task factory for one loop, chaining ``inner`` (None: plain ``asyncio.Task``).

    ``installation`` is kept on the factory (``FACTORY_MARK``): it is how asynctrace finds its
    own factory on a loop, and which installation put it there.
    """
    state = STATE
    errors = state.errors
    slot = PENDING
    copy_context = contextvars.copy_context
    context_type = contextvars.Context
    cid_var = _CORRELATION_ID
    metadata_var = _METADATA
    perf_ns = _perf_ns
    task_type = asyncio.Task
    new_record = LiveRecord
    accepted = tuple(sorted(ASYNCIO_KEYWORDS | METADATA_KEYWORDS))
    # Tasks of one fan-out share their metadata object (no operation, same id).
    # The last metadata made, reused by the next task that would make the same: one tuple,
    # read once and replaced whole, so another loop thread never mixes two entries.
    last: list[tuple[Any, Any]] = [(_UNSET, None)]  # [(correlation id, TaskMetadata)]
    named: list[tuple[Any, Any, Any, Any]] = [(_UNSET, None, None, None)]

    def asynctrace_task_factory(  # noqa: C901, PLR0912, PLR0915 - see make_factory
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        /,
        **kwargs: Any,  # noqa: ANN401 - asyncio's own create_task keywords, passed on
    ) -> asyncio.Future[Any]:
        pending = slot.value
        if pending is not None:
            slot.value = None
            operation_name, correlation_id, priority_hint, name, eager_start = pending
            if name is not None:
                # 3.11-3.13 name the task only after the factory returns; naming it here
                # gives eager tasks their name from the first step.
                kwargs["name"] = name
            if eager_start is not None:
                kwargs["eager_start"] = eager_start
        elif kwargs and not kwargs.keys() <= ASYNCIO_KEYWORDS:
            # Python 3.14 (and 3.13.4+'s loop.create_task) forward extra keywords here.
            operation_name = kwargs.pop("operation_name", None)
            correlation_id = kwargs.pop("correlation_id", None)
            priority_hint = kwargs.pop("priority_hint", None)
            try:
                unknown = [k for k in kwargs if k not in ASYNCIO_KEYWORDS]
                if unknown and inner is None:
                    raise TypeError(unknown_keywords_message("create_task()", unknown, accepted))
                validate_metadata(operation_name, correlation_id, priority_hint)
            except BaseException:
                close_coro(coro)
                raise
        else:
            operation_name = correlation_id = priority_hint = None

        context = kwargs.get("context")
        if context is None:
            context = kwargs["context"] = copy_context()
            inherited = cid_var.get()
        elif type(context) is context_type:
            inherited = context.get(cid_var)
        else:
            try:
                check_context(context)
            except TypeError:
                close_coro(coro)
                raise
            inherited = context.get(cid_var)  # a Context subclass
        if correlation_id is None:
            correlation_id = inherited
            if correlation_id is None:
                correlation_id = new_correlation_id()
                if correlation_id is not None:
                    context.run(cid_var.set, correlation_id)
        elif correlation_id != inherited:
            context.run(cid_var.set, correlation_id)
        if operation_name is None and priority_hint is None:
            metadata = context.get(metadata_var)
            if (  # the creator's own metadata says the same: the context already holds it
                metadata is not None
                and metadata.correlation_id == correlation_id
                and metadata.operation_name is None
                and metadata.priority_hint is None
            ):
                inherit = True
            else:
                inherit = False
                entry = last[0]
                if entry[0] is correlation_id and correlation_id is not None:
                    metadata = entry[1]
                else:
                    metadata = _make_metadata(None, correlation_id, None)
                    last[0] = (correlation_id, metadata)
        else:
            inherit = False
            entry4 = named[0]  # tasks of one operation, in one request: one object
            if (
                entry4[0] is operation_name
                and entry4[1] is correlation_id
                and entry4[2] is priority_hint
            ):
                metadata = entry4[3]
            else:
                metadata = _make_metadata(operation_name, correlation_id, priority_hint)
                named[0] = (operation_name, correlation_id, priority_hint, metadata)
        if not inherit:
            context.run(metadata_var.set, metadata)

        hooks = state.hooks
        if hooks.lean:
            # Only lean instruments observe tasks: no record, one shared done callback.
            created_ns = perf_ns()
            kept = None
            begin = hooks.begin
            if begin is not None:  # the span sink: its span, started in the task's context
                try:
                    kept = context.run(begin, metadata, created_ns)
                except (Exception, asyncio.CancelledError) as exc:
                    errors.count(source_of(begin), exc)
            if inner is None:  # _build, inlined
                task = task_type(coro, loop=loop, **kwargs)
            else:
                task = _build(loop, coro, kwargs)
            for hook in hooks.started:  # call_each, inlined: one frame less per task
                try:
                    hook(metadata)
                except (Exception, asyncio.CancelledError) as exc:
                    errors.count(source_of(hook), exc)
            if task.done():  # an eager task that finished in its first step
                lean_finish(task, metadata, perf_ns() - created_ns, kept)
            else:
                starts[id(task)] = created_ns if kept is None else kept
                # Not an asyncio.Task (a chained factory's): it may end outside its own
                # context, so the tap must not run the marker there; a Handle runs it in it.
                done = lean_done if type(task) is task_type else lean_done.__call__
                task.add_done_callback(done, context=context)
            return task

        if not (hooks.context or hooks.done or hooks.created):
            # Nothing observes tasks: metadata only, no record, no done callback.
            return _build(loop, coro, kwargs)
        record = new_record(metadata, perf_ns(), hooks)
        if hooks.context:
            # Runs inside the new task's context, before the task exists: what the hooks set
            # here (the task's span, say) is what the first step sees, eager or not.
            context.run(call_each, hooks.context, errors, record)
        task = _build(loop, coro, kwargs)
        if hooks.created:
            call_each(hooks.created, errors, task, record)
        if task.done():  # an eager task that finished in its first step
            record(task)
        elif hooks.done:
            task.add_done_callback(record, context=context)
        return task

    def _build(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        kwargs: dict[str, Any],
    ) -> asyncio.Task[Any]:
        if inner is None:
            return task_type(coro, loop=loop, **kwargs)
        return inner(loop, coro, **kwargs)  # type: ignore[return-value]  # no cast: a call a task

    lean_done = new_lean_done()
    starts = lean_done.starts
    factory: Any = asynctrace_task_factory
    eager = getattr(asyncio, "eager_task_factory", None)  # Python 3.12+
    if IMPLEMENTATION == "c" and (inner is None or (eager is not None and inner is eager)):
        # The common path in C; the closure above takes every other call (and is the
        # pure-Python runtime's factory: _speedups_py.LeanFactory specifies the C one).
        # asyncio's eager_task_factory chained is Task(..., eager_start=True): the same here.
        constructor: Any = task_type if inner is None else functools.partial(task_type, **_EAGER)
        factory = LeanFactory(
            fallback=asynctrace_task_factory,
            state=state,
            slot=slot,
            cid_var=cid_var,
            metadata_var=metadata_var,
            make_metadata=_make_metadata,
            metadata_type=TaskMetadata,
            new_cid=new_correlation_id,
            validate=validate_metadata,
            task_type=constructor,
            lean_done=lean_done,
            starts=starts,
            on_error=hook_failed,
            lean_finish=lean_finish,
        )
    setattr(factory, FACTORY_MARK, installation)
    setattr(factory, STARTS_ATTR, starts)
    factory.__wrapped__ = inner
    return cast("TaskFactory", factory)


def hook_failed(hook: Callable[..., object], exc: BaseException) -> None:
    """A lean hook raised in a C or Python ``LeanDone``/``LeanFactory``: what call_each does.

    Counted and logged under the hook's instrument; what must not be swallowed
    (KeyboardInterrupt, SystemExit) is raised again.
    """
    if not isinstance(exc, Exception | asyncio.CancelledError):
        raise exc
    STATE.errors.count(source_of(hook), exc)


def forget_task(factory: object, task: asyncio.Future[Any]) -> bool:
    """Forget a lean-path task that was destroyed while pending; False if none was noted."""
    starts: Starts | None = getattr(factory, STARTS_ATTR, None)
    return starts is not None and starts.pop(id(task), None) is not None


def forget_running(factory: object) -> None:
    """Uninstalling: tasks still running on the lean path will not be counted when they end.

    Their creation was counted by instruments that are closed now; counting their end in
    the next installation's would drive its in-flight gauge below zero.
    """
    starts: Starts | None = getattr(factory, STARTS_ATTR, None)
    if starts is not None:
        starts.clear()
