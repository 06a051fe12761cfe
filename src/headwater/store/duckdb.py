"""The embedded event store: one DuckDB file, fed Arrow batches."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from headwater.store.base import EVENT_COLUMNS, QueryResult

_ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "TIMESTAMPTZ": pa.timestamp("ms", tz="UTC"),
    "BOOLEAN": pa.bool_(),
    "BIGINT": pa.int64(),
    "VARCHAR[]": pa.list_(pa.string()),
}
_SCHEMA = pa.schema([(name, _ARROW_TYPES[kind]) for name, kind in EVENT_COLUMNS])


def store_path(data_dir: Path) -> Path:
    return data_dir / "events.duckdb"


class DuckDBStore:
    exact_known = False

    def __init__(self, path: Path, read_only: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(path), read_only=read_only)
        self._con.execute("SET TimeZone = 'UTC'")
        self._lock = threading.Lock()
        if not read_only:
            columns = ", ".join(f'"{name}" {kind}' for name, kind in EVENT_COLUMNS)
            self._con.execute(f"CREATE TABLE IF NOT EXISTS events ({columns})")
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS store_offsets"
                " (consumer VARCHAR PRIMARY KEY, log_offset BIGINT NOT NULL)"
            )
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS counters (name VARCHAR PRIMARY KEY, value BIGINT)"
            )
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS counter_minutes (minute TIMESTAMPTZ, name VARCHAR,"
                " value BIGINT, PRIMARY KEY (minute, name))"
            )

    def committed(self, consumer: str) -> int:
        with self._lock:
            row = self._con.execute(
                "SELECT log_offset FROM store_offsets WHERE consumer = ?", [consumer]
            ).fetchone()
        return int(row[0]) if row else 0

    def write(
        self, columns: dict[str, list[Any]], consumer: str, offset: int, counters: dict[str, int]
    ) -> None:
        batch = pa.Table.from_pydict(columns, schema=_SCHEMA)
        with self._lock:
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                if batch.num_rows:
                    con.register("incoming", batch)
                    con.execute("INSERT INTO events SELECT * FROM incoming")
                    con.unregister("incoming")
                con.execute(
                    "INSERT INTO store_offsets VALUES (?, ?) ON CONFLICT (consumer)"
                    " DO UPDATE SET log_offset = excluded.log_offset",
                    [consumer, offset],
                )
                minute = time.time_ns() // 60_000_000_000 * 60_000_000
                rows = [(name, value) for name, value in counters.items() if value]
                if rows:
                    # One statement per table: each upsert costs milliseconds here.
                    values = ", ".join("(?, ?)" for _ in rows)
                    flat = [x for row in rows for x in row]
                    con.execute(
                        f"INSERT INTO counters VALUES {values} ON CONFLICT (name)"
                        " DO UPDATE SET value = counters.value + excluded.value",
                        flat,
                    )
                    minute_values = ", ".join("(make_timestamptz(?), ?, ?)" for _ in rows)
                    con.execute(
                        f"INSERT INTO counter_minutes VALUES {minute_values}"
                        " ON CONFLICT (minute, name)"
                        " DO UPDATE SET value = counter_minutes.value + excluded.value",
                        [x for name, value in rows for x in (minute, name, value)],
                    )
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # a failed COMMIT already ended it
                    con.execute("ROLLBACK")
                raise

    def known(self, keys: list[tuple[str, str]]) -> set[str]:
        # One pipeline writes this store, and its window is rebuilt from it.
        return set()

    def recent_keys(self, since_ms: int) -> Iterator[tuple[str, str, int]]:
        with self._lock:
            cursor = self._con.cursor()
        cursor.execute("SET TimeZone = 'UTC'")
        cursor.execute(
            "SELECT source, message_id, epoch_ms(received_at) FROM events"
            " WHERE received_at >= make_timestamptz(? * 1000) ORDER BY received_at",
            [since_ms],
        )
        while True:
            rows = cursor.fetchmany(50_000)
            if not rows:
                break
            for source, message_id, received in rows:
                yield source, message_id, int(received)
        cursor.close()

    def query(
        self, sql: str, params: list[Any] | None = None, read_only: bool = False
    ) -> QueryResult:
        """Run SQL (the last statement's rows); ``read_only`` rolls everything back after."""
        with self._lock:
            cursor = self._con.cursor()
        try:
            cursor.execute("SET TimeZone = 'UTC'")
            if read_only:
                cursor.execute("BEGIN TRANSACTION")
            cursor.execute(sql, params or [])
            description = cursor.description or []
            rows = cursor.fetchall() if description else []
            return QueryResult([d[0] for d in description], rows)
        finally:
            if read_only:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
            cursor.close()

    def counters(self) -> dict[str, int]:
        return {
            str(name): int(value)
            for name, value in self.query("SELECT name, value FROM counters").rows
        }

    def close(self) -> None:
        self._con.close()
