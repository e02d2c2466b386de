"""What a request brings, read strictly: headers, media types, JSON fields, the body.

Every function here either returns a value the service may use or raises a
:class:`~.problems.Problem` made for this request (400 with SW 6A80 for a malformed
field, 408, 413, 415); none reads the service's state. :class:`Req` is what one request
accumulates for its audit record (never key material).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from . import problems as P

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

OCTETS = "application/octet-stream"
JSON = "application/json"
_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")


@dataclass
class Req:
    """What one request accumulates for its audit record (never key material)."""

    method: str
    path: str
    peer: str
    client: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def hex_field(d: dict[str, Any], key: str, lo: int, hi: int) -> bytes:
    v = d.get(key)
    if not isinstance(v, str) or not _HEX.match(v) or len(v) % 2:
        raise P.malformed(f"'{key}' must be a string of hex digits")
    b = bytes.fromhex(v)
    if not lo <= len(b) <= hi:
        raise P.malformed(f"'{key}' must be {lo} bytes" if lo == hi else
                          f"'{key}' must be {lo} to {hi} bytes")
    return b


def int_field(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A JSON-Schema integer: ``126`` or ``126.0`` (a number whose value is integral)."""
    v = d.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise P.malformed(f"'{key}' must be an integer in {lo}..{hi}")
    return v


def json_object(body: bytes, keys: set[str]) -> dict[str, Any]:
    """A JSON object with exactly ``keys``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise P.malformed("the body is not valid JSON", sw=False) from None
    if not isinstance(doc, dict):
        raise P.malformed("the body must be a JSON object", sw=False)
    missing = keys - set(doc)
    extra = set(doc) - keys
    if missing or extra:
        raise P.malformed(f"expected fields {sorted(keys)}" +
                          (f" (missing {sorted(missing)})" if missing else "") +
                          (f" (unknown {sorted(extra)})" if extra else ""), sw=False)
    return doc


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole body: at most ``limit`` bytes (413, before reading when Content-Length
    says so, else while reading), within ``timeout`` seconds (408)."""
    cl = header(scope, b"content-length")
    if cl is not None:
        if not cl.isdigit():
            raise P.malformed("bad Content-Length", sw=False)
        if int(cl) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                m = await receive()
                if m["type"] == "http.disconnect":
                    raise P.malformed("client disconnected", sw=False)
                chunk = bytes(m.get("body", b""))
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
                if not m.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise P.timeout("request body", timeout) from None


def too_large(limit: int) -> P.Problem:
    return P.Problem(413, "too-large", "request body too large",
                     f"the body must be at most {limit} bytes")


def unsupported_media(accepted: tuple[str, ...]) -> P.Problem:
    return P.Problem(415, "unsupported-media-type", "unsupported media type",
                     f"send {' or '.join(accepted)}")


__all__ = ["JSON", "OCTETS", "Answer", "Receive", "Req", "Scope", "Send", "header",
           "hex_field", "int_field", "json_object", "media_type", "read_body"]
