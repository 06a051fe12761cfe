"""The console and its admin API, served by the main ``headwater serve`` process.

Everything needs the admin token (``console.admin_token``), sent as
``Authorization: Bearer <token>`` or as the cookie set by ``POST /api/login``.
The main process owns the DuckDB store, so the CLI's ``query``, ``tail``,
``status`` and ``report`` come here too; the address and token are written to
``run/admin.json`` in the data directory (readable by its owner only).

Endpoints (JSON unless noted):
- ``GET /`` the console page; ``GET /static/...`` its assets
- ``POST /api/login`` ``{"token": ...}`` sets the session cookie; ``POST /api/logout``
  clears it
- ``GET /api/status``; ``POST /api/query`` (body: SQL); ``GET /api/tail?after=``
- ``GET /api/live?source=&type=&event=&user=`` server-sent events: stored events
  with their enrichment, and refused requests with the reason
- ``GET /api/insights/{counts,users,funnel,retention}``
- ``GET /api/report``
- ``GET|POST /api/sources``, ``POST /api/sources/{name}/rotate``,
  ``GET /api/sources/{name}/snippets``
- ``GET /api/destinations`` delivery overview; ``GET /api/deadletters``,
  ``POST /api/deadletters/replay``
- ``GET /metrics`` Prometheus text format
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from headwater import backends, config, insights
from headwater.admin import admin_file, delivery_status, status_of, to_jsonable
from headwater.console import snippets
from headwater.console.metrics import render_metrics
from headwater.destinations.delivery import DeliveryWorker
from headwater.destinations.replay import replay_dead_letters
from headwater.metrics import report
from headwater.pipeline.runner import Pipeline
from headwater.store.base import EventStore

log = logging.getLogger("headwater.console")
COOKIE = "headwater_session"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Console:
    """The application behind the HTTP server: every route is a method here."""

    def __init__(
        self,
        data_dir: Path,
        settings: config.Settings,
        store: EventStore,
        pipeline: Pipeline,
        workers: list[DeliveryWorker],
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.workers = workers
        self.token = settings.console.admin_token or secrets.token_urlsafe(24)
        self._lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------
    def _query(self, sql: str, params: list[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        result = self.store.query(sql, params)
        return result.columns, result.rows

    def _rows(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return self.store.query(sql, params).rows

    def _settings(self) -> config.Settings:
        try:
            return config.load(self.data_dir)
        except config.ConfigError:
            return self.settings

    # -- status, query, tail ---------------------------------------------------
    def status(self) -> dict[str, Any]:
        status = status_of(self.store, self.pipeline.lag())
        status["destinations"] = delivery_status(self.settings, self.data_dir, self.workers)
        return status

    def query(self, sql: str) -> dict[str, Any]:
        try:
            result = self.store.query(sql, read_only=True)
        except Exception as exc:
            raise ApiError(400, str(exc)) from None
        return {"columns": result.columns, "rows": result.rows}

    def tail(self, after: int) -> dict[str, Any]:
        return {"events": self.pipeline.tail.after(after)}

    # -- insights ------------------------------------------------------------------
    def insight(self, kind: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            window = insights.Window.parse(
                params.get("since"),
                params.get("until"),
                now_ms(),
                _int_param(params, "days", 7, 1, 3650),
            )
            if kind == "counts":
                return insights.counts(
                    self._query,
                    window,
                    params.get("bucket", "hour"),
                    params.get("event") or None,
                    params.get("breakdown") or None,
                    params.get("source") or None,
                )
            if kind == "users":
                return insights.unique_users(
                    self._query, window, params.get("bucket", "day"), params.get("event") or None
                )
            if kind == "funnel":
                steps = [s for s in params.get("steps", "").split(",") if s]
                return insights.funnel(
                    self._query,
                    window,
                    steps,
                    _int_param(params, "within_seconds", 86400, 1, 366 * 86400),
                )
            if kind == "retention":
                return insights.retention(
                    self._query,
                    window,
                    params.get("start_event") or None,
                    params.get("return_event") or None,
                    params.get("bucket", "week"),
                    _int_param(params, "periods", 8, 1, 52),
                )
        except (insights.InsightError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        raise ApiError(404, f"no insight {kind!r}")

    # -- report --------------------------------------------------------------------
    def report_inputs(self) -> report.Inputs:
        return report_inputs(
            self.data_dir, self._settings(), self._rows, self.pipeline.lag()["lag_events"]
        )

    def report(self) -> dict[str, Any]:
        return report.build(self.report_inputs(), self._settings().report, now_ms())

    # -- sources -------------------------------------------------------------------
    def sources(self) -> dict[str, Any]:
        settings = self._settings()
        return {
            "sources": [
                {"name": s.name, "write_key": s.write_key, "enabled": s.enabled}
                for s in settings.sources
            ]
        }

    def add_source(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "name: a source name is required")
        with self._lock:
            settings = config.load(self.data_dir, environ={})
            settings.sources.append(
                config.Source(name=name.strip(), write_key=config.new_write_key())
            )
            try:
                config._validate(settings)
            except config.ConfigError as exc:
                raise ApiError(400, str(exc)) from None
            config.save(self.data_dir, settings)
        return {"name": name.strip(), "write_key": settings.sources[-1].write_key}

    def rotate_key(self, name: str) -> dict[str, Any]:
        with self._lock:
            settings = config.load(self.data_dir, environ={})
            for source in settings.sources:
                if source.name == name:
                    source.write_key = config.new_write_key()
                    config.save(self.data_dir, settings)
                    return {"name": name, "write_key": source.write_key}
        raise ApiError(404, f"no source named {name!r}")

    def snippets(self, name: str, host: str) -> dict[str, Any]:
        settings = self._settings()
        for source in settings.sources:
            if source.name == name:
                return {
                    "source": name,
                    "snippets": snippets.for_source(
                        source.write_key, self.public_url(settings, host)
                    ),
                }
        raise ApiError(404, f"no source named {name!r}")

    def public_url(self, settings: config.Settings, console_host: str) -> str:
        if settings.console.public_url:
            return settings.console.public_url.rstrip("/")
        host = settings.server.host
        if host in ("0.0.0.0", "::", ""):
            host = console_host.rsplit(":", 1)[0] or "127.0.0.1"
        port = self.public_port or settings.server.port
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    public_port: int = 0

    # -- destinations and dead letters -----------------------------------------
    def destinations(self) -> dict[str, Any]:
        overview = delivery_status(self.settings, self.data_dir, self.workers)
        stored = self.store.counters()
        rejections = backends.rejection_log(self.settings, self.data_dir)
        try:
            rejected = rejections.counts(0, now_ms() + 60_000)
            rejected_samples = {code: rejections.samples(code) for code in rejected}
        finally:
            rejections.close()
        state = backends.delivery_state(self.settings, self.data_dir)
        try:
            result = []
            for worker in self.workers:
                counters = overview.get(worker.name, {}).get("counters", {})
                letters = state.dead_letters(worker.name, limit=1000)
                reasons: dict[str, list[Any]] = {}
                for letter in letters:
                    reasons.setdefault(letter.reason, [])
                    if len(reasons[letter.reason]) < 10:
                        reasons[letter.reason].append(json.loads(letter.event))
                result.append(
                    {
                        "name": worker.name,
                        "kind": worker.config.kind,
                        "received": counters.get("accepted", 0),
                        "filtered_at_destination": {
                            k.removeprefix("filtered:"): v
                            for k, v in counters.items()
                            if k.startswith("filtered:")
                        },
                        "filtered_samples": worker.filtered_samples(),
                        "delivered": counters.get("delivered", 0),
                        "failed": counters.get("failed", 0),
                        "retried": counters.get("retried", 0),
                        "dead_lettered": counters.get("dead_lettered", 0),
                        "pending": worker.pending(),
                        "last_error": worker.last_error,
                        "discard_reasons": [
                            {"reason": r, "samples": s} for r, s in reasons.items()
                        ],
                    }
                )
        finally:
            state.close()
        return {
            "source": {
                "received": stored.get("received", 0),
                "rejected_at_ingest": rejected,
                "rejected_samples": rejected_samples,
                "filtered_at_source": {"duplicates": stored.get("duplicates", 0)},
                "stored": stored.get("stored", 0),
            },
            "destinations": result,
        }

    def dead_letters(self, destination: str | None) -> dict[str, Any]:
        state = backends.delivery_state(self.settings, self.data_dir)
        try:
            letters = state.dead_letters(destination, limit=500)
        finally:
            state.close()
        return {
            "dead_letters": [
                {
                    "id": d.id,
                    "destination": d.destination,
                    "message_id": d.message_id,
                    "reason": d.reason,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "last_response": d.last_response,
                    "dead_ms": d.dead_ms,
                    "event": json.loads(d.event),
                }
                for d in letters
            ]
        }

    def replay(self, body: dict[str, Any]) -> dict[str, Any]:
        destination_name = body.get("destination")
        worker = next((w for w in self.workers if w.name == destination_name), None)
        if worker is None:
            raise ApiError(400, "destination: an enabled destination name is required")
        ids = body.get("ids") or None
        state = backends.delivery_state(self.settings, self.data_dir)
        try:
            letters = state.dead_letters(worker.name, ids=ids, limit=100_000)
            delivered, failed = replay_dead_letters(state, worker.destination, letters, now_ms())
        finally:
            state.close()
        return {"delivered": delivered, "failed": failed}

    def metrics(self) -> str:
        return render_metrics(self)


def report_inputs(
    data_dir: Path,
    settings: config.Settings,
    rows: Callable[[str, list[Any]], list[tuple[Any, ...]]],
    lag_events: int,
) -> report.Inputs:
    """What the report reads, whether the server runs or not."""
    from headwater import destinations as kinds

    def delivery(since: int, until: int) -> dict[str, dict[str, int]]:
        state = backends.delivery_state(settings, data_dir)
        try:
            return state.since(since, until)
        finally:
            state.close()

    def rejected(since: int, until: int) -> dict[str, int]:
        rejections = backends.rejection_log(settings, data_dir)
        try:
            return rejections.counts(since, until)
        finally:
            rejections.close()

    state = backends.delivery_state(settings, data_dir)
    try:
        dead = len(state.dead_letters(limit=1_000_000))
    finally:
        state.close()
    enabled = [
        (d.name, d.kind in kinds.WAREHOUSE_KINDS) for d in settings.destinations if d.enabled
    ]
    return report.Inputs(rows, delivery, rejected, enabled, lag_events, dead)


class ConsoleServer:
    def __init__(self, console: Console, host: str, port: int) -> None:
        self.console = console
        handler = _handler(console)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, daemon=True, name="console"
        )

    def start(self) -> None:
        self._thread.start()
        path = admin_file(self.console.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"port": self.port, "token": self.console.token, "pid": os.getpid()}, handle)
        os.replace(tmp, path)

    def stop(self) -> None:
        admin_file(self.console.data_dir).unlink(missing_ok=True)
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(console: Console) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Idle or trickling connections are dropped instead of holding a thread.
        timeout = 60
        # Headers and body go out in two writes; without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every keep-alive response.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        # -- plumbing --------------------------------------------------------------
        def _send(
            self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(to_jsonable(payload), ensure_ascii=False).encode()
            self._send(status, body, "application/json", headers)

        def _authorised(self) -> bool:
            presented = ""
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                presented = auth[7:]
            else:
                cookie = SimpleCookie(self.headers.get("Cookie", ""))
                if COOKIE in cookie:
                    presented = cookie[COOKIE].value
            return bool(presented) and _same_token(presented, console.token)

        def _body(self) -> bytes:
            length = _int_param(
                {"n": self.headers.get("Content-Length", "0") or "0"},
                "n",
                0,
                0,
                1_000_000,
                "Content-Length",
            )
            return self.rfile.read(length) if length else b""

        def _json_body(self) -> dict[str, Any]:
            try:
                data = json.loads(self._body() or b"{}")
            except ValueError:
                raise ApiError(400, "body: invalid JSON") from None
            if not isinstance(data, dict):
                raise ApiError(400, "body: a JSON object is required")
            return data

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                if method == "GET" and (path == "/" or path.startswith("/static/")):
                    self._static(path)
                    return
                if method == "POST" and path == "/api/login":
                    token = str(self._json_body().get("token", ""))
                    if not _same_token(token, console.token):
                        raise ApiError(401, "token: not the admin token")
                    cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                    self._json(200, {"ok": True}, {"Set-Cookie": cookie})
                    return
                if method == "POST" and path == "/api/logout":
                    cookie = f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
                    self._json(200, {"ok": True}, {"Set-Cookie": cookie})
                    return
                if not self._authorised():
                    raise ApiError(401, "admin token required")
                self._route(method, path, params)
            except ApiError as exc:
                self.close_connection = True  # an unread body must not become a request
                self._json(exc.status, {"error": str(exc)})
            except BrokenPipeError:
                return
            except Exception as exc:
                log.exception("console request failed")
                self.close_connection = True
                self._json(
                    500, {"error": f"internal error ({type(exc).__name__}); see the server log"}
                )

        def _route(self, method: str, path: str, params: dict[str, str]) -> None:
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if method == "GET":
                if path in ("/status", "/api/status"):
                    self._json(200, console.status())
                elif path in ("/tail", "/api/tail"):
                    self._json(200, console.tail(_int_param(params, "after", 0, 0, 2**62)))
                elif path == "/api/live":
                    self._live(params)
                elif parts[:2] == ["api", "insights"] and len(parts) == 3:
                    self._json(200, console.insight(parts[2], params))
                elif path == "/api/report":
                    self._json(200, console.report())
                elif path == "/api/sources":
                    self._json(200, console.sources())
                elif (
                    parts[:2] == ["api", "sources"] and len(parts) == 4 and (parts[3] == "snippets")
                ):
                    self._json(200, console.snippets(parts[2], self.headers.get("Host", "")))
                elif path == "/api/destinations":
                    self._json(200, console.destinations())
                elif path == "/api/deadletters":
                    self._json(200, console.dead_letters(params.get("destination")))
                elif path == "/metrics":
                    self._send(
                        200, console.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"
                    )
                else:
                    raise ApiError(404, f"no endpoint at GET {path}")
            elif method == "POST":
                if path in ("/query", "/api/query"):
                    self._json(200, console.query(self._body().decode("utf-8", "replace")))
                elif path == "/api/sources":
                    self._json(200, console.add_source(self._json_body()))
                elif parts[:2] == ["api", "sources"] and len(parts) == 4 and (parts[3] == "rotate"):
                    self._json(200, console.rotate_key(parts[2]))
                elif path == "/api/deadletters/replay":
                    self._json(200, console.replay(self._json_body()))
                else:
                    raise ApiError(404, f"no endpoint at POST {path}")
            else:
                raise ApiError(405, f"{method} is not allowed")

        def _static(self, path: str) -> None:
            name = "index.html" if path == "/" else path.removeprefix("/static/")
            if "/" in name or name.startswith("."):
                raise ApiError(404, "not found")
            resource = resources.files("headwater.console") / "static" / name
            if not resource.is_file():
                raise ApiError(404, "not found")
            suffix = Path(name).suffix
            self._send(
                200, resource.read_bytes(), STATIC_TYPES.get(suffix, "application/octet-stream")
            )

        def _live(self, params: dict[str, str]) -> None:
            """Server-sent events until the client leaves; memory is the tail's cap."""
            after = _int_param(params, "after", 0, 0, 2**62)
            backlog = _int_param(params, "backlog", 50, 0, 1000)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            wanted = {k: params[k] for k in ("source", "type", "event", "user") if params.get(k)}
            recent = console.pipeline.tail.after(0)
            if not after and recent:
                after = max(0, recent[-1]["seq"] - backlog)
            rejections = backends.rejection_log(console.settings, console.data_dir)
            last_rejection = max(0, rejections.latest_id() - backlog)
            idle = 0.0
            try:
                while True:
                    sent = False
                    for item in console.pipeline.tail.after(after):
                        after = item["seq"]
                        if _wanted(item, wanted):
                            self._event("event", item)
                            sent = True
                    for rejected in rejections.after(last_rejection):
                        last_rejection = rejected["id"]
                        if _rejection_wanted(rejected, wanted):
                            self._event("rejection", rejected)
                            sent = True
                    idle = 0.0 if sent else idle + 0.25
                    if idle >= 15:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        idle = 0.0
                    time.sleep(0.25)
            except (BrokenPipeError, ConnectionResetError):
                return
            finally:
                rejections.close()

        def _event(self, kind: str, payload: Any) -> None:
            data = json.dumps(to_jsonable(payload), ensure_ascii=False)
            self.wfile.write(f"event: {kind}\ndata: {data}\n\n".encode())
            self.wfile.flush()

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_OPTIONS(self) -> None:
            self._dispatch("OPTIONS")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

    return Handler


def _wanted(item: dict[str, Any], wanted: dict[str, str]) -> bool:
    event = item["event"]
    for key, value in wanted.items():
        if key == "source" and item["source"] != value:
            return False
        if key == "type" and event.get("type") != value:
            return False
        if key == "event" and value not in (event.get("event"), event.get("name")):
            return False
        if key == "user" and value not in (event.get("userId"), event.get("anonymousId")):
            return False
    return True


def _rejection_wanted(rejected: dict[str, Any], wanted: dict[str, str]) -> bool:
    """Refused requests match only a source filter (they have no valid event)."""
    if wanted.keys() - {"source"}:
        return False
    return bool(rejected["source"] == wanted.get("source", rejected["source"]))


def _same_token(presented: str, token: str) -> bool:
    """Constant-time comparison that also takes non-ASCII input."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"), token.encode())


def _int_param(
    params: dict[str, str], name: str, default: int, low: int, high: int, label: str | None = None
) -> int:
    """An integer parameter within bounds; a 400 naming it otherwise."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{label or name}: an integer is required") from None
    if not low <= value <= high:
        raise ApiError(400, f"{label or name}: must be between {low} and {high}")
    return value
