"""Console API latency over a large DuckDB store, and a funnel against plain SQL.

1. Builds a data directory whose DuckDB store holds ``--events`` events
   (10 million by default), generated in SQL inside DuckDB: about 100,000
   people (70 % of them identified), 20 track event names with a skewed mix,
   85 % track / 12 % page / 3 % identify, properties, traits and context JSON,
   four sources, 1 % bots, 30 days of timestamps ending now, plus a
   ``headwater.toml`` and the counters the report reads.
2. Starts a real ``headwater serve`` on it (``--port 0``,
   ``HEADWATER_CONSOLE_PORT=0``) and times, over HTTP on 127.0.0.1, every
   request the console's default views make, ``--reps`` times each (bounded
   by ``--view-seconds`` per request): p50, p95 and the first (cold) call.
3. Stops the server and runs a 3-step funnel over the last 7 days through
   ``headwater.insights.funnel`` and, alternating with it, the same funnel
   written directly as SQL, on the same file in this process; the medians
   and their ratio.

Usage: ``python bench/bench_console.py [--events 10000000] [--reps 15]``.
Data and results go to ``bench/out/console-DATE/``; the data directory is
removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

from headwater import config, insights
from headwater.metrics.report import ReportSettings
from headwater.store.duckdb import DuckDBStore, store_path

BENCH = Path(__file__).resolve().parent
DAY_MS = 86_400_000
EVENTS = [
    "Product Viewed",
    "Product Added",
    "Search Performed",
    "Cart Viewed",
    "Order Completed",
    "Checkout Started",
    "Signed Up",
    "Logged In",
    "Video Played",
    "Button Clicked",
    "Form Submitted",
    "Item Shared",
    "Comment Posted",
    "Plan Upgraded",
    "Invite Sent",
    "File Uploaded",
    "Notification Opened",
    "Settings Changed",
    "Coupon Applied",
    "Subscription Cancelled",
]
FUNNEL = ["Product Viewed", "Product Added", "Order Completed"]
TARGET_P95_MS = 200.0
TARGET_RATIO = 1.2


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _u(i: str, k: int) -> str:
    """A uniform number in [0, 1) from row number ``i`` and stream ``k``."""
    return f"((hash({i} * 8191 + {k}) % 1000000) / 1000000.0)"


def generate(data_dir: Path, events: int, now_ms: int) -> dict[str, Any]:
    """The data directory: settings and a DuckDB store with ``events`` rows."""
    sources = ["web", "ios", "android", "server"]
    config.save(
        data_dir,
        config.Settings(
            sources=[config.Source(name=s, write_key=config.new_write_key()) for s in sources],
            report=ReportSettings(expected_events=EVENTS),
        ),
    )
    DuckDBStore(store_path(data_dir)).close()  # headwater's own schema
    start_ms = now_ms - 30 * DAY_MS
    span = 30 * DAY_MS
    con = duckdb.connect(str(store_path(data_dir)))
    con.execute("SET TimeZone = 'UTC'")
    started = time.perf_counter()
    # received_at grows with the row number (the order the pipeline appends in);
    # the event's own timestamp is a little earlier, hours earlier for 2 %.
    con.execute(
        f"""
        INSERT INTO events
        WITH base AS (
            SELECT i,
                {_u("i", 1)} AS u_type,
                CAST(floor(20 * pow({_u("i", 2)}, 2.0)) AS INTEGER) AS name_ix,
                CAST(floor(100000 * pow({_u("i", 3)}, 1.6)) AS INTEGER) AS person,
                {_u("i", 4)} AS u_misc,
                CAST(hash(i * 8191 + 5) % 1000000007 AS BIGINT) AS h,
                CAST({start_ms} + (i * {span}) // {events} AS BIGINT) AS recv_ms
            FROM range({events}) AS t(i)
        ), shaped AS (
            SELECT *,
                CASE WHEN u_type < 0.85 THEN 'track' WHEN u_type < 0.97 THEN 'page'
                     ELSE 'identify' END AS kind,
                CASE WHEN person % 20 < 11 THEN 'web' WHEN person % 20 < 15 THEN 'ios'
                     WHEN person % 20 < 19 THEN 'android' ELSE 'server' END AS src,
                CASE WHEN u_misc < 0.02 THEN 3600000 + h % 7200000 ELSE 20 + h % 400 END
                    AS lag_ms
            FROM base
        )
        SELECT
            'msg-' || i,
            src,
            kind,
            CASE WHEN kind = 'track' THEN {_sql_list(EVENTS)}[name_ix + 1] END,
            CASE WHEN kind = 'page' THEN
                ['Home', 'Pricing', 'Docs', 'Blog', 'Product', 'Cart', 'Account', 'Search']
                [CAST(h % 8 AS INTEGER) + 1] END,
            CASE WHEN person < 70000 THEN 'user-' || person END,
            'anon-' || person,
            CASE WHEN person % 10 = 0 THEN 'org-' || (person % 997) END,
            NULL,
            make_timestamptz((recv_ms - lag_ms) * 1000),
            make_timestamptz((recv_ms - lag_ms) * 1000),
            make_timestamptz((recv_ms - CASE WHEN h % 100 = 7 THEN 120000 ELSE 15 END) * 1000),
            make_timestamptz(recv_ms * 1000),
            CASE kind
                WHEN 'track' THEN json_object(
                    'plan', ['free', 'pro', 'team'][CAST(person % 3 AS INTEGER) + 1],
                    'value', (h % 10000) / 100.0)
                WHEN 'page' THEN json_object('path', '/p/' || (h % 50), 'referrer', 'search')
                ELSE json_object() END,
            CASE WHEN kind = 'identify' THEN json_object(
                'plan', ['free', 'pro', 'team'][CAST(person % 3 AS INTEGER) + 1],
                'email', 'user-' || person || '@example.com') END,
            json_object(
                'library', json_object(
                    'name', CASE src WHEN 'web' THEN 'analytics.js'
                        WHEN 'ios' THEN 'analytics-ios' WHEN 'android' THEN 'analytics-android'
                        ELSE 'analytics-python' END,
                    'version', CASE WHEN h % 10 = 0 THEN '4.0.0' ELSE '5.2.1' END),
                'locale', 'en-US'),
            NULL,
            NULL,
            '10.' || (person % 256) || '.' || ((person // 256) % 256) || '.7',
            CASE src WHEN 'web' THEN 'Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0'
                WHEN 'ios' THEN 'MyApp/3.2 CFNetwork/1410 Darwin/22.6.0'
                WHEN 'android' THEN 'MyApp/3.2 (Linux; Android 14)'
                ELSE 'analytics-python/2.3.4' END,
            CASE src
                WHEN 'web' THEN ['Chrome', 'Firefox', 'Safari'][CAST(person % 3 AS INTEGER) + 1]
                WHEN 'server' THEN NULL ELSE 'App' END,
            CASE src WHEN 'web' THEN ['Windows', 'macOS', 'Linux'][CAST(person % 3 AS INTEGER) + 1]
                WHEN 'ios' THEN 'iOS' WHEN 'android' THEN 'Android' ELSE NULL END,
            CASE src WHEN 'web' THEN 'desktop' WHEN 'server' THEN NULL ELSE 'mobile' END,
            h % 100 = 0,
            CASE WHEN h % 20 = 3 THEN json_object('source', 'newsletter', 'medium', 'email') END,
            NULL,
            i + 1,
            make_timestamptz((recv_ms + 60 + h % 300) * 1000)
        FROM shaped
        """
    )
    con.execute(
        "INSERT INTO counters SELECT 'received', count(*) FROM events"
        " UNION ALL SELECT 'stored', count(*) FROM events"
    )
    con.execute(
        "INSERT INTO counter_minutes SELECT date_trunc('minute', received_at), n, count(*)"
        " FROM events, (VALUES ('received'), ('stored')) AS v(n) GROUP BY 1, 2"
    )
    con.execute("CHECKPOINT")
    seconds = time.perf_counter() - started
    rows = con.execute("SELECT count(*), count(DISTINCT anonymous_id) FROM events").fetchone()
    con.close()
    assert rows is not None
    return {
        "events": int(rows[0]),
        "people": int(rows[1]),
        "seconds": round(seconds, 1),
        "file_mb": round(store_path(data_dir).stat().st_size / 1e6),
    }


class Server:
    """``headwater serve`` on the data directory; stopped by its PID."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
        env["HEADWATER_CONSOLE_PORT"] = "0"
        argv = [sys.executable, "-m", "headwater.cli", "--data-dir", str(data_dir)]
        argv += ["serve", "--port", "0", "--workers", "1"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.data_dir = data_dir

    def wait_ready(self, timeout: float = 120.0) -> httpx.Client:
        deadline = time.monotonic() + timeout
        admin = self.data_dir / "run" / "admin.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("headwater serve exited; see its log")
            try:
                info = json.loads(admin.read_text())
                client = httpx.Client(
                    base_url=f"http://127.0.0.1:{int(info['port'])}",
                    headers={"Authorization": f"Bearer {info['token']}"},
                    timeout=60.0,
                )
                if client.get("/api/status").status_code == 200:
                    return client
                client.close()
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"headwater serve not ready in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def views(now: int, top: list[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(view, request label, path, params) of each default console view, as app.js asks."""
    since30 = _iso(now - 30 * DAY_MS)
    counts = "/api/insights/counts"
    rng = {f"{d}d": {"since": _iso(now - d * DAY_MS), "until": _iso(now)} for d in (1, 7, 30)}
    return [
        ("floor: settings only, no store query", "sources", "/api/sources", {}),
        ("status line (every tab, 10 s)", "status", "/api/status", {}),
        ("Volumes/Insights: known events", "counts month by event, 30 d", counts,
         {"since": since30, "bucket": "month", "breakdown": "event"}),
        ("Volumes (default 24 h, by event)", "counts hour by event, 24 h", counts,
         {**rng["1d"], "bucket": "hour", "breakdown": "event"}),
        ("Volumes 24 h, no breakdown", "counts hour, 24 h", counts,
         {**rng["1d"], "bucket": "hour"}),
        ("Volumes 7 d, by event", "counts hour by event, 7 d", counts,
         {**rng["7d"], "bucket": "hour", "breakdown": "event"}),
        ("Volumes 30 d, by event", "counts day by event, 30 d", counts,
         {**rng["30d"], "bucket": "day", "breakdown": "event"}),
        ("Volumes 30 d, no breakdown", "counts day, 30 d", counts,
         {**rng["30d"], "bucket": "day"}),
        ("Insights: funnel (top 2 events, 1 d, 7 d)", "funnel", "/api/insights/funnel",
         {"steps": ",".join(top[:2]), "within_seconds": 86400, "days": 7}),
        ("Insights: unique users (day, 30 d)", "users", "/api/insights/users",
         {"bucket": "day", "days": 30}),
        ("Insights: retention (week, 8, 56 d)", "retention", "/api/insights/retention",
         {"bucket": "week", "periods": 8, "days": 56}),
        ("Report", "report", "/api/report", {}),
        ("Delivery", "destinations", "/api/destinations", {}),
    ]  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 1)))  # nearest rank
    return ordered[min(rank, len(ordered)) - 1]


def measure_console(client: httpx.Client, reps: int, budget: float) -> list[dict[str, Any]]:
    known = client.get(
        "/api/insights/counts",
        params={"since": _iso(int(time.time() * 1000) - 30 * DAY_MS), "bucket": "month",
                "breakdown": "event"},
    ).json()  # fmt: skip
    totals: dict[str, int] = {}
    for row in known["series"]:
        if row["value"] is not None:
            totals[row["value"]] = totals.get(row["value"], 0) + row["events"]
    top = sorted(totals, key=lambda k: -totals[k])
    results = []
    for view, label, path, params in views(int(time.time() * 1000), top):
        times: list[float] = []
        first = 0.0
        deadline = time.monotonic() + budget
        for rep in range(reps + 1):  # the first call is reported apart (cold)
            started = time.perf_counter()
            response = client.get(path, params=params)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
            if rep == 0:
                first = elapsed
            else:
                times.append(elapsed)
            if time.monotonic() > deadline:
                break
        results.append(
            {
                "view": view,
                "request": label,
                "path": path,
                "params": params,
                "n": len(times),
                "first_ms": round(first, 1),
                "p50_ms": round(_pct(times, 0.5), 1) if times else None,
                "p95_ms": round(_pct(times, 0.95), 1) if times else None,
            }
        )
        print(f"  {label}: {results[-1]}", file=sys.stderr)
    return results


PERSON = "coalesce(user_id, 'anon:' || anonymous_id)"


def hand_funnel_sql(steps: int) -> str:
    """The funnel written directly: one scan of the steps' events, then a join per step."""
    ctes = [
        f"e AS (SELECT {PERSON} AS person, event, timestamp AS t FROM events"
        " WHERE event IN (?, ?, ?) AND timestamp >= make_timestamptz(? * 1000)"
        " AND timestamp < make_timestamptz(? * 1000) AND NOT coalesce(is_bot, false))",
        "f0 AS (SELECT person, min(t) AS t, min(t) AS start FROM e WHERE event = ?"
        " GROUP BY person)",
    ]
    for k in range(1, steps):
        ctes.append(
            f"f{k} AS (SELECT p.person, min(e.t) AS t, p.start FROM f{k - 1} p"
            " JOIN e ON e.person = p.person AND e.event = ? AND e.t >= p.t"
            " AND e.t <= p.start + to_seconds(?) GROUP BY p.person, p.start)"
        )
    counts = " UNION ALL ".join(f"SELECT {k}, count(*) FROM f{k}" for k in range(steps))
    return f"WITH {', '.join(ctes)} {counts} ORDER BY 1"


def measure_funnel(path: Path, reps: int, budget: float) -> dict[str, Any]:
    store = DuckDBStore(path, read_only=True)

    def query(sql: str, params: list[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        result = store.query(sql, params)
        return result.columns, result.rows

    now = int(time.time() * 1000)
    window = insights.Window(now - 7 * DAY_MS, now)
    within = 86_400
    hand_sql = hand_funnel_sql(len(FUNNEL))
    hand_args: list[Any] = [*FUNNEL, window.since_ms, window.until_ms, FUNNEL[0]]
    for step in FUNNEL[1:]:
        hand_args += [step, within]
    timings: dict[str, list[float]] = {"headwater": [], "hand": []}
    answers: dict[str, list[int]] = {}
    deadline = time.monotonic() + budget
    for rep in range(reps):
        order = ["headwater", "hand"] if rep % 2 == 0 else ["hand", "headwater"]
        for name in order:
            started = time.perf_counter()
            if name == "headwater":
                out = insights.funnel(query, window, FUNNEL, within)
                people = [s["people"] for s in out["steps"]]
            else:
                people = [int(n) for _, n in store.query(hand_sql, hand_args).rows]
            timings[name].append((time.perf_counter() - started) * 1000)
            answers[name] = people
        if time.monotonic() > deadline:
            break
    if answers["headwater"] != answers["hand"]:
        raise RuntimeError(f"funnels disagree: {answers}")
    captured: list[tuple[str, list[Any]]] = []

    def capture(sql: str, args: list[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        captured.append((sql, args))
        return query(sql, args)

    insights.funnel(capture, window, FUNNEL, within)
    explain = {}
    for name, (sql, args) in (("headwater", captured[0]), ("hand", (hand_sql, hand_args))):
        rows = store.query("EXPLAIN ANALYZE " + sql, args).rows
        explain[name] = "\n".join(str(r[-1]) for r in rows)
    store.close()
    medians = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "steps": FUNNEL,
        "people": answers["headwater"],
        "runs": len(timings["hand"]),
        "headwater_ms": [round(t, 1) for t in timings["headwater"]],
        "hand_ms": [round(t, 1) for t in timings["hand"]],
        "headwater_median_ms": round(medians["headwater"], 1),
        "hand_median_ms": round(medians["hand"], 1),
        "ratio": round(medians["headwater"] / medians["hand"], 2),
        "explain": explain,
    }


def report(gen: dict[str, Any], console: list[dict[str, Any]], fun: dict[str, Any]) -> str:
    lines = [
        f"Store: {gen['events']:,} events, {gen['people']:,} people, {gen['file_mb']:,} MB,"
        f" generated in {gen['seconds']} s.",
        "",
        "| view | request | n | first (cold) | p50 | p95 | p95 ≤ 200 ms |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in console:
        met = "yes" if r["p95_ms"] is not None and r["p95_ms"] <= TARGET_P95_MS else "no"
        lines.append(
            f"| {r['view']} | {r['request']} | {r['n']} | {r['first_ms']:,} ms"
            f" | {r['p50_ms']:,} ms | {r['p95_ms']:,} ms | {met} |"
        )
    met = "yes" if fun["ratio"] <= TARGET_RATIO else "no"
    lines += [
        "",
        f"Funnel {' → '.join(fun['steps'])}, last 7 days, within 1 day"
        f" ({' / '.join(f'{p:,}' for p in fun['people'])} people), {fun['runs']} runs each,"
        " alternating:",
        "",
        "| | median | runs | ratio | ≤ 1.2x |",
        "|---|---:|---|---:|---|",
        f"| `insights.funnel` | {fun['headwater_median_ms']:,} ms"
        f" | {', '.join(map(str, fun['headwater_ms']))} | {fun['ratio']}x | {met} |",
        f"| the same funnel in plain SQL | {fun['hand_median_ms']:,} ms"
        f" | {', '.join(map(str, fun['hand_ms']))} | 1 | |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=15, help="timed calls per request")
    parser.add_argument("--view-seconds", type=float, default=20.0, help="bound per request")
    parser.add_argument("--funnel-reps", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()

    out = BENCH / "out" / time.strftime("console-%Y%m%d-%H%M%S")
    data_dir = out / "data"
    out.mkdir(parents=True)
    started = time.monotonic()
    server: Server | None = None
    try:
        print(f"generating {args.events:,} events ...", file=sys.stderr)
        gen = generate(data_dir, args.events, int(time.time() * 1000))
        print(f"  {gen}", file=sys.stderr)
        server = Server(data_dir, out / "serve.log")
        client = server.wait_ready()
        ready_s = time.monotonic() - started - gen["seconds"]
        print(f"server ready ({ready_s:.1f} s); console requests ...", file=sys.stderr)
        console = measure_console(client, args.reps, args.view_seconds)
        client.close()
        server.stop()
        server = None
        print("funnel: insights.funnel against plain SQL ...", file=sys.stderr)
        fun = measure_funnel(store_path(data_dir), args.funnel_reps, 120.0)
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    (out / "results.json").write_text(
        json.dumps({"generate": gen, "console": console, "funnel": fun}, indent=2, default=str)
    )
    for name, plan in fun["explain"].items():
        (out / f"explain-funnel-{name}.txt").write_text(plan)
    print(report(gen, console, fun))
    print(f"\nwall time {time.monotonic() - started:.0f} s; raw results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
