"""The tracing fast lane: direct OTLP encoding, its export thread, and where it is used.

The encoder is checked against the SDK's own: the same span written both ways must decode
(with opentelemetry-proto) to equal messages, for any names, ids, times and attributes
hypothesis picks. The lane is checked against a real OTLP/HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace import _native
from asynctrace._state import STATE
from asynctrace.export import otlp_encode
from asynctrace.export.drops import SpanDrops
from asynctrace.export.lane import MAX_QUEUE_SIZE, OTLPLane, ThreadBatchProcessor, lane_sender
from asynctrace.export.otlp import CountingExporter
from asynctrace.export.setup import LANE_ENV
from asynctrace.sinks.tracing import _FREE_THREADED as FREE_THREADED
from asynctrace.sinks.tracing import SpanSink
from tests.otlp_receivers import Received, http_receiver
from tests.test_native import IMPLEMENTATIONS

# -- the encoder against the SDK's -------------------------------------------------------------

text = st.text(max_size=40)
maybe_text = st.none() | text
ids = st.integers(min_value=1, max_value=2**64 - 1)
times = st.integers(min_value=0, max_value=2**63 - 1)


def _readable(span: otlp_encode.TaskSpan, resource: Resource, scope: InstrumentationScope) -> Any:
    """The ReadableSpan the SDK path builds for the same task span."""
    (
        trace_id, span_id, parent_id, parent_remote, trace_state, name, start, end,
        task_name, outcome, operation, correlation_id, priority_hint, exc_attributes, error,
    ) = span  # fmt: skip
    state = (
        TraceState([tuple(kv.split("=", 1)) for kv in trace_state.split(",")])
        if trace_state
        else None
    )  # type: ignore[misc]
    flags = TraceFlags(TraceFlags.SAMPLED)
    parent = (
        SpanContext(trace_id, parent_id, is_remote=parent_remote, trace_flags=flags)
        if parent_id
        else None
    )
    if isinstance(task_name, int):  # the number of a default name, as the task keeps it
        task_name = f"Task-{task_name}"
    attributes: dict[str, Any] = {"asyncio.task.name": task_name, "asyncio.task.outcome": outcome}
    if operation is not None:
        attributes["asynctrace.operation"] = operation
    if correlation_id is not None:
        attributes["asynctrace.correlation_id"] = correlation_id
    if priority_hint is not None:
        attributes["asynctrace.priority_hint"] = priority_hint
    events = () if exc_attributes is None else (Event("exception", exc_attributes, end),)
    return ReadableSpan(
        name=name,
        context=SpanContext(
            trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=state
        ),
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=events,
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


task_spans = st.tuples(
    st.integers(min_value=1, max_value=2**128 - 1),
    ids,
    st.just(0) | ids,
    st.booleans(),
    st.sampled_from(["", "vendor=value", "a=1,b=2"]),
    text,
    times,
    times,
    text | st.integers(min_value=0, max_value=2**64 - 1),  # a default name's number
    st.sampled_from(["finished", "exception", "cancelled"]),
    maybe_text,
    maybe_text,
    st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.none() | st.dictionaries(st.sampled_from(["exception.type", "exception.message"]), text),
    maybe_text,
)


@settings(max_examples=200, deadline=None)
@given(spans=st.lists(task_spans, min_size=1, max_size=5), service=text, version=text)
def test_encoding_matches_the_sdk(
    spans: list[otlp_encode.TaskSpan], service: str, version: str
) -> None:
    resource = Resource({"service.name": service, "n": 3, "ok": True, "x": 1.5, "l": ["a", "b"]})
    scope = InstrumentationScope("asynctrace", version)
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(
        otlp_encode.encode_request(
            otlp_encode.resource_bytes(dict(resource.attributes), ""),
            otlp_encode.scope_bytes("asynctrace", version),
            [otlp_encode.encode_task_span(s) for s in spans],
        )
    )
    sdk = encode_spans([_readable(s, resource, scope) for s in spans])
    assert ours == sdk


@settings(max_examples=300, deadline=None)
@given(span=task_spans)
def test_c_encoder_writes_the_python_encoders_bytes(span: otlp_encode.TaskSpan) -> None:
    """The C encoder (where built) gives the Python encoder's bytes, or leaves the span to it."""
    c_encode = getattr(_native._module, "encode_task_span", None)
    if _native.IMPLEMENTATION != "c" or c_encode is None:
        pytest.skip("the C accelerator is not in use")
    data = c_encode(span)
    if span[12] is not None or span[13] is not None:
        assert data is None  # an exception event or a priority hint: Python's to write
    else:
        assert data == otlp_encode.encode_task_span_python(span)


@pytest.mark.parametrize("size", [0, 1, 90, 16_200, 16_400, 70_000])
@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600"])
def test_c_encoder_frames_spans_of_any_length(size: int, char: str) -> None:
    """The C encoder's span framing: its length takes 1, 2 or 3 bytes, multi-byte UTF-8."""
    c_encode = getattr(_native._module, "encode_task_span", None)
    if _native.IMPLEMENTATION != "c" or c_encode is None:
        pytest.skip("the C accelerator is not in use")
    text = char * size
    for span in (
        (2**128 - 1, 2**64 - 1, 2**64 - 1, True, "", text, 1, 2, "t", "finished", None, None,
         None, None, None),
        (1, 1, 0, False, "", "", 0, 0, text, "cancelled", text, "c", None, None, text),
    ):  # fmt: skip
        data = c_encode(span)
        assert data == otlp_encode.encode_task_span_python(span)
        assert otlp_encode.encode_task_spans([span, span]) == data * 2


@pytest.mark.parametrize("trace_id", [2**128, -1])
def test_c_encoder_names_a_trace_id_out_of_range(trace_id: int) -> None:
    c_encode = getattr(_native._module, "encode_task_span", None)
    if _native.IMPLEMENTATION != "c" or c_encode is None:
        pytest.skip("the C accelerator is not in use")
    span = (trace_id, 1, 0, False, "", "s", 0, 0, "t", "finished", None, None, None, None, None)
    with pytest.raises(
        ValueError, match=rf"the trace id must be an int in \[0, 2\*\*128\), got {trace_id}"
    ):
        c_encode(span)


@settings(max_examples=200, deadline=None)
@given(spans=st.lists(task_spans, max_size=6))
def test_a_batch_is_its_spans_bytes_one_after_the_other(spans: list[otlp_encode.TaskSpan]) -> None:
    """encode_task_spans (C where built, and the twin) gives each span's bytes in order."""
    expected = b"".join(otlp_encode.encode_task_span_python(s) for s in spans)
    assert otlp_encode.encode_task_spans(list(spans)) == expected
    twin = importlib.import_module("asynctrace._speedups_py")
    assert twin.encode_task_spans(list(spans), otlp_encode.encode_task_span_python) == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def test_a_batch_refuses_what_it_cannot_write(impl: ModuleType) -> None:
    span = (1, 2, 0, False, "", "t", 10, 20, "Task-1", "finished", None, None, 3, None, None)
    python = otlp_encode.encode_task_span_python
    with pytest.raises(TypeError, match="a list, a callable, and a list or None"):
        impl.encode_task_spans((span,), python)
    with pytest.raises(TypeError, match="a list, a callable, and a list or None"):
        impl.encode_task_spans([span], None)
    with pytest.raises(TypeError, match="a list, a callable, and a list or None"):
        impl.encode_task_spans([span], python, ())
    with pytest.raises(TypeError, match=r"expected a 15-tuple, got \(1, 2, 0\)"):
        impl.encode_task_spans([span[:3]], python)
    with pytest.raises(TypeError, match=r"expected a 15-tuple, got 'other'"):
        impl.encode_task_spans(["other"], python)  # without others: refused
    with pytest.raises(TypeError, match="fallback gave 'text', not bytes"):
        impl.encode_task_spans([span], lambda _span: "text")  # the priority hint: fallback's


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda m: m.IMPLEMENTATION)
def test_a_batch_hands_back_what_is_not_a_task_span(impl: ModuleType) -> None:
    """With ``others``, what is not a tuple is set aside, in order; the rest is encoded."""
    spans = [_span(1), "sdk-span-a", _span(2), 3, _span(3)]
    others: list[object] = []
    data = impl.encode_task_spans(spans, otlp_encode.encode_task_span_python, others)
    assert others == ["sdk-span-a", 3]
    assert data == b"".join(otlp_encode.encode_task_span_python(_span(i)) for i in (1, 2, 3))
    with pytest.raises(TypeError, match=r"expected a 15-tuple, got \(1, 2\)"):
        impl.encode_task_spans([(1, 2)], otlp_encode.encode_task_span_python, [])


def test_requests_concatenate() -> None:
    """A lane's request mixes its task spans with spans the SDK encoded: both are kept."""
    resource = Resource({"service.name": "s"})
    scope = InstrumentationScope("asynctrace", "1")
    span = (1, 2, 0, False, "", "t", 10, 20, "Task-1", "finished", None, None, None, None, None)
    ours = otlp_encode.encode_request(
        otlp_encode.resource_bytes(dict(resource.attributes)),
        otlp_encode.scope_bytes("asynctrace", "1"),
        [otlp_encode.encode_task_span(span)],
    )
    theirs = encode_spans([_readable(span, resource, scope)]).SerializeToString()
    both = ExportTraceServiceRequest()
    both.ParseFromString(ours + theirs)
    assert len(both.resource_spans) == 2
    assert [s.name for rs in both.resource_spans for ss in rs.scope_spans for s in ss.spans] == [
        "t",
        "t",
    ]


# -- the lane's queue and thread ---------------------------------------------------------------


def _span(i: int) -> otlp_encode.TaskSpan:
    return (
        i,
        i,
        0,
        False,
        "",
        f"s{i}",
        1,
        2,
        f"Task-{i}",
        "finished",
        None,
        None,
        None,
        None,
        None,
    )


def test_full_queue_drops_and_counts() -> None:
    release = threading.Event()
    bodies: list[bytes] = []

    def send(body: bytes) -> bool:
        release.wait(10)
        bodies.append(body)
        return True

    drops = SpanDrops()
    lane = OTLPLane(
        send, "test lane", drops, ({}, ""), ("asynctrace", ""), max_queue_size=10, batch_size=5
    )
    for i in range(1, 31):
        lane.add_task(_span(i))
    # at most the queue's 10 wait, and one batch of 5 may be at the (blocked) collector
    assert drops.total_dropped() >= 30 - 10 - 5
    release.set()
    assert lane.force_flush(10_000)
    lane.shutdown_within(5)
    received = 0
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        received += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    assert received + drops.total_dropped() == 30
    assert 10 <= received <= 15


def test_failed_send_is_counted_never_raised() -> None:
    def send(body: bytes) -> bool:
        raise ConnectionError("collector down")

    drops = SpanDrops()
    lane = OTLPLane(send, "down lane", drops, ({}, ""), ("asynctrace", ""))
    lane.add_task(_span(1))
    lane.force_flush(5_000)
    lane.shutdown_within(5)
    assert drops.total_dropped() == 1
    assert asynctrace.telemetry_errors().get("down lane", 0) >= 1


def _held_lane(name: str, **options: Any) -> tuple[OTLPLane, SpanDrops, threading.Event]:
    """A lane whose collector holds every request until the event is set (at most 30 s)."""
    release = threading.Event()

    def send(body: bytes) -> bool:
        release.wait(30)
        return True

    drops = SpanDrops()
    lane = OTLPLane(send, name, drops, ({}, ""), ("asynctrace", ""), **options)
    return lane, drops, release


def test_shutdown_with_a_hung_collector_is_bounded() -> None:
    lane, drops, hang = _held_lane("hung lane", schedule_delay_s=0.01)
    lane.add_task(_span(1))
    assert lane.shutdown_within(0.3) is False
    assert drops.total_dropped() == 1
    hang.set()


def _recording_lane(
    name: str, **options: Any
) -> tuple[OTLPLane, list[int], threading.Event, threading.Event]:
    """A lane whose sends record their span counts; the first send waits for ``release``."""
    sizes: list[int] = []
    sending, release = threading.Event(), threading.Event()

    def send(body: bytes) -> bool:
        sending.set()
        release.wait(10)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        sizes.append(sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans))
        return True

    lane = OTLPLane(send, name, SpanDrops(), ({}, ""), ("asynctrace", ""), **options)
    return lane, sizes, sending, release


def test_spans_that_come_during_a_send_wait_for_a_full_batch() -> None:
    """Under steady load a request takes a full batch, not the few that came during the last.

    Sending whatever waited each time the thread woke made requests ever smaller, and each
    costs the export thread the GIL several times, whatever its size.
    """
    lane, sizes, sending, release = _recording_lane("steady lane", batch_size=4)
    for i in range(4):
        lane.add_task(_span(i + 1))
    assert sending.wait(10)  # the full batch is on the wire
    lane.add_task(_span(5))  # arrives meanwhile
    release.set()
    deadline = time.monotonic() + 10
    while not sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough for a send of the one that waits
    assert sizes == [4]
    for i in range(3):
        lane.add_task(_span(i + 6))
    assert lane.force_flush(10_000)
    assert sizes == [4, 4]
    lane.add_task(_span(9))
    assert lane.force_flush(10_000)  # a flush sends a partial batch at once
    assert sizes == [4, 4, 1]
    assert lane.shutdown_within(5)


def test_a_partial_send_takes_only_what_waited_when_it_began() -> None:
    """At the delay a partial batch goes; spans that come during its send wait for the next."""
    lane, sizes, sending, release = _recording_lane(
        "moderate lane", batch_size=100, schedule_delay_s=0.5
    )
    lane.add_task(_span(1))
    assert sending.wait(10)  # the delay passed: the one span is on the wire
    lane.add_task(_span(2))  # arrives meanwhile
    release.set()
    deadline = time.monotonic() + 10
    while not sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.15)  # time enough for a send of the one that came meanwhile
    assert sizes == [1]
    while len(sizes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sizes == [1, 1]  # at the next delay
    assert lane.shutdown_within(5)


def test_a_partial_batch_goes_after_the_schedule_delay() -> None:
    lane, sizes, _, release = _recording_lane("quiet lane", batch_size=100, schedule_delay_s=0.2)
    release.set()
    added = time.monotonic()
    lane.add_task(_span(1))
    deadline = added + 10
    while not sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sizes == [1]
    assert time.monotonic() - added >= 0.15
    assert lane.shutdown_within(5)


@pytest.mark.parametrize("fails", [False, True])
def test_the_export_thread_is_at_work_while_it_sends(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """Loops hand it the GIL while it sends (see _speedups_py.exporting); never after."""
    calls: list[int] = []
    monkeypatch.setattr(_native, "exporting", calls.append)
    during: list[list[int]] = []

    def send(body: bytes) -> bool:
        during.append(list(calls))
        if fails:
            raise ConnectionError("collector down")
        return True

    lane = OTLPLane(send, "working lane", SpanDrops(), ({}, ""), ("asynctrace", ""))
    lane.add_task(_span(1))
    assert lane.force_flush(10_000) or fails
    assert during == [[1]]
    assert calls == [1, -1]
    assert lane.shutdown_within(5)
    assert calls == [1, -1]  # nothing left to send: not at work again


def test_sender_needs_the_sdk_client() -> None:
    assert lane_sender(object()) is None

    class Client:
        def export(self, body: bytes) -> Any:
            class Result:
                success = body == b"ok"

            return Result()

    class Exporter:
        _client = Client()

    send = lane_sender(Exporter())
    assert send is not None
    assert send(b"ok") is True
    assert send(b"no") is False


# -- in an installation, against a real receiver ---------------------------------------------


@pytest.fixture
def otlp_http() -> Iterator[tuple[str, Received]]:
    yield from http_receiver()


def _sink_lanes() -> tuple[Any, ...]:

    sinks = [i for i in STATE.hooks.instruments if isinstance(i, SpanSink)]
    return sinks[0]._lanes


async def _burst(n: int) -> None:
    async def ok() -> None:
        await asyncio.sleep(0)

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad item")

    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(ok())
    with pytest.raises(ValueError, match="bad item"):
        await asynctrace.create_task(boom(), operation_name="boom")


@pytest.mark.asyncio
async def test_burst_exported_whole_through_the_lane(otlp_http: tuple[str, Received]) -> None:
    """3000 task spans at once (beyond the SDK's 2048 queue): every one arrives, decoded."""
    url, received = otlp_http
    asynctrace.install(otlp_endpoint=url, registry=CollectorRegistry(), service_name="lane-test")
    assert _sink_lanes()  # the lane took over from the SDK's batch processor
    with asynctrace.correlation("req-1", span_name="request"):
        await _burst(3000)
    assert asynctrace.flush(20)
    asynctrace.uninstall()
    spans = received.snapshot()
    tasks = [s for s in spans if s["attributes"].get("asyncio.task.outcome")]
    assert len(tasks) == 3000 + 1  # the burst and the failing task
    boom = [s for s in spans if s["name"] == "boom"]
    assert len(boom) == 1
    assert boom[0]["status_code"] == StatusCode.ERROR.value
    assert boom[0]["attributes"]["asynctrace.correlation_id"] == "req-1"
    assert {s["resource"]["service.name"] for s in spans} == {"lane-test"}
    scope = [s for s in spans if s["name"] == "request"]  # a ReadableSpan, in the same lane
    assert len(scope) == 1
    assert all(s["trace_id"] == scope[0]["trace_id"] for s in tasks)


@pytest.mark.asyncio
async def test_default_task_names_are_exported_as_get_name_gives_them(
    otlp_http: tuple[str, Received],
) -> None:
    """The C hooks read a task's name (and coroutine) where the C task keeps them once found
    there (3.14 keeps the number of a default name until asked: the encoder makes "Task-n");
    every exported name is what get_name() gives, asked after.
    """
    url, received = otlp_http
    asynctrace.install(otlp_endpoint=url, registry=CollectorRegistry(), loop_monitor=False)

    async def leaf() -> None:
        await asyncio.sleep(0)

    tasks = [asyncio.create_task(leaf()) for _ in range(10)]
    tasks += [asyncio.create_task(leaf(), name=f"named-{i}") for i in range(5)]
    await asyncio.gather(*tasks)
    if _native.IMPLEMENTATION == "c" and not FREE_THREADED:
        (sink,) = [i for i in STATE.hooks.instruments if isinstance(i, SpanSink)]
        reads = sink._synced[-1].reads_task_fields
        assert reads["name"]
        assert reads["coro"]
        assert reads["name_number"] == (sys.version_info >= (3, 14))  # 3.14's lazy names
    assert asynctrace.flush(10)
    asynctrace.uninstall()
    exported = {
        s["attributes"]["asyncio.task.name"]: s["name"]
        for s in received.snapshot()
        if s["attributes"].get("asyncio.task.outcome")
    }
    for task in tasks:
        name = task.get_name()
        assert exported[name] == (name if name.startswith("named-") else leaf.__qualname__)


@pytest.mark.asyncio
async def test_c_hooks_hand_the_lane_span_records_and_keep_their_ids_as_exemplars(
    otlp_http: tuple[str, Received],
) -> None:
    """On the C path a common task span reaches the lane as a SpanRecord (ids and times in C,
    untracked by the collector): it unpacks as the TaskSpan tuple, the C encoder writes it as
    the Python encoder writes that tuple, and the duration bucket's exemplar carries its ids
    (kept as C values by the C Counts, made ints when the registry is read).
    """
    if _native.IMPLEMENTATION != "c" or FREE_THREADED:
        pytest.skip("the C span hooks are not in use")
    import gc  # noqa: PLC0415

    from prometheus_client.openmetrics.exposition import generate_latest  # noqa: PLC0415

    url, received = otlp_http
    registry = CollectorRegistry()
    asynctrace.install(otlp_endpoint=url, registry=registry, loop_monitor=False)
    lane = _sink_lanes()[0]
    batches: list[list[Any]] = []
    export = lane._export

    def keep(batch: list[Any]) -> None:
        batches.append(list(batch))
        export(batch)

    lane._export = keep

    async def leaf() -> None:
        await asyncio.sleep(0)

    with asynctrace.correlation("req-r"):
        await asynctrace.create_task(leaf(), operation_name="recorded")
    await asyncio.create_task(leaf())  # a default name (3.14: its number) and no operation
    assert asynctrace.flush(10)
    text = generate_latest(registry).decode()
    asynctrace.uninstall()
    records = [r for batch in batches for r in batch if type(r).__name__ == "SpanRecord"]
    assert len(records) == 2
    for record in records:
        assert not gc.is_tracked(record)
        span = tuple(record)
        assert len(span) == 15
        assert span[4] == ""
        assert span[12:] == (None, None, None)
        assert otlp_encode.encode_task_span(record) == otlp_encode.encode_task_span_python(span)
    recorded = next(tuple(r) for r in records if tuple(r)[10] == "recorded")
    assert recorded[9:12] == ("finished", "recorded", "req-r")
    (sent,) = [s for s in received.snapshot() if s["name"] == "recorded"]
    assert sent["trace_id"] == f"{recorded[0]:032x}"
    line = next(
        line for line in text.splitlines() if 'operation="recorded"' in line and "trace_id" in line
    )
    assert f'trace_id="{recorded[0]:032x}"' in line
    assert f'span_id="{recorded[1]:016x}"' in line


@pytest.mark.asyncio
async def test_task_spans_reach_the_lane_without_a_python_call(
    otlp_http: tuple[str, Received],
) -> None:
    """On the C path a task's span goes into the lane's LaneQueue with no Python call at all."""
    if _native.IMPLEMENTATION != "c" or FREE_THREADED:
        pytest.skip("the C span hooks are not in use")
    url, received = otlp_http
    asynctrace.install(otlp_endpoint=url, registry=CollectorRegistry(), loop_monitor=False)
    lane = _sink_lanes()[0]
    assert type(lane.add_task).__name__ == "LaneQueue"

    async def leaf() -> None:
        await asyncio.sleep(0)

    calls: list[str] = []

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call":
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    tasks = [asynctrace.create_task(leaf(), operation_name="leaf") for _ in range(20)]
    sys.setprofile(profile)
    try:
        await asyncio.gather(*tasks)
    finally:
        sys.setprofile(None)
    assert lane.add_task.handed >= 20
    assert asynctrace.flush(10)
    asynctrace.uninstall()
    package = str(Path(asynctrace.__file__).parent)
    assert [c for c in calls if c.startswith(package)] == []
    assert sum(s["name"] == "leaf" for s in received.snapshot()) == 20


def test_lane_counts_what_its_queue_refuses_and_what_is_left() -> None:
    """The lane's SpanDrops sees through its queue: refused, waiting and pending spans."""
    lane, drops, release = _held_lane("counted lane", max_queue_size=4, batch_size=2)
    for i in range(1, 4):
        lane.add_task(_span(i))
    assert 1 <= drops.pending() <= 3  # waiting, or taken by the blocked export
    with pytest.raises(ValueError, match="SpanDrops.through: spans already enter through"):
        drops.through(lane.add_task)  # type: ignore[arg-type]
    assert lane.shutdown_within(0.2) is False  # the export hangs: all three are counted lost
    assert (drops.total_dropped(), drops.pending()) == (3, 0)
    lane.add_task(_span(4))  # after shutdown: refused and counted
    assert drops.total_dropped() == 4
    assert lane.add_task.closed
    release.set()


@pytest.mark.asyncio
async def test_a_remote_parents_trace_state_goes_with_every_task_span(
    otlp_http: tuple[str, Received],
) -> None:
    """Under a remote parent with a trace state, each task span carries it: the first task's
    span has it from the remote parent, its children's from theirs (none of them keeps it).
    """
    url, received = otlp_http
    asynctrace.install(otlp_endpoint=url, registry=CollectorRegistry())
    remote = SpanContext(
        0xABC,
        0xDEF,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "x"), ("other", "y")]),
    )

    async def leaf() -> None:
        await asyncio.sleep(0)

    async def handler() -> None:
        await asynctrace.create_task(leaf(), operation_name="child")
        trace.get_current_span()  # its span made current: its next child still its own
        await asynctrace.create_task(leaf(), operation_name="second")

    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(remote)))
    try:
        await asynctrace.create_task(handler(), operation_name="handler")
    finally:
        otel_context.detach(token)
    assert asynctrace.flush(20)
    asynctrace.uninstall()
    spans = {s["name"]: s for s in received.snapshot()}
    assert {s["trace_state"] for s in spans.values()} == {"vendor=x,other=y"}
    assert {s["trace_id"] for s in spans.values()} == {f"{0xABC:032x}"}
    handler_id = spans["handler"]["span_id"]
    assert spans["handler"]["parent_span_id"] == f"{0xDEF:016x}"
    assert spans["child"]["parent_span_id"] == spans["second"]["parent_span_id"] == handler_id


@pytest.mark.asyncio
async def test_lane_sends_headers_and_gzip(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK exporter's client sends: its headers and compression settings apply."""
    seen: list[tuple[str | None, str | None, int]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            encoding = self.headers.get("Content-Encoding")
            request = ExportTraceServiceRequest()
            request.ParseFromString(gzip.decompress(body) if encoding == "gzip" else body)
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            seen.append((self.headers.get("x-api-key"), encoding, n))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=k3y")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    try:
        asynctrace.install(
            otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}", metrics=False
        )
        assert _sink_lanes()
        await asyncio.gather(*(asyncio.sleep(0) for _ in range(20)))
        assert asynctrace.flush(10)
        asynctrace.uninstall()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert seen
    assert {(key, encoding) for key, encoding, _ in seen} == {("k3y", "gzip")}
    assert sum(n for *_, n in seen) >= 20


@pytest.mark.asyncio
async def test_lane_can_be_turned_off(
    otlp_http: tuple[str, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LANE_ENV, "0")
    url, received = otlp_http
    asynctrace.install(otlp_endpoint=url, metrics=False)
    assert _sink_lanes() == ()
    await asyncio.gather(*(asyncio.sleep(0) for _ in range(5)))
    assert asynctrace.flush(10)
    asynctrace.uninstall()
    assert len(received.snapshot()) >= 5


@pytest.mark.asyncio
async def test_app_provider_keeps_the_full_path(otlp_http: tuple[str, Received]) -> None:
    """An app's own SDK provider with its processors: no lane, its processors get spans."""
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    asynctrace.install(tracer_provider=provider, metrics=False)
    assert _sink_lanes() == ()
    await asyncio.gather(*(asyncio.sleep(0) for _ in range(5)))
    asynctrace.uninstall()
    assert len(memory.get_finished_spans()) >= 5


def test_thread_batch_processor_exports_counts_and_stops() -> None:
    """The batch processor for isolated interpreters: a plain thread, bounded, counted."""
    release = threading.Event()
    exported: list[ReadableSpan] = []

    class Blocked(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)
            exported.extend(spans)
            return SpanExportResult.SUCCESS

    drops = SpanDrops()
    processor = ThreadBatchProcessor(CountingExporter(Blocked(), "blocked", drops), drops)
    assert processor._thread.daemon is False
    sampled = TraceFlags(TraceFlags.SAMPLED)
    ended = MAX_QUEUE_SIZE + 600
    for i in range(1, ended + 1):
        processor.on_end(
            ReadableSpan(
                name=f"s{i}", context=SpanContext(i, i, is_remote=False, trace_flags=sampled)
            )
        )
    assert drops.total_dropped() >= ended - MAX_QUEUE_SIZE - 512
    release.set()
    assert processor.force_flush(10_000)
    assert processor.shutdown_within(5)
    assert not processor._thread.is_alive()
    assert len(exported) + drops.total_dropped() == ended
