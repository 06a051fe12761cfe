"""Shared fixtures: a real ``headwater serve`` process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from headwater import config
from headwater.admin import AdminClient
from headwater.destinations.base import DestinationConfig

WRITE_KEY = "WRITE_KEY"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """A headwater server process and ways to look inside it."""

    def __init__(
        self,
        data_dir: Path,
        workers: int = 1,
        env: dict[str, str] | None = None,
        sources: list[config.Source] | None = None,
        destinations: list[DestinationConfig] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.write_key = WRITE_KEY
        self.env = {**os.environ, "HEADWATER_CONSOLE_PORT": "0", **(env or {})}
        self.env.pop("HEADWATER_DATA_DIR", None)
        if not config.config_path(data_dir).exists():
            settings = config.Settings(
                sources=sources or [config.Source(name="default", write_key=WRITE_KEY)],
                destinations=destinations or [],
            )
            config.save(data_dir, settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin: AdminClient | None = None

    def start(self) -> RunningServer:
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headwater.cli",
                "--data-dir",
                str(self.data_dir),
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    admin = AdminClient.connect(self.data_dir)
                    if admin is not None:
                        self._admin = admin
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready: {self.log_text()}")

    def log_text(self) -> str:
        path = self.data_dir / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def admin(self) -> AdminClient:
        assert self._admin is not None, "server not started"
        return self._admin

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        all_headers = {"Content-Type": "application/json"}
        if auth:
            all_headers["Authorization"] = "Basic V1JJVEVfS0VZOg=="
        all_headers.update(headers or {})
        if content is None:
            content = json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, headers=all_headers, timeout=30)

    def query(self, sql: str) -> list[dict[str, Any]]:
        result = self.admin.query(sql)
        return [dict(zip(result.columns, row, strict=True)) for row in result.rows]

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the pipeline has stored everything in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lag = self.admin.status()["log"]
            if lag["lag_records"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"pipeline did not catch up: {lag}")

    def events(self, where: str = "true") -> list[dict[str, Any]]:
        self.settle()
        return self.query(f"SELECT * FROM events WHERE {where} ORDER BY log_offset, message_id")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def kill9(self) -> None:
        """SIGKILL the server and its gateway workers, as a crash would."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def factory(**kwargs: Any) -> RunningServer:
        data_dir = kwargs.pop("data_dir", None) or tmp_path / f"data{len(started)}"
        server = RunningServer(Path(data_dir), **kwargs)
        started.append(server.start())
        return server

    yield factory
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


def settle_deliveries(server: RunningServer, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the log is read and no destination has events pending; their status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.admin.status()
        destinations = status["destinations"]
        if status["log"]["lag_records"] == 0 and all(
            d.get("pending", 0) == 0 for d in destinations.values()
        ):
            return dict(destinations)
        time.sleep(0.05)
    raise AssertionError(f"deliveries did not settle: {server.admin.status()}")


def reconciled(counters: dict[str, int]) -> int:
    """accepted - (delivered + filtered + dead_lettered): zero once deliveries settle."""
    return counters.get("accepted", 0) - (
        counters.get("delivered", 0)
        + counters.get("filtered", 0)
        + counters.get("dead_lettered", 0)
    )
