"""All process-wide state of asynctrace, in one object with one reset."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, final

from asynctrace._instrument import TASK_HOOKS, Instrument, LeanInstrument, overrides

if TYPE_CHECKING:
    import asyncio

    from asynctrace._install import Installation
    from asynctrace._instrument import TaskRecord

    Hook = Callable[[asyncio.Task[Any], TaskRecord], None]

__all__ = ["STATE", "State", "instrument_source"]

logger: Final = logging.getLogger("asynctrace")


def instrument_source(instrument: object) -> str:
    """How telemetry errors name an instrument (a label value of the errors metric)."""
    return f"instrument {type(instrument).__name__}"


@final
class State:
    """The installation, the active instruments and the telemetry error counts.

    The hot path reads ``context_hooks``, ``created_hooks``, ``done_hooks``, ``lean`` and
    ``id_generator`` without a lock: they are replaced whole (tuples, a callable), never
    mutated, which is safe with and without the GIL. Writers hold ``lock``.
    """

    def __init__(self) -> None:
        """Start empty: nothing installed."""
        self.lock = threading.RLock()
        self.clear()

    def clear(self) -> None:
        """Forget everything: no installation, no instruments, no error counts."""
        self.process: Installation | None = None
        self.loop_installations: list[Installation] = []
        self.options: Any = None
        self.instruments: tuple[Instrument, ...] = ()
        self.context_hooks: tuple[Callable[[TaskRecord], None], ...] = ()
        self.created_hooks: tuple[Hook, ...] = ()
        self.done_hooks: tuple[Hook, ...] = ()
        self.lean: tuple[LeanInstrument, ...] = ()
        self.id_generator: Callable[[], str] | None = None
        self.errors: dict[str, int] = {}
        self.dropped_spans = 0
        self.telemetry: Any = None

    def set_instruments(self, instruments: tuple[Instrument, ...]) -> None:
        """Make ``instruments`` the active ones; only the hooks they override are called."""
        with self.lock:
            self.instruments = instruments
            self._rebuild_hooks()

    def _rebuild_hooks(self) -> None:
        self.context_hooks = tuple(
            i.task_context for i in self.instruments if overrides(i, "task_context")
        )
        self.created_hooks = tuple(
            i.task_created for i in self.instruments if overrides(i, "task_created")
        )
        self.done_hooks = tuple(i.task_done for i in self.instruments if overrides(i, "task_done"))
        observers = [i for i in self.instruments if any(overrides(i, h) for h in TASK_HOOKS)]
        lean = [i for i in observers if isinstance(i, LeanInstrument)]
        self.lean = tuple(lean) if len(lean) == len(observers) else ()

    def hook_failed(self, hook: Callable[..., None], exc: BaseException) -> None:
        """Disable the instrument ``hook`` belongs to, log that once and count it."""
        instrument = getattr(hook, "__self__", hook)
        with self.lock:
            self.instruments = tuple(i for i in self.instruments if i is not instrument)
            self._rebuild_hooks()
        self.count_error(instrument_source(instrument), exc)

    def count_error(self, source: str, exc: BaseException | None = None) -> None:
        """Count a telemetry failure from ``source``; log only the first one of each source."""
        with self.lock:
            seen = self.errors.get(source, 0)
            self.errors[source] = seen + 1
        if not seen:
            logger.error(
                "asynctrace: %s failed; telemetry from it is disabled or dropped, the "
                "application is not affected (further failures are counted, not logged)",
                source,
                exc_info=exc,
            )


STATE: Final = State()
