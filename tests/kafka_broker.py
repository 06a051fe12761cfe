"""A real Apache Kafka broker (one KRaft node) for the tests that need one.

``ci/kafka/broker.py`` fetches the broker from Maven Central (cached in
``.cache/kafka``) and starts it on free loopback ports; this module starts it
once per test session and stops it by its PID at the end.  Tests that need it
are skipped only when ``java`` or (before the first fetch) ``mvn`` is missing,
and never in CI (``CI=true``), where that is an error.

Use it with ``pytest_plugins = ["kafka_broker"]`` in a test module, then ask
for the ``kafka_broker`` or ``kafka_topic`` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
BROKER_SCRIPT = ROOT / "ci" / "kafka" / "broker.py"


def missing_tools() -> str | None:
    """Why a broker cannot be started here, or None."""
    if shutil.which("java") is None:
        return "java is not installed: the Kafka tests need Java 17+ (see docs/kafka.md)"
    fetched = any((ROOT / ".cache" / "kafka").glob("*/complete"))
    if not fetched and shutil.which("mvn") is None:
        return "mvn is not installed: it fetches the Kafka broker (see docs/kafka.md)"
    return None


class KafkaBroker:
    """One broker process, started and stopped through ci/kafka/broker.py."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bootstrap_servers = ""
        self.info: dict[str, Any] = {}

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(BROKER_SCRIPT), *args, str(self.directory)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        # The first start may fetch the jars: allow for a slow download.
        result = self._run("start", "--json", timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"Kafka broker did not start:\n{result.stderr}")
        self.info = json.loads(result.stdout)
        self.bootstrap_servers = str(self.info["bootstrap_servers"])

    def stop(self) -> None:
        result = self._run("stop", timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"Kafka broker did not stop:\n{result.stderr}")

    def running(self) -> bool:
        return self._run("status", timeout=30).returncode == 0

    def log_tail(self, lines: int = 60) -> str:
        path = self.directory / "broker.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    def create_topic(
        self, name: str, partitions: int = 3, config: dict[str, str] | None = None
    ) -> str:
        admin = self.admin()
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
        )
        futures[name].result(timeout=30)
        return name

    def consume(self, topic: str, count: int, timeout: float = 30.0) -> list[Record]:
        """Every record of ``topic`` from the start, until ``count`` or the timeout."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": f"test-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        try:
            metadata = consumer.list_topics(topic, timeout=10)
            partitions = sorted(metadata.topics[topic].partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            records: list[Record] = []
            deadline = time.monotonic() + timeout
            while len(records) < count and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise RuntimeError(f"consumer error: {error}")
                    continue
                records.append(
                    Record(
                        int(message.partition() or 0),
                        int(message.offset() or 0),
                        message.key(),
                        message.value(),
                    )
                )
            return records
        finally:
            consumer.close()


class Record:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.partition = partition
        self.offset = offset
        self.key = key.decode() if key is not None else None
        self.value: dict[str, Any] = json.loads(value) if value is not None else {}

    def __repr__(self) -> str:
        return (
            f"Record(p{self.partition}@{self.offset} key={self.key} {self.value.get('messageId')})"
        )


@pytest.fixture(scope="session")
def _kafka_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    reason = missing_tools()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the Kafka tests")
    if reason:
        pytest.skip(reason)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker(_kafka_session: KafkaBroker) -> KafkaBroker:
    """The session's broker, started again if a test before this one stopped it."""
    if not _kafka_session.running():
        _kafka_session.start()
    return _kafka_session


@pytest.fixture
def kafka_topic(kafka_broker: KafkaBroker) -> str:
    """A new topic with three partitions."""
    return kafka_broker.create_topic(f"events-{uuid.uuid4().hex[:8]}")
