"""Costs of the gateway's steps, measured in one process.

    python bench/hotpath.py [--seconds S]

No HTTP server and no load generator: each step runs in a loop on the
benchmark's own events (``workload.py``), so the numbers are CPU time per
request or per event on one core, and they say where a request's time goes
once it is inside the application.  Prints one line of JSON.

Measured:
- ``parse_ms``, which ``normalize`` calls for every time field of every message;
- the whole gateway application (``Gateway`` called as ASGI, with a committer
  that returns at once), for a single ``/v1/track`` event and a 100-event
  ``/v1/batch``;
- its parts: JSON decode (``body.parse_json``), the nesting-depth screen
  (``body.nests_deeper``, where present), ``normalize`` on every message,
  encoding the log record (``msgspec.json.encode``), and the
  per-message size check ``Gateway._accept`` runs when a body is over
  ``limits.max_message_bytes``;
- the SQLite log: one group commit (``SQLiteLogWriter.append``) of k records,
  as the committer does under load (wall time: it waits for fsync), and one
  or two processes committing to the same log at once, as two gateway
  workers do;
- the DuckDB store: the fixed cost of one pipeline step's ``DuckDBStore.write``
  (no rows), bare and with the counters a step carries (wall time).

CPU-bound steps are timed in process CPU time, best of five, so that other
processes on a shared machine disturb them less.

The pipeline's rate is measured inside the running server instead (``run.py``
reports how fast it drains its backlog), as it depends on the server's wiring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import workload

from headwater import config
from headwater.gateway import body as bodies
from headwater.gateway.app import Gateway
from headwater.log.base import Entry
from headwater.log.sqlite import SQLiteLogWriter
from headwater.spec.message import Stamp, normalize
from headwater.spec.timestamps import format_ms, parse_ms

_encode = msgspec.json.Encoder().encode


def per_call(
    func: Callable[[], Any], seconds: float, clock: Callable[[], float] = time.process_time
) -> float:
    """Seconds per call of ``func``: the best of five slices of ``seconds / 5``.

    CPU time by default, which other processes on a shared machine disturb
    far less than wall time; pass ``time.perf_counter`` where waiting counts.
    """
    func()
    best = float("inf")
    for _ in range(5):
        calls = 0
        start = clock()
        deadline = time.perf_counter() + seconds / 5
        while True:
            for _ in range(10):
                func()
            calls += 10
            if time.perf_counter() >= deadline:
                break
        best = min(best, (clock() - start) / calls)
    return best


def per_item(make: Callable[[], Any], func: Callable[[Any], Any], count: int) -> float:
    """Seconds per ``func(item)`` over fresh items from ``make``: best of five."""
    best = float("inf")
    for _ in range(5):
        items = [make() for _ in range(count)]
        start = time.process_time()
        for item in items:
            func(item)
        best = min(best, (time.process_time() - start) / count)
    return best


class InstantCommitter:
    """Accepts every entry at once: the gateway without the log."""

    healthy = True
    pending_bytes = 0
    last_error = ""

    def __init__(self) -> None:
        self.entries = 0

    async def append(self, entry: Entry) -> None:
        self.entries += 1


def gateway_cost(settings: config.Settings, path: str, body: bytes, seconds: float) -> float:
    committer = InstantCommitter()
    app = Gateway(Path(tempfile.gettempdir()), settings, committer)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "client": ("127.0.0.1", 40000),
        "headers": [
            (b"host", b"127.0.0.1:8088"),
            (b"user-agent", workload.USER_AGENT.encode()),
            (b"content-type", b"application/json"),
            (b"authorization", workload.AUTHORIZATION.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            statuses.append(event["status"])

    async def loop(count: int) -> None:
        for _ in range(count):
            await app(scope, receive, send)

    calls = 200 if path.endswith("batch") else 5000
    asyncio.run(loop(10))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.process_time()
        asyncio.run(loop(calls))
        best = min(best, (time.process_time() - start) / calls)
    if set(statuses) != {200}:
        raise RuntimeError(f"gateway answered {sorted(set(statuses))}")
    return best


def gateway_parts(body: bytes, size: int, seconds: float) -> dict[str, float]:
    stamp = Stamp(format_ms(time.time_ns() // 1_000_000), "127.0.0.1", None, None, None, 100)
    count = 40 if size > 1 else 4000
    path_type = None if size > 1 else "track"

    def messages_of(document: dict[str, Any]) -> list[Any]:
        return list(document["batch"]) if size > 1 else [document]

    def normalize_all(messages: list[Any]) -> None:
        for index, msg in enumerate(messages):
            normalize(msg, path_type, stamp, f"batch[{index}]." if size > 1 else "")

    messages = messages_of(bodies.parse_json(body))
    normalize_all(messages)
    parts = {
        "decode_us": per_call(lambda: bodies.parse_json(body), seconds),
        "normalize_us": per_item(
            lambda: messages_of(bodies.parse_json(body)), normalize_all, count
        ),
        "encode_us": per_call(lambda: _encode(messages), seconds),
    }
    depth_check = getattr(bodies, "nests_deeper", None)
    if depth_check is not None:  # the gateway's nesting screen, where it has one
        parts["depth_check_us"] = per_call(lambda: depth_check(body, 64), seconds)
    if len(body) > config.LimitSettings().max_message_bytes:
        # What Gateway._accept does for every message of a body over the limit.
        def size_check() -> None:
            for message in messages:
                measured = dict(message)
                measured.pop("writeKey", None)
                len(_encode(measured))

        parts["size_check_us"] = per_call(size_check, seconds)
    return {name: value * 1e6 for name, value in parts.items()}


def sqlite_commit(directory: Path, payload: bytes, group: int, seconds: float) -> float:
    writer = SQLiteLogWriter(directory / f"log-{group}-{len(payload)}.sqlite")
    entries = [Entry("default", 0, 1, payload, workload.USER_AGENT)] * group
    try:
        return per_call(lambda: writer.append(entries), seconds, time.perf_counter)
    finally:
        writer.close()


def _writer_loop(path: str, payload: bytes, begin: float, seconds: float, out: Any) -> None:
    writer = SQLiteLogWriter(Path(path))
    entries = [Entry("default", 0, 1, payload, workload.USER_AGENT)]
    latencies: list[float] = []
    while time.time() < begin:
        time.sleep(0.001)
    deadline = begin + seconds
    while time.time() < deadline:
        start = time.perf_counter()
        writer.append(entries)
        latencies.append(time.perf_counter() - start)
    writer.close()
    out.put(latencies)


def sqlite_writers(directory: Path, payload: bytes, writers: int, seconds: float) -> dict[str, Any]:
    """Processes committing one record at a time to one log, as gateway workers do.

    Each process has its own connection, like each gateway worker's committer;
    when one holds the write lock, the others wait in SQLite's busy handler.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    path = directory / f"writers-{writers}.sqlite"
    SQLiteLogWriter(path).close()  # create the schema before the race
    begin = time.time() + 1.0  # after every process has started
    procs = [
        ctx.Process(target=_writer_loop, args=(str(path), payload, begin, seconds, queue))
        for _ in range(writers)
    ]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    for _ in procs:
        latencies += queue.get(timeout=seconds + 30)
    for proc in procs:
        proc.join(10)
    latencies.sort()
    return {
        "commits_per_s": len(latencies) / seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        "p999_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.999))] * 1e3,
        "max_ms": latencies[-1] * 1e3,
    }


def store_write(directory: Path, seconds: float) -> dict[str, float]:
    """Wall time of one ``DuckDBStore.write`` with no rows, bare and with counters.

    The pipeline calls it once per step, with its counters (received, stored,
    duplicates, freshness buckets), so this is the fixed cost of a step.
    """
    from headwater.store.base import EVENT_COLUMNS
    from headwater.store.duckdb import DuckDBStore

    store = DuckDBStore(directory / "store.duckdb")
    offset = 0

    def write(counters: dict[str, int]) -> None:
        nonlocal offset
        offset += 1
        store.write({name: [] for name, _ in EVENT_COLUMNS}, "bench", offset, counters)

    counters = {"received": 100, "stored": 100, "duplicates": 1, "freshness_le_0.1s": 100}
    try:
        bare = per_call(lambda: write({}), seconds, time.perf_counter)
        counted = per_call(lambda: write(counters), seconds, time.perf_counter)
    finally:
        store.close()
    return {
        "bare_ms": bare * 1e3,
        "with_4_counters_ms": counted * 1e3,
        "per_counter_ms": (counted - bare) / len(counters) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="cost of each hot-path step")
    parser.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    args = parser.parse_args()
    seconds = args.seconds
    settings = config.Settings(
        sources=[config.Source(name="default", write_key=workload.WRITE_KEY)]
    )
    now = workload.now_iso()
    single = workload.event("hot-1", 1, now).encode()
    batch = workload.batch("hot", 0, 100, now).encode()
    result: dict[str, Any] = {
        "single_bytes": len(single),
        "batch_bytes": len(batch),
        "gateway_single_us": gateway_cost(settings, "/v1/track", single, seconds * 2) * 1e6,
        "gateway_batch_us": gateway_cost(settings, "/v1/batch", batch, seconds * 2) * 1e6,
        "parse_ms_us": per_call(lambda: parse_ms(now), seconds) * 1e6,
        "single": gateway_parts(single, 1, seconds),
        "batch": gateway_parts(batch, 100, seconds),
    }
    with tempfile.TemporaryDirectory(prefix="headwater-hotpath-") as tmp:
        try:
            result["store_write"] = store_write(Path(tmp), seconds)
        except Exception as exc:  # the store's interface moved on: say so, go on
            result["store_write"] = {"error": f"{type(exc).__name__}: {exc}"}
        directory = Path(tmp)
        record = _encode([json.loads(single)])
        batch_record = _encode(json.loads(batch)["batch"])
        result["sqlite_commit_ms"] = {
            f"{group}x{label}": sqlite_commit(directory, payload, group, seconds) * 1e3
            for label, payload in (("single", record), ("batch100", batch_record))
            for group in (1, 16, 128)
        }
        result["sqlite_writers"] = {
            str(writers): sqlite_writers(directory, record, writers, 1.0) for writers in (1, 2)
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
