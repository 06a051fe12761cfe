"""The HTTP Tracking API as a lean ASGI application.

Routing is a dictionary lookup; no framework sits on the hot path.  A request
is decoded, authenticated, checked message by message, encoded once as a log
record, and answered ``200 {"success": true}`` only after the log made it
durable.

Batch policy: a batch is accepted or refused as a whole.  One bad message
refuses the request with a 400 naming it (``batch[3].userId``) and nothing of
it is written, so a client never sees a partial write it cannot detect.

Limits, each refused with a 400 that states it: the request body after
decompression, messages per batch, one message as compact UTF-8 JSON (by
default 500 KiB, 2,500 and 32 KiB; see ``config.LimitSettings``), and nesting
(``spec.message.MAX_DEPTH`` levels).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from headwater import backends, config
from headwater.gateway import body as bodies
from headwater.gateway.committer import Committer, Overloaded
from headwater.gateway.rejections import RejectionRecorder
from headwater.log.base import Entry, LogFull
from headwater.log.rejections import Rejected
from headwater.spec.message import MAX_DEPTH, Rejection, Stamp, check_depth, normalize, scrub_nul
from headwater.spec.timestamps import format_ms, parse_ms

log = logging.getLogger("headwater.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SINGLE = {
    "identify": "identify",
    "track": "track",
    "page": "page",
    "screen": "screen",
    "group": "group",
    "alias": "alias",
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/b", "/v1/import", "/beacon/v1/batch"})
OK_BODY = b'{"success": true}'
JSON_HEADERS = [(b"content-type", b"application/json")]
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_encode = msgspec.json.Encoder().encode
# Refusals not kept for the debugger: wrong URLs and methods carry no events.
UNRECORDED = frozenset({"client_disconnected", "not_found", "method_not_allowed"})
MAX_BODY_SAMPLE = 32 * 1024


def error_body(rejection: Rejection) -> bytes:
    return _encode(
        {
            "success": False,
            "code": rejection.code,
            "message": str(rejection),
            "field": rejection.field,
        }
    )


class Networks:
    """Membership test for the trusted-proxy list."""

    def __init__(self, cidrs: list[str]) -> None:
        self._nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._nets)


class Gateway:
    def __init__(self, data_dir: Path, settings: config.Settings, committer: Committer) -> None:
        self.data_dir = data_dir
        self.committer = committer
        self.budget = bodies.Budget(settings.server.max_inflight_bytes)
        self.recorder = RejectionRecorder(lambda: backends.rejection_log(settings, data_dir))
        self._apply(settings)
        self._config_mtime = self._mtime()
        self._reloader: asyncio.Task[None] | None = None

    def _apply(self, settings: config.Settings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.keys = {s.write_key: s for s in settings.sources}
        self.proxies = Networks(settings.server.trusted_proxies)

    def _mtime(self) -> float:
        try:
            return os.stat(config.config_path(self.data_dir)).st_mtime
        except OSError:
            return 0.0

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            mtime = self._mtime()
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                try:
                    self._apply(config.load(self.data_dir))
                    log.info("settings reloaded")
                except config.ConfigError as exc:
                    log.error("settings not reloaded: %s", exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.committer.start(asyncio.get_running_loop())
                self.recorder.start()
                self._reloader = asyncio.create_task(self._watch_config())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reloader is not None:
                    self._reloader.cancel()
                await asyncio.get_running_loop().run_in_executor(None, self.committer.close)
                await asyncio.get_running_loop().run_in_executor(None, self.recorder.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            # A repeated header is one comma-separated list (RFC 9110 5.3).
            headers[name] = headers[name] + b", " + value if name in headers else value
        origin = headers.get(b"origin")
        method = scope["method"]
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        cors = _cors(origin)
        if method == "OPTIONS":
            await _respond(send, 204, b"", cors + _preflight(headers))
            return
        try:
            if method == "POST":
                if path.startswith("/v1/") and path[4:] in SINGLE:
                    await self._ingest(scope, receive, headers, SINGLE[path[4:]])
                elif path in BATCH_PATHS:
                    await self._ingest(scope, receive, headers, None)
                elif path == "/v1/m":
                    body = await bodies.read(
                        receive, self.limits.max_request_bytes, self.budget, _declared(headers)
                    )
                    self.budget.give(len(body))
                else:
                    raise Rejection("not_found", "path", f"no endpoint at POST {path}", 404)
                await _respond(send, 200, OK_BODY, JSON_HEADERS + cors)
            elif method in ("GET", "HEAD"):
                await self._get(scope, path, headers, send, cors)
            else:
                raise Rejection("method_not_allowed", "method", f"{method} is not allowed", 405)
        except Rejection as rejection:
            if rejection.code == "client_disconnected":
                return
            self._record(scope, path, rejection)
            await _respond(send, rejection.status, error_body(rejection), JSON_HEADERS + cors)
        except Overloaded as exc:
            await self._unavailable(send, cors, "overloaded", str(exc))
        except LogFull as exc:
            log.error("log append failed: %s", exc)
            await self._unavailable(send, cors, "log_unavailable", "the event log cannot accept")

    def _record(self, scope: Scope, path: str, rejection: Rejection) -> None:
        """Keep a refused request (bounded, off the request path) for the debugger."""
        if rejection.code in UNRECORDED:
            return
        self.recorder.add(
            Rejected(
                time.time_ns() // 1_000_000,
                scope.get("headwater.source", ""),
                path,
                rejection.status,
                rejection.code,
                rejection.field,
                str(rejection),
                scope.get("headwater.body", b"")[:MAX_BODY_SAMPLE],
            )
        )

    async def _unavailable(
        self, send: Send, cors: list[tuple[bytes, bytes]], code: str, message: str
    ) -> None:
        body = _encode({"success": False, "code": code, "message": message, "field": ""})
        await _respond(send, 503, body, [*JSON_HEADERS, (b"retry-after", b"1"), *cors])

    async def _get(
        self,
        scope: Scope,
        path: str,
        headers: dict[bytes, bytes],
        send: Send,
        cors: list[tuple[bytes, bytes]],
    ) -> None:
        if path == "/health":
            await _respond(send, 200, b'{"status": "ok"}', JSON_HEADERS)
        elif path == "/ready":
            ready = self.committer.healthy and (
                self.committer.pending_bytes < self.settings.server.max_pending_bytes
            )
            body = _encode({"ready": ready, "error": "" if ready else self.committer.last_error})
            await _respond(send, 200 if ready else 503, body, JSON_HEADERS)
        elif path.startswith("/pixel/v1/") and path[10:] in ("track", "page"):
            await self._pixel(scope, headers, path[10:])
            await _respond(send, 200, GIF, [(b"content-type", b"image/gif"), *cors])
        elif _settings_key(path) is not None:
            write_key = _settings_key(path) or ""
            if write_key not in self.keys:
                raise Rejection("invalid_write_key", "writeKey", "unknown write key", 404)
            host, scheme = self._public_host(scope, headers)
            settings = {
                "integrations": {
                    "Segment.io": {"apiKey": write_key, "apiHost": f"{host}/v1", "protocol": scheme}
                },
                "metrics": {"sampleRate": 0},
            }
            await _respond(
                send,
                200,
                _encode(settings),
                [*JSON_HEADERS, (b"cache-control", b"no-store"), *cors],
            )
        elif path == "/sourceConfig":
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            write_key = _basic_key(headers) or query.get("writeKey", "")
            source = self.keys.get(write_key)
            if source is None:
                raise Rejection("invalid_write_key", "writeKey", "unknown write key", 401)
            config_body: dict[str, Any] = {
                "source": {
                    "id": source.name,
                    "name": source.name,
                    "writeKey": write_key,
                    "config": {},
                    "destinations": [],
                    "enabled": source.enabled,
                }
            }
            await _respond(send, 200, _encode(config_body), JSON_HEADERS + cors)
        else:
            raise Rejection("not_found", "path", f"no endpoint at GET {path}", 404)

    def _public_host(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[str, str]:
        """The host and scheme SDKs should call: ``console.public_url`` when set."""
        public = self.settings.console.public_url
        if public:
            url = urlsplit(public)
            return url.netloc, url.scheme or "https"
        host = headers.get(b"host", b"127.0.0.1").decode("latin-1").split(",")[0].strip()
        return host, "https" if scope.get("scheme") == "https" else "http"

    def _source(self, headers: dict[bytes, bytes], body_key: Any, query: bytes) -> config.Source:
        write_key = _basic_key(headers)
        if not write_key and isinstance(body_key, str):
            write_key = body_key
        if not write_key and query:
            write_key = dict(parse_qsl(query.decode("latin-1"))).get("writeKey", "")
        if not write_key:
            raise Rejection(
                "missing_write_key",
                "writeKey",
                "no write key: send it as the Basic auth user name, as writeKey in the body,"
                " or as ?writeKey=",
                401,
            )
        source = self.keys.get(write_key)
        if source is None:
            raise Rejection("invalid_write_key", "writeKey", "unknown write key", 401)
        if not source.enabled:
            raise Rejection("source_disabled", "writeKey", "the source is disabled", 404)
        return source

    def _client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        forwarded = headers.get(b"x-forwarded-for")
        if peer is None or forwarded is None or peer not in self.proxies:
            return peer
        hops = [_address(h) for h in forwarded.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if hop is None:
                # Not an address ("unknown", a typo): trust nothing beyond it.
                return peer
            if hop not in self.proxies:
                return hop
        return hops[0] if hops else peer

    async def _ingest(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes], path_type: str | None
    ) -> None:
        limits = self.limits
        raw = await bodies.read(receive, limits.max_request_bytes, self.budget, _declared(headers))
        try:
            scope["headwater.body"] = raw
            await self._decode_and_accept(scope, headers, path_type, raw)
        finally:
            self.budget.give(len(raw))

    async def _decode_and_accept(
        self, scope: Scope, headers: dict[bytes, bytes], path_type: str | None, raw: bytes
    ) -> None:
        limits = self.limits
        encoding = headers.get(b"content-encoding", b"").decode("latin-1")
        data = bodies.decompress(raw, encoding, limits.max_request_bytes)
        scope["headwater.body"] = data
        document = bodies.parse_json(data)
        if not isinstance(document, dict):
            raise Rejection("invalid_json", "body", "the body must be a JSON object")
        if bodies.nests_deeper(data, MAX_DEPTH):
            check_depth(document, path_type is None)
        if b"\\u0000" in data:
            document = scrub_nul(document)
        source = self._source(headers, document.get("writeKey"), scope.get("query_string", b""))
        scope["headwater.source"] = source.name
        await self._accept(scope, headers, source, document, path_type, len(data))

    async def _accept(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        source: config.Source,
        document: dict[str, Any],
        path_type: str | None,
        size: int,
    ) -> None:
        limits = self.limits
        received_ms = time.time_ns() // 1_000_000
        ip = self._client_ip(scope, headers)
        if path_type is None:
            messages = document.get("batch")
            if not isinstance(messages, list):
                raise Rejection("missing_field", "batch", "batch must be a list of messages")
            if not messages:
                raise Rejection("empty_batch", "batch", "batch is empty")
            sent_at = document.get("sentAt")
            if sent_at is not None and (not isinstance(sent_at, str) or parse_ms(sent_at) is None):
                raise Rejection(
                    "invalid_field", "sentAt", "sentAt must be an ISO-8601 date-time string"
                )
            if len(messages) > limits.max_batch_messages:
                raise Rejection(
                    "too_many_messages",
                    "batch",
                    f"batch has {len(messages)} messages; the limit is {limits.max_batch_messages}",
                )
            stamp = Stamp(
                format_ms(received_ms),
                ip,
                sent_at,
                document.get("context"),
                document.get("integrations"),
                limits.max_message_id_chars,
            )
            prefix = "batch[{}]."
        else:
            messages = [document]
            stamp = Stamp(format_ms(received_ms), ip, None, None, None, limits.max_message_id_chars)
            prefix = ""
        # Envelope context and integrations are merged into every message, so a
        # message is measured as it will be stored.
        check_size = size > limits.max_message_bytes or bool(stamp.context or stamp.integrations)
        for index, message in enumerate(messages):
            where = prefix.format(index) if prefix else ""
            if check_size and isinstance(message, dict):
                measured = dict(message)
                measured.pop("writeKey", None)
                for key, shared in (
                    ("context", stamp.context),
                    ("integrations", stamp.integrations),
                ):
                    own = measured.get(key)
                    if shared and (own is None or isinstance(own, dict)):
                        measured[key] = {**shared, **(own or {})}
                length = len(_encode(measured))
                if length > limits.max_message_bytes:
                    raise Rejection(
                        "message_too_large",
                        where.rstrip(".") or "body",
                        f"message is {length} bytes; the limit is {limits.max_message_bytes}"
                        f" bytes ({limits.max_message_bytes // 1024} KiB) per message",
                    )
            normalize(message, path_type, stamp, where)
        user_agent = headers.get(b"user-agent", b"").decode("latin-1")[:512]
        entry = Entry(source.name, received_ms, len(messages), _encode(messages), user_agent)
        await self.committer.append(entry)

    async def _pixel(self, scope: Scope, headers: dict[bytes, bytes], kind: str) -> None:
        """RudderStack pixel GETs: fields in the query, always answered with a GIF."""
        query = scope.get("query_string", b"")
        message: dict[str, Any] = {}
        for key, value in parse_qsl(query.decode("utf-8", "replace")):
            if key == "writeKey":
                continue
            node = message
            *parents, leaf = key.split(".")
            for part in parents:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            node[leaf] = value
        try:
            check_depth(message, batch=False)
            if b"%00" in query:
                message = scrub_nul(message)
            source = self._source(headers, None, query)
            await self._accept(scope, headers, source, message, kind, len(query))
        except Rejection as rejection:
            scope["headwater.body"] = query
            self._record(scope, scope["path"], rejection)


def _address(hop: str) -> str | None:
    """An X-Forwarded-For entry as a bare IP address; None if it is not one.

    Some proxies append the port: ``192.0.2.1:443`` or ``[2001:db8::1]:443``.
    """
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        ipaddress.ip_address(hop)
    except ValueError:
        return None
    return hop


def _declared(headers: dict[bytes, bytes]) -> int | None:
    """The Content-Length, when given and sane."""
    try:
        return int(headers.get(b"content-length", b"").split(b",")[0])
    except ValueError:
        return None


def _settings_key(path: str) -> str | None:
    """The write key of ``/v1/projects/{key}/settings`` (or ``/projects/...``)."""
    parts = path.split("/")
    if parts[1:2] == ["v1"]:
        parts = parts[1:]
    if len(parts) == 4 and parts[1] == "projects" and parts[3] == "settings" and parts[2]:
        return parts[2]
    return None


def _basic_key(headers: dict[bytes, bytes]) -> str:
    auth = headers.get(b"authorization")
    if not auth or auth[:6].lower() != b"basic ":
        return ""
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=False).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    user, _, password = decoded.partition(":")
    return user or password


def _cors(origin: bytes | None) -> list[tuple[bytes, bytes]]:
    if origin is None:
        return []
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]


_DEFAULT_ALLOWED = (
    b"Authorization, Content-Type, Content-Encoding, X-Retry-Count, AnonymousId, SentAt,"
    b" Rsa-Retry-Attempt, Rsa-Since-Last-Attempt, Rsa-Since-First-Attempt, Rsa-Retry-Reason,"
    b" Rsa-Recovered"
)


def _preflight(headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    requested = headers.get(b"access-control-request-headers")
    return [
        (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
        (b"access-control-allow-headers", requested or _DEFAULT_ALLOWED),
        (b"access-control-max-age", b"900"),
    ]


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
