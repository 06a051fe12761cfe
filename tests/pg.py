"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

``initdb`` and ``pg_ctl`` are found on PATH or under Debian's
``/usr/lib/postgresql/<version>/bin``.  PostgreSQL refuses to run as root, so
when the tests run as root the cluster runs as the ``postgres`` user (or
``nobody``) in a temporary directory that user owns.  Connections are TCP on
127.0.0.1 only, with trust authentication for the cluster's one superuser.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "headwater"
# The tests read the warehouse through a session in this zone, never UTC (BC-30).
TIME_ZONE = "America/New_York"


def find_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> str | None:
    """The user to run PostgreSQL as: None for ourselves, else a non-root account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


def _temp_parent(user: str | None) -> str | None:
    """Where the cluster's directory goes: somewhere the other user can reach."""
    default = Path(tempfile.gettempdir()).resolve()
    if user is None or all(p.stat().st_mode & 0o001 for p in [default, *default.parents]):
        return None
    return "/tmp"


class Cluster:
    """One PostgreSQL server: ``start()``, ``dsn()``, ``create_database()``, ``stop()``."""

    def __init__(self, durable: bool = False, time_zone: str = TIME_ZONE) -> None:
        binaries = find_binaries()
        if binaries is None:
            raise FileNotFoundError("initdb not found (install the postgresql package)")
        self.bin = binaries
        self.durable = durable
        self.time_zone = time_zone
        self.user = _run_as()
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="headwater-pg-", dir=_temp_parent(self.user)))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    def _command(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        return ["runuser", "-u", self.user, "--", *args]

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            self._command(*args), capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{log}")

    def start(self) -> Cluster:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.root}",
            f"-c timezone={self.time_zone}",
            "-c max_connections=50",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            " ".join(options),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def create_database(self) -> str:
        """A fresh database; its DSN."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(durable: bool = False) -> Iterator[Cluster]:
    cluster = Cluster(durable=durable)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server for the whole session.

    Without psycopg or PostgreSQL's binaries the tests skip, except in CI
    (``CI=true``), where that is an error.
    """
    missing = ""
    if find_binaries() is None:
        missing = "PostgreSQL server binaries (initdb) not found; scripts/test installs them"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = 'psycopg is not installed: pip install -e ".[test]"'
    if missing and os.environ.get("CI") == "true":
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def warehouse_dsn(postgres_cluster: Cluster) -> str:
    """A DSN for a database of its own, on the session's server."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return postgres_cluster.create_database()
        except Exception:
            # CREATE DATABASE fails while another session uses the template.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
