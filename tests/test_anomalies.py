"""Anomaly detection on per-event volume and rejections, and the alert webhook."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from headwater.console.alerts import AlertLoop
from headwater.metrics import report
from headwater.store.duckdb import DuckDBStore
from receiver import Receiver
from test_insights import build

HOUR = 3_600_000


def history_store(path: Path, now: int, last_hour: int) -> DuckDBStore:
    rng = random.Random(3)
    rows: list[tuple[str, str, int, str | None]] = []
    for hours_ago in range(2, 168):
        for _ in range(rng.randrange(15, 25)):
            rows.append(
                (
                    f"u{rng.randrange(100)}",
                    "Viewed",
                    now - hours_ago * HOUR + rng.randrange(HOUR),
                    None,
                )
            )
    for _ in range(last_hour):
        rows.append(("u1", "Viewed", now - rng.randrange(1, HOUR), None))
    for hours_ago in range(2, 168, 3):
        rows.append(("u2", "Rare", now - hours_ago * HOUR, None))
    store = DuckDBStore(path)
    store.write(build(rows), "store", 1, {})
    return store


def inputs(store: DuckDBStore, rejections: dict[int, int] | None = None) -> report.Inputs:
    now = time.time_ns() // 1_000_000

    def rejected(since: int, until: int) -> dict[str, int]:
        hours_ago = (now - until) // HOUR
        return {"invalid_json": (rejections or {}).get(hours_ago, 2)}

    return report.Inputs(
        query=lambda sql, params: store.query(sql, params).rows,
        delivery=lambda since, until: {},
        rejections=rejected,
        destinations=[],
        log_lag_events=0,
        dead_letters=0,
    )


def test_volume_spike_and_drop(tmp_path: Path) -> None:
    now = time.time_ns() // 1_000_000
    spike = history_store(tmp_path / "spike.duckdb", now, last_hour=300)
    found = report.anomalies(inputs(spike), now, 4.0)
    assert [(a["kind"], a["subject"], a["direction"]) for a in found] == [
        ("event_volume", "Viewed", "spike")
    ]
    quiet = history_store(tmp_path / "quiet.duckdb", now, last_hour=0)
    found = report.anomalies(inputs(quiet), now, 4.0)
    assert [(a["subject"], a["direction"]) for a in found] == [("Viewed", "drop")]
    normal = history_store(tmp_path / "normal.duckdb", now, last_hour=20)
    assert report.anomalies(inputs(normal), now, 4.0) == []


def test_rejection_spike(tmp_path: Path) -> None:
    now = time.time_ns() // 1_000_000
    store = history_store(tmp_path / "r.duckdb", now, last_hour=20)
    found = report.anomalies(inputs(store, {0: 500}), now, 4.0)
    assert [(a["kind"], a["direction"]) for a in found] == [("rejections", "spike")]


def test_alert_webhook_posts_each_alert_once() -> None:
    hook = Receiver()
    try:
        alert: dict[str, Any] = {
            "kind": "event_volume",
            "subject": "Viewed",
            "direction": "spike",
            "z": 9.0,
        }
        loop = AlertLoop(lambda: [alert], hook.url, threading.Event())
        assert loop.check() == [alert]
        assert loop.check() == []
        assert hook.events() == [{"alerts": [alert]}]
    finally:
        hook.close()
