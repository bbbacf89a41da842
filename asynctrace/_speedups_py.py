"""The pure-Python twin of the ``_speedups`` C extension: its readable specification.

Both modules define the same names with the same behaviour; ``_native`` picks one (the C one
when it was built and ``ASYNCTRACE_PURE_PYTHON`` is not set). ``tests/test_native.py`` runs the
same tests against both.

:class:`Tap` is the loop's ``call_soon`` while asynctrace instruments it. asyncio's futures
schedule each done callback through ``loop.call_soon(callback, future, context=...)``, looking
``call_soon`` up on the loop object every time (the C ``Future`` of 3.11 to 3.14 and uvloop
alike), so an object set as the loop instance's ``call_soon`` attribute sees every callback a
future schedules. The tap lets asynctrace's own completion markers run the moment the task is
done, inside its last step (an exact end time, no ``Handle``, no loop turn), and passes every
other call, unchanged, to the loop's own ``call_soon``.
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import os
import sys
import sysconfig
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from types import FunctionType, MemberDescriptorType, MethodType
from typing import Any, final

__all__ = [
    "IMPLEMENTATION",
    "Counts",
    "CreateTask",
    "LaneQueue",
    "LeanDone",
    "LeanFactory",
    "SpanHooks",
    "SpanIds",
    "Starts",
    "Tap",
    "ThreadSlot",
    "encode_task_span",
    "encode_task_spans",
    "exporting",
    "untracked_copy",
]

IMPLEMENTATION = "python"


COURTESY_PERIOD_NS = 500_000
"""A loop thread hands the GIL to an export thread at work at most this often, or every
64th of the time the thread has been at work if that is longer."""
COURTESY_SLEEP_NS = 20_000
"""For this long: time enough for the waiting thread to wake and take it. The C version spins
that long with the GIL released (a sleep idled the loop's CPU, which came back to cold
caches); Python lets the GIL go only by sleeping (50-80 µs with Linux's timer slack)."""
_EXPORTING = [0, 0]  # export threads at work, and since when (perf_counter_ns)
_EXPORTING_LOCK = threading.Lock()


def _exporting_after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: none of them is at work there."""
    global _EXPORTING_LOCK  # noqa: PLW0603 - the parent's may have been held at the fork
    _EXPORTING_LOCK = threading.Lock()
    _EXPORTING[:] = [0, 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_exporting_after_fork_in_child)


def exporting(change: object) -> int | None:
    """An export thread starts (``1``) or ends (``-1``) its work; the threads at work now.

    A loop thread that is never idle gives the GIL up at each ``select()`` and takes it back
    a microsecond later, before a waiting thread has even woken. An export thread wants it
    back after each socket call of a request: it is woken hundreds of times for nothing, and
    both threads pay for each wake-up (20-60 ms of CPU a request, measured on 3.14). While one
    is at work, each loop's :class:`Tap` therefore lets the GIL go for
    :data:`COURTESY_SLEEP_NS` at a task's end (after its end time is taken), once
    :data:`COURTESY_PERIOD_NS` has passed since the last time, or a 64th of the time the
    export threads have been at work if that is longer: a request takes a few milliseconds,
    and one that waits for a slow or absent collector (its retries too) costs the loops less
    and less. None where there is no GIL to hand over (a free-threaded build; the C version
    also where ``nanosleep`` is missing: Windows).
    """
    if type(change) is not int or change not in (1, -1):
        msg = (
            "exporting: the change must be 1 (a thread starts its work) or -1 (it ends it), "
            f"got {change!r}"
        )
        raise ValueError(msg)
    if _FREE_THREADED:
        return None
    with _EXPORTING_LOCK:
        _EXPORTING[0] += change
        if change == 1 and _EXPORTING[0] == 1:  # the first at work sets the time
            _EXPORTING[1] = time.perf_counter_ns()
        return _EXPORTING[0]


@final
class Tap:
    """A loop's ``call_soon`` that runs completion markers on the spot.

    A marker is an object whose type is in ``markers``, scheduled with exactly one argument
    (the future that is done). The tap calls ``marker.mark(future)``: True means the marker
    did all it had to, and nothing is scheduled (the tap returns None: futures ignore what
    ``call_soon`` returns). Anything else (False, or an exception, which is reported to
    ``sys.unraisablehook`` and never reaches the task) schedules the marker as usual, through
    the loop's ``call_soon``, so it is still called once more from a ``Handle``.

    With ``kept`` (a tuple; None turns it off) the tap also runs the *batched check* for
    a :class:`LeanFactory` whose ``lean_done`` is a :class:`LeanDone`: the tasks it makes
    while a check is pending go to :attr:`batch`, without asynctrace's done callback, and
    only the first one's first step is scheduled through :meth:`check` (in the step's place:
    the same ``Handle``, the step kept in the tap till then; for an eager task, a ``Handle``
    of its own scheduled before the task's first step runs), which runs before
    any of their first steps (the ready queue is first in, first out) and after the step that
    made them (which attached its own callbacks). The check adds ``done`` as the done
    callback of each batched task that has none known never to be removed: an awaiting
    task's wakeup (a C function named ``task_wakeup``), or a function whose code object, or a
    bound method whose function, is in ``kept``. Then it runs the step. The other tasks' ends
    are taken when their first callback is scheduled: a call ``call_soon(callback, task,
    ...)`` for a task of ``task_type`` that is in ``done.starts`` and done calls
    ``done.mark(task)`` first (an exception is reported to ``sys.unraisablehook``).

    Attributes:
        call_soon: The loop's own ``call_soon`` (a bound method), which gets every other call.
        markers: The marker types.
        kept: The done callbacks never removed (code objects, functions), or None.
        done: The :class:`LeanDone` of the tasks batched last, or None.
        pending: Whether a check is scheduled.
    """

    __slots__ = (
        "_handed_ns",
        "_step",
        "_step_type",
        "batch",
        "call_soon",
        "done",
        "expect",
        "kept",
        "markers",
        "pending",
        "task_type",
    )

    def __init__(self, call_soon: object, markers: object, *, kept: object = None) -> None:
        """Tap ``call_soon`` for callbacks whose type is one of ``markers``."""
        if not callable(call_soon):
            msg = f"Tap: call_soon must be callable, got {call_soon!r}"
            raise TypeError(msg)
        if not isinstance(markers, tuple) or not all(isinstance(t, type) for t in markers):
            msg = f"Tap: markers must be a tuple of types, got {markers!r}"
            raise TypeError(msg)
        if kept is not None and not isinstance(kept, tuple):
            msg = f"Tap: kept must be a tuple or None, got {kept!r}"
            raise TypeError(msg)
        self.call_soon: Callable[..., Any] = call_soon
        self.markers: tuple[type, ...] = markers
        # A free-threaded build keeps asynctrace's callback on every task (as the C one).
        self.kept: tuple[object, ...] | None = None if _FREE_THREADED else kept
        self.done: LeanDone | None = None
        self.task_type: type | None = None
        self.batch: list[tuple[Any, Any]] = []
        self.expect = 0  # _MAKING, then _STEP_SEEN once the task's first step is seen
        self.pending = False
        self._step_type: type | None = None
        self._step: Callable[[], object] | None = None
        self._handed_ns = 0

    def _courtesy(self) -> None:
        """Hand the GIL to an export thread at work, briefly, at most every 0.5 ms.

        See :func:`exporting`. ``time.sleep`` lets the GIL go for its length. Called before
        the tap passes a call on, and after a marker that did all it had to.
        """
        if _EXPORTING[0] <= 0 or _FREE_THREADED:
            return
        now = time.perf_counter_ns()
        period = max(COURTESY_PERIOD_NS, (now - _EXPORTING[1]) // 64)
        if now - self._handed_ns >= period:
            time.sleep(COURTESY_SLEEP_NS / 1e9)
            self._handed_ns = time.perf_counter_ns()

    def __call__(
        self,
        callback: Callable[..., object],
        *args: Any,  # noqa: ANN401 - call_soon's own arguments, passed on
        context: Any = None,  # noqa: ANN401
    ) -> Any:  # noqa: ANN401 - a Handle, or None for a marker run on the spot
        """``loop.call_soon(callback, *args, context=context)``, or the marker on the spot."""
        if len(args) == 1 and type(callback) in self.markers:
            try:
                handled = callback.mark(args[0]) is True  # type: ignore[attr-defined]
            except BaseException:
                sys.unraisablehook(_unraisable(sys.exc_info()[1], callback))
            else:
                if handled:
                    self._courtesy()  # after the end is marked: its time is taken
                    return None
        elif len(args) == 1 and self.done is not None and type(args[0]) is self.task_type:
            try:
                self._mark_task(args[0])
            except BaseException:
                sys.unraisablehook(_unraisable(sys.exc_info()[1], callback))
        elif (
            self.expect == _MAKING
            and not args
            and type(context) is contextvars.Context
            and self._is_step(callback)
        ):
            self.expect = _STEP_SEEN  # the first step of the task a LeanFactory is making
            if not self.pending:
                return self.schedule_check(callback, context)
        self._courtesy()  # after a task's end is marked (above)
        return self.call_soon(callback, *args, context=context)

    def schedule_check(self, step: Callable[[], object] | None, context: Any) -> Any:  # noqa: ANN401
        """``call_soon(check, context=context)``: in the ``Handle`` ``step`` would have had.

        The step is kept here till the check runs it (one check is pending at a time). For
        an eager task (``step`` None) the factory schedules it before the task's first step
        runs (in the task's constructor), so it comes before whatever that step schedules.
        """
        handle = self.call_soon(self.check, context=context)
        self.pending, self._step = True, step
        return handle

    def add(self, task: Any, context: Any) -> bool:  # noqa: ANN401
        """Put ``task`` in the pending batch; False when none is pending (or another type)."""
        if not self.pending:
            return False
        if type(task) is not self.task_type:
            if self.task_type is not None:
                return False  # the tap marks the ends of one task type's tasks (asyncio.Task's)
            self.task_type = type(task)
        self.batch.append((task, context))
        return True

    def _mark_task(self, task: Any) -> None:  # noqa: ANN401
        """A callback of ``task`` is being scheduled: when it is done, its end is now."""
        done = self.done
        if done is not None and id(task) in done.starts and task.done():
            done.mark(task)

    def _is_step(self, callback: object) -> bool:
        kind = type(callback)
        if kind is self._step_type:
            return True
        if self._step_type is None and kind.__name__ == "TaskStepMethWrapper":
            self._step_type = kind
            return True
        return False

    def check(self) -> object:
        """Give each batched task ``done`` unless a kept callback will report its end; step."""
        step, self._step = self._step, None
        batch, self.batch, self.pending = self.batch, [], False
        done = self.done
        for task, context in batch:
            try:
                keeps = self._keeps_callback(task)
            except Exception:
                keeps = False  # not known: asynctrace's callback, as without the check
            if not keeps and done is not None:
                try:
                    task.add_done_callback(done, context=context)
                except BaseException:
                    sys.unraisablehook(_unraisable(sys.exc_info()[1], task))
        return None if step is None else step()

    def _keeps_callback(self, task: Any) -> bool:  # noqa: ANN401
        kept = self.kept or ()
        for item in task._callbacks or ():
            callback = item[0] if type(item) is tuple and item else item
            if type(callback) is _BUILTIN_FUNCTION and callback.__name__ == "task_wakeup":
                return True
            if type(callback) is MethodType:
                known: object = callback.__func__
            elif type(callback) is FunctionType:
                known = callback.__code__
            else:
                continue
            if any(k is known for k in kept):
                return True
        return False

    def batching_for(self, factory: LeanFactory) -> bool:
        """Whether ``factory``'s next task may be batched here (taking its ``lean_done``).

        The tap takes the factory's ``LeanDone`` when no batch is pending and the one it had
        has no task left to mark.
        """
        lean_done = factory.lean_done
        if (
            self.kept is None
            or type(lean_done) is not LeanDone
            or lean_done.starts is not factory.starts
        ):
            return False
        if self.done is not lean_done:
            if self.pending or (self.done is not None and self.done.starts):
                return False
            self.done = lean_done
        return True

    def __repr__(self) -> str:
        """Show the tapped ``call_soon``."""
        return f"<asynctrace Tap of {self.call_soon!r}>"


class ThreadSlot(threading.local):
    """A value per thread, None till set: what the create_task helper hands the factory.

    The helper sets :attr:`value` around its ``loop.create_task`` call; the factory reads it for
    every task it makes (nearly always None). The C version counts the threads whose value is
    set (``filled``), so a read where none is costs no lookup.
    """

    value: Any = None


class CreateTask:
    """``asynctrace.create_task``'s common call, in front of the helper (``slow``).

    ``create_task(coro)`` with only metadata keywords (``operation_name``, ``correlation_id``,
    ``priority_hint``), on a running loop (``running()``) whose type's ``create_task`` is a key
    of ``readers`` (a ``create_task`` that only calls the factory: asyncio's, uvloop's; True:
    the factory is read as ``loop._task_factory``, False: as ``loop.get_task_factory()``;
    the dict may gain keys later) and whose factory is of ``factory_type``: that factory
    called as ``loop.create_task`` would call it, with all three metadata keywords (None
    where not given), as the helper's own fast path does. Any other call goes to ``slow`` as
    it was made. The C version saves the helper's Python frame and keyword handling.
    """

    def __init__(
        self,
        *,
        slow: Callable[..., Any],
        running: Callable[[], Any],
        readers: dict[Any, bool],
        factory_type: type,
    ) -> None:
        for name, value in (("slow", slow), ("running", running)):
            if not callable(value):
                raise TypeError(f"CreateTask: {name} must be callable, got {value!r}")
        if type(readers) is not dict:
            raise TypeError(f"CreateTask: readers must be a dict, got {readers!r}")
        if not isinstance(factory_type, type):
            raise TypeError(f"CreateTask: factory_type must be a type, got {factory_type!r}")
        self.slow, self._running, self._readers = slow, running, readers
        self._factory_type: Any = factory_type  # (a type: not narrowed to object below)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Create the task: the factory directly on the common call, else ``slow``."""
        if len(args) == 1 and kwargs.keys() <= _METADATA_KEYWORDS:
            loop = self._running()
            how = None
            if loop is not None:
                try:
                    how = self._readers.get(getattr(type(loop), "create_task", None))
                except TypeError:  # an unhashable create_task
                    how = None
            factory: Any = None
            if how is True:
                factory = getattr(loop, "_task_factory", None)
            elif how is False:
                factory = loop.get_task_factory()
            if how is not None and type(factory) is self._factory_type:
                return factory(
                    loop,
                    args[0],
                    operation_name=kwargs.get("operation_name"),
                    correlation_id=kwargs.get("correlation_id"),
                    priority_hint=kwargs.get("priority_hint"),
                )
        return self.slow(*args, **kwargs)


_MAKING = 1  # Tap.expect: a LeanFactory is making a task
_STEP_SEEN = 2  # Tap.expect: and the tap saw its first step
_BUILTIN_FUNCTION = type(len)
_FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))  # the C one's build flag


def _unraisable(exc: BaseException | None, callback: object) -> Any:  # noqa: ANN401
    """The argument ``sys.unraisablehook`` takes, as the C API's PyErr_WriteUnraisable makes it."""

    class UnraisableHookArgs:
        exc_type = type(exc)
        exc_value = exc
        exc_traceback = exc.__traceback__ if exc is not None else None
        err_msg = "Exception ignored in asynctrace's completion marker"
        object = callback

    return UnraisableHookArgs()


_SIMPLE_KEYWORDS = frozenset({"context", "eager_start", "name"})
_METADATA_KEYWORDS = frozenset({"operation_name", "correlation_id", "priority_hint"})
_VALIDATED_MAX = 256  # operation names a factory remembers as valid; then it starts anew


@final
class LeanFactory:
    """The task factory's common path, taken over from the Python factory (``fallback``).

    The common path: only lean instruments observe tasks (``state.hooks.lean``), no explicit
    context, no eager start, and a helper call (the thread-local ``slot``) that names no task.
    There it does what ``_factory.make_factory``'s closure does on its lean path:

    1. the correlation id: given, else inherited from the creator's context, else a new one
       (``new_cid()``), set in a copy of the creator's context;
    2. the metadata: the creator's own when it says the same (no operation, same id), else
       ``make_metadata(operation, id, priority)``, the last one made reused for the same
       fields; set in that context;
    3. ``created_ns``, and when ``state.hooks.begin`` is set (the span sink), ``entry =
       begin(metadata, created_ns)`` run inside that context (one that raises goes to
       ``on_error(begin, exception)``: no entry);
    4. ``task_type(coro, loop=loop, context=context[, name=name])``;
    5. each ``state.hooks.started`` hook called with the metadata (a hook that raises goes to
       ``on_error(hook, exception)``, which counts it, or re-raises what must not be swallowed);
    6. an eager task done already: ``lean_done.record(task, entry, metadata, created_ns,
       now)`` when ``lean_done`` is a :class:`LeanDone` (what ``lean_finish`` does), else
       ``lean_finish(task, metadata, duration_ns, entry)``; else
       ``starts[id(task)] = entry`` (``created_ns`` when there is none) and
       ``task.add_done_callback(lean_done, context=...)``, or, when the loop's ``call_soon``
       is a :class:`Tap` that batches for this factory (:meth:`Tap.batching_for`) and saw
       the task's first step, the task and its context put in the tap's batch (the tap's
       check adds the callback where it is needed).

    Every other call goes to ``fallback`` unchanged (metadata keywords that fail
    ``validate`` too: the fallback raises, and closes the coroutine). The C version
    (``_speedups.LeanFactory``) is what runs; in the pure-Python runtime the closure itself is
    the factory (this class would add a frame to it), and this is its specification, tested
    against the C one.
    """

    __slots__ = (
        "__dict__",
        "_last",
        "_named",
        "_validated",
        "cid_var",
        "fallback",
        "lean_done",
        "lean_finish",
        "make_metadata",
        "metadata_var",
        "new_cid",
        "on_error",
        "slot",
        "starts",
        "state",
        "task_type",
        "validate",
    )

    def __init__(
        self,
        *,
        fallback: Callable[..., Any],
        state: Any,  # noqa: ANN401
        slot: Any,  # noqa: ANN401
        cid_var: object,
        metadata_var: object,
        make_metadata: Callable[..., Any],
        new_cid: Callable[[], Any],
        validate: Callable[..., Any],
        task_type: Callable[..., Any],
        lean_done: Any,  # noqa: ANN401
        starts: object,
        on_error: Callable[[Any, BaseException], Any],
        lean_finish: Callable[..., Any],
        metadata_type: type | None = None,
    ) -> None:
        """Take over the common path from ``fallback`` (see the class docstring).

        ``metadata_type`` (``TaskMetadata``) lets the C factory make the metadata itself, as
        ``make_metadata`` does (``object.__new__``, the three slots set through their
        descriptors), without a Python call; here ``make_metadata`` always makes it.
        """
        if metadata_type is not None and not (
            isinstance(metadata_type, type)
            and all(
                type(getattr(metadata_type, field, None)) is MemberDescriptorType
                for field in ("operation_name", "correlation_id", "priority_hint")
            )
        ):
            msg = (
                "LeanFactory: metadata_type must be a class with operation_name, "
                f"correlation_id and priority_hint slots, got {metadata_type!r}"
            )
            raise TypeError(msg)
        if not isinstance(cid_var, contextvars.ContextVar) or not isinstance(
            metadata_var, contextvars.ContextVar
        ):
            msg = (
                "LeanFactory: cid_var and metadata_var must be ContextVars, got "
                f"{cid_var!r} and {metadata_var!r}"
            )
            raise TypeError(msg)
        if not isinstance(starts, dict) or type(starts) is not dict:
            msg = f"LeanFactory: starts must be a dict, got {starts!r}"
            raise TypeError(msg)
        self.fallback = fallback
        self.state = state
        self.slot = slot
        self.cid_var: contextvars.ContextVar[Any] = cid_var
        self.metadata_var: contextvars.ContextVar[Any] = metadata_var
        self.make_metadata = make_metadata
        self.new_cid = new_cid
        self.validate = validate
        self.task_type = task_type
        self.lean_done = lean_done
        self.starts: dict[int, Any] = starts
        self.on_error = on_error
        self.lean_finish = lean_finish
        self._last: tuple[Any, Any] | None = None
        self._named: tuple[Any, Any, Any, Any] | None = None
        self._validated: set[str] = set()  # operation names found valid, then cleared

    def __call__(self, loop: Any, coro: Any, /, **kwargs: Any) -> Any:  # noqa: ANN401, C901, PLR0912, PLR0915
        """Make the task (see the class docstring)."""
        if any(k not in _SIMPLE_KEYWORDS and k not in _METADATA_KEYWORDS for k in kwargs) or (
            kwargs.get("context") is not None or kwargs.get("eager_start") is not None
        ):
            return self.fallback(loop, coro, **kwargs)
        hooks = self.state.hooks
        pending = self.slot.value if hooks.lean else None
        has_metadata = any(k in _METADATA_KEYWORDS for k in kwargs)
        if not hooks.lean or (
            pending is not None
            and (has_metadata or pending[3] is not None or pending[4] is not None)
        ):
            return self.fallback(loop, coro, **kwargs)
        if pending is not None:
            self.slot.value = None
            op, cid, prio = pending[0], pending[1], pending[2]
        else:
            op = kwargs.get("operation_name")
            cid = kwargs.get("correlation_id")
            prio = kwargs.get("priority_hint")
            # Operation names found valid before (a str never changes), nothing else: valid.
            known = (
                cid is None
                and prio is None
                and (op is None or (type(op) is str and op in self._validated))
            )
            if has_metadata and not known:
                try:
                    self.validate(op, cid, prio)
                except Exception:
                    return self.fallback(loop, coro, **kwargs)
                if type(op) is str:
                    if len(self._validated) >= _VALIDATED_MAX:
                        self._validated.clear()
                    self._validated.add(op)
        context = contextvars.copy_context()
        inherited = self.cid_var.get(None)
        set_cid = False
        if cid is None:
            if inherited is not None:
                cid = inherited
            else:
                cid = self.new_cid()
                set_cid = cid is not None
        else:
            set_cid = inherited is None or cid != inherited
        inherit = False
        metadata = None
        if op is None and prio is None:
            metadata = self.metadata_var.get(None)
            inherit = (
                metadata is not None
                and metadata.operation_name is None
                and metadata.priority_hint is None
                and metadata.correlation_id == cid
            )
        if not inherit:
            metadata = self._metadata(op, cid, prio)
        if set_cid or not inherit:
            context.run(self._set, cid if set_cid else _UNSET, None if inherit else metadata)
        created_ns = time.perf_counter_ns()
        entry = None
        begin = hooks.begin
        if begin is not None:
            try:
                entry = context.run(begin, metadata, created_ns)
            except BaseException as exc:
                self.on_error(begin, exc)
        name = kwargs.get("name")
        # The loop's tap sees the task's first step (_STEP_SEEN) when it can be batched. An
        # eager task's first step runs in its constructor: a check is scheduled before it.
        tap = getattr(loop, "call_soon", None)
        if type(tap) is not Tap or not tap.batching_for(self):
            tap = None
        eager = not isinstance(self.task_type, type)
        saved_expect = 0
        if tap is not None:
            if eager and not tap.pending:
                tap.schedule_check(None, context)
            saved_expect, tap.expect = tap.expect, _STEP_SEEN if eager else _MAKING
        try:
            if name is not None:
                task = self.task_type(coro, loop=loop, context=context, name=name)
            else:
                task = self.task_type(coro, loop=loop, context=context)
        finally:
            batch = tap is not None and tap.expect == _STEP_SEEN
            if tap is not None:
                tap.expect = saved_expect
        for hook in hooks.started:
            try:
                hook(metadata)
            except BaseException as exc:
                self.on_error(hook, exc)
        if task.done():  # an eager task done in its first step
            now = time.perf_counter_ns()
            if type(self.lean_done) is LeanDone:  # what lean_finish does
                self.lean_done.record(task, entry, metadata, created_ns, now)
            else:
                self.lean_finish(task, metadata, now - created_ns, entry)
        else:
            self.starts[id(task)] = created_ns if entry is None else entry
            if not (batch and tap is not None and tap.add(task, context)):
                task.add_done_callback(self.lean_done, context=context)
        return task

    def _metadata(self, op: Any, cid: Any, prio: Any) -> Any:  # noqa: ANN401
        if op is None and prio is None:
            last = self._last
            if last is not None and cid is not None and last[0] is cid:
                return last[1]
            made = self.make_metadata(op, cid, prio)
            self._last = (cid, made)
            return made
        named = self._named
        if named is not None and named[0] is op and named[1] is cid and named[2] is prio:
            return named[3]
        made = self.make_metadata(op, cid, prio)
        self._named = (op, cid, prio, made)
        return made

    def _set(self, cid: Any, metadata: Any) -> None:  # noqa: ANN401
        if cid is not _UNSET:
            self.cid_var.set(cid)
        if metadata is not None:
            self.metadata_var.set(metadata)


_UNSET = object()


_OUTCOMES = ("finished", "exception", "cancelled")


Starts = dict
"""The lean path's table (``LeanDone.starts``): ``id(task)`` -> the task's creation time
(``perf_counter_ns``) or an instrument's entry. Here a plain ``dict``; the C version is a
table of its own with the same reading (``get``, ``pop``, ``clear``, ``[]``, ``in``,
``len``) that keeps a time as an integer in the table and no ``int`` object for the key."""


@final
class LeanDone:
    """The done callback of every task on one factory's lean path (no record per task).

    ``starts`` maps ``id(task)`` to ``perf_counter_ns()`` at the task's creation, or to the
    entry ``state.hooks.begin`` gave (it has ``created_ns``), while the task runs (keyed by
    id, not by task, so a task destroyed while pending is still collected). At the end
    (:meth:`mark` inside the task's last step, through the loop's tap, or a call from a
    ``Handle``): the entry is popped (none: forgotten at uninstall, nothing recorded), the
    metadata read from the context it runs in (the task's; ``no_metadata`` when empty), and
    each ``state.hooks.finished`` hook called with ``(metadata, outcome, duration_ns)``; one
    that raises goes to ``on_error(hook, exception)``. A cancelled task then goes to
    ``on_cancelled(task, metadata)``. An entry then goes to ``state.hooks.end(task, entry,
    metadata, outcome, finished_ns)`` (when set; one that raises goes to ``on_error``).
    """

    __slots__ = ("metadata_var", "no_metadata", "on_cancelled", "on_error", "starts", "state")

    def __init__(
        self,
        *,
        metadata_var: object,
        no_metadata: object,
        state: object,
        on_error: Callable[[Any, BaseException], Any],
        on_cancelled: Callable[[Any, Any], Any],
    ) -> None:
        """An empty table."""
        if not isinstance(metadata_var, contextvars.ContextVar):
            msg = f"LeanDone: metadata_var must be a ContextVar, got {metadata_var!r}"
            raise TypeError(msg)
        self.starts: dict[int, Any] = Starts()
        self.metadata_var: contextvars.ContextVar[Any] = metadata_var
        self.no_metadata = no_metadata
        self.state: Any = state
        self.on_error = on_error
        self.on_cancelled = on_cancelled

    def __call__(self, task: Any) -> None:  # noqa: ANN401
        """Record the task's end (from a ``Handle``)."""
        self.mark(task)

    def mark(self, task: Any) -> bool:  # noqa: ANN401
        """Record the task's end now; True (the tap schedules nothing)."""
        finished_ns = time.perf_counter_ns()
        entry = self.starts.pop(id(task), None)
        if entry is None:
            return True
        if type(entry) is int:
            created_ns, entry = entry, None
        else:
            created_ns = entry.created_ns
        self.record(task, entry, None, created_ns, finished_ns)
        return True

    def record(
        self,
        task: Any,  # noqa: ANN401
        entry: Any,  # noqa: ANN401
        metadata: Any,  # noqa: ANN401
        created_ns: int,
        finished_ns: int,
    ) -> None:
        """Report an end: the finished hooks, the cancellation hooks, ``end`` with ``entry``.

        ``metadata`` None: read from the current context (the task's, in its last step);
        ``entry`` None: nothing for ``end``. The factory calls it for an eager task done in
        its first step (not noted in :attr:`starts`).
        """
        if metadata is None:
            metadata = self.metadata_var.get(None) or self.no_metadata
        cancelled = task.cancelled()
        if cancelled:
            outcome = "cancelled"
        else:
            outcome = "finished" if task._exception is None else "exception"
        hooks = self.state.hooks
        for hook in hooks.finished:
            try:
                hook(metadata, outcome, finished_ns - created_ns)
            except BaseException as exc:
                self.on_error(hook, exc)
        if cancelled:
            self.on_cancelled(task, metadata)
        end = hooks.end
        if entry is not None and end is not None:
            try:
                end(task, entry, metadata, outcome, finished_ns)
            except BaseException as exc:
                self.on_error(end, exc)


_NAMES_CACHED = 4096  # names beyond share "_other" anyway: not cached, asked each time


class _CountsShard:
    __slots__ = ("by_label", "by_name", "last", "last_name")

    def __init__(self) -> None:
        # label -> [created, counts[3], sums[3]], then exemplars[3] once one is kept
        self.by_label: dict[str, list[Any]] = {}
        self.by_name: dict[object, list[Any]] = {}  # operation name -> the same list
        self.last_name: object = _UNSET
        self.last: list[Any] = []


def _outcome_index(outcome: str) -> int:
    try:
        return _OUTCOMES.index(outcome)
    except ValueError:
        msg = f"Invalid outcome: {outcome!r}"
        raise ValueError(msg) from None


def _exemplar_time(exemplar: tuple[int, int, int, float] | None) -> float:
    return exemplar[3] if exemplar is not None else 0.0


@final
class Counts:
    """Per-operation task counts and duration histograms (the task metrics' hot part).

    ``started(metadata)`` counts a task created; ``finished(metadata, outcome, duration_ns)``
    puts its duration in the ``(label, outcome)`` histogram: the bucket is the first bound in
    ``bounds_ns`` not below it (``bisect_left``), the last one past every bound. The label is
    ``label(metadata.operation_name)``, asked once per operation name (the first 4,096 names
    are remembered; ``label`` must give a name the same label every time). Each thread counts
    into a shard of its own; :meth:`fold` sums them:
    ``({label: created}, {(label, outcome): (counts, sum_ns)})`` (series with no task left out).

    ``exemplar(metadata, outcome, duration_ns, trace_id, span_id)`` keeps a traced task's span
    ids as the exemplar of its bucket (the last one wins, with ``time.time()``);
    :meth:`fold_exemplars` gives every thread's, the latest per bucket:
    ``{(label, outcome): [None or (trace_id, span_id, duration_ns, time) per bucket]}``.
    """

    __slots__ = ("_local", "_lock", "_shards", "bounds_ns", "label")

    def __init__(self, bounds_ns: object, label: object) -> None:
        """Count with these bucket bounds (increasing ints, ns) and this label function."""
        if (
            not isinstance(bounds_ns, tuple) or not 0 < len(bounds_ns) <= 64  # noqa: PLR2004 - the C type's limit
        ):
            msg = f"Counts: bounds_ns must be a tuple of 1 to 64 ints, got {bounds_ns!r}"
            raise ValueError(msg)
        if any(b >= c for b, c in itertools.pairwise(bounds_ns)):
            msg = f"Counts: bounds_ns must increase, got {bounds_ns!r}"
            raise ValueError(msg)
        if not callable(label):
            msg = f"Counts: label must be callable, got {label!r}"
            raise TypeError(msg)
        self.bounds_ns: tuple[int, ...] = bounds_ns
        self.label: Callable[[Any], str] = label
        self._local = threading.local()
        self._lock = threading.Lock()
        self._shards: list[_CountsShard] = []

    def _series(self, metadata: Any) -> list[Any]:  # noqa: ANN401
        try:
            shard: _CountsShard = self._local.shard
        except AttributeError:
            shard = self._local.shard = _CountsShard()
            with self._lock:
                self._shards.append(shard)
        name = metadata.operation_name
        if name is shard.last_name:
            return shard.last
        series = shard.by_name.get(name)
        if series is not None:
            shard.last_name, shard.last = name, series
            return series
        label = self.label(name)
        series = shard.by_label.get(label)
        if series is None:
            size = len(self.bounds_ns) + 1
            series = shard.by_label[label] = [0, [[0] * size for _ in _OUTCOMES], [0, 0, 0]]
        if len(shard.by_name) < _NAMES_CACHED:
            shard.by_name[name] = series
        shard.last_name, shard.last = name, series
        return series

    def started(self, metadata: Any) -> None:  # noqa: ANN401
        """Count a task created with ``metadata``."""
        self._series(metadata)[0] += 1

    def finished(self, metadata: Any, outcome: str, duration_ns: int) -> None:  # noqa: ANN401
        """Put a task's duration in its ``(label, outcome)`` histogram."""
        o = _outcome_index(outcome)
        duration_ns = max(duration_ns, 0)
        series = self._series(metadata)
        series[1][o][bisect_left(self.bounds_ns, duration_ns)] += 1
        series[2][o] += duration_ns

    def exemplar(  # the hook's signature (task_exemplar)
        self,
        metadata: Any,  # noqa: ANN401
        outcome: str,
        duration_ns: int,
        trace_id: object,
        span_id: object,
    ) -> None:
        """Keep a traced task's span ids as its bucket's exemplar.

        A trace id in [0, 2**128) and a span id in [1, 2**64): a span's, as the C version
        keeps them (as C values).
        """
        o = _outcome_index(outcome)
        if not isinstance(trace_id, int) or not isinstance(span_id, int):
            msg = f"exemplar(): trace_id and span_id must be ints, got {trace_id!r}, {span_id!r}"
            raise TypeError(msg)
        if not 0 <= trace_id < 1 << 128:
            msg = f"exemplar(): trace_id must be an int in [0, 2**128), got {trace_id!r}"
            raise ValueError(msg)
        if not 0 < span_id < 1 << 64:
            msg = f"exemplar(): span_id must be an int in [1, 2**64), got {span_id!r}"
            raise ValueError(msg)
        series = self._series(metadata)
        if len(series) == 3:  # noqa: PLR2004 - [created, counts, sums]: no exemplar yet
            series.append([[None] * (len(self.bounds_ns) + 1) for _ in _OUTCOMES])
        bucket = bisect_left(self.bounds_ns, max(duration_ns, 0))
        series[3][o][bucket] = (trace_id, span_id, duration_ns, time.time())

    def fold_exemplars(self) -> dict[tuple[str, str], list[Any]]:
        """Every thread's exemplars: the latest per bucket."""
        with self._lock:
            shards = list(self._shards)
        folded: dict[tuple[str, str], list[Any]] = {}
        for shard in shards:
            for label, series in list(shard.by_label.items()):
                if len(series) == 3:  # noqa: PLR2004 - no exemplar in this series
                    continue
                for o, outcome in enumerate(_OUTCOMES):
                    row = list(series[3][o])
                    if not any(row):
                        continue
                    total = folded.get((label, outcome))
                    if total is not None:
                        pairs = zip(row, total, strict=True)
                        row = [max(a, b, key=_exemplar_time) for a, b in pairs]
                    folded[(label, outcome)] = row
        return folded

    def fold(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[list[int], int]]]:
        """Every thread's counts, summed."""
        with self._lock:
            shards = list(self._shards)
        created: dict[str, int] = {}
        series: dict[tuple[str, str], tuple[list[int], int]] = {}
        for shard in shards:
            for label, (n, counts, sums, *_) in list(shard.by_label.items()):
                created[label] = created.get(label, 0) + n
                for o, outcome in enumerate(_OUTCOMES):
                    row = list(counts[o])
                    if not any(row):
                        continue
                    total = series.get((label, outcome))
                    if total is not None:
                        row = [a + b for a, b in zip(row, total[0], strict=True)]
                        series[(label, outcome)] = (row, total[1] + sums[o])
                    else:
                        series[(label, outcome)] = (row, sums[o])
        return created, series


def encode_task_span(span: object) -> None:  # noqa: ARG001 - the C version's signature
    """None: the task span is for the Python encoder to write.

    The C version writes the common span (no exception event, no priority hint) itself; its
    specification is ``export.otlp_encode``'s Python encoder, which writes every span here.
    """
    return


_TASK_SPAN_FIELDS = 15  # otlp_encode.TaskSpan


def encode_task_spans(
    spans: list[Any], fallback: Callable[[Any], object], others: list[Any] | None = None
) -> bytes:
    """The Span messages of ``spans`` (task span tuples), one after the other.

    Each is written by :func:`encode_task_span` where it writes it, else by ``fallback`` (the
    Python encoder): here, by ``fallback``. With a list as ``others``, what is not a tuple (a
    ``ReadableSpan`` among the task spans) is appended there instead (the export thread's
    batch sorted with no Python loop, in C). The C version writes them into one buffer, with
    no bytes object per span.
    """
    if (
        type(spans) is not list
        or not callable(fallback)
        or not (others is None or type(others) is list)
    ):
        msg = (
            "encode_task_spans(spans, fallback, others=None): a list, a callable, and a list "
            "or None"
        )
        raise TypeError(msg)
    parts: list[bytes] = []
    for span in spans:
        if others is not None and not isinstance(span, tuple):
            others.append(span)  # not a task span: the caller's
            continue
        if type(span) is not tuple or len(span) != _TASK_SPAN_FIELDS:
            msg = f"encode_task_spans: expected a 15-tuple, got {span!r}"
            raise TypeError(msg)
        data = fallback(span)  # encode_task_span writes nothing here: the fallback does
        if not isinstance(data, bytes):
            msg = f"encode_task_spans: fallback gave {data!r}, not bytes"
            raise TypeError(msg)
        parts.append(data)
    return b"".join(parts)


@final
class LaneQueue:
    """The export thread's bounded queue of finished spans, and what it refused.

    Called with a span, it queues it, unless it is closed or ``limit`` spans wait already:
    then the span is counted in :attr:`refused`. When ``batch`` spans wait it calls ``wake()``
    once (not again till the next :meth:`take`), outside its lock. :attr:`handed` counts the
    spans queued. Several threads may put (each loop's) while one takes (the export thread).
    The C version is a ring of references the span sink's C end puts into without a call.
    """

    __slots__ = (
        "_items",
        "_lock",
        "_signalled",
        "_wake",
        "batch",
        "closed",
        "handed",
        "limit",
        "refused",
    )

    def __init__(self, limit: object, batch: object, wake: object) -> None:
        """At most ``limit`` spans waiting; ``wake()`` when ``batch`` wait."""
        if type(limit) is not int or type(batch) is not int:
            wrong = batch if type(limit) is int else limit
            msg = f"LaneQueue: limit and batch must be ints, got {wrong!r}"
            raise TypeError(msg)
        if limit < 1 or batch < 1:
            msg = f"LaneQueue: limit and batch must be 1 or more, got limit={limit}, batch={batch}"
            raise ValueError(msg)
        if not callable(wake):
            msg = f"LaneQueue: wake must be callable, got {wake!r}"
            raise TypeError(msg)
        self._items: collections.deque[object] = collections.deque()
        self._lock = threading.Lock()
        self._signalled = False
        self._wake = wake
        self.limit = limit
        self.batch = batch
        self.closed = False
        self.handed = 0
        self.refused = 0

    def __call__(self, span: object) -> None:
        """Queue ``span``, or count it refused (closed, or ``limit`` waiting)."""
        with self._lock:
            items = self._items
            if self.closed or len(items) >= self.limit:
                self.refused += 1
                return
            items.append(span)
            self.handed += 1
            wake = len(items) >= self.batch and not self._signalled
            if wake:
                self._signalled = True
        if wake:
            self._wake()

    def take(self, n: object) -> list[object]:
        """The ``n`` oldest spans waiting (fewer if fewer wait), removed from the queue."""
        if type(n) is not int:
            msg = f"LaneQueue.take: n must be an int, got {n!r}"
            raise TypeError(msg)
        if n < 0:
            msg = f"LaneQueue.take: n must be 0 or more, got {n}"
            raise ValueError(msg)
        with self._lock:
            items = self._items
            taken = [items.popleft() for _ in range(min(n, len(items)))]
            self._signalled = False
            return taken

    def close(self) -> None:
        """Refuse every span from now on (counted); those waiting are let go."""
        with self._lock:
            self.closed = True
            self._items.clear()

    def __len__(self) -> int:
        """Spans waiting."""
        return len(self._items)


class SpanIds:
    """A span handle's ids and creation time: the base of the span sink's handle class.

    ``trace_id`` (128 bits), ``span_id`` (64 bits) and ``created_ns`` (``perf_counter_ns``),
    each an ``int``. Here they are three object slots; the C version keeps them as native
    integers in the handle itself (no ``int`` object per task while the task runs), builds an
    ``int`` when one is read, and refuses a value out of its range with an error naming it.
    A handle can be weakly referenced, as any span can.

    The handle's object fields (``_context``, ``_rare``, ``correlation_id``, ``inherited``,
    ``parent``; see the sink's ``_TaskSpan``) are slots here too, so the sink's class adds
    none: in C, a subclass that adds no slot to a base the cycle collector does not track is
    made untracked too, and a handle then has no GC header (16 bytes a pending task).
    """

    __slots__ = (
        "__weakref__",
        "_context",
        "_rare",
        "correlation_id",
        "created_ns",
        "inherited",
        "parent",
        "span_id",
        "trace_id",
    )

    trace_id: int
    span_id: int
    created_ns: int


def untracked_copy(cls: type[SpanIds]) -> type[SpanIds]:
    """``cls`` (a class whose one base is :class:`SpanIds`, adding no slot), for the handles.

    The C version makes ``cls`` again as a type whose instances have no cycle collector's
    header (a class statement always makes one the collector tracks), with ``cls``'s
    namespace copied into it: 16 bytes less a pending traced task. In Python there is no
    such type: ``cls`` itself, once checked.
    """
    if (
        not isinstance(cls, type)
        or cls.__bases__ != (SpanIds,)
        or cls.__dict__.get("__slots__", None) != ()
    ):
        msg = (
            "untracked_copy: cls must be a class whose one base is SpanIds and which adds no "
            f"slot (__slots__ = ()), got {cls!r}"
        )
        raise TypeError(msg)
    return cls


@final
class SpanHooks:
    """The span sink's ``task_begin``/``task_end`` for the common task, with no detour.

    ``sink`` is asynctrace's ``SpanSink`` (``asynctrace.sinks.tracing``), whose own methods are
    the general path and the specification: :meth:`begin` and :meth:`end` give what they would
    give, and hand every other case to them unchanged (``sink.task_begin(...)``,
    ``sink.task_end(...)``), before doing anything themselves.

    What the hooks know of the sink's state they take in :meth:`sync`, which the sink calls
    whenever it changes it (not read at each task: attribute lookups a task saved).

    :meth:`begin` takes a task whose span is made lazily current (``sink._runtime`` is the
    runtime context in use), on the fast path with the SDK's default sampler and id generator
    (``sink._common``, computed with ``sink._checked_processors``, still the provider's), and
    whose parent is the creating task's sampled span of the same correlation id, or no span
    (an empty OpenTelemetry context): the task's span handle (``handle_type``, positional
    arguments as ``_TaskSpan``) is set in ``task_span`` and returned.

    :meth:`end` takes such a handle of a task that finished (no exception, not cancelled),
    with nothing uncommon (its ``_rare`` None: no links, sampler attributes or late events)
    and no trace state, when the provider's processors are all lanes (``sink._lanes``) and the
    task is not one of the loop's own (``internal``, by coroutine qualname): the span goes to
    each lane's ``add_task`` as a tuple (``otlp_encode.TaskSpan``; the C version puts it into
    a ``LaneQueue`` without a call), then to the metrics' exemplar hooks
    (``state.hooks.exemplars``; one that raises goes to ``on_error(hook, exception)``).

    The C version keeps its span counts itself (``started``, ``ended``, ``lock``: the sink
    sums them at close, as a thread's ``_Counts``); this one counts in the sink's per-thread
    counts. Neither is used on a free-threaded build, where the sink's counts take a lock.
    """

    __slots__ = (
        "_adds",
        "_checked",
        "_closed",
        "_common",
        "_context_module",
        "_finished",
        "_handle",
        "_internal",
        "_multi",
        "_on_error",
        "_provisional",
        "_random",
        "_runtime",
        "_sampled",
        "_span_key",
        "_state",
        "_task_span",
        "_unnamed",
        "instrument",
    )

    def __init__(
        self,
        *,
        sink: Any,  # noqa: ANN401 - a SpanSink (a higher layer)
        handle_type: Any,  # noqa: ANN401 - the sink's _TaskSpan (a higher layer)
        task_span: object,
        context_module: Any,  # noqa: ANN401 - opentelemetry.context
        random_module: Any,  # noqa: ANN401 - random: its getrandbits, looked up at each id
        sampled: object,
        finished: str,
        internal: frozenset[str],
        unnamed: str | None,
        provisional: str,
        state: Any,  # noqa: ANN401
        on_error: Callable[[Any, BaseException], Any],
        span_key: str,
    ) -> None:
        """Hooks for ``sink``; the rest are the constants its fast path compares with.

        ``span_key`` is the key of the current span in an OpenTelemetry context.
        """
        if not isinstance(task_span, contextvars.ContextVar):
            msg = f"SpanHooks: task_span must be a ContextVar, got {task_span!r}"
            raise TypeError(msg)
        self.instrument = sink
        self._handle: Any = handle_type
        self._task_span: contextvars.ContextVar[Any] = task_span
        self._context_module = context_module
        self._random = random_module
        self._sampled = sampled
        self._finished = finished
        self._internal = internal
        self._unnamed = unnamed
        self._provisional = provisional
        self._state = state
        self._on_error = on_error
        self._span_key = span_key
        self.sync()

    def sync(self) -> None:
        """Take the sink's state afresh; the sink calls this whenever it changes it.

        Its runtime context (``_runtime``), whether the shortcut is open (``_common``) and the
        processors that was computed with (``_checked_processors``), its tracer's processor
        (whose ``_span_processors`` are compared with those at each task: one added makes the
        sink look again), whether it is closed, and its lanes' ``add_task``.
        """
        sink = self.instrument
        self._runtime = sink._runtime
        self._common = bool(sink._common)
        self._checked = sink._checked_processors
        self._multi = getattr(sink._tracer, "span_processor", None)
        self._closed = bool(sink._closed)
        self._adds = tuple(lane.add_task for lane in sink._lanes)

    def _random_id(self, bits: int) -> int:
        value: int = self._random.getrandbits(bits)
        while value == 0:  # the invalid id, redrawn as the SDK's RandomIdGenerator does
            value = self._random.getrandbits(bits)
        return value

    def begin(self, metadata: Any, created_ns: int) -> Any:  # noqa: ANN401
        """``sink.task_begin(metadata, created_ns)``, inside the new task's context."""
        sink = self.instrument
        runtime = self._runtime
        if not (
            self._common
            and runtime is not None
            and self._context_module._RUNTIME_CONTEXT is runtime
            and getattr(self._multi, "_span_processors", None) is self._checked
        ):
            return sink.task_begin(metadata, created_ns)
        current = runtime._current_context.get()
        creator = self._task_span.get()
        correlation_id = metadata.correlation_id
        if type(creator) is self._handle and creator.inherited is current:
            here = creator  # the creating task's, current as nothing was attached there
        elif not isinstance(current, dict):
            return sink.task_begin(metadata, created_ns)
        elif current:  # a task's span made current when asked for?
            here = current.get(self._span_key)
            if type(here) is not self._handle:  # another's span, or a remote parent
                return sink.task_begin(metadata, created_ns)
        else:
            here = None  # no current span: the root of a new trace
        if here is not None:
            if here.correlation_id != correlation_id or (
                here._rare is not None and here.trace_flags is not self._sampled
            ):
                return sink.task_begin(metadata, created_ns)  # a new trace, or not sampled
            parent = here.get_span_context()
            trace_id, trace_state = parent.trace_id, parent.trace_state  # the parent's
        else:
            parent = trace_state = None
            trace_id = self._random_id(128)
        handle = self._handle(
            trace_id,
            self._random_id(64),
            self._sampled,
            trace_state,
            parent,
            None,
            correlation_id,
            (),
        )
        handle.created_ns = created_ns
        handle.inherited = current
        self._task_span.set(handle)
        sink._thread_counts().started += 1
        if self._closed:  # its installation closed as it started: it never ends there
            sink._count_unfinished(1)
        return handle

    def end(self, task: Any, entry: Any, metadata: Any, outcome: str, finished_ns: int) -> None:  # noqa: ANN401
        """``sink.task_end(task, entry, metadata, outcome, finished_ns)``."""
        sink = self.instrument
        adds = self._adds
        if (
            type(entry) is not self._handle
            or outcome != self._finished
            or not adds
            or entry._rare is not None  # links, sampler attributes, late events, or the like
            or entry.trace_state  # its parent's (the common span's)
        ):
            sink.task_end(task, entry, metadata, outcome, finished_ns)
            return
        operation = metadata.operation_name
        coro_name = None
        if operation is None:
            coro_name = getattr(task.get_coro(), "__qualname__", None)
            if coro_name in self._internal:
                sink.task_end(task, entry, metadata, outcome, finished_ns)  # not exported
                return
        task_name = task.get_name()
        if operation is not None:
            name = operation
        elif not (
            (task_name.startswith("Task-") and task_name[5:].isdigit())
            or task_name == self._unnamed
        ):
            name = task_name
        else:
            name = coro_name or self._provisional
        sink._thread_counts().ended += 1
        parent = entry.parent
        offset = sink._epoch_offset
        span = (
            entry.trace_id,
            entry.span_id,
            parent.span_id if parent is not None else 0,
            parent is not None and parent.is_remote,
            "",
            name,
            entry.created_ns + offset,
            finished_ns + offset,
            task_name,
            outcome,
            operation,
            metadata.correlation_id,
            metadata.priority_hint,
            None,
            None,
        )
        for add in adds:
            add(span)
        exemplars = self._state.hooks.exemplars
        if exemplars:
            duration = finished_ns - entry.created_ns
            for hook in exemplars:
                try:
                    hook(metadata, outcome, duration, entry.trace_id, entry.span_id)
                except BaseException as exc:
                    self._on_error(hook, exc)
