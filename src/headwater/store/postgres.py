"""The shared event store on PostgreSQL, for pipelines on several machines.

``events`` has the columns of ``EVENT_COLUMNS`` (JSON as ``json``, which keeps
the exact text: large integers and unicode come back as sent; times as
``timestamptz``, read in UTC) and one row per (source, messageId), enforced
by a unique constraint.  A write copies the batch into a temporary table and
inserts it with ``ON CONFLICT DO NOTHING`` in the transaction that also moves
the consumer's offset and the counters, so a batch replayed after a crash, or
written by two pipelines at once, is stored once.  The counters follow what
was inserted: rows another pipeline stored first count as duplicates.

``known`` answers from the table itself, so de-duplication is exact across
pipelines and not limited to a time window.  ``query`` takes the console's
SQL with DuckDB's ``?`` parameters; ``pgschema`` defines the few DuckDB
functions that SQL uses (``make_timestamptz``, ``epoch_ms``, ``to_seconds``,
``date_diff``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg

from headwater.pipeline.dedup import DedupWindow
from headwater.store import pgschema
from headwater.store.base import EVENT_COLUMNS, QueryResult

_NAMES = [name for name, _ in EVENT_COLUMNS]
_STAGING_TYPES = {
    "VARCHAR": "text",
    "JSON": "text",
    "TIMESTAMPTZ": "bigint",  # milliseconds, as the pipeline hands them over
    "BOOLEAN": "boolean",
    "BIGINT": "bigint",
    "VARCHAR[]": "text[]",
}
_STAGING = "headwater_incoming"
_CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
    + ", ".join(f'"{name}" {_STAGING_TYPES[kind]}' for name, kind in EVENT_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_COLUMN_LIST = ", ".join(f'"{name}"' for name in _NAMES)


def _converted(name: str, kind: str) -> str:
    if kind == "TIMESTAMPTZ":
        return f'make_timestamptz("{name}" * 1000)'
    if kind == "JSON":
        return f'"{name}"::json'
    return f'"{name}"'


_COPY = f"COPY {_STAGING} ({_COLUMN_LIST}) FROM STDIN"
# Sorted, so pipelines inserting overlapping batches take key locks in one order.
_INSERT = (
    f"INSERT INTO events ({_COLUMN_LIST}) SELECT "
    + ", ".join(_converted(name, kind) for name, kind in EVENT_COLUMNS)
    + f" FROM {_STAGING} ORDER BY source, message_id"
    " ON CONFLICT (source, message_id) DO NOTHING"
)
_IDLE_READERS = 4
T = TypeVar("T")


class PostgresStore:
    exact_known = True

    def __init__(self, dsn: str, schema: str = "headwater") -> None:
        pgschema.ensure(dsn, schema)
        self.dsn = dsn
        self.schema = schema
        self._writer = pgschema.Session(dsn, schema)
        self._staged: psycopg.Connection[tuple[Any, ...]] | None = None
        self._readers: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    # -- connections -------------------------------------------------------------
    def _reader(self) -> tuple[psycopg.Connection[tuple[Any, ...]], bool]:
        """A reading session, and whether it was idle in the pool."""
        with self._readers_lock:
            while self._readers:
                conn = self._readers.pop()
                if not conn.closed and not conn.broken:
                    return conn, True
        return pgschema.connect(self.dsn, self.schema), False

    def _read(self, action: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        for attempt in range(2):
            conn, pooled = self._reader()
            try:
                return action(conn)
            except psycopg.OperationalError:
                # An idle session the server has closed since (a restart, say): once
                # more on a new one.  Anything else is the caller's to see.
                if attempt or not pooled or not conn.broken:
                    raise
            finally:
                self._release(conn)
        raise AssertionError("unreachable")

    def _release(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        healthy = not conn.closed and not conn.broken
        if healthy and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            with self._readers_lock:
                if not self._closed and len(self._readers) < _IDLE_READERS:
                    self._readers.append(conn)
                    return
        conn.close()

    # -- EventStore ----------------------------------------------------------------
    def committed(self, consumer: str) -> int:
        rows = self.query("SELECT log_offset FROM store_offsets WHERE consumer = ?", [consumer])
        return int(rows.rows[0][0]) if rows.rows else 0

    def write(
        self, columns: dict[str, list[Any]], consumer: str, offset: int, counters: dict[str, int]
    ) -> None:
        rows = list(zip(*(columns[name] for name in _NAMES), strict=True))
        with self._writer.lock:
            pgschema.retrying(lambda: self._write(rows, consumer, offset, counters))

    def _write(
        self, rows: list[tuple[Any, ...]], consumer: str, offset: int, counters: dict[str, int]
    ) -> None:
        conn = self._writer.conn()
        if conn is not self._staged:  # a new session: it needs its own temporary table
            conn.execute(_CREATE_STAGING)
            self._staged = conn
        counts = dict(counters)
        with conn.transaction(), conn.cursor() as cur:
            if rows:
                with cur.copy(_COPY) as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute(_INSERT)
                skipped = len(rows) - max(cur.rowcount, 0)
                if skipped and "stored" in counts:
                    # Another pipeline, or this one before a crash, stored these first.
                    counts["stored"] -= skipped
                    counts["duplicates"] = counts.get("duplicates", 0) + skipped
            cur.execute(
                "INSERT INTO store_offsets (consumer, log_offset) VALUES (%s, %s)"
                " ON CONFLICT (consumer) DO UPDATE SET log_offset = excluded.log_offset",
                [consumer, offset],
            )
            names = sorted(name for name, value in counts.items() if value)
            if names:
                values = [counts[name] for name in names]
                minute = time.time_ns() // 60_000_000_000 * 60_000_000
                cur.execute(
                    "INSERT INTO counters (name, value)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[])"
                    " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                    [names, values],
                )
                cur.execute(
                    "INSERT INTO counter_minutes (minute, name, value)"
                    " SELECT make_timestamptz(%s), n, v FROM unnest(%s::text[], %s::bigint[])"
                    " AS u(n, v) ON CONFLICT (minute, name)"
                    " DO UPDATE SET value = counter_minutes.value + excluded.value",
                    [minute, names, values],
                )

    def known(self, keys: list[tuple[str, str]]) -> set[str]:
        if not keys:
            return set()
        sources = [source for source, _ in keys]
        ids = [message_id for _, message_id in keys]
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT e.source, e.message_id FROM events e"
                " JOIN (SELECT DISTINCT * FROM unnest(%s::text[], %s::text[])) AS k(s, m)"
                " ON e.source = k.s AND e.message_id = k.m",
                [sources, ids],
            ).fetchall()
        )
        return {DedupWindow.key(source, message_id) for source, message_id in rows}

    def recent_keys(self, since_ms: int) -> Iterator[tuple[str, str, int]]:
        conn, _ = self._reader()
        try:
            with conn.transaction(), conn.cursor(name="headwater_recent_keys") as cur:
                cur.itersize = 50_000
                cur.execute(
                    "SELECT source, message_id, epoch_ms(received_at) FROM events"
                    " WHERE received_at >= make_timestamptz(%s * 1000) ORDER BY received_at",
                    [since_ms],
                )
                for source, message_id, received in cur:
                    yield source, message_id, int(received)
        finally:
            self._release(conn)

    def query(
        self, sql: str, params: list[Any] | None = None, read_only: bool = False
    ) -> QueryResult:
        """Run SQL; ``read_only`` runs it in a read-only transaction rolled back after."""
        text = (pgschema.placeholders(sql) if params else sql).encode()

        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> QueryResult:
            with conn.cursor() as cur:
                if read_only:
                    cur.execute(b"BEGIN READ ONLY")
                try:
                    cur.execute(text, params or None)
                    description = cur.description or []
                    rows = cur.fetchall() if description else []
                finally:
                    if read_only:
                        conn.rollback()
            return QueryResult([d.name for d in description], rows)

        return self._read(run)

    def counters(self) -> dict[str, int]:
        return {
            str(name): int(value)
            for name, value in self.query("SELECT name, value FROM counters").rows
        }

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._writer.close()
