"""``headwater serve`` with the log in Kafka (a real broker), the store in DuckDB.

Events sent over HTTP are stored exactly once and reach a destination through
the processed topic; while the broker is down the gateway answers 503 with
``Retry-After`` and never 200; once it is back requests succeed again and
nothing acknowledged is lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from conftest import RunningServer
from receiver import Receiver
from test_delivery import track, webhook

if TYPE_CHECKING:
    from kafka_broker import KafkaBroker

pytest_plugins = ["kafka_broker"]


def kafka_log_env(broker: KafkaBroker, prefix: str) -> dict[str, str]:
    return {
        "HEADWATER_LOG_BACKEND": "kafka",
        "HEADWATER_LOG_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "HEADWATER_LOG_KAFKA_TOPIC_PREFIX": prefix,
        "HEADWATER_LOG_KAFKA_PARTITIONS": "3",
        "HEADWATER_LOG_KAFKA_REPLICATION_FACTOR": "1",
        "HEADWATER_LOG_KAFKA_APPEND_TIMEOUT_MS": "3000",
    }


class Sender:
    """Sends batches of distinct events and remembers which ones were acknowledged."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.acked: list[str] = []
        self.refused: list[str] = []
        self._next = 0
        self.users = [f"user-{i}" for i in range(7)]

    def batch(self, size: int = 20) -> list[dict[str, Any]]:
        start, self._next = self._next, self._next + size
        return [track(i, user=self.users[i % len(self.users)]) for i in range(start, start + size)]

    def send(self, batch: list[dict[str, Any]]) -> httpx.Response:
        response = self.server.post("/v1/batch", {"batch": batch})
        ids = [e["messageId"] for e in batch]
        (self.acked if response.status_code == 200 else self.refused).extend(ids)
        return response


def stored_counts(server: RunningServer, timeout: float = 30.0) -> dict[str, int]:
    server.settle(timeout)
    rows = server.query("SELECT message_id, count(*) AS n FROM events GROUP BY message_id")
    return {row["message_id"]: int(row["n"]) for row in rows}


def test_serve_on_kafka_stores_once_and_refuses_while_the_broker_is_down(
    make_server: Callable[..., RunningServer], kafka_broker: KafkaBroker
) -> None:
    receiver = Receiver()
    prefix = f"serve-{uuid.uuid4().hex[:8]}"
    server = make_server(
        workers=2,
        env=kafka_log_env(kafka_broker, prefix),
        destinations=[webhook("hook", receiver)],
    )
    try:
        sender = Sender(server)
        first = sender.batch()
        assert sender.send(first).status_code == 200
        for _ in range(9):
            response = sender.send(sender.batch())
            assert response.status_code == 200, response.text
        assert server.post("/v1/batch", {"batch": first}).status_code == 200  # sent twice
        assert server.post("/v1/track", track(5, user="user-5")).status_code == 200  # again
        counts = stored_counts(server)
        assert sorted(counts) == sorted(sender.acked)
        assert set(counts.values()) == {1}

        # The raw topic holds one message per event, keyed by user.
        raw = kafka_broker.consume(f"{prefix}.raw", 221, timeout=15)
        assert len(raw) == 221
        assert {r.key for r in raw} == set(sender.users)
        assert {r.value["source"] for r in raw} == {"default"}

        kafka_broker.stop()
        answers: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 25
        while len(answers) < 4 and time.monotonic() < deadline:
            response = sender.send(sender.batch())
            answers.append((response.status_code, response.headers.get("retry-after")))
        assert len(answers) == 4, answers
        assert all(status == 503 and retry for status, retry in answers), answers
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 503

        kafka_broker.start()
        recovery: list[int] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            status = sender.send(sender.batch()).status_code
            recovery.append(status)
            if status == 200:
                break
            time.sleep(0.5)
        assert recovery[-1] == 200, recovery
        assert set(recovery) <= {200, 503}, recovery
        for _ in range(5):
            assert sender.send(sender.batch()).status_code == 200

        counts = stored_counts(server)
        # Nothing acknowledged is lost, nothing is stored twice; refused events may
        # have reached the log all the same (the client sends them again anyway).
        assert not set(sender.acked) - set(counts), sorted(set(sender.acked) - set(counts))
        assert set(counts) <= set(sender.acked) | set(sender.refused)
        assert set(counts.values()) == {1}
        delivered = {e["messageId"] for e in receiver.wait_for(len(counts), timeout=30)}
        assert delivered >= set(sender.acked)
    finally:
        receiver.close()
