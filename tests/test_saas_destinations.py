"""Mixpanel and Amplitude destinations against loopback fakes of their ingestion APIs.

Events go in through a real ``headwater serve`` (sent by segment-analytics-python
where the test is about shapes) and must land in the fakes in the shapes
DESTINATIONS.md sections 1 and 2 describe; failures must end as dead letters or
retries exactly as the vendors' error semantics say, and every destination's
counters must reconcile.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from segment.analytics import Client

from conftest import WRITE_KEY, RunningServer, reconciled
from conftest import settle_deliveries as settle
from fakes.amplitude import FakeAmplitude, throttled
from fakes.mixpanel import FakeMixpanel, rate_limited
from headwater.destinations import ConfigurationError, build
from headwater.destinations.base import BatchSettings, DestinationConfig, RetrySettings
from headwater.destinations.mixpanel import insert_id
from headwater.destinations.saas import Limits, Op, Reply, run_plan
from headwater.destinations.state import DeliveryState

SA_USER, SA_SECRET, PROJECT_ID = "svc.headwater", "sa-secret", "31337"
MP_TOKEN, AMP_KEY = "mp-token-1", "amp-key-1"
FAST_RETRY = RetrySettings(base_ms=100, max_backoff_ms=1000)


@pytest.fixture
def fakes() -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(kind: type[Any], **kwargs: Any) -> Any:
        made.append(kind(**kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def new_mixpanel(make: Callable[..., Any], **kwargs: Any) -> FakeMixpanel:
    fake: FakeMixpanel = make(
        FakeMixpanel,
        project_token=MP_TOKEN,
        project_id=PROJECT_ID,
        service_account=(SA_USER, SA_SECRET),
        **kwargs,
    )
    return fake


def mixpanel(name: str, fake: FakeMixpanel, **overrides: Any) -> DestinationConfig:
    settings = {
        "region": "eu",
        "base_url": fake.url,
        "project_token": MP_TOKEN,
        "service_account_username": SA_USER,
        "service_account_secret": SA_SECRET,
        "project_id": PROJECT_ID,
    }
    settings.update(overrides.pop("settings", {}))
    return DestinationConfig(
        name=name,
        kind="mixpanel",
        settings=settings,
        batch=overrides.pop("batch", BatchSettings(max_events=100, max_age_ms=100)),
        retry=overrides.pop("retry", FAST_RETRY),
        **overrides,
    )


def amplitude(name: str, fake: FakeAmplitude, **overrides: Any) -> DestinationConfig:
    settings = {"region": "us", "base_url": fake.url, "api_key": AMP_KEY}
    settings.update(overrides.pop("settings", {}))
    return DestinationConfig(
        name=name,
        kind="amplitude",
        settings=settings,
        batch=overrides.pop("batch", BatchSettings(max_events=100, max_age_ms=100)),
        retry=overrides.pop("retry", FAST_RETRY),
        **overrides,
    )


def sdk(server: RunningServer) -> Client:
    return Client(WRITE_KEY, host=server.url, sync_mode=True)


WHEN = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
WHEN_MS = int(WHEN.timestamp() * 1000)
LONG_MESSAGE_ID = "ajs-next-1772600767890-0b7c1f4e-9a39-4c53-8f1e-5d2c7a6b9e01"
CONTEXT = {
    "ip": "203.0.113.9",
    "page": {"url": "https://shop.example/cart", "referrer": "https://search.example/"},
    "campaign": {"source": "newsletter", "name": "spring"},
    "os": {"name": "iOS", "version": "17.1"},
    "device": {
        "id": "device-0001",
        "manufacturer": "Apple",
        "model": "iPhone15,2",
        "advertisingId": "adid-0001",
    },
}


def send_every_call(client: Client) -> None:
    client.identify(
        "user-0001",
        {"email": "ada@example.com", "firstName": "Ada", "lastName": "Lovelace", "plan": "pro"},
        context={"ip": "203.0.113.9"},
        anonymous_id="anon-0001",
        timestamp=WHEN,
        message_id="msg-identify-1",
    )
    client.track(
        "user-0001",
        "Order Viewed",
        {"price": 9.5, "quantity": 2, "productId": "sku-1", "tags": ["a", "b"]},
        context=CONTEXT,
        timestamp=WHEN,
        anonymous_id="anon-0001",
        integrations={"Amplitude": {"session_id": 1772600000}},
        message_id="msg-track-1",
    )
    client.page(
        "user-0001",
        "Docs",
        "Home",
        {"path": "/docs"},
        context={"ip": "203.0.113.9"},
        timestamp=WHEN,
        message_id=LONG_MESSAGE_ID,
    )
    client.screen(
        None,
        None,
        None,
        {"tab": 2},
        context={"ip": "203.0.113.9"},
        timestamp=WHEN,
        anonymous_id="anon-0001",
        message_id="msg-screen-1",
    )
    client.group(
        "user-0001",
        "acme-0001",
        {"name": "Acme", "employees": 42},
        context={"ip": "203.0.113.9"},
        timestamp=WHEN,
        message_id="msg-group-1",
    )
    client.alias(
        "anon-0001",
        "user-0001",
        context={"ip": "203.0.113.9"},
        timestamp=WHEN,
        message_id="msg-alias-1",
    )


def near(ms: Any) -> bool:
    # headwater corrects timestamps for clock skew (receivedAt - (sentAt - timestamp)),
    # so the time seen downstream is WHEN plus the SDK-to-server latency.
    return isinstance(ms, int) and 0 <= ms - WHEN_MS < 10_000


def test_sdk_calls_land_in_both_vendors_in_documented_shapes(
    make_server: Callable[..., RunningServer], fakes: Callable[..., Any]
) -> None:
    mp = new_mixpanel(fakes)
    amp: FakeAmplitude = fakes(FakeAmplitude, api_key=AMP_KEY)
    server = make_server(destinations=[mixpanel("mp", mp), amplitude("amp", amp)])
    send_every_call(sdk(server))
    destinations = settle(server)
    for name in ("mp", "amp"):
        counters = destinations[name]["counters"]
        assert counters["delivered"] == 6, counters
        assert counters.get("dead_lettered", 0) == 0 and reconciled(counters) == 0

    # -- Mixpanel (DESTINATIONS.md 1.2, 1.4, 1.5, 1.6, 1.7) -------------------------
    events = {e["properties"]["$insert_id"]: e for e in mp.unique_events()}
    assert sorted(e["event"] for e in events.values()) == [
        "$create_alias",
        "$identify",
        "Loaded a Screen",
        "Order Viewed",
        "Viewed Home",
    ]
    times = {key: e["properties"].pop("time") for key, e in events.items()}
    assert all(near(t) for t in times.values()), times
    assert events["msg-identify-1"] == {
        "event": "$identify",
        "properties": {
            "$identified_id": "user-0001",
            "$anon_id": "anon-0001",
            "token": MP_TOKEN,
            "distinct_id": "user-0001",
            "$insert_id": "msg-identify-1",
            "$device_id": "anon-0001",
            "$user_id": "user-0001",
            "ip": "203.0.113.9",
        },
    }
    assert events["msg-track-1"] == {
        "event": "Order Viewed",
        "properties": {
            "price": 9.5,
            "quantity": 2,
            "productId": "sku-1",
            "tags": ["a", "b"],
            "$current_url": "https://shop.example/cart",
            "$referrer": "https://search.example/",
            "$os": "iOS",
            "$os_version": "17.1",
            "$manufacturer": "Apple",
            "$model": "iPhone15,2",
            "utm_source": "newsletter",
            "utm_campaign": "spring",
            "mp_lib": "headwater",
            "distinct_id": "user-0001",
            "$insert_id": "msg-track-1",
            "$device_id": "anon-0001",
            "$user_id": "user-0001",
            "ip": "203.0.113.9",
        },
    }
    # A messageId Mixpanel would refuse as $insert_id (over 36 bytes) gets a stable UUIDv5.
    page_id = insert_id(LONG_MESSAGE_ID)
    assert re.fullmatch(r"[0-9a-f-]{36}", page_id) and uuid.UUID(page_id).version == 5
    assert events[page_id] == {
        "event": "Viewed Home",
        "properties": {
            "path": "/docs",
            "mp_lib": "headwater",
            "distinct_id": "user-0001",
            "$insert_id": page_id,
            "$user_id": "user-0001",
            "ip": "203.0.113.9",
        },
    }
    assert events["msg-screen-1"] == {
        "event": "Loaded a Screen",
        "properties": {
            "tab": 2,
            "mp_lib": "headwater",
            "distinct_id": "anon-0001",
            "$insert_id": "msg-screen-1",
            "$device_id": "anon-0001",
            "ip": "203.0.113.9",
        },
    }
    assert events["msg-alias-1"] == {
        "event": "$create_alias",
        "properties": {
            "distinct_id": "anon-0001",
            "alias": "user-0001",
            "token": MP_TOKEN,
            "$insert_id": "msg-alias-1",
        },
    }
    assert mp.engage == [
        {
            "$token": MP_TOKEN,
            "$distinct_id": "user-0001",
            "$ip": "203.0.113.9",
            "$set": {
                "$email": "ada@example.com",
                "$first_name": "Ada",
                "$last_name": "Lovelace",
                "plan": "pro",
                "$name": "Ada Lovelace",
            },
        }
    ]
    assert mp.groups == [
        {
            "$token": MP_TOKEN,
            "$group_key": "$group_id",
            "$group_id": "acme-0001",
            "$set": {"$name": "Acme", "employees": 42},
        }
    ]
    assert {e.path for e in mp.log} == {"/import", "/engage", "/groups"}

    # -- Amplitude (DESTINATIONS.md 2.2, 2.6, 2.7, and 2.8 for identify) -------------
    by_id = {e["insert_id"]: e for e in amp.events}
    assert len(amp.events) == 5 and amp.duplicates == 0
    amp_times = {key: e.pop("time") for key, e in by_id.items()}
    assert amp_times["msg-track-1"] == times["msg-track-1"]  # one clock for both vendors
    assert all(near(t) for t in amp_times.values()), amp_times
    assert by_id["msg-identify-1"] == {
        "event_type": "$identify",
        "user_id": "user-0001",
        "device_id": "anon-0001",
        "insert_id": "msg-identify-1",
        "ip": "203.0.113.9",
        "library": "headwater",
        "user_properties": {
            "$set": {
                "email": "ada@example.com",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "plan": "pro",
            }
        },
    }
    assert by_id["msg-track-1"] == {
        "event_type": "Order Viewed",
        "user_id": "user-0001",
        "device_id": "device-0001",
        "insert_id": "msg-track-1",
        "ip": "203.0.113.9",
        "os_name": "iOS",
        "os_version": "17.1",
        "device_manufacturer": "Apple",
        "device_model": "iPhone15,2",
        "idfa": "adid-0001",
        "session_id": 1772600000000,
        "library": "headwater",
        "event_properties": {
            "price": 9.5,
            "quantity": 2,
            "productId": "sku-1",
            "tags": ["a", "b"],
        },
        "price": 9.5,
        "quantity": 2,
        "productId": "sku-1",
    }
    assert by_id[LONG_MESSAGE_ID] == {
        "event_type": "Viewed Home",
        "user_id": "user-0001",
        "insert_id": LONG_MESSAGE_ID,
        "ip": "203.0.113.9",
        "library": "headwater",
        "event_properties": {"path": "/docs"},
    }
    assert by_id["msg-screen-1"] == {
        "event_type": "Loaded a Screen",
        "device_id": "anon-0001",
        "insert_id": "msg-screen-1",
        "ip": "203.0.113.9",
        "library": "headwater",
        "event_properties": {"tab": 2},
    }
    assert by_id["msg-group-1"] == {
        "event_type": "$identify",
        "user_id": "user-0001",
        "insert_id": "msg-group-1",
        "ip": "203.0.113.9",
        "library": "headwater",
        "groups": {"[Segment] Group": "acme-0001"},
        "user_properties": {"$set": {"[Segment] Group": "acme-0001"}},
    }
    assert amp.group_identifications == [
        {
            "group_type": "[Segment] Group",
            "group_value": "acme-0001",
            "group_properties": {"$set": {"name": "Acme", "employees": 42}},
        }
    ]
    assert amp.group_profiles == {
        ("[Segment] Group", "acme-0001"): {"name": "Acme", "employees": 42}
    }
    assert amp.mappings == [{"user_id": "anon-0001", "global_user_id": "user-0001"}]
    assert {e.path for e in amp.log} == {"/2/httpapi", "/groupidentify", "/usermap"}


def dead_letters(server: RunningServer, name: str) -> list[Any]:
    state = DeliveryState(server.data_dir)
    try:
        return state.dead_letters(name)
    finally:
        state.close()


def test_per_record_rejection_dead_letters_only_that_event(
    make_server: Callable[..., RunningServer], fakes: Callable[..., Any]
) -> None:
    mp = new_mixpanel(fakes)
    amp: FakeAmplitude = fakes(FakeAmplitude, api_key=AMP_KEY)
    batch = BatchSettings(max_events=100, max_age_ms=1500)  # one batch for the three events
    server = make_server(
        destinations=[mixpanel("mp", mp, batch=batch), amplitude("amp", amp, batch=batch)]
    )
    client = sdk(server)
    # "undefined" is refused as distinct_id (1.2) and as user_id (2.2).
    for index, user in enumerate(["user-0001", "undefined", "user-0002"]):
        client.track(user, "Clicked", {"i": index}, message_id=f"msg-rej-{index}")
    destinations = settle(server)
    for name in ("mp", "amp"):
        counters = destinations[name]["counters"]
        assert counters["delivered"] == 2 and counters["dead_lettered"] == 1, counters
        assert reconciled(counters) == 0
        [letter] = dead_letters(server, name)
        assert letter.message_id == "msg-rej-1" and letter.reason.startswith("rejected:")
    assert "properties.distinct_id" in dead_letters(server, "mp")[0].reason
    assert "events_with_invalid_fields: user_id" in dead_letters(server, "amp")[0].reason

    # Mixpanel ingested the valid records of the same request (strict=1, 1.2) ...
    assert sorted(e["properties"]["i"] for e in mp.unique_events()) == [0, 2]
    assert [e.status for e in mp.answered("/import")] == [400]
    # ... Amplitude ingested nothing of the 400 and took the rest on a resend (2.4).
    assert sorted(e["event_properties"]["i"] for e in amp.events) == [0, 2]
    assert [(e.status, e.records) for e in amp.answered("/2/httpapi")] == [(400, 3), (200, 2)]


def test_rate_limit_with_retry_after_is_retried(
    make_server: Callable[..., RunningServer], fakes: Callable[..., Any]
) -> None:
    mp = new_mixpanel(fakes)
    amp: FakeAmplitude = fakes(FakeAmplitude, api_key=AMP_KEY)
    mp.force("/import", rate_limited(retry_after="1"))
    amp.force("/2/httpapi", throttled(retry_after="1"))
    server = make_server(destinations=[mixpanel("mp", mp), amplitude("amp", amp)])
    client = sdk(server)
    client.track("user-0001", "Paid", {"amount": 5}, message_id="msg-429-1")
    destinations = settle(server)
    for name, fake, path in (("mp", mp, "/import"), ("amp", amp, "/2/httpapi")):
        counters = destinations[name]["counters"]
        assert counters["delivered"] == 1 and counters["retried"] == 1, counters
        assert reconciled(counters) == 0
        first, second = fake.answered(path)
        assert (first.status, second.status) == (429, 200)
        assert second.at - first.at >= 0.9, "Retry-After: 1 not honoured"
    assert len(mp.unique_events()) == 1 and len(amp.events) == 1


def test_batches_above_vendor_limits_are_split(
    make_server: Callable[..., RunningServer], fakes: Callable[..., Any]
) -> None:
    mp = new_mixpanel(fakes)
    amp: FakeAmplitude = fakes(FakeAmplitude, api_key=AMP_KEY)
    # Fakes whose size limit is far below what the client assumes: only 413s teach it.
    mp_small = new_mixpanel(fakes, max_request_bytes=150_000)
    amp_small: FakeAmplitude = fakes(
        FakeAmplitude, api_key=AMP_KEY, max_bytes={"/2/httpapi": 150_000}
    )
    total = 2100
    batch = BatchSettings(max_events=total, max_bytes=16 * 1024 * 1024, max_age_ms=15_000)
    server = make_server(
        destinations=[
            mixpanel("mp", mp, batch=batch),
            amplitude("amp", amp, batch=batch),
            mixpanel("mp_small", mp_small, batch=batch),
            amplitude("amp_small", amp_small, batch=batch),
        ]
    )
    filler = "x" * 500  # 2100 events of ~700 bytes: over Amplitude V2's 1 MB per request
    sent = [
        {
            "type": "track",
            "userId": f"user-{i % 7:04d}",
            "event": "Bulk",
            "messageId": f"msg-bulk-{i}",
            "properties": {"i": i, "filler": filler},
        }
        for i in range(total)
    ]
    for start in range(0, total, 300):
        response = server.post("/v1/batch", {"batch": sent[start : start + 300]})
        assert response.status_code == 200
    destinations = settle(server, timeout=30)
    for name in ("mp", "amp", "mp_small", "amp_small"):
        counters = destinations[name]["counters"]
        assert counters["delivered"] == total and reconciled(counters) == 0, (name, counters)

    mp_requests = mp.answered("/import")
    assert all(r.status == 200 and r.records <= 2000 for r in mp_requests)
    assert sorted(r.records for r in mp_requests) == [100, 2000]  # 1.2: 2000 per request
    amp_requests = amp.answered("/2/httpapi")
    assert all(r.status == 200 and r.records < 2000 and r.size <= 1_000_000 for r in amp_requests)
    assert len(amp_requests) >= 2 and sum(r.records for r in amp_requests) == total

    # 413 answers halve the request until it fits (1.2 retry rules; 2.4).
    for fake, path in ((mp_small, "/import"), (amp_small, "/2/httpapi")):
        statuses = [r.status for r in fake.answered(path)]
        assert 413 in statuses and statuses[-1] == 200
        accepted = [r for r in fake.answered(path) if r.status == 200]
        assert sum(r.records for r in accepted) == total
        assert all(r.size <= 150_000 for r in accepted)

    assert len(mp.unique_events()) == len(mp_small.unique_events()) == total
    assert len(amp.events) == len(amp_small.events) == total
    assert amp.duplicates == amp_small.duplicates == 0


def test_settings_are_validated_and_name_the_setting(fakes: Callable[..., Any]) -> None:
    mp = new_mixpanel(fakes)
    amp: FakeAmplitude = fakes(FakeAmplitude, api_key=AMP_KEY)

    def error(config: DestinationConfig) -> str:
        with pytest.raises(ConfigurationError) as caught:
            build(config)
        return str(caught.value)

    base = mixpanel("mp", mp).settings
    cases = [
        ({"region": ""}, "destinations.mp.settings.region:"),
        ({"region": "moon"}, "destinations.mp.settings.region:"),
        ({"base_url": "ftp://example"}, "destinations.mp.settings.base_url:"),
        ({"project_token": ""}, "destinations.mp.settings.project_token:"),
        ({"service_account_secret": ""}, "destinations.mp.settings.service_account_secret:"),
        ({"api_secret": "also"}, "destinations.mp.settings.api_secret:"),
        ({"max_events_per_request": 2001}, "destinations.mp.settings.max_events_per_request:"),
        ({"strict": "yes"}, "destinations.mp.settings.strict:"),
        ({"colour": "blue"}, "destinations.mp.settings.colour:"),
    ]
    for change, expected in cases:
        config = DestinationConfig(name="mp", kind="mixpanel", settings={**base, **change})
        assert error(config).startswith(expected), (change, error(config))
    amp_base = amplitude("amp", amp).settings
    amp_cases = [
        ({"api_key": ""}, "destinations.amp.settings.api_key:"),
        ({"region": "in"}, "destinations.amp.settings.region:"),
        ({"endpoint": "v3"}, "destinations.amp.settings.endpoint:"),
        ({"max_events_per_request": 2000}, "destinations.amp.settings.max_events_per_request:"),
        ({"min_id_length": 0}, "destinations.amp.settings.min_id_length:"),
    ]
    for change, expected in amp_cases:
        config = DestinationConfig(name="amp", kind="amplitude", settings={**amp_base, **change})
        assert error(config).startswith(expected), (change, error(config))

    # No silent fallback: each region has its host, base_url replaces it only when set.
    hosts = {
        region: build(
            DestinationConfig(
                name="mp",
                kind="mixpanel",
                settings={**base, "region": region, "base_url": ""},
            )
        )
        for region in ("us", "eu", "in")
    }
    assert {r: d.base for r, d in hosts.items()} == {
        "us": "https://api.mixpanel.com",
        "eu": "https://api-eu.mixpanel.com",
        "in": "https://api-in.mixpanel.com",
    }
    eu = build(
        DestinationConfig(
            name="amp", kind="amplitude", settings={**amp_base, "region": "eu", "base_url": ""}
        )
    )
    assert eu.base == "https://api.eu.amplitude.com"
    assert eu.usermap_base == "https://api.eu.amplitude.com"
    for destination in [*hosts.values(), eu]:
        destination.close()

    # check() reaches the fakes: good credentials pass, refused ones name the setting.
    good = build(mixpanel("mp", mp))
    good.check()
    good.close()
    bad = build(mixpanel("mp", mp, settings={"service_account_secret": "wrong"}))
    with pytest.raises(ConfigurationError, match=r"settings\.service_account_username"):
        bad.check()
    bad.close()
    amp_good = build(amplitude("amp", amp))
    amp_good.check()
    amp_good.close()
    amp_bad = build(amplitude("amp", amp, settings={"api_key": "nope"}))
    with pytest.raises(ConfigurationError, match=r"settings\.api_key"):
        amp_bad.check()
    amp_bad.close()


# -- the request plan, without a server --------------------------------------------


def plan_ops(records: list[tuple[str, int, str]]) -> list[Op]:
    return [Op(endpoint, item, event, len(item) + 2) for endpoint, event, item in records]


LIMITS = {"/a": Limits(max_items=3, max_bytes=64), "/b": Limits(max_items=10, max_bytes=64)}


def test_plan_splits_bisects_and_resends() -> None:
    sent: list[tuple[str, list[str]]] = []

    def vendor(endpoint: str, items: list[str]) -> Reply:
        sent.append((endpoint, items))
        if endpoint == "/b" and "bad" in items:
            return Reply("invalid", 200, "status 0")  # no per-record detail: bisect
        if endpoint == "/a" and "drop" in items:
            position = items.index("drop")
            return Reply("partial", 400, "x", rejected={position: "time"}, resend=True)
        return Reply("ok", 200)

    ops = plan_ops(
        [
            ("/a", 0, "a0"),
            ("/a", 1, "drop"),
            ("/b", 1, "b1"),
            ("/a", 2, "a2"),
            ("/a", 3, "a3"),
            ("/b", 4, "bad"),
            ("/b", 5, "b5"),
            ("/a", 6, "x" * 70),
        ]
    )
    outcome = run_plan(7, ops, {}, LIMITS, vendor)
    assert outcome.kind == "delivered"
    assert outcome.rejected == {
        1: "/a: time",
        4: "/b: status 0",
        6: "/a: record of 72 bytes exceeds the request limit of 64 bytes",
    }
    assert sent == [
        ("/a", ["a0", "drop", "a2"]),  # three records per request
        ("/a", ["a0", "a2"]),  # that 400 ingested nothing: the rest again
        ("/b", ["bad", "b5"]),  # event 1 is rejected, so its /b record is not sent
        ("/b", ["bad"]),  # refused without detail: bisect
        ("/b", ["b5"]),
        ("/a", ["a3"]),
    ]


def test_plan_failure_reports_the_delivered_prefix() -> None:
    def vendor(endpoint: str, items: list[str]) -> Reply:
        if endpoint == "/b":
            return Reply("retryable", 503, "down", retry_after_s=2.0)
        if "big" in items and len(items) > 1:
            return Reply("too_large", 413, "too large")
        return Reply("ok", 200)

    ops = plan_ops([("/a", 0, "a0"), ("/a", 1, "big"), ("/a", 2, "a2"), ("/b", 2, "b2")])
    outcome = run_plan(4, ops, {}, LIMITS, vendor)
    # Events 0 and 1 are in; event 2's /b record failed, event 3 had nothing to send.
    assert (outcome.kind, outcome.status, outcome.retry_after_s) == ("retryable", 503, 2.0)
    assert outcome.completed == 2
