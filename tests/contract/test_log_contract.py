"""One contract for every event-log backend: the embedded SQLite log and Kafka (a real broker).

Each backend is opened the way a deployment opens it, through
``headwater.backends`` and the settings, and used the way the gateway, the
pipeline and the delivery loops use it:

* the gateway appends entries (a request's messages) and gets an answer only
  once they are durable;
* the pipeline polls, writes the store (which records the offset it covers),
  then commits; a poll without a commit hands out the same records again;
* each destination reads the processed events from its own cursor, commits
  its delivery state, then advances.

Records are compared as the events they carry: the SQLite log keeps a
request as one record, Kafka each event as one message.  What a backend
does not do is marked ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from headwater import backends, config
from headwater.destinations.base import DestinationConfig, Outcome
from headwater.destinations.delivery import DeliveryWorker
from headwater.log.base import (
    Entry,
    EventLogWriter,
    ProcessedConsumer,
    ProcessedRecord,
    ProcessedWriter,
    RawConsumer,
    Record,
)
from headwater.pipeline.runner import CONSUMER

pytest_plugins = ["kafka_broker"]

WAIT_S = 20.0


class OffsetStore:
    """The part of the event store the log relies on: the offset it last stored through."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    def committed(self, consumer: str) -> int:
        return self.offsets.get(consumer, 0)

    def write(
        self, columns: dict[str, list[Any]], consumer: str, offset: int, counters: dict[str, int]
    ) -> None:
        self.offsets[consumer] = offset


class StubDestination:
    is_warehouse = False

    def __init__(self, name: str) -> None:
        self.config = DestinationConfig(name=name, kind="webhook")

    def check(self) -> None:
        pass

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        return Outcome.delivered()

    def close(self) -> None:
        pass


class LogUnderTest:
    """One backend, opened through ``headwater.backends`` from its settings."""

    def __init__(self, name: str, settings: config.Settings, data_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.data_dir = data_dir
        self.store = OffsetStore()
        self._opened: list[Any] = []

    def writer(self) -> EventLogWriter:
        writer = backends.log_writer_factory(self.settings, self.data_dir)()
        self._opened.append(writer)
        return writer

    def raw_consumer(self) -> RawConsumer:
        consumer = backends.open_raw_consumer(self.settings, self.data_dir, self.store)  # type: ignore[arg-type]
        self._opened.append(consumer)
        return consumer

    def commit(self, consumer: RawConsumer, records: list[Record]) -> None:
        """What the pipeline does after processing: store (with the offset), then commit."""
        self.store.write({}, CONSUMER, records[-1].offset, {})
        consumer.commit(records)

    def processed_writer(self) -> ProcessedWriter:
        writer = backends.open_processed_writer(self.settings, self.data_dir)
        self._opened.append(writer)
        return writer

    def destination(self, name: str) -> DeliveryWorker:
        """A destination's worker as serve builds it (not started: the test drives it)."""
        worker = backends.delivery_worker(
            self.settings, self.data_dir, StubDestination(name), threading.Event()
        )
        self._opened.append(worker.consumer)
        self._opened.append(worker.state)
        return worker

    @staticmethod
    def advance(worker: DeliveryWorker, records: list[ProcessedRecord]) -> None:
        """What the delivery loop does once a batch is settled: commit its state, advance."""
        worker.state.commit(worker.name, records[-1].offset, {"delivered": len(records)}, [])
        worker.consumer.advance(records)

    def close(self) -> None:
        for thing in reversed(self._opened):
            thing.close()


@pytest.fixture(params=["sqlite", "kafka"])
def log_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogUnderTest]:
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        log_settings = config.LogSettings(
            backend="kafka",
            kafka_bootstrap_servers=broker.bootstrap_servers,
            kafka_topic_prefix=f"contract-{uuid.uuid4().hex[:8]}",
            kafka_partitions=3,
            kafka_replication_factor=1,
            kafka_append_timeout_ms=5000,
        )
    else:
        log_settings = config.LogSettings(backend="sqlite")
    settings = config.Settings(log=log_settings)
    under_test = LogUnderTest(str(request.param), settings, tmp_path)
    yield under_test
    under_test.close()


def lacks(request: pytest.FixtureRequest, backend: LogUnderTest, name: str, reason: str) -> None:
    """Mark the test as failing on the named backend, which does not do this."""
    if backend.name == name:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{name}: {reason}"))


def messages(tag: str, users: list[str], count: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "type": "track",
            "event": "Clicked",
            "userId": users[i % len(users)],
            "messageId": f"{tag}-{i}",
            "properties": {"i": i},
        }
        for i in range(start, start + count)
    ]


def entry(
    batch: list[dict[str, Any]], source: str = "web", received_ms: int = 0, agent: str = "ua/1"
) -> Entry:
    return Entry(source, received_ms or now_ms(), len(batch), json.dumps(batch).encode(), agent)


def events_of(records: list[Record]) -> list[dict[str, Any]]:
    return [m for r in records for m in json.loads(r.payload)]


def ids_of(records: list[Record]) -> list[str]:
    return [m["messageId"] for m in events_of(records)]


def drain(read: Callable[[int], list[Any]], events: int, timeout: float = WAIT_S) -> list[Any]:
    """Poll until ``events`` events are handed out (records are re-handed until committed)."""
    deadline = time.monotonic() + timeout
    records: list[Any] = []
    while time.monotonic() < deadline:
        records = read(10_000)
        if sum(r.count for r in records) >= events:
            return records
        time.sleep(0.02)
    raise AssertionError(
        f"only {sum(r.count for r in records)} of {events} events after {timeout} s"
    )


def stays_empty(read: Callable[[int], list[Any]], seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if read(10_000):
            return False
        time.sleep(0.05)
    return True


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def item(event: dict[str, Any], source: str = "web") -> dict[str, Any]:
    return {"source": source, "bot": False, "warnings": [], "enrichment": {}, "event": event}


# ------------------------------------------------------------------ the raw log


def test_append_is_durable_and_read_back_with_its_fields(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    web = messages("w", ["u1", "u2"], 5)
    app = messages("a", ["u3"], 3)
    writer.append([entry(web, "web", 1_700_000_000_000, "Mozilla/5.0")])
    writer.append([entry(app, "app", 1_700_000_000_500, "")])
    writer.probe()
    writer.close()  # what the append acknowledged does not depend on the writer staying open
    consumer = log_backend.raw_consumer()
    records = drain(consumer.poll, 8)
    assert sum(r.count for r in records) == 8
    seen = sorted(
        (
            (r.source, r.received_ms, r.user_agent, m)
            for r in records
            for m in json.loads(r.payload)
        ),
        key=lambda t: t[3]["messageId"],
    )
    expected = sorted(
        [("web", 1_700_000_000_000, "Mozilla/5.0", m) for m in web]
        + [("app", 1_700_000_000_500, "", m) for m in app],
        key=lambda t: t[3]["messageId"],
    )
    assert seen == expected


def test_each_users_events_stay_in_order(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    users = ["ann", "bob", "cy", "dee", "eve"]
    sent: list[dict[str, Any]] = []
    for round_ in range(6):
        batch = messages("o", users, 10, start=round_ * 10)
        sent.extend(batch)
        writer.append([entry(batch[:4]), entry(batch[4:])])  # two requests in one group
    anonymous = [
        {"type": "page", "anonymousId": "anon-1", "messageId": f"p-{i}", "name": "Home"}
        for i in range(5)
    ]
    writer.append([entry(anonymous)])
    records = drain(log_backend.raw_consumer().poll, 65)
    by_user: dict[str, list[str]] = defaultdict(list)
    for message in events_of(records):
        by_user[message.get("userId") or message["anonymousId"]].append(message["messageId"])
    for user in users:
        assert by_user[user] == [m["messageId"] for m in sent if m["userId"] == user]
    assert by_user["anon-1"] == [f"p-{i}" for i in range(5)]


def test_poll_without_commit_returns_the_same_records(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    for i in range(4):
        writer.append([entry(messages(f"s{i}", ["u1", "u2", "u3"], 5))])
    consumer = log_backend.raw_consumer()
    records = drain(consumer.poll, 20)
    assert consumer.poll(10_000) == records
    assert consumer.poll(10_000) == records
    assert sorted(ids_of(records)) == sorted(f"s{i}-{j}" for i in range(4) for j in range(5))


def test_commit_advances_past_what_it_covers(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    for i in range(10):
        writer.append([entry(messages(f"c{i}", [f"u{i}"], 2))])
    consumer = log_backend.raw_consumer()
    records = drain(consumer.poll, 20)
    half = len(records) // 2
    log_backend.commit(consumer, records[:half])
    rest = consumer.poll(10_000)
    assert rest == records[half:]
    log_backend.commit(consumer, rest)
    assert stays_empty(consumer.poll)
    writer.append([entry(messages("late", ["u1"], 1))])
    assert ids_of(drain(consumer.poll, 1)) == ["late-0"]


def test_a_new_consumer_resumes_from_the_last_commit(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    for i in range(8):
        writer.append([entry(messages(f"r{i}", [f"u{i % 3}"], 3))])
    first = log_backend.raw_consumer()
    records = drain(first.poll, 24)
    half = len(records) // 2
    log_backend.commit(first, records[:half])
    first.close()  # as a pipeline that stops (or dies) with work handed out, uncommitted
    second = log_backend.raw_consumer()
    resumed = drain(second.poll, sum(r.count for r in records[half:]))
    assert sorted(ids_of(resumed)) == sorted(ids_of(records[half:]))
    assert not set(ids_of(resumed)) & set(ids_of(records[:half]))


def test_lag_counts_what_is_not_committed(log_backend: LogUnderTest) -> None:
    writer = log_backend.writer()
    consumer = log_backend.raw_consumer()
    for i in range(4):
        writer.append([entry(messages(f"l{i}", ["u1", "u2"], 3))])
    lag = consumer.lag()
    assert lag["lag_events"] == 12, lag
    assert lag["log_end_offset"] - lag["store_offset"] == lag["lag_records"] > 0
    records = drain(consumer.poll, 12)
    log_backend.commit(consumer, records)
    lag = consumer.lag()
    assert lag["lag_events"] == lag["lag_records"] == 0, lag
    assert lag["log_end_offset"] == lag["store_offset"] > 0


def test_pipelines_in_one_group_share_the_log(
    request: pytest.FixtureRequest, log_backend: LogUnderTest
) -> None:
    lacks(request, log_backend, "sqlite", "one reader; a second pipeline reads everything again")
    writer = log_backend.writer()
    users = [f"user-{i}" for i in range(30)]
    writer.append([entry(messages("g", users, 90))])
    one, two = log_backend.raw_consumer(), log_backend.raw_consumer()
    deadline = time.monotonic() + WAIT_S
    a: list[Record] = []
    b: list[Record] = []
    while time.monotonic() < deadline:
        a, b = one.poll(10_000), two.poll(10_000)
        if a and b and len(events_of(a)) + len(events_of(b)) >= 90:
            break
        time.sleep(0.05)
    # Each event is handed to exactly one member; both have a share.
    assert a and b, (len(a), len(b))
    assert sorted(ids_of(a) + ids_of(b)) == sorted(f"g-{i}" for i in range(90))
    # And one user's events all go to one member.
    users_a = {m["userId"] for m in events_of(a)}
    users_b = {m["userId"] for m in events_of(b)}
    assert not users_a & users_b


def test_prune_drops_what_every_consumer_has_passed(
    request: pytest.FixtureRequest, log_backend: LogUnderTest
) -> None:
    lacks(request, log_backend, "kafka", "the topics' retention.ms prunes; prune() removes nothing")
    writer = log_backend.writer()
    writer.append([entry(messages("old", ["u1"], 3), received_ms=1_000)])
    writer.append([entry(messages("new", ["u1"], 3))])
    consumer = log_backend.raw_consumer()
    records = drain(consumer.poll, 6)
    log_backend.commit(consumer, records[:1])
    assert consumer.prune(now_ms() - 3_600_000) >= 1


# ------------------------------------------------------------------ processed events


def raw_records(backend: LogUnderTest, tag: str, users: list[str], count: int) -> list[Record]:
    """Records from the raw log, as the pipeline hands them to the processed writer."""
    sent = messages(tag, users, count)
    backend.writer().append([entry(sent[i : i + 2]) for i in range(0, count, 2)])
    consumer = backend.raw_consumer()
    records = drain(consumer.poll, count)
    backend.commit(consumer, records)
    consumer.close()
    return records


def publish(backend: LogUnderTest, records: list[Record]) -> list[dict[str, Any]]:
    batches = [(r, [item(m, r.source) for m in json.loads(r.payload)]) for r in records]
    backend.processed_writer().append(batches)
    return [i for _, items in batches for i in items]


def items_of(records: list[ProcessedRecord]) -> list[dict[str, Any]]:
    return [i for r in records for i in json.loads(r.payload)]


def test_processed_events_round_trip_to_a_destination(log_backend: LogUnderTest) -> None:
    worker = log_backend.destination("hook")  # a new destination starts at the end
    consumer: ProcessedConsumer = worker.consumer
    records = raw_records(log_backend, "p", ["u1", "u2", "u3"], 12)
    sent = publish(log_backend, records)
    got = drain(consumer.read, 12)
    key = lambda i: i["event"]["messageId"]  # noqa: E731
    assert sorted(items_of(got), key=key) == sorted(sent, key=key)
    assert {r.received_ms for r in got} == {r.received_ms for r in records}
    assert consumer.read(10_000) == got  # not advanced: the same again
    assert consumer.pending() == 12
    log_backend.advance(worker, got)
    assert stays_empty(consumer.read)
    assert consumer.pending() == 0


def test_processed_keeps_each_users_order(log_backend: LogUnderTest) -> None:
    worker = log_backend.destination("ordered")
    users = ["ann", "bob", "cy", "dee"]
    records: list[Record] = []
    for round_ in range(3):
        batch = raw_records(log_backend, f"o{round_}", users, 8)
        publish(log_backend, batch)
        records += batch
    got = drain(worker.consumer.read, 24)
    by_user: dict[str, list[str]] = defaultdict(list)
    for i in items_of(got):
        by_user[i["event"]["userId"]].append(i["event"]["messageId"])
    for user in users:
        expected = [m["messageId"] for m in events_of(records) if m["userId"] == user]
        assert by_user[user] == expected


def test_destinations_keep_their_own_cursor_and_resume_from_it(
    log_backend: LogUnderTest,
) -> None:
    first = log_backend.destination("a")
    other = log_backend.destination("b")
    records = raw_records(log_backend, "d", ["u1", "u2", "u3", "u4"], 16)
    publish(log_backend, records)
    got = drain(first.consumer.read, 16)
    half = len(got) // 2
    log_backend.advance(first, got[:half])
    first.consumer.close()
    again = log_backend.destination("a")  # a restarted worker
    resumed = drain(again.consumer.read, 16 - sum(r.count for r in got[:half]))
    ids = lambda rs: sorted(i["event"]["messageId"] for i in items_of(rs))  # noqa: E731
    assert ids(resumed) == ids(got[half:])
    assert len(items_of(drain(other.consumer.read, 16))) == 16  # b has advanced nothing


def test_a_new_destination_starts_at_the_end(log_backend: LogUnderTest) -> None:
    publish(log_backend, raw_records(log_backend, "before", ["u1", "u2"], 4))
    worker = log_backend.destination("late")
    assert stays_empty(worker.consumer.read, 0.5)
    publish(log_backend, raw_records(log_backend, "after", ["u1", "u2"], 4))
    got = drain(worker.consumer.read, 4)
    assert sorted(i["event"]["messageId"] for i in items_of(got)) == [
        f"after-{i}" for i in range(4)
    ]
