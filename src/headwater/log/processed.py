"""The processed topic: events after de-duplication, timing and enrichment.

The pipeline appends one record per batch it stores, keyed by the last raw-log
offset the batch covers, so replaying a batch after a crash appends nothing
twice.  Destinations read this topic, each with its own committed offset.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from headwater.log.base import ProcessedRecord, Record
from headwater.log.sqlite import log_path, open_database

_encode = msgspec.json.Encoder().encode

SCHEMA = """
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS processed (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    raw_offset INTEGER NOT NULL UNIQUE,
    received_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


def connect(data_dir: Path) -> sqlite3.Connection:
    return open_database(log_path(data_dir), SCHEMA)


class ProcessedLog:
    def __init__(self, data_dir: Path, min_cursor: Callable[[], int | None] | None = None) -> None:
        self._con = connect(data_dir)
        # Where the destination cursors are kept elsewhere (PostgreSQL), their minimum.
        self._min_cursor = min_cursor

    def append(self, batches: Sequence[tuple[Record, list[dict[str, Any]]]]) -> None:
        """Append each raw record's events as one record, in one transaction.

        Keyed by the raw offset: replaying a batch after a crash appends
        nothing twice.
        """
        rows = [
            (record.offset, record.received_ms, len(items), _encode(items))
            for record, items in batches
            if items
        ]
        if not rows:
            return
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany(
                "INSERT OR IGNORE INTO processed (raw_offset, received_ms, count, payload)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def read(self, after: int, max_events: int) -> list[ProcessedRecord]:
        cursor = self._con.execute(
            "SELECT offset, received_ms, count, payload FROM processed"
            " WHERE offset > ? ORDER BY offset LIMIT 1000",
            (after,),
        )
        records: list[ProcessedRecord] = []
        events = 0
        for row in cursor:
            records.append(ProcessedRecord(*row))
            events += row[2]
            if events >= max_events:
                break
        cursor.close()
        return records

    def end_offset(self) -> int:
        row = self._con.execute("SELECT max(offset) FROM processed").fetchone()
        return int(row[0] or 0)

    def pending_events(self, after: int) -> int:
        row = self._con.execute(
            "SELECT coalesce(sum(count), 0) FROM processed WHERE offset > ?", (after,)
        ).fetchone()
        return int(row[0])

    def prune(self, older_than_ms: int) -> int:
        """Drop records older than the given time that every destination has passed."""
        if self._min_cursor is not None:
            lowest = self._min_cursor()
        else:
            row = self._con.execute(
                "SELECT min(offset) FROM consumer_offsets WHERE consumer LIKE 'destination:%'"
            ).fetchone()
            lowest = None if row[0] is None else int(row[0])
        through = self.end_offset() if lowest is None else lowest
        cursor = self._con.execute(
            "DELETE FROM processed WHERE offset <= ? AND received_ms < ?",
            (through, older_than_ms),
        )
        return cursor.rowcount

    def close(self) -> None:
        self._con.close()


class SQLiteProcessedConsumer:
    """A destination's cursor on the processed table.

    The durable cursor lives in the delivery state, committed in the same
    SQLite transaction as the batch's counters and dead letters.
    """

    def __init__(self, data_dir: Path, start_after: int) -> None:
        self.log = ProcessedLog(data_dir)
        self.cursor = start_after

    def read(self, max_events: int) -> list[ProcessedRecord]:
        return self.log.read(self.cursor, max_events)

    def pending(self) -> int:
        return self.log.pending_events(self.cursor)

    def advance(self, records: list[ProcessedRecord]) -> None:
        if records:
            self.cursor = records[-1].offset

    def close(self) -> None:
        self.log.close()
