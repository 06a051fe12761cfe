"""Delivery state and the rejection log in PostgreSQL, shared by every node.

Same behaviour as the SQLite versions (``headwater.destinations.state`` and
``headwater.log.rejections``), in the store's schema (``pgschema``).  A
destination's cursor, counters and dead letters still move in one
transaction.  Counter rows are upserted in name order, so nodes counting for
the same destination at once never deadlock; should PostgreSQL still pick a
victim, the transaction is run again.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from headwater.destinations.state import DeadLetter, consumer_name
from headwater.log import rejections as embedded
from headwater.log.rejections import Rejected
from headwater.store import pgschema

_DEAD_COLUMNS = (
    "destination, message_id, received_ms, event, reason, attempts, last_status,"
    " last_response, first_attempt_ms, dead_ms, id, replayed_ms"
)


class PostgresDeliveryState:
    def __init__(self, dsn: str, schema: str = "headwater") -> None:
        self._db = pgschema.Session(dsn, schema)

    def committed(self, destination: str) -> int:
        with self._db.lock:
            row = (
                self._db.conn()
                .execute(
                    "SELECT log_offset FROM delivery_offsets WHERE consumer = %s",
                    [consumer_name(destination)],
                )
                .fetchone()
            )
        return int(row[0]) if row else 0

    def start_at(self, destination: str, offset: int) -> None:
        """Register a new destination's cursor (only if it has none)."""
        with self._db.lock:
            self._db.conn().execute(
                "INSERT INTO delivery_offsets (consumer, log_offset) VALUES (%s, %s)"
                " ON CONFLICT (consumer) DO NOTHING",
                [consumer_name(destination), offset],
            )

    def commit(
        self, destination: str, offset: int | None, counters: dict[str, int], dead: list[DeadLetter]
    ) -> None:
        def attempt() -> None:
            conn = self._db.conn()
            with conn.transaction(), conn.cursor() as cur:
                if offset is not None:
                    cur.execute(
                        "INSERT INTO delivery_offsets (consumer, log_offset) VALUES (%s, %s)"
                        " ON CONFLICT (consumer) DO UPDATE SET log_offset = excluded.log_offset",
                        [consumer_name(destination), offset],
                    )
                names = sorted(name for name, value in counters.items() if value)
                if names:
                    values = [counters[name] for name in names]
                    minute = time.time_ns() // 60_000_000_000 * 60_000
                    cur.execute(
                        "INSERT INTO delivery_counters (destination, name, value)"
                        " SELECT %s, n, v FROM unnest(%s::text[], %s::bigint[]) AS u(n, v)"
                        " ON CONFLICT (destination, name)"
                        " DO UPDATE SET value = delivery_counters.value + excluded.value",
                        [destination, names, values],
                    )
                    cur.execute(
                        "INSERT INTO delivery_minutes (destination, minute_ms, name, value)"
                        " SELECT %s, %s, n, v FROM unnest(%s::text[], %s::bigint[]) AS u(n, v)"
                        " ON CONFLICT (destination, minute_ms, name)"
                        " DO UPDATE SET value = delivery_minutes.value + excluded.value",
                        [destination, minute, names, values],
                    )
                if dead:
                    cur.executemany(
                        "INSERT INTO dead_letters (destination, message_id, received_ms, event,"
                        " reason, attempts, last_status, last_response, first_attempt_ms,"
                        " dead_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [
                            (
                                d.destination,
                                d.message_id,
                                d.received_ms,
                                bytes(d.event),
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

        with self._db.lock:
            pgschema.retrying(attempt)

    def since(self, since_ms: int, until_ms: int) -> dict[str, dict[str, int]]:
        """Counter sums per destination over [since, until)."""
        with self._db.lock:
            rows = (
                self._db.conn()
                .execute(
                    "SELECT destination, name, sum(value) FROM delivery_minutes"
                    " WHERE minute_ms >= %s AND minute_ms < %s GROUP BY destination, name",
                    [since_ms, until_ms],
                )
                .fetchall()
            )
        result: dict[str, dict[str, int]] = {}
        for dest, name, value in rows:
            result.setdefault(dest, {})[name] = int(value)
        return result

    def counters(self, destination: str | None = None) -> dict[str, dict[str, int]]:
        query = "SELECT destination, name, value FROM delivery_counters"
        args: list[Any] = []
        if destination is not None:
            query += " WHERE destination = %s"
            args.append(destination)
        with self._db.lock:
            rows = self._db.conn().execute(query.encode(), args).fetchall()
        result: dict[str, dict[str, int]] = {}
        for dest, name, value in rows:
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
            clauses.append("destination = %s")
            args.append(destination)
        if not include_replayed:
            clauses.append("replayed_ms IS NULL")
        if ids:
            clauses.append("id = ANY(%s::bigint[])")
            args.append(list(ids))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT {_DEAD_COLUMNS} FROM dead_letters{where} ORDER BY id LIMIT %s"
        with self._db.lock:
            rows = self._db.conn().execute(query.encode(), [*args, limit]).fetchall()
        return [DeadLetter(*row) for row in rows]

    def mark_replayed(self, destination: str, ids: list[int], now_ms: int) -> None:
        """Replayed dead letters count as delivered from now on."""

        def attempt() -> None:
            conn = self._db.conn()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    "UPDATE dead_letters SET replayed_ms = %s WHERE id = ANY(%s::bigint[])"
                    " AND destination = %s AND replayed_ms IS NULL",
                    [now_ms, list(ids), destination],
                )
                marked = max(cur.rowcount, 0)
                cur.execute(
                    "INSERT INTO delivery_counters (destination, name, value)"
                    " SELECT %s, n, v FROM unnest(%s::text[], %s::bigint[]) AS u(n, v)"
                    " ON CONFLICT (destination, name)"
                    " DO UPDATE SET value = delivery_counters.value + excluded.value",
                    [
                        destination,
                        ["dead_lettered", "delivered", "replayed"],
                        [-marked, marked, marked],
                    ],
                )

        with self._db.lock:
            pgschema.retrying(attempt)

    def min_cursor(self) -> int | None:
        with self._db.lock:
            row = (
                self._db.conn()
                .execute(
                    "SELECT min(log_offset) FROM delivery_offsets"
                    " WHERE consumer LIKE 'destination:%'"
                )
                .fetchone()
            )
        return None if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        self._db.close()


class PostgresRejectionLog:
    def __init__(self, dsn: str, schema: str = "headwater") -> None:
        self._db = pgschema.Session(dsn, schema)

    def record(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        minutes = Counter((r.received_ms // 60_000 * 60_000, r.code) for r in rejected)
        keys = sorted(minutes)

        def attempt() -> None:
            conn = self._db.conn()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO rejections (received_ms, source, path, status, code, field,"
                    " message, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            r.received_ms,
                            r.source,
                            r.path,
                            r.status,
                            r.code,
                            r.field,
                            r.message,
                            bytes(r.body[: embedded.MAX_BODY]),
                        )
                        for r in rejected
                    ],
                )
                cur.execute(
                    "INSERT INTO rejection_minutes (minute_ms, code, value)"
                    " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[])"
                    " ON CONFLICT (minute_ms, code)"
                    " DO UPDATE SET value = rejection_minutes.value + excluded.value",
                    [[m for m, _ in keys], [c for _, c in keys], [minutes[k] for k in keys]],
                )
                cur.execute(
                    "DELETE FROM rejections WHERE id <= (SELECT max(id) FROM rejections) - %s",
                    [embedded.KEEP],
                )

        with self._db.lock:
            pgschema.retrying(attempt)

    def after(self, last_id: int, limit: int = 200) -> list[dict[str, Any]]:
        return self._rows("WHERE id > %s ORDER BY id LIMIT %s", [last_id, limit])

    def _rows(self, clause: str, args: list[Any]) -> list[dict[str, Any]]:
        query = (
            "SELECT id, received_ms, source, path, status, code, field, message, body"
            f" FROM rejections {clause}"
        )
        with self._db.lock:
            rows = self._db.conn().execute(query.encode(), args).fetchall()
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
        with self._db.lock:
            row = self._db.conn().execute("SELECT max(id) FROM rejections").fetchone()
        return int(row[0] or 0) if row else 0

    def counts(self, since_ms: int, until_ms: int) -> dict[str, int]:
        with self._db.lock:
            rows = (
                self._db.conn()
                .execute(
                    "SELECT code, sum(value) FROM rejection_minutes WHERE minute_ms >= %s"
                    " AND minute_ms < %s GROUP BY code",
                    [since_ms, until_ms],
                )
                .fetchall()
            )
        return {str(code): int(value) for code, value in rows}

    def samples(self, code: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest refused requests with this code."""
        return self._rows("WHERE code = %s ORDER BY id DESC LIMIT %s", [code, limit])

    def close(self) -> None:
        self._db.close()
