"""Kafka destination: each event as one JSON record on a topic.

The record key is the event's ``userId`` (or its ``anonymousId`` when there
is none), so every event of one user lands on one partition and keeps its
order there; the value is the event as JSON.  Partitions are chosen with
murmur2, as the Java client does, so other producers keyed the same way agree.

The producer is idempotent with ``acks=all``: retries inside the client never
duplicate or reorder records.  ``deliver`` waits for every record's delivery
report, at most ``delivery_timeout_seconds`` (the client's
``message.timeout.ms``) plus a margin, and maps the errors:

* a record larger than the topic or the client allows, or one the broker
  refuses as invalid, fails alone and permanently (``Outcome.rejected``);
* authorization, authentication and unsupported-feature errors fail the batch
  permanently: only a change of settings helps;
* anything else (brokers down, leader changes, timeouts, a topic that does not
  exist yet) is retryable, and the delivery loop backs off and sends again.

A batch that fails part-way reports how many leading events went through and
which events were rejected; the rest is sent again, so a record that had
already been written may be written twice (delivery is at least once, as for
every destination).

Settings::

    bootstrap_servers = "kafka-1:9092,kafka-2:9092"   # or a list
    topic = "events"
    compression = "zstd"            # none, gzip, snappy, lz4 or zstd
    delivery_timeout_seconds = 30
    producer_config = { "security.protocol" = "SASL_SSL", ... }   # librdkafka settings

``producer_config`` cannot change what the guarantees above rest on:
``bootstrap.servers``, ``acks``, ``enable.idempotence``, the compression
codec, ``message.timeout.ms`` and transactions are set from the settings.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from headwater.destinations.base import ConfigurationError, DestinationConfig, Outcome

log = logging.getLogger("headwater.destinations.kafka")
_encode = msgspec.json.Encoder().encode

COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
# Settings that the destination owns; producer_config may not override them.
RESERVED = frozenset(
    {
        "bootstrap.servers",
        "metadata.broker.list",
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "compression.type",
        "compression.codec",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "transactional.id",
        "enable.gapless.guarantee",
    }
)
CHECK_TIMEOUT_S = 10.0
TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")

# This record alone is at fault: dead-letter it, deliver the others.
REJECT_EVENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
    }
)
# The settings are at fault: sending again will not help.
PERMANENT = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.UNSUPPORTED_VERSION,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,
        KafkaError._UNSUPPORTED_FEATURE,
    }
)


class KafkaSettings(msgspec.Struct, forbid_unknown_fields=True):
    bootstrap_servers: str | list[str]
    topic: str
    compression: str = "zstd"
    delivery_timeout_seconds: float = 30.0
    producer_config: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)


def classify(error: KafkaError) -> str:
    """``reject`` (this event only), ``permanent`` or ``retryable``."""
    code = error.code()
    if code in REJECT_EVENT:
        return "reject"
    if code in PERMANENT:
        return "permanent"
    return "retryable"


def describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def record_key(event: dict[str, Any]) -> bytes | None:
    for field in ("userId", "anonymousId"):
        value = event.get(field)
        if value is not None and value != "":
            return str(value).encode()
    return None


class Kafka:
    is_warehouse = False

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        where = f"destinations.{config.name}.settings"
        try:
            self.settings = msgspec.convert(config.settings, KafkaSettings)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        settings = self.settings
        servers = settings.bootstrap_servers
        if isinstance(servers, list):
            servers = ",".join(s.strip() for s in servers)
        if not servers.strip():
            raise ConfigurationError(f"{where}.bootstrap_servers: at least one host:port")
        self.bootstrap_servers = servers.strip()
        if not TOPIC_NAME.match(settings.topic) or settings.topic in (".", ".."):
            raise ConfigurationError(
                f"{where}.topic: 1 to 249 letters, digits, '.', '_' or '-' (got {settings.topic!r})"
            )
        if settings.compression not in COMPRESSION:
            raise ConfigurationError(f"{where}.compression: one of {', '.join(COMPRESSION)}")
        if settings.delivery_timeout_seconds <= 0:
            raise ConfigurationError(f"{where}.delivery_timeout_seconds: must be positive")
        reserved = sorted(RESERVED.intersection(settings.producer_config))
        if reserved:
            raise ConfigurationError(
                f"{where}.producer_config: {', '.join(reserved)} cannot be set here"
            )
        self.topic = settings.topic
        self.timeout_s = settings.delivery_timeout_seconds
        self.producer_settings: dict[str, Any] = {
            "client.id": f"headwater-{config.name}",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            **settings.producer_config,
            "bootstrap.servers": self.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": settings.compression,
            "message.timeout.ms": int(self.timeout_s * 1000),
        }
        self.last_error = ""
        self.fatal: KafkaError | None = None
        try:
            self.producer = self._producer()
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigurationError(f"{where}.producer_config: {exc}") from None

    def _producer(self) -> Producer:
        return Producer(self.producer_settings, error_cb=self._on_error, logger=log)

    def _on_error(self, error: KafkaError) -> None:
        # Connection trouble is reported here while the client retries on its own.
        self.last_error = describe(error)
        if error.fatal():
            self.fatal = error
            log.error("destination %s: fatal producer error %s", self.config.name, describe(error))

    def check(self) -> None:
        """Read the cluster's metadata; the topic must exist and have partitions.

        All topics are listed rather than the one, since asking a broker that
        creates topics on demand about a single topic would create it.
        """
        where = f"destinations.{self.config.name}.settings"
        try:
            metadata = self.producer.list_topics(timeout=CHECK_TIMEOUT_S)
        except KafkaException as exc:
            raise ConfigurationError(
                f"{where}.bootstrap_servers: no answer from {self.bootstrap_servers}: {exc}"
            ) from None
        topic = metadata.topics.get(self.topic)
        if topic is None:
            raise ConfigurationError(
                f"{where}.topic: {self.topic!r} does not exist on {self.bootstrap_servers}"
                " (or this client may not see it)"
            )
        if topic.error is not None:
            raise ConfigurationError(f"{where}.topic: {self.topic!r}: {describe(topic.error)}")
        if not topic.partitions:
            raise ConfigurationError(f"{where}.topic: {self.topic!r} has no partitions")

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        if self.fatal is not None:
            self._renew()
        unreported = KafkaError(KafkaError._MSG_TIMED_OUT, "no delivery report")
        results: list[KafkaError | None] = [unreported] * len(events)

        def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(error: KafkaError | None, _: Message) -> None:
                results[index] = error

            return on_delivery

        for index, event in enumerate(events):
            error = self._produce(event, reporter(index))
            if error is not None:
                results[index] = error
        deadline = time.monotonic() + self.timeout_s + 10
        while len(self.producer) and time.monotonic() < deadline:
            self.producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if len(self.producer):
            # Give up on what is still queued; the delivery loop sends it again.
            self.producer.purge()
            self.producer.flush(5)
        return self._outcome(results)

    def _produce(
        self, event: dict[str, Any], on_delivery: Callable[[KafkaError | None, Message], None]
    ) -> KafkaError | None:
        """Queue one record; the error if the client refuses it at once."""
        value = _encode(event)
        key = record_key(event)
        for _ in range(100):  # a full local queue drains as the broker acknowledges
            try:
                self.producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery)
                return None
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                if exc.args and isinstance(exc.args[0], KafkaError):
                    return exc.args[0]
                return KafkaError(KafkaError._FAIL, str(exc))
        return KafkaError(KafkaError._QUEUE_FULL, "the producer's queue stayed full")

    def _outcome(self, results: list[KafkaError | None]) -> Outcome:
        rejected: dict[int, str] = {}
        failures: list[tuple[int, KafkaError]] = []
        for index, error in enumerate(results):
            if error is None:
                continue
            if classify(error) == "reject":
                rejected[index] = describe(error)
            else:
                failures.append((index, error))
        if not failures:
            self.last_error = ""
            return Outcome.delivered(rejected=rejected)
        # Events before the first failure are delivered (or rejected); rejected events
        # anywhere are settled now, and the loop sends the rest again.
        index, error = failures[0]
        message = f"{len(failures)} of {len(results)} events not delivered: {describe(error)}"
        if self.last_error and self.last_error not in message:
            message += f" (last client error: {self.last_error})"
        if error.fatal() or self.fatal is not None:
            self._renew()
        return Outcome(classify(error), 0, message, rejected=rejected, completed=index)

    def _renew(self) -> None:
        """A fatal error ends an idempotent producer; carry on with a new one."""
        log.warning("destination %s: starting a new producer", self.config.name)
        old = self.producer
        self.fatal = None
        old.purge()
        old.flush(1)
        self.producer = self._producer()

    def close(self) -> None:
        self.producer.flush(5)
        close = getattr(self.producer, "close", None)  # older releases have none
        if close is not None:
            close()
