"""The real client SDKs, unmodified, against a real running server.

Each test drives an SDK exactly as an application would (only its host points
at the server, or at a loopback proxy in front of it), then checks every
stored row against the message the SDK put on the wire: ids, type, names,
JSON payloads, ``context.library``, unknown top-level keys, and the timestamp
rule ``timestamp = receivedAt - (sentAt - originalTimestamp)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import inspect
import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
import rudderstack.analytics as rudder_analytics
import segment.analytics.request
from rudderstack.analytics import Client as RudderClient
from segment.analytics import Client as SegmentClient

from conftest import RunningServer

NODE_DIR = Path(__file__).resolve().parent / "node"
SEGMENT_VERSION = version("segment-analytics-python")
RUDDER_VERSION = version("rudder-sdk-python")
NODE_SDK_VERSION = json.loads((NODE_DIR / "package.json").read_text())["dependencies"][
    "@segment/analytics-node"
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))

# Message keys that land in a column of their own; every other key is kept in ``extra``.
ID_COLUMNS = {
    "event": "event",
    "name": "name",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "group_id": "groupId",
    "previous_id": "previousId",
}
JSON_COLUMNS = ("properties", "traits", "integrations")
COLUMN_KEYS = frozenset(
    {
        "type",
        "messageId",
        *ID_COLUMNS.values(),
        "timestamp",
        "originalTimestamp",
        "sentAt",
        "receivedAt",
        "context",
        *JSON_COLUMNS,
    }
)
# Keys the server consumes rather than stores.
SERVER_CONSUMED = frozenset({"writeKey"})

# Payloads shared by the Python SDKs: unicode (escaped as surrogate pairs by
# json.dumps), nesting, nulls, empty containers, integers beyond 64 bits.
TRAITS = {
    "name": "Zoë Ångström 😀",
    "email": "zoe@example.com",
    "plan": {"tier": "pro", "seats": 25, "addons": ["sso", "audit"], "trial": None},
    "ключ": "значение",
    "created": "2020-02-29T12:00:00+01:00",
}
PROPERTIES = {
    "order": {
        "id": "o-1",
        "items": [{"sku": "ß-1", "qty": 2, "price": 19.99}, {"sku": "ø-2", "qty": 1}],
        "total": 39.98,
        "coupon": None,
    },
    "big": 2**70,
    "negative_big": -(2**64) - 1,
    "int64_max": 2**63 - 1,
    "small": 1e-7,
    "huge": 1.5e300,
    "zero": 0,
    "flag": False,
    "empty": {},
    "none_list": [],
    "quote": 'he said "hi" \\ / \t tab',
    "line_separator": "a\u2028b\u2029c",
    "日本語": "キー 🚀",
}
CONTEXT = {
    "app": {"name": "héadwater-test", "version": "1.2.3", "build": "42"},
    "locale": "fr-FR",
    "timezone": "Europe/Paris",
    "custom": {"deep": {"deeper": [1, "deux", {"trois": True}]}},
}
INTEGRATIONS = {"All": False, "Mixpanel": True, "Amplitude": {"session_id": 1700000000123}}


# --- helpers -----------------------------------------------------------------


def ms(text: str) -> int:
    """An ISO-8601 time as whole milliseconds since the epoch (sub-ms digits dropped)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // timedelta(milliseconds=1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def rows_by_id(server: RunningServer, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored rows of these messageIds; fails on a missing or duplicated row."""
    where = f"message_id IN ({sql_list(ids)})"
    deadline = time.monotonic() + 10
    rows = server.events(where)
    while len(rows) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = server.events(where)
    by_id = {row["message_id"]: row for row in rows}
    assert len(by_id) == len(rows), f"duplicate rows: {[r['message_id'] for r in rows]}"
    assert sorted(by_id) == sorted(ids), f"expected rows for {sorted(ids)}, got {sorted(by_id)}"
    return by_id


def counters(server: RunningServer) -> dict[str, int]:
    server.settle()
    result: dict[str, int] = server.admin.status()["counters"]
    return result


@pytest.fixture(scope="module")
def hw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module; tests look only at their own messageIds."""
    server = RunningServer(tmp_path_factory.mktemp("sdks")).start()
    yield server
    server.stop()


def assert_stored(
    row: dict[str, Any],
    sent: dict[str, Any],
    *,
    window: tuple[int, int],
    sent_at: str | None = None,
) -> None:
    """The stored row holds exactly what the SDK put on the wire for this message.

    ``window`` bounds (in ms) when the request was made; ``sent_at`` is the
    request's ``sentAt`` when the test could see it.
    """
    where = f"{sent['type']} {sent['messageId']}"
    assert row["message_id"] == sent["messageId"], where
    assert row["type"] == sent["type"], where
    for column, key in ID_COLUMNS.items():
        assert row[column] == sent.get(key), f"{where}: {column}"
    for column in JSON_COLUMNS:
        expected = sent.get(column)
        if column == "traits" and expected is None and sent["type"] == "identify":
            # Traits sent only as context.traits (RudderStack) fill the column.
            expected = (sent.get("context") or {}).get("traits")
        assert loads(row[column]) == expected, f"{where}: {column}"

    context = loads(row["context"])
    sent_context = sent.get("context")
    if "ip" not in (sent_context or {}):
        # The server may stamp the peer address (see test_server_side_sdk_events_keep_no_ip).
        stamped = (context or {}).pop("ip", None)
        assert stamped in (None, "127.0.0.1"), f"{where}: context.ip {stamped!r}"
        if context == {} and sent_context is None:
            context = None
    assert context == sent_context, f"{where}: context"

    expected_extra = {
        k: v for k, v in sent.items() if k not in COLUMN_KEYS and k not in SERVER_CONSUMED
    }
    assert (loads(row["extra"]) or {}) == expected_extra, f"{where}: extra"

    lo, hi = window
    original = ms(sent["timestamp"])
    sent_ms = ms(row["sent_at"])
    received = ms(row["received_at"])
    assert ms(row["original_timestamp"]) == original, f"{where}: original_timestamp"
    if sent_at is not None:
        assert sent_ms == ms(sent_at), f"{where}: sent_at"
    assert lo <= sent_ms <= received <= hi, f"{where}: sent/received outside the call window"
    assert ms(row["timestamp"]) == received - (sent_ms - original), f"{where}: timestamp rule"
    assert row["warnings"] is None, f"{where}: warnings {row['warnings']}"


def assert_library(row: dict[str, Any], name: str, library_version: str) -> None:
    library = json.loads(row["context"])["library"]
    assert library == {"name": name, "version": library_version}


# --- a proxy that loses the first response ---------------------------------------


class Exchange:
    def __init__(self, path: str, headers: dict[str, str], body: bytes, upstream: int) -> None:
        self.path = path
        self.headers = headers
        self.body = body
        self.upstream = upstream

    def document(self) -> dict[str, Any]:
        data = self.body
        if self.headers.get("content-encoding") == "gzip":
            data = gzip.decompress(data)
        result: dict[str, Any] = json.loads(data)
        return result

    def message_ids(self) -> list[str]:
        return [m["messageId"] for m in self.document()["batch"]]


FORWARDED = ("content-type", "content-encoding", "authorization", "user-agent", "x-retry-count")


class LostResponseProxy:
    """Forwards every POST to the server, but answers the first ``lose`` of them
    with a 503 as though the server's reply had been lost on the way back."""

    MAX_EXCHANGES = 20

    def __init__(self, upstream: str, lose: int = 1) -> None:
        self.upstream = upstream
        self.lose = lose
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer._lock:
                    index = len(outer.exchanges)
                    if index >= outer.MAX_EXCHANGES:
                        self._reply(500, b'{"code": "proxy", "message": "too many requests"}')
                        return
                    response = httpx.post(
                        outer.upstream + self.path,
                        content=body,
                        headers={k: v for k, v in headers.items() if k in FORWARDED},
                        timeout=10,
                    )
                    outer.exchanges.append(Exchange(self.path, headers, body, response.status_code))
                if index < outer.lose:
                    self._reply(503, b'{"code": "lost", "message": "response lost in transit"}')
                else:
                    self._reply(response.status_code, response.content)

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> LostResponseProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def assert_retried_once_stored_once(
    server: RunningServer,
    proxy: LostResponseProxy,
    ids: list[str],
    retry_header: bool,
    before: dict[str, int],
) -> None:
    """Two deliveries of one batch, same messageIds, one stored row each; a
    third, byte-identical replay of the SDK's request is also absorbed."""
    assert len(proxy.exchanges) == 2, [e.upstream for e in proxy.exchanges]
    first, retry = proxy.exchanges
    assert first.upstream == 200 and retry.upstream == 200
    assert first.message_ids() == retry.message_ids() == ids
    if retry_header:
        assert "x-retry-count" not in first.headers
        assert retry.headers.get("x-retry-count") == "1"
    rows_by_id(server, ids)

    replay = httpx.post(
        server.url + first.path,
        content=first.body,
        headers={k: v for k, v in first.headers.items() if k in FORWARDED},
        timeout=10,
    )
    assert replay.status_code == 200, replay.text
    rows_by_id(server, ids)
    after = counters(server)
    for name, expected in (("stored", len(ids)), ("duplicates", 2 * len(ids))):
        assert after.get(name, 0) - before.get(name, 0) == expected, (name, before, after)


# --- segment-analytics-python --------------------------------------------------


def segment_calls(client: SegmentClient, run: str) -> list[dict[str, Any]]:
    """One of each call, as an application would make them; returns the sent messages."""
    results = [
        client.identify(
            user_id="user-ü-1",
            anonymous_id="anon-ü-1",
            traits=TRAITS,
            context=dict(CONTEXT),
            timestamp=datetime(2024, 3, 10, 8, 15, 30, 250123, tzinfo=IST),
            integrations=INTEGRATIONS,
        ),
        client.track(
            user_id="user-ü-1",
            event="Ordër Completed 🚀",
            properties=PROPERTIES,
            context={"locale": "ja-JP", "traits": {"tier": "gold"}},
            timestamp=datetime(2024, 3, 9, 18, 45, 30, 999000, tzinfo=PST),
            integrations={"Segment.io": True, "Google Analytics": {"clientId": "123.456"}},
            message_id=f"explicit-track-{run}",
        ),
        client.page(
            user_id="user-ü-1",
            category="Docs",
            name="Getting Started",
            properties={"url": "https://example.com/docs?q=ü", "path": "/docs", "title": "Start"},
            timestamp=datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        ),
        client.page(anonymous_id="anon-ü-1", properties={"path": "/"}),
        client.screen(
            anonymous_id="anon-ü-1",
            category="Settings",
            name="Privacy ⚙",
            properties={"toggles": [True, False], "depth": {"a": {"b": {"c": 3}}}},
        ),
        client.group(
            user_id="user-ü-1",
            group_id="grp-ø-1",
            traits={"name": "Ørsted Åb", "employees": 1200, "ids": [2**65, -1]},
            timestamp=datetime(2024, 2, 29, 0, 0, 0, tzinfo=IST),
        ),
        client.alias(previous_id="anon-ü-1", user_id="user-ü-1"),
        client.track(user_id=42, event="Numeric Id", properties={"n": 2**70}),
    ]
    for ok, _ in results:
        assert ok
    return [message for _, message in results]


@pytest.mark.parametrize(
    ("sync_mode", "use_gzip"),
    [(False, False), (False, True), (True, False), (True, True)],
    ids=["async-plain", "async-gzip", "sync-plain", "sync-gzip"],
)
def test_segment_python_round_trip(hw: RunningServer, sync_mode: bool, use_gzip: bool) -> None:
    run = uuid.uuid4().hex[:12]
    failures: list[Any] = []
    client = SegmentClient(
        hw.write_key,
        host=hw.url,
        sync_mode=sync_mode,
        gzip=use_gzip,
        max_retries=2,
        on_error=lambda error, batch: failures.append(error),
    )
    start = now_ms()
    try:
        sent = segment_calls(client, run)
        if not sync_mode:
            client.flush()
    finally:
        if not sync_mode:
            client.join()
    window = (start, now_ms())
    assert failures == []

    rows = rows_by_id(hw, [m["messageId"] for m in sent])
    for message in sent:
        row = rows[message["messageId"]]
        assert_stored(row, message, window=window)
        assert_library(row, "analytics-python", SEGMENT_VERSION)
        assert row["user_agent"] == f"analytics-python/{SEGMENT_VERSION}"

    identify, _track, page, bare_page, screen, group, alias, numeric = sent
    by_type = {m["type"]: rows[m["messageId"]] for m in (identify, screen, group, alias)}
    # Spot checks in the stored form, independent of the SDK's own message dicts.
    row = rows[f"explicit-track-{run}"]
    assert row["event"] == "Ordër Completed 🚀"
    assert json.loads(row["properties"])["big"] == 1180591620717411303424
    assert json.loads(row["properties"])["negative_big"] == -18446744073709551617
    assert row["original_timestamp"] == "2024-03-10T02:45:30.999Z"
    assert json.loads(rows[identify["messageId"]]["traits"]) == TRAITS
    assert rows[identify["messageId"]]["original_timestamp"] == "2024-03-10T02:45:30.250Z"
    assert json.loads(rows[identify["messageId"]]["integrations"]) == INTEGRATIONS
    assert json.loads(rows[page["messageId"]]["extra"]) == {"category": "Docs"}
    assert rows[page["messageId"]]["name"] == "Getting Started"
    assert rows[page["messageId"]]["original_timestamp"] == "2023-12-31T23:59:59.999Z"
    assert json.loads(by_type["screen"]["extra"]) == {"category": "Settings"}
    assert by_type["screen"]["user_id"] is None
    assert by_type["group"]["group_id"] == "grp-ø-1"
    assert by_type["alias"]["previous_id"] == "anon-ü-1"
    assert by_type["alias"]["anonymous_id"] is None
    assert rows[numeric["messageId"]]["user_id"] == "42"
    for message in (identify, page, bare_page, screen, group, alias, numeric):
        assert uuid.UUID(message["messageId"]).version == 4
    for message in (bare_page, screen, alias, numeric):
        row = rows[message["messageId"]]
        assert start <= ms(row["original_timestamp"]) <= ms(row["sent_at"])


def test_segment_python_retry_keeps_message_id(hw: RunningServer) -> None:
    before = counters(hw)
    with LostResponseProxy(hw.url) as proxy:
        client = SegmentClient(hw.write_key, host=proxy.url, gzip=True, max_retries=3)
        try:
            sent = [
                client.track(user_id="retry-user", event=f"Retried {n}", properties={"n": n})[1]
                for n in range(3)
            ]
            client.flush()
        finally:
            client.join()
    # X-Retry-Count arrived in segment-analytics-python 2.4 (with post's retry_count).
    sends_retry_count = (
        "retry_count" in inspect.signature(segment.analytics.request.post).parameters
    )
    assert_retried_once_stored_once(
        hw, proxy, [m["messageId"] for m in sent], sends_retry_count, before
    )


def test_segment_python_resend_of_same_batch_is_stored_once(hw: RunningServer) -> None:
    """The SDK's own ``post`` called twice with one batch, as its consumer does on retry."""
    client = SegmentClient(hw.write_key, host=hw.url, send=False)
    _, message = client.track(user_id="twice", event="Sent Twice", properties={"x": 1})
    before = counters(hw)
    start = now_ms()
    for _attempt in range(2):
        response = segment.analytics.request.post(hw.write_key, hw.url, gzip=True, batch=[message])
        assert response.status_code == 200
    rows = rows_by_id(hw, [message["messageId"]])
    assert_stored(rows[message["messageId"]], message, window=(start, now_ms()))
    assert counters(hw).get("duplicates", 0) - before.get("duplicates", 0) == 1


def test_segment_python_clock_skew_is_corrected(hw: RunningServer) -> None:
    """A device clock an hour slow: the SDK's timestamp and sentAt are both off by
    the same hour, and the stored timestamp lands back on the server's clock."""
    client = SegmentClient(hw.write_key, host=hw.url, send=False)
    start = now_ms()
    slow = datetime.now(UTC) - timedelta(hours=1)
    _, message = client.track(
        user_id="skewed", event="Skewed Clock", timestamp=slow - timedelta(seconds=5)
    )
    sent_at = slow.isoformat(timespec="milliseconds")
    response = segment.analytics.request.post(hw.write_key, hw.url, batch=[message], sentAt=sent_at)
    assert response.status_code == 200
    row = rows_by_id(hw, [message["messageId"]])[message["messageId"]]
    assert_stored(row, message, window=(start - 3_600_000, now_ms()), sent_at=sent_at)
    assert ms(sent_at) - ms(message["timestamp"]) == 5000
    assert ms(row["original_timestamp"]) < start - 3_600_000
    assert ms(row["timestamp"]) == ms(row["received_at"]) - 5000


def test_server_side_sdk_events_keep_no_ip(hw: RunningServer) -> None:
    client = SegmentClient(hw.write_key, host=hw.url, sync_mode=True)
    _, message = client.track(user_id="backend-user", event="Server Side")
    [row] = rows_by_id(hw, [message["messageId"]]).values()
    assert json.loads(row["context"]) == message["context"]


# --- rudder-sdk-python ---------------------------------------------------------


def rudder_calls(client: RudderClient) -> list[dict[str, Any]]:
    results = [
        client.identify(
            user_id="r-user-ü-1",
            anonymous_id="r-anon-1",
            traits=TRAITS,
            context=dict(CONTEXT),
            timestamp=datetime(2024, 3, 10, 8, 15, 30, 250999, tzinfo=IST),
            integrations=INTEGRATIONS,
        ),
        client.track(
            user_id="r-user-ü-1",
            event="Ordër Completed 🚀",
            properties=PROPERTIES,
            context={"locale": "ja-JP"},
            timestamp=datetime(2024, 3, 9, 18, 45, 30, 123456, tzinfo=PST),
            message_id="rudder-explicit-track-1",
        ),
        client.page(
            user_id="r-user-ü-1",
            category="Docs",
            name="Getting Started",
            properties={"url": "https://example.com/docs?q=ü", "path": "/docs"},
        ),
        client.screen(anonymous_id="r-anon-1", name="Privacy ⚙", properties={"on": True}),
        client.group(
            user_id="r-user-ü-1",
            group_id="r-grp-ø-1",
            traits={"name": "Ørsted Åb", "ids": [2**65, -1]},
            timestamp=datetime(2024, 2, 29, 0, 0, 0, tzinfo=UTC),
        ),
        client.alias(previous_id="r-anon-1", user_id="r-user-ü-1"),
    ]
    for ok, _ in results:
        assert ok
    return [message for _, message in results]


def test_rudder_python_round_trip(hw: RunningServer) -> None:
    client = RudderClient(hw.write_key, host=hw.url, max_retries=2)
    assert client.gzip is True, "rudder-sdk-python should gzip by default"
    start = now_ms()
    try:
        sent = rudder_calls(client)
        client.flush()
    finally:
        client.join()
    window = (start, now_ms())

    rows = rows_by_id(hw, [m["messageId"] for m in sent])
    for message in sent:
        row = rows[message["messageId"]]
        assert_stored(row, message, window=window)
        assert_library(row, "analytics-python", RUDDER_VERSION)
        assert json.loads(row["extra"])["channel"] == "server"
        assert row["user_agent"] == f"analytics-python/{RUDDER_VERSION}"

    identify, _track, page, screen, _, _ = sent
    # rudder-sdk-python moves identify traits into context.traits and sends none at the
    # top; the store fills the traits column from them, and keeps the context as sent.
    identify_row = rows[identify["messageId"]]
    assert json.loads(identify_row["traits"]) == TRAITS
    assert json.loads(identify_row["context"])["traits"] == TRAITS
    assert identify_row["original_timestamp"] == "2024-03-10T02:45:30.250Z"
    track_row = rows["rudder-explicit-track-1"]
    assert json.loads(track_row["properties"]) == PROPERTIES
    assert track_row["original_timestamp"] == "2024-03-10T02:45:30.123Z"
    # An empty integrations object becomes {"All": true} in the SDK.
    assert json.loads(track_row["integrations"]) == {"All": True}
    assert json.loads(rows[page["messageId"]]["extra"])["category"] == "Docs"
    assert rows[screen["messageId"]]["name"] == "Privacy ⚙"


def test_rudder_python_module_api_with_data_plane_url(
    hw: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented module-level setup: write_key plus dataPlaneUrl, gzip on by default."""
    monkeypatch.setattr(rudder_analytics, "write_key", hw.write_key)
    monkeypatch.setattr(rudder_analytics, "dataPlaneUrl", hw.url)
    monkeypatch.setattr(rudder_analytics, "default_client", None)
    start = now_ms()
    try:
        rudder_analytics.track(
            user_id="module-user", event="Module Event ✓", properties={"big": 2**70}
        )
        rudder_analytics.identify(user_id="module-user", traits={"name": "Zoë"})
        rudder_analytics.flush()
        assert rudder_analytics.default_client.gzip is True
    finally:
        if rudder_analytics.default_client is not None:
            rudder_analytics.shutdown()
    end = now_ms()
    rows = hw.events("user_id = 'module-user'")
    assert len(rows) == 2, rows
    track, identify = sorted(rows, key=lambda r: r["type"], reverse=True)
    for row in rows:
        assert uuid.UUID(row["message_id"]).version == 4
        assert row["user_id"] == "module-user"
        assert_library(row, "analytics-python", RUDDER_VERSION)
        assert start <= ms(row["original_timestamp"]) <= ms(row["sent_at"]) <= end
        assert ms(row["timestamp"]) == ms(row["received_at"]) - (
            ms(row["sent_at"]) - ms(row["original_timestamp"])
        )
    assert track["event"] == "Module Event ✓"
    assert json.loads(track["properties"]) == {"big": 2**70}
    assert json.loads(identify["context"])["traits"] == {"name": "Zoë"}


# rudder-sdk-python batches up to 100 events and 4 MB, above the 500 KiB request
# limit of Segment's API; a deployment fed by it raises limits.max_request_bytes.
RUDDER_LIMITS = {"HEADWATER_LIMITS_MAX_REQUEST_BYTES": str(4 * 1024 * 1024)}


def test_rudder_python_full_batch_of_valid_events_is_stored(
    make_server: Callable[..., RunningServer],
) -> None:
    hw = make_server(env=RUDDER_LIMITS)
    errors: list[str] = []
    client = RudderClient(
        hw.write_key,
        host=hw.url,
        max_retries=0,
        on_error=lambda error, batch: errors.append(f"{error} ({len(batch)} events)"),
    )
    ids: list[str] = []
    try:
        for n in range(100):
            ok, message = client.track(
                user_id="rudder-burst", event="Burst", properties={"n": n, "note": "x" * 12_000}
            )
            assert ok
            ids.append(message["messageId"])
        client.flush()
    finally:
        client.join()
    assert errors == []
    rows_by_id(hw, ids)


def test_rudder_python_retry_keeps_message_id(hw: RunningServer) -> None:
    before = counters(hw)
    with LostResponseProxy(hw.url) as proxy:
        client = RudderClient(hw.write_key, host=proxy.url, max_retries=3)
        try:
            sent = [
                client.track(user_id="retry-user", event=f"Retried {n}", properties={"n": n})[1]
                for n in range(3)
            ]
            client.flush()
        finally:
            client.join()
    assert_retried_once_stored_once(hw, proxy, [m["messageId"] for m in sent], False, before)


# --- @segment/analytics-node -------------------------------------------------------


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / "headwater-tests-node-install.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def node() -> str:
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        pytest.skip("the @segment/analytics-node tests need `node` and `npm` on PATH")
    major = subprocess.run(
        [node_bin, "-p", "process.versions.node.split('.')[0]"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    if not major.isdigit() or int(major) < 20:
        pytest.skip(f"@segment/analytics-node {NODE_SDK_VERSION} needs Node.js >= 20, got {major}")
    installed = NODE_DIR / "node_modules" / "@segment" / "analytics-node" / "package.json"
    with _install_lock():
        if not installed.exists():
            result = subprocess.run(
                [npm_bin, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{result.stderr}"
    assert json.loads(installed.read_text())["version"] == NODE_SDK_VERSION
    return node_bin


def run_node(node_bin: str, host: str, write_key: str) -> dict[str, Any]:
    result = subprocess.run(
        [node_bin, str(NODE_DIR / "send.mjs"), host, write_key],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"send.mjs failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.node
def test_segment_node_round_trip(hw: RunningServer, node: str) -> None:
    calls = json.loads((NODE_DIR / "calls.json").read_text())
    start = now_ms()
    report = run_node(node, hw.url, hw.write_key)
    window = (start, now_ms())
    assert report["errors"] == []
    assert report["library"] == {"name": "@segment/analytics-node", "version": NODE_SDK_VERSION}
    assert report["responses"] == [200]
    [request] = report["requests"]
    assert request["url"] == f"{hw.url}/v1/batch"
    body = request["body"]
    assert body["writeKey"] == hw.write_key
    sent = body["batch"]
    ids = report["messageIds"]
    assert [m["messageId"] for m in sent] == ids
    assert ids[-1] == "node-explicit-alias-1"
    assert all(i.startswith("node-next-") for i in ids[:-1])

    rows = rows_by_id(hw, [m["messageId"] for m in sent])
    for call, message in zip(calls, sent, strict=True):
        row = rows[message["messageId"]]
        assert_stored(row, message, window=window, sent_at=body["sentAt"])
        assert_library(row, "@segment/analytics-node", NODE_SDK_VERSION)
        assert row["user_agent"] == "analytics-node-next/latest"
        assert json.loads(row["extra"])["_metadata"]["jsRuntime"] == "node"
        # What the application passed, checked against the stored row directly.
        params = call["params"]
        assert row["type"] == call["method"]
        for column, key in ID_COLUMNS.items():
            if key in params:
                assert row[column] == params[key], f"{call['method']}: {column}"
        for column in ("traits", "integrations"):
            if column in params:
                assert json.loads(row[column]) == params[column]
        context = json.loads(row["context"])
        for key, value in params.get("context", {}).items():
            assert context[key] == value
        stamp = params.get("timestamp")
        if isinstance(stamp, dict):
            stamp = stamp["$date"]
        if stamp is not None:
            assert ms(row["original_timestamp"]) == ms(stamp)
        else:
            assert start <= ms(row["original_timestamp"]) <= ms(body["sentAt"])

    track_row = rows[ids[1]]
    assert json.loads(track_row["properties"]) == calls[1]["params"]["properties"]
    assert track_row["original_timestamp"] == "2024-03-10T02:45:30.999Z"
    page_row = rows[ids[2]]
    # analytics-node copies a page's category into its properties as well.
    assert json.loads(page_row["properties"]) == {
        **calls[2]["params"]["properties"],
        "category": "Docs",
    }
    assert json.loads(page_row["extra"])["category"] == "Docs"
    assert rows[ids[4]]["original_timestamp"] == "2024-01-01T07:59:59.999Z"


@pytest.mark.node
def test_segment_node_retry_keeps_message_id(server: RunningServer, node: str) -> None:
    # A server of its own: calls.json carries a fixed messageId, already stored on hw.
    before = counters(server)
    with LostResponseProxy(server.url) as proxy:
        report = run_node(node, proxy.url, server.write_key)
    assert report["errors"] == []
    assert report["responses"] == [503, 200]
    assert_retried_once_stored_once(server, proxy, report["messageIds"], True, before)
