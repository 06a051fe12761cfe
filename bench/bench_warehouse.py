"""Events per second loaded into PostgreSQL by the warehouse destination.

Two measurements in one run, on one throwaway PostgreSQL server (durable
settings: fsync on) that the script starts and removes:

1. destination: ``Postgres.deliver`` on prepared batches of Segment events
   (layout, casts, schema changes, COPY into staging, INSERT ... ON CONFLICT,
   users upsert, one transaction per batch), into an empty schema;
2. baseline: the same rows, as the destination would write them, copied with a
   plain ``COPY`` straight into identical tables (no staging, no dedup, no
   layout work), one transaction per batch.

Usage: ``python bench/bench_warehouse.py [--events 200000] [--batch 5000]``
or ``--dsn`` to use an existing server (schemas ``bench_*`` are replaced).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from headwater.destinations.base import DestinationConfig  # noqa: E402
from headwater.destinations.postgres import Postgres, _columns_of  # noqa: E402
from headwater.destinations.warehouse import cast_rows  # noqa: E402
from headwater.spec.timestamps import format_ms  # noqa: E402

EVENTS = [
    "Product Viewed",
    "Product Added",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Signed Up",
    "Search Performed",
    "Video Played",
]
MAX_SECONDS = 600  # every phase stops here whatever --events says


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Segment events shaped like the pipeline's output: 85% track, 10% page, 5% identify."""
    rng = random.Random(seed)
    start = 1_760_000_000_000
    events: list[dict[str, Any]] = []
    for i in range(count):
        ms = start + i * 3
        user = f"user-{rng.randrange(20_000)}"
        context = {
            "library": {"name": "analytics.js", "version": "5.2.1"},
            "ip": f"203.0.113.{rng.randrange(256)}",
            "locale": "en-US",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0",
            "page": {
                "path": f"/p/{i % 500}",
                "referrer": "https://example.com/",
                "search": "",
                "title": "Example",
                "url": f"https://example.com/p/{i % 500}",
            },
            "timezone": "Europe/Berlin",
        }
        event: dict[str, Any] = {
            "messageId": f"bench-{seed}-{i}",
            "userId": user,
            "anonymousId": f"anon-{i % 30_000}",
            "context": context,
            "timestamp": format_ms(ms),
            "originalTimestamp": format_ms(ms - 40),
            "sentAt": format_ms(ms + 5),
            "receivedAt": format_ms(ms + 10),
            "integrations": {},
            "type": "track",
        }
        roll = rng.random()
        if roll < 0.85:
            event["event"] = EVENTS[i % len(EVENTS)]
            event["properties"] = {
                "product_id": f"sku-{rng.randrange(1000)}",
                "price": round(rng.uniform(1, 500), 2),
                "quantity": rng.randrange(1, 5),
                "currency": "EUR",
                "in_stock": rng.random() < 0.9,
                "category": {"name": "shoes", "level": 2},
            }
        elif roll < 0.95:
            event["type"] = "page"
            event["name"] = "Home"
            event["properties"] = {"path": "/", "title": "Example", "url": "https://example.com/"}
        else:
            event["type"] = "identify"
            event["traits"] = {
                "email": f"{user}@example.com",
                "plan": rng.choice(["free", "pro", "team"]),
                "logins": rng.randrange(100),
                "address": {"city": "Berlin", "country": "DE"},
            }
        events.append(event)
    return events


def run_destination(dsn: str, batches: list[list[dict[str, Any]]]) -> tuple[float, int]:
    config = DestinationConfig(
        name="bench", kind="postgres", settings={"dsn": dsn, "schema": "bench_destination"}
    )
    destination = Postgres(config)
    loaded = 0
    started = time.perf_counter()
    try:
        for batch in batches:
            outcome = destination.deliver(batch)
            if outcome.kind != "delivered" or outcome.rejected:
                raise RuntimeError(f"load failed: {outcome}")
            loaded += len(batch)
            if time.perf_counter() - started > MAX_SECONDS:
                break
    finally:
        destination.close()
    return time.perf_counter() - started, loaded


def run_baseline(dsn: str, batches: list[list[dict[str, Any]]]) -> tuple[float, int, int]:
    """COPY the destination's rows straight into copies of its tables."""
    layout_source = Postgres(
        DestinationConfig(
            name="b", kind="postgres", settings={"dsn": dsn, "schema": "bench_destination"}
        )
    )
    prepared: list[list[tuple[str, list[str], list[list[Any]]]]] = []
    with psycopg.connect(dsn) as conn:
        kinds = layout_source._catalog(conn)
        for events in batches:
            batch = layout_source.layout.build(events)
            tables = []
            for table in batch.tables.values():
                cast_rows(table, kinds[table.name], [])
                columns = _columns_of(table.rows)
                tables.append(
                    (table.name, columns, [list(map(row.get, columns)) for row in table.rows])
                )
            prepared.append(tables)
        conn.execute("DROP SCHEMA IF EXISTS bench_baseline CASCADE")
        conn.execute("CREATE SCHEMA bench_baseline")
        for name in kinds:
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier("bench_baseline", name),
                    sql.Identifier("bench_destination", name),
                )
            )
        conn.commit()
        rows = 0
        loaded = 0
        started = time.perf_counter()
        for events, tables in zip(batches, prepared, strict=True):
            with conn.cursor() as cur:
                for name, columns, values in tables:
                    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                        sql.Identifier("bench_baseline", name),
                        sql.SQL(", ").join(map(sql.Identifier, columns)),
                    )
                    with cur.copy(statement) as copy_:
                        for row in values:
                            copy_.write_row(row)
                    rows += len(values)
            conn.commit()
            loaded += len(events)
            if time.perf_counter() - started > MAX_SECONDS:
                break
        return time.perf_counter() - started, loaded, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--dsn", help="an existing PostgreSQL server instead of a throwaway one")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    events = make_events(min(args.events, 2_000_000))
    batches = [events[i : i + args.batch] for i in range(0, len(events), args.batch)]

    def measure(dsn: str) -> dict[str, Any]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS bench_destination CASCADE")
            version = conn.execute("SHOW server_version").fetchone()
        seconds, loaded = run_destination(dsn, copy.deepcopy(batches))
        base_seconds, base_loaded, rows = run_baseline(dsn, batches)
        return {
            "events": loaded,
            "batch": args.batch,
            "postgres": version[0] if version else "?",
            "destination_seconds": round(seconds, 3),
            "destination_events_per_s": round(loaded / seconds),
            "baseline_seconds": round(base_seconds, 3),
            "baseline_events_per_s": round(base_loaded / base_seconds),
            "rows_per_event": round(rows / max(1, base_loaded), 2),
        }

    if args.dsn:
        result = measure(args.dsn)
    else:
        from pg import running_cluster

        with running_cluster(durable=True) as cluster:
            result = measure(cluster.create_database())
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
