"""``carry()`` and ``resume()``: an item's correlation id (and trace) across a queue.

A long-lived worker task keeps the correlation id it was started with; the items it takes
from a queue were put there by requests with ids (and traces) of their own. ``carry()`` at
``put`` time captures the producer's id and current span; ``with resume(carried):`` in the
worker makes them current for that item: its logs, its tasks and its spans carry the item's
id, and the block's span continues the producer's trace.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, final

from asynctrace._metadata import _CORRELATION_ID
from asynctrace._scope import correlation

__all__ = ["Carried", "carry", "resume"]


@final
@dataclass(frozen=True, slots=True)
class Carried:
    """What :func:`carry` captured: put it in the queue beside the item.

    Attributes:
        correlation_id: The producer's correlation id, or None.
        span_context: The producer's current OpenTelemetry ``SpanContext``, or None.

    Since: 0.1.0
    """

    correlation_id: str | None
    span_context: Any = None


def carry() -> Carried:
    """The current correlation id and span, to resume elsewhere (see :func:`resume`).

    Since: 0.1.0
    """
    span_context = None
    if "opentelemetry.trace" in sys.modules:  # no span can be current without it
        from opentelemetry import trace  # noqa: PLC0415

        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            span_context = current
    return Carried(_CORRELATION_ID.get(), span_context)


@contextlib.contextmanager
def resume(carried: Carried, *, span_name: str = "queue item") -> Iterator[str | None]:
    """Make ``carried``'s id and trace current for a block (one queue item's handling).

    Inside, :func:`asynctrace.correlation_id` is the producer's id, tasks created inherit it,
    and with tracing on the block's span (``span_name``) is a child of the producer's span.
    Without an id (the producer had none), only the trace is resumed. Yields the id.

    Raises:
        TypeError: ``carried`` is not what :func:`carry` returns.

    Since: 0.1.0
    """
    if not isinstance(carried, Carried):
        raise TypeError(f"Invalid carried: {carried!r}; expected what asynctrace.carry() returns.")
    token = None
    if carried.span_context is not None:
        from opentelemetry import context, trace  # noqa: PLC0415

        parent = trace.set_span_in_context(trace.NonRecordingSpan(carried.span_context))
        token = context.attach(parent)
    try:
        if carried.correlation_id is None:
            yield None
        else:
            with correlation(carried.correlation_id, span_name=span_name) as value:
                yield value
    finally:
        if token is not None:
            from opentelemetry import context  # noqa: PLC0415

            context.detach(token)
