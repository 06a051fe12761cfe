"""PostgreSQL warehouse destination: Segment's warehouse schema, loaded by COPY.

Settings (``[destinations.settings]``):

- ``dsn``: a libpq connection string or URI (required).
- ``source``: the source this destination loads (default ``default``); the
  schema is named after it, normalised like a table name (``default`` is a
  reserved word, so the schema is ``_default``).  Limitation: the delivery loop
  does not tell a destination which source an event came from, so events of every
  source routed here land in this one schema; use one destination per source
  with a filter on a field that tells them apart.
- ``schema``: the schema to load into, used as given (overrides ``source``).
- ``max_depth``: levels of nested keys flattened into columns (default 4).
- ``max_columns``: columns a table may grow to (default 1000; PostgreSQL's
  limit is 1600); values for columns past it go to ``discards``.
- ``connect_timeout_seconds``, ``statement_timeout_ms``, ``lock_timeout_ms``.

The layout, names and type rules are in ``headwater.destinations.warehouse``.

One batch is loaded in one transaction: each table's rows are copied into a
temporary staging table, then ``INSERT ... SELECT ... ON CONFLICT (id) DO
NOTHING`` moves them across, so a replayed batch (after a crash, a retry or a
duplicate) adds nothing.  A named event's ``tracks`` row is inserted from its
event table's staging rows when the shared columns have the same types.
``users`` and ``discards`` only change for rows that were really inserted.
New tables and columns are created beforehand, in their own short transaction.
Times are written with an explicit offset (UTC when the sender gave none), so
the session's time zone never shifts them.

Errors: lost or refused connections, timeouts, lock and serialisation
failures, and schema drift are retried by the delivery loop.  A data error
should not happen (the loader casts or discards every value), but if one does,
the batch is split until the events that fail are isolated: those are
rejected, the rest are loaded.

Throughput depends mostly on batch size: each batch costs a transaction and a
few statements per table, so give this destination ``[destinations.batch]``
``max_events`` in the thousands (``bench/bench_warehouse.py`` uses 5000).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from headwater.destinations import warehouse
from headwater.destinations.base import (
    BatchSettings,
    ConfigurationError,
    DestinationConfig,
    Outcome,
)
from headwater.spec.timestamps import parse_ms

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

log = logging.getLogger(__name__)

DISCARDS_COLUMNS = (
    "table_name",
    "column_name",
    "column_value",
    "reason",
    "message_id",
    "received_at",
)
# SQLSTATE classes of errors caused by the rows themselves; the rest are retried.
DATA_ERROR_CLASSES = frozenset({"22", "23", "54"})


class SchemaError(Exception):
    """Creating a table or column failed; retried like a lost connection."""


class PostgresSettings(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str = ""
    source: str = "default"
    schema: str = ""
    max_depth: int = warehouse.DEFAULT_MAX_DEPTH
    max_columns: int = 1000
    connect_timeout_seconds: int = 10
    statement_timeout_ms: int = 300_000
    lock_timeout_ms: int = 30_000


class Postgres:
    is_warehouse = True
    # Loads are cheapest in thousands of rows per COPY.
    default_batch = BatchSettings(max_events=5000, max_bytes=16 * 1024 * 1024, max_age_ms=1000)

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        where = f"destinations.{config.name}.settings"
        try:
            self.settings = msgspec.convert(config.settings, PostgresSettings)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        if not self.settings.dsn.strip():
            raise ConfigurationError(f"{where}.dsn: a PostgreSQL connection string is required")
        if not 1 <= self.settings.max_depth <= 32:
            raise ConfigurationError(f"{where}.max_depth: between 1 and 32")
        if not 20 <= self.settings.max_columns <= 1500:
            raise ConfigurationError(f"{where}.max_columns: between 20 and 1500")
        schema = self.settings.schema or warehouse.schema_name(self.settings.source)
        if len(schema.encode()) > warehouse.MAX_NAME_BYTES or "\x00" in schema:
            raise ConfigurationError(f"{where}.schema: at most 63 bytes, no NUL")
        self.schema = schema
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                f"destinations.{config.name}: the postgres destination needs psycopg;"
                ' install it with pip install "headwater[postgres]"'
            ) from None
        self._psycopg = psycopg
        self.layout = warehouse.Layout(self.settings.max_depth)
        self._conn: psycopg.Connection[Any] | None = None
        # table -> column -> kind (PostgreSQL's type name), as last read from the catalog
        self._columns: dict[str, dict[str, str]] | None = None
        # table -> (its staging table, the table's columns when the stage was made)
        self._stages: dict[str, tuple[sql.Identifier, tuple[tuple[str, str], ...]]] = {}
        self._new_stages: dict[str, tuple[sql.Identifier, tuple[tuple[str, str], ...]]] = {}
        self._stage_count = 0

    # -- the Destination protocol ---------------------------------------------------

    def check(self) -> None:
        try:
            conn = self._connect()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT CASE WHEN to_regnamespace(%s) IS NULL"
                    " THEN has_database_privilege(current_database(), 'CREATE')"
                    " ELSE has_schema_privilege(%s, 'CREATE') END",
                    (_quoted(self.schema), self.schema),
                )
                row = cur.fetchone()
            conn.rollback()
        except self._psycopg.Error as exc:
            self._reset()
            raise ConfigurationError(
                f"destinations.{self.config.name}: cannot connect to PostgreSQL: {_message(exc)}"
            ) from None
        if not row or not row[0]:
            raise ConfigurationError(
                f"destinations.{self.config.name}: the user may not create tables"
                f" in schema {self.schema!r}"
            )

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        if not events:
            return Outcome.delivered()
        try:
            self._load_events(events)
        except Exception as exc:
            if self._failure(exc) == "retry":
                return Outcome("retryable", 0, _message(exc))
            if len(events) == 1:
                return Outcome.delivered(rejected={0: _message(exc)})
            return self._isolate(events)
        return Outcome.delivered()

    def close(self) -> None:
        self._reset()

    # -- failures ------------------------------------------------------------------

    def _failure(self, exc: Exception) -> str:
        """Classify an exception from a load as "retry" or "data", and reset what it spoilt.

        This is the one place psycopg's exceptions are interpreted.
        """
        self._reset(keep_connection=True)
        if isinstance(exc, SchemaError):
            return "retry"
        if isinstance(exc, self._psycopg.Error):
            state = exc.sqlstate or ""
            if state[:2] in DATA_ERROR_CLASSES:
                return "data"
            if isinstance(exc, self._psycopg.DataError):
                return "data"
            return "retry"
        log.exception("destination %s: unexpected error while loading", self.config.name)
        return "data"

    def _isolate(self, events: list[dict[str, Any]]) -> Outcome:
        """Load halves of a batch that hit a data error until the failing events are alone."""
        rejected: dict[int, str] = {}
        middle = len(events) // 2
        pending = [(middle, len(events)), (0, middle)]
        while pending:
            low, high = pending.pop()
            try:
                self._load_events(events[low:high])
                continue
            except Exception as exc:
                if self._failure(exc) == "retry":
                    return Outcome("retryable", 0, _message(exc))
                if high - low == 1:
                    rejected[low] = _message(exc)
                    continue
            middle = (low + high) // 2
            pending += [(middle, high), (low, middle)]
        log.warning(
            "destination %s: %d of %d events rejected by PostgreSQL",
            self.config.name,
            len(rejected),
            len(events),
        )
        return Outcome.delivered(rejected=rejected)

    def _reset(self, keep_connection: bool = False) -> None:
        self._columns = None
        self._stages.clear()
        self._new_stages.clear()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if keep_connection and not conn.closed:
            try:
                conn.rollback()
                conn.execute("DISCARD TEMP")
                conn.commit()
                self._conn = conn
                return
            except self._psycopg.Error:
                pass
        with contextlib.suppress(self._psycopg.Error):
            conn.close()

    # -- loading -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = self._psycopg.connect(
            self.settings.dsn,
            connect_timeout=self.settings.connect_timeout_seconds,
            application_name="headwater",
        )
        with conn.cursor() as cur:
            cur.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false)",
                (str(self.settings.statement_timeout_ms), str(self.settings.lock_timeout_ms)),
            )
        conn.commit()
        self._conn = conn
        return conn

    def _load_events(self, events: list[dict[str, Any]]) -> None:
        started = time.monotonic()
        batch = self.layout.build(events)
        conn = self._connect()
        columns = self._prepare(conn, batch)
        projected = _projections(batch, columns)
        users_discards: list[warehouse.Discard] = []
        for table in batch.tables.values():
            warehouse.cast_rows(table, columns[table.name], batch.discards)
        if batch.users.rows:
            warehouse.cast_rows(batch.users, columns[warehouse.USERS], users_discards)
        self._load(conn, batch, projected, users_discards)
        log.debug(
            "destination %s: loaded %d events in %.3f s",
            self.config.name,
            len(events),
            time.monotonic() - started,
        )

    def _prepare(self, conn: psycopg.Connection[Any], batch: warehouse.Batch) -> dict[str, Any]:
        """Create the tables and columns this batch needs; the columns' kinds."""
        from psycopg import sql

        columns = self._catalog(conn)
        statements: list[sql.Composed] = []
        wanted = list(batch.tables.values())
        if batch.users.rows:
            wanted.append(batch.users)
        if warehouse.DISCARDS not in columns:
            statements.append(self._create(warehouse.DISCARDS, _discards_fixed(), key=None))
        for table in wanted:
            existing = columns.get(table.name)
            if existing is None:
                statements.append(self._create(table.name, table.fixed, key="id"))
                existing = {**table.fixed, warehouse.LOADED_AT: warehouse.TIMESTAMP}
            first = table.first_values(existing)
            room = self.settings.max_columns - len(existing)
            added = [(c, warehouse.infer_kind(v)) for c, v in first.items()][: max(0, room)]
            if added:
                statements.append(self._add_columns(table.name, added))
                log.info(
                    "destination %s: adding %d columns to %s.%s",
                    self.config.name,
                    len(added),
                    self.schema,
                    table.name,
                )
        if not statements:
            return columns
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                for statement in statements:
                    cur.execute(statement)
            conn.commit()
        except self._psycopg.Error as exc:
            # Another loader may be changing the same schema; the next attempt sees its work.
            raise SchemaError(f"schema change failed: {_message(exc)}") from exc
        self._columns = None
        return self._catalog(conn)

    def _catalog(self, conn: psycopg.Connection[Any]) -> dict[str, dict[str, str]]:
        if self._columns is not None:
            return self._columns
        columns: dict[str, dict[str, str]] = {}
        with conn.cursor() as cur:
            cur.execute(
                "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)"
                " FROM pg_attribute a"
                " JOIN pg_class c ON c.oid = a.attrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')"
                " AND a.attnum > 0 AND NOT a.attisdropped"
                " ORDER BY c.relname, a.attnum",
                (self.schema,),
            )
            for table, column, kind in cur.fetchall():
                columns.setdefault(table, {})[column] = _kind(kind)
        conn.commit()
        self._columns = columns
        return columns

    def _create(self, table: str, fixed: dict[str, str], key: str | None) -> sql.Composed:
        from psycopg import sql

        parts = [
            sql.SQL("{} {}{}").format(
                sql.Identifier(column),
                sql.SQL(kind),
                sql.SQL(" PRIMARY KEY" if column == key else ""),
            )
            for column, kind in fixed.items()
        ]
        parts.append(
            sql.SQL("{} timestamptz DEFAULT now()").format(sql.Identifier(warehouse.LOADED_AT))
        )
        log.info("destination %s: creating table %s.%s", self.config.name, self.schema, table)
        return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            self._name(table), sql.SQL(", ").join(parts)
        )

    def _add_columns(self, table: str, added: list[tuple[str, str]]) -> sql.Composed:
        from psycopg import sql

        return sql.SQL("ALTER TABLE {} {}").format(
            self._name(table),
            sql.SQL(", ").join(
                sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(sql.Identifier(c), sql.SQL(k))
                for c, k in added
            ),
        )

    def _name(self, table: str) -> sql.Identifier:
        from psycopg import sql

        return sql.Identifier(self.schema, table)

    def _load(
        self,
        conn: psycopg.Connection[Any],
        batch: warehouse.Batch,
        projected: dict[str, list[str]],
        users_discards: list[warehouse.Discard],
    ) -> None:
        """Step 1 to 4 of one batch's transaction."""
        inserted: dict[str, set[str]] = {}
        with_discards = {d.table for d in batch.discards}
        with conn.cursor() as cur:
            # Step 1. Every table's rows, through staging, once per messageId.
            for table in batch.tables.values():
                if not table.rows:
                    continue
                returning = table.name in with_discards or (
                    table.name == "identifies" and bool(batch.users.rows)
                )
                stage, columns = self._stage_rows(cur, table)
                ids = self._move(cur, table.name, stage, columns, returning)
                inserted.setdefault(table.name, set()).update(ids)
                # tracks takes its columns of the same rows from the event's staging table.
                if table.name in projected:
                    returning = "tracks" in with_discards
                    ids = self._move(cur, "tracks", stage, projected[table.name], returning)
                    inserted.setdefault("tracks", set()).update(ids)
            # Step 2. users: the latest traits of the identifies just inserted.
            fresh = inserted.get("identifies", set())
            if batch.users.rows:
                self._upsert_users(cur, batch.users, fresh)
            # Step 3. discards of the rows just inserted.
            discards = [d for d in batch.discards if d.message_id in inserted.get(d.table, ())]
            discards += [d for d in users_discards if d.message_id in fresh]
            if discards:
                self._copy(
                    cur,
                    self._name(warehouse.DISCARDS),
                    DISCARDS_COLUMNS,
                    (
                        (d.table, d.column, d.value, d.reason, d.message_id, d.received_at)
                        for d in discards
                    ),
                )
        # Step 4. All of it, or none of it.
        conn.commit()
        self._stages.update(self._new_stages)
        self._new_stages.clear()

    def _stage(self, cur: psycopg.Cursor[Any], table: str) -> sql.Identifier:
        """A temporary table shaped like ``table``, emptied at every commit.

        Staging tables live as long as the connection and are made again when
        their table gains columns; after any failure they are all made again.
        """
        from psycopg import sql

        columns = tuple((self._columns or {}).get(table, {}).items())
        known = self._stages.get(table)
        if known is not None and known[1] == columns:
            return known[0]
        if known is not None:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(known[0]))
        self._stage_count += 1
        stage = sql.Identifier(f"hw_stage_{self._stage_count}")
        cur.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {}) ON COMMIT DELETE ROWS").format(
                stage, self._name(table)
            )
        )
        self._new_stages[table] = (stage, columns)
        return stage

    def _stage_rows(
        self, cur: psycopg.Cursor[Any], table: warehouse.Table
    ) -> tuple[sql.Identifier, list[str]]:
        """Copy a table's rows into its staging table; the staging table and the columns."""
        columns = _columns_of(table.rows)
        stage = self._stage(cur, table.name)
        self._copy_rows(cur, stage, columns, table.rows)
        return stage, columns

    def _move(
        self,
        cur: psycopg.Cursor[Any],
        table: str,
        stage: sql.Identifier,
        columns: list[str],
        returning: bool,
    ) -> set[str]:
        """Insert staged rows whose id is new; their ids when ``returning``."""
        from psycopg import sql

        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        statement = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT (id) DO NOTHING"
        ).format(self._name(table), names, names, stage)
        if not returning:
            cur.execute(statement)
            return set()
        cur.execute(statement + sql.SQL(" RETURNING id"))
        return {row[0] for row in cur.fetchall()}

    def _upsert_users(
        self, cur: psycopg.Cursor[Any], users: warehouse.Table, fresh: set[str]
    ) -> None:
        from psycopg import sql

        merged = _merge_users(users, fresh)
        if not merged:
            return
        columns = _columns_of(merged)
        stage = self._stage(cur, warehouse.USERS)
        self._copy_rows(cur, stage, columns, merged)
        target = sql.Identifier("t")
        updates = [
            sql.SQL("received_at = GREATEST({t}.received_at, EXCLUDED.received_at)").format(
                t=target
            ),
            sql.SQL("{} = now()").format(sql.Identifier(warehouse.LOADED_AT)),
        ]
        # A newer identify overwrites a trait; an older one only fills a missing one.
        for column in columns:
            if column in warehouse.USERS_FIXED:
                continue
            updates.append(
                sql.SQL(
                    "{c} = CASE WHEN {t}.received_at IS NULL"
                    " OR EXCLUDED.received_at >= {t}.received_at"
                    " THEN COALESCE(EXCLUDED.{c}, {t}.{c}) ELSE COALESCE({t}.{c}, EXCLUDED.{c}) END"
                ).format(c=sql.Identifier(column), t=target)
            )
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        cur.execute(
            sql.SQL(
                "INSERT INTO {} AS {} ({}) SELECT {} FROM {} ON CONFLICT (id) DO UPDATE SET {}"
            ).format(
                self._name(warehouse.USERS),
                target,
                names,
                names,
                stage,
                sql.SQL(", ").join(updates),
            )
        )

    @staticmethod
    def _copy(
        cur: psycopg.Cursor[Any],
        table: sql.Composable,
        columns: Any,
        rows: Any,
    ) -> None:
        from psycopg import sql

        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with cur.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    @staticmethod
    def _copy_rows(
        cur: psycopg.Cursor[Any],
        table: sql.Composable,
        columns: list[str],
        rows: list[dict[str, Any]],
    ) -> None:
        from psycopg import sql

        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with cur.copy(statement) as copy:
            write = copy.write_row
            for row in rows:
                write(list(map(row.get, columns)))


def _projections(batch: warehouse.Batch, kinds: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Event tables whose staged rows can also fill ``tracks``; their tracks columns.

    A named event's tracks row is its event row without the properties, so
    when every one of those columns has the same kind in both tables the
    tracks rows need no copy of their own: they are taken out of the batch.
    """
    tracks = batch.tables.get("tracks")
    if tracks is None:
        return {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in tracks.rows:
        groups.setdefault(row.get("event") or "", []).append(row)
    projected: dict[str, list[str]] = {}
    target = kinds.get("tracks", {})
    for event_table, rows in groups.items():
        if event_table not in batch.tables or event_table == "tracks":
            continue
        source = kinds.get(event_table, {})
        columns = _columns_of(rows)
        if all(c in source and source[c] == target.get(c) for c in columns):
            projected[event_table] = columns
    if projected:
        tracks.rows = [row for row in tracks.rows if row.get("event") not in projected]
    return projected


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(set().union(*rows))


def _merge_users(users: warehouse.Table, fresh: set[str]) -> list[dict[str, Any]]:
    """One row per user: its identifies in time order, later traits over earlier."""
    order = sorted(
        (
            (parse_ms(row["received_at"]) if row.get("received_at") else None) or 0,
            index,
        )
        for index, row in enumerate(users.rows)
        if users.message_id(index) in fresh
    )
    merged: dict[str, dict[str, Any]] = {}
    for _, index in order:
        row = users.rows[index]
        target = merged.setdefault(row["id"], {})
        target.update((k, v) for k, v in row.items() if v is not None)
    return list(merged.values())


def _discards_fixed() -> dict[str, str]:
    fixed = dict.fromkeys(DISCARDS_COLUMNS, warehouse.TEXT)
    fixed["received_at"] = warehouse.TIMESTAMP
    return fixed


def _kind(type_name: str) -> str:
    return warehouse.TIMESTAMP if type_name == "timestamp with time zone" else type_name


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]
