"""The delivery state's and the rejection log's contracts, on SQLite and on PostgreSQL.

The embedded shape keeps both in SQLite beside the log; the scale-out shape
keeps them in PostgreSQL, shared by every node.  Each test runs on both.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from headwater.destinations.state import DeadLetter, DeliveryState
from headwater.log import rejections as embedded_rejections
from headwater.log.rejections import Rejected, RejectionLog
from headwater.state.base import DeliveryStateStore, RejectionStore
from headwater.state.postgres import PostgresDeliveryState, PostgresRejectionLog

pytest_plugins = ["pg"]

BACKENDS = ["sqlite", "postgres"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(params=BACKENDS)
def open_state(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], DeliveryStateStore]]:
    opened: list[DeliveryStateStore] = []
    if request.param == "sqlite":

        def make() -> DeliveryStateStore:
            opened.append(DeliveryState(tmp_path))
            return opened[-1]

    else:
        dsn = request.getfixturevalue("contract_dsn")
        schema = request.getfixturevalue("pg_schema")

        def make() -> DeliveryStateStore:
            opened.append(PostgresDeliveryState(dsn, schema))
            return opened[-1]

    yield make
    for state in opened:
        with contextlib.suppress(Exception):
            state.close()


@pytest.fixture
def state(open_state: Callable[[], DeliveryStateStore]) -> DeliveryStateStore:
    return open_state()


def letter(destination: str, message_id: str, event: bytes = b'{"x":1}') -> DeadLetter:
    return DeadLetter(
        destination=destination,
        message_id=message_id,
        received_ms=1_772_000_000_000,
        event=event,
        reason="http 400: bad request",
        attempts=3,
        last_status=400,
        last_response='{"error":"naïve ✗"}',
        first_attempt_ms=1_772_000_000_100,
        dead_ms=1_772_000_000_900,
    )


# -- cursors ------------------------------------------------------------------------------------


def test_cursors(open_state: Callable[[], DeliveryStateStore]) -> None:
    state = open_state()
    assert state.committed("hook") == 0
    assert state.min_cursor() is None
    state.start_at("hook", 40)
    state.start_at("hook", 99)  # only a destination without a cursor is registered
    assert state.committed("hook") == 40
    state.commit("hook", 45, {}, [])
    state.commit("hook", None, {"accepted": 1}, [])  # no offset: the cursor stays
    state.start_at("warehouse", 12)
    assert (state.committed("hook"), state.committed("warehouse")) == (45, 12)
    assert state.min_cursor() == 12
    state.close()
    again = open_state()
    assert (again.committed("hook"), again.min_cursor()) == (45, 12)


# -- counters -----------------------------------------------------------------------------------


def test_counters_in_total_and_per_minute(state: DeliveryStateStore) -> None:
    before = _now_ms()
    state.commit("hook", 1, {"accepted": 5, "delivered": 4, "filtered": 1, "failed": 0}, [])
    state.commit("hook", 2, {"accepted": 2, "delivered": 2}, [])
    state.commit("files", 2, {"accepted": 1, "delivered": 1}, [])
    assert state.counters() == {
        "hook": {"accepted": 7, "delivered": 6, "filtered": 1},
        "files": {"accepted": 1, "delivered": 1},
    }
    assert state.counters("files") == {"files": {"accepted": 1, "delivered": 1}}
    assert state.counters("none") == {}
    window = state.since(before - 60_000, _now_ms() + 60_000)
    assert window == state.counters()
    assert state.since(before - 3_600_000, before - 60_000) == {}


def test_counters_from_several_writers_add_up(
    open_state: Callable[[], DeliveryStateStore],
) -> None:
    states = [open_state(), open_state()]
    errors: list[BaseException] = []

    def count(state: DeliveryStateStore, offset: int) -> None:
        try:
            for n in range(40):
                # Names in opposite orders: upserts must not deadlock each other.
                names = ["accepted", "delivered", "retried"]
                if offset % 2:
                    names.reverse()
                state.commit("hook", offset * 100 + n, dict.fromkeys(names, 1), [])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=count, args=(s, i)) for i, s in enumerate(states)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert states[0].counters() == {"hook": {"accepted": 80, "delivered": 80, "retried": 80}}


# -- dead letters -------------------------------------------------------------------------------


def test_dead_letters_are_kept_exactly_and_listed_in_order(state: DeliveryStateStore) -> None:
    raw = b'{"event":"\xe2\x9c\x93","big":123456789012345678901234567890}\xff'
    state.commit("hook", 3, {"dead_lettered": 2}, [letter("hook", "m1", raw), letter("hook", "m2")])
    state.commit("files", 3, {"dead_lettered": 1}, [letter("files", "m3")])
    letters = state.dead_letters()
    assert [(d.destination, d.message_id) for d in letters] == [
        ("hook", "m1"),
        ("hook", "m2"),
        ("files", "m3"),
    ]
    first = letters[0]
    assert bytes(first.event) == raw
    assert (first.reason, first.attempts, first.last_status) == ("http 400: bad request", 3, 400)
    assert first.last_response == '{"error":"naïve ✗"}'
    assert (first.received_ms, first.first_attempt_ms, first.dead_ms) == (
        1_772_000_000_000,
        1_772_000_000_100,
        1_772_000_000_900,
    )
    assert first.replayed_ms is None and first.id > 0
    assert [d.message_id for d in state.dead_letters("hook")] == ["m1", "m2"]
    assert [d.message_id for d in state.dead_letters(limit=1)] == ["m1"]
    assert [d.message_id for d in state.dead_letters(ids=[letters[2].id])] == ["m3"]
    assert state.dead_letters("hook", ids=[letters[2].id]) == []


def test_replayed_dead_letters_count_as_delivered(state: DeliveryStateStore) -> None:
    state.commit(
        "hook",
        3,
        {"accepted": 3, "delivered": 1, "dead_lettered": 2},
        [letter("hook", "m1"), letter("hook", "m2")],
    )
    state.commit("files", 3, {"dead_lettered": 1}, [letter("files", "m3")])
    ids = [d.id for d in state.dead_letters("hook")]
    other = state.dead_letters("files")[0].id
    state.mark_replayed("hook", [ids[0], other], 1_772_000_001_000)  # not files' letter
    assert [d.message_id for d in state.dead_letters("hook")] == ["m2"]
    replayed = state.dead_letters("hook", include_replayed=True)
    assert [d.replayed_ms for d in replayed] == [1_772_000_001_000, None]
    assert state.counters("hook")["hook"] == {
        "accepted": 3,
        "delivered": 2,
        "dead_lettered": 1,
        "replayed": 1,
    }
    state.mark_replayed("hook", [ids[0]], 1_772_000_002_000)  # already replayed: no change
    assert state.counters("hook")["hook"]["delivered"] == 2
    assert state.dead_letters("files") != []


def test_a_failed_commit_changes_nothing(state: DeliveryStateStore) -> None:
    state.commit("hook", 5, {"accepted": 1}, [])
    broken = letter("hook", "m1")
    broken.event = None  # type: ignore[assignment]
    with pytest.raises(Exception):  # noqa: B017 - each engine refuses in its own words
        state.commit("hook", 9, {"accepted": 7}, [letter("hook", "m0"), broken])
    assert state.committed("hook") == 5
    assert state.counters() == {"hook": {"accepted": 1}}
    assert state.dead_letters() == []
    state.commit("hook", 6, {"accepted": 1}, [])  # and it still works
    assert state.committed("hook") == 6


# -- the rejection log --------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def rejections(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RejectionStore]:
    log: RejectionStore
    if request.param == "sqlite":
        log = RejectionLog(tmp_path)
    else:
        log = PostgresRejectionLog(
            request.getfixturevalue("contract_dsn"), request.getfixturevalue("pg_schema")
        )
    yield log
    log.close()


def refused(at: int, code: str, body: bytes = b"{}", source: str = "web") -> Rejected:
    return Rejected(at, source, "/v1/batch", 400, code, "batch[0].type", f"{code}: ✗", body)


def test_refused_requests_are_listed_after_an_id(rejections: RejectionStore) -> None:
    assert rejections.latest_id() == 0
    assert rejections.after(0) == []
    rejections.record([])
    minute = 1_772_000_040_000
    rejections.record([refused(minute, "invalid_json", b"{nope \xff"), refused(minute, "bad")])
    rejections.record([refused(minute + 1, "bad", source="app")])
    rows = rejections.after(0)
    assert [(r["code"], r["source"]) for r in rows] == [
        ("invalid_json", "web"),
        ("bad", "web"),
        ("bad", "app"),
    ]
    assert rows[0]["body"] == "{nope \ufffd"
    assert rows[0]["message"] == "invalid_json: ✗" and rows[0]["field"] == "batch[0].type"
    assert (rows[0]["status"], rows[0]["path"], rows[0]["received_ms"]) == (
        400,
        "/v1/batch",
        minute,
    )
    assert rejections.latest_id() == rows[-1]["id"]
    assert [r["id"] for r in rejections.after(rows[0]["id"], limit=1)] == [rows[1]["id"]]
    assert [r["source"] for r in rejections.samples("bad")] == ["app", "web"]
    assert [r["source"] for r in rejections.samples("bad", limit=1)] == ["app"]


def test_refusals_are_counted_per_minute_of_receipt(rejections: RejectionStore) -> None:
    minute = 1_772_000_040_000
    rejections.record(
        [
            refused(minute, "bad"),
            refused(minute + 59_999, "bad"),
            refused(minute + 60_000, "bad"),
            refused(minute + 1, "too_large"),
        ]
    )
    assert rejections.counts(minute, minute + 60_000) == {"bad": 2, "too_large": 1}
    assert rejections.counts(minute, minute + 120_000) == {"bad": 3, "too_large": 1}
    assert rejections.counts(minute + 60_000, minute + 120_000) == {"bad": 1}
    assert rejections.counts(0, minute) == {}


def test_bodies_are_cut_and_only_the_newest_are_kept(
    rejections: RejectionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_rejections, "KEEP", 5)
    big = b"x" * (embedded_rejections.MAX_BODY + 100)
    rejections.record([refused(1_772_000_040_000, "big", big)])
    for n in range(3):
        rejections.record([refused(1_772_000_040_000 + n, f"c{n}") for _ in range(4)])
    rows = rejections.after(0, limit=100)
    assert [r["id"] for r in rows] == list(range(rows[-1]["id"] - 4, rows[-1]["id"] + 1))  # KEEP
    assert all(r["code"] != "big" for r in rows)
    assert rejections.counts(0, 1_772_000_100_000) == {"big": 1, "c0": 4, "c1": 4, "c2": 4}
    # The first one kept its body cut to MAX_BODY while it was there.
    monkeypatch.setattr(embedded_rejections, "KEEP", 100)
    rejections.record([refused(1_772_000_040_000, "big", big)])
    assert len(rejections.samples("big")[0]["body"]) == embedded_rejections.MAX_BODY
