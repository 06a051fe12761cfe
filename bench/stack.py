"""headwater's server stack with a chosen application, without the pipeline.

``worker`` is headwater's own ``serve.run_worker``, so the listening socket
(``serve.bind``), the spawned worker processes and every uvicorn setting are
the ones ``headwater serve`` runs with.  The application is either

- ``noop``: the baseline.  The gateway is swapped for ``NoopApp``, which reads
  the whole body and answers ``200 {"success": true}`` as the gateway does on
  success; only the application differs from headwater.
- ``gateway``: headwater's real gateway and group committer, unchanged, but no
  pipeline runs in the main process.  Compared with ``headwater serve`` this
  shows what the pipeline costs the gateway (its CPU, and its commits to the
  log, which take the same SQLite write lock).
- ``gateway-sharded``: the same, but each worker's SQLite log writer opens a
  file of its own (``log.sqlite`` becomes ``log-PID.sqlite``), so the workers
  never wait for each other's write lock.  An experiment, not a supported
  layout: nothing reads these logs.  ``run.py`` checks that the files exist.

    python bench/stack.py --app noop|gateway|gateway-sharded --data-dir DIR --workers 2

It binds a free loopback port and writes ``{"host": ..., "port": ...}`` to
``DIR/run/serve.json``.  SIGTERM or SIGINT stops it and its workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

OK_BODY = b'{"success": true}'
OK_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"17")]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class NoopApp:
    """Reads the request body and answers 200; takes the gateway's arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if not message.get("more_body", False):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": OK_HEADERS})
            await send({"type": "http.response.body", "body": OK_BODY})
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return


class IdleCommitter:
    """Stands in for the group committer: opens no log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def worker(app_name: str, data_dir: str, sock: socket.socket) -> None:
    """headwater's ``run_worker``; for ``noop`` with ``NoopApp`` as the gateway."""
    from headwater import serve

    if app_name == "gateway-sharded":
        # At the writer class, however the gateway finds its log.
        from headwater.log import sqlite as sqlite_log

        pid = os.getpid()
        open_writer = sqlite_log.SQLiteLogWriter.__init__

        def sharded(self: Any, path: Path, *args: Any, **kwargs: Any) -> None:
            path = Path(path)
            own = path.with_name(f"{path.stem}-{pid}{path.suffix}")
            open_writer(self, own, *args, **kwargs)

        sqlite_log.SQLiteLogWriter.__init__ = sharded  # type: ignore[method-assign]
    if app_name == "noop":
        from headwater.gateway import app, committer

        app.Gateway = NoopApp  # type: ignore[misc,assignment]
        committer.Committer = IdleCommitter  # type: ignore[misc,assignment]
    serve.run_worker(data_dir, sock)


def main() -> int:
    from headwater import serve

    parser = argparse.ArgumentParser(description="headwater's server stack, no pipeline")
    parser.add_argument("--app", choices=("noop", "gateway", "gateway-sharded"), default="noop")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    sock = serve.bind(args.host, 0)
    port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(args.app, str(args.data_dir), sock))
        for _ in range(args.workers)
    ]
    for proc in procs:
        proc.start()
    run_dir = args.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "serve.json").write_text(json.dumps({"host": args.host, "port": port}))
    try:
        while not stop.wait(0.5):
            if not all(proc.is_alive() for proc in procs):
                return 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
