"""The dashboard's ASGI app: the page, its script and style, and ``GET /api/state``.

Read-only: GET and HEAD only (405 otherwise). With a ``policy`` (HTTPS off loopback) a
request is served only to a verified client certificate the policy names, as the service
decides it (:class:`keyload.service.identity.Identities`): no certificate, or one not for
client authentication, is a 401; a denied or unnamed one a 403.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from ..service.identity import Identities
from ..service.policy import Policy
from ..service.problems import Problem
from .state import Gatherer

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
#: No script, style or image from anywhere but this server; no framing.
HEADERS = [(b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
           (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]


def static_file(name: str) -> bytes:
    """A file of the page, from the package (``keyload/dashboard/static``)."""
    return resources.files(__package__).joinpath("static", name).read_bytes()


class DashboardApp:
    def __init__(self, gatherer: Gatherer, *, policy: Policy | None = None) -> None:
        self.gatherer = gatherer
        self.policy = policy
        self.identities = Identities()
        self.files = {path: (static_file(name), ctype) for path, (name, ctype) in
                      STATIC.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup: nothing to open (each read opens and closes)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        try:
            status, ctype, body = await self._answer(scope)
        except Problem as p:
            status, ctype = p.status, "application/json"
            body = json.dumps({"error": {"status": p.status, "title": p.title,
                                         "detail": p.detail}}).encode()
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()),
                                (b"content-length", str(len(body)).encode()), *HEADERS]})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _answer(self, scope: Scope) -> tuple[int, str, bytes]:
        if self.policy is not None:
            tls = (scope.get("extensions") or {}).get("tls")
            self.identities.rule(tls, self.policy, None)  # 401 / 403 as the service's
        path = scope["path"]
        if path != "/api/state" and path not in self.files:
            return 404, "application/json", b'{"error": {"status": 404, "title": "not found"}}'
        if scope["method"] not in ("GET", "HEAD"):
            raise Problem(405, "method-not-allowed", "method not allowed",
                          "the dashboard is read-only: GET and HEAD only")
        if path == "/api/state":
            state = await asyncio.to_thread(self.gatherer.state)
            return 200, "application/json", json.dumps(state).encode()
        body, ctype = self.files[path]
        return 200, ctype, body
