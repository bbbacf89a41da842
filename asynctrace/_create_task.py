"""The ``create_task`` helper, and the thread-local slot through which it reaches the factory.

On every Python and loop (3.11+, uvloop too), :func:`create_task` validates its keywords, puts
them in a thread-local slot and calls the ordinary ``loop.create_task`` /
``task_group.create_task``; the factory takes them from the slot. The factory reads and clears
the slot before the task is built, so an eager first step that creates tasks sees a clean slot.
Python 3.14 needs no slot: its ``create_task`` forwards the keywords to the factory.
"""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import functools
import operator
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, TypeVar

from asynctrace import _native
from asynctrace._metadata import _CORRELATION_ID, _METADATA, validate_metadata
from asynctrace._state import STATE

__all__ = [
    "ASYNCIO_KEYWORDS",
    "FACTORY_MARK",
    "METADATA_KEYWORDS",
    "PENDING",
    "check_context",
    "close_coro",
    "create_task",
    "is_asynctrace_factory",
    "unknown_keywords_message",
]

_T = TypeVar("_T")

PY312: Final = sys.version_info >= (3, 12)
PY314: Final = sys.version_info >= (3, 14)

FACTORY_MARK: Final = "_asynctrace_installation"
"""The attribute every asynctrace task factory carries: the installation that made it."""

ASYNCIO_KEYWORDS: Final = frozenset({"name", "context", "eager_start"})
METADATA_KEYWORDS: Final = frozenset({"operation_name", "correlation_id", "priority_hint"})
_HELPER_KEYWORDS: Final = tuple(sorted(ASYNCIO_KEYWORDS | METADATA_KEYWORDS | {"task_group"}))
# The C factory, and the loops whose create_task only calls the factory with the keywords it
# got (the running loop is never closed, so its closed-check passes). Not 3.13: its
# create_task renames the factory's task "None" (cpython#130033); the helper keeps that too.
_C_FACTORY: Final = _native.LeanFactory if _native.IMPLEMENTATION == "c" else None
_PLAIN_CREATE_TASK: Final = (
    asyncio.BaseEventLoop.create_task if sys.version_info[:2] != (3, 13) else None
)
_running_loop: Final = asyncio.events._get_running_loop

Pending = tuple[str | None, str | None, int | None, str | None, bool | None]
"""(operation_name, correlation_id, priority_hint, name, eager_start)."""


PENDING: Final = _native.ThreadSlot()
"""What the helper hands the factory on this thread (``.value``, a ``Pending``); None when it
hands nothing. A ``threading.local`` in the twin; in C a read where no thread has set one is
free of lookups (the factory reads it for every task)."""


def is_asynctrace_factory(factory: object) -> bool:
    """Tell whether a loop's task factory is one asynctrace made."""
    return getattr(factory, FACTORY_MARK, None) is not None


def unknown_keywords_message(where: str, names: list[str], accepted: tuple[str, ...]) -> str:
    """The TypeError message for unknown keywords, each with its nearest accepted one."""
    parts = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return (
        f"{where} got unexpected keyword argument(s) {', '.join(parts)}; "
        f"accepted: {', '.join(accepted)}."
    )


def check_context(context: object) -> None:
    """Raise TypeError unless ``context`` is a ``contextvars.Context`` or None."""
    if context is not None and not isinstance(context, contextvars.Context):
        raise TypeError(f"Invalid context: {context!r}; expected a contextvars.Context or None.")


def close_coro(coro: object) -> None:
    """Close a coroutine that will never run, so Python does not warn it was never awaited."""
    close = getattr(coro, "close", None)
    if close is not None:
        close()


def create_task(
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
    if (
        _C_FACTORY is not None
        and task_group is None
        and name is None
        and context is None
        and eager_start is None
        and not unknown
    ):
        # The helper's common call: the C factory called as the loop's own create_task would
        # (the factory read where that reads it). CreateTask, in front of this function,
        # takes it where it knows the loop's create_task; here come the others (uvloop's first
        # call, which registers its create_task with CreateTask; 3.13's asyncio, whose
        # create_task does more than call the factory: no reader).
        loop = _running_loop()
        read = _factory_reader(type(loop)) if loop is not None else None
        if read is not None:
            factory: Any = read(loop)
            if type(factory) is _C_FACTORY:
                # What loop.create_task would do; the factory validates the metadata (and
                # closes the coroutine when it raises). No typing.cast: a call per task.
                task: asyncio.Task[_T] = factory(
                    loop,
                    coro,
                    operation_name=operation_name,
                    correlation_id=correlation_id,
                    priority_hint=priority_hint,
                )
                return task
    return _create_checked(
        coro, task_group, name, context, eager_start, operation_name, correlation_id,
        priority_hint, unknown,
    )  # fmt: skip


def _create_checked(  # noqa: PLR0917 - the helper's own arguments, passed on
    coro: Coroutine[Any, Any, _T],
    task_group: asyncio.TaskGroup | None,
    name: str | None,
    context: contextvars.Context | None,
    eager_start: bool | None,
    operation_name: str | None,
    correlation_id: str | None,
    priority_hint: int | None,
    unknown: dict[str, object],
) -> asyncio.Task[_T]:
    """The helper's call past its fast path: arguments checked, the keywords through the slot."""
    try:
        if unknown:
            raise TypeError(
                unknown_keywords_message(
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
        check_context(context)
        loop = asyncio.get_running_loop()
    except BaseException:
        close_coro(coro)
        raise

    covered = is_asynctrace_factory(loop.get_task_factory())
    cover = STATE.cover_loop  # read once: another thread may uninstall meanwhile
    if not covered and cover is not None:
        covered = cover(loop)  # a loop the process-wide installation never saw
    # The slot is filled either way: a factory another thread puts on this loop between the
    # check above and create_task below still gets the keywords (the fallback's context
    # then carries the same ids). Whoever creates no task leaves it for the finally.
    PENDING.value = (operation_name, correlation_id, priority_hint, name, eager_start)
    try:
        if covered:
            if task_group is not None:
                return task_group.create_task(coro, name=name, context=context)
            return loop.create_task(coro, name=name, context=context)
        return _create_uncovered(coro, loop, task_group, name, context, eager_start, correlation_id)
    finally:
        PENDING.value = None


_READERS: Final[dict[type, tuple[object, Callable[[Any], object] | None]]] = {}
_read_task_factory: Final = operator.attrgetter("_task_factory")
_get_task_factory: Final = operator.methodcaller("get_task_factory")


def _factory_reader(loop_type: type) -> Callable[[Any], object] | None:
    """How to read the factory of a running loop of this type whose create_task only calls it.

    asyncio's ``BaseEventLoop.create_task`` (not 3.13's) reads ``_task_factory``; uvloop's
    ``Loop.create_task`` (0.17+: ``factory(loop, coro, context=None)``, and on 3.13+
    ``eager_start=None``, nothing else) has it private, so ``get_task_factory()``. None for
    any other ``create_task``. Looked up per call, kept per type with the ``create_task`` it
    was found for: a ``create_task`` replaced later is seen.
    """
    create = getattr(loop_type, "create_task", None)
    kept = _READERS.get(loop_type)
    if kept is not None and kept[0] is create:
        return kept[1]
    read: Callable[[Any], object] | None = None
    if create is not None and create is _PLAIN_CREATE_TASK:
        read = _read_task_factory
    else:
        uvloop = sys.modules.get("uvloop")
        uv_create = getattr(getattr(uvloop, "Loop", None), "create_task", None)
        if create is not None and create is uv_create:
            read = _get_task_factory
            _C_READERS[create] = False  # CreateTask reads its factory so from now on
    if len(_READERS) < _READERS_MAX:
        _READERS[loop_type] = (create, read)
    return read


_READERS_MAX: Final = 64  # loop types remembered (a program has one or two)
_C_READERS: Final[dict[Any, bool]] = (
    {_PLAIN_CREATE_TASK: True} if _PLAIN_CREATE_TASK is not None else {}
)
"""The create_task functions CreateTask (below) skips: how it reads their loops' factory."""


def _create_uncovered(  # noqa: PLR0917 - the helper's own arguments, passed on
    coro: Coroutine[Any, Any, _T],
    loop: asyncio.AbstractEventLoop,
    task_group: asyncio.TaskGroup | None,
    name: str | None,
    context: contextvars.Context | None,
    eager_start: bool | None,
    correlation_id: str | None,
) -> asyncio.Task[_T]:
    """No asynctrace factory here: still create the task, with the correlation id in its context."""
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
    close_coro(coro)
    raise TypeError(
        "Invalid eager_start: True; before Python 3.14 an eager task in a TaskGroup or under "
        "another task factory needs asynctrace.install() on the loop."
    )


if not TYPE_CHECKING and _C_FACTORY is not None:
    # The helper's common call in C, in front of it: create_task(coro, operation_name=...)
    # on an asyncio loop (uvloop's once the helper met one) with the C factory calls the
    # factory straight away (no Python frame, no keyword handling); every other call reaches
    # the function above, which specifies it. Its name, signature (__wrapped__) and docs are
    # the function's.
    create_task = functools.update_wrapper(
        _native.CreateTask(
            slow=create_task,
            running=_running_loop,
            readers=_C_READERS,
            factory_type=_C_FACTORY,
        ),
        create_task,
    )
