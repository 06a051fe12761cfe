"""A loopback Mixpanel: ``/import``, ``/engage`` and ``/groups``.

It answers as docs/contracts/DESTINATIONS.md section 1 describes.

Where the document leaves a behaviour open (section 5) the fake picks one and
says so in a comment marked UNCONFIRMED.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import Any

from fakes import FakeServer, Request

# 1.2 Limits: 2000 events per request; 10 MB in the prose, 2097152 bytes in the 413
# example (5.1).  The fake enforces the stricter figure.
MAX_RECORDS = 2000
MAX_REQUEST_BYTES = 2_097_152
MAX_EVENT_BYTES = 1_000_000  # 1.2: "under 1 MB" per event; 1.4: 1 MB per profile update
MAX_PROPERTIES = 255  # 1.2: "fewer than 255 properties", keys and array elements alike
MAX_DEPTH = 3  # 1.2: nested objects have "a depth of at most 3"
MIN_TIME_MS = 31_536_000_000  # 1.2: events before 1971-01-01 are rejected
# 1.2: values refused as distinct_id and as $insert_id.
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
INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
# 1.4 / 1.5: the operations each profile endpoint takes.
ENGAGE_OPS = frozenset(
    {"$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset", "$delete"}
)
GROUP_OPS = frozenset({"$set", "$set_once", "$unset", "$remove", "$union", "$delete"})
PROFILE_EXTRAS = frozenset({"$ip", "$time", "$ignore_time", "$ignore_alias"})


def _json(
    status: int, body: dict[str, Any], records: int = 0
) -> tuple[int, dict[str, str], bytes, int]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode(), records


def rate_limited(retry_after: str | None = None) -> Any:
    """A forced answer: 1.2 Responses, 429 (body ``code`` equals the status)."""

    def answer(_: Request) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = {
            "code": 429,
            "error": "Project exceeded rate limits. Please retry the request with exponential"
            " backoff.",
            "status": "Too Many Requests",
        }
        return 429, headers, json.dumps(body).encode()

    return answer


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _too_wide(value: Any) -> bool:
    if isinstance(value, dict):
        return len(value) >= MAX_PROPERTIES or any(_too_wide(v) for v in value.values())
    if isinstance(value, list):
        return len(value) >= MAX_PROPERTIES or any(_too_wide(v) for v in value)
    return False


def _refused(value: Any) -> bool:
    return not isinstance(value, str) or value.lower() in REFUSED_IDS


class FakeMixpanel(FakeServer):
    def __init__(
        self,
        *,
        project_token: str = "mp-token",
        project_id: str = "",
        service_account: tuple[str, str] | None = None,
        api_secret: str = "",
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.project_token = project_token
        self.project_id = project_id
        self.service_account = service_account
        self.api_secret = api_secret
        self.max_request_bytes = max_request_bytes
        # 1.2 Dedup: (event, distinct_id, time, $insert_id); the latest copy is kept.
        self.events: dict[tuple[str, str, int, str], dict[str, Any]] = {}
        self.imported: list[dict[str, Any]] = []  # every accepted copy, duplicates too
        self.engage: list[dict[str, Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.profiles: dict[str, dict[str, Any]] = {}
        self.group_profiles: dict[tuple[str, str], dict[str, Any]] = {}
        super().__init__()

    # -- what tests read ---------------------------------------------------------

    def unique_events(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events.values())

    # -- dispatch -----------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, dict[str, str], bytes, int]:
        if request.method != "POST":
            return 405, {}, b"", 0
        if request.path == "/import":
            return self._import(request)
        if request.path in ("/engage", "/groups"):
            return self._profiles(request)
        return 404, {}, b"not found", 0

    # -- /import ------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        """1.2 Auth: service account + project_id, else the secret or token as user."""
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        raw = header[6:].strip()
        try:
            decoded = base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = raw  # 1.2: credentials in plain text after "Basic " are accepted too
        user, _, password = decoded.partition(":")
        if "project_id" in request.query:
            return (
                self.service_account is not None
                and request.query["project_id"] == self.project_id
                and (user, password) == self.service_account
            )
        secrets = {s for s in (self.api_secret, self.project_token) if s}
        return user in secrets and password == ""

    def _import(self, request: Request) -> tuple[int, dict[str, str], bytes, int]:
        if not self._authorized(request):
            return _json(
                401, {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}
            )
        strict = request.query.get("strict", "1")
        if strict not in ("0", "1"):
            return self._bad("strict must be 0 or 1")
        try:
            payload = request.payload()
        except OSError:
            return self._bad("invalid gzip body")
        if len(payload) > self.max_request_bytes:
            return _json(
                413,
                {
                    "code": 413,
                    "error": f"request exceeds max limit of {self.max_request_bytes} bytes",
                    "status": "Request Entity Too Large",
                },
            )
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if kind == "application/x-ndjson":
                records = [json.loads(line) for line in payload.splitlines() if line.strip()]
            elif kind == "application/json":
                records = json.loads(payload)
            else:
                return self._bad(f"unsupported Content-Type {kind!r}")
        except ValueError as exc:
            # UNCONFIRMED (5.4): the body for malformed JSON.
            return self._bad(f"unable to parse request body: {exc}")
        if not isinstance(records, list) or not records:
            return self._bad("request body must be a non-empty JSON array")  # minItems: 1
        if len(records) > MAX_RECORDS:
            # UNCONFIRMED: the exact answer to more than 2000 events.
            return self._bad(f"too many events: {len(records)} > {MAX_RECORDS}")
        failed: list[dict[str, Any]] = []
        accepted = 0
        for index, record in enumerate(records):
            problem = self._validate(record)
            if problem:
                field, message = problem
                properties = record.get("properties") if isinstance(record, dict) else None
                insert_id = properties.get("$insert_id") if isinstance(properties, dict) else None
                # 1.2: index, $insert_id, field and message (the id key differs by source).
                failed.append(
                    {"index": index, "$insert_id": insert_id, "field": field, "message": message}
                )
                continue
            accepted += 1
            self._store(record)
        if failed and strict == "1":
            # 1.2: strict=1 is a partial success; the valid records were ingested.
            return _json(
                400,
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "status": "Bad Request",
                    "num_records_imported": accepted,
                    "failed_records": failed,
                },
                len(records),
            )
        # UNCONFIRMED (5.4): with strict=0 invalid records are dropped silently.
        return _json(
            200, {"code": 200, "num_records_imported": accepted, "status": "OK"}, len(records)
        )

    @staticmethod
    def _bad(error: str) -> tuple[int, dict[str, str], bytes, int]:
        return _json(400, {"code": 400, "error": error, "status": "Bad Request"})

    def _validate(self, record: Any) -> tuple[str, str] | None:
        """1.2 Event object rules, then 1.6 for the identity events."""
        if not isinstance(record, dict):
            return "", "event must be an object"
        extra = sorted(set(record) - {"event", "properties"})
        if extra:
            return extra[0], "additional properties are not allowed"
        name = record.get("event")
        if not isinstance(name, str) or not name:
            return "event", "'event' must be a non-empty string"
        properties = record.get("properties")
        if not isinstance(properties, dict):
            return "properties", "'properties' must be an object"
        moment = properties.get("time")
        if isinstance(moment, bool) or not isinstance(moment, int | float):
            return "properties.time", "'properties.time' is required and must be a number"
        moment_ms = moment if moment > 100_000_000_000 else moment * 1000
        if moment_ms < MIN_TIME_MS:
            return "properties.time", "'properties.time' is before 1971-01-01"
        if moment_ms > time.time() * 1000 + 3_600_000:
            # The prose's reading of 5.2 (rejected) rather than the schema's (overwritten).
            return "properties.time", "'properties.time' is more than 1 hour in the future"
        if "distinct_id" not in properties:
            return "properties.distinct_id", "'properties.distinct_id' is required"
        distinct_id = properties["distinct_id"]
        if distinct_id != "" and _refused(distinct_id):
            return "properties.distinct_id", f"invalid distinct_id {distinct_id!r}"
        insert_id = properties.get("$insert_id")
        if (
            not isinstance(insert_id, str)
            or not INSERT_ID.fullmatch(insert_id)
            or insert_id.lower() in REFUSED_IDS
        ):
            return "properties.$insert_id", "'$insert_id' must be 1-36 characters of [A-Za-z0-9-]"
        if len(json.dumps(record).encode()) >= MAX_EVENT_BYTES:
            return "properties", "event exceeds 1 MB"
        if len(properties) >= MAX_PROPERTIES:
            return "properties", f"event has {len(properties)} properties (limit 255)"
        for key, value in properties.items():
            if _depth(value) > MAX_DEPTH or _too_wide(value):
                return f"properties.{key}", "nested value too deep or too wide"
        if name == "$identify":
            for key in ("$identified_id", "$anon_id"):
                if not isinstance(properties.get(key), str) or not properties[key]:
                    return f"properties.{key}", f"'{key}' is required for $identify"
        if name == "$create_alias":
            alias = properties.get("alias")
            if not isinstance(alias, str) or not alias or alias == distinct_id:
                return "properties.alias", "'alias' is required and must differ from distinct_id"
        if name == "$merge":
            ids = properties.get("$distinct_ids")
            if not isinstance(ids, list) or len(ids) != 2:
                return "properties.$distinct_ids", "'$distinct_ids' needs exactly 2 ids"
        return None

    def _store(self, record: dict[str, Any]) -> None:
        properties = record["properties"]
        moment = properties["time"]
        moment_ms = int(moment if moment > 100_000_000_000 else moment * 1000)
        key = (record["event"], properties["distinct_id"], moment_ms, properties["$insert_id"])
        self.events.pop(key, None)  # the most recently ingested copy is the one shown
        self.events[key] = record
        self.imported.append(record)

    # -- /engage and /groups --------------------------------------------------------

    def _profiles(self, request: Request) -> tuple[int, dict[str, str], bytes, int]:
        verbose = request.query.get("verbose") == "1"
        if request.headers.get("content-encoding", "").lower() == "gzip":
            # 1.4: /engage does not accept gzip.  UNCONFIRMED: the answer given.
            return self._profile_answer(verbose, "gzip is not supported", 0)
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if kind == "application/x-www-form-urlencoded":
                data = request.form().get("data")
                updates = json.loads(data) if data is not None else None
            else:
                updates = json.loads(request.body)
        except ValueError:
            return self._profile_answer(verbose, "unable to parse data", 0)
        if isinstance(updates, dict):
            updates = [updates]
        if not isinstance(updates, list) or not updates:
            return self._profile_answer(verbose, "no updates in data", 0)
        if len(updates) > MAX_RECORDS:  # 1.4 / 1.5: 2000 updates per request
            return self._profile_answer(verbose, "too many updates", len(updates))
        groups = request.path == "/groups"
        errors = []
        for update in updates:
            problem = self._check_update(update, groups)
            if problem:
                errors.append(problem)
                continue
            self._apply(update, groups)
        # UNCONFIRMED (1.4: "a 200 can still carry validation failures"): valid updates are
        # applied and the answer says status 0 with the first error.
        return self._profile_answer(verbose, errors[0] if errors else None, len(updates))

    @staticmethod
    def _profile_answer(
        verbose: bool, error: str | None, records: int
    ) -> tuple[int, dict[str, str], bytes, int]:
        if verbose:  # 1.3: verbose=1 answers {"status": 1|0, "error": ...}
            body = {"status": 0 if error else 1, "error": error}
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode(), records
        return 200, {"Content-Type": "text/plain"}, b"0" if error else b"1", records

    def _check_update(self, update: Any, groups: bool) -> str | None:
        if not isinstance(update, dict):
            return "update must be an object"
        if update.get("$token") != self.project_token:
            return "invalid $token"
        if len(json.dumps(update).encode()) > MAX_EVENT_BYTES:
            return "update exceeds 1 MB"
        if groups:
            for key in ("$group_key", "$group_id"):
                if not isinstance(update.get(key), str) or not update[key]:
                    return f"{key} is required"
            allowed, identity = GROUP_OPS, {"$token", "$group_key", "$group_id"}
        else:
            distinct_id = update.get("$distinct_id")
            if not isinstance(distinct_id, str) or not distinct_id:
                return "$distinct_id is required"
            allowed, identity = ENGAGE_OPS, {"$token", "$distinct_id"}
        ops = [k for k in update if k not in identity and k not in PROFILE_EXTRAS]
        if len(ops) != 1 or ops[0] not in allowed:
            return f"exactly one operation of {sorted(allowed)} is required, got {ops}"
        op = ops[0]
        value = update[op]
        if op == "$unset" and not isinstance(value, list):
            return "$unset takes a list of property names"
        if op not in ("$unset", "$delete") and not isinstance(value, dict):
            return f"{op} takes an object"
        return None

    def _apply(self, update: dict[str, Any], groups: bool) -> None:
        if groups:
            self.groups.append(update)
            profile = self.group_profiles.setdefault(
                (update["$group_key"], update["$group_id"]), {}
            )
        else:
            self.engage.append(update)
            profile = self.profiles.setdefault(update["$distinct_id"], {})
        if "$set" in update:
            profile.update(update["$set"])
        elif "$set_once" in update:
            for key, value in update["$set_once"].items():
                profile.setdefault(key, value)
        elif "$unset" in update:
            for key in update["$unset"]:
                profile.pop(key, None)
        elif "$union" in update:
            for key, values in update["$union"].items():
                current = profile.setdefault(key, [])
                current.extend(v for v in values if v not in current)
