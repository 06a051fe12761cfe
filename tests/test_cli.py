"""The ``headwater`` command line, run as a user runs it: a subprocess per command."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import tomli_w

from conftest import RunningServer, free_port

MakeServer = Callable[..., RunningServer]


def clean_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    return {**environ, **extra}


def command(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "headwater.cli", "--data-dir", str(data_dir)]


def cli(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(data_dir), *args],
        capture_output=True,
        text=True,
        env=clean_env(**(env or {})),
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    return result.stdout


def printed_key(output: str) -> str:
    # "source 'web' write key: <key>" or "source 'web' new write key: <key>"
    return output.strip().splitlines()[-1].rsplit(": ", 1)[1]


def track(url: str, write_key: str, event: str = "Ping") -> int:
    body = {"userId": "u", "event": event}
    return httpx.post(f"{url}/v1/track", json=body, auth=(write_key, ""), timeout=10).status_code


def wait_status(url: str, write_key: str, status: int, timeout: float = 3.0) -> None:
    """Wait until a track call with this key is answered with ``status``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if track(url, write_key) == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"key still not answered {status} after {timeout} s")


def test_init_writes_one_source_with_a_write_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    out = ok(cli(data_dir, "init", "--source", "web"))
    settings = tomllib.loads((data_dir / "headwater.toml").read_text())
    [source] = settings["sources"]
    assert source["name"] == "web"
    assert len(source["write_key"]) >= 20
    assert printed_key(out) == source["write_key"]

    again = cli(data_dir, "init")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    [unchanged] = tomllib.loads((data_dir / "headwater.toml").read_text())["sources"]
    assert unchanged == source


def test_sources_add_list_and_rotate_key_reach_the_running_server(
    tmp_path: Path, make_server: MakeServer
) -> None:
    data_dir = tmp_path / "data"
    first_key = printed_key(ok(cli(data_dir, "init")))
    server = make_server(data_dir=data_dir)
    assert track(server.url, first_key) == 200

    mobile_key = printed_key(ok(cli(data_dir, "sources", "add", "mobile")))
    listing = ok(cli(data_dir, "sources", "list"))
    assert "default" in listing and "mobile" in listing and mobile_key in listing
    assert "(2 rows)" in listing
    wait_status(server.url, mobile_key, 200)

    new_key = printed_key(ok(cli(data_dir, "sources", "rotate-key", "default")))
    assert new_key != first_key
    # The gateway looks for a changed settings file every second.
    wait_status(server.url, first_key, 401, timeout=3.0)
    assert track(server.url, new_key) == 200
    assert track(server.url, mobile_key) == 200

    missing = cli(data_dir, "sources", "rotate-key", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr
    repeated = cli(data_dir, "sources", "add", "mobile")
    assert repeated.returncode == 2 and "sources[2].name" in repeated.stderr


def test_setting_errors_name_the_setting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ok(cli(data_dir, "init"))
    result = cli(data_dir, "serve", env={"HEADWATER_SERVER_PORT": "abc"})
    assert result.returncode == 2
    assert "HEADWATER_SERVER_PORT" in result.stderr and "'abc'" in result.stderr

    result = cli(data_dir, "serve", env={"HEADWATER_PIPELINE_BOT_DETECTION": "maybe"})
    assert result.returncode == 2 and "HEADWATER_PIPELINE_BOT_DETECTION" in result.stderr

    path = data_dir / "headwater.toml"
    original = tomllib.loads(path.read_text())
    cases = [
        ("server", "port", "eighty", "server.port"),
        ("server", "port", 70000, "server.port"),
        ("server", "workers", 0, "server.workers"),
        ("limits", "max_request_bytes", -1, "limits.max_request_bytes"),
        ("server", "trusted_proxies", ["not-a-net"], "server.trusted_proxies[0]"),
        ("server", "prot", 1, "prot"),
    ]
    for section, name, value, setting in cases:
        edited = {**original, section: {**original.get(section, {}), name: value}}
        path.write_text(tomli_w.dumps(edited))
        # serve refuses to start; the quicker commands read the same settings.
        result = cli(data_dir, *(["serve"] if name == "port" else ["sources", "list"]))
        assert result.returncode == 2, (name, result.stderr)
        assert setting in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
    path.write_text("[server\n")
    result = cli(data_dir, "sources", "list")
    assert result.returncode == 2 and "headwater.toml: not valid TOML" in result.stderr


def test_send_query_and_status_while_running_and_after_stop(
    tmp_path: Path, make_server: MakeServer
) -> None:
    data_dir = tmp_path / "data"
    ok(cli(data_dir, "init"))
    server = make_server(data_dir=data_dir)
    props = json.dumps({"plan": "pro", "seats": 3})
    sent = ok(
        cli(
            data_dir,
            "send",
            "--event",
            "Signed Up",
            "--user-id",
            "u1",
            "--message-id",
            "cli-1",
            "--properties",
            props,
        )
    )
    assert sent.startswith("200 ") and "messageId cli-1" in sent
    # A resend with the same messageId is acknowledged and stored once.
    ok(cli(data_dir, "send", "--event", "Signed Up", "--user-id", "u1", "--message-id", "cli-1"))
    ok(
        cli(
            data_dir,
            "send",
            "--type",
            "identify",
            "--user-id",
            "u2",
            "--properties",
            json.dumps({"email": "u2@example.com"}),
        )
    )
    server.settle()

    sql = "SELECT message_id, type, event, user_id, properties FROM events ORDER BY log_offset"
    for running in (True, False):
        table = ok(cli(data_dir, "query", sql)).splitlines()
        assert [c.strip() for c in table[0].split("|")] == [
            "message_id",
            "type",
            "event",
            "user_id",
            "properties",
        ]
        assert "Signed Up" in table[2] and "cli-1" in table[2]
        assert table[-1] == "(2 rows)"

        rows = json.loads(ok(cli(data_dir, "query", sql, "--json")))
        assert rows[0] == {
            "message_id": "cli-1",
            "type": "track",
            "event": "Signed Up",
            "user_id": "u1",
            "properties": '{"plan":"pro","seats":3}',
        }
        assert rows[1]["type"] == "identify" and rows[1]["user_id"] == "u2"

        parsed = list(csv.reader(io.StringIO(ok(cli(data_dir, "query", sql, "--csv")))))
        assert parsed[0] == ["message_id", "type", "event", "user_id", "properties"]
        assert parsed[1] == ["cli-1", "track", "Signed Up", "u1", '{"plan":"pro","seats":3}']
        assert len(parsed) == 3

        failed = cli(data_dir, "query", "SELECT no_such_column FROM events")
        assert failed.returncode == 1 and "no_such_column" in failed.stderr

        status = json.loads(ok(cli(data_dir, "status", "--json")))
        assert status["running"] is running
        assert [(s["source"], s["events"]) for s in status["sources"]] == [("default", 2)]
        assert status["counters"]["duplicates"] == 1
        text = ok(cli(data_dir, "status"))
        assert f"server: {'running' if running else 'not running'}" in text
        assert "default" in text
        if running:
            assert status["log"]["lag_records"] == 0
            assert status["log"]["log_end_offset"] == 3
            assert "lag 0 records / 0 events" in text
        else:
            assert status["log"] is None
        if running:
            tail = subprocess.Popen(
                [*command(data_dir), "tail", "--seconds", "20"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=clean_env(),
            )
            time.sleep(0.5)
            server.stop()
            try:
                _, err = tail.communicate(timeout=10)
            finally:
                if tail.poll() is None:
                    tail.kill()
                    tail.wait()
            assert tail.returncode == 1 and "Traceback" not in err, err
            assert "stopped" in err, err

    lists = ok(cli(data_dir, "query", "SELECT ['a', 'b'] AS tags, {'k': 1} AS obj", "--csv"))
    assert list(csv.reader(io.StringIO(lists)))[1] == ['["a", "b"]', '{"k": 1}']
    not_running = cli(data_dir, "tail", "--seconds", "1")
    assert not_running.returncode == 1 and "not running" in not_running.stderr
    # A port nothing listens on: the machine may run other servers on the default one.
    closed = {"HEADWATER_SERVER_PORT": str(free_port())}
    unreachable = cli(data_dir, "send", "--event", "Lost", env=closed)
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "cannot reach" in unreachable.stderr, unreachable.stderr


def test_tail_prints_events_sent_while_it_runs(tmp_path: Path, make_server: MakeServer) -> None:
    data_dir = tmp_path / "data"
    ok(cli(data_dir, "init"))
    key = tomllib.loads((data_dir / "headwater.toml").read_text())["sources"][0]["write_key"]
    server = make_server(data_dir=data_dir)
    # More recent events than one page of the tail API: none of them may be shown.
    for page in range(4):
        old = [
            {"type": "track", "event": "Old", "userId": "u", "messageId": f"old-{page}-{i}"}
            for i in range(200)
        ]
        response = httpx.post(f"{server.url}/v1/batch", json={"batch": old}, auth=(key, ""))
        assert response.status_code == 200
        server.settle()

    tail = subprocess.Popen(
        [*command(data_dir), "tail", "--seconds", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        time.sleep(0.6)
        for n in range(6):
            event = f"Live {n}"
            assert track(server.url, key, event) == 200
            time.sleep(0.3)
        out, err = tail.communicate(timeout=15)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert lines, f"tail printed nothing: {err}"
    assert "Live 5" in out
    assert all("Live" in line and "default" in line for line in lines), lines[:5]
