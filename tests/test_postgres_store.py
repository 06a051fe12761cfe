"""What only the PostgreSQL backend has: migrations, and sessions that the server ends.

The behaviour every store shares is in ``tests/contract``.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from headwater.state.postgres import PostgresDeliveryState, PostgresRejectionLog
from headwater.store import pgschema
from headwater.store.base import EVENT_COLUMNS
from headwater.store.postgres import PostgresStore

pytest_plugins = ["pg"]


def _schema() -> str:
    return "m_" + uuid.uuid4().hex[:12]


def test_nodes_starting_at_once_apply_each_migration_once(warehouse_dsn: str) -> None:
    schema = _schema()
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def node() -> None:
        conn = pgschema.connect(warehouse_dsn, schema)
        try:
            start.wait(10)
            applied.append(pgschema.migrate(conn, schema))
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    versions = [version for version, _, _ in pgschema.MIGRATIONS]
    assert sorted(v for run in applied for v in run) == versions
    with psycopg.connect(warehouse_dsn) as conn:
        rows = conn.execute(
            f"SELECT version, name FROM {schema}.schema_migrations ORDER BY version"
        ).fetchall()
    assert rows == [(version, name) for version, name, _ in pgschema.MIGRATIONS]
    conn = pgschema.connect(warehouse_dsn, schema)
    try:
        assert pgschema.migrate(conn, schema) == []
    finally:
        conn.close()


def test_a_schema_from_a_newer_headwater_is_refused(warehouse_dsn: str) -> None:
    schema = _schema()
    conn = pgschema.connect(warehouse_dsn, schema)
    try:
        pgschema.migrate(conn, schema)
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from the future')",
            [pgschema.LATEST + 1],
        )
        with pytest.raises(pgschema.SchemaError, match=r"store\.schema: .* newer"):
            pgschema.migrate(conn, schema)
        # The lock was let go: another session can take it at once.
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", [pgschema.LOCK_CLASS, schema]
        ).fetchone()
        assert locked == (True,)
        with pytest.raises(pgschema.SchemaError, match=r"store\.schema"):
            pgschema.migrate(conn, "no-dashes; DROP SCHEMA public")
    finally:
        conn.close()


def _terminate_others(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def _row(message_id: str) -> dict[str, list[Any]]:
    values: dict[str, Any] = {name: None for name, _ in EVENT_COLUMNS}
    values.update(message_id=message_id, source="web", type="track", received_at=1, log_offset=1)
    return {name: [value] for name, value in values.items()}


def test_sessions_the_server_ended_are_opened_again(warehouse_dsn: str) -> None:
    schema = _schema()
    store = PostgresStore(warehouse_dsn, schema)
    state = PostgresDeliveryState(warehouse_dsn, schema)
    rejections = PostgresRejectionLog(warehouse_dsn, schema)
    try:
        store.write(_row("a"), "store", 1, {"stored": 1})
        assert store.query("SELECT count(*) FROM events").rows == [(1,)]
        state.commit("hook", 1, {"delivered": 1}, [])
        assert rejections.latest_id() == 0
        assert _terminate_others(warehouse_dsn) >= 3
        # Reads retry once on a fresh session; a write fails once, and the caller's
        # retry (the pipeline's, the delivery loop's) finds a new session.
        assert store.query("SELECT count(*) FROM events").rows == [(1,)]
        with pytest.raises(psycopg.OperationalError):
            store.write(_row("b"), "store", 2, {"stored": 1})
        store.write(_row("b"), "store", 2, {"stored": 1})
        with pytest.raises(psycopg.OperationalError):
            state.commit("hook", 2, {"delivered": 1}, [])
        state.commit("hook", 2, {"delivered": 1}, [])
        with pytest.raises(psycopg.OperationalError):
            rejections.latest_id()
        assert rejections.latest_id() == 0
        assert store.counters() == {"stored": 2}
        assert (state.committed("hook"), state.counters()) == (2, {"hook": {"delivered": 2}})
        assert store.known([("web", "a"), ("web", "b")]) == {"web\x1fa", "web\x1fb"}
    finally:
        store.close()
        state.close()
        rejections.close()


@pytest.mark.parametrize(
    ("duckdb", "postgres"),
    [
        ("SELECT ?", "SELECT %s"),
        ("SELECT '?', \"?\", ? -- ? %\n, 5 % 2", "SELECT '?', \"?\", %s -- ? %%\n, 5 %% 2"),
        ("SELECT 'it''s ?' || ?", "SELECT 'it''s ?' || %s"),
        ("SELECT /* ? */ ?", "SELECT /* ? */ %s"),
        ("SELECT 'a%'", "SELECT 'a%%'"),
    ],
)
def test_question_marks_become_placeholders_outside_quotes(duckdb: str, postgres: str) -> None:
    assert pgschema.placeholders(duckdb) == postgres
