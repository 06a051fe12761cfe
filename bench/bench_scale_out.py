"""Scale-out benchmark: headwater on one Kafka log and one PostgreSQL store, one node or two.

    python bench/bench_scale_out.py [--record] [--seconds 3] [--rounds 2] [--drain-events 60000]

One run starts a single-node Kafka broker (``ci/kafka/broker.py``) and a
throwaway PostgreSQL (``tests/pg.py``, fsync on) on free loopback ports, then
measures, in about three minutes on two cores:

- gateway: events accepted per second by ``/v1/track`` (wrk with
  ``lua/post.lua``, 100 connections in all, a few seconds a run) with one
  ``headwater serve`` node on Kafka and PostgreSQL, then with two nodes on the
  same log and store (one wrk per node, 50 connections each); the embedded
  shape (SQLite log, DuckDB store, one node) under the same load is the
  baseline, measured in both halves of the phase.  CPU of every process
  (gateway workers, each node's main process, broker, PostgreSQL, wrk) is read
  from ``/proc`` from the start of the load until the pipelines have stored
  everything it left behind.
- recovery: under a steady open-loop load on node A (``openloop.py``), node B
  is stopped with SIGTERM (its pipeline leaves the consumer group), kept down
  a few seconds and started again; the pipeline group's lag, sampled every
  100 ms from the broker, shows how long it takes to return to its level
  before the stop.
- drain: a backlog of N single-event records in the raw topic, drained by one
  pipeline, then (another backlog) by two pipelines in one consumer group,
  each a process running headwater's ``Pipeline`` built as ``headwater serve``
  builds it; the baseline is the embedded pipeline draining the same backlog
  from a SQLite log into DuckDB.

Every load is bounded in time and count; all traffic goes to 127.0.0.1 ports
that this run's processes bound; every process it starts is stopped by its
PID.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"
TESTS = ROOT / "tests"
BROKER = ROOT / "ci" / "kafka" / "broker.py"
LUA = BENCH / "lua" / "post.lua"
RESULTS = BENCH / "RESULTS.md"
MARK = "<!-- bench/bench_scale_out.py results: {} -->"
WRITE_KEY = "WRITE_KEY"
REBALANCE_DELAY_MS = 3000

for path in (SRC, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import run  # noqa: E402  (bench/run.py: process table, wrk, Host)
from run import say  # noqa: E402

# ----------------------------------------------------------------- services


class Broker:
    """One Kafka node (broker and KRaft controller) through ci/kafka/broker.py."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.info: dict[str, Any] = {}

    @property
    def bootstrap(self) -> str:
        return str(self.info["bootstrap_servers"])

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def start(self) -> Broker:
        # broker.py keeps a server.properties it finds: write its own, with one change.
        # Kafka's default group.initial.rebalance.delay.ms (3 s) lets pipelines that
        # start together join before the first assignment; the test helper sets 0.
        spec = importlib.util.spec_from_file_location("kafka_broker_script", BROKER)
        assert spec is not None and spec.loader is not None
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        self.directory.mkdir(parents=True)
        port = script.free_port()
        controller = script.free_port()
        while controller == port:
            controller = script.free_port()
        properties = script.server_properties(self.directory / "data", port, controller)
        properties = properties.replace(
            "group.initial.rebalance.delay.ms=0",
            f"group.initial.rebalance.delay.ms={REBALANCE_DELAY_MS}",
        )
        (self.directory / "server.properties").write_text(properties)
        done = subprocess.run(
            [sys.executable, str(BROKER), "start", str(self.directory), "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode:
            raise RuntimeError(f"the Kafka broker did not start:\n{done.stderr}")
        self.info = json.loads(done.stdout)
        return self

    def stop(self) -> None:
        if self.info:
            subprocess.run(
                [sys.executable, str(BROKER), "stop", str(self.directory)],
                capture_output=True,
                timeout=60,
                check=False,
            )


class Postgres:
    """A throwaway PostgreSQL cluster (tests/pg.py), durable: fsync and synchronous commit on."""

    def __init__(self) -> None:
        sys.path.insert(0, str(TESTS))
        import pg  # tests/pg.py

        self.cluster = pg.Cluster(durable=True, time_zone="UTC")
        self.dsn = ""
        self.version = ""

    def start(self) -> Postgres:
        import psycopg

        self.cluster.start()
        self.dsn = self.cluster.create_database()
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            self.version = str(row[0]) if row else "?"
        return self

    def pids(self) -> list[int]:
        pid_file = self.cluster.data / "postmaster.pid"
        try:
            postmaster = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *run.descendants(postmaster, run.process_table())]

    def stop(self) -> None:
        self.cluster.stop()


# ----------------------------------------------------------------- settings and nodes


def embedded_settings() -> Any:
    from headwater import config

    return config.Settings(sources=[config.Source(name="default", write_key=WRITE_KEY)])


def scale_out_settings(ctx: Ctx, prefix: str, schema: str) -> Any:
    """Both sections of a node on the shared log and store; every other setting default."""
    from headwater import config

    return config.Settings(
        sources=[config.Source(name="default", write_key=WRITE_KEY)],
        log=config.LogSettings(
            backend="kafka",
            kafka_bootstrap_servers=ctx.broker.bootstrap,
            kafka_topic_prefix=prefix,
            kafka_partitions=ctx.args.partitions,
            kafka_replication_factor=1,
        ),
        store=config.StoreSettings(backend="postgres", dsn=ctx.pg.dsn, schema=schema),
    )


class Node(run.Host):
    """One ``headwater serve`` with the given settings (``run.Host`` writes default ones)."""

    def __init__(self, label: str, settings: Any, ctx: Ctx, data_dir: Path | None = None) -> None:
        super().__init__(label, "headwater", "uvicorn", settings.server.workers, ctx)
        self.settings = settings
        if data_dir is not None:
            self.data_dir = data_dir

    def launch(self) -> Node:
        from headwater import config

        self.data_dir.mkdir(parents=True, exist_ok=True)
        config.save(self.data_dir, self.settings)
        argv = [sys.executable, "-m", "headwater.cli", "--data-dir", str(self.data_dir)]
        argv += ["serve", "--port", "0"]
        log = open(self.ctx.out / f"server-{self.data_dir.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.ctx.env)
        log.close()
        self._port = 0
        return self


class Ctx(run.Context):
    def __init__(self, args: argparse.Namespace, tmp: Path, out: Path) -> None:
        super().__init__(args, tmp, out, SRC)
        self.broker = Broker(tmp / "kafka")
        self.pg: Postgres = None  # type: ignore[assignment]
        self.started: list[run.Host] = []
        self.watch: GroupWatch | None = None
        self.nodes: tuple[Node, ...] = ()


# ----------------------------------------------------------------- Kafka group watch


class GroupWatch:
    """Lag and membership of one consumer group, asked of the broker on a client of its own."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.group = group
        self.topic = topic
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.client = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "client.id": "bench-lag",
            }
        )
        self.partitions: list[Any] = []

    def lag(self) -> int:
        """Log end minus committed offsets, summed over the topic's partitions."""
        from confluent_kafka import TopicPartition

        if not self.partitions:
            info = self.client.list_topics(self.topic, timeout=10).topics[self.topic]
            self.partitions = [TopicPartition(self.topic, p) for p in sorted(info.partitions)]
        total = 0
        for tp in self.client.committed(self.partitions, timeout=10):
            low, high = self.client.get_watermark_offsets(tp, timeout=10, cached=False)
            position = low if tp.offset < 0 else min(max(tp.offset, low), high)
            total += high - position
        return total

    def members(self) -> list[set[int]]:
        """The partitions each member of the group holds."""
        description = self.admin.describe_consumer_groups([self.group])[self.group].result(
            timeout=10
        )
        return [{tp.partition for tp in m.assignment.topic_partitions} for m in description.members]

    def wait_members(self, count: int, timeout: float = 40.0) -> float:
        """Wait until ``count`` members share every partition; seconds waited."""
        start = time.monotonic()
        want = set(range(len(self.partitions) or self._partition_count()))
        while time.monotonic() - start < timeout:
            with contextlib.suppress(Exception):
                shares = self.members()
                if len(shares) == count and all(shares) and set().union(*shares) == want:
                    return time.monotonic() - start
            time.sleep(0.1)
        raise RuntimeError(f"{self.group}: not {count} members sharing {len(want)} partitions")

    def _partition_count(self) -> int:
        self.lag()
        return len(self.partitions)

    def settle(self, timeout: float = 30.0) -> float:
        """Wait until the group has committed everything in the topic; seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.lag() == 0:
                return time.monotonic() - start
            time.sleep(0.05)
        say(f"{self.group}: still behind after {timeout:.0f} s")
        return time.monotonic() - start

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------- CPU


def cpu_of(pids: list[int]) -> dict[int, float]:
    table = run.process_table()
    return {pid: table[pid][1] for pid in pids if pid in table}


def reaped_cpu(pid: int) -> float:
    """CPU seconds of a process's children that have exited and been waited for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / run.CLOCK_TICKS


def postgres_cpu(pg: Postgres) -> dict[int, float]:
    """Every PostgreSQL process, and (as pid -1) its backends that have exited."""
    pids = pg.pids()
    found = cpu_of(pids)
    if pids:
        found[-1] = reaped_cpu(pids[0])
    return found


Groups = dict[str, Callable[[], dict[int, float]]]


def cpu_groups(ctx: Ctx, nodes: list[run.Host]) -> Groups:
    mains = [node.tree[0] for node in nodes]
    workers = [pid for node in nodes for pid in node.tree[1:]]
    groups: Groups = {
        "gateways": lambda: cpu_of(workers),
        "node main": lambda: cpu_of(mains),
    }
    if any(isinstance(n, Node) and n.settings.log.backend == "kafka" for n in nodes):
        groups.update(service_groups(ctx))
    return groups


def service_groups(ctx: Ctx) -> Groups:
    return {
        "broker": lambda: cpu_of([ctx.broker.pid]),
        "postgres": lambda: postgres_cpu(ctx.pg),
    }


def snapshot(groups: Groups) -> dict[str, dict[int, float]]:
    return {name: read() for name, read in groups.items()}


def cpu_delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    """CPU seconds per group between two snapshots; a process new since counts whole."""
    out: dict[str, float] = {}
    for name, now in after.items():
        then = before.get(name, {})
        out[name] = sum(seconds - then.get(pid, 0.0) for pid, seconds in now.items())
    return out


# ----------------------------------------------------------------- gateway phase


def wrk_load(
    ctx: Ctx,
    nodes: list[run.Host],
    connections: int,
    seconds: float,
    settle: Callable[[], float],
    mode: str = "track",
) -> dict[str, Any]:
    """One wrk per node at once (``connections`` shared out); results summed over the nodes."""
    size = ctx.args.batch_size if mode == "batch" else 1
    each = max(1, connections // len(nodes))
    groups = cpu_groups(ctx, nodes)
    before = snapshot(groups)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = []
    start = time.perf_counter()
    for node in nodes:
        argv = [ctx.wrk, "-t1", f"-c{each}", f"-d{run.wrk_seconds(seconds)}s", "--timeout", "5s"]
        argv += ["-s", str(LUA), node.url, "--", mode, str(size), ctx.tag(mode[0])]
        names = {node.url: "http://127.0.0.1:PORT", argv[-1]: "TAG"}
        run.note_command(ctx, f"wrk {mode}, {len(nodes)} node(s)", argv, **names)
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=seconds + 30)[0].decode(errors="replace") for p in procs]
    load_wall = time.perf_counter() - start
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    mid = snapshot(groups)
    drain = settle()
    after = snapshot(groups)
    wall = time.perf_counter() - start
    results = []
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"wrk gave no result: {output[-2000:]}")
        results.append(json.loads(lines[-1][7:]))
    accepted = sum(r["requests"] - r["status_errors"] for r in results) * size
    rate = sum(
        (r["requests"] - r["status_errors"]) * size / (r["duration_us"] / 1e6) for r in results
    )
    cpu_load = cpu_delta(before, mid)
    cpu_all = cpu_delta(before, after)
    client = (
        usage_after.ru_utime + usage_after.ru_stime - usage.ru_utime - usage.ru_stime
    ) / load_wall
    out = {
        "mode": mode,
        "nodes": [n.label for n in nodes],
        "connections": each * len(nodes),
        "events_per_s": rate,
        "accepted": accepted,
        "refused": sum(r["status_errors"] for r in results),
        "socket_errors": sum(
            r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
            for r in results
        ),
        "p50_ms": max(r["p50_us"] for r in results) / 1000,
        "p99_ms": max(r["p99_us"] for r in results) / 1000,
        "cores_during_load": {k: v / load_wall for k, v in cpu_load.items()},
        "client_cores": client,
        "cpu_us_per_event": {k: v / max(1, accepted) * 1e6 for k, v in cpu_all.items()},
        "server_cpu_us_per_event": sum(cpu_all.values()) / max(1, accepted) * 1e6,
        "drain_after_s": drain,
        "wall_s": wall,
        "load": os.getloadavg()[0],
    }
    say(
        f"{'+'.join(out['nodes']):>18} {mode:5}: {rate:8.0f} events/s  p50 {out['p50_ms']:6.1f} ms"
        f"  p99 {out['p99_ms']:6.1f} ms  refused {out['refused']}  drained in {drain:.1f} s"
        f"  {out['server_cpu_us_per_event']:.0f} µs CPU/event"
    )
    return out


def phase_gateway(ctx: Ctx) -> dict[str, Any]:
    args = ctx.args
    prefix, schema = "bench-gw", "bench_gw"
    embedded = Node("embedded", embedded_settings(), ctx)
    a = Node("kafka-a", scale_out_settings(ctx, prefix, schema), ctx)
    ctx.started += [embedded, a]
    run.start_all([embedded, a])
    watch = GroupWatch(ctx.broker.bootstrap, f"{prefix}-pipeline", f"{prefix}.raw")
    ctx.watch = watch
    watch.wait_members(1)

    def settle_embedded() -> float:
        return embedded.settle(30.0)

    def settle_kafka() -> float:
        return watch.settle(30.0)

    result: dict[str, Any] = {"runs": []}
    for node, settle in ((embedded, settle_embedded), (a, settle_kafka)):  # warm up
        wrk_load(ctx, [node], args.connections, 2, settle)
    for round_ in range(args.rounds):
        order = [(embedded, settle_embedded), (a, settle_kafka)]
        for node, settle in order if round_ % 2 == 0 else order[::-1]:
            row = wrk_load(ctx, [node], args.connections, args.seconds, settle)
            row["setup"] = "embedded" if node is embedded else "kafka-1"
            result["runs"].append(row)
    for node, settle in ((embedded, settle_embedded), (a, settle_kafka)):
        row = wrk_load(ctx, [node], args.batch_connections, args.batch_seconds, settle, "batch")
        row["setup"] = "embedded" if node is embedded else "kafka-1"
        result["runs"].append(row)
    b = Node("kafka-b", scale_out_settings(ctx, prefix, schema), ctx)
    ctx.started.append(b)
    b.start()
    result["join_b_s"] = watch.wait_members(2)
    wrk_load(ctx, [b], args.connections, 2, settle_kafka)  # warm up b
    for round_ in range(args.rounds):
        order = [([a, b], settle_kafka), ([embedded], settle_embedded)]
        for nodes, settle in order if round_ % 2 == 0 else order[::-1]:
            row = wrk_load(ctx, nodes, args.connections, args.seconds, settle)
            row["setup"] = "embedded" if nodes == [embedded] else "kafka-2"
            result["runs"].append(row)
    for nodes, settle in (([a, b], settle_kafka), ([embedded], settle_embedded)):
        row = wrk_load(ctx, nodes, args.batch_connections, args.batch_seconds, settle, "batch")
        row["setup"] = "embedded" if nodes == [embedded] else "kafka-2"
        result["runs"].append(row)
    embedded.stop()
    ctx.nodes = (a, b)
    return result


# ----------------------------------------------------------------- recovery phase


HEARTBEAT = {"heartbeat.interval.ms": 500}


def phase_recovery(ctx: Ctx, single_rate: float) -> list[dict[str, Any]]:
    """A restart of node B under load, with librdkafka's default heartbeat, then with 500 ms."""
    args = ctx.args
    rate = args.steady_rate or min(3000.0, max(500.0, round(single_rate * 0.3, -2)))
    runs = [recovery_run(ctx, rate, "default heartbeat (3 s)")]
    # Both nodes again, with the group's members heartbeating every 500 ms.
    a, b = ctx.nodes
    for node in (a, b):
        node.stop()
    again = []
    for node in (a, b):
        settings = node.settings
        settings.log.kafka_client_config = dict(HEARTBEAT)
        again.append(Node(node.label, settings, ctx, data_dir=node.data_dir))
    ctx.started += again
    run.start_all(again)
    assert ctx.watch is not None
    ctx.watch.wait_members(2)
    ctx.nodes = (again[0], again[1])
    runs.append(recovery_run(ctx, rate, "heartbeat.interval.ms = 500"))
    return runs


def recovery_run(ctx: Ctx, rate: float, variant: str) -> dict[str, Any]:
    """Steady load on A; B stopped, kept down, started again; the group's lag meanwhile."""
    args = ctx.args
    a, b = ctx.nodes
    watch = ctx.watch
    assert watch is not None
    pre, down, after = args.steady_seconds, args.down_seconds, args.recover_seconds
    duration = pre + down + after
    argv = [sys.executable, str(BENCH / "openloop.py"), "--port", str(a.port)]
    argv += ["--rate", f"{rate:.0f}", "--duration", f"{duration:g}", "--tag", ctx.tag("r")]
    run.note_command(ctx, "openloop on node A", argv, **{str(a.port): "PORT", argv[-1]: "TAG"})
    samples: list[tuple[float, int]] = []
    members: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        last_members = 0.0
        while not stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(Exception):
                samples.append((now, watch.lag()))
            if now - last_members >= 0.25:
                last_members = now
                with contextlib.suppress(Exception):
                    members.append((now, len(watch.members())))
            stop.wait(max(0.0, 0.1 - (time.monotonic() - now)))

    watch.settle(30.0)
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctx.env)
    t0 = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    events: dict[str, float] = {}
    try:
        time.sleep(pre)
        events["stop_sent"] = time.monotonic() - t0
        b.stop()
        events["b_exited"] = time.monotonic() - t0
        time.sleep(down)
        events["start_sent"] = time.monotonic() - t0
        restarted = Node(b.label, b.settings, ctx, data_dir=b.data_dir)
        ctx.started.append(restarted)
        restarted.start()
        events["b_ready"] = time.monotonic() - t0
        ctx.nodes = (a, restarted)
        output, errors = load.communicate(timeout=duration + 60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        time.sleep(0.5)
        stop.set()
        sampler.join(10)
    if load.returncode:
        raise RuntimeError(f"openloop failed: {errors.decode(errors='replace')[-2000:]}")
    client = json.loads(output.decode().strip().splitlines()[-1])
    series = [(t - t0, lag) for t, lag in samples]
    groups = [(t - t0, n) for t, n in members]
    steady = [lag for t, lag in series if 1.0 <= t < events["stop_sent"]]
    steady_max = max(steady) if steady else 0
    # Back to steady: at or under twice the highest steady sample (at least half a
    # second of load), and staying there until the window ends.
    level = max(2 * steady_max, int(rate / 2))
    down_lags = [lag for t, lag in series if events["stop_sent"] <= t < events["start_sent"]]
    after_lags = [lag for t, lag in series if t >= events["start_sent"]]

    def back_to_level(since: float, until: float) -> float | None:
        """The first sample in [since, until) after the last one above the level."""
        window = [(t, lag) for t, lag in series if since <= t < until]
        above = [index for index, (_, lag) in enumerate(window) if lag > level]
        if not above:
            return since
        if above[-1] + 1 >= len(window):
            return None
        return window[above[-1] + 1][0]

    one_member = next((t for t, n in groups if t >= events["stop_sent"] and n == 1), None)
    two_members = next((t for t, n in groups if t >= events["start_sent"] and n == 2), None)
    result = {
        "variant": variant,
        "rate": rate,
        "client": client,
        "events": events,
        "steady_p50": statistics.median(steady) if steady else 0,
        "steady_max": steady_max,
        "level": level,
        "peak_down": max(down_lags, default=0),
        "peak_after": max(after_lags, default=0),
        "one_member_at": one_member,
        "two_members_at": two_members,
        "back_while_down_at": back_to_level(events["stop_sent"], events["start_sent"]),
        "back_after_restart_at": back_to_level(events["start_sent"], float("inf")),
        "series": series,
        "members": groups,
        "load": os.getloadavg()[0],
    }
    say(
        f"recovery, {variant}, {rate:.0f} events/s: steady lag <= {level}, peak"
        f" {result['peak_down']} while B down, {result['peak_after']} after restart; back to"
        f" steady {_since(result['back_after_restart_at'], events['start_sent'])} after the"
        " restart command"
    )
    return result


def _since(t: float | None, origin: float) -> str:
    return "never" if t is None else f"{t - origin:.1f} s"


# ----------------------------------------------------------------- drain phase


def fill(settings: Any, data_dir: Path, count: int, tag: str) -> float:
    """Append ``count`` single-event records to the node's log, as ``/v1/track`` would."""
    import msgspec
    import workload

    from headwater import backends, config
    from headwater.log.base import Entry
    from headwater.spec.message import Stamp, normalize
    from headwater.spec.timestamps import format_ms

    config.save(data_dir, settings)
    writer = backends.log_writer_factory(settings, data_dir)()
    encode = msgspec.json.encode
    decode = msgspec.json.decode
    start = time.perf_counter()
    try:
        now = workload.now_iso()
        for first in range(0, count, 1000):
            received_ms = time.time_ns() // 1_000_000
            stamp = Stamp(format_ms(received_ms), "127.0.0.1")
            entries = []
            for n in range(first, min(count, first + 1000)):
                message = decode(workload.event(f"{tag}-{n}", n, now))
                normalize(message, "track", stamp)
                entry = Entry("default", received_ms, 1, encode([message]), workload.USER_AGENT)
                entries.append(entry)
            writer.append(entries)
    finally:
        writer.close()
    return time.perf_counter() - start


def drain(ctx: Ctx, label: str, settings: Any, pipelines: int) -> dict[str, Any]:
    """Fill a fresh log with the backlog, then drain it with ``pipelines`` processes."""
    args = ctx.args
    directories = [ctx.tmp / f"drain-{label}-{i}" for i in range(pipelines)]
    for directory in directories:
        directory.mkdir(parents=True)
    count = args.drain_events
    filled = fill(settings, directories[0], count, ctx.tag("d"))
    for directory in directories[1:]:
        from headwater import config

        config.save(directory, settings)
    say(f"drain {label}: {count} events in the log ({count / filled:,.0f} events/s appended)")
    groups = service_groups(ctx) if settings.log.backend == "kafka" else {}
    go = ctx.tmp / f"go-{label}"
    procs = []
    for index, directory in enumerate(directories):
        argv = [sys.executable, str(Path(__file__).resolve()), "pipeline-worker"]
        argv += ["--data-dir", str(directory), "--go", str(go), "--timeout", "90"]
        argv += ["--expect", str(count)]
        argv += ["--result", str(directory / "result.json")]
        shown = {str(directory): "DATA_DIR", str(go): "GO_FILE"}
        shown[str(directory / "result.json")] = "RESULT_FILE"
        run.note_command(ctx, "pipeline worker", argv, **shown)
        log = open(ctx.out / f"pipeline-{label}-{index}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ctx.env))
        log.close()
    try:
        deadline = time.monotonic() + 60
        while not all((d / "ready").exists() for d in directories):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"a pipeline worker did not get ready; see pipeline-{label}-*")
            time.sleep(0.05)
        before = snapshot(groups)
        go.touch()
        started = time.time()
        for proc in procs:
            proc.wait(120)
        after = snapshot(groups)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    workers = [json.loads((d / "result.json").read_text()) for d in directories]
    if any(w["timed_out"] for w in workers) or sum(w["read"] for w in workers) < count:
        raise RuntimeError(f"drain {label}: the pipelines did not read the whole backlog")
    done = max(w["last_end"] for w in workers)
    first = min(w["first_start"] for w in workers if w["read"])
    cpu = cpu_delta(before, after)
    cpu["pipelines"] = sum(w["cpu_s"] for w in workers)
    for worker in workers:
        span = worker["last_end"] - worker["first_start"]
        worker["events_per_s"] = worker["read"] / span if span > 0 else 0.0
        worker["busy_span_s"] = span
    result = {
        "label": label,
        "pipelines": pipelines,
        "events": count,
        "fill_events_per_s": count / filled,
        "seconds_from_go": done - started,
        "first_record_after_go_s": first - started,
        "events_per_s": count / (done - first),
        "workers": workers,
        "cpu_us_per_event": {k: v / count * 1e6 for k, v in cpu.items()},
        "load": os.getloadavg()[0],
    }
    say(
        f"drain {label}: {result['events_per_s']:,.0f} events/s in all;"
        + "".join(f" pipeline {i}: {w['events_per_s']:,.0f}/s" for i, w in enumerate(workers))
    )
    return result


def phase_drain(ctx: Ctx) -> dict[str, Any]:
    runs = [
        drain(ctx, "embedded", embedded_settings(), 1),
        drain(ctx, "kafka-1", scale_out_settings(ctx, "bench-drain1", "bench_drain1"), 1),
        drain(ctx, "kafka-2", scale_out_settings(ctx, "bench-drain2", "bench_drain2"), 2),
    ]
    return {"runs": runs, "reopen": reopen(ctx, ctx.tmp / "drain-kafka-1-0")}


def reopen(ctx: Ctx, directory: Path) -> dict[str, Any]:
    """What a pipeline starting on a store of recent events pays before it reads: the dedup load."""
    result = directory / "reopen.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "pipeline-worker", "--open-only"]
    argv += ["--data-dir", str(directory), "--go", "-", "--result", str(result)]
    shown = {str(directory): "DATA_DIR", str(result): "RESULT_FILE"}
    run.note_command(ctx, "pipeline opened on a full store", argv, **shown)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ctx.env)
    if done.returncode:
        raise RuntimeError(f"reopening the pipeline failed: {done.stderr[-2000:]}")
    opened: dict[str, Any] = json.loads(result.read_text())
    say(
        f"a pipeline opened on {opened['dedup_keys_at_start']:,} stored events loads them in"
        f" {opened['dedup_load_s']:.2f} s, {opened['rss_opened_growth_mb']:.0f} MB more"
    )
    return opened


def pipeline_worker(argv: list[str]) -> int:
    """One pipeline, built as ``headwater serve`` builds it, draining until the lag is 0."""
    parser = argparse.ArgumentParser(prog="bench_scale_out.py pipeline-worker")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True, help="start once this file exists")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--open-only", action="store_true", help="open, measure, read nothing")
    parser.add_argument("--expect", type=int, default=0, help="events in the log in all")
    args = parser.parse_args(argv)
    from headwater import backends, config
    from headwater.pipeline.runner import Pipeline

    settings = config.load(args.data_dir)
    store = backends.open_store(settings, args.data_dir)
    consumer = backends.open_raw_consumer(settings, args.data_dir, store)
    processed = backends.open_processed_writer(settings, args.data_dir)
    rss_start = rss_bytes()
    opening = time.perf_counter()
    pipeline = Pipeline(settings, consumer, store, processed)  # loads the dedup window
    opened = {
        "dedup_load_s": time.perf_counter() - opening,
        "dedup_keys_at_start": len(pipeline.dedup),
        "rss_opened_mb": rss_bytes() / 2**20,
        "rss_opened_growth_mb": (rss_bytes() - rss_start) / 2**20,
    }
    if args.open_only:
        consumer.close()
        processed.close()
        store.close()
        args.result.write_text(json.dumps(opened))
        return 0
    rss_ready = rss_bytes()
    (args.data_dir / "ready").touch()
    deadline = time.monotonic() + 60
    while str(args.go) != "-" and not args.go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    go = time.time()
    cpu = time.process_time()
    idle = settings.pipeline.idle_poll_ms / 1000
    read = steps = 0
    first = last = 0.0
    batches: list[int] = []
    timed_out = True
    last_check = 0.0
    while time.monotonic() < deadline + args.timeout:
        began = time.time()
        count = pipeline.step()
        if count:
            read += count
            steps += 1
            batches.append(count)
            first = first or began
            last = time.time()
            continue
        if time.monotonic() - last_check >= 0.1:
            last_check = time.monotonic()
            # A lag read that failed reports 0 with a log end of 0: trust it only
            # once the log end shows the whole backlog.
            lag = pipeline.lag()
            if lag["lag_events"] == 0 and lag["log_end_offset"] >= args.expect:
                timed_out = False
                break
        time.sleep(idle)
    result = {
        "pid": os.getpid(),
        "read": read,
        "steps": steps,
        "median_batch": statistics.median(batches) if batches else 0,
        "go": go,
        "first_start": first,
        "last_end": last,
        "cpu_s": time.process_time() - cpu,
        "timed_out": timed_out,
        "dedup_keys": len(pipeline.dedup),
        "rss_growth_mb": (rss_bytes() - rss_ready) / 2**20,
        **opened,
    }
    consumer.close()
    processed.close()
    store.close()
    args.result.write_text(json.dumps(result))
    return 0


def rss_bytes() -> int:
    """This process's resident memory."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------- report


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def versions(ctx: Ctx) -> str:
    from importlib.metadata import version

    import confluent_kafka

    wrk = run.run_quiet([ctx.wrk, "--version"]).stdout.splitlines()
    parts = [
        f"python {platform.python_version()}",
        f"Kafka {ctx.broker.info.get('kafka_version', '?')}",
        f"librdkafka {confluent_kafka.libversion()[0]}",
        f"confluent-kafka {version('confluent-kafka')}",
        f"PostgreSQL {ctx.pg.version}",
        f"psycopg {version('psycopg')}",
        f"duckdb {version('duckdb')}",
        f"uvicorn {version('uvicorn')}",
        wrk[0].split(" [")[0] if wrk else "wrk ?",
    ]
    return ", ".join(parts)


def render(ctx: Ctx, results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"#### Run of {meta['date']}: {meta['source']}",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpus']} CPUs, load average {meta['load_start']} at the start and"
        f" {meta['load_end']} at the end (shared machine: every process below shares the same"
        " two cores, so two nodes do not get twice the CPU)",
        f"- versions: {meta['versions']}",
        f"- services: one Kafka node (broker and KRaft controller from `ci/kafka/broker.py`,"
        f" heap 512 MB, `group.initial.rebalance.delay.ms` at Kafka's default of"
        f" {REBALANCE_DELAY_MS / 1000:g} s; topics of {ctx.args.partitions} partitions, 1"
        " replica) and one PostgreSQL (`tests/pg.py`, fsync and synchronous_commit on), on"
        " this machine; each headwater node runs 2 gateway workers with default settings but"
        " for the `[log]` and `[store]` sections",
        f"- wall time: {meta['seconds']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta["phase_seconds"].items())
        + ")",
        "",
    ]
    if "gateway" in results:
        lines += render_gateway(ctx, results["gateway"])
    if "recovery" in results:
        lines += render_recovery(results["recovery"])
    if "drain" in results:
        lines += render_drain(results["drain"]["runs"], results["drain"]["reopen"])
    lines += ["Commands (PORT, TAG and the files are filled in per run):", ""]
    lines += [f"- {name}: `{command}`" for name, command in ctx.commands.items()]
    return "\n".join(lines)


SETUPS = {
    "embedded": "embedded (SQLite log, DuckDB), 1 node",
    "kafka-1": "Kafka + PostgreSQL, 1 node",
    "kafka-2": "Kafka + PostgreSQL, 2 nodes",
}


def render_gateway(ctx: Ctx, gateway: dict[str, Any]) -> list[str]:
    runs = gateway["runs"]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in runs:
        by.setdefault((row["mode"], row["setup"]), []).append(row)

    def med(mode: str, setup: str, key: str) -> float:
        rows = by.get((mode, setup), [])
        return statistics.median(r[key] for r in rows) if rows else 0.0

    args = ctx.args
    lines = [
        f"Gateway: wrk with `lua/post.lua`. Single events: `POST /v1/track`, 100 connections in"
        f" all, {args.seconds:g} s a run, medians of {args.rounds} runs. Batches:"
        f" `POST /v1/batch` of {args.batch_size} events, {args.batch_connections} connections"
        f" in all, {args.batch_seconds:g} s, one run. With two nodes one wrk per node, each with"
        " half the connections, at the same time; events/s are summed and latency is the"
        " worse of the two. The embedded baseline ran in both halves of the phase. CPU per"
        " event counts every process from the start of the load until the pipelines had"
        " stored everything it left behind.",
        "",
        "| load | setup | accepted events/s | vs embedded | vs 1 node | p50 / p99 |"
        " server CPU µs per event |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for mode, load in (("track", "single events"), ("batch", f"{args.batch_size}-event batches")):
        base = med(mode, "embedded", "events_per_s")
        one = med(mode, "kafka-1", "events_per_s")
        for setup in SETUPS:
            if (mode, setup) not in by:
                continue
            rate = med(mode, setup, "events_per_s")
            versus_one = f"{rate / one:.2f}x" if setup == "kafka-2" and one else ""
            lines.append(
                f"| {load} | {SETUPS[setup]} | {_n(rate)} | {rate / base:.0%} | {versus_one} |"
                f" {med(mode, setup, 'p50_ms'):.1f} / {med(mode, setup, 'p99_ms'):.1f} ms |"
                f" {med(mode, setup, 'server_cpu_us_per_event'):.0f} |"
            )
    keys = ("gateways", "node main", "broker", "postgres")
    lines += [
        "",
        "Every run, in order:",
        "",
        "| load | setup | events/s | p50 | p99 | refused or failed | CPU cores during the"
        " load: gateways / node main / broker / postgres / wrk | CPU µs per event: gateways /"
        " node main / broker / postgres | drained after | load avg |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for row in runs:
        cores = row["cores_during_load"]
        per = row["cpu_us_per_event"]
        lines.append(
            f"| {row['mode']} | {SETUPS[row['setup']]} | {_n(row['events_per_s'])} |"
            f" {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms |"
            f" {row['refused'] + row['socket_errors']} |"
            f" {' / '.join(f'{cores.get(k, 0):.2f}' for k in keys)} / {row['client_cores']:.2f} |"
            f" {' / '.join(f'{per.get(k, 0):.0f}' for k in keys)} |"
            f" {row['drain_after_s']:.1f} s | {row['load']:.2f} |"
        )
    lines += [
        "",
        f"Node B's pipeline held its share of the partitions {gateway['join_b_s']:.1f} s after"
        " B answered `/health`.",
        "",
    ]
    return lines


def render_recovery(runs: list[dict[str, Any]]) -> list[str]:
    first = runs[0]
    lines = [
        f"Lag recovery: open-loop `POST /v1/track` at {first['rate']:,.0f} events/s on node A"
        f" throughout ({first['events']['stop_sent']:.0f} s steady, then node B stopped with"
        " SIGTERM, so its pipeline leaves the group; B started again after"
        f" {ctx_down(first):.0f} s). Lag is the pipeline group's, log end minus committed"
        " offsets, sampled every 100 ms from the broker. It is back at its steady level from the"
        " first sample after the last one above twice the highest steady sample (1 s to the"
        " stop), or half a second of load if more. Times are from the SIGTERM or from the"
        " start command.",
        "",
        "| | " + " | ".join(r["variant"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def row(name: str, cell: Any) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in runs) + " |")

    row(
        "steady lag before the stop: median / highest",
        lambda r: f"{r['steady_p50']:,.0f} / {r['steady_max']:,} events",
    )
    row("steady level (twice the highest, at least 0.5 s of load)", lambda r: f"{r['level']:,}")
    row("B exited", lambda r: _s(r["events"]["b_exited"] - r["events"]["stop_sent"]))
    row(
        "group down to 1 member (A holds every partition)",
        lambda r: _s(_rel(r["one_member_at"], r["events"]["stop_sent"])),
    )
    row("highest lag while B was down", lambda r: f"{r['peak_down']:,} events")
    row(
        "lag back at its level while B was down",
        lambda r: _s(_rel(r["back_while_down_at"], r["events"]["stop_sent"])),
    )
    row(
        "B back in the group (2 members)",
        lambda r: _s(_rel(r["two_members_at"], r["events"]["start_sent"])),
    )
    row("B ready (`/health`)", lambda r: _s(r["events"]["b_ready"] - r["events"]["start_sent"]))
    row("highest lag from the restart on", lambda r: f"{r['peak_after']:,} events")
    row(
        "**lag back at its level after the restart**",
        lambda r: "**" + _s(_rel(r["back_after_restart_at"], r["events"]["start_sent"])) + "**",
    )
    row(
        "client on A: achieved rate, p50 / p99 / max",
        lambda r: (
            f"{r['client']['achieved_rate']:,.0f}/s, {r['client']['p50_ms']:.1f} /"
            f" {r['client']['p99_ms']:.1f} / {r['client']['max_ms']:.0f} ms"
        ),
    )
    row(
        "client on A: answers",
        lambda r: (
            ", ".join(f"{k}: {v:,}" for k, v in r["client"]["statuses"].items())
            + f"; {r['client']['lost']} lost"
        ),
    )
    row("load average (1 min) after", lambda r: f"{r['load']:.2f}")
    lines.append("")
    for r in runs:
        ev = r["events"]
        lines += [
            f"Lag, {r['variant']}: the highest sample in each second (stop at"
            f" {ev['stop_sent']:.1f} s, start command at {ev['start_sent']:.1f} s):",
            "",
            "```",
        ]
        series = r["series"]
        cells = []
        for second in range(int(series[-1][0]) + 1 if series else 0):
            window = [lag for t, lag in series if second <= t < second + 1]
            if window:
                cells.append(f"{second:>2}s {max(window):>6,}")
        lines += ["   ".join(cells[i : i + 6]) for i in range(0, len(cells), 6)]
        lines += ["```", ""]
    return lines


def ctx_down(run_: dict[str, Any]) -> float:
    return float(run_["events"]["start_sent"] - run_["events"]["b_exited"])


def _rel(t: float | None, origin: float) -> float | None:
    return None if t is None else t - origin


def render_drain(rows: list[dict[str, Any]], opened: dict[str, Any]) -> list[str]:
    names = {
        "embedded": "embedded: SQLite log → DuckDB",
        "kafka-1": "Kafka → PostgreSQL, 1 pipeline",
        "kafka-2": "Kafka → PostgreSQL, 2 pipelines, one group",
    }
    base = rows[0]["events_per_s"] if rows else 0.0
    lines = [
        f"Pipeline drain: a backlog of {rows[0]['events']:,} single-event records (the"
        " `/v1/track` shape) written to the log first, then drained; each pipeline is a process"
        " running headwater's `Pipeline` built as `headwater serve` builds it (store, consumer"
        " and processed writer from the settings). Events/s in all count from the first record"
        " read to the last commit; each pipeline's from its own first read to its own last.",
        "",
        "| log → store | events/s in all | vs embedded | each pipeline: events read, events/s"
        " over its busy time, first read after the start signal | drained after the start"
        " signal | CPU µs per event: pipelines / broker / postgres | load avg |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for row in rows:
        per = row["cpu_us_per_event"]
        each = "; ".join(
            f"{w['read']:,}, {w['events_per_s']:,.0f}/s, {w['first_start'] - w['go']:.1f} s"
            for w in row["workers"]
        )
        lines.append(
            f"| {names[row['label']]} | {_n(row['events_per_s'])} |"
            f" {row['events_per_s'] / base:.0%} | {each} | {row['seconds_from_go']:.1f} s |"
            f" {per.get('pipelines', 0):.0f} / {per.get('broker', 0):.0f} /"
            f" {per.get('postgres', 0):.0f} | {row['load']:.2f} |"
        )
    per_key = opened["rss_opened_growth_mb"] * 2**20 / max(1, opened["dedup_keys_at_start"])
    lines += [
        "",
        "Memory: every pipeline keeps the (source, messageId) of the events stored in the last"
        " `pipeline.dedup_window_hours` (24 h at least) in memory, and loads those already in"
        " the store when it opens, before it reads the log. A pipeline opened on the store of"
        f" the one-pipeline drain ({opened['dedup_keys_at_start']:,} events of the last 24 h)"
        f" spent {opened['dedup_load_s']:.2f} s and {opened['rss_opened_growth_mb']:.0f} MB"
        f" ({per_key:,.0f} bytes per event) loading them.",
        "",
    ]
    return lines


def record(text: str) -> None:
    """Put the generated block into bench/RESULTS.md's Scale-out section, keeping the rest."""
    start, end = MARK.format("start"), MARK.format("end")
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in current and end in current:
        head, _, rest = current.partition(start)
        _, _, tail = rest.partition(end)
        current = head + block + tail
    else:
        current = current.rstrip() + "\n\n## Scale-out\n\n" + block + "\n"
    RESULTS.write_text(current)


# ----------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="gateway,recovery,drain")
    parser.add_argument("--rounds", type=int, default=2, help="wrk runs per setup")
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=100, help="wrk track, in all")
    parser.add_argument("--batch-connections", type=int, default=32, help="wrk batch, in all")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch")
    parser.add_argument("--batch-seconds", type=float, default=2.0, help="per wrk batch run")
    parser.add_argument("--partitions", type=int, default=12, help="of every topic")
    parser.add_argument("--drain-events", type=int, default=100_000, help="backlog size")
    parser.add_argument("--steady-rate", type=float, default=0, help="default: 30%% of 1 node")
    parser.add_argument("--steady-seconds", type=float, default=4.0, help="before the stop")
    parser.add_argument("--down-seconds", type=float, default=4.0, help="node B stopped")
    parser.add_argument("--recover-seconds", type=float, default=14.0, help="after the restart")
    parser.add_argument("--out", type=Path, help="raw results; default bench/out/scale-out-DATE")
    parser.add_argument("--record", action="store_true", help="write into bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    if not 0 < args.seconds <= 30 or not 0 < args.batch_seconds <= 30 or not 1 <= args.rounds <= 5:
        parser.error("keep every run bounded: --seconds up to 30, --rounds 1 to 5")
    if not 1_000 <= args.drain_events <= 1_000_000:
        parser.error("--drain-events: 1,000 to 1,000,000")
    if args.steady_seconds + args.down_seconds + args.recover_seconds > 60:
        parser.error("keep the recovery load under 60 s")
    return args


def main() -> int:
    if sys.argv[1:2] == ["pipeline-worker"]:
        return pipeline_worker(sys.argv[2:])
    args = parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if set(phases) - {"gateway", "recovery", "drain"}:
        raise SystemExit(f"unknown phases in {args.phases}")
    if "recovery" in phases and "gateway" not in phases:
        raise SystemExit("the recovery phase runs on the gateway phase's nodes")
    started = time.time()
    out = args.out or BENCH / "out" / f"scale-out-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="headwater-scale-out-"))
    ctx = Ctx(args, tmp, out)
    ctx.wrk = run.ensure_wrk()
    head = run.run_quiet(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]).stdout
    dirty = run.run_quiet(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]).stdout
    source = f"working tree at {head.strip()}" + (" with local changes" if dirty else "")
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "source": source,
            "command": " ".join(["python", "bench/bench_scale_out.py", *sys.argv[1:]]),
            "cpus": os.cpu_count(),
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
    }
    durations: dict[str, float] = {}
    try:
        begun = time.monotonic()
        say(f"starting Kafka and PostgreSQL; raw results in {out}")
        ctx.broker.start()
        ctx.pg = Postgres().start()
        durations["services"] = time.monotonic() - begun
        results["meta"]["versions"] = versions(ctx)
        single = 0.0
        for phase in ("gateway", "recovery", "drain"):
            if phase not in phases:
                continue
            begun = time.monotonic()
            ctx.phase = phase
            say(f"phase {phase}")
            if phase == "gateway":
                results[phase] = phase_gateway(ctx)
                ones = [
                    r["events_per_s"] for r in results[phase]["runs"] if r["setup"] == "kafka-1"
                ]
                single = statistics.median(ones)
            elif phase == "recovery":
                results[phase] = phase_recovery(ctx, single)
            else:
                for node in ctx.nodes:
                    node.stop()
                results[phase] = phase_drain(ctx)
            durations[phase] = time.monotonic() - begun
    finally:
        # Each step on its own: one that fails must not leave the others running.
        steps: list[Callable[[], object]] = [
            lambda: run.stop_all([h for h in ctx.started if h.proc is not None]),
            lambda: ctx.watch.close() if ctx.watch is not None else None,
            ctx.broker.stop,
            lambda: ctx.pg.stop() if ctx.pg is not None else None,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:
                say(f"cleaning up: {type(exc).__name__}: {exc}")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["phase_seconds"] = durations
    results["meta"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["meta"]["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(ctx, results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    if args.record:
        record(text)
        say(f"recorded in {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
