"""What a 200 promises, tested against a real ``headwater serve``.

A ``2xx`` answer means the events are durable in the log, so every event a
client saw acknowledged must be stored exactly once, whatever happens to the
server afterwards: ``kill -9`` under load or mid-batch, SIGTERM with requests
in flight, a full disk.  Overload and a full disk are answered with ``503``
and ``Retry-After``, never with a 200 that was not earned, and memory stays
bounded.  Every load loop here is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import WRITE_KEY, RunningServer, _children

MakeServer = Callable[..., RunningServer]
JSON = {"Content-Type": "application/json"}


@dataclass
class Request:
    """One request a client sent: where, what, and the messageIds it carries."""

    path: str
    body: bytes
    ids: list[str]


@dataclass
class Load:
    """Client threads posting ``/v1/batch`` and ``/v1/track`` until told to stop.

    A thread stops on its own after ``per_thread`` requests, after ``seconds``,
    or at the first transport error (the server went away).  Only a 200 counts
    as acknowledged; everything else is kept to be retried.
    """

    url: str
    tag: str
    threads: int = 4
    batch: int = 20
    per_thread: int = 1500
    seconds: float = 8.0
    pad: int = 0
    acked: set[str] = field(default_factory=set)
    acked_requests: list[Request] = field(default_factory=list)
    unacked: list[Request] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)
    last_ack: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._workers = [
            threading.Thread(target=self._client, args=(n,), daemon=True)
            for n in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
            assert not worker.is_alive(), "a load thread did not stop"

    def running(self) -> bool:
        return any(worker.is_alive() for worker in self._workers)

    def unexpected(self) -> dict[int | str, int]:
        """Answers other than 200, 503 and a dropped connection."""
        return {
            k: n for k, n in self.statuses.items() if isinstance(k, int) and k not in (200, 503)
        }

    def requests(self) -> int:
        with self._lock:
            return len(self.acked_requests)

    def _request(self, thread: int, seq: int) -> Request:
        user = f"user-{self.tag}-{thread}"
        props = {"seq": seq, "pad": "x" * self.pad}
        if seq % 3 == 0:
            message_id = f"{self.tag}-{thread}-{seq}"
            body = {
                "userId": user,
                "event": "Clicked",
                "messageId": message_id,
                "properties": props,
            }
            return Request("/v1/track", json.dumps(body).encode(), [message_id])
        ids = [f"{self.tag}-{thread}-{seq}-{i}" for i in range(self.batch)]
        batch = [
            {
                "type": "track",
                "event": "Viewed",
                "userId": user,
                "messageId": m,
                "properties": props,
            }
            for m in ids
        ]
        return Request("/v1/batch", json.dumps({"batch": batch}).encode(), ids)

    def _client(self, thread: int) -> None:
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, auth=(WRITE_KEY, ""), timeout=30) as client:
            for seq in range(self.per_thread):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                request = self._request(thread, seq)
                try:
                    response = client.post(request.path, content=request.body, headers=JSON)
                except httpx.TransportError as exc:
                    with self._lock:
                        self.statuses[type(exc).__name__] += 1
                        self.unacked.append(request)
                    return
                with self._lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        self.acked.update(request.ids)
                        self.acked_requests.append(request)
                        self.last_ack = time.monotonic()
                    else:
                        self.unacked.append(request)


def resend(url: str, requests: list[Request], attempts: int = 20) -> None:
    """Send each request again, as an SDK retries, until it is acknowledged."""
    with httpx.Client(base_url=url, auth=(WRITE_KEY, ""), timeout=30) as client:
        for request in requests:
            for _ in range(attempts):
                response = client.post(request.path, content=request.body, headers=JSON)
                if response.status_code == 200:
                    break
                assert response.status_code == 503, response.text
                time.sleep(float(response.headers["retry-after"]) / 10)
            else:
                raise AssertionError(f"{request.path} never acknowledged after {attempts} tries")


def stored_ids(server: RunningServer, timeout: float = 60) -> set[str]:
    """Every stored messageId, after checking that none is stored twice."""
    server.settle(timeout)
    duplicates = server.query(
        "SELECT message_id, count(*) AS n FROM events GROUP BY message_id HAVING count(*) > 1"
        " ORDER BY n DESC LIMIT 10"
    )
    assert duplicates == [], f"stored more than once: {duplicates}"
    return {row["message_id"] for row in server.query("SELECT message_id FROM events")}


def lag_events(server: RunningServer) -> int:
    return int(server.admin.status()["log"]["lag_events"])


def rss_mb(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- kill -9 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_under_load_keeps_every_acknowledged_event_once(make_server: MakeServer) -> None:
    server = make_server(workers=2)
    load = Load(server.url, "crash", threads=6, per_thread=600, seconds=6).start()
    # Kill while every client thread is still sending.
    assert wait_for(lambda: load.requests() >= 1200 or not load.running(), 6)
    assert load.running(), f"load ended before the kill: {load.statuses}"
    server.kill9()
    load.stop()
    assert load.unacked, "no request was in flight at the kill"
    assert not load.unexpected(), load.statuses

    restarted = make_server(workers=2, data_dir=server.data_dir)
    stored = stored_ids(restarted)
    missing = load.acked - stored
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    sent = {m for r in load.acked_requests + load.unacked for m in r.ids}
    assert stored <= sent
    in_doubt = {m for r in load.unacked for m in r.ids} & stored
    print(
        f"kill -9 under load: {len(load.acked)} events acknowledged"
        f" ({len(load.acked_requests)} requests), {len(stored)} stored,"
        f" {len(load.unacked)} requests unanswered ({len(in_doubt)} of their events stored)"
    )

    # SDKs retry what was not acknowledged, and sometimes what was (a lost 200).
    resend(restarted.url, load.unacked + load.acked_requests[:100])
    after = stored_ids(restarted)
    assert after == sent, f"missing after retries: {sorted(sent - after)[:5]}"


@pytest.mark.slow
def test_kill9_mid_batch_with_backlog_keeps_every_acknowledged_event_once(
    make_server: MakeServer,
) -> None:
    # Small pipeline batches: many store transactions, each a point to be killed in.
    env = {"HEADWATER_PIPELINE_BATCH_MAX_EVENTS": "1000"}
    server = make_server(workers=2, env=env)
    # Large batches fill the log faster than the pipeline stores them.
    load = Load(server.url, "backlog", threads=4, batch=250, per_thread=150, seconds=8, pad=200)
    load.start()
    wait_for(lambda: lag_events(server) >= 30_000 or not load.running(), 8, interval=0.2)
    lag_at_kill = lag_events(server)
    server.kill9()
    load.stop()
    assert lag_at_kill > 0, "the pipeline had no backlog at the kill"
    assert not load.unexpected(), load.statuses

    # Kill again while the restarted pipeline works through the backlog.
    second = make_server(workers=2, data_dir=server.data_dir, env=env)
    lag_at_second_kill = lag_events(second)
    second.kill9()

    third = make_server(workers=2, data_dir=server.data_dir)
    stored = stored_ids(third)
    missing = load.acked - stored
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    sent = {m for r in load.acked_requests + load.unacked for m in r.ids}
    assert stored <= sent
    print(
        f"kill -9 with backlog: {len(load.acked)} events acknowledged, backlog {lag_at_kill}"
        f" events at the first kill and {lag_at_second_kill} at the second, {len(stored)} stored"
    )
    resend(third.url, load.unacked)
    assert stored_ids(third) == sent


def test_gateway_workers_exit_when_the_server_process_dies(make_server: MakeServer) -> None:
    """A worker left behind would hold the port and accept events nobody stores."""
    server = make_server(workers=2)
    assert server.proc is not None
    children = _children(server.proc.pid)
    assert children
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    try:
        assert wait_for(lambda: not any(alive(pid) for pid in children), 20), (
            "gateway workers outlived the server process"
        )
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    restarted = make_server(workers=2, data_dir=server.data_dir)
    assert restarted.post("/v1/track", {"userId": "u", "event": "after"}).status_code == 200


# -- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_with_requests_in_flight_exits_cleanly_and_keeps_acknowledged(
    make_server: MakeServer,
) -> None:
    server = make_server(workers=2)
    assert server.proc is not None
    children = _children(server.proc.pid)
    load = Load(server.url, "term", threads=4, per_thread=1000, seconds=6).start()
    assert wait_for(lambda: load.requests() >= 300 or not load.running(), 5)
    assert load.running()
    started = time.monotonic()
    code = server.stop(timeout=20)
    took = time.monotonic() - started
    load.stop()
    assert not load.unexpected(), load.statuses
    # Requests already being handled when the signal came are still answered.
    acked_after_signal = load.last_ack > started
    assert code == 0, server.log_text()[-2000:]
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert not any(alive(pid) for pid in children)

    restarted = make_server(workers=2, data_dir=server.data_dir)
    stored = stored_ids(restarted)
    assert load.acked <= stored, f"lost: {sorted(load.acked - stored)[:5]}"
    print(
        f"SIGTERM: {len(load.acked)} acknowledged, {len(stored)} stored, exit in {took:.2f} s,"
        f" acknowledgements after the signal: {acked_after_signal}, {dict(load.statuses)}"
    )


# -- full disk ----------------------------------------------------------------------------------


class Disk:
    """Makes writes under a server's data directory fail, then lets them succeed again."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.mounted = False
        self.limits: dict[int, tuple[int, int]] = {}

    def mount(self) -> None:
        if self.kind != "tmpfs":
            return
        self.root.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(self.root)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no mount command here; the rlimit case covers a full disk")
        if result.returncode != 0:
            reason = result.stderr.strip()
            pytest.skip(f"cannot mount a tmpfs here ({reason}); the rlimit case covers a full disk")
        self.mounted = True

    def fill(self, server: RunningServer) -> None:
        if self.kind == "tmpfs":
            with open(self.root / "filler", "wb") as filler:
                chunk = b"\0" * 65536
                with contextlib.suppress(OSError):
                    for _ in range(1024):
                        filler.write(chunk)
                        filler.flush()
            assert os.statvfs(self.root).f_bavail == 0
        else:
            # The closest real mechanism without a mount: no write may grow any file,
            # so every append fails with EFBIG, as it fails with ENOSPC on a full disk.
            assert server.proc is not None
            for pid in [server.proc.pid, *_children(server.proc.pid)]:
                self.limits[pid] = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, self.limits[pid][1]))

    def free(self) -> None:
        if self.kind == "tmpfs":
            (self.root / "filler").unlink()
        for pid, limits in self.limits.items():
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)

    def unmount(self) -> None:
        if self.mounted:
            result = subprocess.run(["umount", str(self.root)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], check=True)


@pytest.fixture(params=["tmpfs", "rlimit"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    disk = Disk(request.param, tmp_path / "disk")
    disk.mount()
    try:
        yield disk
    finally:
        disk.unmount()


def test_full_disk_answers_503_and_recovers_without_losing_acknowledged(
    disk: Disk, make_server: MakeServer
) -> None:
    data_dir = disk.root / "data" if disk.kind == "tmpfs" else None
    server = make_server(workers=1, data_dir=data_dir)
    try:
        acked: set[str] = set()
        sent = 0

        def post(n: int = 20) -> httpx.Response:
            nonlocal sent
            ids = [f"disk-{sent}-{i}" for i in range(n)]
            sent += 1
            batch = [
                {"type": "track", "event": "E", "userId": "u", "messageId": m, "properties": {}}
                for m in ids
            ]
            response = server.post("/v1/batch", {"batch": batch})
            if response.status_code == 200:
                acked.update(ids)
            return response

        for _ in range(5):
            assert post().status_code == 200
        assert server.proc is not None
        workers = _children(server.proc.pid)
        disk.fill(server)

        statuses: Counter[int] = Counter()
        for _ in range(200):
            response = post()
            statuses[response.status_code] += 1
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                assert response.headers["retry-after"].isdigit()
                body = response.json()
                assert body["success"] is False and body["code"], body
                if statuses[503] >= 20:
                    break
        assert statuses[503] >= 20, statuses
        ready = httpx.get(f"{server.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert server.proc.poll() is None
        assert _children(server.proc.pid) == workers, "a gateway worker died"

        disk.free()
        # Readiness comes back by itself: a balancer sends nothing to an unready gateway.
        assert wait_for(lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code == 200, 5)
        for _ in range(50):
            if post().status_code == 200:
                break
            time.sleep(0.1)
        for _ in range(5):
            assert post().status_code == 200
        assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 200
        stored = stored_ids(server, timeout=30)
        assert acked <= stored, f"lost: {sorted(acked - stored)[:5]}"
        print(f"full disk ({disk.kind}): {dict(statuses)} while full; {len(acked)} acked stored")
    finally:
        server.stop()


# -- overload -----------------------------------------------------------------------------------


def test_overload_answers_503_with_bounded_memory(make_server: MakeServer) -> None:
    server = make_server(workers=2, env={"HEADWATER_SERVER_MAX_PENDING_BYTES": "100000"})
    assert server.proc is not None
    workers = _children(server.proc.pid)
    baseline = max(rss_mb(pid) for pid in workers)
    # About 270 KB a request, from more clients than the log lets wait.
    load = Load(server.url, "big", threads=12, batch=250, per_thread=15, seconds=15, pad=1000)
    load.start()
    peak = baseline
    while load.running():
        peak = max(peak, *(rss_mb(pid) for pid in workers))
        time.sleep(0.05)
    load.stop()
    assert set(load.statuses) == {200, 503}, load.statuses
    assert load.statuses[200] > 0 and load.statuses[503] > 0, load.statuses
    assert peak < baseline + 200, f"worker RSS grew from {baseline} MB to {peak} MB"
    stored = stored_ids(server)
    assert load.acked <= stored
    print(f"overload: {dict(load.statuses)}; worker RSS {baseline} -> {peak} MB")


def test_overload_503_carries_retry_after_and_json(make_server: MakeServer) -> None:
    server = make_server(workers=1, env={"HEADWATER_SERVER_MAX_PENDING_BYTES": "1"})
    batch = [
        {"type": "track", "event": "E", "userId": "u", "messageId": f"o-{i}", "properties": {}}
        for i in range(200)
    ]
    body = json.dumps({"batch": batch}).encode()
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, auth=(WRITE_KEY, ""), timeout=30) as c:
            for _ in range(30):
                response = c.post("/v1/batch", content=body, headers=JSON)
                with lock:
                    responses.append(response)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    overloaded = [r for r in responses if r.status_code == 503]
    assert {r.status_code for r in responses} <= {200, 503}
    assert overloaded, "no request was refused"
    for response in overloaded[:5]:
        assert response.headers["retry-after"] == "1"
        assert response.json() == {
            "success": False,
            "code": "overloaded",
            "message": "too much waiting for the log",
            "field": "",
        }


# -- health -------------------------------------------------------------------------------------


def test_health_and_ready(server: RunningServer) -> None:
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "error": ""}
    assert httpx.head(f"{server.url}/health", timeout=5).status_code == 200
    refused = httpx.post(f"{server.url}/health", timeout=5)
    assert refused.status_code == 404


def test_bodies_in_flight_are_bounded(make_server: MakeServer) -> None:
    """Many slow concurrent uploads: past the budget the answer is 503, not more memory."""
    server = make_server(env={"HEADWATER_SERVER_MAX_INFLIGHT_BYTES": "300000"})
    body = json.dumps(
        {
            "batch": [
                {"type": "track", "userId": "u", "event": "E", "properties": {"blob": "x" * 20000}}
                for _ in range(10)
            ]
        }
    )

    def post(_: int) -> int:
        return httpx.post(
            f"{server.url}/v1/batch",
            content=body.encode(),
            headers={"Authorization": "Basic V1JJVEVfS0VZOg==", "Content-Type": "application/json"},
            timeout=30,
        ).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, range(64)))
    assert set(statuses) <= {200, 503}
    assert 200 in statuses
    assert 503 in statuses
