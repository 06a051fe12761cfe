"""Delivery to webhooks: isolation, retries, dead letters, routing, reconciliation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import RunningServer, reconciled, settle_deliveries
from headwater.destinations.base import (
    BatchSettings,
    DestinationConfig,
    RetrySettings,
    classify_status,
)
from receiver import Received, Receiver

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def webhook(name: str, receiver: Receiver, **overrides: Any) -> DestinationConfig:
    settings = {"url": receiver.url, "allow_networks": ["127.0.0.0/8"], "secret": SECRET}
    settings.update(overrides.pop("settings", {}))
    return DestinationConfig(
        name=name,
        kind="webhook",
        settings=settings,
        batch=overrides.pop("batch", BatchSettings(max_events=50, max_age_ms=50)),
        retry=overrides.pop("retry", RetrySettings(base_ms=100, max_backoff_ms=1000)),
        **overrides,
    )


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def track(i: int, user: str = "u-1", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": "Tick",
        "messageId": f"m-{i}",
        "properties": {"i": i},
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (301, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (404, "permanent"),
        (408, "retryable"),
        (410, "permanent"),
        (413, "permanent"),
        (423, "retryable"),
        (429, "retryable"),
        (500, "retryable"),
        (501, "permanent"),
        (502, "retryable"),
        (503, "retryable"),
        (504, "retryable"),
        (505, "permanent"),
    ],
)
def test_status_classification(status: int, kind: str) -> None:
    assert classify_status(status) == kind


def test_webhook_receives_signed_events(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    hook = receivers()
    server = make_server(destinations=[webhook("hook", hook)])
    assert server.post("/v1/batch", {"batch": [track(i) for i in range(5)]}).status_code == 200
    events = hook.wait_for(5)
    assert [e["messageId"] for e in events] == [f"m-{i}" for i in range(5)]
    assert all(e["receivedAt"].endswith("Z") and e["timestamp"].endswith("Z") for e in events)
    first = hook.requests[0]
    webhook_id = first.headers["webhook-id"]
    assert webhook_id == "m-0" == first.headers["Idempotency-Key"]
    signed = f"{webhook_id}.{first.headers['webhook-timestamp']}.".encode() + first.body
    expected = hmac.new(b"k" * 32, signed, hashlib.sha256).digest()
    assert first.headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    counters = settle_deliveries(server)["hook"]["counters"]
    assert counters["delivered"] == 5 and reconciled(counters) == 0


def test_failing_destination_does_not_delay_healthy_one(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    healthy = receivers()
    state = {"failing": True}

    def flaky(_: Received) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"down") if state["failing"] else (200, {}, b"{}")

    broken = receivers(respond=flaky)
    server = make_server(destinations=[webhook("a", broken), webhook("b", healthy)])
    started = time.monotonic()
    users = [f"u-{i % 3}" for i in range(50)]
    batch = [track(i, user=users[i]) for i in range(50)]
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    assert len(healthy.wait_for(50, timeout=5)) == 50
    assert time.monotonic() - started < 5
    time.sleep(1.0)
    assert broken.events() == []
    assert 503 in broken.answered
    state["failing"] = False
    events = broken.wait_for(50, timeout=15)
    assert sorted(e["messageId"] for e in events) == sorted(f"m-{i}" for i in range(50))
    for user in set(users):
        sent = [e["properties"]["i"] for e in events if e["userId"] == user]
        assert sent == sorted(sent), f"order broken for {user}"
    destinations = settle_deliveries(server)
    assert destinations["a"]["counters"]["retried"] >= 1
    for name in ("a", "b"):
        assert reconciled(destinations[name]["counters"]) == 0


def test_retry_after_is_honoured(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    calls: list[float] = []

    def limited(_: Received) -> tuple[int, dict[str, str], bytes]:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return 429, {"Retry-After": "2"}, b"slow down"
        return 200, {}, b"{}"

    hook = receivers(respond=limited)
    server = make_server(destinations=[webhook("hook", hook)])
    assert server.post("/v1/track", track(1)).status_code == 200
    assert len(hook.wait_for(1, timeout=10)) == 1
    assert calls[1] - calls[0] >= 1.9


def test_permanent_failure_goes_to_dead_letters(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    hook = receivers(respond=lambda _: (400, {}, b'{"error": "bad"}'))
    server = make_server(destinations=[webhook("hook", hook)])
    assert server.post("/v1/track", track(7)).status_code == 200
    counters = settle_deliveries(server)["hook"]["counters"]
    assert counters["dead_lettered"] == 1 and reconciled(counters) == 0
    from headwater.destinations.state import DeliveryState

    state = DeliveryState(server.data_dir)
    [letter] = state.dead_letters("hook")
    state.close()
    assert letter.message_id == "m-7"
    assert letter.last_status == 400 and "bad" in letter.last_response
    assert "permanent" in letter.reason


def test_retries_exhausted_go_to_dead_letters(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    hook = receivers(respond=lambda _: (500, {}, b"boom"))
    retry = RetrySettings(max_attempts=3, base_ms=50, max_backoff_ms=100)
    server = make_server(destinations=[webhook("hook", hook, retry=retry)])
    assert server.post("/v1/track", track(8)).status_code == 200
    counters = settle_deliveries(server)["hook"]["counters"]
    assert counters["dead_lettered"] == 1
    assert counters["failed"] == 3 and counters["retried"] == 2
    assert reconciled(counters) == 0


def test_routing_integrations_consent_filters(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    hook = receivers()
    analytics = receivers()
    server = make_server(
        destinations=[
            webhook(
                "hook",
                hook,
                filters=[
                    {"action": "drop", "if": {"field": "event", "op": "eq", "value": "Secret"}},
                    {"action": "drop_properties", "properties": ["email"]},
                ],
            ),
            webhook(
                "analytics", analytics, integration_name="Analytics", consent_categories=["C0002"]
            ),
        ]
    )
    consent_no = {"consent": {"categoryPreferences": {"C0002": False}}}
    consent_yes = {"consent": {"categoryPreferences": {"C0002": True}}}
    batch = [
        track(1, properties={"email": "a@example.com", "plan": "pro"}),
        track(2, event="Secret"),
        track(3, integrations={"All": False}),
        track(4, integrations={"All": False, "Analytics": {"session": 1}}),
        track(5, context=consent_no),
        track(6, context=consent_yes, integrations={"Analytics": False}),
        track(7, context={"consent": {"categoryPreferences": {}}}),
    ]
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    destinations = settle_deliveries(server)
    hook_ids = sorted(e["messageId"] for e in hook.events())
    assert hook_ids == ["m-1", "m-5", "m-6", "m-7"]
    first = next(e for e in hook.events() if e["messageId"] == "m-1")
    assert first["properties"] == {"plan": "pro"}
    assert sorted(e["messageId"] for e in analytics.events()) == ["m-1", "m-2", "m-4"]
    hook_counters = destinations["hook"]["counters"]
    assert hook_counters["filtered:integrations"] == 2
    assert hook_counters["filtered:filter[0]:drop"] == 1
    analytics_counters = destinations["analytics"]["counters"]
    assert analytics_counters["filtered:consent"] == 2
    assert analytics_counters["filtered:integrations"] == 2
    for counters in (hook_counters, analytics_counters):
        assert reconciled(counters) == 0


def test_private_targets_refused_unless_allowed(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    hook = receivers()
    guarded = DestinationConfig(
        name="guarded",
        kind="webhook",
        settings={"url": hook.url},
        batch=BatchSettings(max_age_ms=10),
    )
    server = make_server(destinations=[guarded])
    assert server.post("/v1/track", track(9)).status_code == 200
    counters = settle_deliveries(server)["guarded"]["counters"]
    assert counters["dead_lettered"] == 1
    assert hook.answered == []


def _cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headwater.cli", "--data-dir", str(server.data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dead_letters_replay_and_range_replay(
    make_server: Callable[..., RunningServer], receivers: Callable[..., Receiver]
) -> None:
    state = {"status": 400}
    hook = receivers(respond=lambda _: (state["status"], {}, b"{}"))
    server = make_server(destinations=[webhook("hook", hook)])
    assert server.post("/v1/batch", {"batch": [track(i) for i in range(3)]}).status_code == 200
    assert settle_deliveries(server)["hook"]["counters"]["dead_lettered"] == 3

    listed = _cli(server, "deadletters", "list", "--destination", "hook")
    assert listed.returncode == 0 and listed.stdout.count("m-") == 3
    shown = _cli(server, "deadletters", "show", "1")
    assert json.loads(shown.stdout)["event"]["messageId"] == "m-0"

    state["status"] = 200
    replayed = _cli(server, "deadletters", "replay", "--destination", "hook")
    assert replayed.returncode == 0, replayed.stderr
    assert sorted(e["messageId"] for e in hook.events()) == ["m-0", "m-1", "m-2"]
    counters = server.admin.status()["destinations"]["hook"]["counters"]
    assert counters["dead_lettered"] == 0 and counters["delivered"] == 3
    assert reconciled(counters) == 0
    assert _cli(server, "deadletters", "list").stdout.count("m-") == 0

    again = _cli(server, "replay", "--destination", "hook", "--since", "2000-01-01T00:00:00Z")
    assert again.returncode == 0, again.stderr
    assert "3 of 3 events replayed" in again.stdout
    events = hook.events()
    assert len(events) == 6
    replayed_event = events[-1]
    assert replayed_event["messageId"] == "m-2" and replayed_event["properties"] == {"i": 2}
