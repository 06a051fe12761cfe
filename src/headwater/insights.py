"""Insights over the event store: counts, unique users, funnels, retention.

Every insight is one SQL query over ``events``.  Parameters are validated
here and passed to the store as bound values, never pasted into SQL, except
identifiers chosen from fixed lists (time bucket, breakdown path checked
against a strict pattern).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from headwater.spec.timestamps import parse_ms

BUCKETS = {"minute": "minute", "hour": "hour", "day": "day", "week": "week", "month": "month"}
_PATH = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$ -]{0,63}(\.[A-Za-z_$][A-Za-z0-9_$ -]{0,63}){0,4}$")
# The identity of a person: userId when known, else anonymousId.
PERSON = "coalesce(user_id, 'anon:' || anonymous_id)"
PERSON_E = "coalesce(e.user_id, 'anon:' || e.anonymous_id)"
HUMAN = "NOT coalesce(is_bot, false)"

Query = Callable[[str, list[Any]], tuple[list[str], list[tuple[Any, ...]]]]


class InsightError(ValueError):
    """A parameter is invalid; the message names it."""


@dataclass(frozen=True)
class Window:
    since_ms: int
    until_ms: int

    @classmethod
    def parse(
        cls, since: str | None, until: str | None, now_ms: int, default_days: int = 7
    ) -> Window:
        upper = _time("until", until) if until else now_ms
        lower = _time("since", since) if since else upper - default_days * 86_400_000
        if lower >= upper:
            raise InsightError("since: must be before until")
        return cls(lower, upper)

    def sql(self) -> str:
        return "timestamp >= make_timestamptz(? * 1000) AND timestamp < make_timestamptz(? * 1000)"

    def args(self) -> list[Any]:
        return [self.since_ms, self.until_ms]


def _time(name: str, value: str) -> int:
    parsed = parse_ms(value)
    if parsed is None:
        raise InsightError(f"{name}: an ISO-8601 time is required")
    return parsed


def _bucket(bucket: str) -> str:
    if bucket not in BUCKETS:
        raise InsightError(f"bucket: one of {', '.join(BUCKETS)}")
    return BUCKETS[bucket]


def json_path(path: str) -> str:
    """A property path like ``properties.plan`` as a JSON extraction.

    Keys are chained with ``->`` and ``->>``, which DuckDB and PostgreSQL read
    alike; a key starting with ``$`` (DuckDB would read it as a JSONPath)
    takes DuckDB's JSONPath form instead.
    """
    if not _PATH.match(path):
        raise InsightError(f"breakdown: {path!r} is not a dotted field path")
    root, _, rest = path.partition(".")
    if root not in ("properties", "traits", "context") or not rest:
        columns = {"event", "type", "source", "name", "browser", "os", "device", "user_id"}
        if path in columns:
            return f'"{path}"'
        raise InsightError(
            "breakdown: use properties.X, traits.X, context.X or one of "
            + ", ".join(sorted(columns))
        )
    parts = rest.split(".")
    if any(part.startswith("$") for part in parts):
        pointer = "$." + ".".join(f'"{part}"' for part in parts)
        return f"({root} ->> '{pointer}')"
    keys = "".join(f" -> '{part}'" for part in parts[:-1])
    return f"({root}{keys} ->> '{parts[-1]}')"


def _event_filter(event: str | None) -> tuple[str, list[Any]]:
    if event is None:
        return "", []
    return " AND event = ?", [event]


def counts(
    query: Query,
    window: Window,
    bucket: str = "hour",
    event: str | None = None,
    breakdown: str | None = None,
    source: str | None = None,
    limit: int = 20,
) -> dict[str, Any]:
    """Events per time bucket, optionally per value of a property (top ``limit``)."""
    trunc = _bucket(bucket)
    where = window.sql()
    args = window.args()
    extra, extra_args = _event_filter(event)
    where += extra
    args += extra_args
    if source is not None:
        where += " AND source = ?"
        args.append(source)
    group = json_path(breakdown) if breakdown else "NULL"
    sql = (
        f"WITH base AS (SELECT date_trunc('{trunc}', timestamp) AS bucket, {group} AS value"
        f" FROM events WHERE {where} AND {HUMAN}),"
        " top AS (SELECT value FROM base GROUP BY value ORDER BY count(*) DESC LIMIT ?)"
        " SELECT b.bucket, b.value, count(*) AS events FROM base b JOIN top t"
        " ON b.value IS NOT DISTINCT FROM t.value GROUP BY 1, 2 ORDER BY 1, 2"
    )
    _, rows = query(sql, [*args, limit])
    return {
        "bucket": bucket,
        "breakdown": breakdown,
        "series": [{"bucket": b, "value": v, "events": int(n)} for b, v, n in rows],
    }


def unique_users(
    query: Query, window: Window, bucket: str = "day", event: str | None = None
) -> dict[str, Any]:
    trunc = _bucket(bucket)
    extra, extra_args = _event_filter(event)
    sql = (
        f"SELECT date_trunc('{trunc}', timestamp) AS bucket, count(DISTINCT {PERSON}) AS users"
        f" FROM events WHERE {window.sql()}{extra} AND {HUMAN}"
        " GROUP BY bucket ORDER BY bucket"
    )
    _, rows = query(sql, [*window.args(), *extra_args])
    _, total = query(
        f"SELECT count(DISTINCT {PERSON}) FROM events WHERE {window.sql()}{extra} AND {HUMAN}",
        [*window.args(), *extra_args],
    )
    return {
        "bucket": bucket,
        "total": int(total[0][0]),
        "series": [{"bucket": b, "users": int(n)} for b, n in rows],
    }


def funnel(
    query: Query, window: Window, steps: list[str], within_seconds: int = 86_400
) -> dict[str, Any]:
    """People who did each step in order, each step within ``within_seconds`` of the first.

    A person enters at their first occurrence of step 1 in the window; step k
    counts if it happens no earlier than step k-1 (strictly later when both
    steps are the same event) and no later than the entry time plus the
    conversion window.
    """
    if not 2 <= len(steps) <= 10:
        raise InsightError("steps: between 2 and 10 event names")
    if within_seconds <= 0:
        raise InsightError("within_seconds: must be positive")
    args: list[Any] = []
    ctes = []
    for index, step in enumerate(steps):
        if index == 0:
            ctes.append(
                f"s0 AS (SELECT {PERSON} AS person, min(timestamp) AS t, min(timestamp) AS start"
                f" FROM events WHERE event = ? AND {window.sql()} AND {HUMAN} GROUP BY person)"
            )
            args += [step, *window.args()]
        else:
            ctes.append(
                f"s{index} AS (SELECT p.person, min(e.timestamp) AS t, p.start"
                f" FROM s{index - 1} p JOIN events e ON {PERSON_E} = p.person"
                f" WHERE e.event = ? AND e.timestamp {'>' if step == steps[index - 1] else '>='}"
                " p.t AND NOT coalesce(e.is_bot, false)"
                # Implied by the line above; lets the scan skip older row groups.
                " AND e.timestamp >= make_timestamptz(? * 1000)"
                f" AND e.timestamp <= p.start + to_seconds(?) AND e.timestamp < make_timestamptz(?"
                f" * 1000) GROUP BY p.person, p.start)"
            )
            args += [step, window.since_ms, within_seconds, window.until_ms]
    selects = " UNION ALL ".join(
        f"SELECT {i} AS step, count(*) AS people FROM s{i}" for i in range(len(steps))
    )
    _, rows = query(f"WITH {', '.join(ctes)} {selects} ORDER BY step", args)
    people = {int(step): int(n) for step, n in rows}
    first = people.get(0, 0)
    result = []
    for index, step in enumerate(steps):
        count = people.get(index, 0)
        previous = people.get(index - 1, 0) if index else count
        result.append(
            {
                "step": index + 1,
                "event": step,
                "people": count,
                "conversion_from_start": round(count / first, 4) if first else 0.0,
                "conversion_from_previous": round(count / previous, 4) if previous else 0.0,
            }
        )
    return {"within_seconds": within_seconds, "steps": result}


def retention(
    query: Query,
    window: Window,
    start_event: str | None = None,
    return_event: str | None = None,
    bucket: str = "week",
    periods: int = 8,
) -> dict[str, Any]:
    """Cohorts by the bucket of each person's first ``start_event``; the share active later.

    Period 0 is the cohort's own bucket; period k counts people who did
    ``return_event`` (any event when not given) k buckets later.
    """
    trunc = _bucket(bucket)
    if bucket == "minute":
        raise InsightError("bucket: retention uses hour, day, week or month")
    if not 1 <= periods <= 52:
        raise InsightError("periods: between 1 and 52")
    start_filter, start_args = _event_filter(start_event)
    return_filter, return_args = _event_filter(return_event)
    sql = (
        f"WITH firsts AS (SELECT {PERSON} AS person, date_trunc('{trunc}', min(timestamp))"
        f" AS cohort FROM events WHERE {window.sql()}{start_filter}"
        f" AND {HUMAN} GROUP BY person),"
        f" activity AS (SELECT DISTINCT {PERSON} AS person,"
        f" date_trunc('{trunc}', timestamp) AS active FROM events"
        f" WHERE {window.sql()}{return_filter} AND {HUMAN}),"
        f" periods AS (SELECT f.cohort, date_diff('{trunc}', f.cohort, a.active) AS period,"
        " count(DISTINCT f.person) AS people FROM firsts f JOIN activity a"
        " ON a.person = f.person AND a.active >= f.cohort GROUP BY 1, 2)"
        " SELECT f.cohort, count(*) AS size FROM firsts f GROUP BY f.cohort ORDER BY f.cohort"
    )
    _, sizes = query(sql, [*window.args(), *start_args, *window.args(), *return_args])
    sql_periods = sql.rsplit(" SELECT f.cohort", 1)[0] + (
        " SELECT cohort, period, people FROM periods WHERE period BETWEEN 0 AND ?"
        " ORDER BY cohort, period"
    )
    _, cells = query(
        sql_periods, [*window.args(), *start_args, *window.args(), *return_args, periods]
    )
    table: dict[Any, dict[int, int]] = {}
    for cohort, period, people in cells:
        table.setdefault(cohort, {})[int(period)] = int(people)
    cohorts = []
    for cohort, size in sizes:
        row = table.get(cohort, {})
        cohorts.append(
            {
                "cohort": cohort,
                "size": int(size),
                "retained": [row.get(k, 0) for k in range(periods + 1)],
                "rates": [
                    round(row.get(k, 0) / int(size), 4) if size else 0.0 for k in range(periods + 1)
                ],
            }
        )
    return {"bucket": bucket, "periods": periods, "cohorts": cohorts}
