"""A tiny HTTP/1.1 upstream for checking the edge config on its own (the api has its own edge test).

Routes: ``/health``, ``/ready``, ``/metrics`` (must never be reachable through the edge), ``/v1/echo`` (the
request line and headers as JSON), ``/v1/stream`` (SSE: ``n`` events ``gap`` seconds apart), ``/v1/upload``
(reads the body and answers its size).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, query: dict[str, list[str]]) -> None:
        n = int(query.get("n", ["5"])[0])
        gap = float(query.get("gap", ["0.2"])[0])
        start = int(self.headers.get("Last-Event-ID", "-1")) + 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(start, n):
            self._chunk(f"id: {i}\ndata: {json.dumps({'i': i, 't': time.time()})}\n\n".encode())
            time.sleep(gap)  # the stub's generation pace, which the test measures through the edge
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _route(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path in {"/health", "/ready"}:
            self._json(200, {"status": "ok"})
        elif url.path == "/metrics":
            self._json(200, {"secret": "metrics must not pass the edge"})
        elif url.path == "/v1/echo":
            headers = dict(self.headers.items())
            self._json(200, {"method": self.command, "path": self.path, "headers": headers})
        elif url.path == "/v1/upload":
            self._json(200, {"received": len(body)})
        elif url.path == "/v1/stream":
            self._stream(parse_qs(url.query))
        else:
            self._json(404, {"error": {"message": "stub: unknown", "type": "not_found_error"}})

    do_GET = _route
    do_POST = _route


@contextmanager
def upstream_stub() -> Iterator[str]:
    """Serve the stub on a free loopback port; yields ``host:port``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="upstream-stub", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
