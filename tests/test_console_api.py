"""The console's admin API, the success-metrics report and Prometheus metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer
from headwater.console.metrics import METRIC_NAMES
from headwater.destinations.base import BatchSettings, DestinationConfig
from receiver import Receiver

BOT_UA = "Mozilla/5.0 (compatible; AhrefsSiteAudit/6.1; +http://ahrefs.com/robot/)"


class Console:
    def __init__(self, server: RunningServer) -> None:
        info = json.loads((server.data_dir / "run" / "admin.json").read_text())
        self.url = f"http://127.0.0.1:{info['port']}"
        self.token = info["token"]
        self.client = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.token}"}
        )

    def get(self, path: str, **params: Any) -> Any:
        response = self.client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def hook() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def running(make_server: Callable[..., RunningServer], hook: Receiver) -> RunningServer:
    destination = DestinationConfig(
        name="hook",
        kind="webhook",
        batch=BatchSettings(max_age_ms=20),
        settings={"url": hook.url, "allow_networks": ["127.0.0.0/8"]},
    )
    server = make_server(destinations=[destination])
    batch = [
        {
            "type": "identify",
            "userId": "u-1",
            "messageId": "c-1",
            "traits": {"plan": "pro"},
            "context": {"library": {"name": "analytics-python", "version": "2.3.4"}},
        },
        {"type": "track", "userId": "u-1", "event": "Viewed", "messageId": "c-2"},
        {"type": "track", "userId": "u-1", "event": "Paid", "messageId": "c-3"},
        {"type": "track", "anonymousId": "a-2", "event": "Viewed", "messageId": "c-4"},
        {
            "type": "page",
            "anonymousId": "bot-1",
            "name": "Home",
            "messageId": "c-5",
            "context": {"userAgent": BOT_UA},
        },
        {"type": "track", "userId": "u-1", "event": "Viewed", "messageId": "c-2"},
    ]
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    assert hook.wait_for(5, timeout=10)
    server.settle()
    return server


def test_api_needs_the_token(running: RunningServer) -> None:
    console = Console(running)
    assert httpx.get(f"{console.url}/api/status").status_code == 401
    wrong = httpx.get(f"{console.url}/api/status", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    login = httpx.post(f"{console.url}/api/login", json={"token": console.token})
    assert login.status_code == 200
    cookies = {"headwater_session": login.cookies["headwater_session"]}
    assert httpx.get(f"{console.url}/api/status", cookies=cookies).status_code == 200


def test_report_reflects_the_events(running: RunningServer) -> None:
    console = Console(running)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = console.get("/api/status")
        if (
            status["destinations"]["hook"].get("pending") == 0
            and status["destinations"]["hook"]["counters"].get("delivered") == 5
        ):
            break
        time.sleep(0.05)
    report = console.get("/api/report")
    metrics = {m["id"]: m for m in report["metrics"]}
    assert {m["level"] for m in report["metrics"]} == {"north_star", "core", "indicator", "risk"}
    assert metrics["volume"]["value"] == 5
    assert metrics["tracked_users"]["value"] == 3
    assert metrics["landed_gap"]["value"] == 0 and metrics["landed_gap"]["status"] == "ok"
    assert metrics["bot_share"]["value"] == pytest.approx(1 / 5)
    assert metrics["duplicate_rate"]["value"] == pytest.approx(1 / 6)
    assert metrics["delivery_success"]["value"] == 1.0
    assert metrics["north_star"]["value"] == 1.0
    assert metrics["freshness_p95"]["value"] is not None
    assert metrics["freshness_p95"]["value"] < 1.0
    libraries = metrics["sdk_versions"]["details"]["libraries"]
    assert {"name": "analytics-python", "version": "2.3.4", "events": 1} in libraries
    for metric in report["metrics"]:
        assert metric["definition"] and metric["status"] in (
            "ok",
            "warn",
            "fail",
            "info",
            "no data",
        )


def test_report_cli_formats(running: RunningServer) -> None:
    def cli(*args: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "headwater.cli",
                "--data-dir",
                str(running.data_dir),
                "report",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert json.loads(cli("--json"))["metrics"]
    markdown = cli("--markdown")
    assert "## North star" in markdown and "| Volume |" in markdown
    assert "Risk factors" in cli()


def test_prometheus_metrics(running: RunningServer) -> None:
    console = Console(running)
    response = console.client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    exported = {name.removesuffix("_total") for name in METRIC_NAMES}
    assert set(families) <= exported, set(families) - exported
    stored = families["headwater_events_stored"].samples[0].value
    assert stored == 5
    delivered = [
        s
        for s in families["headwater_destination_events"].samples
        if s.labels == {"destination": "hook", "outcome": "delivered"}
    ]
    assert delivered and delivered[0].value == 5


def test_live_stream_shows_new_events(running: RunningServer) -> None:
    console = Console(running)
    received: list[dict[str, Any]] = []

    def listen() -> None:
        with console.client.stream(
            "GET", "/api/live", params={"event": "Live One", "backlog": "0"}
        ) as stream:
            kind = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "event":
                    received.append(json.loads(line[6:]))
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(0.5)
    sent = time.monotonic()
    body = {"userId": "u-9", "event": "Live One", "messageId": "live-1", "properties": {"x": 1}}
    assert running.post("/v1/track", body).status_code == 200
    thread.join(5)
    assert received, "no live event arrived"
    assert time.monotonic() - sent < 1.5
    item = received[0]
    assert item["event"]["messageId"] == "live-1" and item["event"]["properties"] == {"x": 1}
    assert "enrichment" in item


def test_sources_created_and_rotated_from_the_console(running: RunningServer) -> None:
    console = Console(running)
    created = console.client.post("/api/sources", json={"name": "web"}).json()
    key = created["write_key"]

    def accepted(write_key: str) -> bool:
        response = httpx.post(
            f"{running.url}/v1/track",
            auth=(write_key, ""),
            timeout=10,
            json={"userId": "u", "event": "E"},
        )
        return response.status_code == 200

    deadline = time.monotonic() + 5
    while not accepted(key) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert accepted(key)
    snippets = console.get("/api/sources/web/snippets")["snippets"]
    assert key in snippets["segment-analytics-python"] and running.url in snippets["curl"]
    rotated = console.client.post("/api/sources/web/rotate").json()["write_key"]
    deadline = time.monotonic() + 5
    while accepted(key) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not accepted(key) and accepted(rotated)


def test_insights_over_http(running: RunningServer) -> None:
    console = Console(running)
    funnel = console.get("/api/insights/funnel", steps="Viewed,Paid")
    assert [s["people"] for s in funnel["steps"]] == [2, 1]
    users = console.get("/api/insights/users")
    assert users["total"] == 2  # the bot is not a user
    bad = console.client.get("/api/insights/counts", params={"bucket": "year"})
    assert bad.status_code == 400 and "bucket" in bad.json()["error"]


def test_refused_requests_are_counted_and_shown(running: RunningServer) -> None:
    console = Console(running)
    bad = running.post("/v1/track", {"event": "No One", "messageId": "r-1"})
    assert bad.status_code == 400
    invalid = running.post("/v1/batch", content=b'{"batch": [NaN]}')
    assert invalid.status_code == 400
    deadline = time.monotonic() + 5
    rejected: dict[str, int] = {}
    while time.monotonic() < deadline:
        rejected = console.get("/api/destinations")["source"]["rejected_at_ingest"]
        if sum(rejected.values()) >= 2:
            break
        time.sleep(0.1)
    assert rejected == {"missing_identity": 1, "invalid_json": 1}
    samples = console.get("/api/destinations")["source"]["rejected_samples"]
    assert '"r-1"' in samples["missing_identity"][0]["body"]
    assert samples["missing_identity"][0]["field"] == "userId"
    metrics = {m["id"]: m for m in console.get("/api/report")["metrics"]}
    assert metrics["rejection_rate"]["details"]["by_reason"] == rejected
    assert metrics["rejection_rate"]["value"] == pytest.approx(2 / (2 + 6))

    lines: list[str] = []
    with console.client.stream("GET", "/api/live", params={"backlog": "5"}) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if line.startswith("event: rejection") or len(lines) > 200:
                break
    assert "event: rejection" in lines
