"""The success-metrics report: how fresh, complete, correct and private tracking is.

A hierarchy, each metric with its definition, value, target, status and the
trend against the previous period of the same length:

- north star: the share of accepted events that reached every enabled
  destination (or, with none, the store) within the freshness target;
- core metrics: volume, freshness, delivery success, the accepted-versus-landed
  gap, tracked users;
- supporting indicators per stakeholder (product managers, developers,
  analysts, end users);
- risk factors: log lag, retries, dead letters, clock skew, bot share.

Anomalies (per-event volume and rejection rate far from their recent hourly
pattern) are listed with the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec

HOUR_MS = 3_600_000

Query = Callable[[str, list[Any]], list[tuple[Any, ...]]]


class ReportSettings(msgspec.Struct, forbid_unknown_fields=True):
    period_hours: int = 24
    freshness_target_seconds: float = 1.0
    expected_events: list[str] = msgspec.field(default_factory=list)
    # Override any metric's target by its id, e.g. {"delivery_success": 0.995}.
    targets: dict[str, float] = msgspec.field(default_factory=dict)
    alert_webhook: str = ""
    anomaly_z: float = 4.0


@dataclass
class Metric:
    id: str
    name: str
    level: str  # north_star | core | indicator | risk
    stakeholder: str
    definition: str
    unit: str
    value: float | None
    previous: float | None
    target: float | None
    better: str  # "higher" | "lower"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.value is None:
            return "no data"
        if self.target is None:
            return "info"
        good = self.value >= self.target if self.better == "higher" else (self.value <= self.target)
        if good:
            return "ok"
        slack = abs(self.target) * 0.1 or 0.01
        near = (
            self.value >= self.target - slack
            if self.better == "higher"
            else self.value <= self.target + slack
        )
        return "warn" if near else "fail"

    @property
    def trend(self) -> float | None:
        if self.value is None or self.previous is None:
            return None
        return self.value - self.previous

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status
        data["trend"] = self.trend
        return data


DEFAULT_TARGETS: dict[str, float | None] = {
    "north_star": 0.99,
    "volume": None,
    "freshness_p50": 0.5,
    "freshness_p95": 1.0,
    "freshness_p99": 2.0,
    "delivery_success": 0.999,
    "landed_gap": 0,
    "tracked_users": None,
    "expected_events_seen": 1.0,
    "rejection_rate": 0.01,
    "sdk_versions": None,
    "warehouse_freshness_p95": 60.0,
    "duplicate_rate": 0.05,
    "late_arrival_rate": 0.05,
    "consent_withheld": None,
    "log_lag": 10_000,
    "retries": 100,
    "dead_letters": 0,
    "clock_skew_rate": 0.05,
    "bot_share": 0.2,
}


@dataclass
class Inputs:
    """What the report reads: the store, delivery counters, gateway rejections."""

    query: Query
    delivery: Callable[[int, int], dict[str, dict[str, int]]]
    rejections: Callable[[int, int], dict[str, int]]
    destinations: list[tuple[str, bool]]  # (name, is_warehouse) of enabled destinations
    log_lag_events: int
    dead_letters: int


def _quantiles(inputs: Inputs, since: int, until: int) -> tuple[float | None, ...]:
    rows = inputs.query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY s),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY s) FROM"
        " (SELECT (epoch_ms(stored_at) - epoch_ms(received_at)) / 1000.0 AS s FROM events"
        " WHERE received_at >= make_timestamptz(? * 1000)"
        " AND received_at < make_timestamptz(? * 1000)) AS d",
        [since, until],
    )
    return tuple(None if v is None else float(v) for v in rows[0])


def _period_stats(inputs: Inputs, since: int, until: int, target_s: float) -> dict[str, Any]:
    window = (
        "received_at >= make_timestamptz(? * 1000) AND received_at < make_timestamptz(? * 1000)"
    )
    row = inputs.query(
        "SELECT count(*), count(DISTINCT coalesce(user_id, 'anon:' || anonymous_id)),"
        " count(*) FILTER (WHERE is_bot),"
        " count(*) FILTER (WHERE abs(epoch_ms(sent_at) - epoch_ms(received_at)) > 60000),"
        " count(*) FILTER (WHERE epoch_ms(received_at) - epoch_ms(timestamp) > 3600000),"
        " count(*) FILTER (WHERE (epoch_ms(stored_at) - epoch_ms(received_at)) <= ? * 1000)"
        f" FROM events WHERE {window}",
        [target_s, since, until],
    )[0]
    counters: dict[Any, Any] = dict(
        inputs.query(
            "SELECT name, sum(value) FROM counter_minutes"
            " WHERE minute >= make_timestamptz(? * 1000)"
            " AND minute < make_timestamptz(? * 1000) GROUP BY name",
            [since, until],
        )
    )
    return {
        "events": int(row[0]),
        "users": int(row[1]),
        "bots": int(row[2]),
        "skewed": int(row[3]),
        "late": int(row[4]),
        "fresh": int(row[5]),
        "counters": {str(k): int(v) for k, v in counters.items()},
        "delivery": inputs.delivery(since, until),
        "rejections": inputs.rejections(since, until),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _within(counters: dict[str, int], prefix: str, seconds: float) -> int:
    total = 0
    for name, value in counters.items():
        if not name.startswith(prefix):
            continue
        bound = name[len(prefix) :].removesuffix("s")
        if bound != "inf" and float(bound) <= seconds:
            total += value
    return total


def _bucket_quantile(counters: dict[str, int], prefix: str, q: float) -> float | None:
    buckets = sorted(
        (
            float(name[len(prefix) :].removesuffix("s")) if not name.endswith("inf") else math.inf,
            value,
        )
        for name, value in counters.items()
        if name.startswith(prefix)
    )
    total = sum(v for _, v in buckets)
    if not total:
        return None
    seen = 0
    for bound, value in buckets:
        seen += value
        if seen >= q * total:
            return bound
    return math.inf


def _north_star(
    stats: dict[str, Any], inputs: Inputs, target_s: float
) -> tuple[float | None, dict[str, Any]]:
    shares: dict[str, float | None] = {}
    for name, _ in inputs.destinations:
        counters = stats["delivery"].get(name, {})
        expected = counters.get("accepted", 0) - counters.get("filtered", 0)
        shares[name] = _ratio(_within(counters, "latency_le_", target_s), expected)
    known = [v for v in shares.values() if v is not None]
    if inputs.destinations:
        return (min(known) if known else None), {"per_destination": shares}
    return _ratio(stats["fresh"], stats["events"]), {"scope": "store only"}


def build(inputs: Inputs, settings: ReportSettings, now_ms: int) -> dict[str, Any]:
    period = settings.period_hours * HOUR_MS
    target_s = settings.freshness_target_seconds
    current = _period_stats(inputs, now_ms - period, now_ms, target_s)
    previous = _period_stats(inputs, now_ms - 2 * period, now_ms - period, target_s)
    fresh_now = _quantiles(inputs, now_ms - period, now_ms)
    fresh_before = _quantiles(inputs, now_ms - 2 * period, now_ms - period)
    targets = {**DEFAULT_TARGETS, **settings.targets}
    metrics: list[Metric] = []

    def add(
        metric_id: str,
        name: str,
        level: str,
        stakeholder: str,
        definition: str,
        unit: str,
        value: float | None,
        before: float | None,
        better: str = "higher",
        **details: Any,
    ) -> None:
        metrics.append(
            Metric(
                metric_id,
                name,
                level,
                stakeholder,
                definition,
                unit,
                value,
                before,
                targets.get(metric_id),
                better,
                details,
            )
        )

    ns_now, ns_details = _north_star(current, inputs, target_s)
    ns_before, _ = _north_star(previous, inputs, target_s)
    add(
        "north_star",
        "Events delivered everywhere, fresh",
        "north_star",
        "everyone",
        f"Share of accepted events (not filtered by a rule) that reached every enabled"
        f" destination within {target_s:g} s of acceptance; with no destination, the share"
        " queryable in the store within that time. The lowest destination sets the value.",
        "ratio",
        ns_now,
        ns_before,
        **ns_details,
    )

    add(
        "volume",
        "Volume",
        "core",
        "everyone",
        "Events stored in the period.",
        "events",
        current["events"],
        previous["events"],
    )
    for index, q in enumerate(("p50", "p95", "p99")):
        add(
            f"freshness_{q}",
            f"Freshness {q}",
            "core",
            "everyone",
            f"{q} of the time from the 200 acknowledgement to the event being queryable.",
            "seconds",
            fresh_now[index],
            fresh_before[index],
            better="lower",
        )

    def delivery_success(stats: dict[str, Any]) -> float | None:
        delivered = sum(c.get("delivered", 0) for c in stats["delivery"].values())
        dead = sum(c.get("dead_lettered", 0) for c in stats["delivery"].values())
        return _ratio(delivered, delivered + dead)

    add(
        "delivery_success",
        "Delivery success",
        "core",
        "everyone",
        "Delivered / (delivered + dead-lettered), over every destination.",
        "ratio",
        delivery_success(current),
        delivery_success(previous),
    )

    def gap(stats: dict[str, Any]) -> int:
        counters: dict[str, int] = stats["counters"]
        return (
            counters.get("received", 0) - counters.get("stored", 0) - counters.get("duplicates", 0)
        )

    add(
        "landed_gap",
        "Accepted vs landed gap",
        "core",
        "everyone",
        "Events read from the log minus events stored minus duplicates dropped, plus events"
        " still waiting in the log. Zero when nothing is lost.",
        "events",
        gap(current) + inputs.log_lag_events,
        gap(previous),
        better="lower",
    )
    add(
        "tracked_users",
        "Tracked users",
        "core",
        "product managers",
        "Distinct people (userId, else anonymousId) with at least one event.",
        "users",
        current["users"],
        previous["users"],
    )

    seen_events = {
        str(r[0])
        for r in inputs.query(
            "SELECT DISTINCT event FROM events WHERE type = 'track' AND"
            " received_at >= make_timestamptz(? * 1000)",
            [now_ms - period],
        )
    }
    expected = settings.expected_events
    add(
        "expected_events_seen",
        "Expected events tracked",
        "indicator",
        "product managers",
        "Share of the events listed in report.expected_events seen in the period.",
        "ratio",
        _ratio(len([e for e in expected if e in seen_events]), len(expected)),
        None,
        missing=[e for e in expected if e not in seen_events],
        unexpected=sorted(seen_events - set(expected))[:50] if expected else [],
    )

    def rejection_rate(stats: dict[str, Any]) -> float | None:
        rejected = sum(stats["rejections"].values())
        return _ratio(rejected, rejected + stats["counters"].get("received", 0))

    add(
        "rejection_rate",
        "Rejections",
        "indicator",
        "developers",
        "Messages refused at the gateway / (refused + accepted), with the reasons.",
        "ratio",
        rejection_rate(current),
        rejection_rate(previous),
        better="lower",
        by_reason=current["rejections"],
    )
    libraries = inputs.query(
        "SELECT coalesce(context -> 'library' ->> 'name', '(none)'),"
        " coalesce(context -> 'library' ->> 'version', ''), count(*) FROM events"
        " WHERE received_at >= make_timestamptz(? * 1000) GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 20",
        [now_ms - period],
    )
    add(
        "sdk_versions",
        "SDKs in use",
        "indicator",
        "developers",
        "Libraries and versions (context.library) sending events.",
        "libraries",
        len(libraries),
        None,
        libraries=[{"name": n, "version": v, "events": int(c)} for n, v, c in libraries],
    )

    warehouses = [name for name, is_warehouse in inputs.destinations if is_warehouse]

    def warehouse_p95(stats: dict[str, Any]) -> float | None:
        merged: dict[str, int] = {}
        for name in warehouses:
            for key, value in stats["delivery"].get(name, {}).items():
                merged[key] = merged.get(key, 0) + value
        return _bucket_quantile(merged, "latency_le_", 0.95)

    add(
        "warehouse_freshness_p95",
        "Warehouse freshness p95",
        "indicator",
        "analysts",
        "p95 of the time from acknowledgement to the warehouse load (bucket upper bound).",
        "seconds",
        warehouse_p95(current),
        warehouse_p95(previous),
        better="lower",
        warehouses=warehouses,
    )

    def rate(stats: dict[str, Any], key: str, total_key: str = "events") -> float | None:
        return _ratio(stats[key], stats[total_key])

    dup_now = _ratio(
        current["counters"].get("duplicates", 0), current["counters"].get("received", 0)
    )
    dup_before = _ratio(
        previous["counters"].get("duplicates", 0), previous["counters"].get("received", 0)
    )
    add(
        "duplicate_rate",
        "Duplicate rate",
        "indicator",
        "analysts",
        "Duplicates dropped / messages read (retries re-send the same messageId).",
        "ratio",
        dup_now,
        dup_before,
        better="lower",
    )
    add(
        "late_arrival_rate",
        "Late arrivals",
        "indicator",
        "analysts",
        "Share of events received more than one hour after their timestamp.",
        "ratio",
        rate(current, "late"),
        rate(previous, "late"),
        better="lower",
    )

    def withheld(stats: dict[str, Any]) -> int:
        return sum(c.get("filtered:consent", 0) for c in stats["delivery"].values())

    add(
        "consent_withheld",
        "Deliveries withheld for consent",
        "indicator",
        "end users",
        "Deliveries not made because the event's consent preferences denied a category the"
        " destination is mapped to (consent is checked before anything else).",
        "deliveries",
        withheld(current),
        withheld(previous),
    )

    add(
        "log_lag",
        "Log lag",
        "risk",
        "operators",
        "Events accepted but not yet processed by the pipeline.",
        "events",
        inputs.log_lag_events,
        None,
        better="lower",
    )

    def retries(stats: dict[str, Any]) -> int:
        return sum(c.get("retried", 0) for c in stats["delivery"].values())

    add(
        "retries",
        "Delivery retries",
        "risk",
        "operators",
        "Delivery attempts that failed and were retried in the period.",
        "attempts",
        retries(current),
        retries(previous),
        better="lower",
    )
    add(
        "dead_letters",
        "Dead letters",
        "risk",
        "operators",
        "Events in the dead-letter store, not yet replayed.",
        "events",
        inputs.dead_letters,
        None,
        better="lower",
    )
    add(
        "clock_skew_rate",
        "Clock skew",
        "risk",
        "operators",
        "Share of events whose sentAt is more than 60 s away from receivedAt.",
        "ratio",
        rate(current, "skewed"),
        rate(previous, "skewed"),
        better="lower",
    )
    add(
        "bot_share",
        "Bot share",
        "risk",
        "operators",
        "Share of events flagged as bots.",
        "ratio",
        rate(current, "bots"),
        rate(previous, "bots"),
        better="lower",
    )

    return {
        "period_hours": settings.period_hours,
        "until_ms": now_ms,
        "metrics": [m.to_dict() for m in metrics],
        "anomalies": anomalies(inputs, now_ms, settings.anomaly_z),
    }


def anomalies(inputs: Inputs, now_ms: int, z: float) -> list[dict[str, Any]]:
    """Events whose volume in the last hour is far from their hourly pattern (7 days)."""
    rows = inputs.query(
        "SELECT event, floor((epoch_ms(received_at) - ?) / 3600000.0)::BIGINT AS hour,"
        " count(*) FROM events"
        " WHERE type = 'track' AND received_at >= make_timestamptz(? * 1000)"
        " AND received_at < make_timestamptz(? * 1000) GROUP BY 1, 2",
        [now_ms, now_ms - 7 * 24 * HOUR_MS, now_ms],
    )
    series: dict[str, dict[int, int]] = {}
    for event, hour, count in rows:
        series.setdefault(str(event), {})[int(hour)] = int(count)
    found: list[dict[str, Any]] = []
    for event, hours in series.items():
        history = [hours.get(h, 0) for h in range(-168, -1)]
        active = [h for h in history if h]
        if len(active) < 6:
            continue
        found.extend(_score("event_volume", event, hours.get(-1, 0), history, z))
    rejected_now = sum(inputs.rejections(now_ms - HOUR_MS, now_ms).values())
    history = [
        sum(inputs.rejections(now_ms - (k + 1) * HOUR_MS, now_ms - k * HOUR_MS).values())
        for k in range(1, 25)
    ]
    found.extend(_score("rejections", "all", rejected_now, history, z))
    return found


def _score(
    kind: str, subject: str, current: int, history: list[int], z: float
) -> list[dict[str, Any]]:
    mean = sum(history) / len(history)
    variance = sum((h - mean) ** 2 for h in history) / len(history)
    spread = max(math.sqrt(variance), math.sqrt(mean) if mean else 1.0, 1.0)
    score = (current - mean) / spread
    if abs(score) < z or abs(current - mean) < 10:
        return []
    return [
        {
            "kind": kind,
            "subject": subject,
            "last_hour": current,
            "hourly_mean": round(mean, 2),
            "z": round(score, 2),
            "direction": "spike" if score > 0 else "drop",
        }
    ]
