"""OTLP protobuf, written directly: task spans from compact records, no message objects.

The SDK's encoder builds a protobuf message object per span, attribute and value, then
serializes it: about 50-70 µs a span here. Task spans all have one shape, so their bytes are
written straight from a tuple (:data:`TaskSpan`), with the constant parts encoded once. The
output is ``opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`` as the SDK
writes it for the same span (tests/test_lane.py decodes both with opentelemetry-proto and
compares them).

Wire format, for the reader: a field is a varint key ``(number << 3) | wire type`` (0 varint,
1 fixed64, 2 length-delimited, 5 fixed32), then its value. Serialized messages concatenate
into one: the repeated fields of both are kept, which is how a request mixes these spans with
spans the SDK encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from asynctrace import _native

__all__ = [
    "TaskSpan",
    "encode_key_values",
    "encode_request",
    "encode_task_span",
    "encode_task_span_python",
    "encode_task_spans",
    "scope_bytes",
]

# A task span, as the span sink hands it over (all plain values):
# (trace_id, span_id, parent_span_id (0: a root), parent_is_remote, trace_state ("" none),
#  name, start (ns since the epoch), end, task_name (a str, or the number n of the default
#  name "Task-n" as the task keeps it until asked), outcome, operation (or None),
#  correlation_id (or None), priority_hint (or None), exception event attributes (or None),
#  exception type name (or None: status UNSET))
TaskSpan = tuple[
    int, int, int, bool, str, str, int, int, str | int, str,
    str | None, str | None, int | None, Mapping[str, Any] | None, str | None,
]  # fmt: skip

_native_encode: Final = _native.encode_task_span
_native_encode_all: Final = _native.encode_task_spans
_pack_q: Final = struct.Struct("<Q").pack
_pack_d: Final = struct.Struct("<d").pack
_HAS_IS_REMOTE: Final = 0x100  # SpanFlags: the parent's is_remote is known
_IS_REMOTE: Final = 0x200
_KIND_INTERNAL: Final = b"\x30\x01"  # Span.kind = SPAN_KIND_INTERNAL
_STATUS_UNSET: Final = b"\x7a\x00"  # Span.status, empty (code UNSET), as the SDK writes it
_FLAGS_LOCAL: Final = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE)
_FLAGS_REMOTE: Final = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)


_SEVEN_BITS: Final = 0x80


def _varint(n: int) -> bytes:
    if n < _SEVEN_BITS:
        return bytes((n,))
    out = bytearray()
    while n >= _SEVEN_BITS:
        out.append((n & 0x7F) | _SEVEN_BITS)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag already holds number and wire type 2)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:  # noqa: PLR0911 - one return per value type
    """An AnyValue message (the SDK's attribute value types)."""
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    return _field(0x0A, str(value).encode())


def _key_value(key: str, value: object) -> bytes:
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


def encode_key_values(tag: int, attributes: Mapping[str, object]) -> bytes:
    """Each attribute as a KeyValue field with ``tag`` (the containing message's field)."""
    return b"".join(_field(tag, _key_value(k, v)) for k, v in attributes.items())


def _str_attribute(key: str) -> bytes:
    """The constant start of a Span attribute whose value is a string (key encoded once)."""
    return _field(0x0A, key.encode())


_TASK_NAME: Final = _str_attribute("asyncio.task.name")
_OUTCOME: Final = _str_attribute("asyncio.task.outcome")
_OPERATION: Final = _str_attribute("asynctrace.operation")
_CORRELATION_ID: Final = _str_attribute("asynctrace.correlation_id")
_PRIORITY_HINT: Final = _field(0x0A, b"asynctrace.priority_hint")


def _span_str_attr(prefix: bytes, value: str) -> bytes:
    raw = value.encode()
    any_value = b"\x0a" + _varint(len(raw)) + raw
    kv = prefix + b"\x12" + _varint(len(any_value)) + any_value
    return b"\x4a" + _varint(len(kv)) + kv


def encode_task_span(span: TaskSpan) -> bytes:
    """One Span message, field by field in the SDK's order (see the module docstring).

    With the C accelerator the common span (no exception event, no priority hint) is written
    in C (``_speedups.encode_task_span``, tested to give these same bytes); this function is
    its specification, and writes the rest.
    """
    data: bytes | None = _native_encode(span)
    if data is not None:
        return data
    return encode_task_span_python(span)


def encode_task_spans(spans: list[Any], others: list[Any] | None = None) -> bytes:
    """:func:`encode_task_span` of each span, one after the other: what a request's scope holds.

    With the C accelerator the whole batch is written in one buffer (no bytes object per span,
    one copy), the uncommon spans by :func:`encode_task_span_python`. With a list as
    ``others``, what in ``spans`` is not a task span tuple is appended there, not encoded.
    """
    data: bytes = _native_encode_all(spans, encode_task_span_python, others)
    return data


def encode_task_span_python(span: TaskSpan) -> bytes:
    """:func:`encode_task_span` in Python: every span, field by field."""
    (
        trace_id, span_id, parent_id, parent_remote, trace_state, name, start, end,
        task_name, outcome, operation, correlation_id, priority_hint, exc_attributes, error,
    ) = span  # fmt: skip
    parts = [
        b"\x0a\x10" + trace_id.to_bytes(16, "big"),
        b"\x12\x08" + span_id.to_bytes(8, "big"),
    ]
    if trace_state:
        parts.append(_field(0x1A, trace_state.encode()))
    if parent_id:
        parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
    raw_name = name.encode()
    parts += (
        b"\x2a" + _varint(len(raw_name)) + raw_name,
        _KIND_INTERNAL,
        b"\x39" + _pack_q(start),
        b"\x41" + _pack_q(end),
        _span_str_attr(
            _TASK_NAME, f"Task-{task_name}" if isinstance(task_name, int) else task_name
        ),
        _span_str_attr(_OUTCOME, outcome),
    )
    if operation is not None:
        parts.append(_span_str_attr(_OPERATION, operation))
    if correlation_id is not None:
        parts.append(_span_str_attr(_CORRELATION_ID, correlation_id))
    if priority_hint is not None:
        kv = _PRIORITY_HINT + _field(0x12, _any_value(priority_hint))
        parts.append(_field(0x4A, kv))
    if exc_attributes is not None:
        event = b"\x09" + _pack_q(end) + _field(0x12, b"exception")
        event += encode_key_values(0x1A, exc_attributes)
        parts.append(_field(0x5A, event))
    if error is None:
        parts.append(_STATUS_UNSET)
    else:
        parts.append(_field(0x7A, _field(0x12, error.encode()) + b"\x18\x02"))
    parts.append(_FLAGS_REMOTE if parent_remote and parent_id else _FLAGS_LOCAL)
    body = b"".join(parts)
    return b"\x12" + _varint(len(body)) + body  # ScopeSpans.spans (field 2)


def scope_bytes(name: str, version: str) -> bytes:
    """ScopeSpans.scope (field 1): the InstrumentationScope, encoded once."""
    scope = _field(0x0A, name.encode())
    if version:
        scope += _field(0x12, version.encode())
    return _field(0x0A, scope)


def resource_bytes(attributes: Mapping[str, object], schema_url: str = "") -> tuple[bytes, bytes]:
    """ResourceSpans.resource (field 1) and its schema_url (field 3), encoded once."""
    resource = _field(0x0A, encode_key_values(0x0A, attributes))
    schema = _field(0x1A, schema_url.encode()) if schema_url else b""
    return resource, schema


def encode_request(resource: tuple[bytes, bytes], scope: bytes, spans: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest of one resource and one scope holding encoded ``spans``.

    Written in one join (the lengths added up first): a lane's request is megabytes, and each
    copy of it is a fresh allocation the kernel maps page by page.
    """
    parts = list(spans)
    scope_len = len(scope) + sum(len(part) for part in parts)
    scope_head = b"\x12" + _varint(scope_len)
    head, tail = resource
    resource_len = len(head) + len(scope_head) + scope_len + len(tail)
    return b"".join((b"\x0a", _varint(resource_len), head, scope_head, scope, *parts, tail))
