"""The process-wide state the hot path reads, in one object with one reset.

The factory reads ``hooks`` and ``id_generator`` without a lock: each is replaced whole,
never mutated, which is safe with and without the GIL. Writers hold ``lock``, and never call
out (instruments, exporters, logging) while holding it.

The installations themselves (which loops, which policy) are bookkept by ``_install``, under
the same ``lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final, final

from asynctrace._errors import ErrorCounts
from asynctrace._hooks import Hooks

__all__ = ["STATE", "State"]


@final
class State:
    """The active configuration (hooks, id generator, options) and the telemetry error counts.

    Attributes:
        lock: Held by writers of this object and of the installation bookkeeping.
        hooks: The hook table of the active instruments (empty when nothing is installed).
        id_generator: Makes a task's correlation id where none is inherited; None: no id.
        options: What the active installation was configured with, compared on re-install;
            None when nothing is installed. The API layer decides its type.
        errors: Telemetry failures by source.
        cover_loop: While a process-wide installation exists: instruments a running loop it
            does not cover yet (one made without the policy), returning whether the loop now
            has asynctrace's factory. Set by ``_install``; asynctrace's calls inside a loop
            use it, so a loop that bypassed the policy is noticed at the first of them.
    """

    # Slots: the C factory reads ``hooks`` at their offset (``_speedups.c``, *Slots*).
    __slots__ = ("cover_loop", "errors", "hooks", "id_generator", "lock", "options")

    def __init__(self) -> None:
        """Start empty: nothing installed, nothing counted."""
        self.start_fresh()

    def start_fresh(self) -> None:
        """New locks, nothing configured, nothing counted.

        Also what a forked child does: another thread may have held a lock at the fork.
        """
        self.lock = threading.RLock()
        self.errors = ErrorCounts()
        self.clear()

    def clear(self) -> None:
        """Forget everything: no configuration, no error counts."""
        self.hooks = Hooks()
        self.id_generator: Callable[[], str] | None = None
        self.options: object = None
        self.cover_loop: Callable[[object], bool] | None = None
        self.errors.clear()

    def configure(
        self, options: object, hooks: Hooks, id_generator: Callable[[], str] | None
    ) -> None:
        """Make ``hooks`` and ``id_generator`` the active ones, configured by ``options``."""
        with self.lock:
            self.options = options
            self.id_generator = id_generator
            self.hooks = hooks

    def unconfigure(self) -> tuple[object, Hooks]:
        """Drop the configuration; return what it was (the caller closes its instruments)."""
        with self.lock:
            options, hooks = self.options, self.hooks
            self.options = None
            self.id_generator = None
            self.hooks = Hooks()
            return options, hooks


STATE: Final = State()
