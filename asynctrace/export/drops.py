"""What one export pipeline handed on, delivered and dropped (pure Python)."""

from __future__ import annotations

import threading
from typing import Protocol, final

__all__ = ["SpanDrops"]


class _Door(Protocol):
    """Where spans enter a pipeline that counts them itself (``_native.LaneQueue``)."""

    @property
    def handed(self) -> int: ...
    @property
    def refused(self) -> int: ...
    def close(self) -> None: ...


@final
class SpanDrops:
    """Counts of one export pipeline: spans handed on, spans at the exporter, spans dropped."""

    __slots__ = ("_door", "_lock", "closed", "dropped", "handed", "in_flight", "reached")

    def __init__(self) -> None:
        """Start at zero."""
        self._lock = threading.Lock()
        self.handed = 0
        self.reached = 0
        self.in_flight = 0  # reached the exporter, its export not finished yet
        self.dropped = 0
        self.closed = False
        self._door: _Door | None = None

    def through(self, door: _Door) -> None:
        """Spans enter through ``door`` (a ``LaneQueue``), which counts them itself.

        It counts the spans it queues and those it refuses; :meth:`admit` and :meth:`drop`
        are not called then. Once only.
        """
        if self._door is not None:
            msg = f"SpanDrops.through: spans already enter through {self._door!r}"
            raise ValueError(msg)
        self._door = door

    def _handed(self) -> int:
        door = self._door
        return self.handed if door is None else self.handed + door.handed

    def admit(self, limit: int) -> bool:
        """Count one span handed on, unless ``limit`` are waiting already: then one dropped."""
        with self._lock:
            if self.handed - self.reached >= limit:
                self.dropped += 1
                return False
            self.handed += 1
            return True

    def arrive(self, count: int) -> bool:
        """``count`` spans reach the exporter; False once closed (they were counted then)."""
        with self._lock:
            if self.closed:
                return False
            self.reached += count
            self.in_flight += count
            return True

    def settle(self, count: int, *, exported: bool) -> None:
        """The export of ``count`` spans ended; failed ones are dropped (unless written off)."""
        with self._lock:
            self.in_flight -= count
            if not exported and not self.closed:
                self.dropped += count

    def drop(self, count: int) -> None:
        """``count`` spans were dropped before reaching the exporter."""
        with self._lock:
            self.dropped += count

    def close(self) -> int:
        """No more exports: count every span not exported by now as dropped; how many.

        That is the spans still waiting, and those in an export still under way (the
        process may end before it does: they are not confirmed, so they count; should that
        export still succeed, they stay counted). Batches the export thread takes later are
        refused (``arrive`` returns False), and nothing settled later is counted again.
        """
        if self._door is not None:
            self._door.close()  # it refuses from now on: the spans it queued are final
        with self._lock:
            if self.closed:
                return 0
            handed = self._handed()
            lost = handed - self.reached + self.in_flight
            self.closed = True
            self.dropped += lost
            self.reached = handed
            return lost

    def pending(self) -> int:
        """Spans handed on and not yet settled (waiting, or in an export under way)."""
        with self._lock:
            return 0 if self.closed else self._handed() - self.reached + self.in_flight

    def total_dropped(self) -> int:
        """Spans dropped so far."""
        door = self._door
        return self.dropped if door is None else self.dropped + door.refused
