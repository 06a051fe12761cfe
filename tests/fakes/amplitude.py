"""A loopback Amplitude: HTTP V2, Batch, Group Identify and User Mapping.

It answers as docs/contracts/DESTINATIONS.md section 2 describes.

Where the document leaves a behaviour open (section 5) the fake picks one and
says so in a comment marked UNCONFIRMED.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fakes import FakeServer, Request

# 2.3: HTTP V2 takes fewer than 2000 events and 1 MB; Batch 2000 events and 20 MB.
MAX_EVENTS = {"/2/httpapi": 1999, "/batch": 2000}
MAX_BYTES = {"/2/httpapi": 1_000_000, "/batch": 20_000_000}
# 2.6: 1024 identifications, 1024 group properties and 1 MB per request.
GROUP_IDENTIFY_MAX = 1024
GROUP_IDENTIFY_BYTES = 1_000_000
DEFAULT_MIN_ID_LENGTH = 5  # 2.2
DEDUP_WINDOW_MS = 7 * 86_400_000  # 2.2 "Event deduplication"
# 2.2: ids refused with 400.
REFUSED_IDS = frozenset(
    {
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
# 2.5 / 2.6: the property operations.
USER_OPS = frozenset(
    {
        "$set",
        "$setOnce",
        "$add",
        "$append",
        "$prepend",
        "$unset",
        "$preInsert",
        "$postInsert",
        "$remove",
        "$clearAll",
    }
)
GROUP_OPS = frozenset({"$set", "$setOnce", "$add", "$append", "$prepend", "$unset"})

Handled = tuple[int, dict[str, str], bytes, int]


def _json(status: int, body: dict[str, Any], records: int = 0) -> Handled:
    # 2.4: every body carries "code" (amp-py reads it rather than the status).
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode(), records


def throttled(retry_after: str | None = None) -> Any:
    """A forced answer: the 2.3 429 body, every event of the request throttled."""

    def answer(request: Request) -> tuple[int, dict[str, str], bytes]:
        try:
            events = json.loads(request.payload()).get("events") or []
        except (ValueError, AttributeError):
            events = []
        users = {e["user_id"]: 40 for e in events if isinstance(e, dict) and "user_id" in e}
        body: dict[str, Any] = {
            "code": 429,
            "error": "Too many requests for some devices and users",
            "eps_threshold": 30,
            "throttled_devices": {},
            "throttled_users": users,
            "throttled_events": list(range(len(events))),
        }
        if request.path == "/batch":
            body["exceeded_daily_quota_users"] = {}
            body["exceeded_daily_quota_devices"] = {}
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return 429, headers, json.dumps(body).encode()

    return answer


def _property_ops_ok(properties: Any, allowed: frozenset[str]) -> bool:
    """2.5: plain key/values, or only operations; never both in one object."""
    if not isinstance(properties, dict):
        return False
    ops = [k for k in properties if k.startswith("$")]
    if not ops:
        return True
    return len(ops) == len(properties) and all(k in allowed for k in ops)


class FakeAmplitude(FakeServer):
    def __init__(self, *, api_key: str = "amp-key", max_bytes: dict[str, int] | None = None):
        self.api_key = api_key
        self.max_bytes = {**MAX_BYTES, **(max_bytes or {})}
        # 2.2: a later event with the same insert_id and device_id within 7 days is dropped.
        self.seen: dict[tuple[str, str], int] = {}
        self.events: list[dict[str, Any]] = []  # ingested, duplicates dropped
        self.duplicates = 0
        self.group_identifications: list[dict[str, Any]] = []
        self.group_profiles: dict[tuple[str, str], dict[str, Any]] = {}
        self.mappings: list[dict[str, Any]] = []
        super().__init__()

    def handle(self, request: Request) -> Handled:
        if request.method != "POST":
            return 405, {}, b"", 0
        if request.path in MAX_EVENTS:
            return self._events(request)
        if request.path == "/groupidentify":
            return self._group_identify(request)
        if request.path == "/usermap":
            return self._usermap(request)
        return _json(400, {"code": 400, "error": "Invalid request path"})  # 2.4

    # -- HTTP V2 and Batch -----------------------------------------------------------

    def _events(self, request: Request) -> Handled:
        path = request.path
        payload = request.payload()
        if len(payload) > self.max_bytes[path]:
            return _json(413, {"code": 413, "error": "Payload too large"})
        if not payload:
            return _json(400, {"code": 400, "error": "Missing request body"})
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if path == "/2/httpapi" and kind != "application/json":
            # 2.2: Content-Type application/json is required for V2.  UNCONFIRMED: the error.
            return _json(400, {"code": 400, "error": "Invalid JSON request body"})
        try:
            body = json.loads(payload)
        except ValueError:
            return _json(400, {"code": 400, "error": "Invalid JSON request body"})
        if not isinstance(body, dict):
            return _json(400, {"code": 400, "error": "Invalid JSON request body"})
        if not body.get("api_key"):
            return _json(
                400,
                {
                    "code": 400,
                    "error": "Request missing required field",
                    "missing_field": "api_key",
                },
            )
        if body["api_key"] != self.api_key:
            # 2.4 lists "Invalid API key"; amp-py matches the prefix "Invalid API key:".
            return _json(400, {"code": 400, "error": f"Invalid API key: {body['api_key']}"})
        events = body.get("events")
        if not isinstance(events, list):
            return _json(
                400,
                {"code": 400, "error": "Request missing required field", "missing_field": "events"},
            )
        if len(events) > MAX_EVENTS[path]:
            # UNCONFIRMED: the exact answer to too many events in one request.
            return _json(400, {"code": 400, "error": "Too many events in request"}, len(events))
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        min_length = options.get("min_id_length") or DEFAULT_MIN_ID_LENGTH
        missing: dict[str, list[int]] = {}
        invalid: dict[str, list[int]] = {}
        short: dict[str, list[int]] = {}
        cleaned = []
        for index, event in enumerate(events):
            event = dict(event) if isinstance(event, dict) else None
            cleaned.append(event)
            if event is None:
                invalid.setdefault("event", []).append(index)
                continue
            if not isinstance(event.get("event_type"), str) or not event["event_type"]:
                missing.setdefault("event_type", []).append(index)
                continue
            bad = self._ids(event, min_length)
            if bad:
                table, field = bad
                {"invalid": invalid, "short": short, "missing": missing}[table].setdefault(
                    field, []
                ).append(index)
                continue
            moment = event.get("time")
            if moment is not None and (isinstance(moment, bool) or not isinstance(moment, int)):
                invalid.setdefault("time", []).append(index)  # 2.2: time is ms, else 400
                continue
            session = event.get("session_id")
            if session is not None and (isinstance(session, bool) or not isinstance(session, int)):
                invalid.setdefault("session_id", []).append(index)
                continue
            if "user_properties" in event and not _property_ops_ok(
                event["user_properties"], USER_OPS
            ):
                invalid.setdefault("user_properties", []).append(index)
                continue
            if "group_properties" in event and event["event_type"] != "$groupidentify":
                invalid.setdefault("group_properties", []).append(index)  # 2.2
                continue
        if missing or invalid or short:
            # 2.4: the listed indexes are refused and *nothing* of the request is ingested.
            answer: dict[str, Any] = {
                "code": 400,
                "error": "Invalid field values on some events",
            }
            if missing:
                answer["events_with_missing_fields"] = missing
            if invalid:
                answer["events_with_invalid_fields"] = invalid
            if short:
                # 5.7: a key seen by RudderStack and amp-py, not in the docs.
                answer["events_with_invalid_id_lengths"] = short
            return _json(400, answer, len(events))
        now = int(time.time() * 1000)
        for event in cleaned:
            assert event is not None
            self._ingest(event, now)
        return _json(
            200,
            {
                "code": 200,
                "events_ingested": len(events),
                "payload_size_bytes": len(payload),
                "server_upload_time": now,
            },
            len(events),
        )

    @staticmethod
    def _ids(event: dict[str, Any], min_length: int) -> tuple[str, str] | None:
        """2.2: at least one id; refused values are 400; too short ids are removed."""
        removed = None
        for field in ("user_id", "device_id"):
            if field not in event or event[field] is None:
                event.pop(field, None)
                continue
            value = event[field]
            if not isinstance(value, str) or value.lower() in REFUSED_IDS:
                return "invalid", field
            if len(value) < min_length:
                del event[field]
                removed = field
        if "user_id" in event or "device_id" in event:
            return None
        if removed:
            # 5.7: the docs say the id is removed; left with none, RudderStack saw this 400.
            return "short", removed
        # UNCONFIRMED: the field named when an event has neither id.
        return "missing", "user_id"

    def _ingest(self, event: dict[str, Any], now: int) -> None:
        insert_id = event.get("insert_id")
        if isinstance(insert_id, str):
            # 2.2: when device_id is absent Amplitude derives one from user_id.
            device = event.get("device_id") or f"user:{event.get('user_id')}"
            key = (insert_id, device)
            first = self.seen.get(key)
            if first is not None and now - first < DEDUP_WINDOW_MS:
                self.duplicates += 1
                return
            self.seen[key] = now
        self.events.append(event)

    # -- Group Identify and User Mapping -------------------------------------------

    def _form(self, request: Request, field: str) -> tuple[Any, Handled | None]:
        form = request.form()
        if form.get("api_key") != self.api_key:
            # UNCONFIRMED: these APIs document only 200 and 400.
            return None, _json(400, {"code": 400, "error": "Invalid API key"})
        try:
            value = json.loads(form.get(field, ""))
        except ValueError:
            return None, _json(400, {"code": 400, "error": "missing_event"})
        return value, None

    def _group_identify(self, request: Request) -> Handled:
        if len(request.payload()) > GROUP_IDENTIFY_BYTES:
            # 2.6 lists 200 and 400 only, so too large is a 400 here.  UNCONFIRMED.
            return _json(400, {"code": 400, "error": "request too large"})
        identifications, failure = self._form(request, "identification")
        if failure:
            return failure
        if isinstance(identifications, dict):
            identifications = [identifications]
        if not isinstance(identifications, list) or not identifications:
            return _json(400, {"code": 400, "error": "missing_event"})
        count = len(identifications)
        if count > GROUP_IDENTIFY_MAX:
            return _json(400, {"code": 400, "error": "too many identifications"}, count)
        properties = 0
        for item in identifications:
            if not isinstance(item, dict):
                return _json(400, {"code": 400, "error": "missing_event"}, count)
            for key in ("group_type", "group_value"):
                if not isinstance(item.get(key), str) or not item[key]:
                    return _json(400, {"code": 400, "error": f"missing {key}"}, count)
            group_properties = item.get("group_properties", {})
            if not _property_ops_ok(group_properties, GROUP_OPS):
                return _json(400, {"code": 400, "error": "invalid group_properties"}, count)
            properties += sum(
                len(v) if k.startswith("$") and isinstance(v, dict) else 1
                for k, v in group_properties.items()
            )
        if properties > GROUP_IDENTIFY_MAX:
            return _json(400, {"code": 400, "error": "too many group properties"}, count)
        for item in identifications:
            self.group_identifications.append(item)
            profile = self.group_profiles.setdefault((item["group_type"], item["group_value"]), {})
            group_properties = item.get("group_properties", {})
            if "$set" in group_properties:
                profile.update(group_properties["$set"])
            elif not any(k.startswith("$") for k in group_properties):
                profile.update(group_properties)
        # UNCONFIRMED (5.6): the 200 body.
        return 200, {"Content-Type": "text/plain"}, b"success", count

    def _usermap(self, request: Request) -> Handled:
        mapping, failure = self._form(request, "mapping")
        if failure:
            return failure
        if not isinstance(mapping, list) or not mapping:
            return _json(400, {"code": 400, "error": "missing mapping"})
        for item in mapping:
            ok = isinstance(item, dict) and isinstance(item.get("user_id"), str)
            ok = ok and (isinstance(item.get("global_user_id"), str) or item.get("unmap") is True)
            if not ok:
                return _json(400, {"code": 400, "error": "invalid mapping"}, len(mapping))
        self.mappings.extend(mapping)
        return 200, {"Content-Type": "text/plain"}, b"success", len(mapping)
