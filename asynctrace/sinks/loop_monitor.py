"""Event-loop lag and blocked-loop episodes, by heartbeat (works the same under uvloop).

Each instrumented loop runs a timer every ``interval``: how late it fires is the loop's lag.
A watchdog thread notices a heartbeat that is overdue by more than ``threshold`` while it is
still overdue (it sleeps until the earliest heartbeat is due, and looks then): that is a loop
blocked now. The watchdog counts the episode under the operation of the task running at that
moment (``asyncio.current_task(loop)``) and logs the loop thread's stack, so you can see what
the loop is stuck on. Nothing in asyncio is patched.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Final, final

from asynctrace._errors import escape
from asynctrace._hooks import Instrument
from asynctrace._introspect import task_metadata
from asynctrace.sinks.task_metrics import TaskMetrics

__all__ = ["LoopMonitor"]

logger: Final = logging.getLogger("asynctrace")
_STACK_LOG_EVERY_S: Final = 5.0  # a stuck loop logs its stack at most this often
_WAKE_SLACK_S: Final = 0.001  # the watchdog wakes this long after a heartbeat is due


@final
class _Watched:
    __slots__ = ("due", "flagged", "loop", "thread_id")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.due = 0.0  # time.monotonic() by which the next heartbeat should have run
        self.thread_id = 0
        self.flagged = False


def _open(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and not loop.is_closed()


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread where allowed; a plain one in an isolated subinterpreter.

    Python 3.14's isolated interpreters refuse daemon threads. The watchdog ends by itself
    once every loop it watches has closed, so nothing waits for it when the interpreter
    ends (a running loop keeps it, as it keeps its own thread).
    """
    try:
        thread = threading.Thread(target=target, name=name, daemon=True)
    except RuntimeError:  # "daemon threads are disabled in this (sub)interpreter"
        thread = threading.Thread(target=target, name=name, daemon=False)
    thread.start()
    return thread


@final
class LoopMonitor(Instrument):
    """Heartbeats on every instrumented loop, plus one watchdog thread for blocked loops."""

    def __init__(
        self, metrics: TaskMetrics, interval: float = 0.25, threshold: float = 0.1
    ) -> None:
        """Beat every ``interval`` s; a loop late by more than ``threshold`` s is blocked."""
        self._metrics = metrics
        self._interval = interval
        self._threshold = threshold
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stack_log = 0.0

    def blocked_for(self) -> float:
        """How long the longest-blocked loop has been blocked now, in seconds (0: none is).

        Read at scrape time, from another thread: a hung loop shows here while it is hung,
        before any heartbeat can run to count it.
        """
        now = time.monotonic()
        with self._lock:
            watched = list(self._watched)
        worst = 0.0
        for w in watched:
            loop = w.loop()
            if loop is not None and w.due and loop.is_running():
                # due = the last beat + interval + threshold; blocked since it should have run
                worst = max(worst, now - (w.due - self._threshold))
        return worst if worst > self._threshold else 0.0

    def loop_attached(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the heartbeat on ``loop`` and make sure the watchdog runs."""
        watched = _Watched(loop)
        with self._lock:
            self._watched.append(watched)
            if self._thread is None:
                self._thread = _start_thread(self._watch, "asynctrace-watchdog")
        watched.due = time.monotonic() + self._interval + self._threshold
        loop.call_soon_threadsafe(self._beat, watched, None)

    def _beat(self, watched: _Watched, expected: float | None) -> None:
        loop = watched.loop()
        if loop is None or self._stop.is_set():
            return
        now = loop.time()
        if expected is not None:
            lag = max(0.0, now - expected)
            self._metrics.observe_lag(lag)
            if lag > self._threshold and not watched.flagged:
                # Blocked, but shorter than the watchdog could see: count it, task unknown.
                self._metrics.count_blocked(None)
        watched.flagged = False
        watched.thread_id = threading.get_ident()
        watched.due = time.monotonic() + self._interval + self._threshold
        loop.call_at(now + self._interval, self._beat, watched, now + self._interval)

    def _watch(self) -> None:
        # Wakes when the earliest heartbeat is due, not at a fixed short period: a thread
        # that wakes often costs the loop's thread even when it does nothing. It asks for
        # the GIL, which the loop releases and takes back around every select(); until the
        # interpreter makes it switch (5 ms) each such release wakes the waiting thread for
        # nothing. Waking every 50 ms cost 11% of the CPU of a queue of one-at-a-time
        # awaits (10.2 against 11.8 µs a task, 3.11); waking at the heartbeat's pace (4 a
        # second by default) costs nothing measurable (docs/performance.md).
        while True:
            now = time.monotonic()
            with self._lock:
                self._watched = [w for w in self._watched if _open(w.loop())]
                watched = list(self._watched)
                if not watched:  # every loop closed: end; the next loop attached starts anew
                    self._thread = None
                    return
            wake = now + self._interval + self._threshold  # a loop attached later is due then
            for w in watched:
                loop = w.loop()
                if loop is None or w.flagged or not loop.is_running():
                    continue
                if now > w.due:
                    w.flagged = True
                    self._blocked(loop, w, now - w.due + self._threshold)
                else:
                    wake = min(wake, w.due)
            if self._stop.wait(max(wake - now, 0.0) + _WAKE_SLACK_S):
                return

    def _blocked(self, loop: asyncio.AbstractEventLoop, w: _Watched, late: float) -> None:
        try:
            task = asyncio.current_task(loop)
        except RuntimeError:  # pragma: no cover - the loop stopped meanwhile
            task = None
        meta = task_metadata(task) if task is not None else None
        operation = meta.operation_name if meta is not None else None
        self._metrics.count_blocked(operation)
        now = time.monotonic()
        if now - self._last_stack_log < _STACK_LOG_EVERY_S:
            return
        self._last_stack_log = now
        frame = sys._current_frames().get(w.thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        logger.warning(
            "asynctrace: event loop blocked for more than %.3f s in task %s (operation %s, "
            "correlation_id %s); the loop thread is at:\n%s",
            late,
            escape(task.get_name()) if task is not None else "(none)",
            escape(operation),
            escape(meta.correlation_id) if meta is not None else None,
            stack,
        )

    def after_fork(self) -> None:
        """In a forked child: the watchdog thread was the parent's; stop the heartbeats."""
        self._stop.set()
        self._thread = None

    def close(self) -> None:
        """Stop the heartbeats and the watchdog thread."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
