"""Task metrics, counted: durations, created and in-flight tasks, loop lag, blocked loops.

The hot path only counts: each thread keeps its own shard of plain counters (no lock, safe
without the GIL), folded when someone reads them (a Prometheus scrape through
``sinks.prometheus``, or :func:`asynctrace.summary`). In-flight tasks are derived
(created - finished), so they cost nothing per task. Pure Python: nothing here imports
prometheus_client.

Labels are bounded: ``operation`` (capped at ``max_operations`` distinct values, the rest
reported as ``_other``; tasks without one as ``unnamed``) and ``outcome``. Correlation ids
never become labels.
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Final, final

from asynctrace._cancel import Cancellation
from asynctrace._hooks import LeanInstrument
from asynctrace._metadata import TaskMetadata
from asynctrace._native import Counts
from asynctrace._record import Outcome

__all__ = [
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "OTHER_OPERATION",
    "UNNAMED_OPERATION",
    "Folded",
    "OperationLabels",
    "OperationStats",
    "Series",
    "TaskMetrics",
]

# 50 µs to 5 min: from a tiny fan-out task to a long batch job.
DURATION_BUCKETS: Final = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
LAG_BUCKETS: Final = (
    100e-6, 500e-6, 1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
UNNAMED_OPERATION: Final = "unnamed"
OTHER_OPERATION: Final = "_other"


@final
class Series:
    """One histogram series (operation, outcome): counts per bucket, sum, last exemplars."""

    __slots__ = ("counts", "exemplars", "sum_ns")

    def __init__(self, size: int) -> None:
        """Start with ``size`` empty buckets."""
        self.counts = [0] * size
        self.sum_ns = 0
        self.exemplars: list[tuple[int, int, int, float] | None] | None = None


_NO_NAME: Final = object()


@final
class _Shard:
    """What one thread counted. Only its own thread writes it."""

    __slots__ = (
        "blocked",
        "cancelled",
        "destroyed",
        "lag",
        "last_label",
        "last_metadata",
        "last_name",
        "never_retrieved",
        "pending_at_close",
        "series",
    )

    def __init__(self) -> None:
        self.last_metadata: object = None
        self.last_name: object = _NO_NAME
        self.last_label = ""
        self.destroyed: dict[str, int] = {}
        self.never_retrieved: dict[str, int] = {}
        self.pending_at_close: dict[str, int] = {}
        self.cancelled: dict[tuple[str, str], int] = {}  # (operation, reason)
        self.series: dict[tuple[str, str], Series] = {}
        self.lag = Series(len(LAG_BUCKETS) + 1)
        self.blocked: dict[str, int] = {}


@final
class OperationLabels:
    """The ``operation`` label of a task: at most ``max_operations`` values, then ``_other``.

    Tasks without an operation are ``unnamed``. Safe from any thread.
    """

    __slots__ = ("_lock", "_max", "_seen")

    def __init__(self, max_operations: int) -> None:
        """Admit the first ``max_operations`` distinct operation names."""
        self._max = max_operations
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def label(self, operation_name: str | None) -> str:
        """The label value for ``operation_name``."""
        if operation_name is None:
            return UNNAMED_OPERATION
        if operation_name in self._seen:
            return operation_name
        with self._lock:
            if len(self._seen) < self._max:
                self._seen.add(operation_name)
                return operation_name
        return OTHER_OPERATION


@final
@dataclass(slots=True)
class Folded:
    """What the shards counted, summed: by operation (and outcome, for durations)."""

    lag: Series
    created: dict[str, int] = field(default_factory=dict)
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    blocked: dict[str, int] = field(default_factory=dict)
    destroyed: dict[str, int] = field(default_factory=dict)
    never_retrieved: dict[str, int] = field(default_factory=dict)
    pending_at_close: dict[str, int] = field(default_factory=dict)
    cancelled: dict[tuple[str, str], int] = field(default_factory=dict)


@final
class OperationStats:
    """Per-operation totals, as :func:`asynctrace.summary` shows them."""

    __slots__ = ("bounds", "buckets", "cancelled", "count", "errors", "operation", "sum_s")

    def __init__(self, operation: str, bounds: tuple[float, ...]) -> None:
        """Start empty for ``operation`` with histogram ``bounds`` (seconds)."""
        self.operation = operation
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.errors = 0
        self.cancelled = 0
        self.sum_s = 0.0

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile the way PromQL's histogram_quantile does (interpolated)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if seen + n >= rank and n:
                lower = self.bounds[i - 1] if i else 0.0
                if i == len(self.bounds):  # the +Inf bucket: report its lower bound
                    return lower
                return lower + (self.bounds[i] - lower) * (rank - seen) / n
            seen += n
        return self.bounds[-1]


def _add(into: dict[Any, int], counts: dict[Any, int]) -> None:
    """Add another thread's ``counts`` (copied first: that thread may be adding to it)."""
    for key, n in list(counts.items()):
        into[key] = into.get(key, 0) + n


@final
class TaskMetrics(LeanInstrument):
    """Counts tasks into per-thread shards, folded on demand."""

    def __init__(self, max_operations: int = 100) -> None:
        """Count up to ``max_operations`` distinct operations; the rest as ``_other``."""
        self._bounds_ns = [round(b * 1e9) for b in DURATION_BUCKETS]
        self._lag_bounds_ns = [round(b * 1e9) for b in LAG_BUCKETS]
        self._size = len(DURATION_BUCKETS) + 1
        self._labels = OperationLabels(max_operations)
        self._lock = threading.Lock()
        self._shards: list[_Shard] = []
        self._local = threading.local()
        # The lean path's hooks are the counters' own methods (C with the extension): a task
        # is counted, and a traced task's exemplar kept, without running Python code.
        self._counts = Counts(tuple(self._bounds_ns), self.label)
        self.task_started = self._counts.started  # type: ignore[method-assign]
        self.task_finished = self._counts.finished  # type: ignore[method-assign]
        self.task_exemplar = self._counts.exemplar  # type: ignore[method-assign]

    def _shard(self) -> _Shard:
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = _Shard()
            self._local.shard = shard
            with self._lock:
                self._shards.append(shard)
        return shard

    def label(self, operation_name: str | None) -> str:
        """The ``operation`` label value for ``operation_name`` (bounded cardinality)."""
        return self._labels.label(operation_name)

    def _shard_and_label(self, metadata: TaskMetadata) -> tuple[_Shard, str]:
        """This thread's shard, and the ``operation`` label of a task with ``metadata``."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        if metadata is shard.last_metadata:  # siblings of a fan-out share their metadata
            return shard, shard.last_label
        shard.last_metadata = metadata
        name = metadata.operation_name
        if name is shard.last_name:  # the same operation (the same str) as the last task
            return shard, shard.last_label
        shard.last_name = name
        op = shard.last_label = self.label(name)
        return shard, op

    def task_started(self, metadata: TaskMetadata) -> None:
        """Count a created task (the counters' own method is the hook: see ``__init__``)."""
        self._counts.started(metadata)

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Put the task's duration in its (operation, outcome) histogram (likewise)."""
        self._counts.finished(metadata, outcome, duration_ns)

    def task_exemplar(
        self,
        metadata: TaskMetadata,
        outcome: Outcome,
        duration_ns: int,
        trace_id: int,
        span_id: int,
    ) -> None:
        """A traced task's span ids become its bucket's exemplar (the task is counted already).

        Kept by the counters (``Counts.exemplar``, the hook itself: see ``__init__``).
        """
        self._counts.exemplar(metadata, outcome, duration_ns, trace_id, span_id)

    def observe_lag(self, lag_s: float) -> None:
        """Record one heartbeat's lag (called on the loop's thread)."""
        lag = self._shard().lag
        ns = max(0, round(lag_s * 1e9))
        lag.counts[bisect_left(self._lag_bounds_ns, ns)] += 1
        lag.sum_ns += ns

    def task_destroyed(self, task: asyncio.Future[Any], metadata: TaskMetadata) -> None:  # noqa: ARG002
        """Count a task destroyed while pending: no longer in flight, never finished."""
        shard, op = self._shard_and_label(metadata)
        destroyed = shard.destroyed
        destroyed[op] = destroyed.get(op, 0) + 1

    def task_never_retrieved(self, task: asyncio.Future[Any], metadata: TaskMetadata) -> None:  # noqa: ARG002
        """Count a task whose exception nobody retrieved."""
        shard, op = self._shard_and_label(metadata)
        lost = shard.never_retrieved
        lost[op] = lost.get(op, 0) + 1

    def task_cancelled(self, metadata: TaskMetadata, cancellation: Cancellation) -> None:
        """Count a cancellation by (operation, reason)."""
        shard, op = self._shard_and_label(metadata)
        key = (op, cancellation.reason)
        shard.cancelled[key] = shard.cancelled.get(key, 0) + 1

    def tasks_pending_at_close(
        self,
        loop: asyncio.AbstractEventLoop,  # noqa: ARG002
        pending: list[tuple[asyncio.Task[Any], TaskMetadata]],
        when: str,  # noqa: ARG002
    ) -> None:
        """Count the tasks still pending when a loop closed or ``asyncio.run`` ended."""
        for _, metadata in pending:
            shard, op = self._shard_and_label(metadata)
            shard.pending_at_close[op] = shard.pending_at_close.get(op, 0) + 1

    def count_blocked(self, operation_name: str | None) -> None:
        """Count one blocked-loop episode (any thread)."""
        op = self.label(operation_name) if operation_name is not None else "unknown"
        blocked = self._shard().blocked  # the watchdog thread has a shard of its own
        blocked[op] = blocked.get(op, 0) + 1

    # -- folding, at scrape or summary time ------------------------------------------------

    def fold(self) -> Folded:
        """Every count, summed over the threads' shards."""
        with self._lock:
            shards = list(self._shards)
        folded = Folded(Series(len(LAG_BUCKETS) + 1))
        created, series, lag = folded.created, folded.series, folded.lag
        lean_created, lean_series = self._counts.fold()
        _add(created, lean_created)
        for key, (counts, sum_ns) in lean_series.items():
            lean = series[key] = Series(self._size)
            lean.counts = counts
            lean.sum_ns = sum_ns
        for key, exemplars in self._counts.fold_exemplars().items():
            with_exemplars = series.get(key)
            if with_exemplars is None:  # counted before its exemplar: not expected, kept anyway
                with_exemplars = series[key] = Series(self._size)
            with_exemplars.exemplars = exemplars
        blocked, destroyed = folded.blocked, folded.destroyed
        for shard in shards:
            _add(destroyed, shard.destroyed)
            _add(folded.never_retrieved, shard.never_retrieved)
            _add(folded.pending_at_close, shard.pending_at_close)
            _add(folded.cancelled, shard.cancelled)
            for key, s in list(shard.series.items()):
                total = series.get(key)
                if total is None:
                    total = series[key] = Series(self._size)
                total.counts = [a + b for a, b in zip(total.counts, s.counts, strict=True)]
                total.sum_ns += s.sum_ns
            lag.counts = [a + b for a, b in zip(lag.counts, shard.lag.counts, strict=True)]
            lag.sum_ns += shard.lag.sum_ns
            _add(blocked, shard.blocked)
        return folded

    def stats(self) -> list[OperationStats]:
        """Per-operation totals, sorted by operation."""
        by_op: dict[str, OperationStats] = {}
        for (op, outcome), s in self.fold().series.items():
            st = by_op.get(op)
            if st is None:
                st = by_op[op] = OperationStats(op, DURATION_BUCKETS)
            n = sum(s.counts)
            st.buckets = [a + b for a, b in zip(st.buckets, s.counts, strict=True)]
            st.count += n
            st.sum_s += s.sum_ns / 1e9
            if outcome == "exception":
                st.errors += n
            elif outcome == "cancelled":
                st.cancelled += n
        return [by_op[k] for k in sorted(by_op)]
