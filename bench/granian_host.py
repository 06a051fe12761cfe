"""headwater's gateway, or the no-op app, served by granian instead of uvicorn.

    python bench/granian_host.py --app gateway|noop --data-dir DIR --port P --workers N

``gateway`` is built by headwater's own ``serve.run_worker`` (its uvicorn
server is intercepted before it starts, and granian serves the app instead),
so the gateway and its group committer are exactly what ``headwater serve``
runs.  No pipeline runs here: compare with ``stack.py --app gateway``, the
same on uvicorn.  Workers are spawned, as headwater spawns its own.

It writes ``DIR/run/serve.json``; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "HEADWATER_BENCH_DATA_DIR"


def gateway_app() -> Any:
    """Factory run in each granian worker: the app ``run_worker`` would serve."""
    import uvicorn

    from headwater import serve

    captured: dict[str, Any] = {}

    class Intercept:
        def __init__(self, config: Any) -> None:
            captured["app"] = config.app
            self.should_exit = False

        def run(self, sockets: Any = None) -> None:
            return None

    real = uvicorn.Server
    uvicorn.Server = Intercept
    try:
        serve.run_worker(os.environ[DATA_DIR_ENV], None)  # type: ignore[arg-type]
    finally:
        uvicorn.Server = real
    return captured["app"]


def noop_app() -> Any:
    from stack import NoopApp

    return NoopApp()


def main() -> int:
    from granian import Granian

    parser = argparse.ArgumentParser(description="serve on granian")
    parser.add_argument("--app", choices=("gateway", "noop"), required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ[DATA_DIR_ENV] = str(args.data_dir)
    multiprocessing.set_start_method("spawn", force=True)

    run_dir = args.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "serve.json").write_text(json.dumps({"host": args.host, "port": args.port}))
    server = Granian(
        f"granian_host:{args.app}_app",
        address=args.host,
        port=args.port,
        interface="asgi",  # type: ignore[arg-type]
        workers=args.workers,
        loop="uvloop",  # type: ignore[arg-type]
        http="1",  # type: ignore[arg-type]
        websockets=False,
        backlog=2048,
        log_level="warning",  # type: ignore[arg-type]
        factory=True,
        working_dir=Path(__file__).resolve().parent,
    )
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
