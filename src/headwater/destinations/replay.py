"""Sending events again: dead letters, or a time range from the store.

Replays run outside the delivery loops and do not move any cursor.  A dead
letter that is delivered is marked replayed and moves from the destination's
``dead_lettered`` count to ``delivered``; range replays count as
``replayed`` only (the events were accepted once already).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from headwater.destinations.base import Destination, Outcome
from headwater.destinations.state import DeadLetter
from headwater.spec.timestamps import parse_ms

if TYPE_CHECKING:
    from headwater.state.base import DeliveryStateStore

_decode = msgspec.json.Decoder().decode

Progress = Callable[[int, int], None]

# Store columns holding JSON, and the Segment field each comes from.
_JSON_COLUMNS = {
    "properties": "properties",
    "traits": "traits",
    "context": "context",
    "integrations": "integrations",
}
_TEXT_COLUMNS = {
    "message_id": "messageId",
    "type": "type",
    "event": "event",
    "name": "name",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "group_id": "groupId",
    "previous_id": "previousId",
}
_TIME_COLUMNS = {
    "timestamp": "timestamp",
    "original_timestamp": "originalTimestamp",
    "sent_at": "sentAt",
    "received_at": "receivedAt",
}
STORE_COLUMNS = ", ".join([*_TEXT_COLUMNS, *_TIME_COLUMNS, *_JSON_COLUMNS, "extra"])


def event_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the Segment event a stored row came from (times as ISO strings)."""
    event: dict[str, Any] = {}
    for column, field in _TEXT_COLUMNS.items():
        if row.get(column) is not None:
            event[field] = row[column]
    for column, field in _TIME_COLUMNS.items():
        if row.get(column) is not None:
            event[field] = row[column]
    for column, field in _JSON_COLUMNS.items():
        if row.get(column) is not None:
            event[field] = _decode(row[column])
    if row.get("extra"):
        event.update(_decode(row["extra"]))
    return event


def deliver_once(destination: Destination, events: list[dict[str, Any]]) -> Outcome:
    try:
        return destination.deliver(events)
    except Exception as exc:
        return Outcome("retryable", 0, f"{type(exc).__name__}: {exc}")


def replay_dead_letters(
    state: DeliveryStateStore,
    destination: Destination,
    letters: list[DeadLetter],
    now_ms: int,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Deliver dead letters one batch at a time, marking them in ``state``.

    Return (delivered, still failing).
    """
    delivered = failed = 0
    size = max(1, destination.config.batch.max_events)
    for start in range(0, len(letters), size):
        chunk = letters[start : start + size]
        outcome = deliver_once(destination, [_decode(letter.event) for letter in chunk])
        if outcome.kind == "delivered":
            ok = [letter.id for i, letter in enumerate(chunk) if i not in outcome.rejected]
        else:
            ok = [letter.id for letter in chunk[: outcome.completed]]
        state.mark_replayed(destination.config.name, ok, now_ms)
        delivered += len(ok)
        failed += len(chunk) - len(ok)
        if progress:
            progress(delivered + failed, len(letters))
    return delivered, failed


def replay_events(
    destination: Destination,
    batches: Iterator[list[dict[str, Any]]],
    total: int,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Deliver stored events again; return (delivered, failed)."""
    delivered = failed = 0
    for events in batches:
        outcome = deliver_once(destination, events)
        if outcome.kind == "delivered":
            delivered += len(events) - len(outcome.rejected)
            failed += len(outcome.rejected)
        else:
            delivered += outcome.completed
            failed += len(events) - outcome.completed
        if progress:
            progress(delivered + failed, total)
    return delivered, failed


def time_bounds(since: str | None, until: str | None) -> tuple[int, int]:
    lower = parse_ms(since) if since else 0
    upper = parse_ms(until) if until else 253_402_300_799_000  # 9999-12-31
    if lower is None or upper is None:
        raise ValueError("--since and --until take ISO-8601 times")
    return lower, upper
