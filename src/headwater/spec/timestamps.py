"""Parsing ISO-8601 times and the timestamp rules of the Tracking API.

Times are handled as integer milliseconds since the Unix epoch, so that absurd
inputs (year 9999 minus a skew) never overflow a datetime.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

MIN_PLAUSIBLE_MS = 0  # 1970-01-01T00:00:00Z
# What readers (Python's datetime, most warehouses) can represent, in UTC.
MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_ms(text: str) -> int | None:
    """Parse an ISO-8601 time with any precision and offset; None if unparseable.

    A time without an offset is taken as UTC.  Times outside years 1 to 9999
    in UTC are unparseable too.
    """
    if not 10 <= len(text) <= 40:
        return None
    candidate = text
    if len(candidate) > 26 and "." in candidate:
        candidate = _FRACTION.sub(r"\1", candidate, count=1)
    try:
        parsed = datetime.fromisoformat(candidate)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        delta = parsed - _EPOCH
    except OverflowError:
        return None
    ms = delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000
    # An offset can carry a time past year 1 or 9999 in UTC; refuse it like year -25.
    return ms if MIN_MS <= ms <= MAX_MS else None


def format_ms(ms: int) -> str:
    """Milliseconds since the epoch as ``YYYY-MM-DDTHH:MM:SS.sssZ``."""
    seconds, millis = divmod(ms, 1000)
    if seconds >= 0:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
    moment = _EPOCH + timedelta(milliseconds=ms)
    # strftime's %Y does not pad years before 1000 on every platform.
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}.{millis:03d}Z"


class EventTimes:
    """The four times of one message, after the skew-correction rules."""

    __slots__ = ("original", "received", "sent", "timestamp", "warnings")

    def __init__(
        self, timestamp: int, original: int, sent: int, received: int, warnings: list[str]
    ) -> None:
        self.timestamp = timestamp
        self.original = original
        self.sent = sent
        self.received = received
        self.warnings = warnings


def resolve(
    received: int,
    timestamp: int | None,
    original_timestamp: int | None,
    sent_at: int | None,
    future_tolerance_ms: int,
) -> EventTimes:
    """Apply ``timestamp = receivedAt - (sentAt - originalTimestamp)``.

    ``originalTimestamp`` is the client's ``timestamp`` if it sent one, else its
    ``originalTimestamp``, else ``receivedAt``; ``sentAt`` defaults to
    ``receivedAt``.  When the correction gives a time before 1970 or later than
    ``receivedAt`` plus the tolerance, the ``sentAt`` is deemed implausible and
    the correction is skipped; a time still later than the tolerance is clamped
    to ``receivedAt``.  Each such decision is recorded as a warning.
    """
    warnings: list[str] = []
    original = timestamp if timestamp is not None else original_timestamp
    if original is None:
        original = received
    sent = sent_at if sent_at is not None else received
    latest = received + future_tolerance_ms
    corrected = received - (sent - original)
    if sent_at is not None and not MIN_PLAUSIBLE_MS <= corrected <= latest:
        warnings.append("implausible_sent_at")
        corrected = original
    if corrected > latest:
        warnings.append("future_timestamp_clamped")
        corrected = received
    elif corrected < MIN_PLAUSIBLE_MS:
        warnings.append("timestamp_before_1970_replaced")
        corrected = received
    return EventTimes(corrected, original, sent, received, warnings)
