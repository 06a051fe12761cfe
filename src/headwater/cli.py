"""The ``headwater`` command line."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from headwater import config, destinations
from headwater.admin import AdminClient, status_of, to_jsonable
from headwater.destinations.base import Destination
from headwater.destinations.replay import (
    STORE_COLUMNS,
    event_from_row,
    replay_dead_letters,
    replay_events,
    time_bounds,
)
from headwater.destinations.state import DeadLetter
from headwater.spec.timestamps import format_ms
from headwater.store.base import QueryResult


def _data_dir(args: argparse.Namespace) -> Path:
    return config.resolve_data_dir(getattr(args, "data_dir", None))


def _settings(args: argparse.Namespace) -> config.Settings:
    return config.load(_data_dir(args))


def cmd_init(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    settings = config.init(data_dir, args.source)
    source = settings.sources[0]
    print(f"wrote {config.config_path(data_dir)}")
    print(f"source {source.name!r} write key: {source.write_key}")
    return 0


def _editable(data_dir: Path) -> config.Settings:
    # Edit the file's own values, not the environment's overrides.
    return config.load(data_dir, environ={})


def cmd_sources_add(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    settings = _editable(data_dir)
    source = config.Source(name=args.name, write_key=args.write_key or config.new_write_key())
    settings.sources.append(source)
    config._validate(settings)
    config.save(data_dir, settings)
    print(f"source {source.name!r} write key: {source.write_key}")
    return 0


def cmd_sources_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = [(s.name, s.write_key, "yes" if s.enabled else "no") for s in settings.sources]
    print_table(["name", "write_key", "enabled"], rows)
    return 0


def cmd_sources_rotate(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    settings = _editable(data_dir)
    for source in settings.sources:
        if source.name == args.name:
            source.write_key = args.write_key or config.new_write_key()
            config._validate(settings)
            config.save(data_dir, settings)
            print(f"source {source.name!r} new write key: {source.write_key}")
            return 0
    print(f"no source named {args.name!r}", file=sys.stderr)
    return 1


def cmd_serve(args: argparse.Namespace) -> int:
    from headwater.serve import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data_dir = _data_dir(args)
    if not config.config_path(data_dir).exists():
        settings = config.init(data_dir)
        print(f"wrote a starter configuration to {config.config_path(data_dir)}", file=sys.stderr)
        print(f"source 'default' write key: {settings.sources[0].write_key}", file=sys.stderr)
    return Server(data_dir, args.host, args.port, args.workers).run()


def _server_url(args: argparse.Namespace, settings: config.Settings) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    run_file = _data_dir(args) / "run" / "serve.json"
    host, port = settings.server.host, settings.server.port
    if run_file.exists():
        info = json.loads(run_file.read_text())
        host, port = info["host"], info["port"]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def cmd_send(args: argparse.Namespace) -> int:
    settings = _settings(args)
    write_key = args.write_key
    if not write_key:
        if not settings.sources:
            print("no source configured; run `headwater init`", file=sys.stderr)
            return 1
        write_key = settings.sources[0].write_key
    message: dict[str, Any] = {"type": args.type, "messageId": args.message_id or str(uuid.uuid4())}
    if args.user_id:
        message["userId"] = args.user_id
    if args.anonymous_id or not args.user_id:
        message["anonymousId"] = args.anonymous_id or f"cli-{uuid.uuid4()}"
    if args.event:
        message["event"] = args.event
    if args.name:
        message["name"] = args.name
    if args.properties:
        key = "traits" if args.type in ("identify", "group") else "properties"
        try:
            message[key] = json.loads(args.properties)
        except ValueError as exc:
            print(f"--properties: not JSON ({exc})", file=sys.stderr)
            return 2
        if not isinstance(message[key], dict):
            print("--properties: a JSON object is required", file=sys.stderr)
            return 2
    url = f"{_server_url(args, settings)}/v1/{args.type}"
    try:
        response = httpx.post(url, json=message, auth=(write_key, ""), timeout=10.0)
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{response.status_code} {response.text}")
    if response.status_code == 200:
        print(f"messageId {message['messageId']}")
    return 0 if response.status_code == 200 else 1


def _run_query(data_dir: Path, sql: str) -> QueryResult:
    from headwater import backends

    client = AdminClient.connect(data_dir)
    if client is not None:
        return client.query(sql)
    settings = config.load(data_dir)
    missing = backends.store_missing(settings, data_dir)
    if missing:
        raise RuntimeError(f"{missing}; start `headwater serve` first")
    store = backends.open_store(settings, data_dir, read_only=True)
    try:
        return store.query(sql, read_only=True)
    finally:
        store.close()


def cmd_query(args: argparse.Namespace) -> int:
    try:
        result = _run_query(_data_dir(args), args.sql)
    except Exception as exc:
        print(f"query failed: {exc}", file=sys.stderr)
        return 1
    rows = [tuple(to_jsonable(v) for v in row) for row in result.rows]
    if args.json:
        print(
            json.dumps(
                [dict(zip(result.columns, row, strict=True)) for row in rows],
                ensure_ascii=False,
                indent=2,
            )
        )
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows([_csv_cell(v) for v in row] for row in rows)
    else:
        print_table(result.columns, rows)
    return 0


def _csv_cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value


def cmd_status(args: argparse.Namespace) -> int:
    from headwater import backends

    data_dir = _data_dir(args)
    client = AdminClient.connect(data_dir)
    if client is not None:
        try:
            status = client.status()
        except RuntimeError as exc:
            print(f"status failed: {exc}", file=sys.stderr)
            return 1
        running = True
    else:
        settings = config.load(data_dir)
        if backends.store_missing(settings, data_dir):
            print("no events stored yet; start `headwater serve`", file=sys.stderr)
            return 1
        store = backends.open_store(settings, data_dir, read_only=True)
        try:
            status = status_of(store, None)
        finally:
            store.close()
        running = False
    if args.json:
        print(json.dumps({"running": running, **status}, indent=2))
        return 0
    print(f"server: {'running' if running else 'not running'}")
    print_table(
        ["source", "events", "last_received"],
        [(s["source"], s["events"], s["last_received"]) for s in status["sources"]],
    )
    counters = status["counters"]
    print(
        f"received {counters.get('received', 0)}, stored {counters.get('stored', 0)},"
        f" duplicates dropped {counters.get('duplicates', 0)}"
    )
    if status.get("log"):
        lag = status["log"]
        print(
            f"log: end offset {lag['log_end_offset']}, stored through {lag['store_offset']},"
            f" lag {lag['lag_records']} records / {lag['lag_events']} events"
        )
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    client = AdminClient.connect(data_dir)
    if client is None:
        print("headwater serve is not running for this data directory", file=sys.stderr)
        return 1
    after = 0
    if not args.all:
        # The tail API answers oldest first, a page at a time: page to the newest.
        while recent := client.tail(after):
            after = recent[-1]["seq"]
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while deadline is None or time.monotonic() < deadline:
            events = client.tail(after)
            for event in events:
                after = event["seq"]
                print(_tail_line(event, args.json), flush=True)
            if not events:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except httpx.HTTPError:
        print("headwater serve stopped", file=sys.stderr)
        return 1
    return 0


def _tail_line(item: dict[str, Any], as_json: bool) -> str:
    event = item["event"]
    if as_json:
        return json.dumps({k: v for k, v in item.items() if k != "seq"}, ensure_ascii=False)
    who = event.get("userId") or f"anon:{event.get('anonymousId')}"
    label = (event.get("event") if event["type"] == "track" else event.get("name")) or ""
    fields = event.get("properties") or event.get("traits")
    props = json.dumps(fields, ensure_ascii=False) if fields else ""
    flags = " [bot]" if item.get("bot") else ""
    if item.get("warnings"):
        flags += f" [{', '.join(item['warnings'])}]"
    return (
        f"{event['timestamp']}  {item['source']:<10} {event['type']:<8} {label:<24}"
        f" {who:<20} {props}{flags}"
    )


def _destination(settings: config.Settings, name: str, data_dir: Path) -> Destination:
    for destination_config in settings.destinations:
        if destination_config.name == name:
            return destinations.build(destination_config, data_dir)
    raise config.ConfigError(f"destinations: no destination named {name!r}")


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    end = "\n" if done >= total else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({percent}%)",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def cmd_destinations_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = [
        (d.name, d.kind, "yes" if d.enabled else "no", d.integration_name or "")
        for d in settings.destinations
    ]
    print_table(["name", "kind", "enabled", "integration_name"], rows)
    return 0


def cmd_destinations_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    failures = 0
    for destination_config in settings.destinations:
        if args.name and destination_config.name != args.name:
            continue
        try:
            destination = destinations.build(destination_config, _data_dir(args))
            try:
                destination.check()
            finally:
                destination.close()
            print(f"{destination_config.name}: ok")
        except Exception as exc:
            failures += 1
            print(f"{destination_config.name}: FAILED: {exc}")
    return 1 if failures else 0


def cmd_deadletters_list(args: argparse.Namespace) -> int:
    from headwater import backends

    state = backends.delivery_state(_settings(args), _data_dir(args))
    try:
        letters = state.dead_letters(args.destination, include_replayed=args.all, limit=args.limit)
    finally:
        state.close()
    rows = [
        (
            d.id,
            d.destination,
            d.message_id,
            d.reason,
            d.attempts,
            d.last_status,
            "yes" if d.replayed_ms else "no",
        )
        for d in letters
    ]
    print_table(
        ["id", "destination", "message_id", "reason", "attempts", "last_status", "replayed"], rows
    )
    return 0


def cmd_deadletters_show(args: argparse.Namespace) -> int:
    from headwater import backends

    state = backends.delivery_state(_settings(args), _data_dir(args))
    try:
        letters = state.dead_letters(include_replayed=True, ids=[args.id], limit=1)
    finally:
        state.close()
    if not letters:
        print(f"no dead letter {args.id}", file=sys.stderr)
        return 1
    letter = letters[0]
    print(
        json.dumps(
            {
                "id": letter.id,
                "destination": letter.destination,
                "message_id": letter.message_id,
                "reason": letter.reason,
                "attempts": letter.attempts,
                "last_status": letter.last_status,
                "last_response": letter.last_response,
                "first_attempt_at": format_ms(letter.first_attempt_ms),
                "dead_at": format_ms(letter.dead_ms),
                "replayed_at": format_ms(letter.replayed_ms) if letter.replayed_ms else None,
                "event": json.loads(letter.event),
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


def cmd_deadletters_replay(args: argparse.Namespace) -> int:
    from headwater import backends

    data_dir = _data_dir(args)
    settings = _settings(args)
    state = backends.delivery_state(settings, data_dir)
    try:
        letters = state.dead_letters(args.destination, ids=args.ids or None, limit=1_000_000)
        by_destination: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            by_destination.setdefault(letter.destination, []).append(letter)
        failed_total = 0
        for name, group in by_destination.items():
            destination = _destination(settings, name, data_dir)
            try:
                delivered, failed = replay_dead_letters(
                    state, destination, group, time.time_ns() // 1_000_000, _progress
                )
            finally:
                destination.close()
            failed_total += failed
            print(f"{name}: {delivered} delivered, {failed} still failing")
    finally:
        state.close()
    if not by_destination:
        print("no dead letters to replay")
    return 1 if failed_total else 0


def cmd_replay(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    settings = _settings(args)
    try:
        lower, upper = time_bounds(args.since, args.until)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    where = (
        f"received_at >= make_timestamptz({lower} * 1000)"
        f" AND received_at < make_timestamptz({upper} * 1000)"
    )
    total = int(_run_query(data_dir, f"SELECT count(*) FROM events WHERE {where}").rows[0][0])
    destination = _destination(settings, args.destination, data_dir)
    size = max(1, destination.config.batch.max_events)

    def batches() -> Iterator[list[dict[str, Any]]]:
        for start in range(0, total, 10_000):
            result = _run_query(
                data_dir,
                f"SELECT {STORE_COLUMNS} FROM events WHERE {where}"
                f" ORDER BY received_at, log_offset LIMIT 10000 OFFSET {start}",
            )
            rows = [
                event_from_row({c: to_jsonable(v) for c, v in zip(result.columns, r, strict=True)})
                for r in result.rows
            ]
            for i in range(0, len(rows), size):
                yield rows[i : i + size]

    try:
        delivered, failed = replay_events(destination, batches(), total, _progress)
    finally:
        destination.close()
    print(f"{args.destination}: {delivered} of {total} events replayed, {failed} failed")
    return 1 if failed else 0


def _local_report(data_dir: Path) -> dict[str, Any]:
    from headwater import backends
    from headwater.console.server import report_inputs
    from headwater.log.sqlite import SQLiteLogReader, log_path
    from headwater.metrics import report

    settings = config.load(data_dir)
    if backends.store_missing(settings, data_dir):
        raise RuntimeError("no event store yet; start `headwater serve` first")
    store = backends.open_store(settings, data_dir, read_only=True)
    reader = SQLiteLogReader(log_path(data_dir))
    try:
        lag = reader.pending_events(store.committed("store"))
        inputs = report_inputs(
            data_dir, settings, lambda sql, params: store.query(sql, params).rows, lag
        )
        return report.build(inputs, settings.report, time.time_ns() // 1_000_000)
    finally:
        reader.close()
        store.close()


def _format_value(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{100 * value:.2f} %"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,}"


def cmd_report(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    client = AdminClient.connect(data_dir)
    try:
        result = client.report() if client is not None else _local_report(data_dir)
    except RuntimeError as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    levels = [
        ("north_star", "North star"),
        ("core", "Core metrics"),
        ("indicator", "Supporting indicators"),
        ("risk", "Risk factors"),
    ]
    rows_by_level: dict[str, list[tuple[Any, ...]]] = {}
    for metric in result["metrics"]:
        unit = metric["unit"]
        trend = metric["trend"]
        trend_text = (
            "-" if trend is None else (("+" if trend >= 0 else "") + _format_value(trend, unit))
        )
        rows_by_level.setdefault(metric["level"], []).append(
            (
                metric["name"],
                metric["stakeholder"],
                _format_value(metric["value"], unit),
                _format_value(metric["target"], unit),
                metric["status"],
                trend_text,
            )
        )
    columns = ["metric", "for", "value", "target", "status", "trend"]
    title = f"Success metrics over the last {result['period_hours']} h"
    if args.markdown:
        print(f"# {title}\n")
        for level, heading in levels:
            print(f"## {heading}\n")
            print("| " + " | ".join(columns) + " |")
            print("|" + "---|" * len(columns))
            for row in rows_by_level.get(level, []):
                print("| " + " | ".join(str(v) for v in row) + " |")
            print()
        print("## Definitions\n")
        for metric in result["metrics"]:
            print(f"- **{metric['name']}**: {metric['definition']}")
        if result["anomalies"]:
            print("\n## Anomalies\n")
            for anomaly in result["anomalies"]:
                print(
                    f"- {anomaly['kind']} {anomaly['subject']}: {anomaly['direction']},"
                    f" {anomaly['last_hour']} in the last hour against"
                    f" {anomaly['hourly_mean']} per hour (z {anomaly['z']})"
                )
        return 0
    print(title)
    for level, heading in levels:
        print(f"\n{heading}")
        print_table(columns, rows_by_level.get(level, []))
    print(f"\nanomalies: {len(result['anomalies'])}")
    for anomaly in result["anomalies"]:
        print(
            f"  {anomaly['kind']} {anomaly['subject']}: {anomaly['direction']} (z {anomaly['z']})"
        )
    return 0


def print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    def cell(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, dict | list):
            return json.dumps(value, ensure_ascii=False)
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in text:
        for i, value in enumerate(row):
            widths[i] = min(max(widths[i], len(value)), 60)
    line = " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in text:
        print(
            " | ".join(
                (v if len(v) <= w else v[: w - 1] + "…").ljust(w)
                for v, w in zip(row, widths, strict=True)
            )
        )
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help=f"data directory (default: $HEADWATER_DATA_DIR or {config.DEFAULT_DATA_DIR})",
    )
    parser = argparse.ArgumentParser(
        prog="headwater", parents=[common], description="Self-hosted real-time event tracking."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="write a starter configuration")
    p.add_argument("--source", default="default", help="name of the first source")
    p.set_defaults(func=cmd_init)

    sources = sub.add_parser("sources", parents=[common], help="manage sources")
    ssub = sources.add_subparsers(dest="sources_command", required=True)
    p = ssub.add_parser("add", parents=[common], help="add a source")
    p.add_argument("name")
    p.add_argument("--write-key")
    p.set_defaults(func=cmd_sources_add)
    p = ssub.add_parser("list", parents=[common], help="list sources")
    p.set_defaults(func=cmd_sources_list)
    p = ssub.add_parser("rotate-key", parents=[common], help="give a source a new write key")
    p.add_argument("name")
    p.add_argument("--write-key")
    p.set_defaults(func=cmd_sources_rotate)

    p = sub.add_parser("serve", parents=[common], help="run the gateway and the pipeline")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("send", parents=[common], help="send one event to a running server")
    p.add_argument(
        "--type", default="track", choices=["identify", "track", "page", "screen", "group", "alias"]
    )
    p.add_argument("--event", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--user-id")
    p.add_argument("--anonymous-id")
    p.add_argument("--message-id")
    p.add_argument("--properties", help="JSON object (traits for identify and group)")
    p.add_argument("--write-key")
    p.add_argument("--url", help="server URL (default: the running server's)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("tail", parents=[common], help="print events as they are stored")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="start with the recent events")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("query", parents=[common], help="run SQL over the event store")
    p.add_argument("sql")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_query)

    dests = sub.add_parser("destinations", parents=[common], help="list and check destinations")
    dsub = dests.add_subparsers(dest="destinations_command", required=True)
    p = dsub.add_parser("list", parents=[common], help="list destinations")
    p.set_defaults(func=cmd_destinations_list)
    p = dsub.add_parser("check", parents=[common], help="validate settings, test connections")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_destinations_check)

    dead = sub.add_parser("deadletters", parents=[common], help="inspect and replay dead letters")
    dlsub = dead.add_subparsers(dest="deadletters_command", required=True)
    p = dlsub.add_parser("list", parents=[common], help="list dead letters")
    p.add_argument("--destination")
    p.add_argument("--all", action="store_true", help="include replayed ones")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_deadletters_list)
    p = dlsub.add_parser("show", parents=[common], help="show one dead letter")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_deadletters_show)
    p = dlsub.add_parser("replay", parents=[common], help="deliver dead letters again")
    p.add_argument("ids", type=int, nargs="*")
    p.add_argument("--destination")
    p.set_defaults(func=cmd_deadletters_replay)

    p = sub.add_parser(
        "replay",
        parents=[common],
        help="send stored events of a time range to one destination again",
    )
    p.add_argument("--destination", required=True)
    p.add_argument("--since", help="ISO-8601 time (received at or after)")
    p.add_argument("--until", help="ISO-8601 time (received before)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("report", parents=[common], help="the success-metrics report")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", parents=[common], help="counts per source and log lag")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (config.ConfigError, destinations.ConfigurationError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
