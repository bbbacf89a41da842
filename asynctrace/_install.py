"""Putting the factory on one loop, or on every loop, and taking it off again.

A process-wide installation (no loop running) wraps the event loop policy, so that each loop
the policy makes afterwards (``asyncio.run``, ``asyncio.Runner``, ``asyncio.new_event_loop``,
uvloop's policy when ``uvloop.install()`` came first) gets the factory. Runners given an
explicit ``loop_factory`` bypass policies: wrap that factory with :func:`loop_factory`, or call
``install()`` inside the running loop.

This module knows nothing of OpenTelemetry or Prometheus: ``install()`` in ``_api`` builds the
instruments and hands them here. When the last installation goes, the instruments are closed,
after every lock is released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Final, final

from asynctrace._cancel_patch import patch, unpatch
from asynctrace._create_task import FACTORY_MARK
from asynctrace._factory import (
    LiveRecord,
    TaskFactory,
    forget_running,
    forget_task,
    make_factory,
    new_correlation_id,
)
from asynctrace._hooks import Hooks, Instrument, call_each, source_of
from asynctrace._introspect import creation_site, task_metadata, task_record
from asynctrace._metadata import _CORRELATION_ID, _METADATA, TaskMetadata, _make_metadata
from asynctrace._state import STATE
from asynctrace._tap import tap, untap

__all__ = [
    "Installation",
    "configured_options",
    "install_factory",
    "installation_of",
    "instrumented_loops",
    "loop_factory",
    "report_pending",
    "reset",
    "uninstall",
]

_events: Any = asyncio.events
# Python 3.14 deprecates the public policy API; the stdlib itself still uses these.
_get_policy: Callable[[], Any] = getattr(
    _events, "_get_event_loop_policy", asyncio.get_event_loop_policy
)
_set_policy: Callable[[Any], None] = getattr(
    _events, "_set_event_loop_policy", asyncio.set_event_loop_policy
)
_PolicyBase: Any = (
    getattr(_events, "_AbstractEventLoopPolicy", None) or _events.AbstractEventLoopPolicy
)


def installation_of(factory: object) -> Installation | None:
    """Return the installation that built ``factory``, or None when it is not asynctrace's."""
    installation = getattr(factory, FACTORY_MARK, None)
    return installation if isinstance(installation, Installation) else None


@final
class Installation:
    """The result of :func:`asynctrace.install`: where the factory is, and how to remove it.

    Attributes:
        loop: The instrumented loop, or None for the process-wide installation.

    Since: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_children",
        "_factory",
        "_handler",
        "_owner",
        "_parent",
        "_policy",
        "_previous",
        "_previous_handler",
        "loop",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None, parent: Installation | None) -> None:
        """Use :func:`asynctrace.install`; this is not meant to be called directly."""
        self.loop = loop
        self._parent = parent
        self._previous: TaskFactory | None = None
        self._factory: TaskFactory | None = None
        self._policy: _InstrumentingPolicy | None = None
        self._children: list[Installation] = []
        self._handler: _ExceptionHandler | None = None
        self._previous_handler: _ExceptionHandler | None = None
        self._owner = 0  # the thread that put the factory on the loop

    @property
    def active(self) -> bool:
        """Whether this installation is still in place (a closed loop's is not)."""
        if self.loop is None:
            return _INSTALLED.process is self
        return (
            self._factory is not None
            and not self.loop.is_closed()
            and self.loop.get_task_factory() is self._factory
        )

    def _attach(self) -> None:
        loop = self.loop
        assert loop is not None  # noqa: S101 - internal invariant
        self._owner = threading.get_ident()
        previous = loop.get_task_factory()
        # An ended installation's factory may still be on the loop (its switch back waits
        # for the loop's thread): chain what it chained, never asynctrace's own, or each
        # task would get two records and two spans.
        while installation_of(previous) is not None:
            previous = getattr(previous, "__wrapped__", None)
        self._previous = previous
        self._factory = make_factory(self, self._previous)
        loop.set_task_factory(self._factory)
        tap(loop)  # exact end times where the loop allows it (see _tap)
        _watch_close(loop)  # tasks still pending when it closes are reported
        # asyncio reports a task destroyed while pending through the exception handler (with
        # the task): chained in front of the one set before, which still gets every call.
        self._previous_handler = loop.get_exception_handler()
        self._handler = _chained_handler(self)
        loop.set_exception_handler(self._handler)

    def uninstall(self) -> None:
        """Restore exactly what was there before: the previous task factory or loop policy.

        Uninstalling the process-wide installation also restores the factory of the loops it
        instrumented. Calling it twice is harmless. When nothing stays installed, the
        instruments are closed (spans flushed, servers stopped).

        A loop's factory is only ever changed on the loop's own thread. Called from
        another thread while that loop runs, this hands the change to the loop
        (``call_soon_threadsafe``) and returns once the loop has made it, or after
        ``SWITCH_WAIT_S`` if the loop is blocked (it makes it when it next runs). The
        installation is inactive from the moment this is called.

        Raises:
            RuntimeError: Something replaced asynctrace's factory (or policy) since; asynctrace
                leaves it in place rather than remove someone else's.
        """
        with STATE.lock:
            switches = _uninstall_process(self) if self.loop is None else self._uninstall_loop()
            closing = _unconfigure_if_idle()
        for switch in switches:  # no lock held: a loop thread may need it to get there
            switch.apply()
        _close(closing)

    def _uninstall_loop(self) -> list[_Switch]:
        assert self.loop is not None  # noqa: S101 - internal invariant
        factory = self._factory
        if factory is None:
            return []
        current = self.loop.get_task_factory()
        if current is not factory:
            raise RuntimeError(
                f"Cannot uninstall from {self.loop!r}: its task factory was replaced after "
                f"asynctrace.install() (now {current!r}); restore it first."
            )
        switch = self._switch_back()
        self._forget()
        return [switch]

    def _switch_back(self) -> _Switch:
        """What puts this loop's previous factory and exception handler back."""
        assert self.loop is not None  # noqa: S101 - internal invariant
        switch = _Switch(self.loop, self._factory, self._previous, self._handler)
        switch.previous_handler = self._previous_handler
        switch.owner = self._owner
        return switch

    @property
    def loop_closed(self) -> bool:
        """Whether this is a loop installation whose loop has closed (it ended with it)."""
        return self.loop is not None and self.loop.is_closed()

    def _forget(self) -> None:
        forget_running(self._factory)
        self._factory = None
        if self in _INSTALLED.loops:
            _INSTALLED.loops.remove(self)
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)

    def __repr__(self) -> str:
        """Show where the installation is and whether it is active."""
        where = "process" if self.loop is None else repr(self.loop)
        return f"<asynctrace.Installation {where} active={self.active}>"


logger: Final = logging.getLogger("asynctrace")

_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]

SWITCH_WAIT_S: Final = 5.0
"""How long an uninstall from another thread waits for a running loop to switch factories."""


@final
class _Switch:
    """Putting a loop's previous factory (and exception handler) back, on the loop's thread."""

    __slots__ = ("factory", "handler", "loop", "owner", "previous", "previous_handler")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: object,
        previous: TaskFactory | None,
        handler: _ExceptionHandler | None,
    ) -> None:
        self.loop = loop
        self.factory = factory
        self.previous = previous
        self.handler = handler
        self.previous_handler: _ExceptionHandler | None = None
        self.owner = 0

    def run(self) -> None:
        """Switch back, unless someone replaced ours meanwhile (theirs stays)."""
        loop = self.loop
        if loop.get_task_factory() is self.factory:
            loop.set_task_factory(self.previous)
            untap(loop)
            _unwatch_close(loop)
        if loop.get_exception_handler() is self.handler:
            loop.set_exception_handler(self.previous_handler)

    def apply(self) -> bool:
        """Switch now on the loop's own thread; else hand the switch to the loop.

        asyncio's ``create_task`` reads the factory twice: changing it from another thread
        while that thread creates tasks could make it call None. A loop that is not running
        may still be in use by its thread (``asyncio.run`` between its phases), so only the
        thread that put the factory on an idle loop switches it directly. Returns whether
        the switch is done; a running loop is waited for (``SWITCH_WAIT_S``), an idle one
        switches when it next runs.
        """
        loop = self.loop
        idle_here = not loop.is_running() and threading.get_ident() == self.owner
        if loop.is_closed() or idle_here or running_loop() is loop:
            self.run()
            return True
        done = threading.Event()

        def on_loop() -> None:
            try:
                self.run()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # closed meanwhile
            self.run()
            return True
        if not loop.is_running():
            return False  # idle in another thread: it switches when it runs next
        return done.wait(SWITCH_WAIT_S)


_NO_METADATA: Final = TaskMetadata()


def _chained_handler(installation: Installation) -> _ExceptionHandler:
    def asynctrace_exception_handler(
        loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        task = context.get("task")
        if isinstance(task, asyncio.Future) and not task.done():
            try:
                context = _with_ids(context, task_metadata(task))
                site = creation_site(task)
                if site is not None:
                    context = {**context, "created_at": site}
                _task_destroyed(installation, task)
            except Exception as exc:
                STATE.errors.count("destroyed-task tracking", exc)
        future = context.get("future")
        if (
            isinstance(future, asyncio.Task)
            and future.done()
            and str(context.get("message", "")).startswith("Task exception was never retrieved")
        ):
            try:
                metadata = task_metadata(future)
                context = _with_ids(context, metadata)
                call_each(
                    STATE.hooks.never_retrieved, STATE.errors, future, metadata or _NO_METADATA
                )
            except Exception as exc:
                STATE.errors.count("never-retrieved tracking", exc)
        previous = installation._previous_handler
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    return asynctrace_exception_handler


def _with_ids(context: dict[str, Any], metadata: TaskMetadata | None) -> dict[str, Any]:
    """Asyncio's report about a task, with the task's ids (its default handler logs them)."""
    if metadata is None:
        return context
    return {
        **context,
        "operation": metadata.operation_name,
        "correlation_id": metadata.correlation_id,
    }


def _task_destroyed(installation: Installation, task: asyncio.Future[Any]) -> None:
    """A pending task of ours was destroyed: forget what was kept for it, tell the hooks."""
    hooks = STATE.hooks
    if forget_task(installation._factory, task):  # the lean path noted its creation
        metadata = task_metadata(task)
    else:
        record = task_record(task)
        if not isinstance(record, LiveRecord) or record._hooks is not hooks:
            return  # not ours, or its configuration has ended
        metadata = record.metadata
    call_each(hooks.destroyed, STATE.errors, task, metadata or _NO_METADATA)


_PENDING_LISTED: Final = 20
"""How many pending tasks the one log record lists by name (all are counted)."""


def report_pending(
    loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task[Any]], when: str
) -> None:
    """Tasks still pending as ``loop`` closes or ``asyncio.run`` ends: one log record, hooks.

    Only tasks asynctrace's factory made (with metadata) are reported.
    """
    pending = [(t, m) for t in tasks if (m := task_metadata(t)) is not None]
    if not pending:
        return
    by_operation: dict[str, int] = {}
    for _, metadata in pending:
        op = metadata.operation_name or "unnamed"
        by_operation[op] = by_operation.get(op, 0) + 1
    listed = "; ".join(
        f"{task.get_name()} (operation={m.operation_name}, correlation_id={m.correlation_id}"
        f"{_site_part(creation_site(task))})"
        for task, m in pending[:_PENDING_LISTED]
    )
    more = f"; and {len(pending) - _PENDING_LISTED} more" if len(pending) > _PENDING_LISTED else ""
    counts = ", ".join(f"{op}={n}" for op, n in sorted(by_operation.items()))
    logger.warning(
        "%d task(s) still pending when %s (%s): %s%s",
        len(pending),
        when,
        counts,
        listed,
        more,
        extra={"asynctrace_pending": by_operation},
    )
    call_each(STATE.hooks.pending_at_close, STATE.errors, loop, pending, when)


def _site_part(site: str | None) -> str:
    return f", created at {site}" if site else ""


@final
class _Closing:
    """``loop.close`` while asynctrace instruments the loop: reports the pending tasks first."""

    __slots__ = ("close", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, close: Callable[[], None]) -> None:
        self.loop = loop
        self.close = close

    def __call__(self) -> None:
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if pending:
                    report_pending(loop, pending, "the loop closed")
            except Exception as exc:
                STATE.errors.count("pending-task report", exc)
        self.close()
        _unwatch_close(loop)  # closed: its own close() again


def _watch_close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        if isinstance(getattr(loop, "close", None), _Closing):  # not vars(loop): see _tap
            return
        loop.close = _Closing(loop, loop.close)  # type: ignore[method-assign]
    except (AttributeError, TypeError):
        pass  # no instance attributes (uvloop): tasks left there are reported when destroyed


def _unwatch_close(loop: asyncio.AbstractEventLoop) -> None:
    current = getattr(loop, "close", None)
    if isinstance(current, _Closing):
        original = current.close
        if getattr(original, "__func__", None) is getattr(type(loop), "close", None):
            del loop.close
        else:
            loop.close = original  # type: ignore[method-assign]


@final
class _Installed:
    """Which installations exist: the process-wide one and the per-loop ones."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.process: Installation | None = None
        self.loops: list[Installation] = []
        self.warned: set[str] = set()  # the uncovered-loop warnings already logged


_INSTALLED: Final = _Installed()


def instrumented_loops() -> list[asyncio.AbstractEventLoop]:
    """The open loops asynctrace's factory is on now (per-loop and process-wide installs)."""
    with STATE.lock:
        installations = list(_INSTALLED.loops)
        if _INSTALLED.process is not None:
            installations += _INSTALLED.process._children
    loops = []
    for installation in installations:
        loop = installation.loop
        if loop is not None and installation.active and loop not in loops:
            loops.append(loop)
    return loops


class _InstrumentingPolicy(_PolicyBase):  # type: ignore[misc]
    """Delegates to the policy that was set before, instrumenting each loop it makes."""

    def __init__(self, inner: Any, installation: Installation) -> None:  # noqa: ANN401
        self._inner = inner
        self._installation = installation

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._inner.new_event_loop()
        _instrument_loop(loop, self._installation)
        return loop

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._inner.get_event_loop()
        _instrument_loop(loop, self._installation)
        return loop

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._inner.set_event_loop(loop)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - delegation
        return getattr(self._inner, name)


def _instrument_loop(loop: asyncio.AbstractEventLoop, parent: Installation) -> Installation | None:
    """Put the factory on a loop the process-wide ``parent`` made; None if it has ended."""
    with STATE.lock:
        if _INSTALLED.process is not parent:
            return None  # uninstalled while this loop was being made: leave the loop alone
        existing = installation_of(loop.get_task_factory())
        if existing is not None:
            return existing
        parent._children[:] = [c for c in parent._children if not c.loop_closed]
        child = Installation(loop, parent)
        child._attach()
        parent._children.append(child)
        attached = STATE.hooks.attached
    call_each(attached, STATE.errors, loop)
    return child


def _uninstall_process(installation: Installation) -> list[_Switch]:
    if _INSTALLED.process is not installation:
        return []
    policy = installation._policy
    current = _get_policy()
    if current is not policy:
        raise RuntimeError(
            f"Cannot uninstall the process-wide installation: the event loop policy was "
            f"replaced after asynctrace.install() (now {current!r}); restore it first."
        )
    switches: list[_Switch] = []
    for child in list(installation._children):
        if child.active:
            switches += child._uninstall_loop()
    installation._children.clear()
    _set_policy(policy._inner if policy is not None else None)
    _INSTALLED.process = None
    STATE.cover_loop = None
    return switches


def _unconfigure_if_idle() -> tuple[Instrument, ...]:
    """Once nothing is installed, drop the configuration; return the instruments to close.

    A loop that closed ends its installation: it no longer counts, and is forgotten.
    """
    _INSTALLED.loops[:] = [i for i in _INSTALLED.loops if not i.loop_closed]
    if _INSTALLED.process is not None or any(i.active for i in _INSTALLED.loops):
        return ()
    _INSTALLED.loops.clear()
    if STATE.options is None:
        return ()
    unpatch()
    return STATE.unconfigure()[1].instruments


def _close(instruments: tuple[Instrument, ...]) -> None:
    """Close ``instruments`` in order, each failure counted; called with no lock held."""
    _call_on_each(instruments, "close")


def _call_on_each(instruments: tuple[Instrument, ...], method: str) -> None:
    """Call ``method`` of each instrument in order; a failure costs that one call."""
    for instrument in instruments:
        call = getattr(instrument, method)
        try:
            call()
        except Exception as exc:
            STATE.errors.count(source_of(call), exc)


def configured_options() -> object:
    """The options asynctrace is installed with now; None when it is not installed."""
    return STATE.options


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    """Names of the dataclass fields that differ between ``old`` and ``new`` (nested too)."""
    if not (dataclasses.is_dataclass(old) and type(old) is type(new)):
        return [prefix.rstrip(".") or "options"] if old != new else []
    names = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            names += _differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            names.append(f"{prefix}{f.name} ({a!r} now, {b!r} asked for)")
    return names


def install_factory(
    loop: asyncio.AbstractEventLoop | None,
    *,
    options: object,
    make_instruments: Callable[[], tuple[Instrument, ...]],
    id_generator: Callable[[], str] | None,
    join: bool = False,
) -> Installation:
    """Install the factory on ``loop`` (None: process-wide), configured by ``options``.

    Where asynctrace is installed already with equal ``options`` (or with any, when ``join``
    is true: a bare ``install()``), the existing configuration is used and
    ``make_instruments`` is not called. A configuration whose every installation has ended
    (their loops closed) is dropped first. ``make_instruments`` runs with no lock held; if
    another thread configured asynctrace meanwhile, what it made is closed again.

    Raises:
        ValueError: asynctrace is installed with different options; the message names them.
    """
    _watch_forks()
    with STATE.lock:
        ended = _unconfigure_if_idle()
    _close(ended)
    built: tuple[Instrument, ...] | None = None
    discard: tuple[Instrument, ...] = ()
    try:
        while True:
            if built is None and STATE.options is None:
                built = make_instruments()
            with STATE.lock:
                if STATE.options is None:
                    if built is None:
                        continue  # uninstalled meanwhile: build, with the lock released
                    STATE.configure(options, Hooks(built), id_generator)
                    patch(report_pending)  # why tasks are cancelled (see _cancel_patch)
                    for instrument in built:  # their failures are served from 0
                        STATE.errors.declare(source_of(instrument.close))
                else:
                    discard = built or ()
                    if not join and options != STATE.options:
                        differ = "; ".join(_differences(STATE.options, options))
                        raise ValueError(
                            f"asynctrace is already installed with other options: {differ}; "
                            "call asynctrace.uninstall() first to install with new ones."
                        )
                installation, attached = _install_locked(loop)
                break
    finally:
        _close(discard)
    if attached and loop is not None:
        call_each(STATE.hooks.attached, STATE.errors, loop)
    return installation


def _install_locked(loop: asyncio.AbstractEventLoop | None) -> tuple[Installation, bool]:
    if loop is None:
        if _INSTALLED.process is not None:
            return _INSTALLED.process, False
        installation = Installation(None, None)
        installation._policy = _InstrumentingPolicy(_get_policy(), installation)
        _set_policy(installation._policy)
        _INSTALLED.process = installation
        STATE.cover_loop = _cover_loop
        return installation, False
    existing = installation_of(loop.get_task_factory())
    if existing is not None:
        return existing, False
    installation = Installation(loop, _INSTALLED.process)
    installation._attach()
    if _INSTALLED.process is not None:
        _INSTALLED.process._children.append(installation)
    _INSTALLED.loops.append(installation)
    return installation, True


_UNCOVERED: Final = {
    "policy": ("the event loop policy was replaced after asynctrace.install() (uvloop.install()?)"),
    "factory": (
        "it was made without the event loop policy (uvloop.run(), "
        "asyncio.Runner(loop_factory=...), a framework's own loop)"
    ),
}


def _cover_loop(loop: object) -> bool:
    """Instrument a running loop the process-wide installation does not cover; warn once.

    Such a loop bypassed the policy. asynctrace notices it at its first call inside it (the
    helper, ``correlation()``), instruments it with the process-wide options and adopts the
    running task; tasks created before that call have no metadata.
    """
    if not isinstance(loop, asyncio.AbstractEventLoop):
        return False
    with STATE.lock:
        process = _INSTALLED.process
        if process is None or loop.is_closed():
            return False
        if installation_of(loop.get_task_factory()) is not None:
            return True
        why = "policy" if _get_policy() is not process._policy else "factory"
        first = why not in _INSTALLED.warned
        _INSTALLED.warned.add(why)
    if _instrument_loop(loop, process) is None:
        return False  # uninstalled meanwhile
    if running_loop() is loop:
        adopt_current_task()
    if first:
        logger.warning(
            "asynctrace: the running loop %s had no asynctrace factory although asynctrace "
            "is installed process-wide: %s. It is instrumented from now on; tasks created "
            "in it before this call carry no metadata. Call asynctrace.install() after "
            "uvloop.install(), wrap the loop factory with asynctrace.loop_factory(), or call "
            "asynctrace.install() inside the loop. (Logged once.)",
            type(loop).__name__,
            _UNCOVERED[why],
        )
    return True


_FORK_HOOK: list[bool] = []


def _watch_forks() -> None:
    """Register the fork hook once per process (at the first install)."""
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        _FORK_HOOK.append(True)
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    """A forked child starts with nothing installed, and waits for nothing of the parent's.

    The policy and the factories of the loops the child inherited are put back (on the
    child's copies), each instrument's ``after_fork`` releases what the child inherited, and
    every count and lock starts fresh. Nothing is flushed: the parent exports its own data,
    and the child exits without waiting for threads that exist only in the parent.
    """
    instruments = STATE.hooks.instruments
    process, loops = _INSTALLED.process, list(_INSTALLED.loops)
    _INSTALLED.clear()
    STATE.start_fresh()
    unpatch()
    for installation in [*(process._children if process else ()), *loops]:
        loop = installation.loop
        if loop is not None and installation._factory is not None:
            installation._switch_back().run()  # the child's copy runs nowhere: switch here
            installation._forget()
    if process is not None and process._policy is not None and _get_policy() is process._policy:
        _set_policy(process._policy._inner)
    _call_on_each(instruments, "after_fork")


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
        correlation_id = new_correlation_id()
        if correlation_id is not None:
            _CORRELATION_ID.set(correlation_id)
    _METADATA.set(_make_metadata(None, correlation_id, None))


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running loop of this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def uninstall(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Remove asynctrace from ``loop`` (default: the running loop), or the process-wide one.

    Called outside any loop and without ``loop=``, removes the process-wide installation (and
    the factory from the loops it instrumented).

    Returns:
        True when something was uninstalled, False when nothing was installed there.

    Raises:
        RuntimeError: asynctrace's factory or policy was replaced since it was installed.

    Since: 0.1.0
    """
    if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"Invalid loop: {loop!r}; expected an asyncio event loop or None.")
    if loop is None:
        loop = running_loop()
    with STATE.lock:
        installation = _INSTALLED.process if loop is None else _installation_on(loop)
        ended = _unconfigure_if_idle() if installation is None else ()
    _close(ended)
    if installation is None:
        return False
    installation.uninstall()
    return True


def _installation_on(loop: asyncio.AbstractEventLoop) -> Installation | None:
    """The installation on ``loop``, even if its factory was replaced since."""
    found = installation_of(loop.get_task_factory())
    if found is not None:
        return found
    process = _INSTALLED.process
    candidates: list[Installation] = [*_INSTALLED.loops, *(process._children if process else ())]
    for installation in candidates:
        if installation.loop is loop and installation._factory is not None:
            return installation
    return None


def loop_factory(
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """Wrap a loop factory so the loops it makes are instrumented.

    For runners that take a ``loop_factory`` and so bypass the loop policy::

        asyncio.run(main(), loop_factory=asynctrace.loop_factory(uvloop.new_event_loop))

    Requires a process-wide :func:`install` first (its options apply).

    Args:
        factory: Makes the loop; by default ``asyncio.new_event_loop``.

    Returns:
        A callable making an instrumented loop.

    Since: 0.1.0
    """
    make = factory if factory is not None else asyncio.new_event_loop
    if not callable(make):
        raise TypeError(f"Invalid factory: {factory!r}; expected a callable returning a loop.")

    def instrumented_loop() -> asyncio.AbstractEventLoop:
        loop = make()
        parent = _INSTALLED.process
        if parent is None:
            loop.close()
            raise RuntimeError(
                "asynctrace.loop_factory() needs a process-wide asynctrace.install() first."
            )
        _instrument_loop(loop, parent)
        return loop

    return instrumented_loop


def reset() -> None:
    """Uninstall everything and forget all state, error counts included (for tests)."""
    switches: list[_Switch] = []
    with STATE.lock:
        process = _INSTALLED.process
        if process is not None:
            try:
                switches += _uninstall_process(process)
            except RuntimeError:  # someone replaced the policy: leave it, forget ours
                _INSTALLED.process = None
        for installation in list(_INSTALLED.loops):
            try:
                switches += installation._uninstall_loop()
            except RuntimeError:  # someone replaced the factory: leave it, forget ours
                installation._forget()
        _INSTALLED.loops.clear()
        _INSTALLED.warned.clear()
        closing = STATE.unconfigure()[1].instruments
        unpatch()
    for switch in switches:
        switch.apply()
    _close(closing)
    STATE.clear()
