"""Hostile and malformed input: every refusal is a 4xx naming the field, nothing poisons."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from conftest import RunningServer
from headwater import config
from headwater.log.base import Entry
from headwater.log.processed import ProcessedLog
from headwater.log.rejections import RejectionLog
from headwater.log.sqlite import SQLiteLogWriter, SQLiteRawConsumer, log_path
from headwater.pipeline.runner import CONSUMER, Pipeline
from headwater.store.duckdb import DuckDBStore, store_path


@pytest.fixture(scope="module")
def hw(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    server = RunningServer(tmp_path_factory.mktemp("hostile"))
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and body["field"] == field, body


def test_ids_of_every_kind_are_strings(hw: RunningServer) -> None:
    ok = hw.post("/v1/track", {"userId": "u", "event": "E", "groupId": 5, "messageId": "h-1"})
    assert ok.status_code == 200
    refused(
        hw.post(
            "/v1/batch", {"batch": [{"type": "identify", "userId": "u", "previousId": {"x": 1}}]}
        ),
        "batch[0].previousId",
    )
    refused(
        hw.post("/v1/batch", {"batch": [{"type": ["track"], "userId": "u", "event": "E"}]}),
        "batch[0].type",
    )
    refused(hw.post("/v1/page", {"userId": "u", "event": 7}), "event")
    [row] = hw.events("message_id = 'h-1'")
    assert row["group_id"] == "5"


def test_envelope_context_counts_toward_the_message_limit(hw: RunningServer) -> None:
    batch = {
        "batch": [{"type": "track", "anonymousId": "a", "event": "Amp"}] * 50,
        "context": {"blob": "y" * 40_000},
    }
    refused(hw.post("/v1/batch", batch), "batch[0]")
    small = {
        "batch": [{"type": "track", "anonymousId": "a", "event": "Amp", "messageId": "h-env"}],
        "context": {"app": {"name": "x"}},
    }
    assert hw.post("/v1/batch", small).status_code == 200
    [row] = hw.events("message_id = 'h-env'")
    assert json.loads(row["context"])["app"] == {"name": "x"}


def test_declared_oversize_is_refused_before_reading(hw: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", hw.port)) as sock:
        sock.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Basic V1JJVEVfS0VZOg==\r\nContent-Length: 9000000\r\n\r\n"
        )
        sock.settimeout(5)
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"payload_too_large" in answer


def test_lone_surrogates_become_replacement_characters(hw: RunningServer) -> None:
    body = (
        b'{"userId":"u","event":"E","messageId":"h-sur","properties":{"p":"ab\\ud800","\\udc00":1}}'
    )
    assert hw.post("/v1/track", content=body).status_code == 200
    [row] = hw.events("message_id = 'h-sur'")
    assert json.loads(row["properties"]) == {"p": "ab\ufffd", "\ufffd": 1}


def test_blank_and_numeric_message_ids(hw: RunningServer) -> None:
    for user in ("alice", "bob"):
        body = {"userId": user, "event": "BlankMid", "messageId": "  "}
        assert hw.post("/v1/track", body).status_code == 200
    rows = hw.events("event = 'BlankMid'")
    assert sorted(r["user_id"] for r in rows) == ["alice", "bob"]
    assert len({r["message_id"] for r in rows}) == 2
    long_id = int("1" * 300)
    refused(
        hw.post(
            "/v1/track",
            content=json.dumps({"userId": "u", "event": "E", "messageId": long_id}).encode(),
        ),
        "messageId",
    )


def test_content_encodings(hw: RunningServer) -> None:
    body = gzip.compress(b'{"userId":"u","event":"E"}')
    twice = httpx.post(
        f"{hw.url}/v1/track",
        content=body,
        timeout=10,
        headers=[
            ("Authorization", "Basic V1JJVEVfS0VZOg=="),
            ("Content-Encoding", "gzip"),
            ("Content-Encoding", "gzip"),
        ],
    )
    refused(twice, "Content-Encoding")
    refused(
        hw.post("/v1/track", content=body, headers={"Content-Encoding": "br"}), "Content-Encoding"
    )


def test_settings_route_is_exact(hw: RunningServer) -> None:
    good = httpx.get(f"{hw.url}/v1/projects/WRITE_KEY/settings", timeout=10)
    assert good.status_code == 200 and good.headers["cache-control"] == "no-store"
    assert httpx.get(f"{hw.url}/v1/projects/x/y/WRITE_KEY/settings").status_code == 404


def test_ad_hoc_queries_change_nothing(hw: RunningServer) -> None:
    assert hw.post("/v1/track", {"userId": "u", "event": "Keep", "messageId": "h-q"}).status_code
    hw.settle()
    assert hw.admin.query("DROP TABLE events; SELECT 1").rows == [(1,)]
    hw.admin.query("DROP TABLE events")
    hw.admin.query("DELETE FROM events")
    assert hw.events("message_id = 'h-q'")


def test_console_refuses_odd_input_with_400s(hw: RunningServer) -> None:
    info = json.loads((hw.data_dir / "run" / "admin.json").read_text())
    url = f"http://127.0.0.1:{info['port']}"
    auth = {"Authorization": f"Bearer {info['token']}"}
    assert (
        httpx.get(f"{url}/api/status", headers={"Authorization": "Bearer é".encode()}).status_code
        == 401
    )
    assert httpx.post(f"{url}/api/login", json={"token": "é"}).status_code == 401
    for path, params in [
        ("/api/tail", {"after": "x"}),
        ("/api/insights/counts", {"days": "100000000000"}),
        ("/api/insights/funnel", {"steps": "a,b", "within_seconds": "99999999999999999999"}),
        ("/api/live", {"after": "x"}),
    ]:
        response = httpx.get(f"{url}{path}", params=params, headers=auth, timeout=10)
        assert response.status_code == 400, (path, response.text)
    assert httpx.put(f"{url}/api/status", headers=auth).status_code == 405


def test_a_record_the_store_refuses_is_set_aside(tmp_path: Path) -> None:
    """A record that keeps failing goes to the rejection log; the events behind it flow."""
    settings = config.Settings()
    writer = SQLiteLogWriter(log_path(tmp_path))
    poison = [
        {
            "type": "track",
            "userId": "u",
            "event": "E",
            "messageId": {"x": 1},
            "receivedAt": "2026-01-01T00:00:00.000Z",
        }
    ]
    good = [
        {
            "type": "track",
            "userId": "u",
            "event": "E",
            "messageId": "after",
            "receivedAt": "2026-01-01T00:00:00.000Z",
        }
    ]
    now = time.time_ns() // 1_000_000
    for messages in (poison, good):
        writer.append([Entry("default", now, 1, msgspec.json.encode(messages))])
    writer.close()
    store = DuckDBStore(store_path(tmp_path))
    rejections = RejectionLog(tmp_path)
    kept: list[str] = []

    def quarantine(record: object, error: str) -> None:
        kept.append(error)

    pipeline = Pipeline(
        settings,
        SQLiteRawConsumer(log_path(tmp_path), 0),
        store,
        ProcessedLog(tmp_path),
        quarantine=quarantine,
    )  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pipeline.lag()["lag_records"]:
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert pipeline.lag()["lag_records"] == 0
    assert (len(kept) == 1 and "Arrow" in kept[0]) or "Type" in kept[0]
    assert [r[0] for r in store.query("SELECT message_id FROM events").rows] == ["after"]
    assert store.counters().get("quarantined") == 1
    assert store.committed(CONSUMER) == 2
    rejections.close()
    store.close()
