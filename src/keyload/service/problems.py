"""Structured errors (RFC 9457 ``application/problem+json``) for every refusal.

A :class:`Problem` names a ``type`` (``urn:keyload:problem:<slug>``), an HTTP status and
a one-line detail that never holds key material or message bytes. Refusals by the
authority carry their status word in ``sw`` (docs/protocol.md §6), so a client can turn a
problem back into the same typed error a local authority would have raised.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import SW, StatusError

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An HTTP refusal; raised inside the app, turned into a response at one place."""

    def __init__(self, status: int, slug: str, title: str, detail: str | None = None, *,
                 sw: int | None = None, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail or title
        self.sw = sw
        self.headers = headers or {}
        super().__init__(f"{status} {slug}: {self.detail}")

    @property
    def type(self) -> str:
        return f"urn:keyload:problem:{self.slug}"

    def body(self, request_id: str) -> bytes:
        """The problem+json document of the answer to request ``request_id`` (its
        ``instance``: ``urn:keyload:request:<id>``, as the ``x-request-id`` header)."""
        doc: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status,
                               "detail": self.detail,
                               "instance": f"urn:keyload:request:{request_id}"}
        if self.sw is not None:
            doc["sw"] = f"{self.sw:04X}"
        return json.dumps(doc).encode()


# How the authority's status words (docs/protocol.md §8) map to HTTP.
_SW_STATUS: dict[int, tuple[int, str, str]] = {
    SW.MALFORMED: (400, "malformed", "malformed EXPORTKEY request"),
    SW.WRONG_LENGTH: (400, "malformed", "malformed EXPORTKEY request"),
    SW.UNSUPPORTED: (422, "suite-unsupported", "suite not offered by the authority"),
    SW.UNKNOWN_SET: (404, "unknown-set", "the authority holds no transport key for this set"),
    SW.NOT_FOUND: (404, "unknown-ref1", "the authority holds no key with this REF1"),
    SW.POLICY: (403, "export-policy", "the authority's export policy refuses"),
    SW.INTEGRITY: (422, "integrity", "integrity check failed"),
    SW.REVOKED: (403, "unit-revoked", "the unit is revoked: the authority exports nothing "
                 "to it"),
    SW.AUTHENTICITY: (422, "authenticity", "authenticity check failed"),
    SW.MEMORY_FAILURE: (503, "authority-unavailable",
                        "the authority could not record the export: nothing was sent"),
}


def from_status_error(e: StatusError) -> Problem:
    status, slug, title = _SW_STATUS.get(e.code, (422, "refused", "the authority refuses"))
    return Problem(status, slug, title, e.detail, sw=e.code,
                   headers={"Retry-After": "1"} if status == 503 else None)


def malformed(detail: str, *, sw: bool = True) -> Problem:
    return Problem(400, "malformed", "malformed request", detail,
                   sw=int(SW.MALFORMED) if sw else None)


# A refusal is built anew for each request: an exception object raised twice keeps the
# frames of every raise in its traceback (and with them each request's scope), so a
# shared one would grow the server's memory with every refused request.
def unauthenticated(detail: str = "present a client certificate issued by the service's "
                                  "CA") -> Problem:
    return Problem(401, "unauthenticated", "a client certificate is required", detail)


def forbidden_client() -> Problem:
    return Problem(403, "client-not-authorized", "client not authorized",
                   "this client certificate is not in the service's policy")


def client_revoked() -> Problem:
    return Problem(403, "client-revoked", "client certificate revoked",
                   "this client certificate is on the service's deny list")


def not_found() -> Problem:
    return Problem(404, "not-found", "no such resource")


def unavailable(detail: str = "service temporarily unavailable", *,
                retry_after: int = 1) -> Problem:
    return Problem(503, "unavailable", "service temporarily unavailable", detail,
                   headers={"Retry-After": str(retry_after)})


def timeout(what: str, seconds: float) -> Problem:
    return Problem(408, "timeout", "request timeout",
                   f"the {what} must arrive within {seconds:g} s",
                   headers={"Connection": "close"})


def too_many(what: str, retry_after: float) -> Problem:
    return Problem(429, "rate-limited", "too many requests", f"{what} reached",
                   headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})
