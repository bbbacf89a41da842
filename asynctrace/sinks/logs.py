"""Log records that carry the task's ids: a structlog processor and a stdlib logging filter."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, final

from asynctrace._metadata import _CORRELATION_ID, _METADATA
from asynctrace._state import STATE

__all__ = ["TaskContextFilter", "add_task_context", "task_context_fields"]

_FIELDS: Final = ("correlation_id", "operation_name", "task_name", "trace_id", "span_id")


def task_context_fields() -> dict[str, str | None]:
    """The ids of the current context: correlation id, operation, task name, trace and span.

    Each is None where unknown (outside a task, no span). Since: 0.1.0
    """
    try:
        return _fields()
    except Exception as exc:  # a broken span or task class: this log line goes on without ids
        STATE.errors.count("log context", exc)
        return dict.fromkeys(_FIELDS)


def _fields() -> dict[str, str | None]:
    """The fields, or an exception from whatever computing them touched."""
    meta = _METADATA.get()
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    trace_id = span_id = None
    # No OpenTelemetry imported means no span can be current: log correlation alone never
    # pays for importing it.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            trace_id, span_id = f"{span.trace_id:032x}", f"{span.span_id:016x}"
    return {
        "correlation_id": _CORRELATION_ID.get(),
        "operation_name": meta.operation_name if meta is not None else None,
        "task_name": task.get_name() if task is not None else None,
        "trace_id": trace_id,
        "span_id": span_id,
    }


def add_task_context(
    logger: Any,  # noqa: ANN401, ARG001 - structlog's processor signature
    method_name: str,  # noqa: ARG001
    event_dict: MutableMapping[str, Any],
) -> MutableMapping[str, Any]:
    """A structlog processor adding the task's ids to every event (keys already set win).

    Adds ``correlation_id``, ``operation_name``, ``task_name``, ``trace_id``, ``span_id``
    (None values are left out)::

        structlog.configure(processors=[asynctrace.add_task_context, ...])

    Since: 0.1.0
    """
    for key, value in task_context_fields().items():
        if value is not None:
            event_dict.setdefault(key, value)
    return event_dict


@final
class TaskContextFilter(logging.Filter):
    """A stdlib ``logging.Filter`` that adds the task's ids as record attributes.

    Sets ``correlation_id``, ``operation_name``, ``task_name``, ``trace_id`` and ``span_id``
    on every record (None where unknown), for formats such as
    ``"%(correlation_id)s %(message)s"``. It never drops a record. Attach it to a handler::

        handler.addFilter(asynctrace.TaskContextFilter())

    Since: 0.1.0
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids to ``record``; always keep it."""
        for key, value in task_context_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True
