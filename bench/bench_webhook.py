"""Webhook delivery: events per second and latency from acknowledgement to receipt.

    python bench/bench_webhook.py [--modes single,batch] [--rate 200] [--seconds 4]

For each webhook mode (``single``: one event per request; ``batch``: one JSON
array per request, the destination's default batch settings) the script starts
a real ``headwater serve`` whose only destination is a webhook aimed at a fast
loopback receiver (a separate process: asyncio + uvloop, answers 200 at once,
records the ``time.monotonic()`` of every request's arrival, which on Linux
is one clock for all processes), then measures:

1. saturation: ``--events-single`` / ``--events-batch`` events posted to
   ``/v1/batch`` as fast as one client can, and the webhook's delivered events
   per second from the first arrival to the last (bounded by ``--drain``
   seconds; whatever has not arrived by then is reported as missing);
2. latency: single-event ``POST /v1/track`` at ``--rate`` events/s for
   ``--seconds`` seconds; each event's latency runs from the moment its 200
   reached the client to its arrival at the receiver; p50/p99 over every event;
3. baseline: the receiver's own throughput for the same request shape (a body
   the receiver got from headwater in step 1, the largest one) posted
   back to back by one keep-alive client, as headwater's one delivery loop
   per destination does, for ``--baseline-seconds``.

All traffic goes to 127.0.0.1 ports the script opened; every process it starts
is stopped by its PID; data lives in a temporary directory. The result is a
Markdown table (or ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402
from openloop import percentiles  # noqa: E402

SECRET = "whsec_YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2gtYmVuY2g="  # signing on, as in production
CONTROL = "/__control"

# -- the receiver (its own process) ------------------------------------------------------


class _Receiver(asyncio.Protocol):
    """Minimal HTTP/1.1 with keep-alive: answers 200 at once, keeps (arrival, body)."""

    records: list[tuple[float, bytes]] = []
    # While held, requests are recorded but not answered, so a backlog builds up.
    held: list[tuple[asyncio.Transport, bytes]] | None = None
    released = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

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
            arrived = time.monotonic()
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            if head.split(b" ", 2)[1].startswith(CONTROL.encode()):
                answer = self.control(head.split(b" ", 2)[1].decode()[len(CONTROL) :])
            else:
                _Receiver.records.append((arrived, body))
                answer = b"{}"
                if _Receiver.held is not None:
                    _Receiver.held.append((self.transport, answer))
                    continue
            self.transport.write(response(answer))

    @staticmethod
    def control(command: str) -> bytes:
        records = _Receiver.records
        if command == "/count":
            return json.dumps({"requests": len(records)}).encode()
        if command == "/hold":
            _Receiver.held = []
            return b"{}"
        if command == "/release":
            held, _Receiver.held = _Receiver.held or [], None
            _Receiver.released = time.monotonic()
            for transport, answer in held:
                transport.write(response(answer))
            return json.dumps({"released": len(held)}).encode()
        # /dump: every messageId's first arrival, the largest body, and reset.
        released = _Receiver.released
        arrivals: dict[str, float] = {}
        events = 0
        largest = b""
        for arrived, body in records:
            decoded = json.loads(body)
            for event in decoded if isinstance(decoded, list) else [decoded]:
                events += 1
                arrivals.setdefault(str(event.get("messageId")), arrived)
            if len(body) > len(largest):
                largest = body
        _Receiver.records = []
        _Receiver.released = 0.0
        return json.dumps(
            {
                "requests": len(records),
                "events": events,
                "arrivals": arrivals,
                "first": min((r[0] for r in records), default=0.0),
                "last": max((r[0] for r in records), default=0.0),
                "largest": largest.decode(),
                "released": released,
                # (arrival, events) of every request that arrived after the release
                "after_release": [
                    [arrived, _events_in(body)]
                    for arrived, body in records
                    if released and arrived > released
                ],
            }
        ).encode()


def response(answer: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(answer)).encode()
        + b"\r\n\r\n"
        + answer
    )


def _events_in(body: bytes) -> int:
    return body.count(b'"messageId"')


def serve_receiver() -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Receiver, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    uvloop.run(main())


# -- processes --------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_headwater(
    data_dir: Path, hook_url: str, mode: str
) -> tuple[subprocess.Popen[bytes], str]:
    from headwater import config
    from headwater.destinations.base import DestinationConfig

    settings = config.Settings(
        sources=[config.Source(name="default", write_key=workload.WRITE_KEY)],
        destinations=[
            DestinationConfig(
                name="hook",
                kind="webhook",
                settings={
                    "url": hook_url,
                    "mode": mode,
                    "secret": SECRET,
                    "allow_networks": ["127.0.0.0/8"],
                },
            )
        ],
    )
    config.save(data_dir, settings)
    port = free_port()
    env = {**os.environ, "HEADWATER_CONSOLE_PORT": "0"}
    env.pop("HEADWATER_DATA_DIR", None)
    argv = [sys.executable, "-m", "headwater.cli", "--data-dir", str(data_dir), "serve"]
    argv += ["--port", str(port), "--workers", "1"]
    with open(data_dir / "serve.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((data_dir / "serve.log").read_text(errors="replace"))
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("headwater did not become ready")


# -- measurements -----------------------------------------------------------------------

HEADERS = {"Content-Type": "application/json", "Authorization": workload.AUTHORIZATION}


def control(client: httpx.Client, receiver: str, command: str) -> dict[str, Any]:
    return dict(client.post(f"{receiver}{CONTROL}/{command}", timeout=60).json())


def wait_for(client: httpx.Client, receiver: str, ids: set[str], drain: float) -> dict[str, Any]:
    """Poll until every id could have arrived (by request count) or ``drain`` passes."""
    deadline = time.monotonic() + drain
    previous, still = -1, 0.0
    while time.monotonic() < deadline:
        dump_due = control(client, receiver, "count")["requests"]
        if dump_due == previous:
            still = still or time.monotonic()
            if time.monotonic() - still > 1.0:  # nothing new for a second: drained
                break
        else:
            previous, still = dump_due, 0.0
        time.sleep(0.1)
    return control(client, receiver, "dump")


def settle(data_dir: Path, timeout: float = 30.0) -> None:
    """Wait until headwater's pipeline has processed everything in its log."""
    from headwater.admin import AdminClient

    admin = AdminClient.connect(data_dir)
    if admin is None:
        raise RuntimeError("no admin API")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin.status()["log"]["lag_records"] == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("pipeline did not catch up")


def saturation(
    client: httpx.Client,
    url: str,
    data_dir: Path,
    receiver: str,
    run: str,
    events: int,
    drain: float,
) -> dict[str, Any]:
    now = workload.now_iso()
    ids: set[str] = set()
    control(client, receiver, "hold")  # the first delivery waits until everything is loaded
    started = time.monotonic()
    for first in range(0, events, 100):
        size = min(100, events - first)
        body = workload.batch(run, first, size, now).encode()
        response = client.post(f"{url}/v1/batch", content=body, headers=HEADERS)
        response.raise_for_status()
        ids.update(f"{run}-{first + i}" for i in range(size))
        if time.monotonic() - started > drain:
            break
    loaded = time.monotonic() - started
    settle(data_dir)
    control(client, receiver, "release")
    dump = wait_for(client, receiver, ids, drain)
    got = set(dump["arrivals"]) & ids
    after = dump["after_release"]
    span = max(1e-9, max((a for a, _ in after), default=0.0) - dump["released"])
    return {
        "sent": len(ids),
        "delivered": len(got),
        "missing": len(ids - got),
        "duplicates_or_extra": dump["events"] - len(got),
        "requests": dump["requests"],
        "load_seconds": round(loaded, 3),
        "delivery_seconds": round(span, 3),
        "after_release": sum(n for _, n in after),
        "events_per_s": round(sum(n for _, n in after) / span),
        "largest": dump["largest"],
    }


def latency(
    client: httpx.Client,
    url: str,
    receiver: str,
    run: str,
    rate: float,
    seconds: float,
    drain: float,
) -> dict[str, Any]:
    acked: dict[str, float] = {}
    count = int(rate * seconds)
    start = time.monotonic()
    behind = 0.0
    for i in range(count):
        due = start + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            behind = max(behind, -pause)
        message_id = f"{run}-{i}"
        body = workload.event(message_id, i, workload.now_iso()).encode()
        response = client.post(f"{url}/v1/track", content=body, headers=HEADERS)
        response.raise_for_status()
        acked[message_id] = time.monotonic()
        if time.monotonic() - start > seconds * 3:  # bounded even if the server stalls
            break
    achieved = len(acked) / (time.monotonic() - start)
    dump = wait_for(client, receiver, set(acked), drain)
    arrivals = dump["arrivals"]
    values = [arrivals[m] - t for m, t in acked.items() if m in arrivals]
    p50, p99, top = percentiles(values, (50, 99, 100))
    return {
        "rate": rate,
        "achieved_rate": round(achieved, 1),
        "client_max_behind_ms": round(behind * 1000, 1),
        "events": len(acked),
        "missing": len(acked) - len(values),
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(top * 1000, 1),
    }


def baseline(client: httpx.Client, receiver: str, body: str, seconds: float) -> dict[str, Any]:
    decoded = json.loads(body)
    per_request = len(decoded) if isinstance(decoded, list) else 1
    content = body.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "bench"}
    requests = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        client.post(f"{receiver}/hook", content=content, headers=headers).raise_for_status()
        requests += 1
    elapsed = time.monotonic() - start
    control(client, receiver, "dump")
    return {
        "events_per_request": per_request,
        "body_bytes": len(content),
        "requests": requests,
        "events_per_s": round(requests * per_request / elapsed),
    }


def run_mode(args: argparse.Namespace, receiver: str, mode: str, tmp: Path) -> dict[str, Any]:
    events = args.events_batch if mode == "batch" else args.events_single
    data_dir = tmp / f"data-{mode}"
    proc, url = start_headwater(data_dir, f"{receiver}/hook", mode)
    try:
        with httpx.Client(timeout=30) as client:
            control(client, receiver, "dump")
            sat = saturation(client, url, data_dir, receiver, f"sat-{mode}", events, args.drain)
            lat = latency(client, url, receiver, f"lat-{mode}", args.rate, args.seconds, args.drain)
    finally:
        stop_process(proc)
    with httpx.Client(timeout=30) as client:
        base = baseline(client, receiver, sat.pop("largest"), args.baseline_seconds)
    return {"mode": mode, "saturation": sat, "latency": lat, "baseline": base}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Run of {result['date']}: commit {result['commit']}, {result['cpus']} CPUs,"
        f" load average {result['load_before']} before, {result['load_after']} after.",
        "",
        "| mode | delivered events/s | receiver alone, events/s | ratio | requests"
        f" | p50 at {result['rate']:g}/s | p99 | max | missing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["modes"]:
        sat, lat, base = row["saturation"], row["latency"], row["baseline"]
        lines.append(
            f"| {row['mode']} | {sat['events_per_s']:,} ({sat['after_release']:,} in"
            f" {sat['delivery_seconds']} s) | {base['events_per_s']:,}"
            f" ({base['events_per_request']}/request, {base['body_bytes']:,} B)"
            f" | {sat['events_per_s'] / max(1, base['events_per_s']):.0%}"
            f" | {sat['requests']:,} | {lat['p50_ms']} ms | {lat['p99_ms']} ms"
            f" | {lat['max_ms']} ms | {sat['missing'] + lat['missing']} |"
        )
    worst = max(row["latency"]["p99_ms"] for row in result["modes"])
    lines += [
        "",
        f"Target webhook p99 ≤ 1 s: {'met' if worst <= 1000 else 'not met'}"
        f" (worst p99 {worst} ms).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="single,batch")
    parser.add_argument("--events-single", type=int, default=4000)
    parser.add_argument("--events-batch", type=int, default=30000)
    parser.add_argument("--rate", type=float, default=200.0, help="events/s for latency")
    parser.add_argument("--seconds", type=float, default=4.0, help="latency load duration")
    parser.add_argument("--drain", type=float, default=20.0, help="max wait for deliveries")
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        serve_receiver()
        return 0
    args.seconds = min(args.seconds, 30.0)
    args.drain = min(args.drain, 60.0)
    args.baseline_seconds = min(args.baseline_seconds, 30.0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit or "?",
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rate": args.rate,
        "modes": [],
    }
    receiver_proc = subprocess.Popen(
        [sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE
    )
    try:
        assert receiver_proc.stdout is not None
        receiver = f"http://127.0.0.1:{int(receiver_proc.stdout.readline())}"
        with tempfile.TemporaryDirectory(prefix="headwater-bench-webhook-") as tmp:
            for mode in args.modes.split(","):
                result["modes"].append(run_mode(args, receiver, mode.strip(), Path(tmp)))
    finally:
        stop_process(receiver_proc)
    result["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
