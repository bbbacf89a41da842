"""Task metrics for Prometheus: durations, created and in-flight tasks, loop lag, blocked loops.

The hot path only counts: each thread keeps its own shard of plain counters (no lock, safe
without the GIL), and a custom ``Collector`` folds the shards into metric families when
Prometheus scrapes. In-flight tasks are derived (created - finished), so they cost nothing
per task.

Labels are bounded: ``operation`` (capped at ``max_operations`` distinct values, the rest
reported as ``_other``; tasks without one as ``unnamed``) and ``outcome``. Correlation ids
never become labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Final, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from asynctrace._instrument import FINISHED, LeanInstrument, Outcome, TaskRecord
from asynctrace._metadata import TaskMetadata
from asynctrace._state import STATE
from asynctrace._tracing import sampled_ids

__all__ = [
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "OTHER_OPERATION",
    "UNNAMED_OPERATION",
    "MetricsSink",
    "OperationStats",
]

PREFIX: Final = "asynctrace_"
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
_OUTCOMES: Final = ("finished", "exception", "cancelled")


@final
class _Series:
    """One histogram series (operation, outcome): counts per bucket, sum, last exemplars."""

    __slots__ = ("counts", "exemplars", "sum_ns")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum_ns = 0
        self.exemplars: list[tuple[int, int, int, float] | None] | None = None


@final
class _Shard:
    """What one thread counted. Only its own thread writes it."""

    __slots__ = ("blocked", "created", "lag", "last_label", "last_metadata", "series")

    def __init__(self) -> None:
        self.last_metadata: object = None
        self.last_label = ""
        self.created: dict[str, int] = {}
        self.series: dict[tuple[str, str], _Series] = {}
        self.lag = _Series(len(LAG_BUCKETS) + 1)
        self.blocked: dict[str, int] = {}


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


@final
class MetricsSink(LeanInstrument):
    """Counts tasks into per-thread shards; exposes them to a Prometheus registry."""

    def __init__(self, registry: CollectorRegistry | None, max_operations: int = 100) -> None:
        """Register on ``registry`` (None: don't register, e.g. for summary() only)."""
        self._bounds_ns = [round(b * 1e9) for b in DURATION_BUCKETS]
        self._lag_bounds_ns = [round(b * 1e9) for b in LAG_BUCKETS]
        self._size = len(DURATION_BUCKETS) + 1
        self._max_operations = max_operations
        self._operations: set[str] = set()
        self._lock = threading.Lock()
        self._shards: list[_Shard] = []
        self._local = threading.local()
        self._registry = registry
        self._collector = _Collector(self)
        if registry is not None:
            registry.register(self._collector)

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
        if operation_name is None:
            return UNNAMED_OPERATION
        if operation_name in self._operations:
            return operation_name
        with self._lock:
            if len(self._operations) < self._max_operations:
                self._operations.add(operation_name)
                return operation_name
        return OTHER_OPERATION

    def _shard_and_label(self, metadata: TaskMetadata) -> tuple[_Shard, str]:
        """This thread's shard, and the ``operation`` label of a task with ``metadata``."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        if metadata is shard.last_metadata:  # siblings of a fan-out share their metadata
            return shard, shard.last_label
        op = shard.last_label = self.label(metadata.operation_name)
        shard.last_metadata = metadata
        return shard, op

    def task_started(self, metadata: TaskMetadata) -> None:
        """Count a created task."""
        shard, op = self._shard_and_label(metadata)
        created = shard.created
        created[op] = created.get(op, 0) + 1

    def task_finished(self, metadata: TaskMetadata, outcome: Outcome, duration_ns: int) -> None:
        """Put the task's duration in its (operation, outcome) histogram."""
        self._observe(metadata, outcome, duration_ns)

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:  # noqa: ARG002
        """The same, with the span's ids as the bucket's exemplar when the task is traced."""
        duration = record.finished_ns - record.created_ns
        series, i = self._observe(record.metadata, record.outcome or FINISHED, duration)
        if record.sink_data is not None:
            ids = sampled_ids(record)
            if ids is not None:
                if series.exemplars is None:
                    series.exemplars = [None] * self._size
                series.exemplars[i] = (ids[0], ids[1], duration, time.time())

    def _observe(
        self, metadata: TaskMetadata, outcome: str, duration_ns: int
    ) -> tuple[_Series, int]:
        shard, op = self._shard_and_label(metadata)
        key = (op, outcome)
        series = shard.series.get(key)
        if series is None:
            series = shard.series[key] = _Series(self._size)
        i = bisect_left(self._bounds_ns, duration_ns)
        series.counts[i] += 1
        series.sum_ns += duration_ns
        return series, i

    def observe_lag(self, lag_s: float) -> None:
        """Record one heartbeat's lag (called on the loop's thread)."""
        lag = self._shard().lag
        ns = max(0, round(lag_s * 1e9))
        lag.counts[bisect_left(self._lag_bounds_ns, ns)] += 1
        lag.sum_ns += ns

    def count_blocked(self, operation_name: str | None) -> None:
        """Count one blocked-loop episode (any thread)."""
        op = self.label(operation_name) if operation_name is not None else "unknown"
        blocked = self._shard().blocked  # the watchdog thread has a shard of its own
        blocked[op] = blocked.get(op, 0) + 1

    def close(self) -> None:
        """Unregister from the registry."""
        if self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._registry = None

    # -- folding, at scrape or summary time ------------------------------------------------

    def _fold(
        self,
    ) -> tuple[dict[str, int], dict[tuple[str, str], _Series], _Series, dict[str, int]]:
        with self._lock:
            shards = list(self._shards)
        created: dict[str, int] = {}
        series: dict[tuple[str, str], _Series] = {}
        lag = _Series(len(LAG_BUCKETS) + 1)
        blocked: dict[str, int] = {}
        for shard in shards:
            for op, n in list(shard.created.items()):
                created[op] = created.get(op, 0) + n
            for key, s in list(shard.series.items()):
                total = series.get(key)
                if total is None:
                    total = series[key] = _Series(self._size)
                total.counts = [a + b for a, b in zip(total.counts, s.counts, strict=True)]
                total.sum_ns += s.sum_ns
                if s.exemplars is not None:
                    if total.exemplars is None:
                        total.exemplars = list(s.exemplars)
                    else:
                        total.exemplars = [
                            max((a, b), key=lambda e: e[3] if e else 0.0)
                            for a, b in zip(total.exemplars, s.exemplars, strict=True)
                        ]
            lag.counts = [a + b for a, b in zip(lag.counts, shard.lag.counts, strict=True)]
            lag.sum_ns += shard.lag.sum_ns
            for op, n in list(shard.blocked.items()):
                blocked[op] = blocked.get(op, 0) + n
        return created, series, lag, blocked

    def stats(self) -> list[OperationStats]:
        """Per-operation totals, sorted by operation."""
        _, series, _, _ = self._fold()
        by_op: dict[str, OperationStats] = {}
        for (op, outcome), s in series.items():
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

    def families(self) -> Iterator[Metric]:
        """The metric families, folded from all shards."""
        created, series, lag, blocked = self._fold()
        finished: dict[str, int] = {}
        duration = HistogramMetricFamily(
            f"{PREFIX}task_duration_seconds",
            "Time from task creation to completion, by operation and outcome.",
            labels=["operation", "outcome"],
        )
        les = [*(_le(b) for b in DURATION_BUCKETS), "+Inf"]
        for (op, outcome), s in sorted(series.items()):
            cumulative = 0
            buckets: list[Any] = []
            for i, n in enumerate(s.counts):
                cumulative += n
                ex = s.exemplars[i] if s.exemplars is not None else None
                if ex is not None:
                    exemplar = Exemplar(
                        {"trace_id": f"{ex[0]:032x}", "span_id": f"{ex[1]:016x}"},
                        ex[2] / 1e9,
                        ex[3],
                    )
                    buckets.append((les[i], cumulative, exemplar))
                else:
                    buckets.append((les[i], cumulative))
            duration.add_metric([op, outcome], buckets, s.sum_ns / 1e9)
            finished[op] = finished.get(op, 0) + cumulative
        yield duration

        created_family = CounterMetricFamily(
            f"{PREFIX}tasks_created", "Tasks created, by operation.", labels=["operation"]
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}tasks_in_flight",
            "Tasks created and not yet done, by operation.",
            labels=["operation"],
        )
        for op in sorted(created):
            created_family.add_metric([op], created[op])
            in_flight.add_metric([op], max(0, created[op] - finished.get(op, 0)))
        yield created_family
        yield in_flight

        lag_family = HistogramMetricFamily(
            f"{PREFIX}event_loop_lag_seconds",
            "How late the event loop ran its heartbeat: time the loop was busy or blocked.",
        )
        cumulative = 0
        lag_buckets = []
        for le, n in zip([*(_le(b) for b in LAG_BUCKETS), "+Inf"], lag.counts, strict=True):
            cumulative += n
            lag_buckets.append((le, cumulative))
        lag_family.add_metric([], lag_buckets, lag.sum_ns / 1e9)
        yield lag_family

        blocked_family = CounterMetricFamily(
            f"{PREFIX}event_loop_blocked",
            "Episodes of the event loop blocked longer than the threshold, by the operation "
            "of the task that was running (unknown when none was).",
            labels=["operation"],
        )
        for op in sorted(blocked):
            blocked_family.add_metric([op], blocked[op])
        yield blocked_family

        errors = CounterMetricFamily(
            f"{PREFIX}telemetry_errors",
            "Telemetry failures (exporters, instruments, hooks), by source. The app is not "
            "affected.",
            labels=["source"],
        )
        with STATE.lock:
            for source, n in sorted(STATE.errors.items()):
                errors.add_metric([source], n)
        yield errors
        dropped = CounterMetricFamily(
            f"{PREFIX}spans_dropped", "Spans dropped: export failed or the queue was full."
        )
        dropped.add_metric([], STATE.dropped_spans)
        yield dropped


def _le(bound: float) -> str:
    return repr(float(bound))


@final
class _Collector(Collector):
    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        return self._sink.families()

    def describe(self) -> Iterator[Metric]:
        return iter(())
