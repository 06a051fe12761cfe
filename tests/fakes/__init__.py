"""Loopback stand-ins for SaaS ingestion APIs, shared plumbing.

Each fake listens on 127.0.0.1 on a port of its own, answers as
docs/contracts/DESTINATIONS.md says the real service does, and records what it
accepted.  ``force`` makes the next requests to a path fail on demand (a 429
with ``Retry-After``, a 503 ...).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes  # as sent (possibly gzip)
    at: float = field(default_factory=time.monotonic)

    def payload(self) -> bytes:
        if self.headers.get("content-encoding", "").lower() == "gzip":
            return gzip.decompress(self.body)
        return self.body

    def form(self) -> dict[str, str]:
        parsed = parse_qs(self.payload().decode(), keep_blank_values=True)
        return {k: v[-1] for k, v in parsed.items()}


@dataclass
class Logged:
    """One request as answered: what tests assert limits and retries on."""

    path: str
    status: int
    records: int
    size: int
    at: float


@dataclass
class Forced:
    path: str
    answer: Callable[[Request], Answer]
    times: int


class FakeServer:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log: list[Logged] = []
        self._forced: list[Forced] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                request = Request(
                    self.command,
                    url.path,
                    query,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                status, headers, answer = outer._answer(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_POST = _serve
            do_GET = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def force(self, path: str, answer: Callable[[Request], Answer], times: int = 1) -> None:
        """Answer the next ``times`` requests to ``path`` with ``answer``."""
        with self.lock:
            self._forced.append(Forced(path, answer, times))

    def _answer(self, request: Request) -> Answer:
        with self.lock:
            for forced in self._forced:
                if forced.path == request.path and forced.times > 0:
                    forced.times -= 1
                    status, headers, body = forced.answer(request)
                    self._record(request, status, 0)
                    return status, headers, body
            try:
                status, headers, body, records = self.handle(request)
            except Exception as exc:  # a bug in the fake must be visible, not a hang
                status, headers, body, records = 500, {}, repr(exc).encode(), 0
            self._record(request, status, records)
            return status, headers, body

    def _record(self, request: Request, status: int, records: int) -> None:
        try:
            size = len(request.payload())
        except OSError:
            size = len(request.body)
        self.log.append(Logged(request.path, status, records, size, request.at))

    def handle(self, request: Request) -> tuple[int, dict[str, str], bytes, int]:
        """(status, headers, body, records in the request); override."""
        raise NotImplementedError

    def answered(self, path: str) -> list[Logged]:
        with self.lock:
            return [entry for entry in self.log if entry.path == path]

    def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
