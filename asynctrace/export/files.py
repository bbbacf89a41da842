"""Spans to a file, in OTLP/JSON: what the OpenTelemetry Collector's file exporter writes."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, final

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["DEFAULT_MAX_BYTES", "OTLPJsonFileSpanExporter", "encode_json"]


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


def encode_json(spans: Sequence[ReadableSpan]) -> str:
    """One ``ExportTraceServiceRequest`` in OTLP/JSON (hex ids, integer enums), one line."""
    from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: PLC0415
        encode_spans,
    )

    message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    return json.dumps(_hex_ids(message), separators=(",", ":"))


DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
_OPEN_FLAGS: Final = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
)


def _open_private(path: Path) -> tuple[int, bool]:
    """Open ``path`` for appending, never through a symlink, readable by its owner only.

    Returns the descriptor and whether it is a regular file (a device such as /dev/null is
    written to, never rotated or chmod-ed).
    """
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    if regular:
        os.fchmod(fd, 0o600)
    return fd, regular


@final
class OTLPJsonFileSpanExporter(SpanExporter):
    """Appends spans to a file in OTLP/JSON, one ``ExportTraceServiceRequest`` per line.

    The encoding the OpenTelemetry Collector's ``file`` exporter writes and its
    ``otlpjsonfile`` receiver reads, so a file can be replayed into Jaeger or Tempo later.

    The file is created readable by its owner only (0600), and never opened through a
    symbolic link. It is bounded: a batch that would take it past ``max_bytes`` first moves it
    to ``<path>.1`` (replacing the previous one), so the two hold at most about twice
    ``max_bytes``. Spans in a replaced ``.1`` file are lost: their count is passed to
    ``on_drop`` (asynctrace counts them in ``asynctrace_spans_dropped_total``).

    Args:
        path: The file; its folder is created if missing.
        max_bytes: The size at which the file is rotated, >= 1024.
        on_drop: Called with the number of spans lost to a rotation.

    Raises:
        ValueError: ``path`` is a symbolic link, or ``max_bytes`` is out of range.
        OSError: ``path`` cannot be created or written.

    Since: 0.1.0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        """Check ``path`` now: a bad one fails here, not at the first export."""
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1024:  # noqa: PLR2004
            raise ValueError(f"Invalid max_bytes: {max_bytes!r}; expected an int >= 1024.")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise ValueError(
                f"Invalid traces_file: {str(self.path)!r} is a symbolic link; asynctrace "
                "does not write through one."
            )
        fd, self._regular = _open_private(self.path)
        try:
            self._size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self._max_bytes = max_bytes
        self._on_drop = on_drop
        self._spans_here = 0  # spans written to the file since it was started
        self._spans_backup = 0  # spans in <path>.1
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one line for this batch, rotating the file first when it is full."""
        line = (encode_json(spans) + "\n").encode()
        lost = 0
        with self._lock:
            if self._regular and self._size and self._size + len(line) > self._max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                lost, self._spans_backup, self._spans_here = self._spans_backup, self._spans_here, 0
                self._size = 0
            fd, _ = _open_private(self.path)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self._size += len(line)
            self._spans_here += len(spans)
        if lost and self._on_drop is not None:
            self._on_drop(lost)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: each export opens and closes the file."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:  # noqa: ARG002
        """Writes are synchronous: nothing is pending."""
        return True
