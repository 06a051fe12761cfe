"""The scale-out event log: Apache Kafka (or any Kafka-protocol broker) through confluent-kafka.

Topic layout
------------

``<prefix>.raw``
    What the gateways accepted: one Kafka message per event.  The key is the
    message's ``userId``, else its ``anonymousId``; partitions are chosen with
    murmur2 (as the Java client does), so all events of one user land on one
    partition and keep their order there.  The value is a JSON object::

        {"source": "web", "received_ms": 1700000000000, "user_agent": "...",
         "message": {...the normalized message, messageId and receivedAt included...}}

``<prefix>.processed``
    The pipeline's output for destinations: one Kafka message per stored
    event, keyed the same way.  The value is the item as destinations read it
    (``{"source", "bot", "warnings", "enrichment", "event"}``); the header
    ``received_ms`` carries the time the gateway accepted it.

Both topics are created when missing, by the first gateway or pipeline that
opens the log, with ``log.kafka_partitions`` partitions,
``log.kafka_replication_factor`` replicas, ``min.insync.replicas`` of 2 when
there are three replicas or more (else 1) and ``retention.ms`` from
``log.retention_hours``.  Existing topics are used as they are.

Consumer groups
---------------

``<prefix>-pipeline``
    The pipelines share the raw topic's partitions.  A new group starts at the
    beginning of the topic.
``<prefix>-dest-<name>``
    One group per destination on the processed topic.  A new group starts at
    the end (as a new destination does in the embedded log): that start is
    committed before the group is joined, so neither the first assignment nor
    a restart before the first delivery skips anything.

Semantics
---------

* The gateway's writer is an idempotent producer with ``acks=all``: ``append``
  returns only once the broker has acknowledged every message of the group,
  and raises ``LogFull`` (the gateway answers 503) on any failure or after
  ``log.kafka_append_timeout_ms``.  Once an append has failed, the next ones
  first ask the broker for the raw topic's metadata (a second at most) and
  fail at once while no leader answers.  Messages of a failed group may still
  reach the log; the client sends them again and the pipeline drops the
  duplicates by ``messageId``.
* Offsets are committed only by the application (``enable.auto.commit`` is
  off), synchronously, after the work they cover is done.  ``poll`` and
  ``read`` return what was handed out and not yet committed again, first and
  in the same order, so a failed step is retried on the same records.
* A revoked or lost partition's uncommitted records are forgotten, never
  committed: its next owner reads them again from the last commit.  A commit
  that fails puts the consumer back at its last commit.
* Delivery to destinations is at least once: a pipeline that dies between
  publishing a batch and committing it publishes the batch again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from headwater.log.base import Entry, LogFull, ProcessedRecord, Record

log = logging.getLogger("headwater.log.kafka")

_encode = msgspec.json.Encoder().encode
_decode_list = msgspec.json.Decoder(list[msgspec.Raw]).decode

# Settings the log owns; log.kafka_client_config may not override them.
RESERVED = frozenset(
    {
        "bootstrap.servers",
        "metadata.broker.list",
        "group.id",
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "transactional.id",
        "partitioner",
        "isolation.level",
    }
)
METADATA_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 1.0
JOIN_RETRY_TIMEOUT_S = 2.0
PUBLISH_TIMEOUT_S = 60.0
# Errors that pass by themselves: a topic just created, a leader or coordinator moving.
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._WAIT_COORD,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
    }
)
# A commit from outside the group refused because the group has live members.
_GROUP_HAS_MEMBERS = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)


@dataclass(frozen=True)
class KafkaLogSettings:
    """Where the log lives; built from ``log.kafka_*`` in ``headwater.backends``."""

    bootstrap_servers: str
    topic_prefix: str = "headwater"
    partitions: int = 12
    replication_factor: int = 3
    retention_hours: int = 168
    append_timeout_ms: int = 10_000
    client_config: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_topic(self) -> str:
        return f"{self.topic_prefix}.raw"

    @property
    def processed_topic(self) -> str:
        return f"{self.topic_prefix}.processed"

    @property
    def pipeline_group(self) -> str:
        return f"{self.topic_prefix}-pipeline"

    def destination_group(self, destination: str) -> str:
        return f"{self.topic_prefix}-dest-{destination}"

    def client(self, **own: Any) -> dict[str, Any]:
        """librdkafka settings: the user's extras, then what the log depends on."""
        conf: dict[str, Any] = {k: v for k, v in self.client_config.items() if k not in RESERVED}
        conf["bootstrap.servers"] = self.bootstrap_servers
        conf.update(own)
        return conf


def user_key(message: dict[str, Any]) -> bytes | None:
    """The partitioning key: ``userId``, else ``anonymousId``; None when neither."""
    for name in ("userId", "anonymousId"):
        value = message.get(name)
        if value is not None and value != "":
            return str(value).encode()
    return None


class _Ids(msgspec.Struct):
    userId: Any = None
    anonymousId: Any = None


_decode_ids = msgspec.json.Decoder(_Ids).decode


def _raw_key(message: msgspec.Raw) -> bytes | None:
    ids = _decode_ids(message)
    for value in (ids.userId, ids.anonymousId):
        if value is not None and value != "":
            return str(value).encode()
    return None


class _Envelope(msgspec.Struct):
    source: str
    received_ms: int
    message: msgspec.Raw
    user_agent: str = ""


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def ensure_topics(settings: KafkaLogSettings, timeout: float = METADATA_TIMEOUT_S) -> None:
    """Create the raw and processed topics when missing; raise ``KafkaException`` if unreachable.

    A replication factor larger than the cluster raises ``ValueError`` naming the setting.
    """
    admin = AdminClient(settings.client())
    metadata = admin.list_topics(timeout=timeout)
    wanted = [settings.raw_topic, settings.processed_topic]
    missing = [name for name in wanted if name not in metadata.topics]
    if not missing:
        return
    brokers = len(metadata.brokers)
    if settings.replication_factor > brokers:
        raise ValueError(
            f"log.kafka_replication_factor: {settings.replication_factor} replicas asked,"
            f" but the cluster at {settings.bootstrap_servers} has {brokers} broker(s)"
        )
    topic_config = {
        "cleanup.policy": "delete",
        "retention.ms": str(settings.retention_hours * 3_600_000),
        "min.insync.replicas": "2" if settings.replication_factor >= 3 else "1",
    }
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                config=topic_config,
            )
            for name in missing
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info(
                "created topic %s (%d partitions, %d replicas)",
                name,
                settings.partitions,
                settings.replication_factor,
            )
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # another process created it first
            raise


def _ensure_or_warn(settings: KafkaLogSettings) -> None:
    """Create missing topics if the brokers answer; else go on (the clients keep trying)."""
    try:
        ensure_topics(settings)
    except KafkaException as exc:
        log.warning("cannot check the Kafka topics yet: %s", _describe(exc))


def _check_topic(client: Producer | Consumer, topic: str, timeout: float) -> None:
    """Raise ``KafkaException`` unless every partition of the topic has a leader."""
    metadata = client.list_topics(topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise KafkaException(
            info.error if info is not None else KafkaError(KafkaError._UNKNOWN_TOPIC)
        )
    if not info.partitions:
        raise KafkaException(
            KafkaError(KafkaError._UNKNOWN_PARTITION, f"{topic} has no partitions")
        )
    for partition in info.partitions.values():
        if partition.error is not None or partition.leader < 0:
            raise KafkaException(
                KafkaError(KafkaError.LEADER_NOT_AVAILABLE, f"{topic} [{partition.id}]: no leader")
            )


def _producer_config(settings: KafkaLogSettings, client_id: str, timeout_ms: int) -> dict[str, Any]:
    return settings.client(
        **{
            "client.id": settings.client_config.get("client.id", client_id),
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": timeout_ms,
            "partitioner": "murmur2_random",
            "linger.ms": settings.client_config.get("linger.ms", 1),
            "compression.type": settings.client_config.get("compression.type", "lz4"),
        }
    )


class _Acks:
    """Delivery reports of one group of messages."""

    __slots__ = ("acked", "error")

    def __init__(self) -> None:
        self.acked = 0
        self.error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.acked += 1
        elif self.error is None:
            self.error = error


def _produce_all(
    producer: Producer,
    messages: Sequence[tuple[str, bytes, bytes | None, Any]],
    deadline: float,
) -> None:
    """Produce and wait for every acknowledgement; raise ``KafkaException`` otherwise."""
    acks = _Acks()
    produce = producer.produce
    for topic, value, key, headers in messages:
        while True:
            try:
                if headers is None:
                    produce(topic, value, key, on_delivery=acks)
                else:
                    produce(topic, value, key, on_delivery=acks, headers=headers)
                break
            except BufferError:  # the client's queue is full: let it drain
                if time.monotonic() > deadline:
                    raise KafkaException(
                        KafkaError(KafkaError._QUEUE_FULL, "the producer queue stayed full")
                    ) from None
                producer.poll(0.05)
    left = producer.flush(max(0.0, deadline - time.monotonic()))
    if acks.error is not None:
        raise KafkaException(acks.error)
    if left or acks.acked != len(messages):
        raise KafkaException(
            KafkaError(
                KafkaError._TIMED_OUT,
                f"{len(messages) - acks.acked} of {len(messages)} not acknowledged in time",
            )
        )


class KafkaLogWriter:
    """The gateway's writer: one Kafka message per event, acknowledged before ``append`` returns."""

    def __init__(self, settings: KafkaLogSettings) -> None:
        self.settings = settings
        self.topic = settings.raw_topic
        self._timeout_s = settings.append_timeout_ms / 1000
        # A message the brokers have not acknowledged within the timeout fails in
        # the client too: it never outlives the request waiting for it by much.
        self._config = _producer_config(settings, "headwater-gateway", settings.append_timeout_ms)
        self._producer = Producer(self._config)
        self._topics = False  # the topics are known to exist
        self._ready = False  # and every partition of the raw topic had a leader

    def _check(self, timeout: float) -> None:
        try:
            if not self._topics:
                ensure_topics(self.settings, timeout=max(timeout, 2.0))
                self._topics = True
            _check_topic(self._producer, self.topic, timeout)
        except (KafkaException, ValueError) as exc:
            self._ready = False
            raise LogFull(f"Kafka at {self.settings.bootstrap_servers}: {_describe(exc)}") from exc
        self._ready = True

    def append(self, entries: Sequence[Entry]) -> None:
        if not self._ready:
            self._check(CHECK_TIMEOUT_S)
        deadline = time.monotonic() + self._timeout_s + 1.0
        messages: list[tuple[str, bytes, bytes | None, Any]] = []
        topic = self.topic
        try:
            for entry in entries:
                head = b"".join(
                    (
                        b'{"source":',
                        _encode(entry.source),
                        b',"received_ms":',
                        str(entry.received_ms).encode(),
                        b',"user_agent":',
                        _encode(entry.user_agent),
                        b',"message":',
                    )
                )
                for message in _decode_list(entry.payload):
                    messages.append((topic, head + message + b"}", _raw_key(message), None))
        except msgspec.DecodeError as exc:  # never from the gateway: it encodes the payload
            raise LogFull(f"entry payload is not a JSON array of messages: {exc}") from exc
        try:
            _produce_all(self._producer, messages, deadline)
        except KafkaException as exc:
            self._ready = False  # the next append checks the broker first
            if _fatal(exc):  # this producer can send nothing more: start a new one
                self._producer = Producer(self._config)
            raise LogFull(f"Kafka at {self.settings.bootstrap_servers}: {_describe(exc)}") from exc

    def probe(self) -> None:
        """Ask for the raw topic's metadata: every partition must have a leader."""
        self._check(2 * CHECK_TIMEOUT_S)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


def _fatal(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and error.fatal()


def _describe(exc: BaseException) -> str:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return f"{error.name()}: {error.str()}"
    return str(exc)


class _GroupLag:
    """A group's committed offsets against the log end, on its own client handle.

    Called from the console's threads while the consumer is busy in another, so it
    never touches the consumer itself.  While the broker does not answer it
    returns the last figures it had.
    """

    def __init__(self, settings: KafkaLogSettings, group: str, topic: str) -> None:
        self._settings = settings
        self._group = group
        self._topic = topic
        self._lock = threading.Lock()
        self._client: Consumer | None = None
        self._last = (0, 0)

    def measure(self, timeout: float = 2.0) -> tuple[int, int]:
        """(log end, committed) summed over the topic's partitions."""
        with self._lock:
            try:
                if self._client is None:
                    self._client = Consumer(
                        self._settings.client(
                            **{
                                "group.id": self._group,
                                "enable.auto.commit": False,
                                "client.id": "headwater-lag",
                                # The group's own members report connection trouble.
                                "log_level": 2,
                            }
                        )
                    )
                client = self._client
                metadata = client.list_topics(self._topic, timeout=timeout)
                info = metadata.topics.get(self._topic)
                if info is None or info.error is not None:
                    return self._last
                partitions = [TopicPartition(self._topic, p) for p in sorted(info.partitions)]
                end = done = 0
                for tp in client.committed(partitions, timeout=timeout):
                    low, high = client.get_watermark_offsets(tp, timeout=timeout, cached=False)
                    # No commit yet: the group will start at the beginning.
                    position = low if tp.offset < 0 else min(max(tp.offset, low), high)
                    end += high
                    done += position
                self._last = (end, done)
            except KafkaException as exc:
                log.warning("lag of %s on %s: %s", self._group, self._topic, _describe(exc))
            return self._last

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class _GroupReader:
    """A consumer-group member that hands out records until they are committed.

    ``fetch`` returns the records handed out and not committed yet, then new
    ones, up to ``max_events``; ``commit`` commits offsets synchronously and
    forgets what it covers.
    """

    def __init__(
        self,
        settings: KafkaLogSettings,
        topic: str,
        group: str,
        start_at_end: bool,
        max_poll_interval_ms: int = 300_000,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.group = group
        self.start_at_end = start_at_end
        self.pending: list[Any] = []
        self._unknown_topic_logged = False
        self.consumer = Consumer(
            settings.client(
                **{
                    "group.id": group,
                    "client.id": settings.client_config.get("client.id", f"headwater-{group}"),
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # Partitions without a commit: a new pipeline group reads the log
                    # from its start; a destination group commits its start first
                    # (see _fix_start), so this covers only partitions added later.
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",
                    "partition.assignment.strategy": settings.client_config.get(
                        "partition.assignment.strategy", "cooperative-sticky"
                    ),
                    "max.poll.interval.ms": max_poll_interval_ms,
                }
            )
        )
        self.lag = _GroupLag(settings, group, topic)
        self._joined = False
        self._join(METADATA_TIMEOUT_S)

    def _join(self, timeout: float) -> bool:
        """Subscribe, once a destination group's start is fixed; False to try again later."""
        if self._joined:
            return True
        if self.start_at_end and not self._fix_start(timeout):
            return False
        self.consumer.subscribe([self.topic], on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._joined = True
        return True

    def _fix_start(self, timeout: float) -> bool:
        """Commit the log end for every partition the group has never committed.

        Done before joining, so a new destination starts where the processed
        topic ends when it is created, and its first assignment skips nothing.
        Transient errors (a topic just created, a leader moving) are retried
        until the timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                self._commit_start(left)
                return True
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError):
                    if error.code() in _GROUP_HAS_MEMBERS:
                        # Live members fixed the start before joining; only partitions
                        # added since lack a commit, and those start at their beginning.
                        return True
                    transient = error.retriable() or error.code() in _TRANSIENT
                    if transient and time.monotonic() + 0.1 < deadline:
                        time.sleep(0.1)
                        continue
                log.warning("%s: not joining yet: %s", self.group, _describe(exc))
                return False

    def _commit_start(self, timeout: float) -> None:
        metadata = self.consumer.list_topics(self.topic, timeout=timeout)
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            error = info.error if info is not None else None
            raise KafkaException(
                error or KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{self.topic} not ready")
            )
        partitions = [TopicPartition(self.topic, p) for p in sorted(info.partitions)]
        fresh = []
        for tp in self.consumer.committed(partitions, timeout=timeout):
            if tp.offset < 0:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
                fresh.append(TopicPartition(self.topic, tp.partition, high))
        if fresh:
            self.consumer.commit(offsets=fresh, asynchronous=False)
            log.info("%s starts at the end of %s: %s", self.group, self.topic, fresh)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing is committed here: what was not committed is read again by the next owner.
        gone = {tp.partition for tp in partitions}
        self.pending = [r for r in self.pending if r.partition not in gone]

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_revoke(consumer, partitions)

    # -- reading and committing

    def fetch(self, max_events: int) -> list[Message]:
        """New messages (the caller keeps what it hands out in ``pending``)."""
        room = max_events - len(self.pending)
        if room <= 0 or not self._join(JOIN_RETRY_TIMEOUT_S):
            return []
        out: list[Message] = []
        for message in self.consumer.consume(room, timeout=0):
            error = message.error()
            if error is None:
                out.append(message)
                continue
            if error.fatal():
                raise KafkaException(error)
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                if not self._unknown_topic_logged:
                    self._unknown_topic_logged = True
                    log.warning("%s: topic %s does not exist yet", self.group, self.topic)
                continue
            log.warning("%s on %s: %s", self.group, self.topic, error.str())
        return out

    def commit(self, records: Sequence[Any]) -> None:
        if not records:
            return
        upto: dict[int, int] = {}
        for record in records:
            upto[record.partition] = max(upto.get(record.partition, -1), record.offset + 1)
        offsets = [TopicPartition(self.topic, p, o) for p, o in sorted(upto.items())]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException:
            self.rewind()
            raise
        self.pending = [r for r in self.pending if r.offset >= upto.get(r.partition, -1)]

    def rewind(self) -> None:
        """Go back to the first uncommitted record of each partition; forget the rest."""
        first: dict[int, int] = {}
        for record in self.pending:
            first.setdefault(record.partition, record.offset)
        self.pending = []
        for partition, offset in first.items():
            try:
                self.consumer.seek(TopicPartition(self.topic, partition, offset))
            except KafkaException as exc:  # no longer ours: its next owner reads it again
                log.info("%s: no seek on [%d]: %s", self.group, partition, _describe(exc))

    def close(self) -> None:
        self.pending = []
        try:
            self.consumer.close()
        finally:
            self.lag.close()


class KafkaRawConsumer:
    """The pipeline's member of ``<prefix>-pipeline`` on the raw topic."""

    def __init__(self, settings: KafkaLogSettings, group: str | None = None) -> None:
        _ensure_or_warn(settings)
        self._reader = _GroupReader(
            settings, settings.raw_topic, group or settings.pipeline_group, start_at_end=False
        )

    def poll(self, max_events: int) -> list[Record]:
        reader = self._reader
        for message in reader.fetch(max_events):
            try:
                envelope = _decode_envelope(message.value() or b"")
            except msgspec.DecodeError as exc:
                log.error(
                    "%s [%s] offset %s: not a headwater event, skipped: %s",
                    reader.topic,
                    message.partition(),
                    message.offset(),
                    exc,
                )
                continue
            reader.pending.append(
                Record(
                    offset=int(message.offset() or 0),
                    source=envelope.source,
                    received_ms=envelope.received_ms,
                    count=1,
                    payload=b"[" + envelope.message + b"]",
                    user_agent=envelope.user_agent,
                    partition=int(message.partition() or 0),
                )
            )
        return list(reader.pending[:max_events])

    def commit(self, records: list[Record]) -> None:
        self._reader.commit(records)

    def lag(self) -> dict[str, int]:
        end, committed = self._reader.lag.measure()
        lag = max(0, end - committed)
        return {
            "log_end_offset": end,
            "store_offset": committed,
            "lag_records": lag,
            "lag_events": lag,
        }

    def prune(self, older_than_ms: int) -> int:
        return 0  # the topic's retention.ms prunes

    def close(self) -> None:
        self._reader.close()


class KafkaProcessedWriter:
    """The pipeline's publisher: each stored event to the processed topic, keyed by user."""

    def __init__(self, settings: KafkaLogSettings) -> None:
        self.settings = settings
        self.topic = settings.processed_topic
        self._config = _producer_config(
            settings, "headwater-pipeline", int(PUBLISH_TIMEOUT_S * 1000)
        )
        self._producer = Producer(self._config)

    def append(self, batches: Sequence[tuple[Record, list[dict[str, Any]]]]) -> None:
        topic = self.topic
        messages: list[tuple[str, bytes, bytes | None, Any]] = []
        for record, items in batches:
            if not items:
                continue
            headers = [("received_ms", str(record.received_ms).encode())]
            for item in items:
                event = item.get("event")
                key = user_key(event) if isinstance(event, dict) else None
                messages.append((topic, _encode(item), key, headers))
        if not messages:
            return
        try:
            _produce_all(self._producer, messages, time.monotonic() + PUBLISH_TIMEOUT_S + 5.0)
        except KafkaException as exc:
            if _fatal(exc):
                self._producer = Producer(self._config)
            raise

    def prune(self, older_than_ms: int) -> int:
        return 0  # the topic's retention.ms prunes

    def close(self) -> None:
        self._producer.flush(PUBLISH_TIMEOUT_S)


class KafkaProcessedConsumer:
    """One destination's member of ``<prefix>-dest-<name>`` on the processed topic."""

    def __init__(
        self, settings: KafkaLogSettings, destination: str, max_poll_interval_ms: int = 300_000
    ) -> None:
        _ensure_or_warn(settings)
        self._reader = _GroupReader(
            settings,
            settings.processed_topic,
            settings.destination_group(destination),
            start_at_end=True,
            max_poll_interval_ms=max_poll_interval_ms,
        )

    def read(self, max_events: int) -> list[ProcessedRecord]:
        reader = self._reader
        for message in reader.fetch(max_events):
            received_ms = 0
            headers = message.headers()
            if isinstance(headers, list):
                for name, value in headers:
                    if name == "received_ms" and value:
                        received_ms = int(value)
            reader.pending.append(
                ProcessedRecord(
                    offset=int(message.offset() or 0),
                    received_ms=received_ms,
                    count=1,
                    payload=b"[" + (message.value() or b"null") + b"]",
                    partition=int(message.partition() or 0),
                )
            )
        return list(reader.pending[:max_events])

    def pending(self) -> int:
        end, committed = self._reader.lag.measure()
        return max(0, end - committed)

    def advance(self, records: list[ProcessedRecord]) -> None:
        """Commit; on failure the records are read and delivered again (at least once)."""
        try:
            self._reader.commit(records)
        except KafkaException as exc:
            log.warning(
                "%s: commit failed (%s); its records will be read again",
                self._reader.group,
                _describe(exc),
            )

    def close(self) -> None:
        self._reader.close()
