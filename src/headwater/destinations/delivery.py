"""One delivery loop per destination, each on its own thread and cursor.

A destination that fails or slows down holds back only itself: its cursor
stops while it retries, and every other destination goes on.  Within one
destination events are sent in log order, so each user's events arrive in
order; a batch that keeps failing is retried with exponential backoff and
jitter (honouring ``Retry-After``) until its attempts or its time window run
out, then it goes to the dead-letter store with the reason and the last
response, and the cursor moves on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from headwater.destinations.base import Destination, Outcome
from headwater.destinations.routing import Router
from headwater.destinations.state import DeadLetter, DeliveryState
from headwater.log.base import ProcessedConsumer
from headwater.log.processed import ProcessedLog, SQLiteProcessedConsumer
from headwater.spec.timestamps import parse_ms

if TYPE_CHECKING:
    from headwater.state.base import DeliveryStateStore

log = logging.getLogger("headwater.delivery")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def latency_bucket(seconds: float) -> str:
    for bound in LATENCY_BUCKETS_S:
        if seconds <= bound:
            return f"latency_le_{bound:g}s"
    return "latency_le_inf"


class Throttle:
    """A token bucket: at most ``rate`` events per second (0 means no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._last = clock()

    def wait_time(self, events: int) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(max(self.rate, events), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= events
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class DeliveryWorker:
    """Delivers one destination's events from its own cursor on the processed log."""

    def __init__(
        self,
        destination: Destination,
        stop: threading.Event,
        consumer: ProcessedConsumer,
        state: DeliveryStateStore,
    ) -> None:
        self.destination = destination
        self.config = destination.config
        self.name = destination.config.name
        self.router = Router(self.config, destination.is_warehouse)
        self.stop = stop
        self.consumer = consumer
        self.state = state
        self.throttle = Throttle(self.config.max_events_per_second)
        self.last_error = ""
        self._filtered: dict[str, deque[dict[str, Any]]] = {}
        self._thread = threading.Thread(target=self.run, name=f"deliver-{self.name}", daemon=True)

    @classmethod
    def embedded(
        cls,
        data_dir: Path,
        destination: Destination,
        stop: threading.Event,
        state: DeliveryStateStore | None = None,
    ) -> DeliveryWorker:
        """A worker on the SQLite processed log; a new destination starts at its end.

        Its cursor is kept in ``state`` (by default the SQLite one beside the log).
        """
        if state is None:
            state = DeliveryState(data_dir)
        processed = ProcessedLog(data_dir)
        try:
            state.start_at(destination.config.name, processed.end_offset())
        finally:
            processed.close()
        consumer = SQLiteProcessedConsumer(data_dir, state.committed(destination.config.name))
        return cls(destination, stop, consumer, state)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def filtered_samples(self) -> dict[str, list[dict[str, Any]]]:
        """Up to ten recent events per filter reason (kept in memory only)."""
        return {reason: list(events) for reason, events in self._filtered.items()}

    def pending(self) -> int:
        return self.consumer.pending()

    def run(self) -> None:
        batch = self.config.batch
        try:
            while not self.stop.is_set():
                records = self.consumer.read(batch.max_events)
                if not records:
                    self.stop.wait(0.02)
                    continue
                waiting = sum(r.count for r in records)
                age = now_ms() - records[0].received_ms
                if waiting < batch.max_events and age < batch.max_age_ms:
                    self.stop.wait(min(0.02, (batch.max_age_ms - age) / 1000))
                    continue
                items = [item for r in records for item in _decode(r.payload)]
                try:
                    done = self.process(items, records[-1].offset)
                except Exception:
                    log.exception("destination %s: delivery loop error; retrying", self.name)
                    self.stop.wait(1.0)
                    continue
                if done:
                    self.consumer.advance(records)
        finally:
            self.destination.close()
            self.consumer.close()
            self.state.close()

    def process(self, items: list[dict[str, Any]], offset: int | None) -> bool:
        """Route and deliver items, then commit; False if stopped before the end."""
        counters: Counter[str] = Counter(accepted=len(items))
        dead: list[DeadLetter] = []
        chunk: list[dict[str, Any]] = []
        chunk_bytes = 0
        limits = self.config.batch
        sendable: list[list[dict[str, Any]]] = []
        for item in items:
            event, reason = self.router.route(item)
            if event is None:
                counters[f"filtered:{reason}"] += 1
                counters["filtered"] += 1
                self._filtered.setdefault(reason, deque(maxlen=10)).append(item["event"])
                continue
            size = len(_encode(event))
            if chunk and (len(chunk) >= limits.max_events or chunk_bytes + size > limits.max_bytes):
                sendable.append(chunk)
                chunk, chunk_bytes = [], 0
            chunk.append(event)
            chunk_bytes += size
        if chunk:
            sendable.append(chunk)
        for events in sendable:
            if not self.send(events, counters, dead):
                return False
        self.state.commit(self.name, offset, dict(counters), dead)
        return True

    def send(
        self, events: list[dict[str, Any]], counters: Counter[str], dead: list[DeadLetter]
    ) -> bool:
        """Deliver one batch, retrying as the policy says; False if stopped."""
        retry = self.config.retry
        first = now_ms()
        attempt = 0
        while True:
            attempt += 1
            delay = self.throttle.wait_time(len(events))
            if delay and self.stop.wait(delay):
                return False
            try:
                outcome = self.destination.deliver(events)
            except Exception as exc:  # a network error or a bug: retry, then dead-letter
                outcome = Outcome("retryable", 0, f"{type(exc).__name__}: {exc}")
            if outcome.kind == "delivered":
                self._delivered(events, outcome, counters, dead, attempt, first)
                return True
            if outcome.completed or outcome.rejected:
                # Leading events went through; rejected ones never will: settle both
                # now, and retry only what is left.
                done = outcome.completed
                early = {i: r for i, r in outcome.rejected.items() if i < done}
                self._delivered(
                    events[:done], Outcome.delivered(rejected=early), counters, dead, attempt, first
                )
                remaining = []
                for index, event in enumerate(events[done:], start=done):
                    if index in outcome.rejected:
                        reason = f"rejected: {outcome.rejected[index]}"
                        dead.append(self._dead(event, reason, attempt, outcome, first))
                        counters["dead_lettered"] += 1
                    else:
                        remaining.append(event)
                events = remaining
                if not events:
                    return True
            counters["failed"] += 1
            self.last_error = f"{outcome.status} {outcome.message[:200]}"
            elapsed_s = (now_ms() - first) / 1000
            if outcome.kind == "permanent":
                reason = f"permanent failure (status {outcome.status})"
            elif attempt >= retry.max_attempts:
                reason = f"retries exhausted after {attempt} attempts"
            elif elapsed_s >= retry.window_seconds:
                reason = f"retry window of {retry.window_seconds} s passed"
            else:
                counters["retried"] += 1
                backoff = min(retry.max_backoff_ms, retry.base_ms * 2 ** (attempt - 1)) / 1000
                backoff *= random.uniform(0.8, 1.2)
                if outcome.retry_after_s is not None:
                    backoff = max(backoff, outcome.retry_after_s)
                backoff = min(backoff, max(0.0, retry.window_seconds - elapsed_s))
                log.warning(
                    "destination %s: attempt %d failed (%s); retrying in %.1f s",
                    self.name,
                    attempt,
                    self.last_error,
                    backoff,
                )
                if self.stop.wait(backoff):
                    return False
                continue
            for event in events:
                dead.append(self._dead(event, reason, attempt, outcome, first))
            counters["dead_lettered"] += len(events)
            return True

    def _delivered(
        self,
        events: list[dict[str, Any]],
        outcome: Outcome,
        counters: Counter[str],
        dead: list[DeadLetter],
        attempt: int,
        first: int,
    ) -> None:
        done = now_ms()
        for index, event in enumerate(events):
            if index in outcome.rejected:
                dead.append(
                    self._dead(
                        event, f"rejected: {outcome.rejected[index]}", attempt, outcome, first
                    )
                )
                counters["dead_lettered"] += 1
                continue
            counters["delivered"] += 1
            received = parse_ms(str(event.get("receivedAt", ""))) or done
            counters[latency_bucket((done - received) / 1000)] += 1

    def _dead(
        self, event: dict[str, Any], reason: str, attempts: int, outcome: Outcome, first: int
    ) -> DeadLetter:
        received = parse_ms(str(event.get("receivedAt", ""))) or 0
        return DeadLetter(
            self.name,
            str(event.get("messageId", "")),
            received,
            _encode(event),
            reason,
            attempts,
            outcome.status,
            outcome.message[:2000],
            first,
            now_ms(),
        )
