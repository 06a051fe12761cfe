"""Field cases: inputs that broke other event pipelines, replayed against a real server.

The requests come from ``tests/data/field-cases.jsonl`` (a copy of the shared
field cases) with their macros expanded; the assertions are written per case
and read the stored rows back from the ``events`` table.

Choices made where a case allows two behaviours:

- NUL (U+0000) is replaced by U+FFFD in keys and values, everywhere (BC-01).
- A body labelled gzip that is not gzip is refused with 400; there is no
  magic-byte sniffing.  Several gzip members and zero padding are accepted,
  any other byte after the stream is refused (BC-04).
- Both limits answer 400 naming the limit: 32 KiB per message measured on the
  UTF-8 bytes of the compact JSON, 500 KiB per request measured after
  decompression, and 2,500 messages per batch (BC-06, BC-07).
- A time that cannot be parsed (year -25) is refused with 400 naming the field;
  an implausible ``sentAt`` skips the skew correction with a warning; a future
  event time is clamped to ``receivedAt`` with a warning (BC-10, BC-12).
- NaN and Infinity are refused as invalid JSON; a number that overflows a
  double is refused with 400 naming the property (BC-15).
- Objects and arrays nested deeper than ``MAX_DEPTH`` (64) levels are refused
  with 400 stating it (BC-16).
- Numeric ids are kept as their decimal string (BC-19); alias with
  ``previousId == userId`` is accepted and stored as sent (BC-21).
- A batch is accepted or refused as a whole (BC-20; gateway/app.py).
- ``::ffff:192.0.2.128`` in ``context.ip`` is kept exactly as sent; an
  X-Forwarded-For entry that is not an address makes the peer address count
  (BC-27).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import WRITE_KEY, RunningServer
from headwater import config
from headwater.spec.message import MAX_DEPTH
from headwater.spec.timestamps import MIN_MS, format_ms

CASES_FILE = Path(__file__).parent / "data" / "field-cases.jsonl"
CASES = {
    case["id"]: case
    for case in (json.loads(line) for line in CASES_FILE.read_text().splitlines() if line)
}
BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
OTHER_KEY = "OTHER_KEY"
DISABLED_KEY = "DISABLED_KEY"
ORIGIN = "https://shop.example.com"

_NOW = re.compile(r"\{\{NOW((?:[+-]\d+[smhd])*)\}\}")
_OFFSET = re.compile(r"([+-])(\d+)([smhd])")
_REPEAT = re.compile(r"\{\{REPEAT:(.+?):(\d+)\}\}")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


# --- expanding the case file ------------------------------------------------------------


def iso(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now_macro(match: re.Match[str], now: datetime) -> str:
    moment = now
    for sign, amount, unit in _OFFSET.findall(match.group(1)):
        delta = timedelta(**{_UNITS[unit]: int(amount)})
        moment = moment + delta if sign == "+" else moment - delta
    return iso(moment)


def expand(value: Any, now: datetime, index: int | None = None) -> Any:
    """Expand the macros of field-cases.md in a request body."""
    if isinstance(value, str):
        value = _NOW.sub(lambda m: _now_macro(m, now), value)
        value = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), value)
        return value.replace("{{i}}", str(index)) if index is not None else value
    if isinstance(value, list):
        return [expand(v, now, index) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            spec = value["$repeat"]
            return [expand(spec["item"], now, i) for i in range(spec["count"])]
        if set(value) == {"$nest"}:
            spec = value["$nest"]
            node = expand(spec["leaf"], now, index)
            for _ in range(spec["depth"]):
                node = {spec["key"]: node}
            return node
        return {k: expand(v, now, index) for k, v in value.items()}
    return value


def encode(request: dict[str, Any], now: datetime) -> bytes:
    encoding = request.get("body_encoding", "json")
    body = request["body"]
    if encoding == "hex":
        return bytes.fromhex(body)
    if encoding == "raw":
        return str(body).encode("utf-8")
    data = json.dumps(expand(body, now), ensure_ascii=False).encode("utf-8")
    return gzip.compress(data) if encoding == "gzip" else data


def send(server: RunningServer, request: dict[str, Any], now: datetime | None = None) -> Any:
    now = now or datetime.now(UTC)
    assert request["method"] == "POST"
    response = server.post(
        request["path"], content=encode(request, now), headers=request["headers"], auth=False
    )
    assert response.status_code < 500, response.text
    return response


def run_case(server: RunningServer, case_id: str) -> list[httpx.Response]:
    """Send every request of a case, in order, with one NOW for the whole case."""
    now = datetime.now(UTC)
    return [send(server, request, now) for request in CASES[case_id]["requests"]]


# --- reading the store ------------------------------------------------------------------


def stored(server: RunningServer, *message_ids: str) -> list[dict[str, Any]]:
    quoted = ", ".join("'" + m.replace("'", "''") + "'" for m in message_ids)
    return server.events(f"message_id IN ({quoted})")


def one(server: RunningServer, message_id: str) -> dict[str, Any]:
    rows = stored(server, message_id)
    assert len(rows) == 1, rows
    return rows[0]


def by_id(server: RunningServer, *message_ids: str) -> dict[str, dict[str, Any]]:
    """The stored row of each message id; each must be stored exactly once."""
    rows = stored(server, *message_ids)
    assert sorted(r["message_id"] for r in rows) == sorted(message_ids), rows
    return {r["message_id"]: r for r in rows}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def js(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def counters(server: RunningServer) -> dict[str, int]:
    server.settle()
    result: dict[str, int] = server.admin.status()["counters"]
    return result


def assert_refused(
    response: httpx.Response, field: str, *words: str, status: int = 400, label: Any = ""
) -> dict[str, Any]:
    assert response.status_code == status, (label, response.text)
    body: dict[str, Any] = response.json()
    assert body["success"] is False
    assert body["field"] == field, (label, body)
    assert body["code"] and body["message"]
    for word in words:
        assert word.lower() in body["message"].lower(), (label, body)
    return body


def assert_ok(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}


@pytest.fixture(scope="module")
def hw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module, in a non-UTC zone, with three sources."""
    sources = [
        config.Source(name="default", write_key=WRITE_KEY),
        config.Source(name="other", write_key=OTHER_KEY),
        config.Source(name="off", write_key=DISABLED_KEY, enabled=False),
    ]
    server = RunningServer(
        tmp_path_factory.mktemp("field-cases"),
        env={"TZ": "America/New_York"},
        sources=sources,
    )
    server.start()
    yield server
    server.stop()


# --- the field cases --------------------------------------------------------------------


def test_bc01_nul_replaced_in_keys_and_values(hw: RunningServer) -> None:
    responses = run_case(hw, "BC-01")
    for response in responses:
        assert_ok(response)
        assert "byte sequence" not in response.text
    signed_up = one(hw, "bc01-1")
    assert signed_up["user_id"] == "user\ufffd-01"
    assert js(signed_up["properties"]) == {"plan": "pro\ufffd"}
    assert "\x00" not in json.dumps(signed_up, ensure_ascii=False)
    identified = one(hw, "bc01-2")
    assert js(identified["traits"]) == {"nick\ufffdname": "x"}
    after = one(hw, "bc01-3")
    assert after["event"] == "After NUL"
    assert after["user_id"] == "u-01"
    # The debugger shows the same replacement as the store.
    debugger = {}
    for item in hw.admin.tail(0):
        event = item.get("event", item)
        debugger[event["messageId"]] = event
    assert debugger["bc01-1"]["userId"] == "user\ufffd-01"
    assert debugger["bc01-1"]["properties"] == {"plan": "pro\ufffd"}


def test_bc03_text_plain_body_write_key_and_short_paths(hw: RunningServer) -> None:
    responses = run_case(hw, "BC-03")
    for response in responses:
        assert_ok(response)
    clicked, home, left = by_id(hw, "bc03-1", "bc03-2", "bc03-3").values()
    assert (clicked["type"], clicked["event"]) == ("track", "Button Clicked")
    assert clicked["anonymous_id"] == "anon-03"
    assert js(clicked["properties"]) == {"id": "cta"}
    assert (home["type"], home["name"]) == ("page", "Home")
    assert (left["type"], left["event"]) == ("track", "Page Left")
    for row in (clicked, home, left):
        assert row["user_id"] is None
        assert "writeKey" not in (js(row["extra"]) or {})
        assert row["source"] == "default"
    # The batch-level sentAt is applied: the page happened 2 s before sending.
    assert home["sent_at"] is not None
    skew = at(home["received_at"]) - at(home["timestamp"])
    assert abs(skew - timedelta(seconds=2)) < timedelta(seconds=1)
    assert abs(at(clicked["received_at"]) - at(clicked["timestamp"])) < timedelta(seconds=1)


def test_bc04_corrupt_and_mislabelled_gzip(hw: RunningServer) -> None:
    re_encoded, truncated, plain, control = run_case(hw, "BC-04")
    for response in (re_encoded, truncated):
        assert_refused(response, "body", "could not be decompressed")
    # No magic-byte sniffing: a body labelled gzip must be gzip.
    assert_refused(plain, "body", "could not be decompressed")
    assert_ok(control)
    assert one(hw, "bc04-1")["event"] == "Gzip Check"
    assert stored(hw, "bc04-3") == []


def test_bc06_single_message_over_32_kib(hw: RunningServer) -> None:
    ascii_big, emoji_big, fits = run_case(hw, "BC-06")
    assert_refused(ascii_big, "body", "32 KiB", "bytes")
    # 8,500 characters, 34,000 UTF-8 bytes: measured in bytes.
    assert_refused(emoji_big, "body", "32 KiB", "bytes")
    assert_ok(fits)
    assert stored(hw, "bc06-1", "bc06-2") == []
    assert js(one(hw, "bc06-3")["properties"]) == {"blob": "x" * 30000}


def test_bc07_batch_over_the_request_limits(hw: RunningServer) -> None:
    too_big, too_many, fits = run_case(hw, "BC-07")
    assert_refused(too_big, "body", "500 KiB")
    assert_refused(too_many, "batch", "2501", "2500")
    assert_ok(fits)
    assert hw.events("message_id LIKE 'bc07-a-%' OR message_id LIKE 'bc07-b-%'") == []
    rows = hw.events("message_id LIKE 'bc07-c-%'")
    assert sorted(r["message_id"] for r in rows) == sorted(f"bc07-c-{i}" for i in range(19))
    assert all(js(r["properties"]) == {"blob": "x" * 25000} for r in rows)


def test_bc08_retry_without_timestamp_is_deduplicated(hw: RunningServer) -> None:
    before = counters(hw)
    first, retry, batch = CASES["BC-08"]["requests"]
    assert_ok(send(hw, first))
    time.sleep(1.0)  # the retry arrives later, so server-assigned times differ
    assert_ok(send(hw, retry))
    assert_ok(send(hw, batch))
    rows = stored(hw, "bc08-1", "bc08-2", "bc08-3")
    assert sorted(r["message_id"] for r in rows) == ["bc08-1", "bc08-2", "bc08-3"]
    assert js(one(hw, "bc08-1")["properties"]) == {"amount": 5}
    after = counters(hw)
    assert after["duplicates"] - before.get("duplicates", 0) == 2
    assert after["stored"] - before.get("stored", 0) == 3


def test_bc09_client_retries_store_one_event(hw: RunningServer) -> None:
    before = counters(hw)
    for response in run_case(hw, "BC-09"):
        assert_ok(response)
    row = one(hw, "bc09-1")
    assert (row["user_id"], row["event"]) == ("u-09", "Paid")
    after = counters(hw)
    assert after["received"] - before.get("received", 0) == 3
    assert after["stored"] - before.get("stored", 0) == 1
    assert after["duplicates"] - before.get("duplicates", 0) == 2


def test_bc10_device_clock_ahead(hw: RunningServer) -> None:
    now = datetime.now(UTC)
    skewed, future = CASES["BC-10"]["requests"]
    assert_ok(send(hw, skewed, now))
    assert_ok(send(hw, future, now))
    corrected = one(hw, "bc10-1")
    received = at(corrected["received_at"])
    assert abs(at(corrected["timestamp"]) - (received - timedelta(seconds=2))) < timedelta(
        seconds=1
    )
    ahead = now + timedelta(days=3)
    # originalTimestamp and sentAt are kept as sent (to the millisecond).
    assert corrected["original_timestamp"] == iso(ahead - timedelta(seconds=2))
    assert corrected["sent_at"] == iso(ahead)
    assert corrected["warnings"] is None
    clamped = one(hw, "bc10-2")
    assert clamped["timestamp"] == clamped["received_at"]
    assert clamped["original_timestamp"] == iso(ahead)
    assert clamped["warnings"] == ["future_timestamp_clamped"]


def test_bc12_absurd_send_time(hw: RunningServer) -> None:
    weird_sent_at, negative_year = run_case(hw, "BC-12")
    assert_ok(weird_sent_at)
    assert_refused(negative_year, "timestamp", "ISO-8601")
    row = one(hw, "bc12-1")
    received = at(row["received_at"])
    timestamp = at(row["timestamp"])
    assert datetime(1970, 1, 1, tzinfo=UTC) <= timestamp <= received
    # The correction is skipped: the event time is the client's originalTimestamp.
    assert abs(timestamp - (received - timedelta(seconds=1))) < timedelta(seconds=1)
    assert row["sent_at"] == "9999-05-28T13:13:23.260Z"
    assert row["warnings"] == ["implausible_sent_at"]
    assert stored(hw, "bc12-2") == []


def test_bc15_nan_infinity_and_overflow(hw: RunningServer) -> None:
    nan, infinity, huge = run_case(hw, "BC-15")
    assert_refused(nan, "body", "invalid JSON")
    assert_refused(infinity, "body", "invalid JSON")
    assert_refused(huge, "properties.huge", "out of range")
    assert stored(hw, "bc15-1", "bc15-2", "bc15-3") == []


def test_bc16_deeply_nested_properties(hw: RunningServer) -> None:
    too_deep, deep = run_case(hw, "BC-16")
    assert_refused(too_deep, "properties", f"{MAX_DEPTH} levels")
    assert_ok(deep)
    assert stored(hw, "bc16-1") == []
    properties = js(one(hw, "bc16-2")["properties"])
    for _ in range(20):
        properties = properties["a"]
    assert properties == 1


def test_bc18_empty_or_null_user_id_is_absent(hw: RunningServer) -> None:
    for response in run_case(hw, "BC-18"):
        assert_ok(response)
    rows = {r["message_id"]: r for r in stored(hw, "bc18-1", "bc18-2", "bc18-3")}
    assert set(rows) == {"bc18-1", "bc18-2", "bc18-3"}
    assert [rows[m]["anonymous_id"] for m in ("bc18-1", "bc18-2", "bc18-3")] == [
        "anon-18a",
        "anon-18b",
        "anon-18a",
    ]
    for row in rows.values():
        assert row["user_id"] is None
        assert "userId" not in (js(row["extra"]) or {})
    assert hw.events("user_id IN ('', 'None', 'null')") == []


def test_bc19_numeric_user_id_becomes_a_string(hw: RunningServer) -> None:
    for response in run_case(hw, "BC-19"):
        assert_ok(response)
    identify, track = by_id(hw, "bc19-1", "bc19-2").values()
    assert identify["user_id"] == "12345"
    assert track["user_id"] == "12345"
    assert js(identify["traits"]) == {"plan": "pro"}


def test_bc20_no_identity(hw: RunningServer) -> None:
    orphan, blank, ok, batch = run_case(hw, "BC-20")
    assert_refused(orphan, "userId", "anonymousId")
    assert_refused(blank, "userId", "anonymousId")
    assert_ok(ok)
    # Whole-batch policy: the bad item at index 1 refuses the request.
    assert_refused(batch, "batch[1].userId", "anonymousId")
    row = one(hw, "bc20-3")
    assert (row["user_id"], row["anonymous_id"]) == ("u-20", None)
    assert stored(hw, "bc20-1", "bc20-2", "bc20-4", "bc20-5") == []


def test_bc21_alias_needs_both_ids(hw: RunningServer) -> None:
    no_user, no_previous, linked, self_link = run_case(hw, "BC-21")
    assert_refused(no_user, "userId")
    assert_refused(no_previous, "previousId")
    assert_ok(linked)
    assert_ok(self_link)
    row, same = by_id(hw, "bc21-3", "bc21-4").values()
    assert (row["type"], row["previous_id"], row["user_id"]) == ("alias", "anon-21", "u-21")
    assert (same["previous_id"], same["user_id"]) == ("u-21", "u-21")
    assert stored(hw, "bc21-1", "bc21-2") == []


def test_bc27_ipv6_and_explicit_ip(hw: RunningServer) -> None:
    for response in run_case(hw, "BC-27"):
        assert_ok(response)
    expected = {
        "bc27-1": "2001:db8:85a3::8a2e:370:7334",
        "bc27-2": "2001:db8::1",
        "bc27-3": "::ffff:192.0.2.128",
        "bc27-4": "203.0.113.7",
    }
    rows = by_id(hw, *expected)
    for message_id, ip in expected.items():
        row = rows[message_id]
        assert row["ip"] == ip
        assert js(row["context"])["ip"] == ip
        assert row["warnings"] is None
    long_ip = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # 45 characters
    body = {"userId": "u-27", "event": "Viewed", "messageId": "bc27-5", "context": {"ip": long_ip}}
    assert_ok(hw.post("/v1/track", body))
    assert one(hw, "bc27-5")["ip"] == long_ip


def test_bc28_bot_user_agent_is_flagged(hw: RunningServer) -> None:
    for response in run_case(hw, "BC-28"):
        assert_ok(response)
    bot, person = by_id(hw, "bc28-1", "bc28-2").values()
    assert bot["is_bot"] is True
    assert person["is_bot"] is False
    assert person["browser"] == "Chrome"


def test_bc30_offsets_stored_as_utc(hw: RunningServer) -> None:
    for response in run_case(hw, "BC-30"):
        assert_ok(response)
    expected = {
        "bc30-1": "2024-03-10T09:30:00.000Z",
        "bc30-2": "2024-03-10T09:30:00.000Z",
        "bc30-3": "2024-03-10T01:30:00.000Z",
    }
    rows = by_id(hw, *expected)
    for message_id, timestamp in expected.items():
        row = rows[message_id]
        assert row["timestamp"] == timestamp
        assert row["original_timestamp"] == timestamp
    # A reader in another time zone sees the same instants.
    local = hw.query(
        "SET SESSION TimeZone = 'America/New_York';"
        " SELECT message_id, epoch_ms(timestamp) AS ms, strftime(timestamp, '%H:%M') AS hm"
        " FROM events WHERE message_id LIKE 'bc30-%' ORDER BY message_id"
    )
    epoch = {m: int(at(t).timestamp() * 1000) for m, t in expected.items()}
    assert [(r["message_id"], r["ms"]) for r in local] == sorted(epoch.items())
    assert [r["hm"] for r in local] == ["05:30", "05:30", "20:30"]  # EDT, then EST


# --- the same kinds of fault, beyond the listed inputs ----------------------------------


def track(message_id: str, **fields: Any) -> dict[str, Any]:
    message = {"type": "track", "userId": "u-kind", "event": "Kind", "messageId": message_id}
    return {**message, **fields}


def nest(depth: int, leaf: Any, key: str = "a") -> Any:
    node = leaf
    for _ in range(depth):
        node = {key: node}
    return node


def gzipped_batch(*messages: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps({"batch": list(messages)}).encode())


GZIP = {"Content-Encoding": "gzip"}


def test_nul_everywhere_in_a_batch(hw: RunningServer) -> None:
    body = {
        "context": {"loc\u0000ale": "en\u0000"},
        "batch": [
            track(
                "nul-\u0000-1",
                event="Sign\u0000ed",
                properties={"list": ["a\u0000", {"k\u0000": ["\u0000", ["deep\u0000"]]}]},
                context={"page": {"title": "t\u0000"}},
                **{"top\u0000level": "v\u0000"},
            ),
        ],
    }
    assert_ok(hw.post("/v1/batch", body))
    row = one(hw, "nul-\ufffd-1")
    assert row["event"] == "Sign\ufffded"
    assert js(row["properties"]) == {"list": ["a\ufffd", {"k\ufffd": ["\ufffd", ["deep\ufffd"]]}]}
    context = js(row["context"])
    context.pop("ip", None)  # the peer address, when the server stamps it
    assert context == {"loc\ufffdale": "en\ufffd", "page": {"title": "t\ufffd"}}
    assert js(row["extra"]) == {"top\ufffdlevel": "v\ufffd"}
    # The same inside a gzip body, and in a pixel's query string.
    response = hw.post("/v1/batch", content=gzipped_batch(track("nul-2", userId="g\u0000z")))
    assert response.status_code == 400  # no Content-Encoding header: the bytes are not JSON
    response = hw.post(
        "/v1/batch", content=gzipped_batch(track("nul-2", userId="g\u0000z")), headers=GZIP
    )
    assert_ok(response)
    assert one(hw, "nul-2")["user_id"] == "g\ufffdz"
    pixel = httpx.get(
        f"{hw.url}/pixel/v1/track?writeKey={WRITE_KEY}&event=Px%00&anonymousId=a%00b"
        "&messageId=nul-3&properties.k%00=v%00",
        timeout=10,
    )
    assert pixel.headers["content-type"] == "image/gif"
    row = one(hw, "nul-3")
    assert (row["event"], row["anonymous_id"]) == ("Px\ufffd", "a\ufffdb")
    assert js(row["properties"]) == {"k\ufffd": "v\ufffd"}


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


_GOOD = gzipped_batch(track("gz-never"))
CORRUPT_GZIP = {
    "empty": b"",
    "random": bytes(range(256)) * 4,
    "magic only": b"\x1f\x8b",
    "header only": _GOOD[:10],
    "crc flipped": _flip(_GOOD, len(_GOOD) - 6),
    "size flipped": _flip(_GOOD, len(_GOOD) - 2),
    "deflate data flipped": _flip(_GOOD, 14),
    "trailing garbage": _GOOD + b"garbage",
    "zlib stream, not gzip": zlib.compress(json.dumps({"batch": [track("gz-never")]}).encode()),
    "gzip inside gzip": gzip.compress(_GOOD),
}


def test_corrupt_gzip_is_refused(hw: RunningServer) -> None:
    for name, content in CORRUPT_GZIP.items():
        response = hw.post("/v1/batch", content=content, headers=GZIP)
        words = "invalid JSON" if name == "gzip inside gzip" else "could not be decompressed"
        assert_refused(response, "body", words, label=name)
    assert stored(hw, "gz-never") == []


def test_gzip_multi_member_chunked_and_padded(hw: RunningServer) -> None:
    data = json.dumps({"batch": [track("gz-members")]}).encode()
    members = gzip.compress(data[:20]) + gzip.compress(data[20:])
    assert_ok(hw.post("/v1/batch", content=members, headers=GZIP))
    assert one(hw, "gz-members")["event"] == "Kind"
    padded = gzipped_batch(track("gz-padded")) + b"\x00" * 16
    assert_ok(hw.post("/v1/batch", content=padded, headers=GZIP))
    assert one(hw, "gz-padded")["event"] == "Kind"
    # Kotlin and Android send gzip with chunked transfer encoding (no Content-Length).
    chunks = gzipped_batch(track("gz-chunked"))
    response = httpx.post(
        f"{hw.url}/v1/b",
        content=iter([chunks[:7], chunks[7:30], chunks[30:]]),
        headers={"Authorization": BASIC, "Content-Type": "text/plain", **GZIP},
        timeout=10,
    )
    assert_ok(response)
    assert one(hw, "gz-chunked")["event"] == "Kind"
    unsupported = hw.post("/v1/batch", content=data, headers={"Content-Encoding": "br"})
    assert_refused(unsupported, "Content-Encoding", "gzip")


def test_gzip_bomb_is_refused_quickly(hw: RunningServer) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * (1 << 20)
    bomb = b"".join(packer.compress(block) for _ in range(64)) + packer.flush()
    assert len(bomb) < 100_000  # 64 MiB of spaces
    started = time.monotonic()
    response = hw.post("/v1/batch", content=bomb, headers=GZIP)
    assert time.monotonic() - started < 5
    assert_refused(response, "body", "500 KiB", "decompression")
    assert httpx.get(f"{hw.url}/ready", timeout=5).status_code == 200


def _padded_batch(prefix: str, size: int) -> bytes:
    """A valid batch of 30,000-byte messages, padded with spaces to exactly ``size`` bytes."""
    messages = [
        track(f"{prefix}-{i}", properties={"blob": "y" * 30000}) for i in range(size // 31000)
    ]
    data = json.dumps({"batch": messages}).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))


def test_request_limit_is_measured_after_decompression(hw: RunningServer) -> None:
    limit = 500 * 1024
    for encoding in ("identity", "gzip"):
        at_limit = _padded_batch(f"lim-{encoding}-ok", limit)
        over = _padded_batch(f"lim-{encoding}-over", limit + 1)
        if encoding == "gzip":
            at_limit, over = gzip.compress(at_limit), gzip.compress(over)
            assert len(over) < 10_000
        headers = {"Content-Encoding": encoding}
        assert_ok(hw.post("/v1/batch", content=at_limit, headers=headers))
        assert_refused(hw.post("/v1/batch", content=over, headers=headers), "body", "500 KiB")
        assert len(hw.events(f"message_id LIKE 'lim-{encoding}-ok-%'")) == limit // 31000
        assert hw.events(f"message_id LIKE 'lim-{encoding}-over-%'") == []


def _message_of_size(message_id: str, size: int) -> dict[str, Any]:
    message = track(message_id, properties={"blob": ""})
    base = len(json.dumps(message, separators=(",", ":")).encode())
    message["properties"]["blob"] = "z" * (size - base)
    return message


def test_message_limit_is_exact_and_applies_inside_batches(hw: RunningServer) -> None:
    limit = 32 * 1024
    assert_ok(hw.post("/v1/track", _message_of_size("size-at", limit)))
    over = _message_of_size("size-over", limit + 1)
    assert_refused(hw.post("/v1/track", over), "body", "32 KiB")
    # Escaped emoji (12 bytes of JSON each) are measured as their 4 UTF-8 bytes.
    fits = track("size-emoji", properties={"blob": "\U0001f600" * 8000})
    assert_ok(hw.post("/v1/track", content=json.dumps(fits, ensure_ascii=True).encode()))
    batch = {"batch": [track("size-b0"), _message_of_size("size-b1", limit + 1)]}
    assert_refused(hw.post("/v1/batch", batch), "batch[1]", "32 KiB")
    assert [r["message_id"] for r in stored(hw, "size-at", "size-emoji")] == [
        "size-at",
        "size-emoji",
    ]
    assert stored(hw, "size-over", "size-b0", "size-b1") == []


BAD_IDS = [True, False, {}, {"id": 1}, [], ["u"]]


def test_ids_that_are_not_strings_or_numbers(hw: RunningServer) -> None:
    for field in ("userId", "anonymousId", "messageId"):
        for value in BAD_IDS:
            message = {**track("bad-id", anonymousId="anon-kind"), field: value}
            response = hw.post("/v1/track", message)
            assert_refused(response, field, field, label=(field, value))
            batch = {"batch": [track("bad-id-0"), message]}
            response = hw.post("/v1/batch", batch)
            assert_refused(response, f"batch[1].{field}", field, label=(field, value))
    assert (
        hw.events("message_id LIKE 'bad-id%' OR user_id = 'u-kind' AND anonymous_id = 'anon-kind'")
        == []
    )


WRONG_KIND = [
    ("/v1/alias", {"userId": "u", "previousId": True}, "previousId"),
    ("/v1/alias", {"userId": "u", "previousId": {"id": "x"}}, "previousId"),
    ("/v1/alias", {"userId": "u", "previousId": ""}, "previousId"),
    ("/v1/alias", {"userId": None, "previousId": "p"}, "userId"),
    ("/v1/group", {"userId": "u", "groupId": ["g"]}, "groupId"),
    ("/v1/group", {"userId": "u", "groupId": "  "}, "groupId"),
    ("/v1/track", {"userId": "u", "event": {"name": "x"}}, "event"),
    ("/v1/track", {"userId": "u", "event": ""}, "event"),
    ("/v1/page", {"userId": "u", "name": ["Home"]}, "name"),
    ("/v1/track", {"userId": "u", "event": "e", "properties": ["x"]}, "properties"),
    ("/v1/identify", {"userId": "u", "traits": "pro"}, "traits"),
    ("/v1/track", {"userId": "u", "event": "e", "context": 1}, "context"),
]


def test_other_fields_of_the_wrong_kind(hw: RunningServer) -> None:
    for path, message, field in WRONG_KIND:
        response = hw.post(path, {**message, "messageId": "wrong-kind"})
        assert_refused(response, field, label=(path, message))
    assert stored(hw, "wrong-kind") == []


def test_numeric_ids_are_decimal_strings(hw: RunningServer) -> None:
    messages = [
        {"type": "identify", "userId": 12345.0, "messageId": "num-1"},
        {"type": "track", "anonymousId": 7, "event": "E", "messageId": 42},
        {"type": "group", "userId": -5, "groupId": 10**30, "messageId": "num-3"},
        {"type": "alias", "userId": 1.5, "previousId": 99, "messageId": "num-4"},
    ]
    assert_ok(hw.post("/v1/batch", {"batch": messages}))
    rows = {r["message_id"]: r for r in stored(hw, "num-1", "42", "num-3", "num-4")}
    assert rows["num-1"]["user_id"] == "12345"
    assert rows["42"]["anonymous_id"] == "7"
    assert (rows["num-3"]["user_id"], rows["num-3"]["group_id"]) == ("-5", "1" + "0" * 30)
    assert (rows["num-4"]["user_id"], rows["num-4"]["previous_id"]) == ("1.5", "99")
    # messageId 42 and "42" are the same message.
    before = counters(hw)
    assert_ok(hw.post("/v1/track", {"anonymousId": "7", "event": "E", "messageId": "42"}))
    assert len(stored(hw, "42")) == 1
    assert counters(hw)["duplicates"] - before.get("duplicates", 0) == 1


def test_blank_ids_are_absent(hw: RunningServer) -> None:
    messages = [
        {"type": "track", "userId": " \t\n", "anonymousId": "anon-b1", "event": "E"},
        {"type": "track", "userId": "u-b2", "anonymousId": "", "event": "E"},
        {"type": "page", "userId": None, "anonymousId": "anon-b3", "name": None},
    ]
    for index, message in enumerate(messages):
        message["messageId"] = f"blank-{index}"
    assert_ok(hw.post("/v1/batch", {"batch": messages}))
    rows = stored(hw, "blank-0", "blank-1", "blank-2")
    assert [(r["user_id"], r["anonymous_id"], r["name"]) for r in rows] == [
        (None, "anon-b1", None),
        ("u-b2", None, None),
        (None, "anon-b3", None),
    ]
    assert all(r["extra"] is None for r in rows)


def test_out_of_range_numbers_are_named(hw: RunningServer) -> None:
    for properties, field in [
        ('{"x":-1e400}', "properties.x"),
        ('{"list":[1,{"y":1E+999}]}', "properties.list[1].y"),
        ('{"a":{"b":[[2e308]]}}', "properties.a.b[0][0]"),
    ]:
        raw = '{"userId":"u","event":"E","messageId":"oor","properties":' + properties + "}"
        response = hw.post("/v1/track", content=raw.encode())
        assert_refused(response, field, "out of range", label=properties)
        batch = '{"batch":[{"type":"identify","userId":"u"},{"type":"track",' + raw[1:] + "]}"
        response = hw.post("/v1/batch", content=batch.encode())
        assert_refused(response, f"batch[1].{field}", "out of range", label=properties)
    assert stored(hw, "oor") == []


def test_tiny_and_huge_numbers_that_fit(hw: RunningServer) -> None:
    raw = (
        '{"userId":"u","event":"E","messageId":"fit","properties":'
        '{"tiny":1e-400,"max":1.7976931348623157e308,"big":123456789012345678901234567890}}'
    )
    assert_ok(hw.post("/v1/track", content=raw.encode()))
    properties = one(hw, "fit")["properties"]
    assert json.loads(properties) == {
        "tiny": 0.0,
        "max": 1.7976931348623157e308,
        "big": 123456789012345678901234567890,
    }
    assert "Infinity" not in properties and "NaN" not in properties


def test_non_json_constants_are_invalid_json(hw: RunningServer) -> None:
    for constant in ("NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf"):
        raw = '{"batch":[{"type":"track","userId":"u","event":"E","messageId":"const",'
        raw += '"properties":{"v":[' + constant + "]}}]}"
        response = hw.post("/v1/batch", content=raw.encode())
        assert_refused(response, "body", "invalid JSON", label=constant)
    assert stored(hw, "const") == []


def test_nesting_limit_is_exact(hw: RunningServer) -> None:
    # The message is level 1, so properties may hold MAX_DEPTH - 1 levels.
    fits = track("depth-ok", properties=nest(MAX_DEPTH - 1, 1))
    assert_ok(hw.post("/v1/track", fits))
    assert js(one(hw, "depth-ok")["properties"]) == nest(MAX_DEPTH - 1, 1)
    for field, value in [
        ("properties", nest(MAX_DEPTH, 1)),
        ("context", nest(MAX_DEPTH, "x", key="page")),
        ("traits", nest(MAX_DEPTH - 1, [1])),
        ("extra", nest(MAX_DEPTH, None)),
    ]:
        response = hw.post("/v1/track", track("depth-over", **{field: value}))
        assert_refused(response, field, f"{MAX_DEPTH} levels")
        batch = {"batch": [track("depth-over-0"), track("depth-over", **{field: value})]}
        assert_refused(hw.post("/v1/batch", batch), f"batch[1].{field}", f"{MAX_DEPTH} levels")
    # Batch-level context is merged into every message, so it counts as a message field.
    envelope = {"context": nest(MAX_DEPTH, 1), "batch": [track("depth-over")]}
    assert_refused(hw.post("/v1/batch", envelope), "context", f"{MAX_DEPTH} levels")
    assert stored(hw, "depth-over", "depth-over-0") == []


def test_very_deep_documents_never_crash(hw: RunningServer) -> None:
    codes = {"too_deep", "invalid_json", "payload_too_large"}
    for depth in (300, 900, 950, 970, 990, 5000, 100_000):
        for leaf in ("1", '"\\u0000"', "1e400"):
            raw = '{"userId":"u","event":"E","messageId":"abyss","properties":'
            raw += '{"a":' * depth + leaf + "}" * depth + "}"
            response = hw.post("/v1/track", content=raw.encode())
            assert response.status_code == 400, (depth, leaf, response.text)
            assert response.json()["code"] in codes, (depth, leaf)
        pixel = httpx.get(
            f"{hw.url}/pixel/v1/track",
            params={
                "writeKey": WRITE_KEY,
                "event": "E",
                "anonymousId": "a",
                "messageId": "abyss",
                "properties" + ".a" * min(depth, 1000): "1",
            },
            timeout=10,
        )
        assert pixel.status_code == 200, depth
        assert pixel.headers["content-type"] == "image/gif"
    assert stored(hw, "abyss") == []


UNUSABLE_TIMES = [
    "-0025-01-01T23:01:01.000Z",
    "+10000-01-01T00:00:00Z",
    "9999-12-31T23:59:59-05:00",  # year 10000 in UTC
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC
    "2024-13-01T00:00:00Z",
    "2024-03-10T25:00:00Z",
    "2024-03-10T10:30:00+24:00",
    "yesterday",
    "",
    1710063000000,
    {"$date": "2024-03-10"},
]


def test_unusable_times_are_refused(hw: RunningServer) -> None:
    for field in ("timestamp", "originalTimestamp", "sentAt"):
        for value in UNUSABLE_TIMES:
            label = (field, value)
            response = hw.post("/v1/track", track("bad-time", **{field: value}))
            assert_refused(response, field, "ISO-8601", label=label)
        # Inside a batch the field is named with the message's index.
        batch = {"batch": [track("bad-time-0"), track("bad-time", **{field: "-0025-01-01"})]}
        response = hw.post("/v1/batch", batch)
        assert_refused(response, f"batch[1].{field}", "ISO-8601", label=field)
    for value in UNUSABLE_TIMES:
        envelope = {"sentAt": value, "batch": [track("bad-time")]}
        assert_refused(hw.post("/v1/batch", envelope), "sentAt", "ISO-8601", label=value)
    assert stored(hw, "bad-time", "bad-time-0") == []


def test_extreme_but_valid_times(hw: RunningServer) -> None:
    now = datetime.now(UTC)
    messages = [
        track("time-1", timestamp="0001-01-01T00:00:00Z"),
        track("time-2", timestamp="9999-12-31T23:59:59.999Z"),
        track("time-3", originalTimestamp=iso(now), sentAt="1900-01-01T00:00:00Z"),
        track("time-4", timestamp="2024-03-10T01:30:00.123456789-08:00"),
        track("time-5", timestamp="2024-03-10T15:15:00+05:45"),
        track("time-6", timestamp="1999-01-01T00:00:00Z"),
    ]
    assert_ok(hw.post("/v1/batch", {"batch": messages}))
    rows = {r["message_id"]: r for r in hw.events("message_id LIKE 'time-%'")}
    assert len(rows) == 6
    received = at(rows["time-1"]["received_at"])
    # Before 1970: replaced by receivedAt; the client's value stays in originalTimestamp.
    assert rows["time-1"]["timestamp"] == rows["time-1"]["received_at"]
    [year_one] = hw.query(
        "SELECT epoch_ms(original_timestamp) AS ms FROM events WHERE message_id = 'time-1'"
    )
    assert year_one["ms"] == MIN_MS
    assert rows["time-1"]["warnings"] == ["timestamp_before_1970_replaced"]
    assert rows["time-2"]["timestamp"] == rows["time-2"]["received_at"]
    assert rows["time-2"]["original_timestamp"] == "9999-12-31T23:59:59.999Z"
    assert rows["time-2"]["warnings"] == ["future_timestamp_clamped"]
    assert abs(at(rows["time-3"]["timestamp"]) - now) < timedelta(seconds=1)
    assert rows["time-3"]["warnings"] == ["implausible_sent_at"]
    assert abs(received - now) < timedelta(seconds=5)
    assert rows["time-4"]["timestamp"] == "2024-03-10T09:30:00.123Z"
    assert rows["time-5"]["timestamp"] == "2024-03-10T09:30:00.000Z"
    # Old times are kept: backfills rely on them.
    assert rows["time-6"]["timestamp"] == "1999-01-01T00:00:00.000Z"
    assert rows["time-6"]["warnings"] is None


def test_years_before_1000_are_padded() -> None:
    assert format_ms(MIN_MS) == "0001-01-01T00:00:00.000Z"
    assert format_ms(-30_610_224_000_000) == "1000-01-01T00:00:00.000Z"
    assert format_ms(-30_610_224_000_001) == "0999-12-31T23:59:59.999Z"


def test_admin_reads_years_before_1000_padded(hw: RunningServer) -> None:
    assert_ok(hw.post("/v1/track", track("time-pad", timestamp="0999-05-06T07:08:09.123Z")))
    assert one(hw, "time-pad")["original_timestamp"] == "0999-05-06T07:08:09.123Z"


def test_forwarded_addresses(hw: RunningServer) -> None:
    cases = {
        "fwd-1": ("203.0.113.9, 2001:db8::2", "2001:db8::2"),
        "fwd-2": ("198.51.100.7, 127.0.0.1", "198.51.100.7"),  # a trusted hop is skipped
        "fwd-3": ("unknown", "127.0.0.1"),
        "fwd-4": ("198.51.100.7, not-an-ip", "127.0.0.1"),
        "fwd-5": ("192.0.2.33:5555", "192.0.2.33"),
        "fwd-6": ("[2001:db8::3]:443", "2001:db8::3"),
    }
    for message_id, (forwarded, _) in cases.items():
        response = hw.post("/v1/track", track(message_id), headers={"X-Forwarded-For": forwarded})
        assert_ok(response)
    rows = by_id(hw, *cases)
    for message_id, (_, ip) in cases.items():
        row = rows[message_id]
        assert row["ip"] == ip, message_id
        assert js(row["context"]) == {"ip": ip}
    # Batch-level context.ip reaches every message that has none; a message's own wins.
    batch = {
        "context": {"ip": "192.0.2.44"},
        "batch": [track("fwd-7"), track("fwd-8", context={"ip": "192.0.2.45"})],
    }
    assert_ok(hw.post("/v1/batch", batch, headers={"X-Forwarded-For": "198.51.100.10"}))
    assert [r["ip"] for r in stored(hw, "fwd-7", "fwd-8")] == ["192.0.2.44", "192.0.2.45"]


def test_bot_judged_from_context_then_header(hw: RunningServer) -> None:
    lighthouse = (
        "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36"
        " (KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse"
    )
    chrome = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/120.0.0.0 Safari/537.36"
    )
    googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    cases = [
        ("bot-1", None, googlebot, True),  # header only
        ("bot-2", chrome, googlebot, False),  # context wins over the header
        ("bot-3", lighthouse, chrome, True),  # looks like Chrome
        ("bot-4", None, chrome, False),
    ]
    for message_id, context_agent, header_agent, _ in cases:
        message = track(message_id)
        if context_agent:
            message["context"] = {"userAgent": context_agent}
        response = hw.post("/v1/page", message, headers={"User-Agent": header_agent})
        assert_ok(response)
    rows = by_id(hw, *(case[0] for case in cases))
    for message_id, _, _, is_bot in cases:
        assert rows[message_id]["is_bot"] is is_bot, message_id


def test_dedup_is_per_source(hw: RunningServer) -> None:
    body = {"userId": "u", "event": "E", "messageId": "dup-src"}
    assert_ok(hw.post("/v1/track", body))
    other = {**body, "writeKey": OTHER_KEY}
    assert_ok(hw.post("/v1/track", other, auth=False))
    rows = stored(hw, "dup-src")
    assert sorted(r["source"] for r in rows) == ["default", "other"]


def test_dedup_survives_a_restart(hw: RunningServer) -> None:
    body = {"userId": "u", "event": "E", "messageId": "dup-restart"}
    assert_ok(hw.post("/v1/track", body))
    assert len(stored(hw, "dup-restart")) == 1
    before = counters(hw)
    assert hw.stop() == 0
    hw.start()
    assert_ok(hw.post("/v1/track", body))
    assert len(stored(hw, "dup-restart")) == 1
    assert counters(hw)["duplicates"] - before.get("duplicates", 0) == 1


# --- transport: CORS, paths, write keys, batch envelopes --------------------------------


def test_cors_preflight_and_simple_responses(hw: RunningServer) -> None:
    for path in ("/v1/t", "/v1/batch", "/v1/b", "/v1/m", f"/v1/projects/{WRITE_KEY}/settings"):
        response = httpx.options(
            hw.url + path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
            timeout=10,
        )
        assert 200 <= response.status_code < 300, path
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert "POST" in response.headers["access-control-allow-methods"]
    bare = httpx.options(hw.url + "/v1/t", headers={"Origin": ORIGIN}, timeout=10)
    assert "Authorization" in bare.headers["access-control-allow-headers"]
    ok = hw.post("/v1/track", track("cors-1"), headers={"Origin": ORIGIN})
    assert_ok(ok)
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    refused = hw.post("/v1/track", {"event": "E"}, headers={"Origin": ORIGIN})
    assert refused.status_code == 400
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_metrics_path_is_accepted(hw: RunningServer) -> None:
    series = {
        "series": [
            {"type": "Counter", "metric": "analytics_js.invoke", "value": 1, "tags": {"type": "t"}}
        ]
    }
    response = hw.post("/v1/m", series, headers={"Content-Type": "text/plain"}, auth=False)
    assert response.status_code == 200


def test_settings_point_the_sdk_at_this_server(hw: RunningServer) -> None:
    for path in (f"/v1/projects/{WRITE_KEY}/settings", f"/projects/{WRITE_KEY}/settings"):
        response = httpx.get(hw.url + path, headers={"Origin": ORIGIN}, timeout=10)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        segment = response.json()["integrations"]["Segment.io"]
        assert segment["apiHost"] == f"127.0.0.1:{hw.port}/v1"
        assert segment["apiKey"] == WRITE_KEY
        assert segment["protocol"] == "http"
    unknown = httpx.get(f"{hw.url}/v1/projects/NOPE/settings", timeout=10)
    assert unknown.status_code == 404


def test_rudderstack_beacon_and_pixel(hw: RunningServer) -> None:
    beacon = httpx.post(
        f"{hw.url}/beacon/v1/batch?writeKey={WRITE_KEY}",
        content=json.dumps({"batch": [track("rs-beacon", anonymousId="anon-rs")]}),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        timeout=10,
    )
    assert_ok(beacon)
    assert one(hw, "rs-beacon")["anonymous_id"] == "anon-rs"
    params = {
        "writeKey": WRITE_KEY,
        "event": "Pixel Seen",
        "anonymousId": "anon-px",
        "messageId": "rs-pixel",
        "properties.campaign": "spring",
    }
    pixel = httpx.get(f"{hw.url}/pixel/v1/track", params=params, timeout=10)
    assert pixel.status_code == 200
    assert pixel.headers["content-type"] == "image/gif"
    assert pixel.content.startswith(b"GIF8")
    row = one(hw, "rs-pixel")
    assert (row["type"], row["event"], row["anonymous_id"]) == ("track", "Pixel Seen", "anon-px")
    assert js(row["properties"]) == {"campaign": "spring"}
    # Always a GIF, even when the request is refused.
    for bad in ({**params, "writeKey": "NOPE"}, {**params, "event": ""}, {"event": "E"}):
        refused = httpx.get(f"{hw.url}/pixel/v1/track", params=bad, timeout=10)
        assert refused.status_code == 200
        assert refused.headers["content-type"] == "image/gif"
    assert len(stored(hw, "rs-pixel")) == 1


def test_write_key_sources(hw: RunningServer) -> None:
    message = track("key-basic")
    assert_ok(hw.post("/v1/track", message))
    colon_less = "Basic " + base64.b64encode(WRITE_KEY.encode()).decode()
    assert_ok(hw.post("/v1/track", track("key-nocolon"), headers={"Authorization": colon_less}))
    assert_ok(hw.post("/v1/track", {**track("key-body"), "writeKey": WRITE_KEY}, auth=False))
    assert_ok(hw.post(f"/v1/track?writeKey={WRITE_KEY}", track("key-query"), auth=False))
    bearer = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.oauth.token"}
    assert_ok(
        hw.post(
            "/v1/batch", {"writeKey": WRITE_KEY, "batch": [track("key-bearer")]}, headers=bearer
        )
    )
    ids = ["key-basic", "key-nocolon", "key-body", "key-query", "key-bearer"]
    rows = stored(hw, *ids)
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    assert {r["source"] for r in rows} == {"default"}
    assert all("writeKey" not in (js(r["extra"]) or {}) for r in rows)
    # The Basic user name wins over the body; then the body over the query.
    other = {**track("key-other"), "writeKey": OTHER_KEY}
    assert_ok(hw.post(f"/v1/track?writeKey={WRITE_KEY}", other, auth=False))
    assert one(hw, "key-other")["source"] == "other"


def test_missing_unknown_and_disabled_keys(hw: RunningServer) -> None:
    unknown = "Basic " + base64.b64encode(b"NOPE:").decode()
    for headers, body in [
        ({"Authorization": unknown}, track("key-bad-1")),
        ({}, {**track("key-bad-2"), "writeKey": "NOPE"}),
        ({"Authorization": unknown}, {**track("key-bad-3"), "writeKey": WRITE_KEY}),
    ]:
        response = hw.post("/v1/track", body, headers=headers, auth=False)
        assert_refused(response, "writeKey", "unknown write key", status=401)
    missing = hw.post("/v1/track", track("key-bad-4"), auth=False)
    assert_refused(missing, "writeKey", "Basic", status=401)
    bearer_only = hw.post(
        "/v1/track", track("key-bad-5"), headers={"Authorization": "Bearer t"}, auth=False
    )
    assert_refused(bearer_only, "writeKey", status=401)
    disabled = hw.post("/v1/track", {**track("key-bad-6"), "writeKey": DISABLED_KEY}, auth=False)
    assert_refused(disabled, "writeKey", "disabled", status=404)
    assert hw.events("message_id LIKE 'key-bad-%'") == []


def test_batch_envelope_is_merged_into_messages(hw: RunningServer) -> None:
    body = {
        "sentAt": "2024-05-01T12:00:10.000Z",
        "context": {"library": {"name": "analytics-go"}, "locale": "en-US"},
        "integrations": {"All": False, "Mixpanel": True},
        "messageId": "envelope-id",  # analytics-go sends one; it names no message
        "batch": [
            track(
                "env-1",
                timestamp="2024-05-01T12:00:00.000Z",
                context={"locale": "fr-FR"},
                integrations={"Mixpanel": False, "Amplitude": {"session_id": 1}},
            ),
            track(
                "env-2",
                timestamp="2024-05-01T12:00:00.000Z",
                sentAt="2024-05-01T12:00:05.000Z",
            ),
        ],
    }
    assert_ok(hw.post("/v1/batch", body))
    first, second = stored(hw, "env-1", "env-2")
    contexts = [js(row["context"]) for row in (first, second)]
    for context in contexts:
        context.pop("ip", None)  # the peer address, when the server stamps it
    assert contexts[0] == {"library": {"name": "analytics-go"}, "locale": "fr-FR"}
    assert js(first["integrations"]) == {
        "All": False,
        "Mixpanel": False,
        "Amplitude": {"session_id": 1},
    }
    assert contexts[1] == {"library": {"name": "analytics-go"}, "locale": "en-US"}
    assert js(second["integrations"]) == {"All": False, "Mixpanel": True}
    # The envelope sentAt applies to messages without their own.
    assert first["sent_at"] == "2024-05-01T12:00:10.000Z"
    assert second["sent_at"] == "2024-05-01T12:00:05.000Z"
    for row, skew in ((first, 10), (second, 5)):
        expected = at(row["received_at"]) - timedelta(seconds=skew)
        assert at(row["timestamp"]) == expected
        assert row["original_timestamp"] == "2024-05-01T12:00:00.000Z"
    assert stored(hw, "envelope-id") == []


BAD_ITEMS = [
    ({"userId": "u", "event": "E"}, "batch[1].type", "type is required"),
    ({"type": "purchase", "userId": "u"}, "batch[1].type", "type must be one of"),
    ({"type": "track", "userId": "u"}, "batch[1].event", "event"),
    ({"type": "track", "userId": {"id": "u"}, "event": "E"}, "batch[1].userId", "string"),
    ({"type": "group", "userId": "u"}, "batch[1].groupId", "groupId"),
    ({"type": "alias", "userId": "u"}, "batch[1].previousId", "previousId"),
    ("not an object", "batch[1]", "object"),
    (None, "batch[1]", "object"),
    (
        {"type": "track", "userId": "u", "event": "E", "messageId": "m" * 101},
        "batch[1].messageId",
        "100",
    ),
    (
        {"type": "track", "userId": "u", "event": "E", "timestamp": "soon"},
        "batch[1].timestamp",
        "ISO-8601",
    ),
]


def test_one_bad_message_refuses_the_whole_batch(hw: RunningServer) -> None:
    for item, field, words in BAD_ITEMS:
        if isinstance(item, dict):
            item = {**item, "messageId": item.get("messageId", "policy-bad")}
        batch = {"batch": [track("policy-good-0"), item, track("policy-good-2")]}
        assert_refused(hw.post("/v1/batch", batch), field, words, label=item)
    assert hw.events("message_id LIKE 'policy-%'") == []


def test_batch_shape_errors(hw: RunningServer) -> None:
    for body in ({"batch": []}, {"batch": {"type": "track"}}, {"messages": [track("shape")]}):
        assert_refused(hw.post("/v1/batch", body), "batch", label=body)
    assert stored(hw, "shape") == []


NOT_AN_OBJECT = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"[]", "object"),
    (b"null", "object"),
    (b'{"userId": "u", "event": "E"', "invalid JSON"),
    (b'{"userId": "\xff\xfe", "event": "E"}', "invalid JSON"),
    (b'{"userId": "u"}{"userId": "v"}', "invalid JSON"),
]


def test_bodies_that_are_not_a_json_object(hw: RunningServer) -> None:
    for content, words in NOT_AN_OBJECT:
        for content_type in ("application/json", "text/plain", "application/x-www-form-urlencoded"):
            headers = {"Content-Type": content_type}
            response = hw.post("/v1/track", content=content, headers=headers)
            assert_refused(response, "body", words, label=(content, content_type))


def test_any_content_type_is_parsed_as_json(hw: RunningServer) -> None:
    for index, content_type in enumerate(
        ["application/json; charset=utf-8", "application/json;charset=UTF-8", "text/plain", ""]
    ):
        message_id = f"ctype-{index}"
        response = hw.post(
            "/v1/t",
            content=json.dumps(track(message_id)).encode(),
            headers={"Content-Type": content_type},
        )
        assert_ok(response)
    rows = by_id(hw, *(f"ctype-{index}" for index in range(4)))
    assert {r["type"] for r in rows.values()} == {"track"}
