"""Webhook destination: events as JSON to an HTTP endpoint.

Each request is signed the Standard Webhooks way (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``id.timestamp.body``) when a secret is set, and can also carry Segment's
``X-Signature`` (hex HMAC-SHA1) for receivers built for Segment.  The
``webhook-id`` and ``Idempotency-Key`` are the event's messageId (or, for a
batch, a digest of its messageIds), constant across retries.

Targets that resolve to private, loopback, link-local or otherwise reserved
addresses are refused unless listed in ``allow_networks``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from headwater.destinations.base import (
    ConfigurationError,
    DestinationConfig,
    Outcome,
    outcome_for_response,
)

_encode = msgspec.json.Encoder().encode


class WebhookSettings(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    method: str = "POST"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    mode: str = "single"  # or "batch": one JSON array per request
    secret: str = ""
    segment_signature: bool = False
    timeout_seconds: float = 15.0
    allow_networks: list[str] = msgspec.field(default_factory=list)


def _secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[6:])
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def blocked_address(
    address: str, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return False
    return not ip.is_global or ip.is_multicast


class Webhook:
    is_warehouse = False

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        try:
            self.settings = msgspec.convert(config.settings, WebhookSettings)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"destinations.{config.name}.settings: {exc}") from None
        url = urlsplit(self.settings.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigurationError(
                f"destinations.{config.name}.settings.url: an http(s) URL is required"
            )
        if self.settings.method.upper() not in ("POST", "PUT", "PATCH"):
            raise ConfigurationError(
                f"destinations.{config.name}.settings.method: POST, PUT or PATCH"
            )
        if self.settings.mode not in ("single", "batch"):
            raise ConfigurationError(f"destinations.{config.name}.settings.mode: single or batch")
        try:
            self.allowed = [
                ipaddress.ip_network(n, strict=False) for n in self.settings.allow_networks
            ]
        except ValueError as exc:
            raise ConfigurationError(
                f"destinations.{config.name}.settings.allow_networks: {exc}"
            ) from None
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.client = httpx.Client(timeout=self.settings.timeout_seconds, follow_redirects=False)

    def _guard(self) -> str | None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return f"cannot resolve {self.host}: {exc}"
        for info in infos:
            address = str(info[4][0])
            if blocked_address(address, self.allowed):
                return (
                    f"{self.host} resolves to {address}, a private or reserved address;"
                    " list it in allow_networks to permit it"
                )
        return None

    def check(self) -> None:
        problem = self._guard()
        if problem:
            raise ConfigurationError(f"destinations.{self.config.name}: {problem}")

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        problem = self._guard()
        if problem:
            return Outcome("permanent", 0, problem)
        if self.settings.mode == "batch":
            ids = "\n".join(str(e.get("messageId")) for e in events)
            batch_id = "batch_" + hashlib.blake2b(ids.encode(), digest_size=12).hexdigest()
            first = _encode(events[0]) if events else b""
            return self._post(batch_id, _encode(events), first)
        for index, event in enumerate(events):
            body = _encode(event)
            outcome = self._post(str(event.get("messageId")), body, body)
            if outcome.kind != "delivered":
                outcome.completed = index
                return outcome
        return Outcome.delivered()

    def _post(self, webhook_id: str, body: bytes, first: bytes) -> Outcome:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "headwater-webhook/1",
            "Idempotency-Key": webhook_id,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            **self.settings.headers,
        }
        if self.settings.secret:
            headers["webhook-signature"] = sign(self.settings.secret, webhook_id, timestamp, body)
            if self.settings.segment_signature:
                headers["X-Signature"] = hmac.new(
                    _secret_bytes(self.settings.secret), first, hashlib.sha1
                ).hexdigest()
        response = self.client.request(
            self.settings.method.upper(), self.settings.url, content=body, headers=headers
        )
        return outcome_for_response(
            response.status_code, response.text, response.headers.get("retry-after")
        )

    def close(self) -> None:
        self.client.close()
