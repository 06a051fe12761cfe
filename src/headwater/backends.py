"""Choosing the log and the store from the settings.

The gateway, the pipeline and the delivery loops speak to the interfaces in
``headwater.log.base`` and ``headwater.store.base``; this module is the one
place that knows which implementation a deployment uses.  The embedded
default is SQLite for the log and DuckDB for the store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from headwater import config
from headwater.destinations.base import Destination
from headwater.destinations.delivery import DeliveryWorker
from headwater.log.base import EventLogWriter, ProcessedWriter, RawConsumer
from headwater.log.processed import ProcessedLog
from headwater.log.sqlite import SQLiteLogWriter, SQLiteRawConsumer, log_path
from headwater.pipeline.runner import CONSUMER
from headwater.store.base import EventStore
from headwater.store.duckdb import DuckDBStore, store_path


def log_writer_factory(settings: config.Settings, data_dir: Path) -> Callable[[], EventLogWriter]:
    """How each gateway worker opens its log writer (in its own thread)."""
    path = log_path(data_dir)
    return lambda: SQLiteLogWriter(path)


def open_store(settings: config.Settings, data_dir: Path, read_only: bool = False) -> EventStore:
    return DuckDBStore(store_path(data_dir), read_only=read_only)


def open_raw_consumer(settings: config.Settings, data_dir: Path, store: EventStore) -> RawConsumer:
    """The pipeline's consumer, resuming where the store's last write left off."""
    return SQLiteRawConsumer(log_path(data_dir), store.committed(CONSUMER), CONSUMER)


def open_processed_writer(settings: config.Settings, data_dir: Path) -> ProcessedWriter:
    return ProcessedLog(data_dir)


def delivery_worker(
    settings: config.Settings, data_dir: Path, destination: Destination, stop: threading.Event
) -> DeliveryWorker:
    return DeliveryWorker.embedded(data_dir, destination, stop)
