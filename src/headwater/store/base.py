"""The event store: what queries, the console and the CLI read.

Writes carry the log offset they cover and land atomically with it, so a
crash between the two never stores an event twice or skips one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

# Columns of the ``events`` table, in order, with their SQL types.
EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("message_id", "VARCHAR"),
    ("source", "VARCHAR"),
    ("type", "VARCHAR"),
    ("event", "VARCHAR"),
    ("name", "VARCHAR"),
    ("user_id", "VARCHAR"),
    ("anonymous_id", "VARCHAR"),
    ("group_id", "VARCHAR"),
    ("previous_id", "VARCHAR"),
    ("timestamp", "TIMESTAMPTZ"),
    ("original_timestamp", "TIMESTAMPTZ"),
    ("sent_at", "TIMESTAMPTZ"),
    ("received_at", "TIMESTAMPTZ"),
    ("properties", "JSON"),
    ("traits", "JSON"),
    ("context", "JSON"),
    ("integrations", "JSON"),
    ("extra", "JSON"),
    ("ip", "VARCHAR"),
    ("user_agent", "VARCHAR"),
    ("browser", "VARCHAR"),
    ("os", "VARCHAR"),
    ("device", "VARCHAR"),
    ("is_bot", "BOOLEAN"),
    ("campaign", "JSON"),
    ("warnings", "VARCHAR[]"),
    ("log_offset", "BIGINT"),
    ("stored_at", "TIMESTAMPTZ"),
)


class QueryResult:
    def __init__(self, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.columns = columns
        self.rows = rows


class EventStore(Protocol):
    # Whether known() answers from everything stored (no window needed in memory).
    exact_known: bool

    def committed(self, consumer: str) -> int:
        """The last log offset whose events are stored."""

    def write(
        self, columns: dict[str, list[Any]], consumer: str, offset: int, counters: dict[str, int]
    ) -> None:
        """Store rows and advance the consumer's offset and counters in one transaction.

        Counters are kept in total and per minute (for trends and anomalies).
        """

    def known(self, keys: list[tuple[str, str]]) -> set[str]:
        """Of (source, messageId) pairs, those already stored, as dedup keys.

        A store written by one pipeline alone may answer from nothing: the
        pipeline's own window is exact there.
        """

    def recent_keys(self, since_ms: int) -> Iterator[tuple[str, str, int]]:
        """(source, message_id, received_ms) of events received since the given time."""

    def query(
        self, sql: str, params: list[Any] | None = None, read_only: bool = False
    ) -> QueryResult:
        """Run SQL; ``read_only`` (what operators' ad-hoc queries get) changes nothing."""

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...
