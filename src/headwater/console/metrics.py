"""Prometheus metrics: a closed, typed list, rendered from headwater's counters.

| name | type | labels |
|---|---|---|
| headwater_events_received_total | counter | |
| headwater_events_stored_total | counter | |
| headwater_events_duplicate_total | counter | |
| headwater_requests_rejected_total | counter | code |
| headwater_log_lag_events | gauge | |
| headwater_freshness_seconds | histogram | |
| headwater_destination_events_total | counter | destination, outcome |
| headwater_destination_filtered_total | counter | destination, reason |
| headwater_destination_attempts_failed_total | counter | destination |
| headwater_destination_retries_total | counter | destination |
| headwater_destination_pending_events | gauge | destination |
| headwater_destination_latency_seconds | histogram | destination |
| headwater_dead_letters | gauge | destination |
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from headwater import backends

if TYPE_CHECKING:
    from headwater.console.server import Console

METRIC_NAMES = (
    "headwater_events_received_total",
    "headwater_events_stored_total",
    "headwater_events_duplicate_total",
    "headwater_requests_rejected_total",
    "headwater_log_lag_events",
    "headwater_freshness_seconds",
    "headwater_destination_events_total",
    "headwater_destination_filtered_total",
    "headwater_destination_attempts_failed_total",
    "headwater_destination_retries_total",
    "headwater_destination_pending_events",
    "headwater_destination_latency_seconds",
    "headwater_dead_letters",
)


def _histogram(counters: dict[str, int], prefix: str) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counters named prefix<bound>s."""
    buckets: list[tuple[float, int]] = []
    for name, value in counters.items():
        if name.startswith(prefix):
            text = name[len(prefix) :].removesuffix("s")
            buckets.append((math.inf if text == "inf" else float(text), value))
    buckets.sort()
    cumulative = 0
    out: list[tuple[str, float]] = []
    for upper, value in buckets:
        cumulative += value
        out.append(("+Inf" if upper == math.inf else f"{upper:g}", float(cumulative)))
    if not out or out[-1][0] != "+Inf":
        out.append(("+Inf", float(cumulative)))
    return out


class _Collector(Collector):
    def __init__(self, console: Console) -> None:
        self.console = console

    def collect(self) -> Iterator[Any]:
        console = self.console
        stored = console.store.counters()
        for name, key, text in (
            ("headwater_events_received", "received", "Messages read from the log."),
            ("headwater_events_stored", "stored", "Events stored after de-duplication."),
            ("headwater_events_duplicate", "duplicates", "Duplicate messages dropped."),
        ):
            yield CounterMetricFamily(name, text, value=stored.get(key, 0))
        rejections = backends.rejection_log(console.settings, console.data_dir)
        try:
            rejected = rejections.counts(0, time.time_ns() // 1_000_000 + 60_000)
        finally:
            rejections.close()
        family = CounterMetricFamily(
            "headwater_requests_rejected", "Requests refused by the gateway.", labels=["code"]
        )
        for code, value in sorted(rejected.items()):
            family.add_metric([code], value)
        yield family
        yield GaugeMetricFamily(
            "headwater_log_lag_events",
            "Events accepted but not yet processed.",
            value=console.pipeline.lag()["lag_events"],
        )
        yield HistogramMetricFamily(
            "headwater_freshness_seconds",
            "Time from acknowledgement to stored.",
            buckets=_histogram(stored, "freshness_le_"),
            sum_value=None,
        )

        state = backends.delivery_state(console.settings, console.data_dir)
        try:
            counters = state.counters()
            dead = {
                w.name: len(state.dead_letters(w.name, limit=1_000_000)) for w in console.workers
            }
        finally:
            state.close()
        events = CounterMetricFamily(
            "headwater_destination_events",
            "Events per destination by outcome.",
            labels=["destination", "outcome"],
        )
        filtered = CounterMetricFamily(
            "headwater_destination_filtered",
            "Events filtered per destination by reason.",
            labels=["destination", "reason"],
        )
        failed = CounterMetricFamily(
            "headwater_destination_attempts_failed",
            "Delivery attempts that failed.",
            labels=["destination"],
        )
        retries = CounterMetricFamily(
            "headwater_destination_retries", "Delivery attempts retried.", labels=["destination"]
        )
        pending = GaugeMetricFamily(
            "headwater_destination_pending_events",
            "Events waiting for the destination.",
            labels=["destination"],
        )
        dead_family = GaugeMetricFamily(
            "headwater_dead_letters", "Dead letters not yet replayed.", labels=["destination"]
        )
        latency = HistogramMetricFamily(
            "headwater_destination_latency_seconds",
            "Time from acknowledgement to delivery.",
            labels=["destination"],
        )
        for worker in console.workers:
            values = counters.get(worker.name, {})
            for outcome in ("accepted", "delivered", "filtered", "dead_lettered"):
                events.add_metric([worker.name, outcome], values.get(outcome, 0))
            for key, value in values.items():
                if key.startswith("filtered:"):
                    filtered.add_metric([worker.name, key.removeprefix("filtered:")], value)
            failed.add_metric([worker.name], values.get("failed", 0))
            retries.add_metric([worker.name], values.get("retried", 0))
            pending.add_metric([worker.name], worker.pending())
            dead_family.add_metric([worker.name], dead.get(worker.name, 0))
            latency.add_metric([worker.name], _histogram(values, "latency_le_"), sum_value=None)
        yield from (events, filtered, failed, retries, pending, dead_family, latency)


def render_metrics(console: Console) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(console))
    return generate_latest(registry).decode()
