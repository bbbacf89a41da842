"""Task metrics as a prometheus_client collector: folded from the shards at each scrape.

Metric names (prefix ``asynctrace_``): ``task_duration_seconds`` (histogram, by operation and
outcome, with trace exemplars), ``tasks_created`` and ``tasks_in_flight`` (by operation),
``event_loop_lag_seconds`` (histogram), ``event_loop_blocked`` (by operation),
``telemetry_errors`` (by source) and ``spans_dropped``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Final, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from asynctrace._hooks import Instrument
from asynctrace._state import STATE
from asynctrace.sinks.task_metrics import DURATION_BUCKETS, LAG_BUCKETS, Folded, TaskMetrics

__all__ = ["PREFIX", "PrometheusSink"]

PREFIX: Final = "asynctrace_"


def _no_drops() -> int:
    return 0


def _by_operation(
    name: str, documentation: str, counts: dict[str, int], operations: list[str]
) -> CounterMetricFamily:
    """A counter by operation, every operation served (from 0: increase() sees the first)."""
    family = CounterMetricFamily(f"{PREFIX}{name}", documentation, labels=["operation"])
    for op in operations:
        family.add_metric([op], counts.get(op, 0))
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


@final
class PrometheusSink(Instrument, Collector):
    """Exposes a :class:`TaskMetrics` on a registry; unregisters itself when closed.

    ``dropped_spans`` tells how many spans the export layer dropped so far (it owns that
    count; this sink only shows it).
    """

    def __init__(
        self,
        metrics: TaskMetrics,
        registry: CollectorRegistry,
        dropped_spans: Callable[[], int] = _no_drops,
        blocked_for: Callable[[], float] | None = None,
        stuck: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """Register on ``registry``; a name clash there raises ValueError and registers nothing.

        ``blocked_for`` tells how long a loop has been blocked now (the loop monitor's);
        without it the gauge is not served. ``stuck`` counts the tasks stuck now by operation
        (the stuck watch's); without it, neither.
        """
        self._metrics = metrics
        self._dropped_spans = dropped_spans
        self._blocked_for = blocked_for
        self._stuck = stuck
        self._registry: CollectorRegistry | None = registry
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        """The families this collector serves, without samples: how a registry finds clashes."""
        for family in self.collect():
            yield type(family)(family.name, family.documentation)  # type: ignore[call-arg]

    def collect(self) -> Iterator[Metric]:
        """The metric families, folded from every thread's shard."""
        folded = self._metrics.fold()
        created, series, lag, blocked = folded.created, folded.series, folded.lag, folded.blocked
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
        destroyed = folded.destroyed
        destroyed_family = CounterMetricFamily(
            f"{PREFIX}tasks_destroyed_pending",
            "Tasks destroyed while still pending (never done), by operation.",
            labels=["operation"],
        )
        for op in sorted(created):
            created_family.add_metric([op], created[op])
            gone = finished.get(op, 0) + destroyed.get(op, 0)
            in_flight.add_metric([op], max(0, created[op] - gone))
            destroyed_family.add_metric([op], destroyed.get(op, 0))
        yield created_family
        yield in_flight
        yield destroyed_family
        yield from self._health(folded, sorted(created))

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
        # Every operation seen, and "unknown", from 0: increase() then sees the first episode.
        for op in sorted({"unknown", *blocked, *created}):
            blocked_family.add_metric([op], blocked.get(op, 0))
        yield blocked_family
        if self._blocked_for is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}event_loop_blocked_seconds",
                "How long the event loop has been blocked now (the longest-blocked one, 0 when "
                "none is); measured by the watchdog thread, so it shows a hung loop.",
                value=self._blocked_for(),
            )

        errors = CounterMetricFamily(
            f"{PREFIX}telemetry_errors",
            "Telemetry failures (exporters, instruments, hooks), by source. The app is not "
            "affected.",
            labels=["source"],
        )
        for source, n in sorted(STATE.errors.snapshot(declared=True).items()):
            errors.add_metric([source], n)
        yield errors
        dropped = CounterMetricFamily(
            f"{PREFIX}spans_dropped", "Spans dropped: export failed or the queue was full."
        )
        dropped.add_metric([], self._dropped_spans())
        yield dropped

    def _health(self, folded: Folded, operations: list[str]) -> Iterator[Metric]:
        """Never-retrieved exceptions, tasks pending at close, cancellations, stuck tasks."""
        yield _by_operation(
            "task_exceptions_never_retrieved",
            "Tasks that ended with an exception nobody retrieved, by operation.",
            folded.never_retrieved,
            operations,
        )
        yield _by_operation(
            "tasks_pending_at_close",
            "Tasks still pending when their loop closed or asyncio.run ended, by operation.",
            folded.pending_at_close,
            operations,
        )
        cancellations = CounterMetricFamily(
            f"{PREFIX}task_cancellations",
            "Tasks that ended cancelled, by operation and reason (timeout, taskgroup, "
            "shutdown, explicit).",
            labels=["operation", "reason"],
        )
        for (op, reason), n in sorted(folded.cancelled.items()):
            cancellations.add_metric([op, reason], n)
        yield cancellations
        if self._stuck is not None:
            stuck = GaugeMetricFamily(
                f"{PREFIX}tasks_stuck",
                "Tasks pending longer than their stuck_after threshold now, by operation.",
                labels=["operation"],
            )
            for op, n in sorted(self._stuck().items()):
                stuck.add_metric([op], n)
            yield stuck

    def after_fork(self) -> None:
        """In a forked child: unregister from the child's copy of the registry."""
        self.close()

    def close(self) -> None:
        """Unregister from the registry."""
        if self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self)
            self._registry = None
