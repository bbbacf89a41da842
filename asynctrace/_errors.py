"""Telemetry failures: counted per source, logged the first time, then at most once a minute.

Every layer reports here (a hook that raised, an exporter that failed, an id generator that
returned garbage). Nothing here calls out while holding its lock: the count is taken under
the lock, the log line is written after it is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final, final

__all__ = ["LOG_EVERY_S", "ErrorCounts", "escape"]

logger: Final = logging.getLogger("asynctrace")

LOG_EVERY_S: Final = 60.0
"""After a source's first failure, how often at most its later failures are logged."""


def escape(text: object, limit: int = 200) -> str:
    """Free text (a task name, a header, a URL) made safe to put in a log line.

    Non-printable characters are written as escapes (a newline as a backslash and ``n``), so
    that text from outside can never start a forged log line; longer text is cut to
    ``limit``.
    """
    value = str(text)
    if not value.isprintable():
        value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return value if len(value) <= limit else value[:limit] + "..."


@final
class ErrorCounts:
    """How many times each source failed, with rate-limited logging."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, log_every: float = LOG_EVERY_S
    ) -> None:
        """Count with ``clock`` (seconds); log a source again after ``log_every`` s at most."""
        self._clock = clock
        self._log_every = log_every
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._logged_count: dict[str, int] = {}

    def count(self, source: str, exc: BaseException | None = None) -> None:
        """Count one failure of ``source``; log it when it is the first or a minute has passed."""
        now = self._clock()
        with self._lock:
            total = self._counts[source] = self._counts.get(source, 0) + 1
            last = self._logged_at.get(source)  # a declared source is not logged yet
            if last is not None and now - last < self._log_every:
                return
            unlogged = total - self._logged_count.get(source, 0)
            self._logged_at[source] = now
            self._logged_count[source] = total
        if last is None:
            logger.error(
                "asynctrace: %s failed; the application is not affected and telemetry goes on "
                "(later failures are counted, and logged at most every %.0f s)",
                escape(source),
                self._log_every,
                exc_info=exc,
            )
        else:
            logger.error(
                "asynctrace: %s failed %d more time(s) since it was last logged (%d in all); "
                "the latest: %s",
                escape(source),
                unlogged,
                total,
                type(exc).__qualname__ if exc is not None else "a failed result",
            )

    def declare(self, source: str) -> None:
        """Make ``source`` known, at 0 failures: served from 0, so a first failure shows."""
        with self._lock:
            self._counts.setdefault(source, 0)

    def snapshot(self, *, declared: bool = False) -> dict[str, int]:
        """A copy of the counts, by source; with ``declared``, the sources still at 0 too."""
        with self._lock:
            return {k: n for k, n in self._counts.items() if n or declared}

    def clear(self) -> None:
        """Forget every count (for tests)."""
        with self._lock:
            self._counts.clear()
            self._logged_at.clear()
            self._logged_count.clear()
