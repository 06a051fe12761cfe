"""``headwater serve`` with the event store in PostgreSQL (the log still SQLite).

Events sent over HTTP are stored once, ``headwater query`` answers from the
shared store with the server running or not, the console's report and
insights run on it, refused requests land in the shared rejection log, and
after ``kill -9`` and a restart every acknowledged event is stored exactly
once.  Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from conftest import RunningServer
from test_durability import Load, resend

pytest_plugins = ["pg"]

MakeServer = Callable[..., RunningServer]
BIG = 123456789012345678901234567890


@pytest.fixture
def pg_env(warehouse_dsn: str) -> dict[str, str]:
    return {
        "HEADWATER_STORE_BACKEND": "postgres",
        "HEADWATER_STORE_DSN": warehouse_dsn,
        "HEADWATER_STORE_SCHEMA": "hw_" + uuid.uuid4().hex[:8],
    }


def cli(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env}
    environ.pop("HEADWATER_DATA_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "headwater.cli", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


def pg_rows(env: dict[str, str], sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(env["HEADWATER_STORE_DSN"]) as conn:
        conn.execute(f"SET search_path TO {env['HEADWATER_STORE_SCHEMA']}")
        return conn.execute(sql.encode()).fetchall()


def console_get(server: RunningServer, path: str) -> Any:
    info = json.loads((server.data_dir / "run" / "admin.json").read_text())
    response = httpx.get(
        f"http://127.0.0.1:{info['port']}{path}",
        headers={"Authorization": f"Bearer {info['token']}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_serve_stores_each_event_once_in_postgres_and_answers_queries(
    make_server: MakeServer, pg_env: dict[str, str]
) -> None:
    server = make_server(env=pg_env)
    batch = [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": f"user-{i % 7}",
            "messageId": f"m{i}",
            "properties": {"big": BIG, "name": "Zoë 😀 注文", "i": i},
        }
        for i in range(50)
    ]
    for _ in range(2):  # an SDK retrying the whole batch
        assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    single = {"userId": "solo", "event": "Signed Up", "messageId": "solo-1"}
    assert server.post("/v1/track", single).status_code == 200
    refused = server.post("/v1/track", content=b"{not json")
    assert refused.status_code == 400
    server.settle(30)

    rows = pg_rows(
        pg_env,
        "SELECT count(*), count(DISTINCT (source, message_id)),"
        " min(properties::text) FILTER (WHERE message_id = 'm3') FROM events",
    )
    assert rows[0][:2] == (51, 51)
    stored = json.loads(rows[0][2])
    assert stored == {"big": BIG, "name": "Zoë 😀 注文", "i": 3}
    counters = server.admin.status()["counters"]
    assert (counters["received"], counters["stored"], counters["duplicates"]) == (101, 51, 50)

    query = "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event"
    answer = cli(server.data_dir, pg_env, "query", query, "--json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == [
        {"event": "Order Completed", "n": 50},
        {"event": "Signed Up", "n": 1},
    ]
    # The console's own SQL runs on the shared store.
    report = console_get(server, "/api/report")
    assert {m["id"]: m["value"] for m in report["metrics"]}["volume"] == 51
    counts = console_get(server, "/api/insights/counts?bucket=day&breakdown=properties.name")
    per_value: dict[str | None, int] = {}
    for point in counts["series"]:  # one day, or two just after midnight
        per_value[point["value"]] = per_value.get(point["value"], 0) + point["events"]
    assert per_value == {None: 1, "Zoë 😀 注文": 50}
    # The refused request is in the shared rejection log.
    deadline = time.monotonic() + 10
    while not pg_rows(pg_env, "SELECT code FROM rejections") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_rows(pg_env, "SELECT code FROM rejections") == [(refused.json()["code"],)]
    assert pg_rows(pg_env, "SELECT max(version) FROM schema_migrations") == [(4,)]

    assert server.stop() == 0
    # With no server running, the CLI reads the shared store itself.
    offline = cli(server.data_dir, pg_env, "query", "SELECT count(*) AS n FROM events", "--json")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == [{"n": 51}]


def test_kill9_and_restart_store_every_acknowledged_event_once(
    make_server: MakeServer, pg_env: dict[str, str]
) -> None:
    server = make_server(env=pg_env)
    load = Load(server.url, "pg", threads=2, batch=10, per_thread=400, seconds=6).start()
    deadline = time.monotonic() + 10
    while load.requests() < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load.running(), f"load ended before the kill: {load.statuses}"
    server.kill9()
    load.stop()
    assert load.acked, "nothing was acknowledged before the kill"
    assert not load.unexpected(), load.statuses

    again = make_server(data_dir=server.data_dir, env=pg_env)
    resend(again.url, load.unacked)
    sent = load.acked | {m for request in load.unacked for m in request.ids}
    again.settle(60)
    rows = pg_rows(pg_env, "SELECT message_id FROM events")
    stored = [m for (m,) in rows]
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert load.acked <= set(stored), f"{len(load.acked - set(stored))} acknowledged events lost"
    assert set(stored) == sent
    counters = again.admin.status()["counters"]
    assert counters["stored"] == len(stored)
    assert counters["received"] == counters["stored"] + counters.get("duplicates", 0)
