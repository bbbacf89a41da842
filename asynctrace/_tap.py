"""Exact task end times: the loop's ``call_soon`` tapped while asynctrace instruments it.

A done callback normally runs when the loop gets to it, behind every callback already queued:
under load that is milliseconds after the task ended, and the duration lands in the wrong
histogram bucket. asyncio's futures schedule their done callbacks through
``loop.call_soon``, looked up on the loop object at every call, so a :class:`Tap` set as the
loop instance's ``call_soon`` sees the callback the moment the task is done and runs
asynctrace's completion marker there (see ``_speedups_py.Tap``); every other call goes,
unchanged, to the loop's own ``call_soon``.

This relies on how CPython's (and uvloop's) futures find ``call_soon``, so :func:`tap` checks
it on each loop with a probe future and leaves the loop alone when the probe does not reach
the tap: asynctrace then records ends from the done callback's turn, as before.
With the C extension the tap is on by default: it costs a type check per ``call_soon``. The
pure-Python twin's tap adds a Python frame to every ``call_soon`` of the loop, which costs
more than the ``Handle`` it saves (bench: fan-out 2.03x against 1.85x on 3.11), so without
the extension ends are taken from the callback's turn unless ``ASYNCTRACE_TAP=1`` asks for
exact ends anyway. ``ASYNCTRACE_TAP=0`` turns the tap off.

The tap also runs the batched check (``_speedups.c``, *The batched check*): a task awaited
by something that never removes its done callback (an awaiting task, ``gather``, a
``TaskGroup``) gets no callback of asynctrace's; the tap takes its end from that callback's
scheduling. :func:`kept_callbacks` names those callbacks; ``ASYNCTRACE_BATCH_CHECK=0`` turns
the check off (asynctrace's callback on every task, as before).

The loop's instance dict is never read (``vars(loop)``, ``loop.__dict__``): on CPython 3.11
and 3.14 (3.13 keeps its inline values; 3.12 not measured) that turns the loop's attribute
storage into a dictionary for good, and the
interpreter's specialised attribute reads of asyncio's own loop code (``self._ready``,
``self._closed``, ``self._task_factory`` ...) stop working for that loop: measured on the
queue workload, 30 generic attribute lookups more per task, about 10% of its CPU. An
attribute set with ``setattr`` keeps the specialisations; a Tap or ``_Closing`` found by
``getattr`` can only be the instance's (asynctrace never puts one on a class).
"""

from __future__ import annotations

import asyncio
import os
from types import CodeType, FunctionType
from typing import Final

from asynctrace._factory import MARKERS, TapProbe
from asynctrace._native import IMPLEMENTATION, Tap

__all__ = ["BATCH_ENV", "TAP_ENV", "enabled", "is_tapped", "kept_callbacks", "tap", "untap"]

TAP_ENV: Final = "ASYNCTRACE_TAP"
BATCH_ENV: Final = "ASYNCTRACE_BATCH_CHECK"


def kept_callbacks() -> tuple[object, ...]:
    """The done callbacks asyncio never removes from the task they wait for, as they are now.

    ``gather``'s (its inner ``_done_callback``: the code object, one per call's closure) and
    ``TaskGroup._on_task_done`` (the function under each bound method: asynctrace's
    cancellation patch's when it is on, and the one it wraps). An awaiting task's wakeup is a
    C function found by its name. ``asyncio.wait``, ``wait_for``, ``as_completed`` and
    ``shield`` remove theirs (on a timeout or a cancellation): not here. A callback not
    named (someone's wrapper) only means asynctrace adds its own, as without the check.
    """
    kept: list[object] = [
        const
        for const in asyncio.gather.__code__.co_consts
        if isinstance(const, CodeType) and const.co_name == "_done_callback"
    ]
    on_task_done = getattr(asyncio.TaskGroup, "_on_task_done", None)
    while isinstance(on_task_done, FunctionType):
        kept.append(on_task_done)
        on_task_done = getattr(on_task_done, "__asynctrace_original__", None)
    return tuple(kept)


def _kept() -> tuple[object, ...] | None:
    """The tap's ``kept``: None (no batched check) when ``ASYNCTRACE_BATCH_CHECK=0``."""
    return None if os.environ.get(BATCH_ENV, "").strip() == "0" else kept_callbacks()


def enabled() -> bool:
    """Whether loops get the tap: ``ASYNCTRACE_TAP`` (0 or 1), else with the C extension."""
    setting = os.environ.get(TAP_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return IMPLEMENTATION == "c"


def tap(loop: asyncio.AbstractEventLoop) -> bool:
    """Tap ``loop``'s ``call_soon``; True when its futures reach the tap (else left as it was)."""
    if not enabled():
        return False
    if is_tapped(loop):
        return True  # tapped already (an earlier installation on this loop)
    try:
        loop.call_soon = Tap(loop.call_soon, MARKERS, kept=_kept())  # type: ignore[method-assign]
    except (AttributeError, TypeError):
        return False  # no instance attributes, a read-only or slotted call_soon
    if _reaches_tap(loop):
        return True
    untap(loop)
    return False


def untap(loop: asyncio.AbstractEventLoop) -> None:
    """Put back the ``call_soon`` :func:`tap` replaced (nothing if the loop is not tapped)."""
    current = getattr(loop, "call_soon", None)
    if not isinstance(current, Tap):
        return
    original = current.call_soon
    if getattr(original, "__self__", None) is loop and getattr(
        original, "__func__", None
    ) is getattr(type(loop), "call_soon", None):
        del loop.call_soon  # the class's own method: nothing was set on the instance before
    else:
        # Someone's own, set on the instance before ours: theirs again.
        loop.call_soon = original  # type: ignore[method-assign]


def is_tapped(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop``'s ``call_soon`` is asynctrace's tap.

    Asked with ``getattr``, never ``vars(loop)`` (see the module's header).
    """
    return isinstance(getattr(loop, "call_soon", None), Tap)


def _reaches_tap(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a done callback of one of ``loop``'s futures goes through the tap."""
    probe = TapProbe()
    try:
        future = loop.create_future()
        future.add_done_callback(probe)
        future.set_result(None)
    except Exception:
        return False
    return probe.marked
