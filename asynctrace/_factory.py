"""The task factory, the ``create_task`` helper and ``task_metadata``.

How metadata reaches the factory (see docs/design.md):

- Python 3.14 forwards every keyword of ``asyncio.create_task``, ``loop.create_task`` and
  ``TaskGroup.create_task`` to the task factory, so ``operation_name=`` and friends arrive as
  keywords.
- Everywhere (3.11+, uvloop too), :func:`create_task` puts them in a thread-local slot, calls
  the ordinary ``create_task`` and the factory takes them from the slot. The slot is read and
  cleared before the task is built, so an eager first step that creates tasks sees a clean slot.

The factory never wraps the coroutine: it prepares the task's context (correlation id and
metadata set in it), lets asyncio (or the factory it chains) build the task, and adds one done
callback that records the outcome without marking exceptions as retrieved.
"""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import gc
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, final

from asynctrace._instrument import (
    CANCELLED,
    EXCEPTION,
    FINISHED,
    LeanInstrument,
    Outcome,
    TaskRecord,
)
from asynctrace._metadata import (
    _CORRELATION_ID,
    _METADATA,
    TaskMetadata,
    _make_metadata,
    validate_metadata,
)
from asynctrace._state import STATE

if TYPE_CHECKING:
    from asynctrace._install import Installation

__all__ = ["create_task", "make_factory", "task_metadata", "task_record"]

_T = TypeVar("_T")
TaskFactory = Callable[..., "asyncio.Future[Any]"]

PY312: Final = sys.version_info >= (3, 12)
PY314: Final = sys.version_info >= (3, 14)

_INSTALLATION_ATTR: Final = "_asynctrace_installation"
_STARTS_ATTR: Final = "_asynctrace_starts"
_ASYNCIO_KEYWORDS: Final = frozenset({"name", "context", "eager_start"})
_METADATA_KEYWORDS: Final = frozenset({"operation_name", "correlation_id", "priority_hint"})
_HELPER_KEYWORDS: Final = tuple(sorted(_ASYNCIO_KEYWORDS | _METADATA_KEYWORDS | {"task_group"}))

_NO_METADATA: Final = TaskMetadata()


class _Slot(threading.local):
    value: tuple[str | None, str | None, int | None, str | None, bool | None] | None = None


_PENDING: Final = _Slot()


def _unknown_keywords_message(where: str, names: list[str], accepted: tuple[str, ...]) -> str:
    parts = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return (
        f"{where} got unexpected keyword argument(s) {', '.join(parts)}; "
        f"accepted: {', '.join(accepted)}."
    )


def _close(coro: object) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()


@final
class _LiveRecord(TaskRecord):
    """The record of a task the factory made. It is also the task's done callback."""

    __slots__ = ()

    def __call__(self, task: asyncio.Task[Any]) -> None:
        """Record the outcome (without marking an exception retrieved), call the done hooks."""
        self.finished_ns = _perf_ns()
        self.outcome = outcome = _outcome(task)
        if outcome == EXCEPTION:
            self.exception = task._exception
        for hook in STATE.done_hooks:
            try:
                hook(task, self)
            except (Exception, asyncio.CancelledError) as exc:
                STATE.hook_failed(hook, exc)
        self.exception = None


_perf_ns: Final = time.perf_counter_ns


def _outcome(task: asyncio.Task[Any]) -> Outcome:
    """How a done task ended, without marking its exception retrieved."""
    if task.cancelled():
        return CANCELLED
    # Read the slot, not task.exception(): that would mark the exception retrieved and
    # silence asyncio's "Task exception was never retrieved".
    return FINISHED if task._exception is None else EXCEPTION


def make_factory(  # noqa: C901, PLR0915 - the hot path stays one closure: no extra calls
    installation: Installation, inner: TaskFactory | None
) -> TaskFactory:
    """Build the task factory for one loop, chaining ``inner`` (None: plain ``asyncio.Task``)."""
    state = STATE
    slot = _PENDING
    copy_context = contextvars.copy_context
    cid_var = _CORRELATION_ID
    metadata_var = _METADATA
    perf_ns = _perf_ns
    task_type = asyncio.Task
    new_record = _LiveRecord
    accepted = tuple(sorted(_ASYNCIO_KEYWORDS | _METADATA_KEYWORDS))
    # Tasks of one fan-out share their metadata object (no operation, same id).
    last: list[Any] = [None, None]  # [correlation id, TaskMetadata]

    def _enter_context(record: TaskRecord) -> None:
        # Runs inside the new task's context, before the task exists: what the hooks set
        # here (the task's span, say) is what the first step sees, eager or not.
        for hook in state.context_hooks:
            try:
                hook(record)
            except (Exception, asyncio.CancelledError) as exc:
                state.hook_failed(hook, exc)

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
        elif kwargs and not kwargs.keys() <= _ASYNCIO_KEYWORDS:
            # Python 3.14 (and 3.13.4+'s loop.create_task) forward extra keywords here.
            operation_name = kwargs.pop("operation_name", None)
            correlation_id = kwargs.pop("correlation_id", None)
            priority_hint = kwargs.pop("priority_hint", None)
            try:
                unknown = [k for k in kwargs if k not in _ASYNCIO_KEYWORDS]
                if unknown and inner is None:
                    raise TypeError(_unknown_keywords_message("create_task()", unknown, accepted))
                validate_metadata(operation_name, correlation_id, priority_hint)
            except BaseException:
                _close(coro)
                raise
        else:
            operation_name = correlation_id = priority_hint = None

        context = kwargs.get("context")
        if context is None:
            context = kwargs["context"] = copy_context()
            inherited = cid_var.get()
        else:
            inherited = context.get(cid_var)
        if correlation_id is None:
            correlation_id = inherited
            if correlation_id is None:
                correlation_id = _new_correlation_id()
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
                if last[0] is correlation_id and correlation_id is not None:
                    metadata = last[1]
                else:
                    metadata = _make_metadata(None, correlation_id, None)
                    last[0], last[1] = correlation_id, metadata
        else:
            inherit = False
            metadata = _make_metadata(operation_name, correlation_id, priority_hint)
        if not inherit:
            context.run(metadata_var.set, metadata)

        lean = state.lean
        if lean:
            # Only lean instruments observe tasks: no record, one shared done callback.
            created_ns = perf_ns()
            task = _build(loop, coro, kwargs)
            for instrument in lean:
                try:
                    instrument.task_started(metadata)
                except (Exception, asyncio.CancelledError) as exc:
                    state.hook_failed(instrument.task_started, exc)
            if task.done():  # an eager task that finished in its first step
                _lean_finish(task, metadata, perf_ns() - created_ns)
            else:
                starts[id(task)] = created_ns
                task.add_done_callback(lean_done, context=context)
            return task

        context_hooks = state.context_hooks
        done_hooks = state.done_hooks
        if not (context_hooks or done_hooks or state.created_hooks):
            # Nothing observes tasks: metadata only, no record, no done callback.
            return _build(loop, coro, kwargs)
        record = new_record(metadata, perf_ns())
        if context_hooks:
            context.run(_enter_context, record)
        task = _build(loop, coro, kwargs)
        for hook in state.created_hooks:
            try:
                hook(task, record)
            except (Exception, asyncio.CancelledError) as exc:
                state.hook_failed(hook, exc)
        if task.done():  # an eager task that finished in its first step
            record(task)
        elif done_hooks:
            task.add_done_callback(record, context=context)
        return task

    def _build(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        kwargs: dict[str, Any],
    ) -> asyncio.Task[Any]:
        if inner is None:
            return task_type(coro, loop=loop, **kwargs)
        return cast("asyncio.Task[Any]", inner(loop, coro, **kwargs))

    # id(task) -> perf_counter_ns() at creation, for tasks on the lean path while they run.
    # Keyed by id, not by task, so a task destroyed while pending is still garbage collected
    # (and still warned about); a later task with the same id overwrites its entry.
    starts: dict[int, int] = {}

    def lean_done(task: asyncio.Task[Any]) -> None:
        # Runs in the task's context (add_done_callback(context=...)): the metadata is there.
        finished_ns = perf_ns()
        created_ns = starts.pop(id(task), None)
        if created_ns is not None:
            _lean_finish(task, metadata_var.get(None) or _NO_METADATA, finished_ns - created_ns)

    def _lean_finish(task: asyncio.Task[Any], metadata: TaskMetadata, duration_ns: int) -> None:
        outcome = _outcome(task)
        lean = state.lean
        if not lean:  # task hooks were installed since this task started: still count it
            lean = tuple(i for i in state.instruments if isinstance(i, LeanInstrument))
        for instrument in lean:
            try:
                instrument.task_finished(metadata, outcome, duration_ns)
            except (Exception, asyncio.CancelledError) as exc:
                state.hook_failed(instrument.task_finished, exc)

    setattr(asynctrace_task_factory, _INSTALLATION_ATTR, installation)
    setattr(asynctrace_task_factory, _STARTS_ATTR, starts)
    asynctrace_task_factory.__wrapped__ = inner  # type: ignore[attr-defined]
    return asynctrace_task_factory


def _new_correlation_id() -> str | None:
    """A fresh id from the installed generator; None when there is none or it failed."""
    new_id = STATE.id_generator
    if new_id is None:
        return None
    try:
        return new_id()
    except Exception as exc:
        STATE.count_error("id_generator", exc)
        return None


def adopt_current_task() -> None:
    """Give the running task, made before asynctrace was installed, what the factory would.

    ``install()`` inside a task calls this: the task gets a correlation id (its own, else a
    new one) and its :class:`TaskMetadata`, set in its context, so the tasks it creates
    inherit them as they would had ``install()`` run before the loop started.
    """
    if asyncio.current_task() is None or _METADATA.get() is not None:
        return
    correlation_id = _CORRELATION_ID.get()
    if correlation_id is None:
        correlation_id = _new_correlation_id()
        if correlation_id is not None:
            _CORRELATION_ID.set(correlation_id)
    _METADATA.set(_make_metadata(None, correlation_id, None))


def forget_running(factory: object) -> None:
    """Uninstalling: tasks still running on the lean path will not be counted when they end.

    Their creation was counted by instruments that are closed now; counting their end in
    the next installation's would drive its in-flight gauge below zero.
    """
    starts: dict[int, int] | None = getattr(factory, _STARTS_ATTR, None)
    if starts is not None:
        starts.clear()


def installation_of(factory: object) -> Installation | None:
    """Return the installation that built ``factory``, or None when it is not asynctrace's."""
    return getattr(factory, _INSTALLATION_ATTR, None)


def task_record(task: asyncio.Future[Any]) -> TaskRecord | None:
    """Return the :class:`TaskRecord` of a task still running, or None.

    The record is the task's done callback, so it is found while the task runs; after that,
    instruments have had it in ``task_done``.
    """
    for callback in getattr(task, "_callbacks", None) or ():
        fn = callback[0] if isinstance(callback, tuple) else callback
        if isinstance(fn, _LiveRecord):
            return fn
    return None


def task_metadata(task: asyncio.Future[Any] | None = None) -> TaskMetadata | None:
    """Return a task's :class:`TaskMetadata`, or None for a task the factory never saw.

    Args:
        task: The task; by default the current one (None outside a task).

    The metadata is read from the task's context (nothing is stored on the task), while it
    runs and after it is done. So a task built by calling ``asyncio.Task(...)`` directly
    (bypassing ``create_task`` and so the factory) inside an instrumented task reports the
    metadata of the task that created it.

    Since: 0.1.0
    """
    if task is None:
        try:
            current = asyncio.current_task()
        except RuntimeError:  # no running loop
            return None
        # Inside a task (even during an eager first step, before the factory has returned
        # the task) the metadata is in the context.
        return _METADATA.get() if current is not None else None
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


_EMPTY_CONTEXT: Final = contextvars.Context()


def create_task(  # noqa: C901, PLR0911, PLR0912 - one check per keyword, one path per case
    coro: Coroutine[Any, Any, _T],
    *,
    task_group: asyncio.TaskGroup | None = None,
    name: str | None = None,
    context: contextvars.Context | None = None,
    eager_start: bool | None = None,
    operation_name: str | None = None,
    correlation_id: str | None = None,
    priority_hint: int | None = None,
    **unknown: object,
) -> asyncio.Task[_T]:
    """Create a task carrying metadata, on every supported Python and loop.

    The same as ``asyncio.create_task(coro, name=..., context=...)`` (or
    ``task_group.create_task(...)`` when ``task_group`` is given), plus the metadata keywords.
    On Python 3.14 plain ``asyncio.create_task(coro, operation_name=...)`` does the same.

    Without an asynctrace factory on the running loop the task is still created, with
    ``correlation_id`` set in its context (it has no :class:`TaskMetadata` then).

    Args:
        coro: The coroutine to run; closed if the arguments are rejected.
        task_group: Create the task in this ``asyncio.TaskGroup``.
        name: The task's name, set before its first step (eager tasks included).
        context: The ``contextvars.Context`` to run in (metadata is set in it).
        eager_start: Start the task eagerly (Python 3.12+; 3.12-3.13 need an installed
            factory, or no other task factory and no task group).
        operation_name: What the task does; 1-128 printable characters.
        correlation_id: The request's id; inherited or generated when None.
        priority_hint: A free integer for the application.
        **unknown: Rejected with a TypeError that names them.

    Returns:
        The task.

    Raises:
        TypeError: An unknown keyword or a value of the wrong type.
        ValueError: An empty, over-long or non-printable text value.
        RuntimeError: No running event loop.

    Since: 0.1.0
    """
    try:
        if unknown:
            raise TypeError(
                _unknown_keywords_message(
                    "asynctrace.create_task()", list(unknown), _HELPER_KEYWORDS
                )
            )
        validate_metadata(operation_name, correlation_id, priority_hint)
        if eager_start is not None and not isinstance(eager_start, bool):
            raise TypeError(f"Invalid eager_start: {eager_start!r}; expected a bool or None.")
        if eager_start and not PY312:
            raise TypeError("Invalid eager_start: True; eager tasks need Python 3.12 or later.")
        if task_group is not None and not isinstance(task_group, asyncio.TaskGroup):
            raise TypeError(
                f"Invalid task_group: {task_group!r}; expected an asyncio.TaskGroup or None."
            )
        loop = asyncio.get_running_loop()
    except BaseException:
        _close(coro)
        raise

    if installation_of(loop.get_task_factory()) is not None:
        _PENDING.value = (operation_name, correlation_id, priority_hint, name, eager_start)
        try:
            if task_group is not None:
                return task_group.create_task(coro, name=name, context=context)
            return loop.create_task(coro, name=name, context=context)
        finally:
            _PENDING.value = None

    # No asynctrace factory here: still create the task, with the correlation id in its context.
    ctx = context if context is not None else contextvars.copy_context()
    if correlation_id is not None:
        ctx.run(_CORRELATION_ID.set, correlation_id)
    if ctx.get(_METADATA) is not None:  # don't let the creator's metadata pass for this task's
        ctx.run(_METADATA.set, None)
    if not eager_start:
        if task_group is not None:
            return task_group.create_task(coro, name=name, context=ctx)
        return loop.create_task(coro, name=name, context=ctx)
    if PY314:
        eager: dict[str, Any] = {"eager_start": True}  # a keyword typeshed for 3.11 lacks
        if task_group is not None:
            return task_group.create_task(coro, name=name, context=ctx, **eager)
        return loop.create_task(coro, name=name, context=ctx, **eager)
    if task_group is None and loop.get_task_factory() is None:
        return asyncio.Task(coro, loop=loop, name=name, context=ctx, eager_start=True)  # type: ignore[call-arg]
    _close(coro)
    raise TypeError(
        "Invalid eager_start: True; before Python 3.14 an eager task in a TaskGroup or under "
        "another task factory needs asynctrace.install() on the loop."
    )
