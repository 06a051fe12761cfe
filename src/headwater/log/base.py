"""The event log: ordered, durable, replayable; consumers keep their own offsets.

A record is what one request carried: the messages of one source, already
checked and stamped by the gateway.  Appends are durable when ``append``
returns.  Within the log, records are totally ordered by offset, so the
messages of one user are always read in the order they were accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """One record to append: a request's messages, encoded as a JSON array."""

    source: str
    received_ms: int
    count: int
    payload: bytes
    user_agent: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    source: str
    received_ms: int
    count: int
    payload: bytes
    user_agent: str
    partition: int = 0


class LogFull(Exception):
    """The log cannot take more data (disk full or store unavailable)."""


class EventLogWriter(Protocol):
    def append(self, entries: Sequence[Entry]) -> None:
        """Append and make durable, all or nothing; raise ``LogFull`` on failure."""

    def probe(self) -> None:
        """Check, by one small durable write, that appends can succeed again.

        Called about once a second while appends are failing and nothing is
        waiting; may block like ``append``; raises ``LogFull`` while the log
        still cannot take data.
        """

    def close(self) -> None: ...


class RawConsumer(Protocol):
    """The pipeline's view of the log: poll, and commit once the batch is stored.

    ``poll`` returns records after the last commit; polling again without a
    commit returns the same records (after a failed store write, say).
    """

    def poll(self, max_events: int) -> list[Record]: ...

    def commit(self, records: list[Record]) -> None: ...

    def lag(self) -> dict[str, int]:
        """``log_end_offset``, ``store_offset``, ``lag_records``, ``lag_events``."""

    def prune(self, older_than_ms: int) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProcessedRecord:
    """Events after the pipeline, as destinations read them."""

    offset: int
    received_ms: int
    count: int
    payload: bytes
    partition: int = 0


class ProcessedWriter(Protocol):
    def append(self, batches: Sequence[tuple[Record, list[dict[str, Any]]]]) -> None:
        """Publish each raw record's processed events, at least once, in order per user."""

    def prune(self, older_than_ms: int) -> int: ...

    def close(self) -> None: ...


class ProcessedConsumer(Protocol):
    """One destination's cursor on the processed events."""

    def read(self, max_events: int) -> list[ProcessedRecord]:
        """Records after the last commit; the same again until committed."""

    def pending(self) -> int: ...

    def advance(self, records: list[ProcessedRecord]) -> None:
        """Move past records whose outcome the delivery state has committed."""

    def close(self) -> None: ...
