"""The files destination: partitioned Parquet and JSON Lines archives."""

from __future__ import annotations

import errno
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pytest

from conftest import RunningServer, reconciled, settle_deliveries
from headwater.destinations import build
from headwater.destinations.base import (
    BatchSettings,
    ConfigurationError,
    DestinationConfig,
    RetrySettings,
)
from headwater.destinations.files import Files, partition_date, partition_name
from headwater.destinations.state import DeliveryState

BIG = 123456789012345678901234567890


def files(name: str, path: Path, fmt: str, **overrides: Any) -> DestinationConfig:
    settings = {"path": str(path), "format": fmt, **overrides.pop("settings", {})}
    return DestinationConfig(
        name=name,
        kind="files",
        settings=settings,
        batch=overrides.pop("batch", BatchSettings(max_events=50, max_age_ms=50)),
        retry=overrides.pop("retry", RetrySettings(base_ms=50, max_backoff_ms=200)),
        **overrides,
    )


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_no_temporary(root: Path) -> None:
    leftovers = [p for p in all_files(root) if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []


def read_jsonl(root: Path) -> dict[str, tuple[Path, dict[str, Any], bytes]]:
    found: dict[str, tuple[Path, dict[str, Any], bytes]] = {}
    for path in all_files(root):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for line in data.splitlines():
            event = json.loads(line)
            assert event["messageId"] not in found, "duplicate event"
            found[event["messageId"]] = (path.parent, event, line)
    return found


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The event a Parquet row holds: columns, JSON columns parsed, extra merged."""
    event: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or key == "extra":
            continue
        if key in ("properties", "traits", "context", "integrations"):
            event[key] = json.loads(value)
        elif hasattr(value, "isoformat"):
            event[key] = value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
        else:
            event[key] = value
    event.update(json.loads(row["extra"]) if row["extra"] else {})
    return event


def sample_batch() -> list[dict[str, Any]]:
    return [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u-1",
            "messageId": "m-order",
            "timestamp": "2024-03-01T01:30:00.250+02:00",
            "properties": {
                "big": BIG,
                "negative": -(2**63) - 1,
                "price": 19.99,
                "name": "Zoë 😀 注文",
                "nested": {"list": [1, "two", None, True]},
                "": "empty key",
            },
            "context": {"locale": "de-DE", "library": {"name": "test", "version": "1"}},
            "integrations": {"All": False, "Files": True},
            "channel": "server",
        },
        {
            "type": "track",
            "event": "Café ☕ Ordered",
            "anonymousId": "anon-1",
            "messageId": "m-cafe",
            "properties": {"size": "grande"},
        },
        {
            "type": "identify",
            "userId": "u-1",
            "messageId": "m-identify",
            "traits": {"email": "zoë@example.com", "visits": BIG},
        },
        {
            "type": "page",
            "userId": "u-1",
            "name": "Home",
            "category": "Docs",
            "messageId": "m-page",
            "properties": {"path": "/"},
        },
        {"type": "group", "userId": "u-1", "groupId": "g-1", "messageId": "m-group"},
        {"type": "alias", "userId": "u-2", "previousId": "u-1", "messageId": "m-alias"},
    ]


def test_server_archives_events_in_both_formats(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    parquet_root = tmp_path / "parquet"
    jsonl_root = tmp_path / "jsonl"
    server = make_server(
        destinations=[
            files("parquet", parquet_root, "parquet"),
            files("jsonl", jsonl_root, "jsonl", settings={"compression": "gzip"}),
        ]
    )
    batch = sample_batch()
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    destinations = settle_deliveries(server)
    for name in ("parquet", "jsonl"):
        counters = destinations[name]["counters"]
        assert counters["delivered"] == len(batch), counters
        assert reconciled(counters) == 0

    lines = read_jsonl(jsonl_root)
    assert set(lines) == {e["messageId"] for e in batch}
    today = partition_date(lines["m-cafe"][1])
    expected_dirs = {
        "m-order": ("2024-02-29", "order_completed"),
        "m-cafe": (today, "café_ordered"),
        "m-identify": (today, "identify"),
        "m-page": (today, "page"),
        "m-group": (today, "group"),
        "m-alias": (today, "alias"),
    }
    for message_id, (date, event) in expected_dirs.items():
        directory = lines[message_id][0]
        assert directory == jsonl_root / f"date={date}" / f"event={event}"
        assert today == lines[message_id][1]["receivedAt"][:10]

    # Every field as sent, plus what the server stamps; big integers and text exact.
    for sent in batch:
        _, event, _ = lines[sent["messageId"]]
        for key, value in sent.items():
            if key == "timestamp":
                assert event[key] == "2024-02-29T23:30:00.250Z"
            elif key == "integrations":
                assert event[key] == value
            elif key != "context":
                assert event[key] == value, key
        assert event["receivedAt"].endswith("Z")
    order_line = lines["m-order"][2]
    assert str(BIG).encode() in order_line and "Zoë 😀 注文".encode() in order_line
    assert lines["m-order"][1]["context"]["locale"] == "de-DE"
    assert lines["m-order"][1]["properties"]["negative"] == -(2**63) - 1

    # Parquet holds the same events, field for field, in the same partitions.
    parquet_files = all_files(parquet_root)
    assert len(parquet_files) == len(expected_dirs)
    for path in parquet_files:
        assert path.name.startswith("part-") and path.suffix == ".parquet"
        relative = path.parent.relative_to(parquet_root)
        assert relative in {lines[m][0].relative_to(jsonl_root) for m in lines}
    rows = ds.dataset(parquet_root, format="parquet").to_table().to_pylist()
    assert len(rows) == len(batch)
    for row in rows:
        assert from_row(row) == lines[row["messageId"]][1]
    con = duckdb.connect()
    glob = str(parquet_root / "**" / "*.parquet")
    big, name, event = con.execute(
        "SELECT properties->>'$.big', properties->>'$.name', event"
        " FROM read_parquet(?, hive_partitioning = false) WHERE messageId = 'm-order'",
        [glob],
    ).fetchone() or (None, None, None)
    assert (big, name, event) == (str(BIG), "Zoë 😀 注文", "Order Completed")
    [(day,)] = con.execute(
        "SELECT DISTINCT CAST(timestamp AT TIME ZONE 'UTC' AS DATE)::VARCHAR"
        " FROM read_parquet(?, hive_partitioning = false) WHERE messageId = 'm-order'",
        [glob],
    ).fetchall()
    assert day == "2024-02-29"
    con.close()

    assert_no_temporary(parquet_root)
    assert_no_temporary(jsonl_root)
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_redelivered_batch_replaces_its_file(tmp_path: Path, fmt: str) -> None:
    destination = build(files("archive", tmp_path / "archive", fmt))
    assert isinstance(destination, Files)
    batch = sample_batch()
    for index, event in enumerate(batch):
        event.setdefault("timestamp", "2024-05-01T12:00:00.000Z")
        event["receivedAt"] = "2024-05-01T12:00:01.000Z"
        event["properties"] = {**event.get("properties", {}), "i": index}
    assert destination.deliver(batch).kind == "delivered"
    first = {p: p.read_bytes() for p in all_files(destination.root)}
    assert destination.deliver(batch).kind == "delivered"
    assert {p: p.read_bytes() for p in all_files(destination.root)} == first

    # A different batch in the same partition is a new file, not an overwrite.
    other = [{**batch[1], "messageId": "m-cafe-2"}]
    assert destination.deliver(other).kind == "delivered"
    assert len(all_files(destination.root)) == len(first) + 1
    if fmt == "jsonl":
        assert len(read_jsonl(destination.root)) == len(batch) + 1
    else:
        rows = ds.dataset(destination.root, format="parquet").to_table().to_pylist()
        assert sorted(r["messageId"] for r in rows) == sorted(
            [e["messageId"] for e in batch] + ["m-cafe-2"]
        )
    assert_no_temporary(destination.root)
    destination.close()


def test_temporary_files_of_a_crashed_writer_are_swept(tmp_path: Path) -> None:
    destination = build(files("archive", tmp_path, "jsonl"))
    event = {
        "type": "track",
        "event": "Tick",
        "userId": "u",
        "messageId": "m-1",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "receivedAt": "2024-05-01T12:00:00.000Z",
    }
    directory = tmp_path / "date=2024-05-01" / "event=tick"
    directory.mkdir(parents=True)
    stale = directory / f".part-abc.jsonl.{os.getpid() + 1}.7.tmp"
    stale.write_bytes(b'{"half')
    assert destination.deliver([event]).kind == "delivered"
    assert_no_temporary(tmp_path)
    assert len(all_files(tmp_path)) == 1


@pytest.mark.parametrize(
    ("call", "code"),
    [("write", errno.ENOSPC), ("fsync", errno.EIO), ("mkdir", errno.EACCES)],
)
def test_file_system_errors_are_retryable_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    destination = build(files("archive", tmp_path / "archive", "parquet"))
    batch = sample_batch()

    def fail(*args: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fail)
    outcome = destination.deliver(batch)
    assert outcome.kind == "retryable"
    assert os.strerror(code) in outcome.message
    monkeypatch.undo()
    assert all_files(tmp_path) == []
    assert destination.deliver(batch).kind == "delivered"
    assert len(all_files(tmp_path)) == 6
    assert_no_temporary(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_retryable(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        outcome = build(files("archive", tmp_path / "archive", "jsonl")).deliver(sample_batch())
    finally:
        tmp_path.chmod(0o700)
    assert outcome.kind == "retryable" and "Permission denied" in outcome.message


def test_unwritable_path_retries_then_dead_letters(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # A regular file where a directory should be: unwritable even for root.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    retry = RetrySettings(max_attempts=3, base_ms=50, max_backoff_ms=100)
    server = make_server(destinations=[files("archive", blocker / "archive", "jsonl", retry=retry)])
    batch = sample_batch()[:2]
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    counters = settle_deliveries(server)["archive"]["counters"]
    assert counters["failed"] == 3 and counters["retried"] == 2
    assert counters["dead_lettered"] == 2 and reconciled(counters) == 0
    state = DeliveryState(server.data_dir)
    letters = state.dead_letters("archive")
    state.close()
    assert sorted(d.message_id for d in letters) == ["m-cafe", "m-order"]
    assert all("NotADirectoryError" in d.last_response for d in letters)
    assert server.proc is not None and server.proc.poll() is None
    assert server.admin.status()["destinations"]["archive"]["pending"] == 0


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"path": "relative/dir"}, "settings.path"),
        ({"path": "/archive", "format": "csv"}, "settings.format"),
        ({"path": "/archive", "format": "jsonl", "compression": "zstd"}, "settings.compression"),
        ({"path": "/archive", "colour": "blue"}, "settings"),
    ],
)
def test_invalid_settings_name_the_setting(settings: dict[str, Any], setting: str) -> None:
    config = DestinationConfig(name="archive", kind="files", settings=settings)
    with pytest.raises(ConfigurationError, match=f"destinations.archive.{setting}"):
        build(config)


def test_relative_path_resolves_against_a_given_data_dir(tmp_path: Path) -> None:
    config = DestinationConfig(name="archive", kind="files", settings={"path": "archive"})
    assert Files(config, data_dir=tmp_path).root == tmp_path / "archive"


@pytest.mark.parametrize(
    ("event", "name"),
    [
        ({"type": "track", "event": "Order Completed"}, "order_completed"),
        ({"type": "track", "event": "  Signed-Up!! v2 "}, "signed_up_v2"),
        ({"type": "track", "event": "../../etc/passwd"}, "etc_passwd"),
        ({"type": "track", "event": "a=b%2F"}, "a_b_2f"),
        ({"type": "track", "event": "\uff21\uff22\uff23 注文"}, "abc_注文"),
        ({"type": "identify", "event": "ignored"}, "identify"),
        ({"type": "page", "name": "Home"}, "page"),
    ],
)
def test_partition_names(event: dict[str, Any], name: str) -> None:
    assert partition_name(event) == name


def test_unnameable_and_long_event_names_stay_distinct() -> None:
    empty = partition_name({"type": "track", "event": "!!!"})
    other = partition_name({"type": "track", "event": "???"})
    assert empty.startswith("event_") and empty != other
    long_a = partition_name({"type": "track", "event": "x" * 300 + "a"})
    long_b = partition_name({"type": "track", "event": "x" * 300 + "b"})
    assert long_a != long_b and len(long_a.encode()) <= 100
