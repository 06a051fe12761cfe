"""Amplitude destination: events to HTTP V2 (or Batch), groups and aliases to their APIs.

Contract: docs/contracts/DESTINATIONS.md section 2.  Fields follow Segment's
Amplitude (Actions) destination (section 2.7); identify and the user half of
group travel as ``$identify`` events in the events request, as RudderStack
does (2.8) and as HTTP V2 documents (2.5), so that they get per-record errors,
``insert_id`` dedup and the same batching as every other event.

==========  ===============================================================
track       event ``event_type`` = ``event``, ``event_properties`` = properties,
            revenue fields (``price``, ``quantity``, ``revenue``, ``productId``,
            ``revenueType``) from properties
page        event ``Viewed <name>`` (``Loaded a Page`` without a name)
screen      event ``Viewed <name>`` (``Loaded a Screen`` without a name)
identify    ``$identify`` event, ``user_properties`` = ``{"$set": traits}``
group       ``$identify`` event with ``groups`` = ``{type: value}`` and
            ``user_properties`` = ``{"$set": {type: value}}``, plus a
            ``/groupidentify`` of ``{"$set": traits}`` for the group
alias       ``/usermap`` ``{"user_id": previousId, "global_user_id": userId}``
            (needs Amplitude's Portfolio add-on; drop aliases with a filter
            otherwise)
==========  ===============================================================

Every event carries ``user_id`` (userId), ``device_id`` (``context.device.id``,
else anonymousId), ``time`` (ms), ``insert_id`` (messageId), ``library`` and the
context fields Segment maps (ip, os, device, carrier, location, locale, app
version, advertising ids, user agent).  ``session_id`` comes from
``integrations.Amplitude.session_id`` (or ``integrations["Actions
Amplitude"].session_id``), in ms.  The group type is the trait named by
``group_type_trait`` (else ``[Segment] Group``), the group value the trait
named by ``group_value_trait`` (else ``groupId``).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote_plus

import httpx
import msgspec

from headwater.destinations.base import (
    DestinationConfig,
    Outcome,
    classify_status,
    retry_after_seconds,
)
from headwater.destinations.saas import (
    Limits,
    Op,
    Reply,
    as_dict,
    base_url,
    event_ms,
    parse_settings,
    path,
    run_plan,
    setting_error,
    text_id,
)
from headwater.spec.timestamps import parse_ms

_encode = msgspec.json.Encoder().encode

# DESTINATIONS.md 2.1: events, groupidentify and usermap hosts per region.
HOSTS = {"us": "https://api2.amplitude.com", "eu": "https://api.eu.amplitude.com"}
USERMAP_HOSTS = {"us": "https://api.amplitude.com", "eu": "https://api.eu.amplitude.com"}
EVENT_PATHS = {"httpapi": "/2/httpapi", "batch": "/batch"}
GROUP_IDENTIFY, USERMAP = "/groupidentify", "/usermap"
# DESTINATIONS.md 2.3: HTTP V2 takes fewer than 2000 events and 1 MB; Batch 2000 and 20 MB.
MAX_EVENTS = {"httpapi": 1999, "batch": 2000}
MAX_BYTES = {"httpapi": 1000 * 1000, "batch": 20 * 1000 * 1000}
# DESTINATIONS.md 2.3: wait 30 s (V2) or about 15 s (Batch) after a 429.
THROTTLE_WAIT_S = {"httpapi": 30.0, "batch": 15.0}
# DESTINATIONS.md 2.6: 1024 identifications and 1024 group properties, 1 MB per request.
GROUP_IDENTIFY_MAX = 1024
GROUP_IDENTIFY_BYTES = 1000 * 1000
# /usermap limits are not documented (UNCONFIRMED); these are deliberately modest.
USERMAP_MAX = 1000
USERMAP_BYTES = 1000 * 1000
LIBRARY = "headwater"
DEFAULT_GROUP_TYPE = "[Segment] Group"

# Context paths Segment maps onto event keys (DESTINATIONS.md 2.7).
CONTEXT_FIELDS = (
    ("ip", ("ip",)),
    ("os_name", ("os", "name")),
    ("os_version", ("os", "version")),
    ("device_brand", ("device", "brand")),
    ("device_manufacturer", ("device", "manufacturer")),
    ("device_model", ("device", "model")),
    ("carrier", ("network", "carrier")),
    ("country", ("location", "country")),
    ("region", ("location", "region")),
    ("city", ("location", "city")),
    ("language", ("locale",)),
    ("location_lat", ("location", "latitude")),
    ("location_lng", ("location", "longitude")),
    ("app_version", ("app", "version")),
    ("platform", ("device", "type")),
    ("user_agent", ("userAgent",)),
)


class AmplitudeSettings(msgspec.Struct, forbid_unknown_fields=True):
    api_key: str = ""
    region: str = ""  # us or eu: required, there is no default
    base_url: str = ""  # replaces the region's hosts, for tests and proxies
    endpoint: str = "httpapi"  # or "batch" (Batch Event Upload)
    min_id_length: int | None = None
    group_type_trait: str = ""
    group_value_trait: str = ""
    timeout_seconds: float = 15.0
    max_events_per_request: int = 0  # 0: the endpoint's limit
    max_bytes_per_request: int = 0  # 0: the endpoint's limit


def page_name(event: dict[str, Any], kind: str) -> str:
    name = event.get("name") or path(event, "properties", "name")
    if name:
        return f"Viewed {name}"
    return "Loaded a Page" if kind == "page" else "Loaded a Screen"


def session_ms(value: Any) -> int | None:
    """A Segment session id as epoch ms (DESTINATIONS.md 2.7)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value * 1000) if value < 100_000_000_000 else int(value)
    if isinstance(value, str) and value:
        if value.isdigit():
            return int(value)
        return parse_ms(value)
    return None


class Amplitude:
    is_warehouse = False

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        s = self.settings = parse_settings(config, AmplitudeSettings)
        if not s.api_key:
            raise setting_error(config, "api_key", "required")
        self.base = base_url(config, s.region, s.base_url, HOSTS)
        self.usermap_base = s.base_url.rstrip("/") if s.base_url else USERMAP_HOSTS[s.region]
        if s.endpoint not in EVENT_PATHS:
            raise setting_error(config, "endpoint", "httpapi or batch")
        if s.min_id_length is not None and s.min_id_length < 1:
            raise setting_error(config, "min_id_length", "at least 1")
        max_events = s.max_events_per_request or MAX_EVENTS[s.endpoint]
        if not 1 <= max_events <= MAX_EVENTS[s.endpoint]:
            raise setting_error(
                config, "max_events_per_request", f"between 1 and {MAX_EVENTS[s.endpoint]}"
            )
        max_bytes = s.max_bytes_per_request or MAX_BYTES[s.endpoint]
        if not 64 * 1024 <= max_bytes <= MAX_BYTES[s.endpoint]:
            raise setting_error(
                config, "max_bytes_per_request", f"between 65536 and {MAX_BYTES[s.endpoint]}"
            )
        if s.timeout_seconds <= 0:
            raise setting_error(config, "timeout_seconds", "must be positive")
        self.events_path = EVENT_PATHS[s.endpoint]
        self.options = {"min_id_length": s.min_id_length} if s.min_id_length else None
        envelope = self._envelope([])
        form_key = len("api_key=") + len(quote_plus(s.api_key))
        self.limits = {
            self.events_path: Limits(
                max_items=max_events, max_bytes=max_bytes, overhead=len(envelope)
            ),
            GROUP_IDENTIFY: Limits(
                max_items=GROUP_IDENTIFY_MAX,
                max_bytes=GROUP_IDENTIFY_BYTES,
                overhead=form_key + len("&identification=%5B%5D"),
                separator=len("%2C"),
                max_weight=GROUP_IDENTIFY_MAX,
            ),
            USERMAP: Limits(
                max_items=USERMAP_MAX,
                max_bytes=USERMAP_BYTES,
                overhead=form_key + len("&mapping=%5B%5D"),
                separator=len("%2C"),
            ),
        }
        self.client = httpx.Client(timeout=s.timeout_seconds, follow_redirects=False)

    def _envelope(self, events: list[Any]) -> bytes:
        body: dict[str, Any] = {"api_key": self.settings.api_key, "events": events}
        if self.options:
            body["options"] = self.options
        return _encode(body)

    # -- mapping ---------------------------------------------------------------

    def plan(self, events: list[dict[str, Any]]) -> tuple[list[Op], dict[int, str]]:
        ops: list[Op] = []
        rejected: dict[int, str] = {}
        now = time.time_ns() // 1_000_000
        for index, event in enumerate(events):
            kind = event.get("type")
            if kind == "track":
                item = self._event(event, str(event.get("event") or ""), now)
                item["event_properties"] = as_dict(event.get("properties"))
                item.update(self._revenue(as_dict(event.get("properties"))))
                ops.append(self._op(self.events_path, index, item))
            elif kind in ("page", "screen"):
                item = self._event(event, page_name(event, kind), now)
                item["event_properties"] = as_dict(event.get("properties"))
                ops.append(self._op(self.events_path, index, item))
            elif kind == "identify":
                item = self._event(event, "$identify", now)
                traits = as_dict(event.get("traits"))
                if traits:
                    item["user_properties"] = {"$set": traits}
                ops.append(self._op(self.events_path, index, item))
            elif kind == "group":
                ops.extend(self._group(index, event, now))
            elif kind == "alias":
                previous, user = text_id(event.get("previousId")), text_id(event.get("userId"))
                if previous is None or user is None or previous == user:
                    rejected[index] = "alias needs a previousId and a different userId"
                    continue
                mapping = {"user_id": previous, "global_user_id": user}
                ops.append(self._op(USERMAP, index, mapping))
            else:
                rejected[index] = f"Amplitude has no mapping for type {kind!r}"
        return ops, rejected

    def _op(self, endpoint: str, index: int, item: dict[str, Any], weight: int = 0) -> Op:
        raw = _encode(item)
        if endpoint == self.events_path:
            return Op(endpoint, item, index, len(raw))
        return Op(endpoint, item, index, len(quote_plus(raw.decode())), len(raw), weight)

    def _event(self, event: dict[str, Any], event_type: str, now: int) -> dict[str, Any]:
        context = as_dict(event.get("context"))
        item: dict[str, Any] = {"event_type": event_type}
        user = text_id(event.get("userId"))
        if user is not None:
            item["user_id"] = user
        device = text_id(path(context, "device", "id")) or text_id(event.get("anonymousId"))
        if device is not None:
            item["device_id"] = device
        item["time"] = event_ms(event, now)
        message_id = text_id(event.get("messageId"))
        if message_id is not None:
            item["insert_id"] = message_id
        for key, where in CONTEXT_FIELDS:
            value = path(context, *where)
            if value is not None and value != "":
                item[key] = value
        advertising = path(context, "device", "advertisingId")
        os_name = str(path(context, "os", "name") or "").lower()
        if advertising:
            if os_name == "ios":
                item["idfa"] = advertising
            elif os_name == "android":
                item["adid"] = advertising
        integrations = as_dict(event.get("integrations"))
        for name in ("Actions Amplitude", "Amplitude"):
            session = session_ms(path(integrations, name, "session_id"))
            if session is not None:
                item["session_id"] = session
                break
        item["library"] = LIBRARY
        return item

    @staticmethod
    def _revenue(properties: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("price", "quantity", "revenue"):
            value = properties.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = value
        product = properties.get("productId", properties.get("product_id"))
        if product is not None:
            out["productId"] = str(product)
        revenue_type = properties.get("revenueType", properties.get("revenue_type"))
        if revenue_type is not None:
            out["revenueType"] = str(revenue_type)
        return out

    def _group(self, index: int, event: dict[str, Any], now: int) -> list[Op]:
        traits = as_dict(event.get("traits"))
        s = self.settings
        group_type = text_id(traits.get(s.group_type_trait)) if s.group_type_trait else None
        group_value = text_id(traits.get(s.group_value_trait)) if s.group_value_trait else None
        group_type = group_type or DEFAULT_GROUP_TYPE
        group_value = group_value or text_id(event.get("groupId"))
        if group_value is None:
            return []
        ops: list[Op] = []
        if event.get("userId") or event.get("anonymousId"):
            item = self._event(event, "$identify", now)
            item["groups"] = {group_type: group_value}
            item["user_properties"] = {"$set": {group_type: group_value}}
            ops.append(self._op(self.events_path, index, item))
        identification = {
            "group_type": group_type,
            "group_value": group_value,
            "group_properties": {"$set": traits},
        }
        ops.append(self._op(GROUP_IDENTIFY, index, identification, weight=len(traits)))
        return ops

    # -- sending ---------------------------------------------------------------

    def _post(self, url: str, content: bytes, content_type: str) -> httpx.Response | Reply:
        try:
            return self.client.post(
                url,
                content=content,
                headers={"Content-Type": content_type, "Accept": "*/*"},
            )
        except httpx.HTTPError as exc:
            return Reply("retryable", 0, f"{type(exc).__name__}: {exc}")

    def send(self, endpoint: str, items: list[Any]) -> Reply:
        if endpoint == self.events_path:
            response = self._post(
                f"{self.base}{endpoint}", self._envelope(items), "application/json"
            )
            return response if isinstance(response, Reply) else self._events_reply(response)
        field_name = "identification" if endpoint == GROUP_IDENTIFY else "mapping"
        body = (
            f"api_key={quote_plus(self.settings.api_key)}"
            f"&{field_name}={quote_plus(_encode(items).decode())}"
        ).encode()
        base = self.base if endpoint == GROUP_IDENTIFY else self.usermap_base
        response = self._post(f"{base}{endpoint}", body, "application/x-www-form-urlencoded")
        if isinstance(response, Reply):
            return response
        status, text = response.status_code, response.text
        if 200 <= status < 300:
            return Reply("ok", status)
        if status == 400:
            if "Invalid API key" in text:
                return Reply("permanent", status, text[:2000])
            # No per-record detail is documented for these APIs: find the culprits.
            return Reply("invalid", status, text[:500])
        return self._failure(response)

    def _events_reply(self, response: httpx.Response) -> Reply:
        status, text = response.status_code, response.text
        if 200 <= status < 300:
            return Reply("ok", status)
        if status != 400:
            return self._failure(response)
        # DESTINATIONS.md 2.4: nothing of a 400 was ingested; drop the listed indexes
        # and send the rest again.  A missing field or a bad key is the request's fault.
        try:
            answer = msgspec.json.decode(text)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            return Reply("refused", status, text[:2000])
        error = str(answer.get("error") or "")
        if answer.get("missing_field") or error.startswith("Invalid API key"):
            return Reply("permanent", status, text[:2000])
        rejected: dict[int, str] = {}
        for key in (
            "events_with_missing_fields",
            "events_with_invalid_fields",
            "events_with_invalid_id_lengths",
        ):
            fields = answer.get(key)
            for name, indexes in fields.items() if isinstance(fields, dict) else []:
                for position in indexes if isinstance(indexes, list) else [indexes]:
                    if isinstance(position, int):
                        rejected.setdefault(position, f"{key}: {name}")
        silenced = answer.get("silenced_events")
        for position in silenced if isinstance(silenced, list) else []:
            if isinstance(position, int):
                rejected.setdefault(position, "silenced_events")
        return Reply("partial", status, text[:2000], rejected=rejected, resend=True)

    def _failure(self, response: httpx.Response) -> Reply:
        status = response.status_code
        if status == 413:
            return Reply("too_large", status, response.text[:500])
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        if status == 429 and retry_after is None:
            retry_after = THROTTLE_WAIT_S[self.settings.endpoint]
        kind = classify_status(status)
        return Reply(
            "retryable" if kind == "retryable" else "permanent",
            status,
            response.text[:2000],
            retry_after,
        )

    # -- the Destination protocol ---------------------------------------------

    def check(self) -> None:
        """Send an empty events request: a refused key or no answer raise."""
        response = self._post(
            f"{self.base}{self.events_path}", self._envelope([]), "application/json"
        )
        if isinstance(response, Reply):
            raise RuntimeError(f"{self.base} did not answer: {response.message}")
        if "Invalid API key" in response.text or response.status_code in (401, 403):
            raise setting_error(self.config, "api_key", f"refused: {response.text[:200]}")
        if classify_status(response.status_code) == "retryable":
            raise RuntimeError(f"{self.base} answered {response.status_code}")

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        ops, rejected = self.plan(events)
        return run_plan(len(events), ops, rejected, self.limits, self.send)

    def close(self) -> None:
        self.client.close()
