"""The PostgreSQL schema of the scale-out shape, its migrations and its connections.

The event store, the delivery state and the rejection log share one database
schema (``store.dsn``, ``store.schema``).  Its tables are created and changed
only by the numbered steps in ``MIGRATIONS``, each applied once, in order, in
its own transaction, and recorded in ``schema_migrations``.  Every process
applies what is missing when it first opens the schema, holding an advisory
lock meanwhile, so nodes starting at once never race: the second waits, then
finds the steps applied.  A schema migrated by a newer headwater is refused.

Sessions run in UTC with the schema alone on the search path.  JSON comes back
as the exact text stored; ``numeric`` results come back as ``int`` when they
have no fractional part (sums of integers) and as ``float`` otherwise, as
DuckDB's sums and averages do.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors, sql
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader

from headwater.store.base import EVENT_COLUMNS

T = TypeVar("T")

# pg_advisory_lock(class, key): the class marks headwater's migration lock.
LOCK_CLASS = 0x6877
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_PG_TYPES = {
    "VARCHAR": "text",
    "JSON": "json",
    "TIMESTAMPTZ": "timestamptz",
    "BOOLEAN": "boolean",
    "BIGINT": "bigint",
    "VARCHAR[]": "text[]",
}
_NOT_NULL = {"message_id", "source"}
_EVENTS = ",\n    ".join(
    f'"{name}" {_PG_TYPES[kind]}{" NOT NULL" if name in _NOT_NULL else ""}'
    for name, kind in EVENT_COLUMNS
)

# (version, name, statements).  Never edit a step once released: add one.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "event store",
        (
            f"CREATE TABLE events (\n    {_EVENTS},\n"
            "    CONSTRAINT events_source_message_id UNIQUE (source, message_id)\n)",
            "CREATE INDEX events_received_at ON events (received_at)",
            'CREATE INDEX events_timestamp ON events ("timestamp")',
            "CREATE TABLE store_offsets (consumer text PRIMARY KEY, log_offset bigint NOT NULL)",
            "CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL)",
            "CREATE TABLE counter_minutes (minute timestamptz NOT NULL, name text NOT NULL,"
            " value bigint NOT NULL, PRIMARY KEY (minute, name))",
        ),
    ),
    (
        2,
        "functions the console's DuckDB SQL uses",
        (
            # Microseconds since the epoch, exactly (whole days, then the rest).
            "CREATE FUNCTION make_timestamptz(us bigint) RETURNS timestamptz"
            " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS"
            " $$ SELECT (timestamp '1970-01-01' + (us / 86400000000) * interval '1 day'"
            " + (us % 86400000000) * interval '1 microsecond') AT TIME ZONE 'UTC' $$",
            "CREATE FUNCTION epoch_ms(ts timestamptz) RETURNS bigint"
            " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS"
            " $$ SELECT floor(extract(epoch FROM ts) * 1000)::bigint $$",
            "CREATE FUNCTION to_seconds(seconds double precision) RETURNS interval"
            " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS"
            " $$ SELECT seconds * interval '1 second' $$",
            # Boundaries crossed, in UTC, as DuckDB counts them (weeks: whole 7-day spans).
            "CREATE FUNCTION date_diff(part text, a timestamptz, b timestamptz) RETURNS bigint"
            " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT CASE lower(part)"
            " WHEN 'year' THEN extract(year FROM b AT TIME ZONE 'UTC')"
            " - extract(year FROM a AT TIME ZONE 'UTC')"
            " WHEN 'quarter' THEN 4 * (extract(year FROM b AT TIME ZONE 'UTC')"
            " - extract(year FROM a AT TIME ZONE 'UTC'))"
            " + extract(quarter FROM b AT TIME ZONE 'UTC')"
            " - extract(quarter FROM a AT TIME ZONE 'UTC')"
            " WHEN 'month' THEN 12 * (extract(year FROM b AT TIME ZONE 'UTC')"
            " - extract(year FROM a AT TIME ZONE 'UTC'))"
            " + extract(month FROM b AT TIME ZONE 'UTC')"
            " - extract(month FROM a AT TIME ZONE 'UTC')"
            " WHEN 'week' THEN ((b AT TIME ZONE 'UTC')::date - (a AT TIME ZONE 'UTC')::date) / 7"
            " WHEN 'day' THEN (b AT TIME ZONE 'UTC')::date - (a AT TIME ZONE 'UTC')::date"
            " WHEN 'hour' THEN floor(extract(epoch FROM b) / 3600)"
            " - floor(extract(epoch FROM a) / 3600)"
            " WHEN 'minute' THEN floor(extract(epoch FROM b) / 60)"
            " - floor(extract(epoch FROM a) / 60)"
            " WHEN 'second' THEN floor(extract(epoch FROM b)) - floor(extract(epoch FROM a))"
            " END::bigint $$",
        ),
    ),
    (
        3,
        "delivery state",
        (
            "CREATE TABLE delivery_offsets (consumer text PRIMARY KEY, log_offset bigint NOT NULL)",
            "CREATE TABLE delivery_counters (destination text NOT NULL, name text NOT NULL,"
            " value bigint NOT NULL, PRIMARY KEY (destination, name))",
            "CREATE TABLE delivery_minutes (destination text NOT NULL, minute_ms bigint NOT NULL,"
            " name text NOT NULL, value bigint NOT NULL,"
            " PRIMARY KEY (destination, minute_ms, name))",
            "CREATE TABLE dead_letters (id bigserial PRIMARY KEY, destination text NOT NULL,"
            " message_id text NOT NULL, received_ms bigint NOT NULL, event bytea NOT NULL,"
            " reason text NOT NULL, attempts integer NOT NULL, last_status integer NOT NULL,"
            " last_response text NOT NULL, first_attempt_ms bigint NOT NULL,"
            " dead_ms bigint NOT NULL, replayed_ms bigint)",
            "CREATE INDEX dead_letters_by_destination ON dead_letters (destination, dead_ms)",
        ),
    ),
    (
        4,
        "rejection log",
        (
            "CREATE TABLE rejections (id bigserial PRIMARY KEY, received_ms bigint NOT NULL,"
            " source text NOT NULL, path text NOT NULL, status integer NOT NULL,"
            " code text NOT NULL, field text NOT NULL, message text NOT NULL,"
            " body bytea NOT NULL)",
            "CREATE INDEX rejections_by_code ON rejections (code, id)",
            "CREATE TABLE rejection_minutes (minute_ms bigint NOT NULL, code text NOT NULL,"
            " value bigint NOT NULL, PRIMARY KEY (minute_ms, code))",
        ),
    ),
)
LATEST = MIGRATIONS[-1][0]


class SchemaError(Exception):
    """The database schema cannot be used by this version of headwater."""


class _Number(Loader):
    """``numeric`` as ``int`` without a fractional part, else ``float`` (as DuckDB's)."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return int(text) if text.lstrip("-").isdigit() else float(text)


def connect(dsn: str, schema: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit session in UTC with ``schema`` on the search path."""
    options: dict[str, Any] = {}
    given = conninfo_to_dict(dsn)
    if "connect_timeout" not in given:
        options["connect_timeout"] = 10
    if "application_name" not in given:
        options["application_name"] = "headwater"
    conn = psycopg.connect(dsn, autocommit=True, **options)
    try:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("SET TimeZone TO 'UTC'")
        conn.adapters.register_loader("json", TextLoader)
        conn.adapters.register_loader("jsonb", TextLoader)
        conn.adapters.register_loader("numeric", _Number)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Apply the missing steps under the advisory lock; return the versions applied now."""
    if not SCHEMA_NAME.match(schema):
        raise SchemaError(f"store.schema: {schema!r} is not a plain SQL identifier")
    name = sql.Identifier(schema)
    applied_now: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [LOCK_CLASS, schema])
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(name)
            )
        rows = conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations").format(name)
        ).fetchall()
        applied = {int(row[0]) for row in rows}
        if applied and max(applied) > LATEST:
            raise SchemaError(
                f"store.schema: {schema!r} is at version {max(applied)}, newer than this"
                f" headwater knows ({LATEST}); upgrade headwater"
            )
        for version, title, statements in MIGRATIONS:
            if version in applied:
                continue
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(name))
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    [version, title],
                )
            applied_now.append(version)
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [LOCK_CLASS, schema])
    return applied_now


_ready: set[tuple[str, str]] = set()
_ready_lock = threading.Lock()


def ensure(dsn: str, schema: str) -> None:
    """Migrate the schema once per process."""
    with _ready_lock:
        if (dsn, schema) in _ready:
            return
        conn = connect(dsn, schema)
        try:
            migrate(conn, schema)
        finally:
            conn.close()
        _ready.add((dsn, schema))


class Session:
    """One connection, opened again when it breaks, used by one caller at a time."""

    def __init__(self, dsn: str, schema: str) -> None:
        ensure(dsn, schema)
        self.dsn = dsn
        self.schema = schema
        self.lock = threading.RLock()
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._conn = connect(self.dsn, self.schema)
        return self._conn

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def retrying(action: Callable[[], T], attempts: int = 5) -> T:
    """Run a transaction again when PostgreSQL chose it as a deadlock or serialization victim."""
    for attempt in range(attempts):
        try:
            return action()
        except (errors.DeadlockDetected, errors.SerializationFailure):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")


def placeholders(query: str) -> str:
    """DuckDB's ``?`` parameters as psycopg's ``%s`` (outside quotes and comments)."""
    out: list[str] = []
    i = 0
    n = len(query)
    while i < n:
        c = query[i]
        if c in ("'", '"'):
            end = i + 1
            while end < n:
                if query[end] == c:
                    if end + 1 < n and query[end + 1] == c:
                        end += 2
                        continue
                    break
                end += 1
            out.append(query[i : end + 1].replace("%", "%%"))
            i = end + 1
        elif c == "-" and query.startswith("--", i):
            end = query.find("\n", i)
            end = n if end < 0 else end
            out.append(query[i:end].replace("%", "%%"))
            i = end
        elif c == "/" and query.startswith("/*", i):
            end = query.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(query[i:end].replace("%", "%%"))
            i = end
        elif c == "?":
            out.append("%s")
            i += 1
        elif c == "%":
            out.append("%%")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
