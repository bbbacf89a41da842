"""``summary()``'s table: per-operation counts, quantiles, errors and where telemetry goes."""

from __future__ import annotations

from typing import final

from asynctrace.sinks.task_metrics import OperationStats

__all__ = ["Summary"]


@final
class Summary:
    """Per-operation task statistics: count, p50/p95/p99, errors, cancelled, and where to look.

    ``str(summary)`` is a table. Quantiles are estimated from the duration histogram the way
    PromQL's ``histogram_quantile`` does.

    Attributes:
        rows: One :class:`OperationStats` per operation, sorted by operation.
        metrics_url: Where ``/metrics`` is served, or None.
        traces_file: The OTLP/JSON traces file, or None.
        otlp_endpoint: Where spans are sent by OTLP, or None.
        tracing: Where spans go, in words: the exporters asynctrace set up, the app's own
            provider, ``"off"``, or ``"disabled by OTEL_SDK_DISABLED"``.

    Since: 0.1.0
    """

    def __init__(
        self,
        rows: list[OperationStats],
        metrics_url: str | None,
        traces_file: str | None,
        otlp_endpoint: str | None,
        *,
        tracing: str = "off",
    ) -> None:
        """Hold ``rows`` and the places telemetry goes."""
        self.rows = rows
        self.metrics_url = metrics_url
        self.traces_file = traces_file
        self.otlp_endpoint = otlp_endpoint
        self.tracing = tracing

    def __str__(self) -> str:
        """Render the table."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.2f}"

        header = ("operation", "count", "p50 ms", "p95 ms", "p99 ms", "errors", "cancelled")
        lines = [header]
        lines += [
            (
                r.operation,
                str(r.count),
                ms(r.quantile(0.5)),
                ms(r.quantile(0.95)),
                ms(r.quantile(0.99)),
                str(r.errors),
                str(r.cancelled),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        table = "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in lines
        )
        return f"{table}\nspans: {self.tracing}"
