"""The event log: ordered, durable, replayable; consumers keep their own offsets.

A record is what one request carried: the messages of one source, already
checked and stamped by the gateway.  Appends are durable when ``append``
returns.  Within the log, records are totally ordered by offset, so the
messages of one user are always read in the order they were accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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


class EventLogReader(Protocol):
    def read(self, after: int, max_records: int, max_events: int) -> list[Record]:
        """Records with offset greater than ``after``, oldest first."""

    def end_offset(self) -> int:
        """The offset of the newest record, or 0 when the log is empty."""

    def committed(self, consumer: str) -> int: ...

    def commit(self, consumer: str, offset: int) -> None: ...

    def consumers(self) -> dict[str, int]: ...

    def prune(self, older_than_ms: int) -> int:
        """Drop records every consumer has passed and older than the given time."""

    def close(self) -> None: ...
