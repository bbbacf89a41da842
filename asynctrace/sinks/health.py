"""Task health: stuck tasks (pending past an age threshold) and where tasks were created.

:class:`StuckWatch` walks each instrumented loop's tasks every ``interval`` seconds, on the
loop's own thread and in slices (``_introspect.walk_tasks``), so it never holds the loop for
long. A task pending longer than its operation's ``stuck_after`` is counted in the
``asynctrace_tasks_stuck`` gauge while it stays pending, logged once (its ids, age, creation
site when known, and where it waits), and its span gets an ``asynctrace.stuck`` event (the
``task_stuck`` hook). Off by default: no walk, no cost.

:class:`CreationSites` notes where each task was created (file:line of the first frame
outside asyncio and asynctrace) on its record. It keeps a record per task, so it costs on
every task: on only when asked for (``install(creation_sites=True)``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, final

from asynctrace._factory import Starts
from asynctrace._hooks import Hooks, Instrument, call_each
from asynctrace._introspect import (
    lean_starts,
    started_of,
    task_metadata,
    task_record,
    walk_tasks,
)
from asynctrace._metadata import TaskMetadata
from asynctrace._record import TaskRecord
from asynctrace._state import STATE

__all__ = [
    "CreationSites",
    "StuckAfter",
    "StuckWatch",
    "await_stack",
    "parse_stuck_after",
]

logger: Final = logging.getLogger("asynctrace")

StuckAfter = tuple[tuple[str, float], ...]
"""``stuck_after`` normalized: (operation, seconds) pairs; ``"*"`` is every other operation."""
ANY_OPERATION: Final = "*"
_MAX_S: Final = 30 * 86400.0


def parse_stuck_after(value: object) -> StuckAfter:
    """Normalize ``install(stuck_after=...)``: None, seconds, or a mapping per operation.

    Raises:
        TypeError, ValueError: naming the value and what is accepted.
    """
    accepted = (
        "expected None, seconds (a positive number), or a mapping of operation names "
        f"(or {ANY_OPERATION!r} for the rest) to seconds"
    )
    if value is None:
        return ()
    items: list[tuple[object, object]]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        items = [(ANY_OPERATION, value)]
    else:
        raise TypeError(f"Invalid stuck_after: {value!r}; {accepted}.")
    out = []
    for op, seconds in items:
        if not isinstance(op, str) or not op:
            raise TypeError(f"Invalid stuck_after key: {op!r}; {accepted}.")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise TypeError(f"Invalid stuck_after[{op!r}]: {seconds!r}; {accepted}.")
        if not (math.isfinite(seconds) and 0 < seconds <= _MAX_S):
            raise ValueError(
                f"Invalid stuck_after[{op!r}]: {seconds!r}; expected more than 0 and at "
                f"most {_MAX_S:.0f} seconds."
            )
        out.append((op, float(seconds)))
    return tuple(sorted(out))


_HERE: Final = str(Path(__file__).resolve().parent.parent)
_ASYNCIO: Final = str(Path(asyncio.__file__).resolve().parent)


def _caller_site() -> str | None:
    """file:line of the first frame outside asyncio and asynctrace (the creating code)."""
    frame: Any = sys._getframe(2)  # our caller's caller at least
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith((_HERE, _ASYNCIO)):
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


@final
class CreationSites(Instrument):
    """Notes where each task was created (``install(creation_sites=True)``)."""

    def task_context(self, record: TaskRecord) -> None:
        """Note the creating frame (the task does not exist yet; its record does)."""
        record.site = _caller_site()


def await_stack(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: 3.14's call graph (who awaits whom), else its stack."""
    format_call_graph = getattr(asyncio, "format_call_graph", None)
    if format_call_graph is not None:
        return str(format_call_graph(task))
    out = io.StringIO()
    task.print_stack(limit=20, file=out)
    return out.getvalue().rstrip()


class _LoopState:
    __slots__ = ("counting", "reported", "stuck")

    def __init__(self) -> None:
        self.stuck: dict[str, int] = {}  # by operation label, from the last full walk
        self.counting: dict[str, int] = {}  # the walk under way
        self.reported: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


@final
class StuckWatch(Instrument):
    """Finds tasks pending longer than their ``stuck_after``: a gauge, a log, a span event."""

    def __init__(self, stuck_after: StuckAfter, label: Any = None) -> None:  # noqa: ANN401
        """Watch with ``stuck_after`` (see :func:`parse_stuck_after`).

        ``label`` maps an operation name to its metric label (bounded cardinality); by
        default the name itself, ``"unnamed"`` for None.
        """
        self._thresholds = dict(stuck_after)
        self._default = self._thresholds.pop(ANY_OPERATION, None)
        self.interval = max(0.05, min(5.0, min(dict(stuck_after).values()) / 4))
        self._label = label if label is not None else (lambda op: op or "unnamed")
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._closed = False

    def threshold(self, operation: str | None) -> float | None:
        """The ``stuck_after`` seconds of ``operation`` (None: not watched)."""
        if operation is not None and operation in self._thresholds:
            return self._thresholds[operation]
        return self._default

    def stuck_now(self) -> dict[str, int]:
        """Tasks stuck now, by operation label, over every watched loop."""
        with self._lock:
            states = [s for loop, s in list(self._loops.items()) if not loop.is_closed()]
        total: dict[str, int] = {}
        for state in states:
            for op, n in list(state.stuck.items()):
                total[op] = total.get(op, 0) + n
        return total

    def loop_attached(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching ``loop`` (its first walk after ``interval``)."""
        with self._lock:
            if loop in self._loops:
                return
            self._loops[loop] = _LoopState()
        loop.call_soon_threadsafe(self._schedule, loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._closed and not loop.is_closed():
            loop.call_later(self.interval, self._walk, loop)

    def _walk(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self._loops.get(loop)
        if state is None or self._closed:
            return
        starts = lean_starts(loop)
        now_ns = time.perf_counter_ns()
        hooks = STATE.hooks
        state.counting = {}

        def visit(task: asyncio.Task[Any]) -> None:
            if task.done():
                return
            self._check(task, state, now_ns, starts, hooks)

        def done() -> None:
            # Operations stuck before and not now read 0 (not absent): alerts resolve.
            state.stuck = {**dict.fromkeys(state.stuck, 0), **state.counting}
            self._schedule(loop)

        def failed(exc: BaseException) -> None:
            STATE.errors.count("stuck-task watch", exc)
            self._schedule(loop)

        walk_tasks(loop, visit, done, failed)

    def _check(
        self,
        task: asyncio.Task[Any],
        state: _LoopState,
        now_ns: int,
        starts: Starts | None,
        hooks: Hooks,
    ) -> None:
        metadata = task_metadata(task)
        if metadata is None:
            return  # not made by asynctrace's factory
        limit = self.threshold(metadata.operation_name)
        if limit is None:
            return
        record = task_record(task)
        created, trace_id = started_of(task, record, starts)
        if created is None:
            return
        age = (now_ns - created) / 1e9
        if age < limit:
            return
        op = self._label(metadata.operation_name)
        state.counting[op] = state.counting.get(op, 0) + 1
        if task in state.reported:
            return
        state.reported.add(task)
        self._report(task, metadata, record, age, limit, trace_id_int=trace_id)
        call_each(hooks.stuck, STATE.errors, task, metadata, age)

    def _report(
        self,
        task: asyncio.Task[Any],
        metadata: TaskMetadata,
        record: TaskRecord | None,
        age: float,
        limit: float,
        *,
        trace_id_int: int,
    ) -> None:
        site = record.site if record is not None else None
        trace_id = f"{trace_id_int:032x}" if trace_id_int else None
        logger.warning(
            "Task %s stuck: pending for %.1f s (stuck_after %.1f s; operation=%s, "
            "correlation_id=%s, trace_id=%s%s)\n%s",
            task.get_name(),
            age,
            limit,
            metadata.operation_name,
            metadata.correlation_id,
            trace_id,
            f", created at {site}" if site else "",
            await_stack(task),
            extra={
                "operation": metadata.operation_name,
                "correlation_id": metadata.correlation_id,
                "trace_id": trace_id,
                "task_age_s": age,
            },
        )

    def close(self) -> None:
        """Stop walking (each loop's next turn ends its watch)."""
        self._closed = True

    def after_fork(self) -> None:
        """In a forked child: stop walking the loops it inherited (nothing is installed there)."""
        self._closed = True
