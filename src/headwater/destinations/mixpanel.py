"""Mixpanel destination: events to ``/import``, profiles to ``/engage`` and ``/groups``.

Contract: docs/contracts/DESTINATIONS.md section 1.  The mapping follows Segment's
Mixpanel (Actions) destination (section 1.7), with two deliberate differences:
identity events go to the authenticated ``/import`` rather than to ``/track``
(both are documented for them, 1.6), so that every event gets per-record
errors and ``$insert_id`` dedup; and ``$insert_id`` is derived so that it
meets Mixpanel's rules (at most 36 bytes of ``[A-Za-z0-9-]``, 1.2).

==========  ===============================================================
track       ``/import`` event named ``event``
page        ``/import`` event ``Viewed <name>`` (``Loaded a Page`` without a name)
screen      ``/import`` event ``Viewed <name>`` (``Loaded a Screen`` without a name)
identify    with ``userId`` and a different ``anonymousId``: a ``$identify`` event
            (``$identified_id``, ``$anon_id``; it also carries ``$user_id`` and
            ``$device_id``, which link the two under Simplified ID Merge);
            with traits: ``/engage`` ``$set`` of the traits, renamed as Segment
            does (``email`` -> ``$email`` ...)
group       ``/groups`` ``$set`` of the traits on ``$group_key`` / ``$group_id``
alias       ``$create_alias`` event (``distinct_id`` = previousId, ``alias`` = userId)
==========  ===============================================================

Every event carries ``time`` (ms), ``distinct_id`` (userId, else anonymousId,
else ``""``), ``$insert_id``, ``$device_id`` (anonymousId), ``$user_id``
(userId) and ``ip`` (``context.ip``, else ``0`` so Mixpanel does not place the
user where headwater runs).  An identify without traits and without a second
id, and a group without a group id, have nothing to send and count as
delivered.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
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

_encode = msgspec.json.Encoder().encode

# DESTINATIONS.md 1.1: one host per residency region, same paths on each.
HOSTS = {
    "us": "https://api.mixpanel.com",
    "eu": "https://api-eu.mixpanel.com",
    "in": "https://api-in.mixpanel.com",
}
# DESTINATIONS.md 1.2, 1.4, 1.5.
MAX_RECORDS = 2000
MAX_IMPORT_BYTES = 10 * 1000 * 1000  # "10 MB uncompressed"
DEFAULT_IMPORT_BYTES = 2 * 1024 * 1024  # the 413 example's 2097152 bytes (section 5.1)
MAX_RECORD_BYTES = 1000 * 1000  # per event and per profile update: "1 MB"

# DESTINATIONS.md 1.2: values refused as distinct_id and as $insert_id.
REFUSED_IDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)
_INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
_INSERT_ID_NAMESPACE = uuid.UUID("5c2b7f0e-3a51-4d8e-9a0b-6d1f4e2c8a97")

# DESTINATIONS.md 1.7: identify traits renamed to Mixpanel's reserved properties.
PROFILE_RENAMES = {
    "created": "$created",
    "createdAt": "$created",
    "created_at": "$created",
    "email": "$email",
    "firstName": "$first_name",
    "lastName": "$last_name",
    "name": "$name",
    "username": "$username",
    "phone": "$phone",
}
GROUP_RENAMES = {
    "name": "$name",
    "created": "$created",
    "createdAt": "$created",
    "created_at": "$created",
}
# Context fields copied onto events as Mixpanel's default properties.
CONTEXT_PROPERTIES = (
    ("$current_url", ("page", "url")),
    ("$referrer", ("page", "referrer")),
    ("$os", ("os", "name")),
    ("$os_version", ("os", "version")),
    ("$app_version_string", ("app", "version")),
    ("$app_build_number", ("app", "build")),
    ("$manufacturer", ("device", "manufacturer")),
    ("$model", ("device", "model")),
    ("$screen_height", ("screen", "height")),
    ("$screen_width", ("screen", "width")),
    ("$carrier", ("network", "carrier")),
)
CAMPAIGN = (
    ("utm_source", "source"),
    ("utm_medium", "medium"),
    ("utm_campaign", "name"),
    ("utm_term", "term"),
    ("utm_content", "content"),
)

IMPORT, ENGAGE, GROUPS = "/import", "/engage", "/groups"


class MixpanelSettings(msgspec.Struct, forbid_unknown_fields=True):
    region: str = ""  # us, eu or in: required, there is no default
    project_token: str = ""
    # /import credentials: a service account (recommended) or the project secret.
    service_account_username: str = ""
    service_account_secret: str = ""
    project_id: str = ""
    api_secret: str = ""
    base_url: str = ""  # replaces the region's host, for tests and proxies
    strict: bool = True
    group_key: str = "$group_id"
    timeout_seconds: float = 15.0
    max_events_per_request: int = MAX_RECORDS
    max_bytes_per_request: int = DEFAULT_IMPORT_BYTES


def insert_id(message_id: str) -> str:
    """``messageId`` when Mixpanel accepts it as ``$insert_id``, else a UUIDv5 of it."""
    if _INSERT_ID.fullmatch(message_id) and message_id.lower() not in REFUSED_IDS:
        return message_id
    return str(uuid.uuid5(_INSERT_ID_NAMESPACE, message_id))


def renamed(traits: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in traits.items():
        out[renames.get(key, key)] = value
    return out


def profile_set(traits: dict[str, Any]) -> dict[str, Any]:
    out = renamed(traits, PROFILE_RENAMES)
    first, last = traits.get("firstName"), traits.get("lastName")
    if "$name" not in out and isinstance(first, str) and isinstance(last, str):
        out["$name"] = f"{first} {last}"
    return out


def page_name(event: dict[str, Any], kind: str) -> str:
    name = event.get("name") or path(event, "properties", "name")
    if name:
        return f"Viewed {name}"
    return "Loaded a Page" if kind == "page" else "Loaded a Screen"


class Mixpanel:
    is_warehouse = False

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        s = self.settings = parse_settings(config, MixpanelSettings)
        self.base = base_url(config, s.region, s.base_url, HOSTS)
        if not s.project_token:
            raise setting_error(
                config, "project_token", "required (it goes in every profile update)"
            )
        account = {
            "service_account_username": s.service_account_username,
            "service_account_secret": s.service_account_secret,
            "project_id": s.project_id,
        }
        if any(account.values()):
            for name, value in account.items():
                if not value:
                    raise setting_error(config, name, "required with a service account")
            if s.api_secret:
                raise setting_error(
                    config, "api_secret", "set either a service account or api_secret, not both"
                )
            credential = f"{s.service_account_username}:{s.service_account_secret}"
            self.import_query = f"?strict={int(s.strict)}&project_id={quote_plus(s.project_id)}"
        elif s.api_secret:
            credential = f"{s.api_secret}:"
            self.import_query = f"?strict={int(s.strict)}"
        else:
            raise setting_error(
                config,
                "service_account_username",
                "/import needs credentials: a service account (service_account_username,"
                " service_account_secret, project_id) or api_secret",
            )
        self.auth = "Basic " + base64.b64encode(credential.encode()).decode()
        if not 1 <= s.max_events_per_request <= MAX_RECORDS:
            raise setting_error(config, "max_events_per_request", f"between 1 and {MAX_RECORDS}")
        if not 64 * 1024 <= s.max_bytes_per_request <= MAX_IMPORT_BYTES:
            raise setting_error(
                config, "max_bytes_per_request", f"between 65536 and {MAX_IMPORT_BYTES}"
            )
        if s.timeout_seconds <= 0:
            raise setting_error(config, "timeout_seconds", "must be positive")
        if not s.group_key:
            raise setting_error(config, "group_key", "must not be empty")
        form = Limits(
            max_items=s.max_events_per_request,
            max_bytes=s.max_bytes_per_request,
            overhead=len("data=%5B%5D"),
            separator=len("%2C"),
            max_item_bytes=MAX_RECORD_BYTES,
        )
        self.limits = {
            IMPORT: Limits(
                max_items=s.max_events_per_request,
                max_bytes=s.max_bytes_per_request,
                max_item_bytes=MAX_RECORD_BYTES - 1,  # "under 1 MB"
            ),
            ENGAGE: form,
            GROUPS: form,
        }
        self.client = httpx.Client(timeout=s.timeout_seconds, follow_redirects=False)

    # -- mapping ---------------------------------------------------------------

    def plan(self, events: list[dict[str, Any]]) -> tuple[list[Op], dict[int, str]]:
        ops: list[Op] = []
        rejected: dict[int, str] = {}
        now = time.time_ns() // 1_000_000
        for index, event in enumerate(events):
            kind = event.get("type")
            if kind == "track":
                ops.append(self._import(index, str(event.get("event") or ""), event, now))
            elif kind in ("page", "screen"):
                ops.append(self._import(index, page_name(event, kind), event, now))
            elif kind == "identify":
                ops.extend(self._identify(index, event, now))
            elif kind == "group":
                ops.extend(self._group(index, event))
            elif kind == "alias":
                previous, user = text_id(event.get("previousId")), text_id(event.get("userId"))
                if previous is None or user is None or previous == user:
                    rejected[index] = "alias needs a previousId and a different userId"
                    continue
                properties = {
                    "distinct_id": previous,
                    "alias": user,
                    "token": self.settings.project_token,
                    **self._stamp(event, now),
                }
                ops.append(self._op(IMPORT, index, {"event": "$create_alias"}, properties))
            else:
                rejected[index] = f"Mixpanel has no mapping for type {kind!r}"
        return ops, rejected

    def _stamp(self, event: dict[str, Any], now: int) -> dict[str, Any]:
        return {
            "time": event_ms(event, now),
            "$insert_id": insert_id(str(event.get("messageId") or _encode(event).decode())),
        }

    def _op(self, endpoint: str, index: int, head: dict[str, Any], body: dict[str, Any]) -> Op:
        item = {**head, "properties": body} if endpoint == IMPORT else {**head, **body}
        raw = _encode(item)
        if endpoint == IMPORT:
            return Op(endpoint, item, index, len(raw))
        return Op(endpoint, item, index, len(quote_plus(raw.decode())), len(raw))

    def _import(self, index: int, name: str, event: dict[str, Any], now: int) -> Op:
        context = as_dict(event.get("context"))
        properties = as_dict(event.get("properties"))
        for key, where in CONTEXT_PROPERTIES:
            value = path(context, *where)
            if value is not None:
                properties[key] = value
        campaign = as_dict(context.get("campaign"))
        for key, source in CAMPAIGN:
            if campaign.get(source) is not None:
                properties[key] = campaign[source]
        properties["mp_lib"] = "headwater"
        properties.update(self._ids(event, context, now))
        return self._op(IMPORT, index, {"event": name}, properties)

    def _ids(self, event: dict[str, Any], context: dict[str, Any], now: int) -> dict[str, Any]:
        user, anonymous = text_id(event.get("userId")), text_id(event.get("anonymousId"))
        ids: dict[str, Any] = {"distinct_id": user or anonymous or "", **self._stamp(event, now)}
        if anonymous is not None:
            ids["$device_id"] = anonymous
        if user is not None:
            ids["$user_id"] = user
        ip = context.get("ip")
        ids["ip"] = ip if isinstance(ip, str) and ip else 0
        return ids

    def _identify(self, index: int, event: dict[str, Any], now: int) -> list[Op]:
        ops: list[Op] = []
        context = as_dict(event.get("context"))
        user, anonymous = text_id(event.get("userId")), text_id(event.get("anonymousId"))
        if user is not None and anonymous is not None and user != anonymous:
            properties = {
                "$identified_id": user,
                "$anon_id": anonymous,
                "token": self.settings.project_token,
                **self._ids(event, context, now),
            }
            ops.append(self._op(IMPORT, index, {"event": "$identify"}, properties))
        traits = as_dict(event.get("traits"))
        if traits and (user or anonymous):
            update: dict[str, Any] = {
                "$token": self.settings.project_token,
                "$distinct_id": user or anonymous,
            }
            ip = context.get("ip")
            if isinstance(ip, str) and ip:
                update["$ip"] = ip
            if context.get("active") is False:
                update["$ignore_time"] = True
            ops.append(self._op(ENGAGE, index, update, {"$set": profile_set(traits)}))
        return ops

    def _group(self, index: int, event: dict[str, Any]) -> list[Op]:
        key = self.settings.group_key
        traits = as_dict(event.get("traits"))
        group_id = text_id(traits.get(key)) or text_id(event.get("groupId"))
        if group_id is None:
            return []
        update = {
            "$token": self.settings.project_token,
            "$group_key": key,
            "$group_id": group_id,
        }
        return [self._op(GROUPS, index, update, {"$set": renamed(traits, GROUP_RENAMES)})]

    # -- sending ---------------------------------------------------------------

    def _post(self, url: str, content: bytes, headers: dict[str, str]) -> httpx.Response | Reply:
        try:
            return self.client.post(url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return Reply("retryable", 0, f"{type(exc).__name__}: {exc}")

    def send(self, endpoint: str, items: list[Any]) -> Reply:
        if endpoint == IMPORT:
            return self._send_import(items)
        body = b"data=" + quote_plus(_encode(items).decode()).encode()
        response = self._post(
            f"{self.base}{endpoint}?ip=0&verbose=1",
            body,
            {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        )
        if isinstance(response, Reply):
            return response
        status, text = response.status_code, response.text
        if status == 200:
            # DESTINATIONS.md 1.4: a 200 can carry a failure; verbose=1 gives {"status": 0|1}.
            try:
                answer = msgspec.json.decode(text)
            except msgspec.DecodeError:
                answer = text.strip()
            ok = answer.get("status") == 1 if isinstance(answer, dict) else answer == "1"
            if ok:
                return Reply("ok", status)
            error = answer.get("error") if isinstance(answer, dict) else None
            return Reply("invalid", status, str(error or text)[:500])
        if status == 400:
            return Reply("invalid", status, text[:500])
        return self._failure(response)

    def _send_import(self, items: list[Any]) -> Reply:
        response = self._post(
            f"{self.base}{IMPORT}{self.import_query}",
            _encode(items),
            {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": self.auth,
            },
        )
        if isinstance(response, Reply):
            return response
        status, text = response.status_code, response.text
        if 200 <= status < 300:
            return Reply("ok", status)
        if status == 400:
            # DESTINATIONS.md 1.2: strict mode ingests the valid records and lists the
            # others in failed_records; key on "index" only (the id key varies).
            try:
                answer = msgspec.json.decode(text)
            except msgspec.DecodeError:
                answer = None
            failed = answer.get("failed_records") if isinstance(answer, dict) else None
            rejected: dict[int, str] = {}
            for record in failed if isinstance(failed, list) else []:
                if isinstance(record, dict) and isinstance(record.get("index"), int):
                    reason = f"{record.get('field', '')}: {record.get('message', '')}"
                    rejected[record["index"]] = reason.strip(": ")[:500]
            return Reply("partial", status, text[:2000], rejected=rejected)
        return self._failure(response)

    def _failure(self, response: httpx.Response) -> Reply:
        status = response.status_code
        if status == 413:
            return Reply("too_large", status, response.text[:500])
        kind = classify_status(status)
        return Reply(
            "retryable" if kind == "retryable" else "permanent",
            status,
            response.text[:2000],
            retry_after_seconds(response.headers.get("retry-after")),
        )

    # -- the Destination protocol ---------------------------------------------

    def check(self) -> None:
        """Send an empty ``/import``: refused credentials or no answer raise."""
        reply = self._send_import([])
        if reply.kind == "permanent" and reply.status in (401, 403):
            name = "api_secret" if self.settings.api_secret else "service_account_username"
            raise setting_error(self.config, name, f"credentials refused: {reply.message}")
        if reply.kind == "retryable":
            raise RuntimeError(f"{self.base} did not answer: {reply.status} {reply.message}")

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        ops, rejected = self.plan(events)
        return run_plan(len(events), ops, rejected, self.limits, self.send)

    def close(self) -> None:
        self.client.close()
