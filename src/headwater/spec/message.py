"""The event model: message types and the per-message rules of the Tracking API.

``normalize`` checks one message and stamps what the server owns
(``messageId`` when missing, ``receivedAt``, ``sentAt`` from the envelope,
``context.ip``).  Keys it does not know are kept as they are.
"""

from __future__ import annotations

import uuid
from typing import Any

from headwater.spec.timestamps import parse_ms

TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
NUL = "\x00"
REPLACEMENT = "\ufffd"
# Levels of objects and arrays in one message, the message itself counted.  Deeper
# input is refused: it breaks JSON encoders downstream (orjson stops at 255).
MAX_DEPTH = 64


class Rejection(Exception):
    """A request or message breaks a rule; ``field`` names where."""

    def __init__(self, code: str, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.status = status


class Stamp:
    """What the server adds to every message of one request."""

    __slots__ = ("context", "integrations", "ip", "max_message_id", "received_at", "sent_at")

    def __init__(
        self,
        received_at: str,
        ip: str | None,
        sent_at: Any = None,
        context: Any = None,
        integrations: Any = None,
        max_message_id: int = 100,
    ) -> None:
        self.received_at = received_at
        self.ip = ip
        self.sent_at = sent_at
        self.context = context if isinstance(context, dict) else None
        self.integrations = integrations if isinstance(integrations, dict) else None
        self.max_message_id = max_message_id


def _identifier(msg: dict[str, Any], key: str, where: str) -> str | None:
    """An id field as a string, or None when absent, null or blank."""
    value = msg.get(key)
    if value is None:
        msg.pop(key, None)
        return None
    if isinstance(value, str):
        if value.strip():
            return value
        msg.pop(key)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejection("invalid_field", f"{where}{key}", f"{key} must be a string or a number")
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    msg[key] = text
    return text


def normalize(msg: Any, path_type: str | None, stamp: Stamp, where: str = "") -> dict[str, Any]:
    """Check one message in place and stamp it; raise ``Rejection`` naming the field."""
    if not isinstance(msg, dict):
        raise Rejection("invalid_message", where.rstrip(".") or "body", "must be a JSON object")
    if path_type is not None:
        msg["type"] = path_type
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        if kind is None:
            raise Rejection("missing_field", f"{where}type", "type is required")
        raise Rejection(
            "invalid_field", f"{where}type", f"type must be one of {', '.join(sorted(TYPES))}"
        )

    user_id = _identifier(msg, "userId", where)
    anonymous_id = _identifier(msg, "anonymousId", where)
    # Every id field is a string (or absent) whatever the type, so no event
    # can carry an object where the store and destinations expect an id.
    previous_id = _identifier(msg, "previousId", where)
    group_id = _identifier(msg, "groupId", where)
    if kind == "alias":
        if user_id is None:
            raise Rejection("missing_field", f"{where}userId", "alias requires userId")
        if previous_id is None:
            raise Rejection("missing_field", f"{where}previousId", "alias requires previousId")
    elif user_id is None and anonymous_id is None:
        raise Rejection(
            "missing_identity",
            f"{where}userId",
            "userId or anonymousId is required (empty or null counts as absent)",
        )
    if kind == "track":
        event = msg.get("event")
        if not isinstance(event, str) or not event.strip():
            raise Rejection("missing_field", f"{where}event", "track requires a non-empty event")
    elif kind == "group" and group_id is None:
        raise Rejection("missing_field", f"{where}groupId", "group requires groupId")

    for key in OBJECT_FIELDS:
        value = msg.get(key, msg)
        if value is msg:
            continue
        if value is None:
            del msg[key]
        elif not isinstance(value, dict):
            raise Rejection("invalid_field", f"{where}{key}", f"{key} must be an object")
    for key in ("name", "category", "event"):
        value = msg.get(key)
        if value is not None and not isinstance(value, str):
            raise Rejection("invalid_field", f"{where}{key}", f"{key} must be a string")

    if "sentAt" not in msg and stamp.sent_at is not None:
        msg["sentAt"] = stamp.sent_at
    for key in TIME_FIELDS:
        value = msg.get(key)
        if value is None:
            msg.pop(key, None)
        elif not isinstance(value, str) or parse_ms(value) is None:
            raise Rejection(
                "invalid_field", f"{where}{key}", f"{key} must be an ISO-8601 date-time string"
            )

    message_id = msg.get("messageId")
    if isinstance(message_id, int) and not isinstance(message_id, bool):
        message_id = msg["messageId"] = str(message_id)
    if message_id is None or (isinstance(message_id, str) and not message_id.strip()):
        # Blank counts as missing: two events must never share an empty id.
        msg["messageId"] = str(uuid.uuid4())
    elif not isinstance(message_id, str):
        raise Rejection("invalid_field", f"{where}messageId", "messageId must be a string")
    elif len(message_id) > stamp.max_message_id:
        raise Rejection(
            "invalid_field",
            f"{where}messageId",
            f"messageId is longer than {stamp.max_message_id} characters",
        )

    msg.pop("writeKey", None)
    msg["receivedAt"] = stamp.received_at
    if stamp.integrations is not None:
        msg["integrations"] = {**stamp.integrations, **msg.get("integrations", {})}
    context = msg.get("context")
    if stamp.context is not None:
        context = msg["context"] = {**stamp.context, **(context or {})}
    if stamp.ip is not None and _collects_ip(context):
        if context is None:
            msg["context"] = {"ip": stamp.ip}
        else:
            context["ip"] = stamp.ip
    checked: dict[str, Any] = msg
    return checked


# Server-side libraries send from a company's backend: the peer address is
# the backend's, not the user's, so it is not recorded unless the message asks
# for it with context.direct = true.
SERVER_LIBRARIES = frozenset(
    {
        "analytics-python",
        "analytics-node",
        "@segment/analytics-node",
        "analytics-go",
        "analytics-java",
        "analytics-ruby",
        "analytics-php",
        "analytics.NET",
        "analytics-csharp",
        "analytics-rust",
        "rudder-sdk-node",
        "rudder-sdk-go",
        "rudder-sdk-java",
        "rudder-sdk-ruby",
        "rudder-sdk-php",
    }
)


def _collects_ip(context: dict[str, Any] | None) -> bool:
    """Whether the request's address is recorded as ``context.ip``.

    Never over an ``ip`` the message carries; for client-side libraries and
    raw HTTP calls, yes; for server-side libraries only with ``direct: true``.
    """
    if not context:
        return True
    if context.get("ip"):
        return False
    library = context.get("library")
    name = library.get("name") if isinstance(library, dict) else None
    return name not in SERVER_LIBRARIES or context.get("direct") is True


def check_depth(document: dict[str, Any], batch: bool) -> None:
    """Refuse a message nesting deeper than ``MAX_DEPTH`` levels, naming its field.

    A batch's own ``context`` and ``integrations`` are merged into every
    message, so the envelope's fields count as message fields.
    """
    messages = document.get("batch") if batch else None
    if isinstance(messages, list):
        envelope = {k: v for k, v in document.items() if k != "batch"}
        _check_depth(envelope, "")
        for index, message in enumerate(messages):
            if isinstance(message, dict):
                _check_depth(message, f"batch[{index}].")
    else:
        _check_depth(document, "")


def _check_depth(msg: dict[str, Any], where: str) -> None:
    for key, value in msg.items():
        # Iterative over containers only, so the check cannot exhaust the stack.
        pending: list[tuple[Any, int]] = [(value, 2)] if isinstance(value, dict | list) else []
        while pending:
            node, level = pending.pop()
            if level > MAX_DEPTH:
                raise Rejection(
                    "too_deep",
                    f"{where}{key}",
                    f"objects and arrays nest deeper than {MAX_DEPTH} levels (the limit per"
                    " message, the message itself counted)",
                )
            children = node.values() if isinstance(node, dict) else node
            pending.extend((c, level + 1) for c in children if isinstance(c, dict | list))


def scrub_nul(value: Any) -> Any:
    """Replace U+0000 with U+FFFD in every string, keys included."""
    if isinstance(value, str):
        return value.replace(NUL, REPLACEMENT)
    if isinstance(value, dict):
        return {
            (k.replace(NUL, REPLACEMENT) if NUL in k else k): scrub_nul(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub_nul(v) for v in value]
    return value
