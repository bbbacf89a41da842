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

**One trace per correlation id.** Every span asynctrace makes (a task's, or a correlation
block's) knows its correlation id. A new span whose parent would be one of asynctrace's spans
with another id starts a new trace instead, with a span link to that span: a request's tasks
form their own trace, linked to the long-lived task that spawned them, and no trace of
asynctrace's holds two ids. A span the application or another instrumentation made current (an
HTTP server span, ``tracer.start_as_current_span``) is always the parent: asynctrace never cuts
a trace it did not make.

**Correlation blocks.** ``with asynctrace.correlation(id)`` with a new id opens a scope span
(``correlation``, or the block's ``span_name``) current for the block: the root of that id's
trace here, so the block's tasks share one trace and the block's logs carry its ids.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_ID,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from asynctrace import _native
from asynctrace._cancel import cancellation_of
from asynctrace._factory import hook_failed
from asynctrace._hooks import Instrument, call_each
from asynctrace._introspect import lean_entry, task_record
from asynctrace._metadata import TaskMetadata
from asynctrace._record import CANCELLED, EXCEPTION, FINISHED, Outcome, TaskRecord
from asynctrace._speedups_py import SpanIds as _TwinSpanIds
from asynctrace._state import STATE
from asynctrace_context import TASK_SPAN, TaskSpanRuntimeContext

__all__ = [
    "ATTR_CANCELLED_BY_CORRELATION_ID",
    "ATTR_CANCELLED_BY_OPERATION",
    "ATTR_CANCEL_MESSAGE",
    "ATTR_CANCEL_REASON",
    "ATTR_CORRELATION_ID",
    "ATTR_OPERATION",
    "ATTR_OUTCOME",
    "ATTR_PRIORITY_HINT",
    "ATTR_TASK_NAME",
    "SCOPE_SPAN_NAME",
    "STUCK_EVENT",
    "SpanSink",
    "span_name",
]

ATTR_TASK_NAME: Final = "asyncio.task.name"
ATTR_OUTCOME: Final = "asyncio.task.outcome"
ATTR_OPERATION: Final = "asynctrace.operation"
ATTR_CORRELATION_ID: Final = "asynctrace.correlation_id"
ATTR_PRIORITY_HINT: Final = "asynctrace.priority_hint"
ATTR_CANCEL_REASON: Final = "asyncio.task.cancel.reason"
ATTR_CANCEL_MESSAGE: Final = "asyncio.task.cancel.message"
ATTR_CANCELLED_BY_OPERATION: Final = "asynctrace.cancelled_by.operation"
ATTR_CANCELLED_BY_CORRELATION_ID: Final = "asynctrace.cancelled_by.correlation_id"
STUCK_EVENT: Final = "asynctrace.stuck"

_PROVISIONAL_NAME: Final = "asyncio.task"
SCOPE_SPAN_NAME: Final = "correlation"
"""The name of a correlation block's span when the block gives none."""
_UNSET: Final = Status(StatusCode.UNSET)
# The SDK's default sampler, ParentBased(ALWAYS_ON): its decision is "as the parent, else yes",
# which the fast path takes inline instead of calling it for every task.
_DEFAULT_SAMPLER_DESCRIPTION: Final[str] = ParentBased(ALWAYS_ON).get_description()  # type: ignore[no-untyped-call]
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
# The key under which a context holds its current span: OpenTelemetry's own (private) key,
# learnt from its public set_span_in_context.
_SPAN_KEY: Final[str] = next(iter(trace.set_span_in_context(INVALID_SPAN, otel_context.Context())))
# Whether the interpreter runs without the GIL (free-threaded 3.13t/3.14t): then the per-thread
# span counts take their lock (see _Counts); under the GIL the count needs none.
_FREE_THREADED: Final = not getattr(sys, "_is_gil_enabled", lambda: True)()
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
logger: Final = logging.getLogger("asynctrace")


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


def span_name(task: asyncio.Task[Any], metadata: TaskMetadata, name: str | None = None) -> str:
    """The span name: operation_name, else a name the user gave, else the coroutine's qualname.

    ``name`` is the task's name when the caller has asked for it already.
    """
    if metadata.operation_name is not None:
        return metadata.operation_name
    if name is None:
        name = task.get_name()
    if not _is_default_name(name):
        return name
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or _PROVISIONAL_NAME


if TYPE_CHECKING:

    class _SpanIds(_TwinSpanIds, NonRecordingSpan):
        """To the type checker: the C SpanIds reads as the twin's slots, and a span."""

else:
    _SpanIds = _native.SpanIds


@final
class _Rare:
    """A span handle's uncommon state, kept in one object apart from the handle.

    Most task spans are sampled, take their trace state from their parent, and have no
    attributes from the sampler, no links and no late events: their handles keep ``None``
    in place of this object (a handle's eight bytes instead of forty). ``trace_state`` here
    is None when it is the parent's (as the handle's own is then).
    """

    __slots__ = ("late", "links", "sampler_attributes", "trace_flags", "trace_state")

    def __init__(
        self,
        trace_flags: TraceFlags,
        trace_state: TraceState | None,
        sampler_attributes: Any,  # noqa: ANN401 - the sampler's Attributes, as it gave them
        links: tuple[Link, ...],
    ) -> None:
        self.trace_flags = trace_flags
        self.trace_state = trace_state
        self.sampler_attributes = sampler_attributes
        self.links = links
        self.late: list[sdk_trace.Event] | None = None


# Shared by the unsampled handles with nothing else uncommon (never given late events: an
# unsampled span is not ended, so no task keeps its handle as its entry).
_UNSAMPLED: Final = _Rare(_NOT_SAMPLED, None, None, ())
_EMPTY_TRACE_STATE: Final = TraceState()


class _TaskSpan(_SpanIds):
    """The fast path's handle: the span as its children see it, and its state till it ends.

    One object per task (or correlation block), kept in its context and in its record. The
    ``SpanContext`` is built when first asked for (by a child, a library, or the end of the
    task), so a task that never looks at its span carries no ``SpanContext`` while pending.
    ``trace_id``, ``span_id`` and ``created_ns`` are ``SpanIds``'s: native integers in the
    handle where the C extension runs, read as ``int`` objects.

    A ``NonRecordingSpan`` to OpenTelemetry (registered as its virtual subclass, with its
    no-op methods), not a subclass: ``Span`` gives its subclasses a ``__dict__``, which costs
    each handle 8 bytes on 3.11 and about 140 on 3.13+ (the space kept for inline values).

    ``trace_flags``, ``trace_state``, ``sampler_attributes``, ``links`` and ``late`` are read
    from ``_rare`` (see :class:`_Rare`): None for the common span, sampled, whose trace
    state is its parent's.
    """

    __slots__ = ()  # its fields are SpanIds's (see there): no slot of its own, no GC header

    def __init__(  # noqa: PLR0917 - one per task: positional arguments
        self,
        trace_id: int,
        span_id: int,
        trace_flags: TraceFlags,
        trace_state: TraceState | None,
        parent: SpanContext | None,
        sampler_attributes: Any,  # noqa: ANN401 - the sampler's Attributes, as it gave them
        correlation_id: str | None,
        links: tuple[Link, ...],
    ) -> None:
        self._context: SpanContext | None = None  # type: ignore[assignment]
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.correlation_id = correlation_id
        if trace_state is (parent.trace_state if parent is not None else None):
            trace_state = None  # the parent's: read from it
        elif trace_state is None:
            trace_state = _EMPTY_TRACE_STATE  # none, where the parent has one
        self._rare: _Rare | None = None
        if trace_state is not None or sampler_attributes or links:
            self._rare = _Rare(trace_flags, trace_state, sampler_attributes, links)
        elif trace_flags == _NOT_SAMPLED:
            self._rare = _UNSAMPLED
        elif trace_flags != _SAMPLED:
            self._rare = _Rare(trace_flags, None, None, ())
        # A task's creation time (perf_counter_ns).
        self.created_ns = 0
        # The lazy current span (asynctrace_context): the OpenTelemetry context the task
        # inherited, where this span is made current when first asked for.
        self.inherited: otel_context.Context | None = None

    @property
    def trace_flags(self) -> TraceFlags:
        rare = self._rare
        return _SAMPLED if rare is None else rare.trace_flags

    @property
    def trace_state(self) -> TraceState | None:
        rare = self._rare
        if rare is not None and rare.trace_state is not None:
            return rare.trace_state
        parent = self.parent
        return parent.trace_state if parent is not None else None

    @property
    def sampler_attributes(self) -> Any:  # noqa: ANN401 - the sampler's Attributes
        rare = self._rare
        return None if rare is None else rare.sampler_attributes

    @property
    def links(self) -> tuple[Link, ...]:
        rare = self._rare
        return () if rare is None else rare.links

    @property
    def late(self) -> list[sdk_trace.Event] | None:
        """The events noted while the task runs (stuck), exported with its span."""
        rare = self._rare
        return None if rare is None else rare.late

    def add_late(self, event: sdk_trace.Event) -> None:
        """Note ``event`` for the span's export (the shared unsampled state is not changed)."""
        rare = self._rare
        if rare is None or rare is _UNSAMPLED:
            rare = self._rare = _Rare(self.trace_flags, None, None, ())
        if rare.late is None:
            rare.late = []
        rare.late.append(event)

    def current_context(self) -> otel_context.Context:
        """The task's current context while it attached none: ``inherited`` with this span.

        Made at each call: the runtime context sets it as the current context in the task's
        context at the first ask (``asynctrace_context``), and keeps it there, not here. So
        the handle refers to nothing that refers back to it, and goes with its task by
        reference counting (a handle made in C is never seen by the cycle collector).
        """
        assert self.inherited is not None  # noqa: S101 - only a task's handle is asked
        return trace.set_span_in_context(self, self.inherited)

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

    # A NonRecordingSpan's behaviour: recording nothing, and a context manager that ends it.
    is_recording = NonRecordingSpan.is_recording
    end = NonRecordingSpan.end
    set_attributes = NonRecordingSpan.set_attributes
    set_attribute = NonRecordingSpan.set_attribute
    add_event = NonRecordingSpan.add_event
    add_link = NonRecordingSpan.add_link
    update_name = NonRecordingSpan.update_name
    set_status = NonRecordingSpan.set_status
    record_exception = NonRecordingSpan.record_exception
    __enter__ = NonRecordingSpan.__enter__
    __exit__ = NonRecordingSpan.__exit__


if not TYPE_CHECKING:  # in C: the same class, its handles without a GC header
    _TaskSpan = _native.untracked_copy(_TaskSpan)
NonRecordingSpan.register(_TaskSpan)


@final
class _LazyContext:
    """Puts :class:`TaskSpanRuntimeContext` in place of OpenTelemetry's default runtime context.

    OpenTelemetry selects its runtime context once, when ``opentelemetry.context`` is imported
    (``OTEL_PYTHON_CONTEXT``, an entry point); asynctrace is usually installed later. Where
    the runtime context in use is exactly OpenTelemetry's ``ContextVarsRuntimeContext``, ours
    takes its place, keeping its ``ContextVar`` (so tokens handed out before stay valid), and
    the last :meth:`release` puts it back. That module attribute, ``_RUNTIME_CONTEXT``, is
    private: it has had this name and role since opentelemetry-api 1.0; anything else there
    (another runtime context) leaves the task spans on the path that attaches a context per
    task. Tests: tests/test_lazy_context.py.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._replaced: tuple[ContextVarsRuntimeContext, TaskSpanRuntimeContext] | None = None

    def acquire(self) -> TaskSpanRuntimeContext | None:
        """The runtime context in use if it is (or now is) ours, counted; None if it cannot be."""
        with self._lock:
            runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
            if not isinstance(runtime, TaskSpanRuntimeContext):
                var = getattr(runtime, "_current_context", None)
                plain = type(runtime) is ContextVarsRuntimeContext
                if not plain or not isinstance(var, ContextVar):
                    return None
                assert isinstance(runtime, ContextVarsRuntimeContext)  # noqa: S101 - for mypy
                ours = TaskSpanRuntimeContext(var)
                otel_context._RUNTIME_CONTEXT = ours
                self._replaced = (runtime, ours)
                runtime = ours
            self._users += 1
            return runtime

    def release(self) -> None:
        """One user fewer; the last puts back the runtime context ours replaced, if still ours."""
        with self._lock:
            self._users -= 1
            if self._users or self._replaced is None:
                return
            original, ours = self._replaced
            self._replaced = None
            if getattr(otel_context, "_RUNTIME_CONTEXT", None) is ours:
                otel_context._RUNTIME_CONTEXT = original


LAZY_CONTEXT: Final = _LazyContext()


@final
class _Counts:
    """One thread's sampled task spans: started, and ended (exported, or dropped as internal).

    A start and the read of the sink's ``_closed`` flag happen under ``lock``, which
    ``close()`` takes to read the counts after setting the flag: so each start is either in
    close()'s sum or sees the flag and counts itself. Without it, each side could miss the
    other's write (a store-buffer race, seen on free-threaded 3.14t). Only the owning
    thread and close() take it: uncontended on the hot path. Under the GIL the start and the
    read are ordered with close() by the GIL itself, and the lock (0.5 µs a task) is skipped.
    """

    __slots__ = ("ended", "lock", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.ended = 0


_NOT_OURS: Final = object()


def _random_id(bits: int) -> int:
    """A random id as the SDK's ``RandomIdGenerator`` draws it: never the invalid id (0)."""
    value = random.getrandbits(bits)
    while value == INVALID_SPAN_ID:  # == INVALID_TRACE_ID: both are 0
        value = random.getrandbits(bits)
    return value


def _correlation_of(span: trace.Span) -> object:
    """The correlation id of a span asynctrace made; ``_NOT_OURS`` for anyone else's span."""
    kind = type(span)
    if kind is _TaskSpan:
        return span.correlation_id  # type: ignore[attr-defined]
    if kind is NonRecordingSpan:  # no span (INVALID_SPAN), or a remote parent
        return _NOT_OURS
    if isinstance(span, sdk_trace.Span):  # the full path: made by asynctrace's own tracer
        scope = span.instrumentation_scope
        if scope is not None and scope.name == "asynctrace":
            return (span.attributes or {}).get(ATTR_CORRELATION_ID)
    return _NOT_OURS


def _parent_for(
    here: trace.Span, correlation_id: str | None
) -> tuple[trace.Span, tuple[Link, ...]]:
    """A new span's parent, given the current span ``here``, and its links.

    ``here`` itself, unless it is one of asynctrace's spans of another correlation id: then no
    parent (``INVALID_SPAN``: the root of a new trace) and a link to ``here``.
    """
    if here is INVALID_SPAN:  # no current span, the common root: nobody's
        return here, ()
    owner = _correlation_of(here)
    if owner is not _NOT_OURS and owner != correlation_id:
        return INVALID_SPAN, (Link(here.get_span_context()),)
    return here, ()


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
    cancellation = record.cancellation
    if cancellation is not None:
        attributes[ATTR_CANCEL_REASON] = cancellation.reason
        if cancellation.message is not None:
            attributes[ATTR_CANCEL_MESSAGE] = cancellation.message
        by = cancellation.by
        if by is not None and by.operation_name is not None:
            attributes[ATTR_CANCELLED_BY_OPERATION] = by.operation_name
        if by is not None and by.correlation_id is not None:
            attributes[ATTR_CANCELLED_BY_CORRELATION_ID] = by.correlation_id
    return attributes


def _error_status(exc: BaseException) -> Status:
    # The type only: the message is in the exception event, once (or, by choice, nowhere).
    return Status(StatusCode.ERROR, type(exc).__qualname__)


def _exception_event_attributes(exc: BaseException, *, message: bool) -> dict[str, Any]:
    """The exception event's attributes: the message once, the stack without it."""
    name = type(exc).__qualname__
    stack = "".join(traceback.format_tb(exc.__traceback__))
    attributes: dict[str, Any] = {
        "exception.type": name,
        "exception.stacktrace": f"Traceback (most recent call last):\n{stack}{name}",
        "exception.escaped": "True",
    }
    if message:
        attributes["exception.message"] = str(exc)
    return attributes


_Started = _TaskSpan | trace.Span


@final
class SpanSink(Instrument):
    """Records each task the filter admits, and each correlation block, as a span."""

    _instant = True  # ends the span the moment the task is done (the loop's tap)
    _lean_span = True  # the factory may keep no record: task_begin, task_end (see Hooks)

    def __init__(
        self,
        tracer_provider: trace.TracerProvider,
        task_filter: TaskFilter | None = None,
        version: str = "",
        *,
        exception_messages: bool = True,
        on_unfinished: Callable[[int], None] | None = None,
    ) -> None:
        """Trace with ``tracer_provider``, only tasks whose metadata ``task_filter`` admits.

        ``exception_messages=False`` leaves exception messages out of spans (only the type
        and the stack's frames are recorded), for apps whose messages may carry personal data.
        ``on_unfinished`` is told, at close, how many sampled task spans never ended: their
        tasks were still running when the installation ended, so they are never exported.
        """
        self._messages = exception_messages
        self._on_unfinished = on_unfinished
        self._local = threading.local()
        self._counts: list[_Counts] = []  # one per thread
        self._counts_lock = threading.Lock()
        self._closed = False
        self._provider = tracer_provider
        self._filter = task_filter
        self._tracer = tracer_provider.get_tracer("asynctrace", version)
        self._scope = InstrumentationScope("asynctrace", version)
        # perf_counter_ns() is what the factory records; spans need the epoch.
        self._epoch_offset = time.time_ns() - time.perf_counter_ns()
        self._checked_processors: object = None
        # The SpanHooks made for this sink: told (sync) whenever the state they take changes.
        self._synced: list[Any] = []
        self._fast = False
        # Processors that take task spans as tuples (asynctrace's OTLP lane), when every
        # processor of the provider does: no ReadableSpan is built for a task then.
        self._lanes: tuple[Any, ...] = ()
        self._default_sampler = False
        # The SDK's default id generator: its ids are drawn here, as it draws them (the same
        # random.getrandbits, the same retry on an all-zero id), without two method calls.
        self._random_ids = False
        self._common = False
        # The lazy current span: the runtime context that makes it, while it is in use.
        self._runtime: TaskSpanRuntimeContext | None = None
        if isinstance(self._tracer, sdk_trace.Tracer):
            self._runtime = LAZY_CONTEXT.acquire()
        self._recheck()

    def _recheck(self) -> None:
        self._check()
        for hooks in self._synced:
            hooks.sync()

    def _check(self) -> None:
        tracer = self._tracer
        if not isinstance(tracer, sdk_trace.Tracer):
            self._fast = self._common = False
            return
        self._default_sampler = tracer.sampler.get_description() == _DEFAULT_SAMPLER_DESCRIPTION
        self._random_ids = type(tracer.id_generator) is RandomIdGenerator
        processors = _sdk_processors(tracer)
        self._checked_processors = processors
        if processors is None:
            self._fast = self._common = False
            return
        self._fast = all(
            isinstance(p, _OK_ON_START) or type(p).on_start is sdk_trace.SpanProcessor.on_start
            for p in processors
        )
        lanes = tuple(p for p in processors if callable(getattr(p, "add_task", None)))
        self._lanes = lanes if self._fast and lanes and len(lanes) == len(processors) else ()
        # What SpanHooks.begin takes without a detour (see lean_hooks).
        self._common = (
            self._fast and self._default_sampler and self._random_ids and self._filter is None
        )

    @property
    def fast_path(self) -> bool:
        """Whether spans are built as finished ReadableSpans (see the module docstring)."""
        return self._fast

    def _start(
        self, name: str, correlation_id: str | None, start_ns: int
    ) -> tuple[_Started, object]:
        """Start a span in the current context and make it current; return it and the token.

        Its parent is the current span, unless that is one of asynctrace's spans of another
        correlation id: then it is the root of a new trace, linked to that span.
        """
        current = otel_context.get_current()
        parent, links = _parent_for(trace.get_current_span(current), correlation_id)
        if links:  # no parent in the span's context: the root of a new trace
            current = trace.set_span_in_context(parent, current)
        tracer = self._tracer
        started: _Started
        if isinstance(tracer, sdk_trace.Tracer):
            if _sdk_processors(tracer) is not self._checked_processors:
                self._recheck()  # a processor was added since
            if self._fast:
                started = self._start_fast(tracer, name, correlation_id, current, links)
                return started, otel_context.attach(trace.set_span_in_context(started, current))
        started = tracer.start_span(
            name,
            context=current,
            kind=SpanKind.INTERNAL,
            attributes={ATTR_CORRELATION_ID: correlation_id} if correlation_id else None,
            links=links,
            start_time=start_ns + self._epoch_offset,
        )
        return started, otel_context.attach(trace.set_span_in_context(started, current))

    def _start_fast(  # noqa: PLR0917 - the hot path: positional arguments
        self,
        tracer: sdk_trace.Tracer,
        name: str,
        correlation_id: str | None,
        current: otel_context.Context,
        links: tuple[Link, ...],
        here: trace.Span | None = None,
    ) -> _TaskSpan:
        """A span handle whose parent is ``here``, else the current span of ``current``."""
        if here is None:
            here = trace.get_current_span(current)
        elif not self._default_sampler:  # the sampler sees the parent in its context
            current = trace.set_span_in_context(here, current)
        # No current span (INVALID_SPAN, the common root) needs no look at its context.
        parent: SpanContext | None = None if here is INVALID_SPAN else here.get_span_context()
        random_ids = self._random_ids
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
        else:
            parent = None
            trace_id = _random_id(128) if random_ids else tracer.id_generator.generate_trace_id()
        trace_state: TraceState | None
        if self._default_sampler:
            sampled = parent is None or parent.trace_flags.sampled
            trace_state = parent.trace_state if parent is not None else None
            sampler_attributes = None
        else:
            result = tracer.sampler.should_sample(
                current, trace_id, name, SpanKind.INTERNAL, links=links
            )
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            trace_state, sampler_attributes = result.trace_state, result.attributes
        span_id = _random_id(64) if random_ids else tracer.id_generator.generate_span_id()
        # Children (tasks, HTTP clients, DB drivers) see this span as their parent, sampled
        # or not, so a dropped task also drops its subtree under parent-based samplers.
        return _TaskSpan(
            trace_id,
            span_id,
            _SAMPLED if sampled else _NOT_SAMPLED,
            trace_state,
            parent,
            sampler_attributes,
            correlation_id,
            links,
        )

    def _begin(self, meta: TaskMetadata, created_ns: int) -> _Started | None:
        """Start a task's span in the task's context (see the module docstring for parents).

        None when there is no span to end: filtered out, or not sampled on the fast path (an
        SDK span is ended even when not sampled).
        """
        if self._filter is not None and not self._filter(meta):
            return None
        runtime = self._runtime
        started: _Started
        if runtime is not None and otel_context._RUNTIME_CONTEXT is runtime and self._fast:
            started = self._start_lazy(runtime, meta, created_ns)
        else:
            # In the task's own context, which ends with the task: nothing to detach.
            name = meta.operation_name or _PROVISIONAL_NAME
            started = self._start(name, meta.correlation_id, created_ns)[0]
        if type(started) is not _TaskSpan:
            return started
        if started.trace_flags is not _SAMPLED:  # the fast path's flags are one of two
            return None
        started.created_ns = created_ns
        counts = self._thread_counts()
        if _FREE_THREADED:
            with counts.lock:  # ordered with close(): see _Counts
                counts.started += 1
                closed = self._closed
        else:
            counts.started += 1
            closed = self._closed
        if closed:  # its installation closed as it started: it never ends there
            self._count_unfinished(1)
        return started

    def task_context(self, record: TaskRecord) -> None:
        """Start the task's span (the path with records)."""
        started = self._begin(record.metadata, record.created_ns)
        if started is None:
            return
        record._span = started
        if type(started) is _TaskSpan:  # its SpanContext is built only when asked for
            record.trace_id, record.span_id = started.trace_id, started.span_id
            return
        span_context = started.get_span_context()
        if span_context.trace_flags.sampled:
            record.trace_id, record.span_id = span_context.trace_id, span_context.span_id

    def lean_hooks(
        self,
        speedups: Any = _native,  # noqa: ANN401 - a module: _speedups or its twin
    ) -> tuple[Callable[..., object], Callable[..., None]]:
        """The lean path's pair: :meth:`task_begin` and :meth:`task_end`, or their shortcut.

        Where the span is made lazily current, and the build has a GIL, the common task goes
        through ``SpanHooks`` (``speedups``'s: in C where the extension is built, see
        ``asynctrace._native``), which gives what these two methods give and hands them every
        other case.
        """
        if self._runtime is None or self._filter is not None or _FREE_THREADED:
            return self.task_begin, self.task_end
        hooks = speedups.SpanHooks(
            sink=self,
            handle_type=_TaskSpan,
            task_span=TASK_SPAN,
            context_module=otel_context,
            random_module=random,
            sampled=_SAMPLED,
            finished=FINISHED,
            internal=_INTERNAL_COROUTINES,
            unnamed=_UNNAMED_AFTER_FACTORY,
            provisional=_PROVISIONAL_NAME,
            state=STATE,
            on_error=hook_failed,
            span_key=_SPAN_KEY,
        )
        self._synced.append(hooks)
        if hasattr(hooks, "started"):  # the C version counts its spans itself: summed at close
            with self._counts_lock:
                self._counts.append(hooks)
        return hooks.begin, hooks.end

    def task_begin(self, metadata: TaskMetadata, created_ns: int) -> object:
        """Start the task's span on the lean path; what the factory keeps for the task.

        Called inside the new task's context. The factory keeps the returned entry in place
        of the creation time and hands it to :meth:`task_end`: the span handle itself on the
        fast path, no record and no other object per task.
        """
        started = self._begin(metadata, created_ns)
        if started is None or type(started) is _TaskSpan:
            return started
        return _FullSpan(started, created_ns)

    def _start_lazy(
        self, runtime: TaskSpanRuntimeContext, meta: TaskMetadata, created_ns: int
    ) -> _Started:
        """The fast path's start, with no context attached: the span is current lazily.

        The task's span handle goes in ``TASK_SPAN``, with the OpenTelemetry context the task
        inherited; ``runtime`` makes the context holding the span when code asks for it.
        """
        tracer = self._tracer
        if _sdk_processors(tracer) is not self._checked_processors:  # type: ignore[arg-type]
            self._recheck()  # a processor was added since
            if not self._fast:
                name = meta.operation_name or _PROVISIONAL_NAME
                return self._start(name, meta.correlation_id, created_ns)[0]
        current = runtime._current_context.get()
        creator = TASK_SPAN.get()
        here: trace.Span
        if creator is not None and creator.inherited is current:
            here = creator  # created by a traced task, where its own span is current
        else:
            here = trace.get_current_span(current)
        correlation_id = meta.correlation_id
        here, links = _parent_for(here, correlation_id)
        started = self._start_fast(
            tracer,  # type: ignore[arg-type]
            meta.operation_name or _PROVISIONAL_NAME,
            correlation_id,
            current,
            links,
            here,
        )
        started.inherited = current
        TASK_SPAN.set(started)
        return started

    def _thread_counts(self) -> _Counts:
        """This thread's counts of sampled task spans."""
        try:
            counts: _Counts = self._local.counts
        except AttributeError:
            counts = self._local.counts = _Counts()
            with self._counts_lock:
                self._counts.append(counts)
        return counts

    def close(self) -> None:
        """Count the task spans that never ended (their tasks outlived the installation)."""
        if self._runtime is not None:
            self._runtime = None
            LAZY_CONTEXT.release()
        self._closed = True
        # Before the counts are summed: a span the hooks start after this counts itself.
        for hooks in self._synced:
            hooks.sync()
        with self._counts_lock:
            threads = list(self._counts)
            self._counts.clear()
        unfinished = 0
        for counts in threads:
            with counts.lock:  # a start is either summed here or sees _closed: never neither
                unfinished += counts.started - counts.ended
        if unfinished > 0:
            self._count_unfinished(unfinished)

    def _count_unfinished(self, count: int) -> None:
        """Log and count ``count`` task spans that will never be exported."""
        logger.warning(
            "asynctrace: %d traced task(s) were still running when asynctrace was "
            "uninstalled; their spans are not exported (counted as dropped)",
            count,
        )
        if self._on_unfinished is not None:
            self._on_unfinished(count)

    def correlation_scope(
        self, correlation_id: str, name: str | None
    ) -> Callable[[BaseException | None], None]:
        """Open the block's span, current inside it; the returned callable ends it."""
        start_ns = time.perf_counter_ns()
        started, token = self._start(name or SCOPE_SPAN_NAME, correlation_id, start_ns)

        def end(exc: BaseException | None) -> None:
            end_ns = time.perf_counter_ns() + self._epoch_offset
            otel_context.detach(token)  # type: ignore[arg-type]
            self._end_scope(
                started,
                name=name or SCOPE_SPAN_NAME,
                correlation_id=correlation_id,
                start_ns=start_ns,
                end=end_ns,
                exc=exc,
            )

        return end

    def _end_scope(
        self,
        started: _Started,
        *,
        name: str,
        correlation_id: str,
        start_ns: int,
        end: int,
        exc: BaseException | None,
    ) -> None:
        attributes: dict[str, Any] = {ATTR_CORRELATION_ID: correlation_id}
        failed = exc is not None and not isinstance(exc, asyncio.CancelledError)
        if isinstance(started, _TaskSpan):
            if started.trace_flags.sampled:
                exc = exc if failed else None
                self._emit(started, name, attributes, start_ns=start_ns, end=end, exc=exc)
            return
        if failed and exc is not None:
            self._record_exception(started, exc, end)
        started.end(end_time=end)

    def _record_exception(self, span: trace.Span, exc: BaseException, end: int) -> None:
        """The full path's exception event and status, as the fast path writes them."""
        span.add_event(
            "exception",
            _exception_event_attributes(exc, message=self._messages),
            timestamp=end,
        )
        span.set_status(_error_status(exc))

    def _emit(
        self,
        handle: _TaskSpan,
        name: str,
        attributes: dict[str, Any],
        *,
        start_ns: int,
        end: int,
        exc: BaseException | None,
        late: Sequence[sdk_trace.Event] = (),
    ) -> None:
        """Hand a fast-path span, finished, to the provider's processors."""
        if handle.sampler_attributes:
            attributes = {**handle.sampler_attributes, **attributes}
        events: tuple[sdk_trace.Event, ...] = ()
        status = _UNSET
        if exc is not None:
            status = _error_status(exc)
            attributes_of_event = _exception_event_attributes(exc, message=self._messages)
            events = (sdk_trace.Event("exception", attributes_of_event, end),)
        if late:
            events = (*late, *events)
        tracer = self._tracer
        assert isinstance(tracer, sdk_trace.Tracer)  # noqa: S101 - the fast path needs it
        tracer.span_processor.on_end(
            sdk_trace.ReadableSpan(
                name=name,
                context=handle.get_span_context(),
                parent=handle.parent,
                resource=tracer.resource,
                attributes=attributes,
                events=events,
                links=handle.links,
                kind=SpanKind.INTERNAL,
                status=status,
                start_time=start_ns + self._epoch_offset,
                end_time=end,
                instrumentation_scope=self._scope,
            )
        )

    def task_done(self, task: asyncio.Task[Any], record: TaskRecord) -> None:
        """End the task's span with its outcome (the path with records)."""
        span = record._span
        if span is not None:
            self._end(task, span, record, record.metadata, record.outcome, record.finished_ns)  # type: ignore[arg-type]

    def task_end(
        self,
        task: asyncio.Task[Any],
        entry: _TaskSpan | _FullSpan,
        metadata: TaskMetadata,
        outcome: Outcome,
        finished_ns: int,
    ) -> None:
        """End the span :meth:`task_begin` started, on the lean path (no record)."""
        span = entry if type(entry) is _TaskSpan else entry.span  # type: ignore[union-attr]
        if not self._end(task, span, entry.created_ns, metadata, outcome, finished_ns):
            return
        exemplars = STATE.hooks.exemplars
        if not exemplars:
            return
        if type(span) is _TaskSpan:  # sampled: task_begin keeps no other handle
            trace_id, span_id = span.trace_id, span.span_id
        else:
            span_context = span.get_span_context()
            if not span_context.trace_flags.sampled:
                return
            trace_id, span_id = span_context.trace_id, span_context.span_id
        # The metrics' exemplars (the record path's come through LeanInstrument.task_done).
        duration = finished_ns - entry.created_ns
        call_each(exemplars, STATE.errors, metadata, outcome, duration, trace_id, span_id)

    def _end(  # noqa: PLR0917 - the hot path: positional arguments
        self,
        task: asyncio.Task[Any],
        span: _Started,
        record_or_created_ns: TaskRecord | int,
        metadata: TaskMetadata,
        outcome: Outcome,
        finished_ns: int,
    ) -> bool:
        """End a task's span; False when it is not exported (an internal task's).

        Given the task's record (the path with records), or its creation time (the lean
        path: a record is built only if the span takes the SDK's processors).
        """
        fast = type(span) is _TaskSpan
        if fast:
            self._thread_counts().ended += 1  # exported, or an internal task's: dropped
        if metadata.operation_name is None and (
            getattr(task.get_coro(), "__qualname__", None) in _INTERNAL_COROUTINES
        ):
            return False  # on the full path the span is never ended, so never exported
        end = finished_ns + self._epoch_offset
        exc = task._exception if outcome == EXCEPTION else None
        if fast and self._lanes and _lane_shape(span, outcome):  # type: ignore[arg-type]
            self._to_lanes(task, metadata, span, end, outcome, exc)  # type: ignore[arg-type]
        else:
            record = record_or_created_ns
            if type(record) is int:
                record = _record_of(task, span, record, metadata, outcome, finished_ns)
            self._end_other(task, record, span, end, exc)  # type: ignore[arg-type]
        return True

    def _end_other(
        self,
        task: asyncio.Task[Any],
        record: TaskRecord,
        data: _Started,
        end: int,
        exc: BaseException | None,
    ) -> None:
        """End a span the lane does not take: through the provider's processors."""
        attributes = _attributes(task, record)
        if type(data) is _TaskSpan:
            name = span_name(task, record.metadata)
            late = data.late or ()
            self._emit(
                data,
                name,
                attributes,
                start_ns=record.created_ns,
                end=end,
                exc=exc,
                late=late,
            )
        elif isinstance(data, trace.Span):
            self._end_full(task, record, data, attributes, end)

    def task_stuck(self, task: asyncio.Task[Any], metadata: TaskMetadata, age_s: float) -> None:  # noqa: ARG002
        """Add an ``asynctrace.stuck`` event to the task's span (exported when it ends)."""
        record = task_record(task)
        data = record._span if record is not None else lean_entry(task)
        if type(data) is _FullSpan:
            data = data.span
        attributes = {"asynctrace.age_s": round(age_s, 3)}
        now = time.time_ns()
        if type(data) is _TaskSpan:
            # Kept on the handle: it goes with the span, or with the task if never done.
            data.add_late(sdk_trace.Event(STUCK_EVENT, attributes, now))
        elif isinstance(data, trace.Span):
            data.add_event(STUCK_EVENT, attributes, timestamp=now)

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
            self._record_exception(span, exc, end)
        elif record.outcome == CANCELLED:
            span.set_status(_UNSET)
        span.end(end_time=end)

    def _to_lanes(  # noqa: PLR0917 - the hot path: positional arguments
        self,
        task: asyncio.Task[Any],
        meta: TaskMetadata,
        handle: _TaskSpan,
        end: int,
        outcome: Outcome | None,
        exc: BaseException | None,
    ) -> None:
        """Hand the task's span to the OTLP lane as a tuple (``otlp_encode.TaskSpan``)."""
        parent = handle.parent
        state = handle.trace_state
        task_name = task.get_name()
        span = (
            handle.trace_id,
            handle.span_id,
            parent.span_id if parent is not None else 0,
            parent is not None and parent.is_remote,
            ",".join(f"{k}={v}" for k, v in state.items()) if state else "",
            span_name(task, meta, task_name),
            handle.created_ns + self._epoch_offset,
            end,
            task_name,
            outcome,
            meta.operation_name,
            meta.correlation_id,
            meta.priority_hint,
            None if exc is None else _exception_event_attributes(exc, message=self._messages),
            None if exc is None else type(exc).__qualname__,
        )
        for lane in self._lanes:
            lane.add_task(span)


def _lane_shape(handle: _TaskSpan, outcome: Outcome | None) -> bool:
    """Whether the lane takes this span: the common shape.

    No links, no attributes from the sampler, neither cancelled nor stuck (those take the
    SDK's path, with their attributes and events).
    """
    rare = handle._rare
    common = rare is None or not (rare.links or rare.sampler_attributes or rare.late)
    return common and outcome != CANCELLED


@final
class _FullSpan:
    """What the lean path keeps for a task whose span is an SDK span (the full path)."""

    __slots__ = ("created_ns", "span")

    def __init__(self, span: trace.Span, created_ns: int) -> None:
        self.span = span
        self.created_ns = created_ns


def _record_of(  # noqa: PLR0917
    task: asyncio.Task[Any],
    span: _Started,
    created_ns: int,
    metadata: TaskMetadata,
    outcome: Outcome,
    finished_ns: int,
) -> TaskRecord:
    """A record for a lean-path task whose span takes the SDK's path (made only then)."""
    record = TaskRecord(metadata, created_ns)
    record.finished_ns = finished_ns
    record.outcome = outcome
    if outcome == EXCEPTION:
        record.exception = task._exception
    elif outcome == CANCELLED:
        record.cancellation = cancellation_of(task)
    record._span = span
    return record
