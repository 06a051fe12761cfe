"""Choosing the log and the store from the settings.

The gateway, the pipeline and the delivery loops speak to the interfaces in
``headwater.log.base`` and ``headwater.store.base``; this module is the one
place that knows which implementation a deployment uses.  The embedded
default is SQLite for the log and DuckDB for the store; ``log.backend =
"kafka"`` puts the log in Kafka (``headwater.log.kafka``, imported only then).
``store.backend = "postgres"`` puts the store, the delivery state and the
rejection log in one PostgreSQL schema (``headwater.store.postgres``,
``headwater.state.postgres``, imported only then).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from headwater import config
from headwater.destinations.base import Destination
from headwater.destinations.delivery import DeliveryWorker
from headwater.destinations.state import DeliveryState
from headwater.log.base import EventLogWriter, ProcessedWriter, RawConsumer
from headwater.log.processed import ProcessedLog
from headwater.log.rejections import RejectionLog
from headwater.log.sqlite import SQLiteLogWriter, SQLiteRawConsumer, log_path
from headwater.pipeline.runner import CONSUMER
from headwater.state.base import DeliveryStateStore, RejectionStore
from headwater.store.base import EventStore
from headwater.store.duckdb import DuckDBStore, store_path

if TYPE_CHECKING:
    from headwater.log.kafka import KafkaLogSettings


def log_writer_factory(settings: config.Settings, data_dir: Path) -> Callable[[], EventLogWriter]:
    """How each gateway worker opens its log writer (in its own thread)."""
    if settings.log.backend == "kafka":
        from headwater.log.kafka import KafkaLogWriter

        kafka = kafka_settings(settings)
        return lambda: KafkaLogWriter(kafka)
    path = log_path(data_dir)
    return lambda: SQLiteLogWriter(path)


def open_store(settings: config.Settings, data_dir: Path, read_only: bool = False) -> EventStore:
    """The event store; PostgreSQL's schema is migrated on first use in the process."""
    if settings.store.backend == "postgres":
        from headwater.store.postgres import PostgresStore

        return PostgresStore(settings.store.dsn, settings.store.schema)
    return DuckDBStore(store_path(data_dir), read_only=read_only)


def store_missing(settings: config.Settings, data_dir: Path) -> str | None:
    """Why there is no store to read yet (the embedded file is created by serve), or None."""
    if settings.store.backend == "duckdb" and not store_path(data_dir).exists():
        return f"no event store at {store_path(data_dir)}"
    return None


def delivery_state(settings: config.Settings, data_dir: Path) -> DeliveryStateStore:
    """Delivery cursors, counters and dead letters: SQLite beside the log, or PostgreSQL."""
    if settings.store.backend == "postgres":
        from headwater.state.postgres import PostgresDeliveryState

        return PostgresDeliveryState(settings.store.dsn, settings.store.schema)
    return DeliveryState(data_dir)


def rejection_log(settings: config.Settings, data_dir: Path) -> RejectionStore:
    """Refused requests: SQLite beside the log, or PostgreSQL shared by every gateway."""
    if settings.store.backend == "postgres":
        from headwater.state.postgres import PostgresRejectionLog

        return PostgresRejectionLog(settings.store.dsn, settings.store.schema)
    return RejectionLog(data_dir)


def _delivery_min_cursor(settings: config.Settings, data_dir: Path) -> int | None:
    state = delivery_state(settings, data_dir)
    try:
        return state.min_cursor()
    finally:
        state.close()


def open_raw_consumer(settings: config.Settings, data_dir: Path, store: EventStore) -> RawConsumer:
    """The pipeline's consumer, resuming where the store's last write left off.

    With Kafka the position is the ``<prefix>-pipeline`` group's committed offsets.
    """
    if settings.log.backend == "kafka":
        from headwater.log.kafka import KafkaRawConsumer

        try:
            return KafkaRawConsumer(kafka_settings(settings))
        except ValueError as exc:  # the cluster cannot hold the topics as configured
            raise config.ConfigError(str(exc)) from None
    return SQLiteRawConsumer(log_path(data_dir), store.committed(CONSUMER), CONSUMER)


def open_processed_writer(settings: config.Settings, data_dir: Path) -> ProcessedWriter:
    if settings.log.backend == "kafka":
        from headwater.log.kafka import KafkaProcessedWriter

        return KafkaProcessedWriter(kafka_settings(settings))
    if settings.store.backend != "duckdb":
        # Destination cursors live in the store's database: prune only what they passed.
        return ProcessedLog(data_dir, min_cursor=lambda: _delivery_min_cursor(settings, data_dir))
    return ProcessedLog(data_dir)


def delivery_worker(
    settings: config.Settings, data_dir: Path, destination: Destination, stop: threading.Event
) -> DeliveryWorker:
    if settings.log.backend == "kafka":
        from headwater.log.kafka import KafkaProcessedConsumer

        # The cursor is the destination's consumer group; a worker may go without
        # reading for as long as it retries one batch, so the group waits that long.
        window_ms = destination.config.retry.window_seconds * 1000
        consumer = KafkaProcessedConsumer(
            kafka_settings(settings),
            destination.config.name,
            max_poll_interval_ms=min(86_400_000, window_ms + 600_000),
        )
        return DeliveryWorker(destination, stop, consumer, delivery_state(settings, data_dir))
    return DeliveryWorker.embedded(data_dir, destination, stop, delivery_state(settings, data_dir))


def kafka_settings(settings: config.Settings) -> KafkaLogSettings:
    from headwater.log.kafka import KafkaLogSettings

    log = settings.log
    return KafkaLogSettings(
        bootstrap_servers=log.kafka_bootstrap_servers,
        topic_prefix=log.kafka_topic_prefix,
        partitions=log.kafka_partitions,
        replication_factor=log.kafka_replication_factor,
        retention_hours=log.retention_hours,
        append_timeout_ms=log.kafka_append_timeout_ms,
        client_config=dict(log.kafka_client_config),
    )
