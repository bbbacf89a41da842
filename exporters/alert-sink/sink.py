"""The webhook receiver exporters/alertmanager/alertmanager.yml sends to (service alert-sink).

    python sink.py [--host 0.0.0.0] [--port 8080]

Stands in for on-call paging and a team's ticket queue in the docker-compose stack: every
notification Alertmanager POSTs is printed as one JSON line (the receiver's path, the status
and each alert's name, job, operation and summary), so `docker compose logs alert-sink` shows
what would have paged. Replace the URLs in alertmanager.yml with your real receivers.
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PRINT = threading.Lock()


def _emit(line: dict[str, object]) -> None:
    """One JSON line, whole (requests are handled in threads)."""
    with _PRINT:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            alerts = [
                {
                    "alertname": a.get("labels", {}).get("alertname"),
                    "job": a.get("labels", {}).get("job"),
                    "operation": a.get("labels", {}).get("operation"),
                    "status": a.get("status"),
                    "summary": a.get("annotations", {}).get("summary"),
                }
                for a in body.get("alerts", [])
            ]
        except (ValueError, AttributeError) as exc:
            _emit({"path": self.path, "error": str(exc)})
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        line = {"path": self.path, "status": body.get("status"), "alerts": alerts}
        _emit(line)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container's service
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    _emit({"listening": server.server_address[1]})
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
