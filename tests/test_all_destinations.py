"""Five destinations on one server, fed by the real segment-analytics-python SDK.

One ``headwater serve`` delivers the same SDK calls (identify, track, page,
group, alias) to a webhook (loopback receiver), the PostgreSQL warehouse (a
real server), Parquet files, and the Mixpanel and Amplitude contract fakes.
Each must hold what it should, exactly once, and every destination's counters
must reconcile: accepted == delivered + filtered + dead_lettered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.dataset as ds
import pytest
from psycopg.rows import dict_row
from segment.analytics import Client

from conftest import WRITE_KEY, RunningServer, reconciled, settle_deliveries
from fakes.amplitude import FakeAmplitude
from fakes.mixpanel import FakeMixpanel
from headwater.destinations.base import BatchSettings, DestinationConfig, RetrySettings
from receiver import Receiver

pytest_plugins = ["pg"]

USERS = ("user-a", "user-b", "user-c")
MP_TOKEN, AMP_KEY = "mp-token-all", "amp-key-all"
SA_USER, SA_SECRET, PROJECT_ID = "svc.all", "sa-secret-all", "4242"
FAST = BatchSettings(max_events=200, max_age_ms=50)
RETRY = RetrySettings(base_ms=100, max_backoff_ms=1000)
TYPE_TABLES = {
    "identify": "identifies",
    "track": "tracks",
    "page": "pages",
    "group": "groups",
    "alias": "aliases",
}


def destination(name: str, kind: str, **settings: Any) -> DestinationConfig:
    return DestinationConfig(name=name, kind=kind, settings=settings, batch=FAST, retry=RETRY)


def mid(kind: str, index: int) -> str:
    return f"all-{kind}-{index}"


def send(client: Client) -> dict[str, str]:
    """Every call for every user; messageId -> type."""
    sent: dict[str, str] = {}
    for index, user in enumerate(USERS):
        anon = f"anon-{index}"
        client.identify(
            user,
            {"email": f"{user}@example.com", "plan": "pro", "logins": index},
            anonymous_id=anon,
            context={"ip": "203.0.113.7"},
            message_id=mid("identify", index),
        )
        client.track(
            user,
            "Order Viewed",
            {"price": 9.5 + index, "quantity": index + 1, "sku": f"sku-{index}", "gift": True},
            context={"ip": "203.0.113.7"},
            message_id=mid("track", index),
        )
        client.page(
            user,
            "Docs",
            "Home",
            {"path": "/docs", "title": "Docs"},
            context={"ip": "203.0.113.7"},
            message_id=mid("page", index),
        )
        client.group(
            user,
            f"org-{index}",
            {"name": f"Org {index}", "employees": 10 * (index + 1)},
            context={"ip": "203.0.113.7"},
            message_id=mid("group", index),
        )
        client.alias(anon, user, context={"ip": "203.0.113.7"}, message_id=mid("alias", index))
        for kind in TYPE_TABLES:
            sent[mid(kind, index)] = kind
    return sent


@pytest.fixture
def outside() -> Iterator[dict[str, Any]]:
    made = {
        "hook": Receiver(),
        "mp": FakeMixpanel(
            project_token=MP_TOKEN,
            project_id=PROJECT_ID,
            service_account=(SA_USER, SA_SECRET),
        ),
        "amp": FakeAmplitude(api_key=AMP_KEY),
    }
    yield made
    for thing in made.values():
        thing.close()


def rows(dsn: str, table: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(f'SELECT * FROM "_default"."{table}"').fetchall()


def test_sdk_events_land_in_all_five_destinations(
    make_server: Callable[..., RunningServer],
    outside: dict[str, Any],
    warehouse_dsn: str,
    tmp_path: Path,
) -> None:
    hook: Receiver = outside["hook"]
    mp: FakeMixpanel = outside["mp"]
    amp: FakeAmplitude = outside["amp"]
    parquet_root = tmp_path / "archive"
    server = make_server(
        destinations=[
            destination(
                "hook", "webhook", url=hook.url, allow_networks=["127.0.0.0/8"], mode="batch"
            ),
            destination("warehouse", "postgres", dsn=warehouse_dsn),
            destination("archive", "files", path=str(parquet_root), format="parquet"),
            destination(
                "mp",
                "mixpanel",
                region="eu",
                base_url=mp.url,
                project_token=MP_TOKEN,
                service_account_username=SA_USER,
                service_account_secret=SA_SECRET,
                project_id=PROJECT_ID,
            ),
            destination("amp", "amplitude", region="us", base_url=amp.url, api_key=AMP_KEY),
        ]
    )
    sent = send(Client(WRITE_KEY, host=server.url, sync_mode=True))
    assert len(sent) == 5 * len(USERS)

    destinations = settle_deliveries(server, timeout=25)
    assert set(destinations) == {"hook", "warehouse", "archive", "mp", "amp"}
    for name, state in destinations.items():
        counters = state["counters"]
        assert counters["accepted"] == len(sent), (name, counters)
        assert counters["delivered"] == len(sent), (name, counters)
        assert counters.get("dead_lettered", 0) == 0, (name, counters)
        assert reconciled(counters) == 0, (name, counters)

    # Webhook: every messageId, once.
    hooked = Counter(e["messageId"] for e in hook.events())
    assert hooked == Counter(list(sent))

    # PostgreSQL: each call in its own table, ids are the messageIds, once each.
    for kind, table in TYPE_TABLES.items():
        ids = [r["id"] for r in rows(warehouse_dsn, table)]
        assert sorted(ids) == sorted(m for m, k in sent.items() if k == kind), table
    order_viewed = {r["id"]: r for r in rows(warehouse_dsn, "order_viewed")}
    assert sorted(order_viewed) == sorted(mid("track", i) for i in range(len(USERS)))
    first = order_viewed[mid("track", 0)]
    assert (first["user_id"], first["event_text"], first["sku"]) == (
        "user-a",
        "Order Viewed",
        "sku-0",
    )
    assert first["quantity"] == 1 and float(first["price"]) == 9.5 and first["gift"] is True
    users = {r["id"]: r for r in rows(warehouse_dsn, "users")}
    assert sorted(users) == sorted(USERS)
    assert users["user-b"]["email"] == "user-b@example.com" and users["user-b"]["plan"] == "pro"

    # Parquet: every event, once, with its type.
    archived = ds.dataset(parquet_root, format="parquet").to_table().to_pylist()
    assert Counter(r["messageId"] for r in archived) == Counter(list(sent))
    assert {r["messageId"]: r["type"] for r in archived} == sent

    # Mixpanel: identify, track, page and alias as events; identify as a profile
    # update and group as a group profile.
    mp_events = {e["properties"]["$insert_id"]: e for e in mp.unique_events()}
    assert sorted(mp_events) == sorted(m for m, k in sent.items() if k != "group")
    assert len(mp.imported) == len(mp_events)
    names = Counter(e["event"] for e in mp_events.values())
    assert names == Counter(
        {"$identify": 3, "Order Viewed": 3, "Viewed Home": 3, "$create_alias": 3}
    )
    assert mp_events[mid("track", 2)]["properties"]["distinct_id"] == "user-c"
    assert mp_events[mid("track", 2)]["properties"]["sku"] == "sku-2"
    assert sorted(u["$distinct_id"] for u in mp.engage) == sorted(USERS)
    assert sorted(g["$group_id"] for g in mp.groups) == ["org-0", "org-1", "org-2"]

    # Amplitude: identify, track, page and group as events (group as $identify);
    # alias as a user mapping; group traits through Group Identify.
    amp_events = {e["insert_id"]: e for e in amp.events}
    assert len(amp.events) == len(amp_events) and amp.duplicates == 0
    assert sorted(amp_events) == sorted(m for m, k in sent.items() if k != "alias")
    assert amp_events[mid("track", 1)]["event_type"] == "Order Viewed"
    assert amp_events[mid("track", 1)]["user_id"] == "user-b"
    assert amp_events[mid("track", 1)]["event_properties"]["sku"] == "sku-1"
    assert amp_events[mid("page", 0)]["event_type"] == "Viewed Home"
    assert amp_events[mid("group", 0)]["groups"] == {"[Segment] Group": "org-0"}
    assert sorted(m["user_id"] for m in amp.mappings) == ["anon-0", "anon-1", "anon-2"]
    assert {g["group_value"] for g in amp.group_identifications} == {"org-0", "org-1", "org-2"}
