"""Collectors that misbehave, on 127.0.0.1, for the fault-injection tests.

- ``refused``: a port nobody listens on;
- ``silent``: accepts connections, reads, never answers (a hung collector);
- ``status``: answers every request with an HTTP status (500 by default);
- ``garbage``: answers every connection with bytes that are not HTTP.

Each is a context manager yielding the base URL, and stops everything it started on exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def refused() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"  # closed again: connecting is refused


@contextlib.contextmanager
def _raw_server(answer: bytes | None) -> Iterator[str]:
    """Accept connections; send ``answer`` (then close) or, with None, hold them silently."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if answer is None:
                held.append(conn)  # read nothing back, answer nothing: a hung peer
            else:
                with conn:
                    conn.settimeout(1)
                    with contextlib.suppress(OSError):
                        conn.recv(65536)
                        conn.sendall(answer)

    thread = threading.Thread(target=serve, name="faulty-collector")
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in held:
            conn.close()


def silent() -> contextlib.AbstractContextManager[str]:
    return _raw_server(None)


def garbage() -> contextlib.AbstractContextManager[str]:
    return _raw_server(b"\x00\xffthis is not HTTP\r\n\r\n" * 4)


@contextlib.contextmanager
def status(code: int = 500) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="faulty-collector")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
