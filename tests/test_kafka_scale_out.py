"""Two ``headwater serve`` nodes on one Kafka log and one PostgreSQL store.

Both pipelines join one consumer group and share the raw topic's partitions.
One node is killed with ``kill -9`` under load; its clients send what was not
acknowledged to the other node, as behind a load balancer; the survivor takes
over the dead node's partitions once the group notices, and every event either
node acknowledged is stored exactly once.  Load loops are bounded in count and
time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import WRITE_KEY, RunningServer
from headwater import config
from test_durability import Load, resend, stored_ids

if TYPE_CHECKING:
    from kafka_broker import KafkaBroker

pytest_plugins = ["kafka_broker", "pg"]


def node_settings(broker: KafkaBroker, prefix: str, dsn: str, schema: str) -> config.Settings:
    return config.Settings(
        sources=[config.Source(name="default", write_key=WRITE_KEY)],
        log=config.LogSettings(
            backend="kafka",
            kafka_bootstrap_servers=broker.bootstrap_servers,
            kafka_topic_prefix=prefix,
            kafka_partitions=4,
            kafka_replication_factor=1,
            kafka_append_timeout_ms=5000,
            # A killed member's partitions move after this (the broker's minimum).
            kafka_client_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        ),
        store=config.StoreSettings(backend="postgres", dsn=dsn, schema=schema),
    )


def members(broker: KafkaBroker, group: str) -> list[set[int]]:
    """The partitions assigned to each member of a consumer group."""
    admin = broker.admin()  # kept alive until the answer is in
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return [{tp.partition for tp in m.assignment.topic_partitions} for m in description.members]


def test_two_nodes_share_the_log_and_one_survives_the_other(
    make_server: Callable[..., RunningServer],
    kafka_broker: KafkaBroker,
    warehouse_dsn: str,
    tmp_path: Path,
) -> None:
    prefix = f"nodes-{uuid.uuid4().hex[:8]}"
    settings = node_settings(kafka_broker, prefix, warehouse_dsn, f"hw_{uuid.uuid4().hex[:8]}")
    nodes = []
    for name in ("a", "b"):
        config.save(tmp_path / name, settings)
        nodes.append(make_server(data_dir=tmp_path / name))
    a, b = nodes

    group = f"{prefix}-pipeline"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shares = members(kafka_broker, group)
        if len(shares) == 2 and all(shares) and set().union(*shares) == {0, 1, 2, 3}:
            break
        time.sleep(0.2)
    assert len(shares) == 2 and not shares[0] & shares[1], shares

    load_a = Load(a.url, "a", threads=3, batch=20, per_thread=300, seconds=8).start()
    load_b = Load(b.url, "b", threads=3, batch=20, per_thread=300, seconds=8).start()
    deadline = time.monotonic() + 10
    while load_b.requests() < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    b.kill9()
    load_a.stop()
    load_b.stop()
    assert load_b.acked, "node b acknowledged nothing before it died"
    assert not load_a.unexpected() and not load_b.unexpected()
    resend(a.url, load_a.unacked + load_b.unacked)  # the clients of b retry on a
    # Events of many users, so some land on the dead node's partitions for sure.
    spread = [
        {"type": "track", "event": "Spread", "userId": f"spread-{i % 40}", "messageId": f"s-{i}"}
        for i in range(80)
    ]
    assert a.post("/v1/batch", {"batch": spread}).status_code == 200

    stored = stored_ids(a, timeout=60)  # exactly once, or it fails here
    resent = {i for r in load_a.unacked + load_b.unacked for i in r.ids}
    acknowledged = load_a.acked | load_b.acked | resent | {e["messageId"] for e in spread}
    assert not acknowledged - stored, sorted(acknowledged - stored)[:10]
    assert stored == acknowledged
    assert members(kafka_broker, group) == [{0, 1, 2, 3}]
