"""Requests the gateway refused: kept (bounded) for the debugger, counted per minute.

Refused input is never acknowledged, so clients know to fix it; keeping a
sample of it here means an operator can see exactly what was refused and why.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headwater.log.processed import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    field TEXT NOT NULL,
    message TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rejection_minutes (
    minute_ms INTEGER NOT NULL,
    code TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (minute_ms, code)
);
"""
KEEP = 10_000
MAX_BODY = 32 * 1024


@dataclass(slots=True)
class Rejected:
    received_ms: int
    source: str
    path: str
    status: int
    code: str
    field: str
    message: str
    body: bytes


class RejectionLog:
    def __init__(self, data_dir: Path) -> None:
        self._con: sqlite3.Connection = connect(data_dir)
        self._con.executescript(SCHEMA)

    def record(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany(
                "INSERT INTO rejections (received_ms, source, path, status, code, field,"
                " message, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.received_ms,
                        r.source,
                        r.path,
                        r.status,
                        r.code,
                        r.field,
                        r.message,
                        r.body[:MAX_BODY],
                    )
                    for r in rejected
                ],
            )
            con.executemany(
                "INSERT INTO rejection_minutes (minute_ms, code, value) VALUES (?, ?, 1)"
                " ON CONFLICT (minute_ms, code) DO UPDATE SET value = value + 1",
                [(r.received_ms // 60_000 * 60_000, r.code) for r in rejected],
            )
            con.execute(
                "DELETE FROM rejections WHERE id <= (SELECT max(id) FROM rejections) - ?", (KEEP,)
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def after(self, last_id: int, limit: int = 200) -> list[dict[str, Any]]:
        return self._rows("WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit))

    def _rows(self, clause: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        rows = self._con.execute(
            "SELECT id, received_ms, source, path, status, code, field, message, body"
            f" FROM rejections {clause}",
            args,
        ).fetchall()
        return [
            {
                "id": r[0],
                "received_ms": r[1],
                "source": r[2],
                "path": r[3],
                "status": r[4],
                "code": r[5],
                "field": r[6],
                "message": r[7],
                "body": bytes(r[8]).decode("utf-8", "replace"),
            }
            for r in rows
        ]

    def latest_id(self) -> int:
        row = self._con.execute("SELECT max(id) FROM rejections").fetchone()
        return int(row[0] or 0)

    def counts(self, since_ms: int, until_ms: int) -> dict[str, int]:
        return {
            str(code): int(value)
            for code, value in self._con.execute(
                "SELECT code, sum(value) FROM rejection_minutes WHERE minute_ms >= ?"
                " AND minute_ms < ? GROUP BY code",
                (since_ms, until_ms),
            )
        }

    def samples(self, code: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest refused requests with this code."""
        return self._rows("WHERE code = ? ORDER BY id DESC LIMIT ?", (code, limit))

    def close(self) -> None:
        self._con.close()
