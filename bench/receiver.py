"""A real OTLP/HTTP trace receiver on 127.0.0.1 for the benchmark's exporting modes.

    python bench/receiver.py            # prints its port on the first line, serves until killed

It runs in a process of its own (its CPU is not the app's), accepts ``POST /v1/traces`` with
an OTLP protobuf body, decodes it with opentelemetry-proto (so a malformed export fails the
request, as at a collector), counts the spans, and answers with an empty
``ExportTraceServiceResponse``. ``GET /count`` returns the number of spans received.
"""

from __future__ import annotations

import gzip
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_COUNT = [0]
_LOCK = threading.Lock()
_EMPTY = ExportTraceServiceResponse().SerializeToString()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception:
            self._reply(400, b"")
            return
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with _LOCK:
            _COUNT[0] += n
        self._reply(200, _EMPTY)

    def do_GET(self) -> None:
        with _LOCK:
            body = str(_COUNT[0]).encode()
        self._reply(200, body, "text/plain")

    def _reply(self, status: int, body: bytes, kind: str = "application/x-protobuf") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
