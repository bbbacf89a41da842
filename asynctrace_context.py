"""OpenTelemetry's runtime context, where a traced task's current span is made only when asked.

A module of its own, outside the ``asynctrace`` package, because OpenTelemetry loads its
runtime context while ``opentelemetry.context`` is still being imported: this module may import
nothing that imports ``opentelemetry.context`` back (``asynctrace`` itself does).

Select it before OpenTelemetry is imported with ``OTEL_PYTHON_CONTEXT=asynctrace`` (the entry
point in asynctrace's ``pyproject.toml``), or let ``asynctrace.install()`` put it in place of
OpenTelemetry's default one (see :func:`asynctrace.sinks.tracing` for when).

How it works: asynctrace's task factory does not attach a new OpenTelemetry ``Context`` to
each traced task. It sets :data:`TASK_SPAN` in the task's context to the task's span handle,
which remembers the OpenTelemetry context the task inherited. While the task's current context
is still the one it inherited, :meth:`get_current` returns that context with the task's span in
it, made at the first call and set then as the current context in the task's own context (as if
attached, with no token: nothing detaches it), where the next calls find it. Once code in the
task attaches a context of its own (a span of another instrumentation made current), that
context is current, as it would be anyway; when it is detached, the task's span is current again.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any, Final, Protocol

from opentelemetry.context.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

__all__ = ["TASK_SPAN", "LazySpan", "TaskSpanRuntimeContext"]


class LazySpan(Protocol):
    """What :data:`TASK_SPAN` holds: a task's span and the context the task inherited."""

    inherited: Context | None

    def current_context(self) -> Context:
        """``inherited`` with this span as its current span (a new context at each call)."""
        ...


def _task_span_var() -> ContextVar[Any]:
    """The variable, out of the first-level slots of asynctrace's own two where it can be.

    When asynctrace was imported first, its ``_metadata.spread_var`` keeps this one out of
    their slots (see there); else they keep out of this one's when they are made. Nothing
    is imported for it: this module imports nothing of asynctrace.
    """
    metadata = sys.modules.get("asynctrace._metadata")
    if metadata is None or not hasattr(metadata, "CONTEXT_VARS"):
        return ContextVar("asynctrace_task_span", default=None)
    var: ContextVar[Any] = metadata.spread_var("asynctrace_task_span", metadata.CONTEXT_VARS)
    return var


TASK_SPAN: Final[ContextVar[Any]] = _task_span_var()
"""The traced task's span handle (a :class:`LazySpan`), in the task's own context."""


class TaskSpanRuntimeContext(ContextVarsRuntimeContext):
    """OpenTelemetry's contextvars runtime context, plus the lazily made current span of a task.

    ``current_context`` is the ``ContextVar`` to keep using, when this one takes the place of
    a ``ContextVarsRuntimeContext`` already in use: tokens it handed out stay valid.
    """

    def __init__(self, current_context: ContextVar[Context] | None = None) -> None:
        """Use ``current_context`` (the default: a new one, as OpenTelemetry's own does)."""
        super().__init__()
        if current_context is not None:
            self._current_context = current_context

    def get_current(self) -> Context:
        """The current context; in a traced task that attached none, one holding its span."""
        context = self._current_context.get()
        span = TASK_SPAN.get()
        if span is None or span.inherited is not context:
            return context
        # The first ask here: the context with the task's span becomes the current one in this
        # context (the task's, or a copy made for a callback or a thread); no token is made,
        # and a context attached later and detached returns to it.
        current: Context = span.current_context()
        self._current_context.set(current)
        return current
