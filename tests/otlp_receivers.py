"""Real OTLP receivers for tests: OTLP/HTTP (protobuf or JSON) and OTLP/gRPC, on 127.0.0.1.

Built from the official opentelemetry-proto message and service definitions. They keep every
``ExportTraceServiceRequest`` they get, flattened into plain span dicts, and the HTTP paths and
content types they were sent with. The HTTP one serves the trace path it is given (by default
``/v1/traces``), as a collector configured for it would, and answers 404 elsewhere.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Received:
    """Spans received so far, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.posts: list[tuple[str, str]] = []  # (path, content type), every POST

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        flat = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    flat.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex() or None,
                            "trace_state": s.trace_state,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "status_code": s.status.code,
                            "links": [(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                            "events": [
                                (e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in s.events
                            ],
                            "resource": resource,
                            "scope": ss.scope.name,
                        }
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(flat)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)


def _base64_ids(node: Any) -> Any:
    """OTLP/JSON carries ids as hex; protobuf's JSON mapping wants base64."""
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
            else _base64_ids(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_base64_ids(v) for v in node]
    return node


def http_receiver(path: str = "/v1/traces") -> Iterator[tuple[str, Received]]:
    """Serve OTLP/HTTP on a free port; yields (base URL, received)."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            content_type = self.headers.get("Content-Type", "")
            with received._lock:
                received.posts.append((self.path, content_type))
            if self.path != path:
                self.send_response(404)
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            if content_type.startswith("application/json"):
                json_format.ParseDict(_base64_ids(json.loads(body)), request)
            else:
                request.ParseFromString(body)
            received.add(request)
            payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """Serve OTLP/gRPC on a free port; yields ("http://127.0.0.1:PORT", received).

    Skips the test where grpcio is not installed (it has no wheel for free-threaded 3.14t,
    where asynctrace is installed without its grpc extra).
    """
    import pytest  # noqa: PLC0415

    grpc = pytest.importorskip("grpc", reason="grpcio is not installed (no 3.14t wheel)")
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc  # noqa: PLC0415

    received = Received()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(  # noqa: N802 - the proto's naming
            self,
            request: trace_service_pb2.ExportTraceServiceRequest,
            context: object,  # noqa: ARG002
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=1).wait(5)
