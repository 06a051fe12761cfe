"""The PostgreSQL warehouse destination against a real server and a real PostgreSQL.

Every warehouse is read through a session in America/New_York (the test
cluster's default time zone), never UTC, so a time written in local time would
show (BC-30).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import RunningServer, reconciled, settle_deliveries
from headwater.destinations import ConfigurationError, build
from headwater.destinations.base import BatchSettings, DestinationConfig, RetrySettings
from headwater.destinations.postgres import Postgres
from headwater.destinations.warehouse import (
    Layout,
    finish_name,
    schema_name,
    snake_case,
    table_name,
)

if TYPE_CHECKING:
    from pg import Cluster

pytest_plugins = ["pg"]

REPLACEMENT = "\ufffd"


def destination(dsn: str, **settings: Any) -> DestinationConfig:
    return DestinationConfig(
        name="warehouse",
        kind="postgres",
        settings={"dsn": dsn, **settings},
        batch=BatchSettings(max_events=500, max_age_ms=50),
        retry=RetrySettings(base_ms=100, max_backoff_ms=1000),
    )


def query(dsn: str, statement: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(statement, params or None).fetchall()


def by_id(dsn: str, table: str, schema: str = "_default") -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in query(dsn, f'SELECT * FROM "{schema}"."{table}"')}


def discards(dsn: str, schema: str = "_default") -> list[dict[str, Any]]:
    return query(dsn, f'SELECT * FROM "{schema}".discards ORDER BY message_id, column_name')


def nest(key: str, depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {key: value}
    return value


def ok(server: RunningServer, path: str, body: Any) -> None:
    response = server.post(path, body)
    assert response.status_code == 200, response.text


# -- names and layout, no database ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        ("sample text", "sample_text"),
        ("sample-text", "sample_text"),
        ("sample___text", "sample_text"),
        ("sampleText", "sample_text"),
        ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
        ("   $#$sample   2    Text   ", "sample_2_text"),
        ("SAMPLE 2 TEXT", "sample_2_text"),
        ("___$$Base64Encode", "base64_encode"),
        ("FOO:BAR$BAZ", "foo_bar_baz"),
        ("something.com", "something_com"),
        ("$something%", "something"),
        ("•¶§ƒ˚foo˙∆˚¬", "foo"),
        ("accountType", "account_type"),
        ("userID", "user_id"),
        ("_private", "_private"),
    ],
)
def test_snake_case_follows_segment(name: str, snake: str) -> None:
    assert snake_case(name) == snake


def test_table_column_and_schema_names() -> None:
    assert table_name("Order Completed") == "order_completed"
    assert table_name("users") == "_users"  # an event may not take a Segment table's name
    assert table_name("101 Account Update") == "_101_account_update"
    assert table_name("Select") == "_select"
    assert schema_name("default") == "_default"
    assert schema_name("3doctors") == "_3doctors"
    long = table_name("a very long event name " * 5)
    assert len(long) == 63 and long == table_name("a very long event name " * 5)
    assert long != table_name("a very long event name " * 6)
    assert finish_name("", "日本語").startswith("_") and len(finish_name("", "日本語")) == 9


def test_colliding_keys_resolve_deterministically() -> None:
    events = [
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "m-1",
            "properties": {"orderId": 1, "order_id": 2, "order.id": 3},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "m-2",
            "properties": {"order.id": 3, "orderId": 1},
        },
    ]
    batch = Layout().build(events)
    first, second = batch.tables["order_completed"].rows
    assert first["order_id"] == 2  # the key already spelt like the column wins
    assert second["order_id"] == 3  # else the first key in code point order
    assert sorted((d.message_id, d.value) for d in batch.discards) == [
        ("m-1", "1"),
        ("m-1", "3"),
        ("m-2", "1"),
    ]
    assert all("name collision" in d.reason for d in batch.discards)


# -- the warehouse through a real server --------------------------------------------------


def _segment_calls() -> list[tuple[str, dict[str, Any]]]:
    ctx = {"ip": "192.0.2.1", "library": {"name": "analytics.js", "version": "5.2.1"}}
    return [
        (
            "/v1/identify",
            {
                "userId": "u-1",
                "messageId": "id-1",
                "traits": {"plan": "pro", "email": "a@example.com", "address": {"city": "Oslo"}},
                "context": ctx,
            },
        ),
        (
            "/v1/track",
            {
                "userId": "u-1",
                "event": "Order Completed",
                "messageId": "tr-1",
                "properties": {
                    "revenue": 25.5,
                    "products": [{"sku": "a"}, {"sku": "b"}],
                    "coupon": {"code": "X", "rules": {"min": {"amount": {"eur": 5}}}},
                    "select": True,
                },
                "context": ctx,
            },
        ),
        (
            "/v1/page",
            {
                "anonymousId": "anon-1",
                "messageId": "pg-1",
                "name": "Home",
                "properties": {"title": "Welcome", "url": "https://example.com/"},
            },
        ),
        ("/v1/screen", {"userId": "u-1", "messageId": "sc-1", "name": "Main"}),
        (
            "/v1/group",
            {
                "userId": "u-1",
                "groupId": "g-1",
                "messageId": "gr-1",
                "traits": {"name": "Acme", "employees": 10},
            },
        ),
        ("/v1/alias", {"userId": "u-1", "previousId": "anon-1", "messageId": "al-1"}),
        (
            "/v1/identify",
            {"userId": "u-1", "messageId": "id-2", "traits": {"plan": "team", "logins": 3}},
        ),
        # BC-22: properties named like the table's own columns
        (
            "/v1/track",
            {
                "userId": "u-22",
                "event": "Order Completed",
                "messageId": "bc22-1",
                "properties": {
                    "user_id": "someone-else",
                    "received_at": "1999-01-01T00:00:00Z",
                    "id": "fake-id",
                    "event": "Fake Event",
                    "event_text": "x",
                    "anonymous_id": "x",
                    "revenue": 10,
                },
            },
        ),
        # BC-24 as reported: a string first, then a number
        (
            "/v1/identify",
            {
                "userId": "u-24a",
                "messageId": "bc24-1",
                "traits": {"created_at": "2021-09-12", "size": "large"},
            },
        ),
        (
            "/v1/identify",
            {
                "userId": "u-24b",
                "messageId": "bc24-2",
                "traits": {"created_at": 1631404800, "size": 42},
            },
        ),
        # BC-24 the other way round: a number first, then a string
        (
            "/v1/track",
            {
                "userId": "u-24",
                "event": "Size Chosen",
                "messageId": "bc24r-1",
                "properties": {"created_at": 1631404800, "size": 42},
            },
        ),
        (
            "/v1/track",
            {
                "userId": "u-24",
                "event": "Size Chosen",
                "messageId": "bc24r-2",
                "properties": {"created_at": "2021-09-12T10:00:00Z", "size": "large"},
            },
        ),
        # BC-25: a float column, then a whole number; and the other way round
        ("/v1/track", _priced("Product Viewed", "bc25-1", 9.99)),
        ("/v1/track", _priced("Product Viewed", "bc25-2", 10)),
        ("/v1/track", _priced("Product Compared", "bc25r-1", 10)),
        ("/v1/track", _priced("Product Compared", "bc25r-2", 9.99)),
        # BC-30: two offsets of one instant, and no offset (UTC)
        ("/v1/track", _at("bc30-1", "2024-03-10T01:30:00-08:00")),
        ("/v1/track", _at("bc30-2", "2024-03-10T10:30:00+01:00")),
        ("/v1/track", _at("bc30-3", "2024-03-10T01:30:00")),
        # BC-01: U+0000 in an identity, a value and a key
        (
            "/v1/track",
            {
                "userId": "user\u0000-01",
                "event": "Signed Up",
                "messageId": "bc01-1",
                "properties": {"plan": "pro\u0000"},
            },
        ),
        (
            "/v1/identify",
            {"userId": "u-01", "messageId": "bc01-2", "traits": {"nick\u0000name": "x"}},
        ),
        ("/v1/track", {"userId": "u-01", "event": "After NUL", "messageId": "bc01-3"}),
        # BC-16: twenty levels of nesting
        (
            "/v1/track",
            {
                "userId": "u-16",
                "event": "Deep",
                "messageId": "bc16-2",
                "properties": nest("a", 20, 1),
            },
        ),
    ]


def _priced(event: str, message_id: str, price: float) -> dict[str, Any]:
    return {
        "userId": "u-25",
        "event": event,
        "messageId": message_id,
        "properties": {"price": price},
    }


def _at(message_id: str, timestamp: str) -> dict[str, Any]:
    return {"userId": "u-30", "event": "TZ", "messageId": message_id, "timestamp": timestamp}


class Loaded:
    def __init__(self, server: RunningServer, dsn: str, counters: dict[str, int]) -> None:
        self.server = server
        self.dsn = dsn
        self.counters = counters
        self.optional: dict[str, int] = {}


@pytest.fixture(scope="module")
def loaded(postgres_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """One server loading every call above (and the BC-12 and BC-16 extremes) into PostgreSQL."""
    dsn = postgres_cluster.create_database()
    data_dir = tmp_path_factory.mktemp("warehouse")
    server = RunningServer(
        Path(data_dir), destinations=[destination(dsn)], env={"TZ": "America/New_York"}
    ).start()
    try:
        for path, body in _segment_calls():
            ok(server, path, body)
        result = Loaded(server, dsn, {})
        # BC-12 and BC-16's 300 levels: the gateway may refuse them (400); never a 5xx.
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        extremes = [
            (
                "/v1/batch",
                {
                    "sentAt": "9999-05-28T13:13:23.260Z",
                    "batch": [
                        {
                            "type": "track",
                            "userId": "u-12",
                            "event": "Weird Clock",
                            "messageId": "bc12-1",
                            "originalTimestamp": now,
                        }
                    ],
                },
            ),
            (
                "/v1/track",
                {
                    "userId": "u-12",
                    "event": "Weird Clock",
                    "messageId": "bc12-2",
                    "timestamp": "-0025-01-01T23:01:01.000Z",
                },
            ),
            (
                "/v1/track",
                {
                    "userId": "u-16",
                    "event": "Deep",
                    "messageId": "bc16-1",
                    "properties": nest("a", 300, 1),
                },
            ),
        ]
        for path, body in extremes:
            status = server.post(path, body).status_code
            assert status < 500
            message_id = body.get("messageId") or body["batch"][0]["messageId"]
            result.optional[message_id] = status
        result.counters = settle_deliveries(server)["warehouse"]["counters"]
        yield result
    finally:
        server.stop()


def test_calls_land_in_segment_tables(loaded: Loaded) -> None:
    dsn = loaded.dsn
    identifies = by_id(dsn, "identifies")
    assert identifies["id-1"]["plan"] == "pro" and identifies["id-1"]["address_city"] == "Oslo"
    assert identifies["id-1"]["context_library_name"] == "analytics.js"
    tracks = by_id(dsn, "tracks")
    assert tracks["tr-1"]["event"] == "order_completed"
    assert tracks["tr-1"]["event_text"] == "Order Completed"
    assert tracks["tr-1"]["context_ip"] == "192.0.2.1"
    assert "revenue" not in tracks["tr-1"]  # tracks holds the common columns only
    order = by_id(dsn, "order_completed")["tr-1"]
    assert order["revenue"] == 25.5
    assert json.loads(order["products"]) == [{"sku": "a"}, {"sku": "b"}]
    assert order["coupon_code"] == "X"
    assert json.loads(order["coupon_rules_min_amount"]) == {"eur": 5}  # below four levels
    assert order["_select"] is True  # a reserved word gets a _ prefix
    for column in ("received_at", "sent_at", "timestamp", "original_timestamp", "uuid_ts"):
        assert isinstance(order[column], datetime), column
    page = by_id(dsn, "pages")["pg-1"]
    assert (page["name"], page["title"], page["anonymous_id"]) == ("Home", "Welcome", "anon-1")
    assert by_id(dsn, "screens")["sc-1"]["name"] == "Main"
    group = by_id(dsn, "groups")["gr-1"]
    assert (group["group_id"], group["name"], group["employees"]) == ("g-1", "Acme", 10)
    alias = by_id(dsn, "aliases")["al-1"]
    assert (alias["user_id"], alias["previous_id"]) == ("u-1", "anon-1")
    for table in ("tracks", "identifies", "pages", "screens", "groups", "aliases"):
        columns = {r["column_name"] for r in _columns(dsn, table)}
        assert not columns & {"type", "channel", "version", "integrations"}, table


def _columns(dsn: str, table: str, schema: str = "_default") -> list[dict[str, Any]]:
    return query(
        dsn,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        schema,
        table,
    )


def _type(dsn: str, table: str, column: str) -> str:
    types = {r["column_name"]: r["data_type"] for r in _columns(dsn, table)}
    return str(types[column])


def test_users_hold_the_latest_traits(loaded: Loaded) -> None:
    users = by_id(loaded.dsn, "users")
    user = users["u-1"]
    assert (user["plan"], user["logins"], user["email"]) == ("team", 3, "a@example.com")
    assert user["address_city"] == "Oslo"
    assert "anonymous_id" not in user
    assert set(users) >= {"u-1", "u-24a", "u-24b", "u-01"}


def test_bc22_properties_never_overwrite_system_columns(loaded: Loaded) -> None:
    row = by_id(loaded.dsn, "order_completed")["bc22-1"]
    assert row["id"] == "bc22-1" and row["user_id"] == "u-22"
    assert (row["event"], row["event_text"]) == ("order_completed", "Order Completed")
    assert row["anonymous_id"] is None and row["revenue"] == 10
    assert abs(row["received_at"] - datetime.now(UTC)) < timedelta(minutes=5)
    dropped = {d["column_name"]: d for d in discards(loaded.dsn) if d["message_id"] == "bc22-1"}
    assert set(dropped) == {"user_id", "received_at", "id", "event", "event_text", "anonymous_id"}
    assert dropped["user_id"]["column_value"] == "someone-else"
    assert all(d["reason"].startswith("reserved column") for d in dropped.values())


def test_bc24_first_value_sets_the_type_both_orders(loaded: Loaded) -> None:
    dsn = loaded.dsn
    # A date without a time stays text, so the number that follows is cast to text.
    assert _type(dsn, "identifies", "created_at") == "text"
    assert _type(dsn, "identifies", "size") == "text"
    identifies = by_id(dsn, "identifies")
    assert identifies["bc24-1"]["created_at"] == "2021-09-12"
    assert (identifies["bc24-2"]["created_at"], identifies["bc24-2"]["size"]) == (
        "1631404800",
        "42",
    )
    # Number first: the strings cannot become numbers, so NULL and a discard each.
    assert _type(dsn, "size_chosen", "created_at") == "bigint"
    chosen = by_id(dsn, "size_chosen")
    assert (chosen["bc24r-1"]["created_at"], chosen["bc24r-1"]["size"]) == (1631404800, 42)
    assert chosen["bc24r-2"]["created_at"] is None and chosen["bc24r-2"]["size"] is None
    rows = {
        d["column_name"]: d
        for d in discards(dsn)
        if d["message_id"] == "bc24r-2" and d["table_name"] == "size_chosen"
    }
    assert rows["size"]["column_value"] == "large"
    assert rows["created_at"]["column_value"] == "2021-09-12T10:00:00Z"
    assert "bigint" in rows["size"]["reason"] and rows["size"]["received_at"] is not None
    assert not [d for d in discards(dsn) if d["message_id"] in ("bc24-1", "bc24-2")]


def test_bc25_whole_number_into_float_column_both_orders(loaded: Loaded) -> None:
    dsn = loaded.dsn
    assert _type(dsn, "product_viewed", "price") == "double precision"
    viewed = by_id(dsn, "product_viewed")
    assert viewed["bc25-1"]["price"] == 9.99 and viewed["bc25-2"]["price"] == 10.0
    # An integer column never truncates 9.99 to 9: NULL and a discard with the reason.
    assert _type(dsn, "product_compared", "price") == "bigint"
    compared = by_id(dsn, "product_compared")
    assert compared["bc25r-1"]["price"] == 10 and compared["bc25r-2"]["price"] is None
    dropped = [d for d in discards(dsn) if d["message_id"].startswith("bc25")]
    assert [(d["message_id"], d["column_value"]) for d in dropped] == [("bc25r-2", "9.99")]


def test_bc30_times_are_utc_instants_under_a_local_session(loaded: Loaded) -> None:
    with psycopg.connect(loaded.dsn) as conn:
        conn.execute("SET TIME ZONE 'America/New_York'")
        rows = dict(
            conn.execute(
                "SELECT id, extract(epoch FROM timestamp)::bigint FROM _default.tz"
            ).fetchall()
        )
        column_type = conn.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_schema = '_default' AND table_name = 'tz' AND column_name = 'timestamp'"
        ).fetchone()
    assert column_type == ("timestamp with time zone",)
    instant = int(datetime(2024, 3, 10, 9, 30, tzinfo=UTC).timestamp())
    assert rows["bc30-1"] == rows["bc30-2"] == instant
    assert rows["bc30-3"] == int(datetime(2024, 3, 10, 1, 30, tzinfo=UTC).timestamp())


def test_bc12_absurd_times_load(loaded: Loaded) -> None:
    tracks = by_id(loaded.dsn, "tracks")
    for message_id in ("bc12-1", "bc12-2"):
        if loaded.optional[message_id] != 200:
            continue
        row = tracks[message_id]
        assert datetime(1970, 1, 1, tzinfo=UTC) <= row["timestamp"]
        assert row["timestamp"] <= row["received_at"] + timedelta(hours=1)
    assert loaded.optional["bc12-1"] == 200 and "bc12-1" in tracks


def test_bc01_nul_bytes_never_reach_postgres(loaded: Loaded) -> None:
    dsn = loaded.dsn
    signed = by_id(dsn, "signed_up")["bc01-1"]
    assert signed["user_id"] == f"user{REPLACEMENT}-01"
    assert signed["plan"] == f"pro{REPLACEMENT}"
    identify = by_id(dsn, "identifies")["bc01-2"]
    assert identify["nick_name"] == "x"
    assert "bc01-3" in by_id(dsn, "after_nul")


def test_bc16_deep_nesting_is_stored_as_json_below_the_flattening_depth(loaded: Loaded) -> None:
    deep = by_id(loaded.dsn, "deep")
    rest = json.loads(deep["bc16-2"]["a_a_a_a"])
    assert rest == nest("a", 16, 1)  # all twenty levels: four in the name, sixteen in JSON
    if loaded.optional["bc16-1"] == 200:
        assert json.loads(deep["bc16-1"]["a_a_a_a"]) == nest("a", 296, 1)


def test_reconciliation_is_zero(loaded: Loaded) -> None:
    counters = loaded.counters
    assert counters.get("dead_lettered", 0) == 0, counters
    assert reconciled(counters) == 0


def test_replayed_events_load_once(loaded: Loaded, tmp_path: Path) -> None:
    """A second server (no shared dedup state) sends every event again: no new rows."""
    before = {t: len(by_id(loaded.dsn, t)) for t in ("tracks", "identifies", "order_completed")}
    users_before = by_id(loaded.dsn, "users")
    discards_before = len(discards(loaded.dsn))
    again = RunningServer(tmp_path / "again", destinations=[destination(loaded.dsn)]).start()
    try:
        for path, body in _segment_calls():
            ok(again, path, body)
        counters = settle_deliveries(again)["warehouse"]["counters"]
    finally:
        again.stop()
    assert counters["delivered"] == len(_segment_calls()) and reconciled(counters) == 0
    after = {t: len(by_id(loaded.dsn, t)) for t in before}
    assert after == before
    assert len(discards(loaded.dsn)) == discards_before
    assert by_id(loaded.dsn, "users") == users_before
    for table in ("tracks", "identifies"):
        [dupes] = query(
            loaded.dsn, f"SELECT count(*) - count(DISTINCT id) AS n FROM _default.{table}"
        )
        assert dupes["n"] == 0


# -- the loader on its own ---------------------------------------------------------------


def test_direct_redelivery_and_type_casts(warehouse_dsn: str) -> None:
    target = Postgres(destination(warehouse_dsn, schema="direct"))
    first = [
        _track("t-1", {"n": 1, "f": 1.5, "b": True, "s": "x", "when": "2024-01-01T00:00:00Z"}),
        _track("t-2", {"n": 2.0, "f": 2, "b": "yes", "s": 5, "when": "soon"}),
        _track("t-3", {"n": 2**70, "s": [1, {"x": 2}], "big": 2**70}),
    ]
    assert target.deliver(first).kind == "delivered"
    assert target.deliver(first).kind == "delivered"  # a replay adds nothing
    rows = by_id(warehouse_dsn, "typed", "direct")
    assert len(rows) == 3
    assert (rows["t-2"]["n"], rows["t-2"]["f"], rows["t-2"]["s"]) == (2, 2.0, "5")
    assert rows["t-2"]["b"] is None and rows["t-2"]["_when"] is None
    assert rows["t-3"]["n"] is None and rows["t-3"]["s"] == '[1,{"x":2}]'
    assert rows["t-3"]["big"] == 2**70
    assert _type_in(warehouse_dsn, "direct", "typed", "_when") == "timestamp with time zone"
    assert _type_in(warehouse_dsn, "direct", "typed", "big") == "numeric"
    lost = {(d["message_id"], d["column_name"]) for d in discards(warehouse_dsn, "direct")}
    assert lost == {("t-2", "b"), ("t-2", "_when"), ("t-3", "n")}
    # A depth no JSON library likes still loads, as JSON text.
    assert target.deliver([_track("t-4", nest("a", 300, 1))]).kind == "delivered"
    target.close()


def _track(message_id: str, properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Typed",
        "messageId": message_id,
        "userId": "u",
        "receivedAt": "2024-05-01T12:00:00.000Z",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "properties": properties,
    }


def _type_in(dsn: str, schema: str, table: str, column: str) -> str:
    types = {r["column_name"]: r["data_type"] for r in _columns(dsn, table, schema)}
    return str(types[column])


def test_tracks_keeps_its_own_column_types(warehouse_dsn: str) -> None:
    """tracks and an event table may type a context column differently; each keeps its own."""
    target = Postgres(destination(warehouse_dsn, schema="own"))
    first = {**_track("o-1", {}), "event": "First", "context": {"x": 1}}
    second = {**_track("o-2", {}), "event": "Second", "context": {"x": "text"}}
    nameless = {**_track("o-3", {"p": 1}), "event": None, "context": {"x": 2}}
    assert target.deliver([first]).kind == "delivered"
    assert target.deliver([second, nameless]).kind == "delivered"
    assert _type_in(warehouse_dsn, "own", "tracks", "context_x") == "bigint"
    assert _type_in(warehouse_dsn, "own", "second", "context_x") == "text"
    tracks = by_id(warehouse_dsn, "tracks", "own")
    assert [tracks[i]["context_x"] for i in ("o-1", "o-2", "o-3")] == [1, None, 2]
    assert by_id(warehouse_dsn, "second", "own")["o-2"]["context_x"] == "text"
    [lost] = discards(warehouse_dsn, "own")
    assert (lost["table_name"], lost["column_name"], lost["message_id"]) == (
        "tracks",
        "context_x",
        "o-2",
    )
    target.close()


def test_a_row_postgres_refuses_is_isolated_not_the_batch(warehouse_dsn: str) -> None:
    target = Postgres(destination(warehouse_dsn, schema="strict"))
    assert target.deliver([_track("s-0", {"price": 1})]).kind == "delivered"
    with psycopg.connect(warehouse_dsn) as conn:
        conn.execute("ALTER TABLE strict.typed ADD CONSTRAINT cheap CHECK (price < 100)")
    batch = [_track(f"s-{i}", {"price": 500 if i == 3 else i}) for i in range(1, 7)]
    outcome = target.deliver(batch)
    assert outcome.kind == "delivered" and list(outcome.rejected) == [2]
    assert "CheckViolation" in outcome.rejected[2]
    assert sorted(by_id(warehouse_dsn, "typed", "strict")) == [f"s-{i}" for i in (0, 1, 2, 4, 5, 6)]
    target.close()


def test_connection_failures_are_retryable_and_check_names_them(postgres_cluster: Cluster) -> None:
    closed = postgres_cluster.dsn().replace(f"port={postgres_cluster.port}", "port=1")
    target = Postgres(destination(closed, connect_timeout_seconds=2))
    outcome = target.deliver([_track("c-1", {})])
    assert outcome.kind == "retryable" and "OperationalError" in outcome.message
    with pytest.raises(ConfigurationError, match="cannot connect to PostgreSQL"):
        target.check()
    good = build(destination(postgres_cluster.dsn()))
    good.check()
    good.close()
    # A connection the server drops is retried, then replaced.
    target = Postgres(destination(postgres_cluster.dsn(), schema="dropped"))
    assert target.deliver([_track("c-2", {})]).kind == "delivered"
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'headwater' AND datname = current_database()"
        )
    outcomes = [target.deliver([_track(f"c-{i}", {})]).kind for i in (3, 4)]
    assert outcomes in (["retryable", "delivered"], ["delivered", "delivered"])
    target.close()
    with pytest.raises(ConfigurationError, match=r"settings\.dsn"):
        build(DestinationConfig(name="w", kind="postgres", settings={}))


# -- crash ---------------------------------------------------------------------------------


class Sender:
    """Posts batches of tracks from one thread until stopped, a cap, or an error."""

    def __init__(self, url: str, batches: int = 400, size: int = 50, seconds: float = 15) -> None:
        self.url = url
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self._limits = (batches, size, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        batches, size, seconds = self._limits
        deadline = time.monotonic() + seconds
        auth = {"Authorization": "Basic V1JJVEVfS0VZOg=="}
        with httpx.Client(timeout=10, headers=auth) as client:
            for n in range(batches):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                ids = [f"k-{n}-{i}" for i in range(size)]
                batch = [
                    {
                        "type": "track",
                        "userId": f"u-{i % 7}",
                        "event": "Crash Test",
                        "messageId": m,
                        "properties": {"n": n, "i": i},
                    }
                    for i, m in enumerate(ids)
                ]
                self.sent.update(ids)
                try:
                    response = client.post(f"{self.url}/v1/batch", json={"batch": batch})
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    self.acked.update(ids)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def test_kill9_mid_delivery_loads_every_acknowledged_event_once(
    postgres_cluster: Cluster, tmp_path: Path
) -> None:
    dsn = postgres_cluster.create_database()
    config = destination(dsn)
    config.batch = BatchSettings(max_events=200, max_age_ms=20)
    server = RunningServer(tmp_path / "crash", destinations=[config]).start()
    sender = Sender(server.url)
    deadline = time.monotonic() + 15
    loaded = pending = 0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        loaded = _count(dsn, "crash_test")
        pending = server.admin.status()["destinations"]["warehouse"].get("pending", 0)
        if loaded >= 1000 and pending > 0:
            break
    server.kill9()
    sender.stop()
    assert loaded >= 1000 and pending > 0, "no delivery in progress to interrupt"

    restarted = RunningServer(tmp_path / "crash", destinations=[config]).start()
    try:
        counters = settle_deliveries(restarted, timeout=30)["warehouse"]["counters"]
    finally:
        restarted.stop()
    assert counters.get("dead_lettered", 0) == 0 and reconciled(counters) == 0
    for table in ("tracks", "crash_test"):
        ids = [r["id"] for r in query(dsn, f"SELECT id FROM _default.{table}")]
        assert len(ids) == len(set(ids)), f"duplicates in {table}"
        missing = sender.acked - set(ids)
        assert not missing, f"{len(missing)} acknowledged events missing from {table}"
        assert set(ids) <= sender.sent


def _count(dsn: str, table: str) -> int:
    try:
        [row] = query(dsn, f"SELECT count(*) AS n FROM _default.{table}")
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row["n"])
