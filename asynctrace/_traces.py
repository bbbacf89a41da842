"""``python -m asynctrace traces FILE``: trace trees from an OTLP/JSON traces file, in a terminal.

For machines without Jaeger (no Docker): reads the file ``install(traces_file=...)`` writes
(one ``ExportTraceServiceRequest`` per line, the OpenTelemetry Collector's ``file`` exporter
format, so the Collector's files work too), groups the spans by trace, and prints each trace
as a tree: name, duration, correlation id, operation, status and the exception. Standard
library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Span", "add_arguments", "main", "read_spans", "render"]

_ERROR = 2  # StatusCode.ERROR in OTLP


@dataclass
class Span:
    """One span as the file holds it, with its children once the trees are built."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str | None  # the status message (asynctrace: the exception type), or None
    exception: str | None  # "Type: message" from the exception event, or None
    children: list[Span] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        """From start to end, in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def correlation_id(self) -> str | None:
        """The span's ``asynctrace.correlation_id``."""
        value = self.attributes.get("asynctrace.correlation_id")
        return value if isinstance(value, str) else None

    def walk(self) -> Iterator[Span]:
        """This span and every span below it."""
        yield self
        for child in self.children:
            yield from child.walk()


def _value(any_value: dict[str, Any]) -> Any:  # noqa: ANN401 - an attribute's value
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", [])]
    return None


def _attributes(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def read_spans(lines: Iterable[str]) -> list[Span]:
    """Every span of the OTLP/JSON lines; a line that is not such a request is skipped."""
    spans: list[Span] = []
    for line in lines:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if not isinstance(request, dict):
            continue
        for resource_spans in request.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                spans.extend(_span(raw) for raw in scope_spans.get("spans", []))
    return spans


def _span(raw: dict[str, Any]) -> Span:
    status = raw.get("status", {})
    exception = None
    for event in raw.get("events", []):
        if event.get("name") == "exception":
            attributes = _attributes(event.get("attributes", []))
            kind = attributes.get("exception.type", "")
            message = attributes.get("exception.message")
            exception = f"{kind}: {message}" if message else str(kind)
    return Span(
        trace_id=raw.get("traceId", ""),
        span_id=raw.get("spanId", ""),
        parent_id=raw.get("parentSpanId", ""),
        name=raw.get("name", ""),
        start_ns=int(raw.get("startTimeUnixNano", 0)),
        end_ns=int(raw.get("endTimeUnixNano", 0)),
        attributes=_attributes(raw.get("attributes", [])),
        error=(status.get("message") or "ERROR") if status.get("code") == _ERROR else None,
        exception=exception,
    )


def trees(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """The root spans of each trace (a span whose parent is not in the file is a root)."""
    by_trace: dict[str, dict[str, Span]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, {})[span.span_id] = span
    roots: dict[str, list[Span]] = {}
    for trace_id, members in by_trace.items():
        for span in sorted(members.values(), key=lambda s: s.start_ns):
            parent = members.get(span.parent_id) if span.parent_id else None
            if parent is not None and parent is not span:
                parent.children.append(span)
            else:
                roots.setdefault(trace_id, []).append(span)
    return roots


def render(
    roots: dict[str, list[Span]],
    *,
    correlation_id: str | None = None,
    errors_only: bool = False,
    slowest: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the traces the filters keep, slowest first with ``slowest``; how many."""
    selected = []
    for trace_id, trace_roots in roots.items():
        members = [s for root in trace_roots for s in root.walk()]
        if correlation_id is not None and not any(
            s.correlation_id == correlation_id for s in members
        ):
            continue
        if errors_only and not any(s.error for s in members):
            continue
        start = min(s.start_ns for s in members)
        end = max(s.end_ns for s in members)
        selected.append((end - start, start, trace_id, trace_roots, members))
    if slowest is not None:
        selected.sort(key=lambda t: -t[0])
        selected = selected[:slowest]
    else:
        selected.sort(key=lambda t: t[1])
    for duration, _, trace_id, trace_roots, members in selected:
        ids = sorted({s.correlation_id for s in members if s.correlation_id})
        failed = sum(1 for s in members if s.error)
        status = f"  {failed} error(s)" if failed else ""
        out.write(
            f"trace {trace_id}  {len(members)} span(s)  {duration / 1e6:.1f} ms"
            f"  correlation_id={','.join(ids) or '-'}{status}\n"
        )
        for i, root in enumerate(trace_roots):
            _render_span(root, "", last=i == len(trace_roots) - 1, out=out)
        out.write("\n")
    return len(selected)


def _render_span(span: Span, prefix: str, *, last: bool, out: TextIO) -> None:
    branch = "└─ " if last else "├─ "
    parts = [f"{span.name}  {span.duration_ms:.1f} ms"]
    operation = span.attributes.get("asynctrace.operation")
    if operation is not None and operation != span.name:
        parts.append(f"operation={operation}")
    outcome = span.attributes.get("asyncio.task.outcome")
    if outcome == "cancelled":
        parts.append("cancelled")
    if span.error:
        parts.append(f"ERROR {span.exception or span.error}")
    out.write(f"{prefix}{branch}{'  '.join(parts)}\n")
    child_prefix = prefix + ("   " if last else "│  ")
    for i, child in enumerate(span.children):
        _render_span(child, child_prefix, last=i == len(span.children) - 1, out=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``traces`` subcommand's arguments."""
    parser.add_argument("file", type=Path, help="an OTLP/JSON traces file (traces_file=)")
    parser.add_argument("--correlation-id", help="only traces holding this correlation id")
    parser.add_argument("--slowest", type=int, metavar="N", help="the N slowest traces")
    parser.add_argument("--errors", action="store_true", help="only traces with an error")


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run ``traces``: 0 when traces were printed, 1 when none matched, 2 on a bad file."""
    path: Path = args.file
    if args.slowest is not None and args.slowest < 1:
        sys.stderr.write(f"asynctrace traces: --slowest {args.slowest}: expected N >= 1\n")
        return 2
    try:
        with path.open(encoding="utf-8") as lines:
            spans = read_spans(lines)
    except OSError as exc:
        sys.stderr.write(f"asynctrace traces: cannot read {str(path)!r}: {exc.strerror}\n")
        return 2
    shown = render(
        trees(spans),
        correlation_id=args.correlation_id,
        errors_only=args.errors,
        slowest=args.slowest,
        out=out,
    )
    if not shown:
        sys.stderr.write(f"asynctrace traces: no trace in {str(path)!r} matches\n")
        return 1
    return 0
