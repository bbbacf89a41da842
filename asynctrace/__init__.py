"""asynctrace: observability for asyncio tasks.

One call, :func:`install`, puts a task factory on the event loop. Every task created from then
on carries a :class:`TaskMetadata` (``operation_name``, ``correlation_id``,
``priority_hint``), readable from the task (:func:`task_metadata`) and, inside it, from context
variables (:func:`correlation_id`), while asyncio behaves exactly as before.

Exceptions: asynctrace raises only built-in ones, at the edge (bad arguments):
``TypeError`` for a wrong type or an unknown keyword, ``ValueError`` for a bad value,
``RuntimeError`` for a call in the wrong state. Inside running tasks it never raises: telemetry
failures are logged once and counted (:func:`telemetry_errors`).

Importing asynctrace loads neither OpenTelemetry nor prometheus_client: ``install()`` loads
what its options need.
"""

from __future__ import annotations

import typing as _typing

from asynctrace._api import flush, install, shutdown, summary, telemetry_errors
from asynctrace._cancel import Cancellation
from asynctrace._carry import Carried, carry, resume
from asynctrace._create_task import create_task
from asynctrace._hooks import Instrument
from asynctrace._install import Installation, loop_factory, uninstall
from asynctrace._introspect import task_metadata
from asynctrace._metadata import TaskMetadata, correlation_id, random_correlation_id
from asynctrace._record import TaskRecord
from asynctrace._scope import correlation, run_in_executor
from asynctrace._version import __version__
from asynctrace.export.summary import Summary
from asynctrace.sinks.logs import TaskContextFilter, add_task_context

if _typing.TYPE_CHECKING:
    from asynctrace.export.files import OTLPJsonFileSpanExporter

__all__ = [
    "Cancellation",
    "Carried",
    "Installation",
    "Instrument",
    "OTLPJsonFileSpanExporter",
    "Summary",
    "TaskContextFilter",
    "TaskMetadata",
    "TaskRecord",
    "__version__",
    "add_task_context",
    "carry",
    "correlation",
    "correlation_id",
    "create_task",
    "flush",
    "install",
    "loop_factory",
    "random_correlation_id",
    "resume",
    "run_in_executor",
    "shutdown",
    "summary",
    "task_metadata",
    "telemetry_errors",
    "uninstall",
]


def __getattr__(name: str) -> object:
    # The file exporter subclasses the OpenTelemetry SDK's SpanExporter: loaded when asked for.
    if name == "OTLPJsonFileSpanExporter":
        from asynctrace.export.files import OTLPJsonFileSpanExporter  # noqa: PLC0415

        return OTLPJsonFileSpanExporter
    raise AttributeError(f"module 'asynctrace' has no attribute {name!r}")
