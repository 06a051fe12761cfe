"""Insights checked against independent computations over the same events.

Counts, unique users, funnels and retention are also checked on every store
backend in tests/contract/test_store_contract.py; here: funnels across
conversion windows and the parameter checks, on the embedded store.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headwater import insights
from headwater.store.base import EVENT_COLUMNS
from headwater.store.duckdb import DuckDBStore

DAY = 86_400_000
START = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)  # a Monday
EVENTS = ("Viewed", "Added", "Paid")


def build(rows: list[tuple[str, str, int, str | None]]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name, _ in EVENT_COLUMNS}
    for index, (user, event, at, plan) in enumerate(rows):
        values = {name: None for name, _ in EVENT_COLUMNS}
        values.update(
            message_id=f"m{index}",
            source="s",
            type="track",
            event=event,
            user_id=user,
            timestamp=at,
            original_timestamp=at,
            sent_at=at,
            received_at=at,
            stored_at=at,
            properties=None if plan is None else f'{{"plan": "{plan}"}}',
            is_bot=False,
            log_offset=index,
        )
        for name in columns:
            columns[name].append(values[name])
    return columns


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[DuckDBStore, list[Any]]:
    rng = random.Random(7)
    rows: list[tuple[str, str, int, str | None]] = []
    for person in range(300):
        user = f"u{person}"
        at = START + rng.randrange(0, 21 * DAY)
        for _ in range(rng.randrange(1, 12)):
            rows.append((user, rng.choice(EVENTS), at, rng.choice(["free", "pro", None])))
            at += rng.randrange(60_000, 3 * DAY)
    path = Path(tmp_path_factory.mktemp("insights")) / "events.duckdb"
    store = DuckDBStore(path)
    store.write(build(rows), "store", 1, {})
    return store, rows


def run(store: DuckDBStore) -> insights.Query:
    def query(sql: str, params: list[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        result = store.query(sql, params)
        return result.columns, result.rows

    return query


WINDOW = insights.Window(START, START + 60 * DAY)


def funnel_by_hand(rows: list[Any], steps: list[str], within_ms: int) -> list[int]:
    by_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for user, event, at, _ in rows:
        by_user[user].append((at, event))
    reached = [0] * len(steps)
    for events in by_user.values():
        events.sort()
        starts = [at for at, event in events if event == steps[0]]
        if not starts:
            continue
        start = previous = starts[0]
        reached[0] += 1
        for index, step in enumerate(steps[1:], start=1):
            later = [
                at for at, event in events if event == step and previous < at <= start + within_ms
            ]
            if not later:
                break
            previous = later[0]
            reached[index] += 1
    return reached


@pytest.mark.parametrize("within_days", [1, 3, 30])
def test_funnel_matches_hand_computation(
    data: tuple[DuckDBStore, list[Any]], within_days: int
) -> None:
    store, rows = data
    steps = ["Viewed", "Added", "Paid"]
    result = insights.funnel(run(store), WINDOW, steps, within_days * 86_400)
    assert [s["people"] for s in result["steps"]] == funnel_by_hand(rows, steps, within_days * DAY)


def test_bad_parameters_name_the_field(data: tuple[DuckDBStore, list[Any]]) -> None:
    store, _ = data
    with pytest.raises(insights.InsightError, match="bucket"):
        insights.counts(run(store), WINDOW, "fortnight")
    with pytest.raises(insights.InsightError, match="breakdown"):
        insights.counts(run(store), WINDOW, breakdown="properties.x'; DROP TABLE events; --")
    with pytest.raises(insights.InsightError, match="steps"):
        insights.funnel(run(store), WINDOW, ["only one"])
