"""What one export pipeline handed on, delivered and dropped (pure Python, no imports)."""

from __future__ import annotations

import threading
from typing import final

__all__ = ["SpanDrops"]


@final
class SpanDrops:
    """Counts of one export pipeline: spans handed on, spans at the exporter, spans dropped."""

    __slots__ = ("_lock", "closed", "dropped", "handed", "reached")

    def __init__(self) -> None:
        """Start at zero."""
        self._lock = threading.Lock()
        self.handed = 0
        self.reached = 0
        self.dropped = 0
        self.closed = False

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
            return True

    def drop(self, count: int) -> None:
        """``count`` spans were dropped (a failed export)."""
        with self._lock:
            self.dropped += count

    def close(self) -> int:
        """No more exports: count every span handed on that never reached the exporter.

        Returns how many that was. Batches the export thread takes from its queue later
        are refused (``arrive`` returns False), since they are counted here.
        """
        with self._lock:
            waiting = 0 if self.closed else self.handed - self.reached
            self.closed = True
            self.dropped += waiting
            self.reached = self.handed
            return waiting

    def total_dropped(self) -> int:
        """Spans dropped so far."""
        return self.dropped
