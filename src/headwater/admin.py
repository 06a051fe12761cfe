"""A small admin API on loopback, for ``query``, ``tail`` and ``status``.

``headwater serve`` owns the DuckDB file, which allows one writer process, so
the other commands ask the running server through this API.  Its address and
a random token are written to ``run/admin.json`` in the data directory, which
only the data directory's owner can read.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from headwater.destinations.delivery import DeliveryWorker
from headwater.destinations.state import DeliveryState
from headwater.pipeline.runner import Pipeline
from headwater.store.base import EventStore, QueryResult


def admin_file(data_dir: Path) -> Path:
    return data_dir / "run" / "admin.json"


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def delivery_status(data_dir: Path, workers: list[DeliveryWorker] | None) -> dict[str, Any]:
    state = DeliveryState(data_dir)
    try:
        counters = state.counters()
    finally:
        state.close()
    result: dict[str, Any] = {}
    for name, values in counters.items():
        result[name] = {"counters": values}
    for worker in workers or []:
        entry = result.setdefault(worker.name, {"counters": {}})
        entry["pending"] = worker.pending()
        entry["last_error"] = worker.last_error
    return result


def status_of(store: EventStore, pipeline_lag: dict[str, int] | None) -> dict[str, Any]:
    per_source = store.query(
        "SELECT source, count(*) AS events, max(received_at) AS last_received"
        " FROM events GROUP BY source ORDER BY source"
    )
    return {
        "sources": [
            {"source": s, "events": int(n), "last_received": to_jsonable(t)}
            for s, n, t in per_source.rows
        ],
        "counters": store.counters(),
        "log": pipeline_lag,
    }


class AdminServer:
    def __init__(
        self,
        data_dir: Path,
        store: EventStore,
        pipeline: Pipeline,
        workers: list[DeliveryWorker] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.token = secrets.token_urlsafe(24)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _reply(self, status: int, payload: Any) -> None:
                body = json.dumps(to_jsonable(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {outer.token}":
                    return True
                self._reply(401, {"error": "admin token required"})
                return False

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                url = urlsplit(self.path)
                if url.path == "/status":
                    status = status_of(store, pipeline.lag())
                    status["destinations"] = delivery_status(data_dir, workers)
                    self._reply(200, status)
                elif url.path == "/tail":
                    after = int(parse_qs(url.query).get("after", ["0"])[0])
                    self._reply(200, {"events": pipeline.tail.after(after)})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                if urlsplit(self.path).path != "/query":
                    self._reply(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                sql = self.rfile.read(length).decode("utf-8")
                try:
                    result = store.query(sql)
                except Exception as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                self._reply(200, {"columns": result.columns, "rows": result.rows})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        path = admin_file(self.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"port": self.port, "token": self.token, "pid": os.getpid()}, handle)
        os.replace(tmp, path)

    def stop(self) -> None:
        admin_file(self.data_dir).unlink(missing_ok=True)
        self._httpd.shutdown()
        self._httpd.server_close()


class AdminClient:
    """Talks to a running server; ``connect`` returns None when none runs."""

    def __init__(self, port: int, token: str) -> None:
        self._client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        )

    @classmethod
    def connect(cls, data_dir: Path) -> AdminClient | None:
        try:
            info = json.loads(admin_file(data_dir).read_text())
        except (OSError, ValueError):
            return None
        client = cls(int(info["port"]), str(info["token"]))
        try:
            client._client.get("/status", timeout=5.0)
        except httpx.HTTPError:
            return None
        return client

    def query(self, sql: str) -> QueryResult:
        response = self._client.post("/query", content=sql.encode())
        payload = response.json()
        if response.status_code != 200:
            raise RuntimeError(payload.get("error", response.text))
        return QueryResult(payload["columns"], [tuple(r) for r in payload["rows"]])

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._client.get("/status").json()
        return result

    def tail(self, after: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self._client.get("/tail", params={"after": after}).json()[
            "events"
        ]
        return events
