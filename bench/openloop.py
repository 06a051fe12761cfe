"""An open-loop, rate-limited HTTP load generator in Python (asyncio + uvloop).

    python bench/openloop.py --port P --rate R --duration S [--freshness ...]

Request ``i`` is due at ``start + i / rate`` whether or not earlier requests
have been answered (open loop): a due request goes out on an idle keep-alive
connection, or waits for one (new connections are opened up to
``--max-connections``).  Latency is measured from the time the request was
due, not from when it was written, so a stalled server cannot hide its stall
by slowing the generator down (no coordinated omission).

This client is Python, so it cannot saturate the server: it is only used at
a fixed rate well below the maximum, and it reports the rate it achieved and
the CPU it used.  The same run against the no-op baseline shows how much
latency the client and the server stack add on their own.

``--freshness`` additionally polls the admin API (``POST /query``) for the
events sent, and reports the time from each event's 200 acknowledgement to
its first sighting in the event store.

The result is one line of JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import time
from array import array
from collections import deque
from typing import Any

import workload

_perf = time.perf_counter


def percentiles(values: list[float] | array[float], points: tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles; an empty list gives NaN."""
    ordered = sorted(values)
    if not ordered:
        return [float("nan")] * len(points)
    last = len(ordered) - 1
    return [ordered[min(last, max(0, math.ceil(p / 100 * len(ordered)) - 1))] for p in points]


class Connection(asyncio.Protocol):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.current: tuple[int, float, float] | None = None  # index, due, written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.generator.ready(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
            total = end + 4 + length
            if len(buffer) < total:
                return
            status = int(head[9:12])
            del buffer[:total]
            self.generator.answered(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)


class Generator:
    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        rate: float,
        duration: float,
        max_connections: int,
        tag: str,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.rate = rate
        self.count = max(1, int(rate * duration))
        self.max_connections = max_connections
        self.tag = tag
        self.now = workload.now_iso()
        self.host_header = f"{host}:{port}"
        self.idle: deque[Connection] = deque()
        self.waiting: deque[tuple[int, float]] = deque()
        self.connections = 0
        self.opening = 0
        self.latency = array("d")  # from due time to response, seconds
        self.service = array("d")  # from write to response, seconds
        self.acked = array("d", [0.0]) * self.count  # response time per request
        self.statuses: dict[int, int] = {}
        self.lost_requests = 0
        self.done = 0
        self.finished = asyncio.Event()
        self.start = 0.0
        self.last_due = 0.0

    def message_id(self, index: int) -> str:
        return f"{self.tag}-{index}"

    def body(self, index: int) -> bytes:
        return workload.event(self.message_id(index), index, self.now).encode()

    async def open(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            self.opening += 1
            await loop.create_connection(lambda: Connection(self), self.host, self.port)

    def ready(self, connection: Connection) -> None:
        self.opening = max(0, self.opening - 1)
        self.connections += 1
        self._next(connection)

    def _next(self, connection: Connection) -> None:
        if self.waiting:
            index, due = self.waiting.popleft()
            self._write(connection, index, due)
        else:
            self.idle.append(connection)

    def _write(self, connection: Connection, index: int, due: float) -> None:
        assert connection.transport is not None
        connection.current = (index, due, _perf())
        connection.transport.write(workload.request(self.path, self.host_header, self.body(index)))

    def dispatch(self, index: int, due: float) -> None:
        if self.idle:
            self._write(self.idle.pop(), index, due)
            return
        self.waiting.append((index, due))
        if self.connections + self.opening < self.max_connections:
            self.opening += 1
            loop = asyncio.get_running_loop()
            task = loop.create_task(
                loop.create_connection(lambda: Connection(self), self.host, self.port)
            )
            task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.opening = max(0, self.opening - 1)

    def answered(self, connection: Connection, status: int) -> None:
        now = _perf()
        current = connection.current
        connection.current = None
        if current is not None:
            index, due, written = current
            self.latency.append(now - due)
            self.service.append(now - written)
            self.acked[index] = now
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self._finish_one()
        self._next(connection)

    def lost(self, connection: Connection) -> None:
        self.connections -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.current is not None:
            self.lost_requests += 1
            connection.current = None
            self._finish_one()

    def _finish_one(self) -> None:
        self.done += 1
        if self.done >= self.count:
            self.finished.set()

    async def pace(self) -> None:
        """Issue request ``i`` at ``start + i / rate``."""
        self.start = _perf() + 0.02
        index = 0
        while index < self.count:
            now = _perf()
            due_count = min(self.count, int((now - self.start) * self.rate) + 1)
            while index < due_count:
                self.dispatch(index, self.start + index / self.rate)
                index += 1
            if index < self.count:
                # Event-loop timers tick in milliseconds: sleep at least one tick
                # (requests due meanwhile go out together, timed from their due time).
                wait = self.start + index / self.rate - _perf()
                await asyncio.sleep(max(0.001, wait))
        self.last_due = self.start + (self.count - 1) / self.rate

    def close(self) -> None:
        for connection in list(self.idle):
            if connection.transport is not None:
                connection.transport.close()


async def poll_store(
    generator: Generator, admin_port: int, token: str, interval: float, deadline: float
) -> dict[str, Any]:
    """First sighting of each event in the store, by polling the admin API."""
    seen = array("d", [0.0]) * generator.count
    remaining = generator.count
    watermark = -1
    polls = 0
    poll_times: list[float] = []
    prefix = f"{generator.tag}-"
    while remaining and _perf() < deadline:
        if watermark < 0:
            sql = "SELECT coalesce(max(log_offset), 0) AS m, NULL AS x FROM events"
        else:
            sql = (
                "SELECT log_offset, message_id FROM events"
                f" WHERE log_offset > {watermark} AND message_id LIKE '{prefix}%'"
            )
        body = sql.encode()
        request = (
            f"POST /query HTTP/1.0\r\nHost: 127.0.0.1:{admin_port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        sent = _perf()
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(request)
        raw = await reader.read()
        writer.close()
        now = _perf()
        polls += 1
        poll_times.append(now - sent)
        rows = json.loads(raw.partition(b"\r\n\r\n")[2])["rows"]
        if watermark < 0:
            watermark = int(rows[0][0])
            rows = []
        for offset, message_id in rows:
            watermark = max(watermark, int(offset))
            index = int(message_id[len(prefix) :])
            if 0 <= index < generator.count and not seen[index]:
                seen[index] = now
                remaining -= 1
        await asyncio.sleep(max(0.0, interval - (_perf() - sent)))
    fresh = [s - a for s, a in zip(seen, generator.acked, strict=True) if s and a]
    acked = sum(1 for a in generator.acked if a)
    p50, p95, p99, top = percentiles(fresh, (50, 95, 99, 100))
    return {
        "acked": acked,
        "seen": len(fresh),
        "unseen_after_deadline": acked - len(fresh),
        "fresh_p50_ms": p50 * 1000,
        "fresh_p95_ms": p95 * 1000,
        "fresh_p99_ms": p99 * 1000,
        "fresh_max_ms": top * 1000,
        "polls": polls,
        "poll_interval_ms": interval * 1000,
        "poll_rtt_p50_ms": percentiles(poll_times, (50,))[0] * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    generator = Generator(
        args.host,
        args.port,
        args.path,
        args.rate,
        args.duration,
        args.max_connections,
        args.tag,
    )
    await generator.open(args.connections)
    poller: asyncio.Task[dict[str, Any]] | None = None
    if args.admin_port:
        deadline = _perf() + args.duration + args.settle_timeout
        poller = asyncio.create_task(
            poll_store(generator, args.admin_port, args.admin_token, args.poll_ms / 1000, deadline)
        )
        await asyncio.sleep(0.2)  # the poller learns the current end of the store
    usage = resource.getrusage(resource.RUSAGE_SELF)
    await generator.pace()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(generator.finished.wait(), timeout=args.duration + 10)
    end = _perf()
    after = resource.getrusage(resource.RUSAGE_SELF)
    generator.close()
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    elapsed = end - generator.start
    p50, p90, p99, p999, top = percentiles(generator.latency, (50, 90, 99, 99.9, 100))
    s50, s99 = percentiles(generator.service, (50, 99))
    result: dict[str, Any] = {
        "target_rate": args.rate,
        "sent": generator.count,
        "answered": len(generator.latency),
        "lost": generator.lost_requests,
        "statuses": {str(k): v for k, v in sorted(generator.statuses.items())},
        "achieved_rate": len(generator.latency) / elapsed if elapsed > 0 else 0.0,
        "schedule_slip_ms": (end - generator.last_due) * 1000,
        "connections_used": generator.connections,
        "p50_ms": p50 * 1000,
        "p90_ms": p90 * 1000,
        "p99_ms": p99 * 1000,
        "p999_ms": p999 * 1000,
        "max_ms": top * 1000,
        "service_p50_ms": s50 * 1000,
        "service_p99_ms": s99 * 1000,
        "client_cpu_cores": cpu / elapsed if elapsed > 0 else 0.0,
    }
    if poller is not None:
        result.update(await poller)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/track")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=32, help="opened before the start")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--tag", default=f"ol{int(time.time())}", help="messageId prefix")
    parser.add_argument("--admin-port", type=int, default=0, help="measure freshness")
    parser.add_argument("--admin-token", default="")
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--settle-timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.duration > 60 or args.rate * args.duration > 2_000_000:
        parser.error("keep a run bounded: at most 60 s and 2M requests")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(run(args))))


if __name__ == "__main__":
    main()
