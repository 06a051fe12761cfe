"""Shared machinery of the SaaS analytics destinations (Mixpanel, Amplitude).

A destination turns each Segment event into zero or more *operations*: one
record bound for one endpoint (an event for ``/import``, a profile update for
``/engage`` ...).  ``run_plan`` packs operations into requests that respect the
vendor's per-request record and byte limits, sends them, and folds the
answers back onto the events of the batch:

- a record the vendor refuses (per-record error, or a record that alone is too
  large) makes its event ``rejected``, the rest of the batch is delivered;
- a request answered "too large" is halved and each half sent again;
- a request refused as a whole where the vendor gives no per-record detail
  (profile endpoints) is bisected to find the records at fault;
- a retryable or configuration failure stops the plan; ``completed`` then
  counts the leading events whose records were all accepted.  Records of later
  events may already have been accepted: they are sent again on retry, which is
  safe because every record carries an insert id (events) or is an idempotent
  ``$set`` (profiles).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from headwater.destinations.base import ConfigurationError, DestinationConfig, Outcome
from headwater.spec.timestamps import parse_ms

S = TypeVar("S")

_FIELD_AT = re.compile(r"^(?P<msg>.*?) - at `\$\.(?P<path>[^`]+)`$")
_FIELD_NAMED = re.compile(r"field `(?P<name>[^`]+)`")


def parse_settings(config: DestinationConfig, kind: type[S]) -> S:
    """Convert ``config.settings``; errors name ``destinations.NAME.settings.FIELD``."""
    try:
        return msgspec.convert(config.settings, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = f"destinations.{config.name}.settings"
        at = _FIELD_AT.match(text)
        if at:
            raise ConfigurationError(f"{where}.{at['path']}: {at['msg']}") from None
        named = _FIELD_NAMED.search(text)
        if named:
            raise ConfigurationError(f"{where}.{named['name']}: {text}") from None
        raise ConfigurationError(f"{where}: {text}") from None


def setting_error(config: DestinationConfig, name: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"destinations.{config.name}.settings.{name}: {message}")


def base_url(config: DestinationConfig, region: str, override: str, hosts: dict[str, str]) -> str:
    """The vendor host for ``region``; ``override`` (the ``base_url`` setting) replaces it.

    There is no default region: a project lives in exactly one, and sending to
    the wrong one loses the data (see DESTINATIONS.md 1.1), so it must be named.
    """
    if region not in hosts:
        raise setting_error(
            config, "region", f"{region!r} is not one of {', '.join(hosts)} (no default)"
        )
    if not override:
        return hosts[region]
    url = urlsplit(override)
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise setting_error(config, "base_url", "an http(s) URL without query is required")
    return override.rstrip("/")


def event_ms(event: dict[str, Any], now_ms: int) -> int:
    """The event's time in epoch milliseconds: ``timestamp``, else ``receivedAt``."""
    for key in ("timestamp", "receivedAt", "originalTimestamp"):
        value = event.get(key)
        if isinstance(value, str):
            parsed = parse_ms(value)
            if parsed is not None:
                return parsed
    return now_ms


def path(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...`` or None when any step is missing or not an object."""
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def text_id(value: Any) -> str | None:
    """A Segment identifier as a string, None when absent or empty."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


@dataclass(slots=True)
class Op:
    """One record bound for one endpoint, produced by event ``event`` of the batch."""

    endpoint: str
    item: Any
    event: int
    size: int  # bytes on the wire
    raw_size: int = 0  # bytes of the record's JSON, for per-record limits (0: same as size)
    weight: int = 0  # what else a request limits (Amplitude: group properties)


@dataclass(slots=True)
class Limits:
    """Per-request limits of one endpoint."""

    max_items: int
    max_bytes: int
    # Bytes a request adds around its records, and between two records.
    overhead: int = 2
    separator: int = 1
    # Largest single record (JSON bytes); 0: only the request limit applies.
    max_item_bytes: int = 0
    # Largest total weight of one request; 0: no such limit.
    max_weight: int = 0


@dataclass(slots=True)
class Reply:
    """A vendor's answer to one request, as the plan needs it.

    kind: ``ok``; ``partial`` (``rejected`` names positions in the request;
    with ``resend`` the other records were *not* accepted and must be sent
    again; an empty ``rejected`` counts as ``refused``); ``refused`` (every
    record of the request is refused); ``invalid`` (refused as a whole without
    per-record detail: bisect to find the culprits); ``too_large`` (halve);
    ``retryable`` or ``permanent`` (stop; permanent means the configuration,
    not the records, is at fault).
    """

    kind: str
    status: int = 0
    message: str = ""
    retry_after_s: float | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    resend: bool = False


Sender = Callable[[str, list[Any]], Reply]


def _oversized(op: Op, limits: Limits) -> str:
    raw = op.raw_size or op.size
    if limits.max_item_bytes and raw > limits.max_item_bytes:
        return f"record of {raw} bytes exceeds the limit of {limits.max_item_bytes} bytes"
    if op.size + limits.overhead > limits.max_bytes:
        return f"record of {op.size} bytes exceeds the request limit of {limits.max_bytes} bytes"
    if limits.max_weight and op.weight > limits.max_weight:
        return f"record of weight {op.weight} exceeds the request limit of {limits.max_weight}"
    return ""


def _chunks(ops: list[int], every: list[Op], limits: Limits) -> list[list[int]]:
    out: list[list[int]] = []
    chunk: list[int] = []
    size = limits.overhead
    weight = 0
    for index in ops:
        op = every[index]
        add = op.size + (limits.separator if chunk else 0)
        if chunk and (
            len(chunk) >= limits.max_items
            or size + add > limits.max_bytes
            or (limits.max_weight and weight + op.weight > limits.max_weight)
        ):
            out.append(chunk)
            chunk, size, weight = [], limits.overhead, 0
            add = op.size
        chunk.append(index)
        size += add
        weight += op.weight
    if chunk:
        out.append(chunk)
    return out


def run_plan(
    count: int,
    ops: Sequence[Op],
    rejected: dict[int, str],
    limits: dict[str, Limits],
    send: Sender,
) -> Outcome:
    """Send ``ops`` for a batch of ``count`` events; see the module docstring."""
    every = list(ops)
    rejected = dict(rejected)
    for op in every:
        problem = _oversized(op, limits[op.endpoint])
        if problem and op.event not in rejected:
            rejected[op.event] = f"{op.endpoint}: {problem}"
    by_endpoint: dict[str, list[int]] = {}
    for index, op in enumerate(every):
        if op.event not in rejected:
            by_endpoint.setdefault(op.endpoint, []).append(index)
    work: list[list[int]] = []
    for endpoint, indexes in by_endpoint.items():
        work.extend(_chunks(indexes, every, limits[endpoint]))
    # Roughly in event order, so that a failure leaves the longest delivered prefix.
    work.sort(key=lambda chunk: every[chunk[0]].event)
    work.reverse()  # used as a stack
    done: set[int] = set()
    budget = 4 * len(every) + 16  # halving and bisecting need at most ~2 requests per record
    while work:
        chunk = [i for i in work.pop() if every[i].event not in rejected]
        if not chunk:
            continue
        budget -= 1
        endpoint = every[chunk[0]].endpoint
        reply = (
            send(endpoint, [every[i].item for i in chunk])
            if budget >= 0
            else Reply("retryable", 0, "request budget exhausted (the vendor answers in circles)")
        )
        listed = {p: r for p, r in reply.rejected.items() if 0 <= p < len(chunk)}
        if reply.kind == "ok":
            done.update(chunk)
        elif reply.kind == "partial" and listed:
            for position, reason in listed.items():
                rejected.setdefault(every[chunk[position]].event, f"{endpoint}: {reason}")
            rest = [i for p, i in enumerate(chunk) if p not in listed]
            if reply.resend:
                if rest:
                    work.append(rest)
            else:
                done.update(rest)
        elif reply.kind in ("refused", "partial"):
            for i in chunk:
                rejected.setdefault(every[i].event, f"{endpoint}: {reply.message}"[:500])
        elif reply.kind in ("invalid", "too_large"):
            if len(chunk) == 1:
                reason = reply.message or reply.kind
                rejected.setdefault(every[chunk[0]].event, f"{endpoint}: {reason}"[:500])
            else:
                half = len(chunk) // 2
                work.append(chunk[half:])
                work.append(chunk[:half])
        else:
            completed = _completed(count, every, done, rejected)
            return Outcome(
                reply.kind if reply.kind in ("retryable", "permanent") else "permanent",
                reply.status,
                reply.message,
                reply.retry_after_s,
                completed=completed,
            )
    return Outcome.delivered(200, rejected)


def _completed(count: int, every: list[Op], done: set[int], rejected: dict[int, str]) -> int:
    pending = {op.event for i, op in enumerate(every) if i not in done}
    for event in range(count):
        if event in pending or event in rejected:
            return event
    return count
