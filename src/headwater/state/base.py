"""What the delivery loops, the gateway, the console and the CLI need of the state."""

from __future__ import annotations

from typing import Any, Protocol

from headwater.destinations.state import DeadLetter
from headwater.log.rejections import Rejected


class DeliveryStateStore(Protocol):
    """Cursors, counters (total and per minute) and dead letters of each destination.

    ``commit`` moves a destination's cursor, adds to its counters and records
    its dead letters in one transaction.
    """

    def committed(self, destination: str) -> int: ...

    def start_at(self, destination: str, offset: int) -> None: ...

    def commit(
        self, destination: str, offset: int | None, counters: dict[str, int], dead: list[DeadLetter]
    ) -> None: ...

    def since(self, since_ms: int, until_ms: int) -> dict[str, dict[str, int]]: ...

    def counters(self, destination: str | None = None) -> dict[str, dict[str, int]]: ...

    def dead_letters(
        self,
        destination: str | None = None,
        include_replayed: bool = False,
        limit: int = 100,
        ids: list[int] | None = None,
    ) -> list[DeadLetter]: ...

    def mark_replayed(self, destination: str, ids: list[int], now_ms: int) -> None: ...

    def min_cursor(self) -> int | None: ...

    def close(self) -> None: ...


class RejectionStore(Protocol):
    """Refused requests, a bounded sample of them and their counts per minute and code."""

    def record(self, rejected: list[Rejected]) -> None: ...

    def after(self, last_id: int, limit: int = 200) -> list[dict[str, Any]]: ...

    def latest_id(self) -> int: ...

    def counts(self, since_ms: int, until_ms: int) -> dict[str, int]: ...

    def samples(self, code: str, limit: int = 10) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...
