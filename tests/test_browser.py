"""The console and the browser SDKs in a real headless Chromium.

Node scripts in ``tests/browser`` drive Chromium through playwright-core (the
system Chromium, no browser download). Each script prints one JSON line with
what it saw; the assertions are here. Chromium may reach loopback only (other
host names do not resolve) and every request for another host is reported, so
an SDK that reaches for a CDN fails the test. Screenshots and each script's
JSON go to ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RunningServer
from headwater import config
from headwater.destinations.base import BatchSettings, DestinationConfig, RetrySettings
from receiver import Received, Receiver, Responder

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("HEADWATER_CHROMIUM", "/usr/bin/chromium")
PACKAGES = json.loads((BROWSER_DIR / "package.json").read_text())["dependencies"]

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def node() -> str:
    # Outside CI a missing tool skips these tests; in CI it fails them.
    missing = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        missing("the browser tests need `node` and `npm` on PATH")
    if not Path(CHROMIUM).exists():
        missing(f"the browser tests need Chromium at {CHROMIUM} (scripts/test installs it)")
    assert node_bin is not None and npm_bin is not None
    installed = all(
        (BROWSER_DIR / "node_modules" / name / "package.json").exists() for name in PACKAGES
    )
    if not installed:
        result = subprocess.run(
            [npm_bin, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=BROWSER_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"npm ci failed in {BROWSER_DIR}:\n{result.stderr}"
    return node_bin


def drive(node_bin: str, script: str, *args: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """Run one driver script; return the JSON it printed (kept as ``name``.json)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}-failure.png").unlink(missing_ok=True)
    result = subprocess.run(
        [node_bin, str(BROWSER_DIR / script), *args],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{script} printed no result (exit {result.returncode}):\n{result.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    assert result.returncode == 0 and "error" not in report, (
        f"{script} failed: {report.get('error')}\nbrowser console: {report.get('console')}\n"
        f"stderr: {result.stderr[-3000:]}"
    )
    return report


def console_of(server: RunningServer) -> tuple[str, str]:
    admin = json.loads((server.data_dir / "run" / "admin.json").read_text())
    return f"http://127.0.0.1:{admin['port']}", str(admin["token"])


def rows_until(
    server: RunningServer, sql: str, ready: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Query through the admin API until ``ready`` holds (bounded: 10 s)."""
    base, token = console_of(server)
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = httpx.post(
            f"{base}/api/query",
            content=sql.encode(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        data = response.json()
        rows = [dict(zip(data["columns"], row, strict=True)) for row in data["rows"]]
        if ready(rows):
            return rows
        time.sleep(0.1)
    return rows


def test_console_in_chromium(node: str, make_server: Callable[..., RunningServer]) -> None:
    """Sign in, create a source, watch events live, run a funnel, read the report,
    see delivery per destination and replay a dead letter, all through the page."""
    # One event per webhook request, so exactly the marked event is refused.
    hook = Receiver(refuse_first("Reject Me"))
    destination = DestinationConfig(
        name="hook",
        kind="webhook",
        settings={"url": hook.url, "allow_networks": ["127.0.0.0/8"]},
        batch=BatchSettings(max_events=1, max_age_ms=20),
        retry=RetrySettings(base_ms=100, max_backoff_ms=1000),
    )
    server = make_server(destinations=[destination])
    base, token = console_of(server)
    try:
        report = drive(
            node,
            "console.mjs",
            "--console",
            base,
            "--token",
            token,
            "--tracking",
            server.url,
            "--artifacts",
            str(ARTIFACTS),
            "--destination",
            "hook",
            name="console",
        )
        replayed = [e["event"] for e in hook.events() if e.get("event") == "Reject Me"]
    finally:
        hook.close()
    assert report["blocked"] == [], "the console page reached beyond loopback"
    assert report["wrongTokenMessage"] == "That is not the admin token."
    # The source exists with the key the page showed, and its snippets carry the key.
    names = {s.name: s.write_key for s in _sources(server)}
    assert names[report["source"]["name"]] == report["source"]["writeKey"]
    assert report["source"]["curlSnippetHasKey"]
    assert names["default"] == report["rotatedKey"] != server.write_key
    copied = report["copiedSnippet"]
    assert copied.startswith('import { AnalyticsBrowser } from "@segment/analytics-next";')
    assert report["source"]["writeKey"] in copied and server.url in copied
    assert {"analytics-next (npm)", "@rudderstack/analytics-js", "curl"} <= set(
        report["snippetNames"]
    )
    # The event showed up in the live debugger within a second of its 200.
    assert report["liveLatencyMs"] < 1000, report["liveLatencyMs"]
    payload = report["livePayload"]
    assert payload["source"] == report["source"]["name"]
    assert payload["event"]["userId"] == "live-user-1"
    assert payload["event"]["properties"] == {"plan": "pro", "seats": 3}
    assert payload["enrichment"]["campaign"]["source"] == "news"
    assert report["refusedStatus"] == 400
    assert "refused 400" in report["refusedText"]
    assert "userId or anonymousId is required" in report["refusedText"]
    assert '"plan": "pro"' in report["refusedDetail"]
    assert report["pausedHeldBack"]
    # Funnel: 3 signed up, 2 started checkout, 1 completed.
    funnel = report["funnelText"]
    assert "3 people" in funnel
    assert "2 · 66.7% of start" in funnel
    assert "1 · 33.3% of start · 50.0% of previous" in funnel
    assert report["uniqueUsers"] != "0"
    assert any("Signed Up" in row for row in report["volumesSeries"])
    # The success-metrics hierarchy rendered with every level.
    assert report["report"]["levels"] == ["north_star", "core", "indicator", "risk"]
    assert {"north_star", "volume", "freshness_p95", "dead_letters"} <= set(
        report["report"]["metrics"]
    )
    assert "Anomalies" in report["report"]["anomalies"]
    assert " ok" in report["report"]["summary"]
    # Delivery: the webhook's counters, and the refused payload as a discard sample.
    row = dict(zip(report["deliveryHeaders"], report["deliveryRow"], strict=True))
    assert row["Destination"] == "hook" and row["Kind"] == "webhook"
    assert row["Dead-lettered"] == "1" and row["Pending"] == "0"
    assert int(row["Delivered"]) >= 8
    assert "Reject Me" in report["deliveryText"]
    # The dead letter, expanded, then replayed from the page and delivered.
    assert "Reject Me" in report["deadLettersText"]
    assert report["replayMessage"] == "Replayed: 1 delivered, 0 failed again."
    assert "No dead letters." in report["deadLettersAfter"]
    assert replayed == ["Reject Me"]
    # A filter shows only matching events (refused requests match no event filter).
    assert report["filtered"] == ["event:While Paused"]
    # 600 more events: the page keeps the newest 500.
    assert report["liveEntriesAfterFlood"] == 500
    assert report["liveCountShown"] == "500"
    assert report["statusAfterSignOut"] == 401
    for path in report["screenshots"]:
        assert Path(path).stat().st_size > 5000, path


def refuse_first(marker: str) -> Responder:
    """Answer 422 to the first request that carries ``marker``, 200 to everything else."""
    refused: list[bool] = []

    def respond(request: Received) -> tuple[int, dict[str, str], bytes]:
        if marker.encode() in request.body and not refused:
            refused.append(True)
            return 422, {}, b'{"error": "rejected by the test"}'
        return 200, {}, b"{}"

    return respond


def _sources(server: RunningServer) -> list[Any]:
    return list(config.load(server.data_dir, environ={}).sources)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def sdk_rows(
    node_bin: str, server: RunningServer, sdk: str, user: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = uuid.uuid4().hex[:8]
    report = drive(
        node_bin,
        "sdk.mjs",
        "--sdk",
        sdk,
        "--tracking",
        server.url,
        "--write-key",
        server.write_key,
        "--run",
        run,
        "--artifacts",
        str(ARTIFACTS),
        name=f"sdk-{sdk}",
    )
    assert report["blocked"] == [], f"{sdk} reached beyond loopback: {report['blocked']}"
    rows = rows_until(
        server,
        "SELECT type, event, name, user_id, anonymous_id, message_id, properties, traits,"
        f" context FROM events WHERE user_id = '{user}-{run}' ORDER BY timestamp",
        lambda found: len(found) >= 3,
    )
    assert len(rows) == 3, (rows, report)
    for row in rows:
        for key in ("properties", "traits", "context"):
            row[key] = _json(row[key])
    report["run"] = run
    return report, rows


def test_analytics_next_in_chromium(node: str, make_server: Callable[..., RunningServer]) -> None:
    """@segment/analytics-next from npm: settings from headwater, events to headwater."""
    server = make_server()
    version = PACKAGES["@segment/analytics-next"]
    report, rows = sdk_rows(node, server, "segment", "ajs-user")
    run, page_url = report["run"], report["pageUrl"]
    assert report["loaded"]["version"] == version
    assert report["requests"] == [
        f"GET /v1/projects/{server.write_key}/settings",
        "POST /v1/i",
        "POST /v1/t",
        "POST /v1/p",
    ]
    assert set(report["statuses"]) == {200}
    by_type = {row["type"]: row for row in rows}
    assert set(by_type) == {"identify", "track", "page"}
    anonymous = {row["anonymous_id"] for row in rows}
    assert len(anonymous) == 1 and anonymous != {None}
    for row in rows:
        assert row["user_id"] == f"ajs-user-{run}"
        assert row["message_id"].startswith("ajs-next-")
        assert row["context"]["library"] == {
            "name": "analytics.js",
            "version": f"npm:next-{version}",
        }
        assert row["context"]["page"]["url"] == page_url
        assert row["context"]["page"]["search"] == f"?run={run}"
    assert by_type["identify"]["traits"] == {"email": "ann@example.com", "plan": "pro", "seats": 3}
    assert by_type["track"]["event"] == f"Order Completed {run}"
    assert by_type["track"]["properties"] == {
        "orderId": "o-1",
        "revenue": 42.5,
        "items": [{"sku": "s-1", "qty": 2}],
    }
    page = by_type["page"]
    assert page["name"] == f"Install {run}"
    assert page["properties"]["category"] == "Docs"
    assert page["properties"]["section"] == "install"
    assert page["properties"]["url"] == page_url


def test_rudderstack_js_in_chromium(node: str, make_server: Callable[..., RunningServer]) -> None:
    """@rudderstack/analytics-js v3, bundled build: source config and events from headwater.

    The package's default build fetches its plugins (XhrQueue among them, which
    sends the events) from the RudderStack CDN at run time, even with
    ``plugins: []``; its ``/bundled`` build has them compiled in, so the page
    uses that with ``plugins: ["XhrQueue", "StorageEncryption", "StorageMigrator"]``.
    """
    server = make_server()
    version = PACKAGES["@rudderstack/analytics-js"]
    report, rows = sdk_rows(node, server, "rudderstack", "rs-user")
    run, page_url = report["run"], report["pageUrl"]
    config_request, *sends = report["requests"]
    assert config_request.startswith("GET /sourceConfig/?")
    assert f"writeKey={server.write_key}" in config_request
    assert sends == ["POST /v1/identify", "POST /v1/track", "POST /v1/page"]
    assert set(report["statuses"]) == {200}
    by_type = {row["type"]: row for row in rows}
    assert set(by_type) == {"identify", "track", "page"}
    anonymous = {row["anonymous_id"] for row in rows}
    assert len(anonymous) == 1 and anonymous != {None}
    for row in rows:
        assert row["user_id"] == f"rs-user-{run}"
        assert uuid.UUID(row["message_id"])
        library = row["context"]["library"]
        assert library["name"] == "RudderLabs JavaScript SDK"
        assert library["version"] == version
        assert row["context"]["page"]["url"] == page_url
        assert row["context"]["traits"] == {"email": "bo@example.com", "plan": "team", "seats": 5}
    assert by_type["track"]["event"] == f"Order Completed {run}"
    assert by_type["track"]["properties"] == {
        "orderId": "o-2",
        "revenue": 17.25,
        "items": [{"sku": "s-2", "qty": 1}],
    }
    page = by_type["page"]
    assert page["name"] == f"Install {run}"
    assert page["properties"]["category"] == "Docs"
    assert page["properties"]["section"] == "install"
    assert page["properties"]["url"] == page_url
