"""The Kafka destination against a real broker: keys, values, order, outages, rejects."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import KafkaError

from conftest import RunningServer, free_port
from headwater.destinations import build
from headwater.destinations import kafka as kafka_destination
from headwater.destinations.base import (
    BatchSettings,
    ConfigurationError,
    DestinationConfig,
    RetrySettings,
)
from test_delivery import reconciled, settle_deliveries, track

if TYPE_CHECKING:
    from kafka_broker import KafkaBroker, Record

# The real broker's fixtures: kafka_broker, kafka_topic.
pytest_plugins = ["kafka_broker"]


def kafka(name: str, bootstrap: str, topic: str, **overrides: Any) -> DestinationConfig:
    settings: dict[str, Any] = {"bootstrap_servers": bootstrap, "topic": topic}
    settings.update(overrides.pop("settings", {}))
    return DestinationConfig(
        name=name,
        kind="kafka",
        settings=settings,
        batch=overrides.pop("batch", BatchSettings(max_events=50, max_age_ms=50)),
        retry=overrides.pop("retry", RetrySettings(base_ms=200, max_backoff_ms=1000)),
        **overrides,
    )


def by_key(records: list[Record]) -> dict[str | None, list[Record]]:
    out: dict[str | None, list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        out[record.key].append(record)
    return out


def status_of(server: RunningServer, name: str) -> dict[str, Any]:
    return dict(server.admin.status()["destinations"][name])


def test_events_arrive_keyed_with_json_values_in_user_order(
    make_server: Callable[..., RunningServer], kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    server = make_server(
        destinations=[kafka("stream", kafka_broker.bootstrap_servers, kafka_topic)]
    )
    users = ["alice", "bob", "carol", "dave", "erin"]
    sent: list[dict[str, Any]] = []
    for start in range(0, 60, 20):
        batch = [track(i, user=users[i % len(users)]) for i in range(start, start + 20)]
        sent.extend(batch)
        assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    anonymous = {
        "type": "page",
        "anonymousId": "anon-7",
        "name": "Home",
        "messageId": "m-anon",
        "properties": {"i": 60},
    }
    assert server.post("/v1/page", anonymous).status_code == 200
    records = kafka_broker.consume(kafka_topic, 61)
    assert len(records) == 61, records
    assert sorted(r.value["messageId"] for r in records) == sorted(
        [e["messageId"] for e in sent] + ["m-anon"]
    )
    for record in records:
        value = record.value
        assert record.key == (value.get("userId") or value["anonymousId"])
        assert value["receivedAt"].endswith("Z") and value["timestamp"].endswith("Z")
        if value["type"] == "track":
            assert value["event"] == "Tick"
            assert value["properties"]["i"] == int(value["messageId"][2:])
    groups = by_key(records)
    assert set(groups) == {*users, "anon-7"}
    for key, group in groups.items():
        assert len({r.partition for r in group}) == 1, f"{key} spread over partitions"
        order = [r.value["properties"]["i"] for r in group]
        assert order == sorted(order), f"order broken for {key}: {order}"
    assert len({r.partition for r in records}) > 1, "every key on one partition"
    counters = settle_deliveries(server)["stream"]["counters"]
    assert counters["delivered"] == 61 and reconciled(counters) == 0


def test_broker_outage_loses_nothing(
    make_server: Callable[..., RunningServer], kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    destination = kafka(
        "stream",
        kafka_broker.bootstrap_servers,
        kafka_topic,
        settings={"delivery_timeout_seconds": 2},
        retry=RetrySettings(max_attempts=1000, base_ms=200, max_backoff_ms=1000),
    )
    server = make_server(destinations=[destination])
    users = [f"u-{n}" for n in range(4)]
    before = [track(i, user=users[i % 4]) for i in range(20)]
    assert server.post("/v1/batch", {"batch": before}).status_code == 200
    assert len(kafka_broker.consume(kafka_topic, 20)) == 20

    kafka_broker.stop()
    try:
        during = [track(i, user=users[i % 4]) for i in range(20, 50)]
        for start in range(0, 30, 10):
            batch = during[start : start + 10]
            assert server.post("/v1/batch", {"batch": batch}).status_code == 200
            time.sleep(0.5)
        # Counters are committed with the batch; a failed attempt shows as last_error.
        deadline = time.monotonic() + 30
        while not status_of(server, "stream").get("last_error"):
            assert time.monotonic() < deadline, status_of(server, "stream")
            time.sleep(0.2)
        assert "not delivered" in status_of(server, "stream")["last_error"]
        time.sleep(3)  # let it back off and fail again
    finally:
        kafka_broker.start()

    records = kafka_broker.consume(kafka_topic, 50, timeout=60)
    ids = {r.value["messageId"] for r in records}
    assert ids == {f"m-{i}" for i in range(50)}, kafka_broker.log_tail()
    for key, group in by_key(records).items():
        first_seen: list[int] = []
        for record in group:
            i = record.value["properties"]["i"]
            if i not in first_seen:
                first_seen.append(i)
        assert first_seen == sorted(first_seen), f"order broken for {key}: {first_seen}"
    counters = settle_deliveries(server, timeout=60)["stream"]["counters"]
    assert counters["delivered"] == 50
    assert counters["retried"] >= 2 and counters.get("dead_lettered", 0) == 0
    assert counters["failed"] == counters["retried"]
    assert reconciled(counters) == 0


def test_oversized_event_is_dead_lettered_alone(
    make_server: Callable[..., RunningServer], kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    destination = kafka(
        "stream",
        kafka_broker.bootstrap_servers,
        kafka_topic,
        settings={"producer_config": {"message.max.bytes": 4000}},
    )
    server = make_server(destinations=[destination])
    batch = [track(i) for i in range(6)]
    batch[2]["properties"]["blob"] = "x" * 6000
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    counters = settle_deliveries(server)["stream"]["counters"]
    assert counters["delivered"] == 5 and counters["dead_lettered"] == 1
    assert reconciled(counters) == 0
    records = kafka_broker.consume(kafka_topic, 5)
    assert [r.value["messageId"] for r in records] == ["m-0", "m-1", "m-3", "m-4", "m-5"]
    from headwater.destinations.state import DeliveryState

    state = DeliveryState(server.data_dir)
    [letter] = state.dead_letters("stream")
    state.close()
    assert letter.message_id == "m-2"
    assert "MSG_SIZE_TOO_LARGE" in letter.reason


def test_oversized_event_settled_while_the_rest_waits_for_the_broker(
    make_server: Callable[..., RunningServer], kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    destination = kafka(
        "stream",
        kafka_broker.bootstrap_servers,
        kafka_topic,
        settings={"delivery_timeout_seconds": 1, "producer_config": {"message.max.bytes": 4000}},
        retry=RetrySettings(max_attempts=1000, base_ms=200, max_backoff_ms=500),
    )
    server = make_server(destinations=[destination])
    kafka_broker.stop()
    try:
        batch = [track(i, user=f"u-{i % 2}") for i in range(6)]
        batch[3]["properties"]["blob"] = "x" * 6000
        assert server.post("/v1/batch", {"batch": batch}).status_code == 200
        deadline = time.monotonic() + 30
        while not status_of(server, "stream").get("last_error"):
            assert time.monotonic() < deadline, status_of(server, "stream")
            time.sleep(0.2)
    finally:
        kafka_broker.start()
    records = kafka_broker.consume(kafka_topic, 5, timeout=60)
    assert sorted(r.value["messageId"] for r in records) == ["m-0", "m-1", "m-2", "m-4", "m-5"]
    counters = settle_deliveries(server, timeout=60)["stream"]["counters"]
    assert counters["delivered"] == 5 and counters["dead_lettered"] == 1
    assert counters["retried"] >= 1 and reconciled(counters) == 0


def test_check_reports_topic_and_broker(
    kafka_broker: KafkaBroker, kafka_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_destination, "CHECK_TIMEOUT_S", 3.0)
    good = build(kafka("stream", kafka_broker.bootstrap_servers, kafka_topic))
    try:
        good.check()
    finally:
        good.close()
    missing = build(kafka("stream", kafka_broker.bootstrap_servers, "no-such-topic"))
    try:
        with pytest.raises(ConfigurationError, match=r"settings\.topic: 'no-such-topic'"):
            missing.check()
    finally:
        missing.close()
    nobody = build(kafka("stream", f"127.0.0.1:{free_port()}", kafka_topic))
    try:
        with pytest.raises(ConfigurationError, match=r"settings\.bootstrap_servers"):
            nobody.check()
    finally:
        nobody.close()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"topic": "t"}, "bootstrap_servers"),
        ({"bootstrap_servers": "127.0.0.1:1", "topic": "bad topic"}, "settings.topic"),
        ({"bootstrap_servers": "", "topic": "t"}, "settings.bootstrap_servers"),
        (
            {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "compression": "brotli"},
            "settings.compression",
        ),
        (
            {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "producer_config": {"acks": 1}},
            "acks cannot be set",
        ),
        (
            {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "producer_config": {"nope": 1}},
            "settings.producer_config",
        ),
    ],
)
def test_invalid_settings_name_the_setting(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        build(DestinationConfig(name="stream", kind="kafka", settings=settings))


def test_key_and_error_classes() -> None:
    assert kafka_destination.record_key({"userId": 42, "anonymousId": "a"}) == b"42"
    assert kafka_destination.record_key({"userId": "", "anonymousId": "a"}) == b"a"
    assert kafka_destination.record_key({}) is None
    classify = kafka_destination.classify
    assert classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)) == "reject"
    assert classify(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)) == "permanent"
    assert classify(KafkaError(KafkaError._MSG_TIMED_OUT)) == "retryable"
    assert classify(KafkaError(KafkaError._ALL_BROKERS_DOWN)) == "retryable"
    assert classify(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)) == "retryable"
