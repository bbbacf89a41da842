"""What one export pipeline handed on, delivered and dropped (pure Python, no imports)."""

from __future__ import annotations

import threading
from typing import final

__all__ = ["SpanDrops"]


@final
class SpanDrops:
    """Counts of one export pipeline: spans handed on, spans at the exporter, spans dropped."""

    __slots__ = ("_lock", "dropped", "handed", "reached")

    def __init__(self) -> None:
        """Start at zero."""
        self._lock = threading.Lock()
        self.handed = 0
        self.reached = 0
        self.dropped = 0

    def admit(self, limit: int) -> bool:
        """Count one span handed on, unless ``limit`` are waiting already: then one dropped."""
        with self._lock:
            if self.handed - self.reached >= limit:
                self.dropped += 1
                return False
            self.handed += 1
            return True

    def arrive(self, count: int) -> None:
        """``count`` spans reached the exporter."""
        with self._lock:
            self.reached += count

    def drop(self, count: int) -> None:
        """``count`` spans were dropped (a failed export)."""
        with self._lock:
            self.dropped += count

    def drop_waiting(self) -> None:
        """Count every span handed on that never reached the exporter as dropped."""
        with self._lock:
            self.dropped += self.handed - self.reached
            self.reached = self.handed

    def total_dropped(self) -> int:
        """Spans dropped so far."""
        return self.dropped
