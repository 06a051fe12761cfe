"""The events the benchmarks send: Segment-style ``track`` calls of ~600 bytes.

The shape matches ``bench/lua/post.lua`` (the wrk script), so wrk and the
Python open-loop client send the same bytes per event.  A 100-event batch is
about 62 KB, the size the DESIGN's decode figures were measured on.
"""

from __future__ import annotations

import time

WRITE_KEY = "WRITE_KEY"
AUTHORIZATION = "Basic V1JJVEVfS0VZOg=="  # base64("WRITE_KEY:")
USER_AGENT = "analytics-python/2.3.3"
AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)

_EVENT = (
    '{{"type":"track","messageId":"{mid}","userId":"user-{user}","event":"Order Completed",'
    '"properties":{{"orderId":"order-{n}","revenue":42.5,"currency":"EUR","coupon":"SUMMER",'
    '"products":[{{"sku":"SKU-1042","name":"Trail shoe","price":19.99,"quantity":1}},'
    '{{"sku":"SKU-2210","name":"Rain jacket","price":22.51,"quantity":1}}]}},'
    '"context":{{"library":{{"name":"analytics-python","version":"2.3.3"}},'
    '"userAgent":"{agent}","locale":"en-GB",'
    '"page":{{"path":"/checkout","url":"https://shop.example/checkout"}}}},'
    '"timestamp":"{now}"}}'
)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def event(message_id: str, n: int, now: str) -> str:
    """One track event as JSON text; ``n`` picks the user and the user agent."""
    return _EVENT.format(mid=message_id, user=n % 5000, n=n, agent=AGENTS[n % 4], now=now)


def batch(prefix: str, first: int, size: int, now: str) -> str:
    events = ",".join(event(f"{prefix}-{first + i}", first + i, now) for i in range(size))
    return f'{{"batch":[{events}],"sentAt":"{now}"}}'


def request(path: str, host: str, body: bytes) -> bytes:
    """A complete HTTP/1.1 POST with keep-alive, as an SDK sends it."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Content-Type: application/json\r\n"
        f"Authorization: {AUTHORIZATION}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body
