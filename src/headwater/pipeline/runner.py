"""The pipeline: consume the log in batches, de-duplicate, time, enrich, store.

Offsets advance only with the store write that covers them (one transaction),
so after a crash the pipeline resumes exactly where the store left off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from headwater.config import Settings
from headwater.log.base import ProcessedWriter, RawConsumer, Record
from headwater.pipeline import enrich
from headwater.pipeline.dedup import DedupWindow
from headwater.spec.timestamps import format_ms, parse_ms, resolve
from headwater.store.base import EVENT_COLUMNS, EventStore

log = logging.getLogger("headwater.pipeline")

CONSUMER = "store"
# Failed batches in a row before records are processed one at a time.
ISOLATE_AFTER = 3
HOUR_MS = 3_600_000
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
COLUMN_FIELDS = frozenset(
    {
        "type",
        "messageId",
        "event",
        "name",
        "userId",
        "anonymousId",
        "groupId",
        "previousId",
        "timestamp",
        "originalTimestamp",
        "sentAt",
        "receivedAt",
        "properties",
        "traits",
        "context",
        "integrations",
    }
)


def _json(value: Any) -> str | None:
    return None if value is None else _encode(value).decode()


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Tail:
    """The most recent stored events, for ``headwater tail``; memory is capped."""

    def __init__(self, size: int = 1000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()

    def extend(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            for event in events:
                self._seq += 1
                event["seq"] = self._seq
                self._events.append(event)

    def after(self, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._events if e["seq"] > seq][:limit]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        consumer: RawConsumer,
        store: EventStore,
        processed: ProcessedWriter,
        tail: Tail | None = None,
        quarantine: Callable[[Record, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.quarantine = quarantine
        self.failures = 0
        self.last_error = ""
        self.consumer = consumer
        self.store = store
        self.processed = processed
        self.tail = tail or Tail()
        self.dedup = DedupWindow(settings.pipeline.dedup_window_hours * HOUR_MS)
        if not store.exact_known:
            # A store that answers known() exactly (shared by nodes) needs no
            # window in memory; the embedded one relies on it.
            self.dedup.load(store.recent_keys(_now_ms() - self.dedup.window_ms))
        self.future_ms = settings.limits.future_tolerance_seconds * 1000

    def step(self, max_events: int | None = None) -> int:
        """Process one batch of log records; return how many messages were read."""
        records = self.consumer.poll(max_events or self.settings.pipeline.batch_max_events)
        if not records:
            return 0
        decoded = [(record, _decode(record.payload)) for record in records]
        # Another pipeline (scale-out) may have stored some of these already.
        stored = self.store.known(
            [(r.source, m["messageId"]) for r, messages in decoded for m in messages]
        )
        columns: dict[str, list[Any]] = {name: [] for name, _ in EVENT_COLUMNS}
        fresh: dict[str, int] = {}
        read = duplicates = 0
        tail: list[dict[str, Any]] = []
        outgoing: list[tuple[Record, list[dict[str, Any]]]] = []
        for record, messages in decoded:
            items: list[dict[str, Any]] = []
            for message in messages:
                read += 1
                key = DedupWindow.key(record.source, message["messageId"])
                if key in self.dedup or key in fresh or key in stored:
                    duplicates += 1
                    continue
                fresh[key] = record.received_ms
                item = self._row(columns, record, message)
                items.append(item)
                if len(tail) < 200:
                    tail.append(item)
            outgoing.append((record, items))
        stored_at = _now_ms()
        columns["stored_at"] = [stored_at] * len(columns["message_id"])
        counters = {"received": read, "stored": len(fresh), "duplicates": duplicates}
        for record in records:
            bucket = freshness_bucket((stored_at - record.received_ms) / 1000)
            counters[bucket] = counters.get(bucket, 0) + record.count
        # Destinations first: if the store write is lost to a crash, the batch is
        # replayed; the embedded processed log ignores records it already has.
        self.processed.append(outgoing)
        self.store.write(columns, CONSUMER, records[-1].offset, counters)
        if not self.store.exact_known:
            for key, received_ms in fresh.items():
                self.dedup.add(key, received_ms)
        self.consumer.commit(records)
        self.tail.extend(tail)
        return read

    def _row(
        self, columns: dict[str, list[Any]], record: Record, msg: dict[str, Any]
    ) -> dict[str, Any]:
        """Append the message's row to the columns; return it as destinations see it."""
        times = resolve(
            record.received_ms,
            _time(msg.get("timestamp")),
            _time(msg.get("originalTimestamp")),
            _time(msg.get("sentAt")),
            self.future_ms,
        )
        context = msg.get("context")
        traits = msg.get("traits")
        if traits is None and msg["type"] == "identify" and isinstance(context, dict):
            # RudderStack's SDKs send identify traits only as context.traits.
            traits = context.get("traits") if isinstance(context.get("traits"), dict) else None
        user_agent = (context or {}).get("userAgent")
        if not isinstance(user_agent, str):
            user_agent = record.user_agent
        agent = enrich.agent(user_agent)
        is_bot = agent.is_bot and self.settings.pipeline.bot_detection
        extra = {k: v for k, v in msg.items() if k not in COLUMN_FIELDS}
        append = columns.__getitem__
        append("message_id").append(msg["messageId"])
        append("source").append(record.source)
        append("type").append(msg["type"])
        append("event").append(_str(msg.get("event")))
        append("name").append(_str(msg.get("name")))
        append("user_id").append(_str(msg.get("userId")))
        append("anonymous_id").append(_str(msg.get("anonymousId")))
        append("group_id").append(_str(msg.get("groupId")))
        append("previous_id").append(_str(msg.get("previousId")))
        append("timestamp").append(times.timestamp)
        append("original_timestamp").append(times.original)
        append("sent_at").append(times.sent)
        append("received_at").append(times.received)
        append("properties").append(_json(msg.get("properties")))
        append("traits").append(_json(traits))
        append("context").append(_json(context))
        append("integrations").append(_json(msg.get("integrations")))
        append("extra").append(_json(extra) if extra else None)
        append("ip").append(_str((context or {}).get("ip")))
        append("user_agent").append(user_agent or None)
        append("browser").append(agent.browser)
        append("os").append(agent.os)
        append("device").append(agent.device)
        append("is_bot").append(is_bot)
        campaign = enrich.campaign(context)
        append("campaign").append(_json(campaign))
        append("warnings").append(times.warnings or None)
        append("log_offset").append(record.offset)
        event = dict(msg)
        if traits is not None:
            event["traits"] = traits
        event["timestamp"] = format_ms(times.timestamp)
        event["originalTimestamp"] = format_ms(times.original)
        event["sentAt"] = format_ms(times.sent)
        enrichment = {
            "browser": agent.browser,
            "os": agent.os,
            "device": agent.device,
            "campaign": campaign,
        }
        return {
            "source": record.source,
            "bot": is_bot,
            "warnings": times.warnings,
            "enrichment": enrichment,
            "event": event,
        }

    def run(self, stop: threading.Event) -> None:
        """Process batches until stopped; a failing step or prune is retried, never fatal."""
        idle = self.settings.pipeline.idle_poll_ms / 1000
        last_prune = 0.0
        retention_ms = self.settings.log.retention_hours * HOUR_MS
        while not stop.is_set():
            try:
                read = self.step(1 if self.failures >= ISOLATE_AFTER else None)
                self.failures = 0
                now = time.monotonic()
                if now - last_prune > 60:
                    last_prune = now
                    self.dedup.expire(_now_ms())
                    pruned = self.consumer.prune(_now_ms() - retention_ms)
                    pruned += self.processed.prune(_now_ms() - retention_ms)
                    if pruned:
                        log.info("pruned %d log records", pruned)
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("pipeline step failed (%d in a row); retrying", self.failures)
                if self.failures > ISOLATE_AFTER and is_data_error(exc):
                    try:
                        if self._set_aside(self.last_error):
                            self.failures = 0
                            continue
                    except Exception:
                        log.exception("could not set the failing record aside")
                stop.wait(min(5.0, 0.2 * self.failures))
                continue
            if not read:
                stop.wait(idle)

    def _set_aside(self, error: str) -> bool:
        """Move the one record that keeps failing out of the way, keeping it.

        Reached only after the batch failed, then the record failed alone: a
        record the store cannot take must not stop every event behind it.
        """
        if self.quarantine is None:
            return False
        records = self.consumer.poll(1)
        if not records:
            return False
        self.quarantine(records[0], error)
        self.consumer.commit(records[:1])
        self.store.write(
            {name: [] for name, _ in EVENT_COLUMNS},
            CONSUMER,
            records[0].offset,
            {"quarantined": records[0].count},
        )
        log.error("log record %s set aside after repeated failures: %s", records[0].offset, error)
        return True

    def lag(self) -> dict[str, int]:
        return self.consumer.lag()


FRESHNESS_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def freshness_bucket(seconds: float) -> str:
    """The counter name of a freshness histogram bucket (accepted to stored)."""
    for bound in FRESHNESS_BUCKETS_S:
        if seconds <= bound:
            return f"freshness_le_{bound:g}s"
    return "freshness_le_inf"


def is_data_error(exc: BaseException) -> bool:
    """An error caused by a record's content, not by the disk or a server.

    Only these lead to a record being set aside; a full disk or a lost
    connection is waited out, since every record would fail the same way.
    """
    if isinstance(exc, OSError | MemoryError):
        return False
    if isinstance(exc, duckdb.Error):
        return isinstance(
            exc,
            duckdb.ConversionException
            | duckdb.InvalidInputException
            | duckdb.ConstraintException
            | duckdb.OutOfRangeException,
        )
    return isinstance(
        exc,
        TypeError
        | ValueError
        | KeyError
        | IndexError
        | AttributeError
        | pa.ArrowException
        | msgspec.DecodeError,
    )


def _time(value: Any) -> int | None:
    return parse_ms(value) if isinstance(value, str) else None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
