"""headwater's benchmarks in one command, each against a baseline in the same run.

    python bench/run.py [--rev REV] [--record] [--phases main,alternatives,profile,hotpath]

The baseline is a no-op ASGI app on headwater's own server stack (``stack.py``):
same socket, same worker processes, same uvicorn settings; only the app
differs.  Load alternates between headwater and the baseline, so both see the
same machine, and the report gives ratios.  See bench/README.md.

Phases:
- main: single-event ``/v1/track`` throughput and latency at saturation (wrk);
  ``/v1/batch`` of 100 events (wrk); p99 latency at half of headwater's
  maximum single-event rate (open loop, ``openloop.py``); freshness, from the
  200 to the event being visible in the store, under a moderate load.
- alternatives: uvicorn or granian, 1 or 2 workers, and headwater's gateway
  without its pipeline.
- profile: py-spy on a gateway worker and on the main process under load.
- hotpath: cost of each gateway step in one process (``hotpath.py``).

Everything is bounded: a few seconds per measurement, about three minutes in
all.  Servers listen on 127.0.0.1 ports they bind themselves, and every
process this script starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "lua" / "post.lua"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESULTS = BENCH / "RESULTS.md"
MARK = "<!-- bench/run.py results{}: {} -->"
PHASES = ("main", "alternatives", "profile", "hotpath")
EXTRA_PHASES = ("latency", "commits")  # on request only: they add a minute each


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_quiet(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------- tools


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("wrk is missing: installing Debian's wrk with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "wrk"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk not found: install it (Debian: apt-get install wrk)")
    return found


def ensure_py_spy() -> str | None:
    found = shutil.which("py-spy") or _beside_python("py-spy")
    if found:
        return found
    say("py-spy is missing: installing it from PyPI with pip")
    pip = [sys.executable, "-m", "pip", "install", "-q", "py-spy"]
    if subprocess.run(pip, capture_output=True, check=False).returncode:
        say("could not install py-spy: the profile phase is skipped")
        return None
    return shutil.which("py-spy") or _beside_python("py-spy")


def _beside_python(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def versions(wrk: str) -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for module in ("uvicorn", "uvloop", "httptools", "granian", "msgspec", "duckdb"):
        try:
            from importlib.metadata import version

            found[module] = version(module)
        except Exception:
            found[module] = "missing"
    first = run_quiet([wrk, "--version"]).stdout.splitlines()
    found["wrk"] = first[0].split(" [")[0] if first else "?"
    return found


# ----------------------------------------------------------------- source


def prepare_source(rev: str | None, tmp: Path) -> tuple[Path, str]:
    """The ``src`` directory to benchmark, and how to describe it."""

    def git(*args: str) -> str:
        return run_quiet(["git", "-C", str(ROOT), *args]).stdout.strip()

    if rev is None:
        head = git("rev-parse", "--short=12", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--", "src")
        return ROOT / "src", f"working tree at {head}" + (" with local changes" if dirty else "")
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"no such revision: {rev}")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src"],
        capture_output=True,
        check=True,
    ).stdout
    target = tmp / "source"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "src", f"commit {commit[:12]}"


# ----------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, float, str]]:
    """pid: (parent pid, CPU seconds, command line) for every process."""
    table: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        table[int(entry.name)] = (int(fields[1]), cpu, cmdline)
    return table


def descendants(pid: int, table: dict[int, tuple[int, float, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Host:
    """One server process tree started by this run: headwater, or a stand-in."""

    def __init__(self, label: str, app: str, stack: str, workers: int, ctx: Context) -> None:
        self.label = label
        self.app = app  # headwater | noop | gateway
        self.stack = stack  # uvicorn | granian
        self.workers = workers
        self.ctx = ctx
        ctx.hosts_started += 1
        self.data_dir = ctx.tmp / f"{ctx.hosts_started:02d}-{label}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._port = 0
        self.admin: tuple[int, str] | None = None
        self.tree: list[int] = []
        self.cmdlines: dict[int, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 40.0) -> Host:
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> Host:
        from headwater import config

        self.data_dir.mkdir(parents=True)
        config.save(
            self.data_dir,
            config.Settings(sources=[config.Source(name="default", write_key="WRITE_KEY")]),
        )
        port = 0
        if self.stack == "granian":
            port = free_port()
            argv = [sys.executable, str(BENCH / "granian_host.py"), "--app", self.app]
            argv += ["--port", str(port)]
        elif self.app == "headwater":
            argv = [sys.executable, "-m", "headwater.cli", "--data-dir", str(self.data_dir)]
            argv += ["serve", "--port", "0"]
        else:
            argv = [sys.executable, str(BENCH / "stack.py"), "--app", self.app]
        if self.app != "headwater" or self.stack == "granian":
            argv += ["--data-dir", str(self.data_dir)]
        argv += ["--workers", str(self.workers)]
        log = open(self.ctx.out / f"server-{self.data_dir.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.ctx.env)
        log.close()
        self._port = port
        return self

    def wait_ready(self, timeout: float = 40.0) -> Host:
        assert self.proc is not None
        port = self._port
        deadline = time.monotonic() + timeout
        serve_file = self.data_dir / "run" / "serve.json"
        admin_file = self.data_dir / "run" / "admin.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited; see server-{self.data_dir.name}.log")
            try:
                info = json.loads(serve_file.read_text())
                self.port = int(info["port"]) or port
                if self.app == "headwater":
                    admin = json.loads(admin_file.read_text())
                    self.admin = (int(admin["port"]), str(admin["token"]))
                if self._get("/health")[0] == 200:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"{self.label} did not become ready in {timeout:.0f} s")
        time.sleep(0.3)  # every worker up, not just the first to answer
        if self.app == "gateway-sharded":
            shards = [
                p for p in self.data_dir.glob("*-*.sqlite") if p.stem.split("-")[-1].isdigit()
            ]
            if len(shards) != self.workers:
                self.stop()
                raise RuntimeError(f"{self.label}: {len(shards)} log shards, not {self.workers}")
        table = process_table()
        self.tree = [self.proc.pid, *descendants(self.proc.pid, table)]
        self.cmdlines = {pid: table[pid][2] for pid in self.tree if pid in table}
        return self

    def _get(self, path: str, port: int | None = None, token: str = "") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=5)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        assert self.admin is not None
        status, body = self._get("/status", self.admin[0], self.admin[1])
        return dict(json.loads(body)) if status == 200 else {}

    def lag_events(self) -> int:
        if self.admin is None:
            return 0
        return int(self.status().get("log", {}).get("lag_events", 0))

    def settle(self, timeout: float = 20.0) -> float:
        """Wait for the pipeline to store everything logged; seconds waited."""
        if self.admin is None:
            return 0.0
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.status().get("log", {}).get("lag_records", 1) == 0:
                break
            time.sleep(0.05)
        else:
            say(f"{self.label}: pipeline still behind after {timeout:.0f} s")
        return time.monotonic() - start

    def worker_pids(self) -> list[int]:
        table = process_table()
        return [
            pid
            for pid in descendants(self.tree[0], table)
            if "resource_tracker" not in table[pid][2]
        ]

    def cpu(self) -> dict[int, float]:
        table = process_table()
        return {pid: table[pid][1] for pid in self.tree if pid in table}

    def worker_thread_cpu(self) -> tuple[float, float]:
        """CPU seconds of the workers' main threads (the event loops) and of their other
        threads (the log writer, ...), read per thread from /proc."""
        loop = other = 0.0
        for pid in self.tree[1:]:
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    stat = (task / "stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                if task.name == str(pid):
                    loop += seconds
                else:
                    other += seconds
        return loop, other

    def stop(self) -> None:
        self.signal_stop()
        self.wait_stopped()

    def signal_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        table = process_table()
        for pid in self.tree[1:]:
            # a worker of ours left behind: same PID, same command line, orphaned
            if pid in table and table[pid][0] == 1 and table[pid][2] == self.cmdlines.get(pid):
                os.kill(pid, signal.SIGKILL)


def start_all(hosts: list[Host]) -> list[Host]:
    """Launch together, then wait for each: start-up overlaps."""
    for host in hosts:
        host.launch()
    try:
        for host in hosts:
            host.wait_ready()
    except BaseException:
        stop_all(hosts)
        raise
    return hosts


def stop_all(hosts: list[Host]) -> None:
    start = time.monotonic()
    for host in hosts:
        host.signal_stop()
    for host in hosts:
        host.wait_stopped()
    if time.monotonic() - start > 5:
        say(f"stopping {len(hosts)} servers took {time.monotonic() - start:.0f} s")


class Context:
    def __init__(self, args: argparse.Namespace, tmp: Path, out: Path, src: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.out = out
        self.src = src
        self.hosts_started = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
        # The console (admin API) listens on a port of its own: let each server
        # bind a free one, so runs never collide with each other or other servers.
        self.env["HEADWATER_CONSOLE_PORT"] = "0"
        self.env["PYTHONPATH"] = os.pathsep.join([str(src), str(BENCH)])
        self.wrk = ""
        self.py_spy: str | None = None
        self.runs = 0
        self.phase = ""
        self.commands: dict[str, str] = {}

    def tag(self, prefix: str) -> str:
        self.runs += 1
        return f"{prefix}{int(time.time())}r{self.runs}"


# ----------------------------------------------------------------- load


def _cpu_split(
    host: Host, before: dict[int, float], after: dict[int, float]
) -> tuple[float, float]:
    main = after.get(host.tree[0], 0.0) - before.get(host.tree[0], 0.0)
    rest = sum(after[p] - before.get(p, after[p]) for p in after if p != host.tree[0])
    return main, rest


def note_command(ctx: Context, name: str, argv: list[str], **names: str) -> None:
    """Keep the command as a reader can rerun it: no local paths, ports or tokens."""
    shown: list[str] = []
    for arg in argv:
        arg = names.get(arg, arg)
        if arg == ctx.wrk:
            arg = "wrk"
        elif arg == ctx.py_spy:
            arg = "py-spy"
        elif arg == sys.executable:
            arg = "python"
        elif os.path.isabs(arg) and shutil.which(os.path.basename(arg)) == arg:
            arg = os.path.basename(arg)
        elif arg.startswith(str(BENCH)):
            arg = "bench" + arg[len(str(BENCH)) :]
        elif arg.startswith(str(ctx.out)):
            arg = arg[len(str(ctx.out)) + 1 :]
        shown.append(arg)
    ctx.commands[f"{ctx.phase}: {name}"] = " ".join(shown)


def wrk_seconds(seconds: float) -> int:
    """wrk takes whole seconds."""
    return max(1, round(seconds))


def wrk(ctx: Context, host: Host, mode: str, connections: int, seconds: float) -> dict[str, Any]:
    size = ctx.args.batch_size if mode == "batch" else 1
    argv = [ctx.wrk, "-t1", f"-c{connections}", f"-d{wrk_seconds(seconds)}s", "--timeout", "5s"]
    argv += ["-s", str(LUA), host.url, "--", mode, str(size), ctx.tag(mode[0])]
    note_command(ctx, f"wrk {mode}", argv, **{host.url: "http://127.0.0.1:PORT", argv[-1]: "TAG"})
    before, usage = host.cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    threads_before = host.worker_thread_cpu()
    start = time.perf_counter()
    done = run_quiet(argv, timeout=seconds + 30)
    wall = time.perf_counter() - start
    after, usage_after = host.cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    threads_after = host.worker_thread_cpu()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"wrk gave no result: {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1][7:])
    main, workers = _cpu_split(host, before, after)
    elapsed = result["duration_us"] / 1e6
    requests = max(1, result["requests"])
    result.update(
        host=host.label,
        mode=mode,
        connections=connections,
        rps=result["requests"] / elapsed,
        events_per_s=result["requests"] * size / elapsed,
        errors=sum(result[k] for k in result if k.endswith("_errors")) + result["timeouts"],
        main_cores=main / wall,
        worker_cores=workers / wall,
        client_cores=(usage_after.ru_utime + usage_after.ru_stime - usage.ru_utime - usage.ru_stime)
        / wall,
        worker_cpu_us_per_event=workers / (requests * size) * 1e6,
        server_cpu_us_per_event=(main + workers) / (requests * size) * 1e6,
        worker_loop_us_per_request=(threads_after[0] - threads_before[0]) / requests * 1e6,
        worker_threads_us_per_request=(threads_after[1] - threads_before[1]) / requests * 1e6,
    )
    if result["errors"]:
        say(f"{host.label} {mode}: {result['errors']} errors (status or socket)")
    say(
        f"{host.label:>10} {mode:5} {result['rps']:9.0f} req/s {result['events_per_s']:9.0f} ev/s"
        f"  p50 {result['p50_us'] / 1000:6.1f} ms  p99 {result['p99_us'] / 1000:6.1f} ms"
    )
    return result


def openloop(
    ctx: Context, host: Host, rate: float, seconds: float, freshness: bool = False
) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "openloop.py"), "--port", str(host.port)]
    argv += ["--rate", f"{rate:.0f}", "--duration", f"{seconds:g}", "--tag", ctx.tag("o")]
    names = {str(host.port): "PORT", argv[-1]: "TAG"}
    if freshness:
        assert host.admin is not None
        argv += ["--admin-port", str(host.admin[0]), f"--admin-token={host.admin[1]}"]
        argv += ["--poll-ms", f"{ctx.args.poll_ms:g}"]
        names[str(host.admin[0])] = "ADMIN_PORT"
        names[f"--admin-token={host.admin[1]}"] = "--admin-token=TOKEN"
    name = "openloop freshness" if freshness else "openloop latency"
    note_command(ctx, name, argv, **names)
    before = host.cpu()
    start = time.perf_counter()
    done = run_quiet(argv, timeout=seconds + 60)
    wall = time.perf_counter() - start
    after = host.cpu()
    if done.returncode:
        raise RuntimeError(f"openloop failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    main, workers = _cpu_split(host, before, after)
    result.update(host=host.label, main_cores=main / wall, worker_cores=workers / wall)
    line = (
        f"{host.label:>10} open loop {result['achieved_rate']:7.0f}/s"
        f"  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
    )
    if freshness:
        line += f"  fresh p50 {result['fresh_p50_ms']:.0f} ms p95 {result['fresh_p95_ms']:.0f} ms"
    say(line)
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------- phases


def phase_main(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    workers = args.workers
    hw, noop = start_all(
        [
            Host("headwater", "headwater", "uvicorn", workers, ctx),
            Host("noop", "noop", "uvicorn", workers, ctx),
        ]
    )
    result: dict[str, Any] = {"track": {"headwater": [], "noop": []}}
    try:
        for host in (noop, hw):  # warm up: imports, caches, first connections
            wrk(ctx, host, "track", args.connections, 1)
        hw.settle()
        for round_ in range(args.rounds):
            for host in (noop, hw) if round_ % 2 == 0 else (hw, noop):
                hw.settle()
                result["track"][host.label].append(
                    wrk(ctx, host, "track", args.connections, args.seconds)
                )
        peak = median([r["rps"] for r in result["track"]["headwater"]])
        half = peak / 2
        result["half_rate"] = half
        hw.settle()
        result["half_headwater"] = openloop(ctx, hw, half, args.open_seconds)
        hw.settle()
        result["half_noop"] = openloop(ctx, noop, half, args.open_seconds)
        hw.settle()
        fresh_rate = max(200.0, peak * args.fresh_share)
        result["fresh_rate"] = fresh_rate
        result["freshness"] = openloop(ctx, hw, fresh_rate, args.open_seconds, freshness=True)
        result["batch"] = {"headwater": [], "noop": []}
        for round_ in range(args.rounds):
            hw.settle()
            result["batch"]["noop"].append(
                wrk(ctx, noop, "batch", args.batch_connections, args.seconds)
            )
            result["batch"]["headwater"].append(
                wrk(ctx, hw, "batch", args.batch_connections, args.seconds)
            )
            if round_ == args.rounds - 1:
                lag = hw.lag_events()
                time.sleep(2.0)
                drained = lag - hw.lag_events()
                result["pipeline_backlog_events"] = lag
                result["pipeline_drain_events_per_s"] = drained / 2.0
                say(f"pipeline: {lag} events behind; drains {drained / 2.0:.0f} events/s")
            else:  # a fresh server: the next rounds must not pay for this backlog
                hw.stop()
                hw = Host("headwater", "headwater", "uvicorn", workers, ctx).start()
    finally:
        stop_all([hw, noop])
    return result


def phase_alternatives(ctx: Context) -> list[dict[str, Any]]:
    args = ctx.args
    seconds = args.alt_seconds
    rows: list[dict[str, Any]] = []
    configs = [("uvicorn", 1), ("uvicorn", 2), ("granian", 1), ("granian", 2)]
    for stack, workers in configs:
        # granian runs the gateway alone; on uvicorn, also the whole of headwater serve
        apps = ["noop", "gateway"] + (["headwater"] if stack == "uvicorn" else [])
        if stack == "uvicorn" and workers > 1:
            apps.append("gateway-sharded")  # no shared write lock between workers
        hosts = start_all(
            [Host(f"{app}-{stack}{workers}", app, stack, workers, ctx) for app in apps]
        )
        try:
            for mode, connections in (
                ("track", args.connections),
                ("batch", args.batch_connections),
            ):
                for host in hosts:
                    for other in hosts:
                        other.settle()
                    run = wrk(ctx, host, mode, connections, seconds)
                    rows.append({"stack": stack, "workers": workers, "app": host.app, **run})
        finally:
            stop_all(hosts)
    return rows


def phase_profile(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    result: dict[str, Any] = {}
    if ctx.py_spy is None:
        return result
    hw = Host("headwater-profiled", "headwater", "uvicorn", args.workers, ctx).start()
    try:
        worker = hw.worker_pids()[0]
        seconds = args.profile_seconds
        for mode, connections in (("track", args.connections), ("batch", args.batch_connections)):
            hw.settle()
            size = args.batch_size if mode == "batch" else 1
            load_argv = [ctx.wrk, "-t1", f"-c{connections}", f"-d{wrk_seconds(seconds + 2)}s"]
            load_argv += ["-s", str(LUA), hw.url, "--", mode, str(size), ctx.tag("p")]
            note_command(
                ctx,
                f"wrk {mode}",
                load_argv,
                **{hw.url: "http://127.0.0.1:PORT", load_argv[-1]: "TAG"},
            )
            load = subprocess.Popen(load_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(0.5)
            spies = []
            for who, pid in (("worker", worker), ("main", hw.tree[0])):
                path = ctx.out / f"profile-{mode}-{who}.txt"
                argv = [ctx.py_spy, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r"]
                argv += [str(args.profile_rate), "--nonblocking", "--threads", "-f", "raw"]
                argv += ["-o", str(path)]
                note_command(ctx, f"py-spy {who}", argv, **{str(pid): f"{who.upper()}_PID"})
                spies.append(
                    (
                        who,
                        path,
                        subprocess.Popen(
                            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                        ),
                    )
                )
            for who, path, spy in spies:
                spy.wait(seconds + 30)
                result[f"{mode}-{who}"] = {"path": path.name, "seconds": seconds}
            output = load.communicate(timeout=seconds + 30)[0].decode(errors="replace")
            lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"wrk under the profiler gave no result: {output[-2000:]}")
            load_result = json.loads(lines[-1][7:])
            rate = load_result["requests"] / (load_result["duration_us"] / 1e6)
            result[f"{mode}-worker"]["load"] = f"{rate:,.0f} req/s ({rate * size:,.0f} events/s)"
            result[f"{mode}-main"]["load"] = result[f"{mode}-worker"]["load"]
        # Where the worker's threads wait: native frames, idle samples included.
        hw.settle()
        load_argv = [ctx.wrk, "-t1", f"-c{args.connections}", f"-d{wrk_seconds(seconds + 2)}s"]
        load_argv += ["-s", str(LUA), hw.url, "--", "track", "1", ctx.tag("p")]
        load = subprocess.Popen(load_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        path = ctx.out / "profile-track-worker-native.txt"
        argv = [ctx.py_spy, "record", "-p", str(worker), "-d", f"{seconds:g}", "-r", "100"]
        argv += ["--native", "--idle", "--threads", "-f", "raw", "-o", str(path)]
        note_command(ctx, "py-spy worker, waits", argv, **{str(worker): "WORKER_PID"})
        spy = subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=False)
        load.communicate(timeout=seconds + 30)
        if spy.returncode == 0 and path.exists():
            result["track-worker-native"] = {"path": path.name, "seconds": seconds}
        else:
            say(f"py-spy --native failed: {spy.stderr.decode(errors='replace')[-500:]}")
    finally:
        hw.stop()
    return result


LATENCY_VARIANTS = (
    ("noop", 2),
    ("gateway", 1),
    ("gateway", 2),
    ("gateway-sharded", 2),
    ("headwater", 1),
    ("headwater", 2),
)


def phase_latency(ctx: Context) -> list[dict[str, Any]]:
    """Open-loop latency at one fixed rate for the gateway alone, sharded, and whole.

    Which part of headwater puts the tail on an acknowledgement: the log (a lone
    gateway), the workers' shared write lock (sharded or not), or the pipeline.
    """
    args = ctx.args
    hosts = start_all(
        [
            Host(f"{app}-{workers}w", app, "uvicorn", workers, ctx)
            for app, workers in LATENCY_VARIANTS
        ]
    )
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for host in hosts:
                for other in hosts:
                    other.settle()
                run = openloop(ctx, host, args.latency_rate, args.open_seconds)
                rows.append({"round": round_, "app": host.app, "workers": host.workers, **run})
        if ctx.py_spy is not None:
            # Once more under a native profiler: what each worker's threads wait on.
            for host in hosts:
                if host.app == "noop":
                    continue
                host.settle()
                spies = []
                for number, worker in enumerate(host.worker_pids(), 1):
                    path = ctx.out / f"profile-latency-{host.label}-worker{number}-native.txt"
                    argv = [ctx.py_spy, "record", "-p", str(worker), "-d", "3", "-r", "100"]
                    argv += ["--native", "--idle", "--threads", "-f", "raw", "-o", str(path)]
                    note_command(ctx, "py-spy worker, waits", argv, **{str(worker): "WORKER_PID"})
                    spy = subprocess.Popen(
                        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    spies.append((number, path, spy))
                openloop(ctx, host, args.latency_rate, 4.0)
                for number, path, spy in spies:
                    spy.wait(60)
                    if path.exists():
                        label = f"{host.label}, worker {number}"
                        rows.append({"profile": path.name, "label": label})
    finally:
        stop_all(hosts)
    return rows


def phase_commits(ctx: Context) -> list[dict[str, Any]]:
    """Requests per SQLite commit under wrk load: fdatasync calls counted with strace."""
    strace = shutil.which("strace")
    if strace is None:
        say("strace not found: the commits phase is skipped")
        return []
    args = ctx.args
    rows: list[dict[str, Any]] = []
    for app, mode in (("gateway", "track"), ("headwater", "track"), ("headwater", "batch")):
        host = Host(f"{app}-commits", app, "uvicorn", args.workers, ctx).start()
        try:
            size = args.batch_size if mode == "batch" else 1
            connections = args.batch_connections if mode == "batch" else args.connections
            seconds = 3.0
            load_argv = [ctx.wrk, "-t1", f"-c{connections}", f"-d{wrk_seconds(seconds + 2)}s"]
            load_argv += ["-s", str(LUA), host.url, "--", mode, str(size), ctx.tag("c")]
            names = {host.url: "http://127.0.0.1:PORT", load_argv[-1]: "TAG"}
            note_command(ctx, f"wrk {mode}", load_argv, **names)
            load = subprocess.Popen(load_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(1.0)
            traces = []
            for pid in host.worker_pids():
                argv = [strace, "-f", "-c", "-e", "trace=fdatasync,fsync", "-p", str(pid)]
                note_command(ctx, "strace", argv, **{str(pid): "WORKER_PID"})
                traces.append(subprocess.Popen(argv, stderr=subprocess.PIPE, text=True))
            time.sleep(seconds)
            for trace in traces:
                trace.send_signal(signal.SIGINT)
            syncs = 0
            for trace in traces:
                for line in trace.communicate(timeout=30)[1].splitlines():
                    fields = line.split()
                    if fields and fields[-1] in ("fdatasync", "fsync") and len(fields) >= 5:
                        syncs += int(fields[3])
            output = load.communicate(timeout=30)[0].decode(errors="replace")
            lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"requests": 0, "duration_us": 1}
            rate = result["requests"] / (result["duration_us"] / 1e6)
            rows.append(
                {
                    "app": app,
                    "mode": mode,
                    "requests_per_s": rate,
                    "commits_per_s": syncs / seconds,
                    "requests_per_commit": rate / max(1e-9, syncs / seconds),
                    "events_per_commit": rate * size / max(1e-9, syncs / seconds),
                }
            )
            say(f"{app} {mode}: {rate:.0f} req/s, {syncs / seconds:.0f} commits/s")
        finally:
            host.stop()
    return rows


def phase_hotpath(ctx: Context) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "hotpath.py")]
    note_command(ctx, "hotpath", argv)
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=ctx.env,
        timeout=120,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"hotpath failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    say(
        f"hot path: gateway {result['gateway_single_us']:.1f} us/track,"
        f" {result['gateway_batch_us']:.0f} us/batch"
    )
    return result


# ----------------------------------------------------------------- report


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def target_rows(main: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []

    def add(metric: str, hw: str, base: str, ratio: str, target: str, met: str) -> None:
        rows.append(
            {"metric": metric, "hw": hw, "base": base, "ratio": ratio, "target": target, "met": met}
        )

    track, batch = main["track"], main["batch"]
    hw_rps = median([r["rps"] for r in track["headwater"]])
    base_rps = median([r["rps"] for r in track["noop"]])
    share = hw_rps / base_rps
    add(
        "`/v1/track` single events, req/s (wrk, saturation)",
        _n(hw_rps),
        _n(base_rps),
        f"{share:.0%}",
        "≥ 60 % of baseline",
        "yes" if share >= 0.6 else "**no**",
    )
    for point in ("p50", "p99"):
        hw = median([r[f"{point}_us"] / 1000 for r in track["headwater"]])
        base = median([r[f"{point}_us"] / 1000 for r in track["noop"]])
        add(
            f"`/v1/track` {point} ack latency at saturation",
            _ms(hw),
            _ms(base),
            f"{hw / base:.1f}x",
            "—",
            "—",
        )
    hw_ev = median([r["events_per_s"] for r in batch["headwater"]])
    base_ev = median([r["events_per_s"] for r in batch["noop"]])
    add(
        f"`/v1/batch` of {main['batch_size']} events, events/s (wrk, saturation)",
        _n(hw_ev),
        _n(base_ev),
        f"{hw_ev / base_ev:.0%}",
        "≥ 250,000 events/s",
        "yes" if hw_ev >= 250_000 else "**no**",
    )
    hw99 = median([r["p99_us"] / 1000 for r in batch["headwater"]])
    base99 = median([r["p99_us"] / 1000 for r in batch["noop"]])
    add(
        "`/v1/batch` p99 ack latency at saturation",
        _ms(hw99),
        _ms(base99),
        f"{hw99 / base99:.1f}x",
        "—",
        "—",
    )
    half_hw, half_base = main["half_headwater"], main["half_noop"]
    for point in ("p50", "p99"):
        hw = half_hw[f"{point}_ms"]
        base = half_base[f"{point}_ms"]
        target = "≤ 10 ms" if point == "p99" else "—"
        met = ("yes" if hw <= 10 else "**no**") if point == "p99" else "—"
        add(
            f"`/v1/track` {point} ack latency at half load"
            f" ({_n(main['half_rate'])} req/s, open loop)",
            _ms(hw),
            _ms(base),
            f"{hw / base:.1f}x",
            target,
            met,
        )
    fresh = main["freshness"]
    for point in ("p50", "p95"):
        value = fresh[f"fresh_{point}_ms"]
        target = "≤ 1 s" if point == "p95" else "—"
        met = (
            ("yes" if value <= 1000 and not fresh["unseen_after_deadline"] else "**no**")
            if point == "p95"
            else "—"
        )
        add(
            f"freshness {point}: 200 → visible in the store ({_n(main['fresh_rate'])} events/s)",
            _ms(value),
            "—",
            "—",
            target,
            met,
        )
    for mode, runs in (("track", track), ("batch", batch)):
        hw = median([r["server_cpu_us_per_event"] for r in runs["headwater"]])
        base = median([r["server_cpu_us_per_event"] for r in runs["noop"]])
        add(
            f"server CPU per event, {mode} (all processes)",
            f"{hw:.1f} µs",
            f"{base:.1f} µs",
            f"{hw / base:.1f}x",
            "—",
            "—",
        )
    return rows


def render(ctx: Context, results: dict[str, Any]) -> str:
    out: list[str] = []
    meta = results["meta"]
    out.append(f"#### Run of {meta['date']}: {meta['source']}")
    out.append("")
    out.append(f"- command: `{meta['command']}`")
    out.append(
        f"- machine: {meta['cpus']} CPUs, load average {meta['load_start']} at the start and"
        f" {meta['load_end']} at the end (shared machine: read ratios, not absolutes)"
    )
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("phase_seconds", {}).items())
    out.append(f"- wall time: {meta['seconds']:.0f} s ({phases})")
    out.append("")
    main = results.get("main")
    if main:
        out.append(
            "headwater and the baseline (no-op ASGI app, same uvicorn stack) with"
            f" {ctx.args.workers} workers; medians of {ctx.args.rounds} alternating rounds"
            f" of {ctx.args.seconds:g} s."
        )
        out.append("")
        out.append("| metric | headwater | baseline | ratio | target | met? |")
        out.append("|---|---:|---:|---:|---|---|")
        for row in target_rows(main):
            out.append(
                f"| {row['metric']} | {row['hw']} | {row['base']} | {row['ratio']} |"
                f" {row['target']} | {row['met']} |"
            )
        out.append("")
        out.append("Every run:")
        out.append("")
        out.append(
            "| load | server | req/s | events/s | p50 | p99 | CPU cores: workers / main / client |"
            " server CPU µs per event | worker CPU µs per request: event loop / other threads |"
        )
        out.append("|---|---|---:|---:|---:|---:|---|---:|---|")
        for mode in ("track", "batch"):
            for host in ("headwater", "noop"):
                for run in main[mode][host]:
                    out.append(
                        f"| wrk {mode} c{run['connections']} | {host} | {_n(run['rps'])} |"
                        f" {_n(run['events_per_s'])} | {_ms(run['p50_us'] / 1000)} |"
                        f" {_ms(run['p99_us'] / 1000)} | {run['worker_cores']:.2f} /"
                        f" {run['main_cores']:.2f} / {run['client_cores']:.2f} |"
                        f" {run['server_cpu_us_per_event']:.1f} |"
                        f" {run['worker_loop_us_per_request']:.1f} /"
                        f" {run['worker_threads_us_per_request']:.1f} |"
                    )
        for key, label in (
            ("half_headwater", "headwater"),
            ("half_noop", "noop"),
            ("freshness", "headwater"),
        ):
            run = main[key]
            name = "freshness" if key == "freshness" else "half load"
            out.append(
                f"| open loop {name} {_n(run['target_rate'])}/s | {label} |"
                f" {_n(run['achieved_rate'])} | {_n(run['achieved_rate'])} | {_ms(run['p50_ms'])} |"
                f" {_ms(run['p99_ms'])} (p99.9 {_ms(run['p999_ms'])}) | {run['worker_cores']:.2f} /"
                f" {run['main_cores']:.2f} / {run['client_cpu_cores']:.2f} | — | — |"
            )
        fresh = main["freshness"]
        out.append("")
        out.append(
            f"Freshness: {fresh['seen']} of {fresh['acked']} acknowledged events seen in the store;"
            f" p50 {_ms(fresh['fresh_p50_ms'])}, p95 {_ms(fresh['fresh_p95_ms'])}, p99"
            f" {_ms(fresh['fresh_p99_ms'])}, max {_ms(fresh['fresh_max_ms'])}; the store was polled"
            f" every {fresh['poll_interval_ms']:.0f} ms (admin `POST /query`, median round trip"
            f" {_ms(fresh['poll_rtt_p50_ms'])})."
            f" After the last batch run the pipeline was {_n(main['pipeline_backlog_events'])}"
            f" events behind and drained {_n(main['pipeline_drain_events_per_s'])} events/s"
            " with the gateways idle."
        )
        out.append("")
    alternatives = results.get("alternatives")
    if alternatives:
        out.append(
            f"Alternatives ({ctx.args.alt_seconds:g} s per run; `gateway` = headwater's gateway"
            " workers with no pipeline running; `gateway-sharded` = the same with one log file"
            " per worker, so no shared SQLite write lock):"
        )
        out.append("")
        out.append(
            "| stack | workers | app | track req/s | track p99 | batch events/s | batch p99 |"
            " track vs no-op | batch vs no-op | server CPU µs/event: track / batch |"
        )
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
        table: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = {}
        for row in alternatives:
            table.setdefault((row["stack"], row["workers"], row["app"]), {})[row["mode"]] = row
        for (stack, workers, app), modes in table.items():
            base = table.get((stack, workers, "noop"), {})
            track, batch = modes.get("track"), modes.get("batch")
            if not track or not batch:
                continue
            out.append(
                f"| {stack} | {workers} | {app} | {_n(track['rps'])} |"
                f" {_ms(track['p99_us'] / 1000)} |"
                f" {_n(batch['events_per_s'])} | {_ms(batch['p99_us'] / 1000)} |"
                f" {track['rps'] / base['track']['rps']:.0%} |"
                f" {batch['events_per_s'] / base['batch']['events_per_s']:.0%} |"
                f" {track['server_cpu_us_per_event']:.0f} /"
                f" {batch['server_cpu_us_per_event']:.1f} |"
            )
        out.append("")
    profile = results.get("profile")
    if profile:
        from profile_summary import per_thread

        out.append(
            f"Profile (py-spy, {ctx.args.profile_rate} Hz, non-blocking,"
            f" {ctx.args.profile_seconds:g} s"
            " under wrk load; share of wall time each thread was on CPU, and its top functions by"
            " self time):"
        )
        out.append("")
        for key in ("track-worker", "track-main", "batch-worker", "batch-main"):
            if key not in profile:
                continue
            info = profile[key]
            out.append(f"`{info['path']}`, under wrk {key.split('-')[0]} at {info['load']}:")
            out.append("")
            out.append("```")
            out.append(
                per_thread(ctx.out / info["path"], info["seconds"], ctx.args.profile_rate, top=8)
            )
            out.append("```")
            out.append("")
    if profile and "track-worker-native" in profile:
        from profile_summary import waits

        out.append(
            "Where a gateway worker's threads spend wall time under wrk track load"
            " (py-spy `--native --idle`, 100 Hz):"
        )
        out.append("")
        out.append("```")
        out.append(waits(ctx.out / profile["track-worker-native"]["path"]))
        out.append("```")
        out.append("")
    hot = results.get("hotpath")
    if hot:
        out.append("Hot path, one process on one core (`bench/hotpath.py`):")
        out.append("")
        out.append("| step | single event | 100-event batch | per event in batch |")
        out.append("|---|---:|---:|---:|")
        out.append(
            f"| gateway app, whole request (ASGI call, log append stubbed) |"
            f" {hot['gateway_single_us']:.1f} µs | {hot['gateway_batch_us']:.0f} µs |"
            f" {hot['gateway_batch_us'] / 100:.2f} µs |"
        )
        for part, label in (
            ("decode_us", "`body.parse_json`"),
            ("depth_check_us", "`body.nests_deeper` (nesting screen)"),
            ("normalize_us", "`normalize` on every message"),
            ("encode_us", "encode the log record"),
        ):
            if part not in hot["single"]:
                continue
            out.append(
                f"| {label} | {hot['single'][part]:.1f} µs | {hot['batch'][part]:.0f} µs |"
                f" {hot['batch'][part] / 100:.2f} µs |"
            )
        if "size_check_us" in hot["batch"]:
            out.append(
                f"| per-message size check (`_accept`, bodies > 32 KiB) | — |"
                f" {hot['batch']['size_check_us']:.0f} µs |"
                f" {hot['batch']['size_check_us'] / 100:.2f} µs |"
            )
        out.append(
            f"| `parse_ms` (per call; `normalize` calls it per time field) |"
            f" {hot['parse_ms_us']:.2f} µs | — | — |"
        )
        store = hot.get("store_write", {})
        if "error" in store:
            out.append(
                f"| `DuckDBStore.write` per pipeline step | not measured: {store['error']} |"
            )
        elif store:
            out.append(
                f"| `DuckDBStore.write`, no rows, no counters (fixed cost of a pipeline step) |"
                f" {store['bare_ms']:.1f} ms | — | — |"
            )
            out.append(
                f"| `DuckDBStore.write`, no rows, 4 counters (each: 2 upserts) |"
                f" {store['with_4_counters_ms']:.1f} ms | — |"
                f" {store['per_counter_ms']:.1f} ms per counter |"
            )
        commits = ", ".join(f"{k}: {v:.2f} ms" for k, v in hot["sqlite_commit_ms"].items())
        out.append("")
        out.append(f"SQLite group commit (`SQLiteLogWriter.append`, k records): {commits}.")
        for writers, row in hot.get("sqlite_writers", {}).items():
            out.append(
                f"{writers} process(es) committing one single-event record at a time to one log:"
                f" {_n(row['commits_per_s'])} commits/s in all, p50 {row['p50_ms']:.2f} ms,"
                f" p99 {row['p99_ms']:.1f} ms, p99.9 {row['p999_ms']:.1f} ms,"
                f" max {row['max_ms']:.1f} ms per commit."
            )
        out.append("")
    latency = results.get("latency")
    if latency:
        out.append(
            f"Open-loop `/v1/track` at {_n(ctx.args.latency_rate)} req/s for each variant"
            f" (uvicorn; {ctx.args.open_seconds:g} s per run, one line per round):"
        )
        out.append("")
        out.append("| app | workers | round | p50 | p99 | p99.9 | achieved req/s |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for row in latency:
            if "profile" in row:
                continue
            out.append(
                f"| {row['app']} | {row['workers']} | {row['round'] + 1} | {_ms(row['p50_ms'])} |"
                f" {_ms(row['p99_ms'])} | {_ms(row['p999_ms'])} | {_n(row['achieved_rate'])} |"
            )
        out.append("")
    profiled = [row for row in latency or [] if "profile" in row]
    if profiled:
        from profile_summary import waits

        out.append(
            "What one worker's threads wait on at that rate (py-spy `--native --idle`, 3 s):"
        )
        out.append("")
        for row in profiled:
            out.append(f"`{row['label']}`:")
            out.append("")
            out.append("```")
            out.append(waits(ctx.out / row["profile"]))
            out.append("```")
            out.append("")
    commits = results.get("commits")
    if commits:
        out.append(
            "Group commit under wrk load (fdatasync calls of the workers, counted by strace):"
        )
        out.append("")
        out.append("| app | load | req/s | commits/s | requests per commit | events per commit |")
        out.append("|---|---|---:|---:|---:|---:|")
        for row in commits:
            out.append(
                f"| {row['app']} | {row['mode']} | {_n(row['requests_per_s'])} |"
                f" {_n(row['commits_per_s'])} | {row['requests_per_commit']:.1f} |"
                f" {row['events_per_commit']:.0f} |"
            )
        out.append("")
    if ctx.commands:
        out.append(
            "Commands, by phase (PORT, TAG, PIDs and the admin token are filled in per run):"
        )
        out.append("")
        for name, command in ctx.commands.items():
            out.append(f"- {name}: `{command}`")
        out.append("")
    return "\n".join(out)


def record(text: str, phases: list[str]) -> None:
    """Put the generated section into bench/RESULTS.md, keeping the rest.

    A run of the default phases replaces the last such run's block; a run of
    other phases has a block of its own, named after them.
    """
    name = "" if list(phases) == list(PHASES) else f" ({', '.join(phases)})"
    start, end = MARK.format(name, "start"), MARK.format(name, "end")
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in current and end in current:
        head, _, rest = current.partition(start)
        _, _, tail = rest.partition(end)
        current = head + block + tail
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(current)


# ----------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="headwater benchmarks against a no-op baseline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rev", help="benchmark this git revision instead of the working tree")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated; also on request: {', '.join(EXTRA_PHASES)}",
    )
    parser.add_argument(
        "--latency-rate", type=float, default=4000.0, help="latency phase, requests/s"
    )
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (main phase)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per load")
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--open-seconds", type=float, default=4.0, help="per open-loop run")
    parser.add_argument("--alt-seconds", type=float, default=2.0, help="per alternatives run")
    parser.add_argument("--connections", type=int, default=100, help="wrk, single events")
    parser.add_argument("--batch-connections", type=int, default=32, help="wrk, batches")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--fresh-share", type=float, default=0.25, help="of peak track rate")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="freshness polling")
    parser.add_argument("--profile-seconds", type=float, default=3.0)
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--out", type=Path, help="raw results; default bench/out/DATE")
    parser.add_argument("--record", action="store_true", help="write into bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    for value in (args.seconds, args.open_seconds, args.alt_seconds, args.profile_seconds):
        if not 0 < value <= 30:
            parser.error("keep every run bounded: durations of at most 30 s")
    if not 1 <= args.rounds <= 5:
        parser.error("--rounds: 1 to 5")
    return args


def main() -> int:
    args = parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES) - set(EXTRA_PHASES)
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or BENCH / "out" / stamp
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    try:
        src, source = prepare_source(args.rev, tmp)
        sys.path.insert(0, str(src))
        ctx = Context(args, tmp, out, src)
        ctx.wrk = ensure_wrk()
        if "profile" in phases or "latency" in phases:
            ctx.py_spy = ensure_py_spy()
        say(f"benchmarking {source}; raw results in {out}")
        results: dict[str, Any] = {
            "meta": {
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                "source": source,
                "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
                "cpus": os.cpu_count(),
                "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                "versions": versions(ctx.wrk),
            }
        }
        functions = {
            "main": phase_main,
            "alternatives": phase_alternatives,
            "profile": phase_profile,
            "hotpath": phase_hotpath,
            "latency": phase_latency,
            "commits": phase_commits,
        }
        durations: dict[str, float] = {}
        for phase in PHASES + EXTRA_PHASES:
            if phase in phases:
                begun = time.monotonic()
                say(f"phase {phase}")
                ctx.phase = phase
                results[phase] = functions[phase](ctx)
                durations[phase] = time.monotonic() - begun
        if "main" in results:
            results["main"]["batch_size"] = args.batch_size
        results["meta"]["phase_seconds"] = durations
        results["meta"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        results["meta"]["seconds"] = time.time() - started
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        text = render(ctx, results)
        (out / "results.md").write_text(text + "\n")
        print(text)
        if args.record:
            record(text, phases)
            say(f"recorded in {RESULTS.relative_to(ROOT)}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
