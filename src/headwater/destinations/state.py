"""Delivery state beside the log: cursors, counters and dead letters.

A destination's cursor, its counters and the dead letters of a batch are
committed in one SQLite transaction, so after a crash they agree: the events
of an uncommitted batch are delivered again (at least once) and counted once.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headwater.log.processed import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS delivery_counters (
    destination TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (destination, name)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    event BLOB NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER NOT NULL,
    last_response TEXT NOT NULL,
    first_attempt_ms INTEGER NOT NULL,
    dead_ms INTEGER NOT NULL,
    replayed_ms INTEGER
);
CREATE TABLE IF NOT EXISTS delivery_minutes (
    destination TEXT NOT NULL,
    minute_ms INTEGER NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (destination, minute_ms, name)
);
CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (destination, dead_ms);
"""


@dataclass(slots=True)
class DeadLetter:
    destination: str
    message_id: str
    received_ms: int
    event: bytes
    reason: str
    attempts: int
    last_status: int
    last_response: str
    first_attempt_ms: int
    dead_ms: int
    id: int = 0
    replayed_ms: int | None = None


def consumer_name(destination: str) -> str:
    return f"destination:{destination}"


class DeliveryState:
    def __init__(self, data_dir: Path) -> None:
        self._con: sqlite3.Connection = connect(data_dir)
        self._con.executescript(SCHEMA)

    def committed(self, destination: str) -> int:
        row = self._con.execute(
            "SELECT offset FROM consumer_offsets WHERE consumer = ?",
            (consumer_name(destination),),
        ).fetchone()
        return int(row[0]) if row else 0

    def start_at(self, destination: str, offset: int) -> None:
        """Register a new destination's cursor (only if it has none)."""
        self._con.execute(
            "INSERT OR IGNORE INTO consumer_offsets (consumer, offset) VALUES (?, ?)",
            (consumer_name(destination), offset),
        )

    def commit(
        self, destination: str, offset: int | None, counters: dict[str, int], dead: list[DeadLetter]
    ) -> None:
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            if offset is not None:
                con.execute(
                    "INSERT INTO consumer_offsets (consumer, offset) VALUES (?, ?)"
                    " ON CONFLICT (consumer) DO UPDATE SET offset = excluded.offset",
                    (consumer_name(destination), offset),
                )
            self._count(destination, counters)
            con.executemany(
                "INSERT INTO dead_letters (destination, message_id, received_ms, event, reason,"
                " attempts, last_status, last_response, first_attempt_ms, dead_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        d.destination,
                        d.message_id,
                        d.received_ms,
                        d.event,
                        d.reason,
                        d.attempts,
                        d.last_status,
                        d.last_response,
                        d.first_attempt_ms,
                        d.dead_ms,
                    )
                    for d in dead
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def _count(self, destination: str, counters: dict[str, int]) -> None:
        """Add to the totals and to this minute's counts (inside a transaction)."""
        minute = time.time_ns() // 60_000_000_000 * 60_000
        rows = [(destination, name, value) for name, value in counters.items() if value]
        self._con.executemany(
            "INSERT INTO delivery_counters (destination, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (destination, name) DO UPDATE SET value = value + excluded.value",
            rows,
        )
        self._con.executemany(
            "INSERT INTO delivery_minutes (destination, minute_ms, name, value)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (destination, minute_ms, name)"
            " DO UPDATE SET value = value + excluded.value",
            [(dest, minute, name, value) for dest, name, value in rows],
        )

    def since(self, since_ms: int, until_ms: int) -> dict[str, dict[str, int]]:
        """Counter sums per destination over [since, until)."""
        result: dict[str, dict[str, int]] = {}
        for dest, name, value in self._con.execute(
            "SELECT destination, name, sum(value) FROM delivery_minutes"
            " WHERE minute_ms >= ? AND minute_ms < ? GROUP BY destination, name",
            (since_ms, until_ms),
        ):
            result.setdefault(dest, {})[name] = int(value)
        return result

    def counters(self, destination: str | None = None) -> dict[str, dict[str, int]]:
        sql = "SELECT destination, name, value FROM delivery_counters"
        args: tuple[Any, ...] = ()
        if destination is not None:
            sql += " WHERE destination = ?"
            args = (destination,)
        result: dict[str, dict[str, int]] = {}
        for dest, name, value in self._con.execute(sql, args):
            result.setdefault(dest, {})[name] = int(value)
        return result

    def dead_letters(
        self,
        destination: str | None = None,
        include_replayed: bool = False,
        limit: int = 100,
        ids: list[int] | None = None,
    ) -> list[DeadLetter]:
        clauses: list[str] = []
        args: list[Any] = []
        if destination is not None:
            clauses.append("destination = ?")
            args.append(destination)
        if not include_replayed:
            clauses.append("replayed_ms IS NULL")
        if ids:
            clauses.append(f"id IN ({', '.join('?' for _ in ids)})")
            args.extend(ids)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._con.execute(
            "SELECT destination, message_id, received_ms, event, reason, attempts, last_status,"
            " last_response, first_attempt_ms, dead_ms, id, replayed_ms FROM dead_letters"
            f"{where} ORDER BY id LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def mark_replayed(self, destination: str, ids: list[int], now_ms: int) -> None:
        """Replayed dead letters count as delivered from now on."""
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            marked = 0
            for ident in ids:
                cursor = con.execute(
                    "UPDATE dead_letters SET replayed_ms = ? WHERE id = ? AND destination = ?"
                    " AND replayed_ms IS NULL",
                    (now_ms, ident, destination),
                )
                marked += cursor.rowcount
            con.executemany(
                "INSERT INTO delivery_counters (destination, name, value) VALUES (?, ?, ?)"
                " ON CONFLICT (destination, name) DO UPDATE SET value = value + excluded.value",
                [
                    (destination, "dead_lettered", -marked),
                    (destination, "delivered", marked),
                    (destination, "replayed", marked),
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def min_cursor(self) -> int | None:
        row = self._con.execute(
            "SELECT min(offset) FROM consumer_offsets WHERE consumer LIKE 'destination:%'"
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def close(self) -> None:
        self._con.close()
