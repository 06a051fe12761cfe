"""Request bodies: bounded reading, gzip with a cap, strict JSON."""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec

from headwater.gateway.committer import Overloaded
from headwater.spec.message import Rejection

Receive = Callable[[], Awaitable[dict[str, Any]]]
_decode = msgspec.json.Decoder().decode


class Budget:
    """Bytes of request bodies being read at once in this process, bounded.

    Past the bound a request is refused with ``Overloaded`` (503 and
    ``Retry-After``) instead of growing memory with every concurrent upload.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise Overloaded("too many request bodies being received at once")
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


BODY_TIMEOUT_S = 30.0


async def read(
    receive: Receive, limit: int, budget: Budget | None = None, declared: int | None = None
) -> bytes:
    """The whole body, chunked or not; refuse it once it passes ``limit`` bytes.

    With a budget, the bytes read are taken from it; the caller gives them
    back (``len`` of the result) once done with the body.
    """
    if declared is not None and declared > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
            except TimeoutError:
                raise Rejection(
                    "request_timeout",
                    "body",
                    f"the body did not arrive within {BODY_TIMEOUT_S:g} s",
                    408,
                ) from None
            if message["type"] == "http.disconnect":
                raise Rejection("client_disconnected", "", "the client went away", status=400)
            chunk = message.get("body", b"")
            if chunk:
                if size + len(chunk) > limit:
                    raise too_large(limit)
                if budget is not None:
                    budget.take(len(chunk))
                size += len(chunk)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except BaseException:
        if budget is not None:
            budget.give(size)
        raise
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(limit: int) -> Rejection:
    return Rejection(
        "payload_too_large",
        "body",
        f"request body exceeds the limit of {limit} bytes ({limit // 1024} KiB) after"
        " decompression",
    )


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding``; the decompressed size is capped at ``limit``.

    A gzip body may hold several members (RFC 1952) and zero padding after
    them; any other byte after the end of the stream is corruption.
    """
    codings = [c.strip().lower() for c in encoding.split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        # 400, not 415: every SDK drops a 400, older ones retry anything else.
        raise Rejection(
            "unsupported_encoding",
            "Content-Encoding",
            f"Content-Encoding {encoding!r} is not supported (use one gzip, deflate or none)",
        )
    encoding = codings[0]
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise undecodable(encoding, str(exc)) from None
        parts.append(part)
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise too_large(limit)
        if not inflater.eof:
            raise undecodable(encoding, "the stream is truncated")
        rest = inflater.unused_data.lstrip(b"\x00")
        if not rest:
            return b"".join(parts)
        if encoding == "deflate" or not rest.startswith(b"\x1f\x8b"):
            raise undecodable(encoding, f"{len(rest)} bytes follow the end of the stream")


def undecodable(encoding: str, reason: str) -> Rejection:
    return Rejection(
        "decompression_failed",
        "body",
        f"the body could not be decompressed as {encoding}: {reason}",
    )


# Every byte but the JSON structure: quotes and brackets.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


def nests_deeper(body: bytes, limit: int) -> bool:
    """Whether valid JSON nests objects and arrays deeper than ``limit`` levels.

    A screen in C-speed byte operations, exact for valid JSON: drop escaped
    backslashes and quotes, keep only quotes and brackets, drop brackets inside
    strings, then peel innermost bracket pairs ``limit`` times.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False  # too few brackets to nest that deep
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in skeleton:  # some string holds brackets
        skeleton = b"".join(skeleton.split(b'"')[::2])
    skeleton = skeleton.replace(b"{", b"[").replace(b"}", b"]")
    for _ in range(limit):
        if not skeleton:
            return False
        skeleton = skeleton.replace(b"[]", b"")
    return bool(skeleton)


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, numbers within range, integers exact."""
    if not body.strip():
        raise Rejection("invalid_json", "body", "the body is empty; expected a JSON object")
    try:
        return _decode(body)
    except msgspec.DecodeError as exc:
        text = str(exc)
        repaired = _with_lone_surrogates(body)
        if repaired is not None:
            return repaired
        if "out of range" in text:
            raise Rejection(
                "invalid_json",
                _out_of_range_path(body) or "body",
                "number out of range (larger than a 64-bit float can hold)",
            ) from None
        raise Rejection("invalid_json", "body", f"invalid JSON: {text}") from None
    except RecursionError:
        raise Rejection("invalid_json", "body", "JSON nested too deeply") from None


def _with_lone_surrogates(body: bytes) -> Any:
    """Parse JSON whose only fault is a lone UTF-16 surrogate escape (``\\ud800``).

    Browsers produce these when a string is cut inside an emoji; the lone half
    becomes U+FFFD instead of costing the whole batch.  None for anything else.
    """
    if b"\\u" not in body:
        return None

    def refuse(value: str) -> Any:
        raise ValueError(value)

    def exact_float(value: str) -> float:
        number = float(value)
        if math.isinf(number):
            raise ValueError(value)
        return number

    try:
        tree = json.loads(body, parse_constant=refuse, parse_float=exact_float)
    except (ValueError, RecursionError):
        return None
    return _replace_surrogates(tree)


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    return value


def _out_of_range_path(body: bytes) -> str | None:
    """Name the field whose number overflows a double (error path only)."""
    try:
        tree = json.loads(body, parse_float=Decimal, parse_constant=lambda c: None)
    except (ValueError, RecursionError):
        return None

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, Decimal):
            return path if math.isinf(float(node)) else None
        if isinstance(node, int) and not isinstance(node, bool):
            return None
        items: Any = (
            node.items()
            if isinstance(node, dict)
            else (enumerate(node) if isinstance(node, list) else ())
        )
        for key, value in items:
            child = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
            found = walk(value, child)
            if found:
                return found
        return None

    try:
        return walk(tree, "")
    except RecursionError:
        return None
