"""Each task as an OpenTelemetry span: from creation to completion, parented where it was created.

Two paths, chosen per provider:

- **Fast path** (an SDK ``TracerProvider`` whose span processors do nothing in ``on_start``, such
  as the Batch and Simple processors): at creation the provider's sampler decides and its id
  generator gives the span id. The task's context gets a lightweight span handle carrying
  that identity, so spans opened inside the task nest under it. At completion a finished
  ``ReadableSpan`` goes to the provider's span processors. No SDK ``Span`` object, lock or
  event list is created per task.
- **Full path** (any other provider, or a processor that acts in ``on_start``): a real span from
  ``tracer.start_span``, made current in the task and ended at completion.

Either way the user's provider, sampler, processors and exporters are used unchanged.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from asynctrace._hooks import Instrument
from asynctrace._metadata import TaskMetadata
from asynctrace._record import CANCELLED, EXCEPTION, TaskRecord

__all__ = [
    "ATTR_CORRELATION_ID",
    "ATTR_OPERATION",
    "ATTR_OUTCOME",
    "ATTR_PRIORITY_HINT",
    "ATTR_TASK_NAME",
    "SpanSink",
    "span_name",
]

ATTR_TASK_NAME: Final = "asyncio.task.name"
ATTR_OUTCOME: Final = "asyncio.task.outcome"
ATTR_OPERATION: Final = "asynctrace.operation"
ATTR_CORRELATION_ID: Final = "asynctrace.correlation_id"
ATTR_PRIORITY_HINT: Final = "asynctrace.priority_hint"

_PROVISIONAL_NAME: Final = "asyncio.task"
_UNSET: Final = Status(StatusCode.UNSET)
# The SDK's default sampler, ParentBased(ALWAYS_ON): its decision is "as the parent, else yes",
# which the fast path takes inline instead of calling it for every task.
_DEFAULT_SAMPLER_DESCRIPTION: Final[str] = ParentBased(ALWAYS_ON).get_description()  # type: ignore[no-untyped-call]
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_OK_ON_START: Final = (BatchSpanProcessor, SimpleSpanProcessor)
# The event loop's own housekeeping tasks (asyncio.run's shutdown, uvloop's too): no spans.
_INTERNAL_COROUTINES: Final = frozenset(
    {
        "BaseEventLoop.shutdown_asyncgens",
        "BaseEventLoop.shutdown_default_executor",
        "Loop.shutdown_asyncgens",
        "Loop.shutdown_default_executor",
    }
)

TaskFilter = Callable[[TaskMetadata], bool]


def _sdk_processors(tracer: sdk_trace.Tracer) -> tuple[sdk_trace.SpanProcessor, ...] | None:
    """The span processors of an SDK tracer, or None where they cannot be known.

    The SDK has no public way to list a provider's processors. Its own multi-processor keeps
    them in ``_span_processors`` (a tuple, replaced whole when one is added, since 1.0); read
    only from exactly that class. Anything else gets the full path, which needs no look.
    """
    multi = tracer.span_processor
    if type(multi) is not sdk_trace.SynchronousMultiSpanProcessor:
        return None
    processors = getattr(multi, "_span_processors", None)
    return processors if isinstance(processors, tuple) else None


# CPython 3.13's loop.create_task calls task.set_name(name) after any task factory, None
# included, so every task created there without a name is named "None" (python/cpython#130033;
# asyncio's own eager_task_factory too). Such a task was not named by anyone.
_UNNAMED_AFTER_FACTORY: Final = "None" if sys.version_info[:2] == (3, 13) else None


def _is_default_name(name: str) -> bool:
    return (name.startswith("Task-") and name[5:].isdigit()) or name == _UNNAMED_AFTER_FACTORY


def span_name(task: asyncio.Task[Any], metadata: TaskMetadata) -> str:
    """The span name: operation_name, else a name the user gave, else the coroutine's qualname."""
    if metadata.operation_name is not None:
        return metadata.operation_name
    name = task.get_name()
    if not _is_default_name(name):
        return name
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or _PROVISIONAL_NAME


class _TaskSpan(NonRecordingSpan):
    """The fast path's handle: the task's span as its children see it, and its state till done.

    One object per task, kept in the task's context and in its record. The ``SpanContext`` is
    built when first asked for (by a child, a library, or the end of the task), so a task that
    never looks at its span carries no ``SpanContext`` while it is pending.
    """

    __slots__ = (
        "_context",
        "parent",
        "sampler_attributes",
        "span_id",
        "trace_flags",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        *,
        trace_flags: TraceFlags,
        trace_state: TraceState | None,
        parent: SpanContext | None,
        sampler_attributes: Any,  # noqa: ANN401 - the sampler's Attributes, as it gave them
    ) -> None:
        self._context: SpanContext | None = None  # type: ignore[assignment]
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_flags = trace_flags
        self.trace_state = trace_state
        self.parent = parent
        self.sampler_attributes = sampler_attributes

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=self.trace_flags,
                trace_state=self.trace_state,
            )
        return context

    def __repr__(self) -> str:
        return f"_TaskSpan({self.get_span_context()!r})"


def _attributes(task: asyncio.Task[Any], record: TaskRecord) -> dict[str, Any]:
    meta = record.metadata
    attributes: dict[str, Any] = {
        ATTR_TASK_NAME: task.get_name(),
        ATTR_OUTCOME: record.outcome,
    }
    if meta.operation_name is not None:
        attributes[ATTR_OPERATION] = meta.operation_name
    if meta.correlation_id is not None:
        attributes[ATTR_CORRELATION_ID] = meta.correlation_id
    if meta.priority_hint is not None:
        attributes[ATTR_PRIORITY_HINT] = meta.priority_hint
    return attributes


def _error_status(exc: BaseException) -> Status:
    return Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}")


def _exception_event_attributes(exc: BaseException) -> dict[str, Any]:
    return {
        "exception.type": type(exc).__qualname__,
        "exception.message": str(exc),
        "exception.stacktrace": "".join(traceback.format_exception(exc)),
        "exception.escaped": "True",
    }


@final
class SpanSink(Instrument):
    """Records each task the filter admits as a span of ``tracer_provider``."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider,
        task_filter: TaskFilter | None = None,
        version: str = "",
    ) -> None:
        """Trace with ``tracer_provider``, only tasks whose metadata ``task_filter`` admits."""
        self._provider = tracer_provider
        self._filter = task_filter
        self._tracer = tracer_provider.get_tracer("asynctrace", version)
        self._scope = InstrumentationScope("asynctrace", version)
        # perf_counter_ns() is what the factory records; spans need the epoch.
        self._epoch_offset = time.time_ns() - time.perf_counter_ns()
        self._checked_processors: object = None
        self._fast = False
        self._default_sampler = False
        self._recheck()

    def _recheck(self) -> None:
        tracer = self._tracer
        if not isinstance(tracer, sdk_trace.Tracer):
            self._fast = False
            return
        self._default_sampler = tracer.sampler.get_description() == _DEFAULT_SAMPLER_DESCRIPTION
        processors = _sdk_processors(tracer)
        self._checked_processors = processors
        if processors is None:
            self._fast = False
            return
        self._fast = all(
            isinstance(p, _OK_ON_START) or type(p).on_start is sdk_trace.SpanProcessor.on_start
            for p in processors
        )

    @property
    def fast_path(self) -> bool:
        """Whether spans are built as finished ReadableSpans (see the module docstring)."""
        return self._fast

    def task_context(self, record: TaskRecord) -> None:
        """Start the task's span in the task's context (parent: the span current there)."""
        if self._filter is not None and not self._filter(record.metadata):
            return
        tracer = self._tracer
        if isinstance(tracer, sdk_trace.Tracer):
            if _sdk_processors(tracer) is not self._checked_processors:
                self._recheck()  # a processor was added since
            if self._fast:
                self._start_fast(tracer, record)
                return
        span = tracer.start_span(
            record.metadata.operation_name or _PROVISIONAL_NAME,
            kind=SpanKind.INTERNAL,
            start_time=record.created_ns + self._epoch_offset,
        )
        otel_context.attach(trace.set_span_in_context(span))
        record._span = span
        span_context = span.get_span_context()
        if span_context.trace_flags.sampled:
            record.trace_id, record.span_id = span_context.trace_id, span_context.span_id

    def _start_fast(self, tracer: sdk_trace.Tracer, record: TaskRecord) -> None:
        current = otel_context.get_current()
        parent = trace.get_current_span(current).get_span_context()
        if parent.is_valid:
            trace_id = parent.trace_id
        else:
            trace_id = tracer.id_generator.generate_trace_id()
            parent = None  # type: ignore[assignment]
        trace_state: TraceState | None
        if self._default_sampler:
            sampled = parent is None or parent.trace_flags.sampled
            trace_state = parent.trace_state if parent is not None else None
            sampler_attributes = None
        else:
            name = record.metadata.operation_name or _PROVISIONAL_NAME
            result = tracer.sampler.should_sample(current, trace_id, name, SpanKind.INTERNAL)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            trace_state, sampler_attributes = result.trace_state, result.attributes
        handle = _TaskSpan(
            trace_id,
            tracer.id_generator.generate_span_id(),
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
            trace_state=trace_state,
            parent=parent,
            sampler_attributes=sampler_attributes,
        )
        # Children (tasks, HTTP clients, DB drivers) see this span as their parent, sampled
        # or not, so a dropped task also drops its subtree under parent-based samplers.
        otel_context.attach(trace.set_span_in_context(handle, current))
        if sampled:
            record._span = handle
            record.trace_id, record.span_id = handle.trace_id, handle.span_id

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """End the task's span with its outcome."""
        data = record._span
        if data is None:
            return
        if record.metadata.operation_name is None and (
            getattr(task.get_coro(), "__qualname__", None) in _INTERNAL_COROUTINES
        ):
            return  # on the full path the span is never ended, so never exported
        end = record.finished_ns + self._epoch_offset
        attributes = _attributes(task, record)
        exc = record.exception
        if isinstance(data, _TaskSpan):
            if data.sampler_attributes:
                attributes = {**data.sampler_attributes, **attributes}
            events: tuple[sdk_trace.Event, ...] = ()
            status = _UNSET
            if record.outcome == EXCEPTION and exc is not None:
                status = _error_status(exc)
                events = (sdk_trace.Event("exception", _exception_event_attributes(exc), end),)
            tracer = self._tracer
            assert isinstance(tracer, sdk_trace.Tracer)  # noqa: S101 - set by task_context
            span = sdk_trace.ReadableSpan(
                name=span_name(task, record.metadata),
                context=data.get_span_context(),
                parent=data.parent,
                resource=tracer.resource,
                attributes=attributes,
                events=events,
                kind=SpanKind.INTERNAL,
                status=status,
                start_time=record.created_ns + self._epoch_offset,
                end_time=end,
                instrumentation_scope=self._scope,
            )
            tracer.span_processor.on_end(span)
            return
        if isinstance(data, trace.Span):
            self._end_full(task, record, data, attributes, end)

    def _end_full(
        self,
        task: asyncio.Task[Any],
        record: TaskRecord,
        span: trace.Span,
        attributes: dict[str, Any],
        end: int,
    ) -> None:
        exc = record.exception
        span.update_name(span_name(task, record.metadata))
        span.set_attributes(attributes)
        if record.outcome == EXCEPTION and exc is not None:
            span.record_exception(exc, timestamp=end, escaped=True)
            span.set_status(_error_status(exc))
        elif record.outcome == CANCELLED:
            span.set_status(_UNSET)
        span.end(end_time=end)
