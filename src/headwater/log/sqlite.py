"""The embedded event log: one SQLite database in WAL mode.

Writers batch concurrent requests into one transaction (group commit, see
``headwater.gateway.committer``); ``synchronous=FULL`` makes each commit
durable before any request in it is answered.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from headwater.log.base import Entry, LogFull, Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    payload BLOB NOT NULL,
    user_agent TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
"""


def log_path(data_dir: Path) -> Path:
    return data_dir / "log.sqlite"


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to the log's database file (WAL, fsync on commit) with ``schema`` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    con.executescript(schema)
    return con


def _connect(path: Path) -> sqlite3.Connection:
    return open_database(path, SCHEMA)


class SQLiteLogWriter:
    """One gateway worker's appender.

    Several workers share the file, and a commit holds the write lock for a
    fraction of a millisecond; SQLite's own busy handler sleeps 1 to 100 ms
    between tries, so this writer polls for the lock itself, every 0.2 ms.
    """

    LOCK_POLL_S = 0.0002
    LOCK_WAIT_S = 30.0

    def __init__(self, path: Path) -> None:
        self._con = _connect(path)
        self._con.execute("PRAGMA busy_timeout=0")

    def _begin(self) -> None:
        deadline = time.monotonic() + self.LOCK_WAIT_S
        while True:
            try:
                self._con.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(self.LOCK_POLL_S)

    def append(self, entries: Sequence[Entry]) -> None:
        rows = [(e.source, e.received_ms, e.count, e.payload, e.user_agent) for e in entries]
        try:
            self._begin()
            try:
                self._con.executemany(
                    "INSERT INTO log (source, received_ms, count, payload, user_agent)"
                    " VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                self._con.execute("COMMIT")
            except BaseException:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LogFull(str(exc)) from exc

    def probe(self) -> None:
        # A committed one-page write: it fails as an append would while the disk is full.
        try:
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS writer_probe (id INTEGER PRIMARY KEY, at_ms INTEGER)"
            )
            self._con.execute("INSERT OR REPLACE INTO writer_probe VALUES (1, ?)", (now_ms(),))
        except sqlite3.Error as exc:
            raise LogFull(str(exc)) from exc

    def close(self) -> None:
        self._con.close()


class SQLiteLogReader:
    def __init__(self, path: Path) -> None:
        self._con = _connect(path)

    def read(self, after: int, max_records: int, max_events: int) -> list[Record]:
        cursor = self._con.execute(
            "SELECT offset, source, received_ms, count, payload, user_agent FROM log"
            " WHERE offset > ? ORDER BY offset LIMIT ?",
            (after, max_records),
        )
        records: list[Record] = []
        events = 0
        for row in cursor:
            records.append(Record(*row))
            events += row[3]
            if events >= max_events:
                break
        cursor.close()
        return records

    def end_offset(self) -> int:
        row = self._con.execute("SELECT max(offset) FROM log").fetchone()
        if row[0] is not None:
            return int(row[0])
        seq = self._con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'log'").fetchone()
        return int(seq[0]) if seq else 0

    def pending_events(self, after: int) -> int:
        row = self._con.execute(
            "SELECT coalesce(sum(count), 0) FROM log WHERE offset > ?", (after,)
        )
        return int(row.fetchone()[0])

    def committed(self, consumer: str) -> int:
        row = self._con.execute(
            "SELECT offset FROM consumer_offsets WHERE consumer = ?", (consumer,)
        ).fetchone()
        return int(row[0]) if row else 0

    def commit(self, consumer: str, offset: int) -> None:
        self._con.execute(
            "INSERT INTO consumer_offsets (consumer, offset) VALUES (?, ?)"
            " ON CONFLICT (consumer) DO UPDATE SET offset = excluded.offset",
            (consumer, offset),
        )

    def consumers(self) -> dict[str, int]:
        rows = self._con.execute("SELECT consumer, offset FROM consumer_offsets").fetchall()
        return {name: int(offset) for name, offset in rows}

    def prune(self, older_than_ms: int) -> int:
        offsets = self.consumers()
        if not offsets:
            return 0
        floor = min(offsets.values())
        cursor = self._con.execute(
            "DELETE FROM log WHERE offset <= ? AND received_ms < ?", (floor, older_than_ms)
        )
        return cursor.rowcount

    def close(self) -> None:
        self._con.close()


class SQLiteRawConsumer:
    """The pipeline's cursor on the SQLite log.

    The durable position is the store's (it commits its offset with the events
    it writes); this mirrors it into ``consumer_offsets`` for pruning and lag.
    """

    def __init__(self, path: Path, start_after: int, consumer: str = "store") -> None:
        self.reader = SQLiteLogReader(path)
        self.position = start_after
        self.consumer = consumer

    def poll(self, max_events: int) -> list[Record]:
        return self.reader.read(self.position, max_records=max_events, max_events=max_events)

    def commit(self, records: list[Record]) -> None:
        if records:
            self.position = records[-1].offset
            self.reader.commit(self.consumer, self.position)

    def lag(self) -> dict[str, int]:
        end = self.reader.end_offset()
        return {
            "log_end_offset": end,
            "store_offset": self.position,
            "lag_records": max(0, end - self.position),
            "lag_events": self.reader.pending_events(self.position),
        }

    def prune(self, older_than_ms: int) -> int:
        return self.reader.prune(older_than_ms)

    def close(self) -> None:
        self.reader.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
