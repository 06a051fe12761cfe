"""What every destination provides, and how failures are classified.

A destination turns a batch of Segment-format events into calls on some
system and reports an ``Outcome``: delivered, retryable (with an optional
``Retry-After``), or permanent.  A permanent failure of single events inside
an otherwise delivered batch is reported per index.  The delivery loop
(``headwater.destinations.delivery``) owns retries, dead letters and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import msgspec


class BatchSettings(msgspec.Struct, forbid_unknown_fields=True):
    max_events: int = 100
    max_bytes: int = 512 * 1024
    max_age_ms: int = 200


class RetrySettings(msgspec.Struct, forbid_unknown_fields=True):
    max_attempts: int = 12
    window_seconds: int = 4 * 3600
    base_ms: int = 500
    max_backoff_ms: int = 300_000


class DestinationConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    kind: str
    enabled: bool = True
    # The key this destination answers to in a message's ``integrations`` object.
    integration_name: str = ""
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    consent_categories: list[str] = msgspec.field(default_factory=list)
    filters: list[dict[str, Any]] = msgspec.field(default_factory=list)
    exclude_bots: bool = False
    batch: BatchSettings = msgspec.field(default_factory=BatchSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    max_events_per_second: float = 0.0


class ConfigurationError(Exception):
    """A destination's settings are invalid; the message names the setting."""


@dataclass(slots=True)
class Outcome:
    """The result of one delivery attempt of a batch."""

    kind: str  # "delivered" | "retryable" | "permanent"
    status: int = 0
    message: str = ""
    retry_after_s: float | None = None
    # Indexes of events that failed permanently although the batch went through.
    rejected: dict[int, str] = field(default_factory=dict)
    # Of a failed batch, how many leading events were delivered before the failure.
    completed: int = 0

    @classmethod
    def delivered(cls, status: int = 200, rejected: dict[int, str] | None = None) -> Outcome:
        return cls("delivered", status, "", None, rejected or {})


class Destination(Protocol):
    config: DestinationConfig
    # Warehouses receive events even when ``integrations.All`` is false.
    is_warehouse: bool

    def check(self) -> None:
        """Test the connection; raise with a clear message when it fails."""

    def deliver(self, events: list[dict[str, Any]]) -> Outcome: ...

    def close(self) -> None: ...


RETRYABLE_4XX = frozenset({408, 423, 425, 429})
PERMANENT_5XX = frozenset({501, 505})


def classify_status(status: int) -> str:
    """Map an HTTP status to delivered, retryable or permanent.

    2xx is delivered.  408, 423, 425, 429 and 5xx (except 501 and 505) are
    retryable; every other status, 3xx included (redirects are not followed),
    is permanent.
    """
    if 200 <= status < 300:
        return "delivered"
    if status in RETRYABLE_4XX:
        return "retryable"
    if status >= 500 and status not in PERMANENT_5XX:
        return "retryable"
    return "permanent"


def retry_after_seconds(value: str | None) -> float | None:
    """Parse ``Retry-After`` given in seconds or as an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def outcome_for_response(status: int, text: str, retry_after: str | None) -> Outcome:
    kind = classify_status(status)
    if kind == "delivered":
        return Outcome.delivered(status)
    return Outcome(kind, status, text[:2000], retry_after_seconds(retry_after))
