"""A loopback HTTP receiver standing in for a webhook endpoint in tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Received:
    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)


# A responder maps a request to (status, headers, body).
Responder = Callable[[Received], tuple[int, dict[str, str], bytes]]


def ok(_: Received) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"{}"


class Receiver:
    """Records every request; ``respond`` decides each answer and can change mid-test."""

    def __init__(self, respond: Responder = ok) -> None:
        self.respond = respond
        self.requests: list[Received] = []
        self.answered: list[int] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received = Received(self.path, dict(self.headers.items()), self.rfile.read(length))
                status, headers, body = outer.respond(received)
                with outer._lock:
                    outer.answered.append(status)
                    if 200 <= status < 300:
                        outer.requests.append(received)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_POST

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        """Every event accepted so far (batches flattened)."""
        with self._lock:
            bodies = [r.json() for r in self.requests]
        out: list[dict[str, Any]] = []
        for body in bodies:
            out.extend(body if isinstance(body, list) else [body])
        return out

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if len(events) >= count:
                return events
            time.sleep(0.02)
        return self.events()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
