"""The client side of the admin API, and helpers shared with the console.

``headwater serve`` owns the DuckDB file, which allows one writer process, so
the other commands ask the running server through the console's admin API
(``headwater.console.server``).  Its address and token are in
``run/admin.json`` in the data directory, which only its owner can read.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from headwater import config
from headwater.destinations.delivery import DeliveryWorker
from headwater.store.base import EventStore, QueryResult


def admin_file(data_dir: Path) -> Path:
    return data_dir / "run" / "admin.json"


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return (
            f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
        )
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def delivery_status(
    settings: config.Settings, data_dir: Path, workers: list[DeliveryWorker] | None
) -> dict[str, Any]:
    from headwater import backends  # not at import: the CLI starts without DuckDB

    state = backends.delivery_state(settings, data_dir)
    try:
        counters = state.counters()
    finally:
        state.close()
    result: dict[str, Any] = {}
    for name, values in counters.items():
        result[name] = {"counters": values}
    for worker in workers or []:
        entry = result.setdefault(worker.name, {"counters": {}})
        entry["pending"] = worker.pending()
        entry["last_error"] = worker.last_error
    return result


def status_of(store: EventStore, pipeline_lag: dict[str, int] | None) -> dict[str, Any]:
    per_source = store.query(
        "SELECT source, count(*) AS events, max(received_at) AS last_received"
        " FROM events GROUP BY source ORDER BY source"
    )
    return {
        "sources": [
            {"source": s, "events": int(n), "last_received": to_jsonable(t)}
            for s, n, t in per_source.rows
        ],
        "counters": store.counters(),
        "log": pipeline_lag,
    }


class AdminClient:
    """Talks to a running server; ``connect`` returns None when none runs."""

    def __init__(self, port: int, token: str) -> None:
        self._client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        )

    @classmethod
    def connect(cls, data_dir: Path) -> AdminClient | None:
        try:
            info = json.loads(admin_file(data_dir).read_text())
        except (OSError, ValueError):
            return None
        client = cls(int(info["port"]), str(info["token"]))
        try:
            client._client.get("/status", timeout=5.0)
        except httpx.HTTPError:
            return None
        return client

    def query(self, sql: str) -> QueryResult:
        response = self._client.post("/query", content=sql.encode())
        payload = response.json()
        if response.status_code != 200:
            raise RuntimeError(payload.get("error", response.text))
        return QueryResult(payload["columns"], [tuple(r) for r in payload["rows"]])

    def status(self) -> dict[str, Any]:
        response = self._client.get("/status")
        result: dict[str, Any] = response.json()
        if response.status_code != 200:
            raise RuntimeError(result.get("error", response.text))
        return result

    def tail(self, after: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self._client.get("/tail", params={"after": after}).json()[
            "events"
        ]
        return events

    def report(self) -> dict[str, Any]:
        response = self._client.get("/api/report")
        payload: dict[str, Any] = response.json()
        if response.status_code != 200:
            raise RuntimeError(payload.get("error", response.text))
        return payload
