"""Spans to a file, in OTLP/JSON: what the OpenTelemetry Collector's file exporter writes."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, final

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["OTLPJsonFileSpanExporter"]


def _hex_ids(node: Any) -> Any:  # noqa: ANN401 - JSON tree
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping uses base64."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                out[key] = base64.b64decode(value).hex()
            else:
                out[key] = _hex_ids(value)
        return out
    if isinstance(node, list):
        return [_hex_ids(v) for v in node]
    return node


@final
class OTLPJsonFileSpanExporter(SpanExporter):
    """Appends spans to a file in OTLP/JSON, one ``ExportTraceServiceRequest`` per line.

    The encoding the OpenTelemetry Collector's ``file`` exporter writes and its
    ``otlpjsonfile`` receiver reads, so a file can be replayed into Jaeger or Tempo later.

    Since: 0.1.0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Append to ``path`` (created with its folder if missing)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one line for this batch."""
        from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: PLC0415
            encode_spans,
        )

        message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
        line = json.dumps(_hex_ids(message), separators=(",", ":"))
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: each export opens and closes the file."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:  # noqa: ARG002
        """Writes are synchronous: nothing is pending."""
        return True
