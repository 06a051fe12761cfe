#!/usr/bin/env python3
"""A single-node Apache Kafka for tests and local use: broker and KRaft controller in one JVM.

    broker.py fetch [--allow-missing-tools]   resolve the broker's jars once (needs mvn)
    broker.py start DIR [--port N] [--json]   format DIR if new, start, wait until ready
    broker.py stop DIR [--timeout S]          stop the broker started from DIR, by its PID
    broker.py status DIR                      say whether it runs, and where

The jars come from Maven Central through ``ci/kafka/pom.xml`` and are copied
into ``.cache/kafka/<version>-<pom digest>/lib`` (git-ignored); a changed pom
fetches again.  ``start`` writes ``server.properties`` into DIR with free
loopback ports (or the ones given), formats the storage with a random cluster
id, starts ``kafka.Kafka`` in its own session with its output in
``DIR/broker.log`` and its PID in ``DIR/broker.pid``, and returns once the
broker answers a Metadata request listing itself.  Started again on the same
DIR it keeps the ports, the cluster id and the data.

Only the standard library is used, so this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POM = HERE / "pom.xml"
LOG_CONFIG = HERE / "log4j2.properties"
CACHE = REPO / ".cache" / "kafka"
MIN_JAVA = 17
DEFAULT_HEAP = "512m"
READY_TIMEOUT_S = 90.0


class BrokerError(Exception):
    """Something the user has to fix; the message says what."""


class ToolMissing(BrokerError):
    """Java or Maven is not installed."""


# ---------------------------------------------------------------- fetching


def kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{POM.name}: no kafka.version property")
    return (node.text or "").strip()


def lib_dir() -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return CACHE / f"{kafka_version()}-{digest}" / "lib"


def fetch(quiet: bool = False) -> Path:
    """The directory holding the broker's jars, resolving them with Maven if needed."""
    lib = lib_dir()
    stamp = lib.parent / "complete"
    if stamp.exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolMissing("mvn (Apache Maven 3.6+) is not on PATH; it fetches the Kafka jars")
    if not quiet:
        print(f"fetching Apache Kafka {kafka_version()} from Maven Central ...", file=sys.stderr)
    staging = lib.parent.with_name(f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging / 'lib'}",
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not list((staging / "lib").glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"resolving the Kafka jars failed ({' '.join(command[1:])}, exit"
            f" {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    if lib.parent.exists():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(lib.parent)
    stamp.write_text(f"{kafka_version()}\n")
    if not quiet:
        jars = len(list(lib.glob("*.jar")))
        print(
            f"Kafka jars ready: {jars} jars in {lib.relative_to(REPO)}"
            f" ({time.monotonic() - started:.1f} s)",
            file=sys.stderr,
        )
    return lib


def java_command() -> str:
    java = shutil.which("java")
    if java is None:
        raise ToolMissing(f"java (a JDK or JRE {MIN_JAVA}+) is not on PATH; the broker needs it")
    result = subprocess.run([java, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0_x"
            major = int(match.group(2))
        if major < MIN_JAVA:
            raise BrokerError(f"Kafka {kafka_version()} needs Java {MIN_JAVA}+; found {major}")
    return java


# ---------------------------------------------------------------- the node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_properties(data: Path, port: int, controller_port: int) -> str:
    return f"""\
# A single Kafka node: broker and KRaft controller in one process, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
# One node, so every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Topics are created on purpose, never by a typo in a producer's settings.
auto.create.topics.enable=false
num.partitions=1
num.network.threads=2
num.io.threads=2
"""


def read_properties(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def ports_of(props: dict[str, str]) -> tuple[int, int]:
    listeners = dict(
        re.match(r"(\w+)://[^,]*:(\d+)$", part.strip()).groups()
        for part in props["listeners"].split(",")
    )
    return int(listeners["PLAINTEXT"]), int(listeners["CONTROLLER"])


def random_cluster_id() -> str:
    """A Kafka ``Uuid`` as ``kafka-storage random-uuid`` prints it (URL-safe base64)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def brokers_listed(port: int, timeout: float = 2.0) -> int:
    """Send a Metadata request (v4, no topics); the number of brokers in the answer."""
    client = b"headwater-probe"
    correlation = 41
    header = struct.pack(">hhih", 3, 4, correlation, len(client)) + client
    body = struct.pack(">i?", 0, False)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        request = header + body
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv(sock, 4))
        answer = _recv(sock, size)
    got, _throttle, brokers = struct.unpack(">iii", answer[:12])
    if got != correlation:
        raise ConnectionError("unexpected correlation id")
    return int(brokers)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _is_our_broker(pid: int, props: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return pid_alive(pid)  # no /proc: trust the PID file
    return b"kafka.Kafka" in cmdline and str(props).encode() in cmdline


def running_pid(directory: Path) -> int | None:
    pid_file = directory / "broker.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    if pid > 0 and pid_alive(pid) and _is_our_broker(pid, directory / "server.properties"):
        return pid
    return None


def log_tail(directory: Path, lines: int = 40) -> str:
    path = directory / "broker.log"
    if not path.exists():
        return "(no broker.log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start(
    directory: Path,
    port: int = 0,
    controller_port: int = 0,
    heap: str = DEFAULT_HEAP,
    timeout: float = READY_TIMEOUT_S,
) -> dict[str, Any]:
    started = time.monotonic()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    java = java_command()
    lib = fetch()
    if running_pid(directory) is not None:
        raise BrokerError(f"a broker already runs from {directory} (see broker.pid)")
    props_path = directory / "server.properties"
    if not props_path.exists():
        port = port or free_port()
        while not controller_port or controller_port == port:
            controller_port = free_port()
        props_path.write_text(server_properties(directory / "data", port, controller_port))
    port, controller_port = ports_of(read_properties(props_path))
    classpath = str(lib / "*")
    if not (directory / "data" / "meta.properties").exists():
        cluster_id = random_cluster_id()
        result = subprocess.run(
            [
                java,
                "-Xmx256m",
                "-cp",
                classpath,
                f"-Dlog4j2.configurationFile={LOG_CONFIG}",
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                cluster_id,
                "--config",
                str(props_path),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting {directory / 'data'} failed:\n{result.stdout}")
    cluster_id = read_properties(directory / "data" / "meta.properties").get("cluster.id", "")
    command = [
        java,
        "-Xms128m",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-XX:TieredStopAtLevel=1",  # quicker start on a small machine; peak speed is not needed
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG_CONFIG}",
        f"-Dkafka.logs.dir={directory}",
        "-cp",
        classpath,
        "kafka.Kafka",
        str(props_path),
    ]
    with open(directory / "broker.log", "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )
    (directory / "broker.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (directory / "broker.pid").unlink(missing_ok=True)
            raise BrokerError(
                f"the broker exited with status {proc.returncode}:\n{log_tail(directory)}"
            )
        with contextlib.suppress(OSError):
            if brokers_listed(port) > 0:
                break
        if time.monotonic() > deadline:
            stop(directory)
            raise BrokerError(
                f"the broker was not ready in {timeout:.0f} s:\n{log_tail(directory)}"
            )
        time.sleep(0.1)
    return {
        "bootstrap_servers": f"127.0.0.1:{port}",
        "port": port,
        "controller_port": controller_port,
        "pid": proc.pid,
        "cluster_id": cluster_id,
        "kafka_version": kafka_version(),
        "dir": str(directory),
        "log": str(directory / "broker.log"),
        "startup_seconds": round(time.monotonic() - started, 2),
    }


def stop(directory: Path, timeout: float = 30.0) -> bool:
    """Stop the broker started from ``directory``: SIGTERM, then SIGKILL; False if none ran."""
    directory = directory.resolve()
    pid = running_pid(directory)
    if pid is None:
        (directory / "broker.pid").unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid):
            with contextlib.suppress(ChildProcessError):  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not pid_alive(pid):
            break
    (directory / "broker.pid").unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_fetch = commands.add_parser("fetch", help="resolve the broker's jars into .cache/kafka")
    p_fetch.add_argument(
        "--allow-missing-tools",
        action="store_true",
        help="without java or mvn, say so and exit 0 (the Kafka tests then skip)",
    )
    p_start = commands.add_parser("start", help="start a broker from DIR (created if new)")
    p_start.add_argument("dir", type=Path)
    p_start.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    p_start.add_argument("--controller-port", type=int, default=0)
    p_start.add_argument("--heap", default=DEFAULT_HEAP, help="maximum Java heap (-Xmx)")
    p_start.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    p_start.add_argument("--json", action="store_true", help="print the details as JSON")
    p_stop = commands.add_parser("stop", help="stop the broker started from DIR")
    p_stop.add_argument("dir", type=Path)
    p_stop.add_argument("--timeout", type=float, default=30.0)
    p_status = commands.add_parser("status", help="whether a broker runs from DIR")
    p_status.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            try:
                java_command()
                fetch()
            except ToolMissing as exc:
                if not args.allow_missing_tools:
                    raise
                print(f"{exc}: the tests that need Kafka will be skipped", file=sys.stderr)
            return 0
        if args.command == "start":
            info = start(args.dir, args.port, args.controller_port, args.heap, args.timeout)
            if args.json:
                print(json.dumps(info))
            else:
                print(
                    f"Kafka {info['kafka_version']} ready at {info['bootstrap_servers']}"
                    f" (pid {info['pid']}, {info['startup_seconds']} s); log: {info['log']}"
                )
            return 0
        if args.command == "stop":
            print("stopped" if stop(args.dir, args.timeout) else "not running")
            return 0
        pid = running_pid(args.dir.resolve())
        if pid is None:
            print("not running")
            return 3
        port, _ = ports_of(read_properties(args.dir.resolve() / "server.properties"))
        print(f"running: pid {pid}, bootstrap 127.0.0.1:{port}")
        return 0
    except BrokerError as exc:
        print(f"broker.py {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
