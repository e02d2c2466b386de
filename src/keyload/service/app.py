"""The remote-download service as a plain ASGI 3 application (no framework).

Endpoints (``docs/openapi.json``):

==========================  =========================================================
``POST /v1/exportkey``      EXPORTKEY: KLP1 TLV bytes (``application/octet-stream``) or
                            JSON with hex fields; answers the IMPORTKEY data (same form)
``POST /v1/receipts``       the unit's receipt (JSON); verified by the authority, then
                            recorded in the ledger
``GET /v1/health``          readiness, for anyone (no client certificate needed)
``GET /v1/metrics``         Prometheus text (clients with ``"metrics": true``)
``GET /openapi.json``       the OpenAPI document, for anyone
==========================  =========================================================

Who asks decides the path. A request is *authorized* when its connection's verified
certificate (the ASGI TLS extension, set by :mod:`.server`) has the clientAuth extended
key usage, is not on the policy's deny list, and names a client of the policy. Anything
else — no certificate (401), an unauthorized or revoked one (403), and the public routes
for everyone — is limited per address (429) and audited in aggregate, one record per
address and minute (:mod:`.guard`), so an anonymous client costs no commit and a bounded
amount of disk.

An authorized request, in order: request head size (431), route (404, 405), body size
(413, before reading when Content-Length says so, else while reading) and time (408) —
on the event loop — then, in a batch of :class:`~.commit.GroupCommit`: the
per-client rate limit (429; a receipt of the client's own export is never limited) ->
media type (415) -> strict parsing (400, with SW 6A80) -> policy on set and REF1 (403)
-> per-unit rate limit, keyed by (set, SN) (429) -> replay cache claim of (SN, R) (409)
-> the authority (its status word in the problem) -> the export recorded -> an audit
record -> the batch's commit -> the response. Suite 0x03 (identity sets) claims its
challenge inside the authority's checks, after the unit's certificate, signature and
registration (:mod:`.exchanges`). The event loop never waits for a
database: a lock held elsewhere answers 503 after the busy timeout (:mod:`.commit`).

The app in parts: this module routes, limits, audits and answers; :mod:`.identity` says
who asks, :mod:`.requests` reads what they send (strictly), :mod:`.exchanges` runs
EXPORTKEY and receipts.

Every answer the service sends is ``application/problem+json`` when it is a refusal
(:mod:`.problems`; the server's own answers too: :mod:`.server`) and is counted in
``/v1/metrics``; an unexpected error is a 500 problem with no detail and is logged by
class name only: no traceback, no values, ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import StoreError
from ..units.authority import Authority
from . import problems as P
from .commit import Busy, GroupCommit
from .exchanges import KeyRoutes
from .guard import AnonymousAudit, ConnectionLimits, Connections, Doorway, peer_of
from .identity import Identities
from .metrics import Metrics, commit_metrics, connection_metrics
from .openapi import openapi_document
from .policy import ClientRule, Policy
from .rates import MemoryRates
from .requests import (
    JSON,
    Answer,
    Receive,
    Req,
    Scope,
    Send,
    header,
    media_type,
    read_body,
)
from .store import ServiceStore

T = TypeVar("T")

log = logging.getLogger("keyload.service")

MAX_HEAD = 16 * 1024  # request line and headers, bytes (the HTTP parsers bound them too)

ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/exportkey": ("POST",),
    "/v1/receipts": ("POST",),
    "/v1/health": ("GET",),
    "/v1/metrics": ("GET",),
    "/openapi.json": ("GET",),
}
PUBLIC = frozenset({"/v1/health", "/openapi.json"})  # served without a client certificate


def _problem_answer(p: P.Problem, rid: str, req: Req) -> Answer:
    req.detail["problem"] = p.slug
    if p.sw is not None:
        req.detail["sw"] = f"{p.sw:04X}"
    hdrs = [(b"content-type", P.PROBLEM_JSON.encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in p.headers.items()]
    return p.status, hdrs, p.body(rid)


def _state_down(e: StoreError) -> P.Problem:
    if isinstance(e, Busy):
        return P.unavailable("the service's state is busy (a lock is held elsewhere): "
                             "nothing was done; retry", retry_after=2)
    return P.unavailable("the request could not be recorded: nothing was done")


class ServiceApp(KeyRoutes):
    """The ASGI application over one authority, one store and one policy.

    ``limits``: the connection and anonymous-request limits (:mod:`.guard`);
    ``policy_path``: where :meth:`reload_policy` (SIGHUP) reads the policy again;
    ``db_timeout``: how long a request waits for a PostgreSQL batch before a 503."""

    def __init__(self, authority: Authority, store: ServiceStore, policy: Policy, *,
                 instance: str = "keyload", clock: Callable[[], float] = time.time,
                 commits: GroupCommit | None = None,
                 limits: ConnectionLimits | None = None, policy_path: Path | None = None,
                 db_timeout: float = 5.0) -> None:
        self.authority = authority
        self.store = store
        self.policy = policy
        self.commits = commits
        self.instance = instance
        self.clock = clock
        self.limits = limits or ConnectionLimits()
        self.policy_path = policy_path
        self.db_timeout = db_timeout
        self.metrics = Metrics()
        self.connections = Connections(self.limits)
        self.doorway = Doorway(self.limits)
        self.anonymous = AnonymousAudit()
        self.after_reload: Callable[[], None] | None = None  # e.g. tell the workers
        self._peer_rates = MemoryRates()
        self.identities = Identities()
        self._openapi = json.dumps(openapi_document(), indent=1).encode()
        self._flusher: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once started
        self._background: set[asyncio.Task[Any]] = set()

    # -- ASGI entry ----------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        rid = os.urandom(8).hex()
        client = scope.get("client") or (None, None)
        req = Req(str(scope.get("method", "")), str(scope.get("path", "")),
                   peer_of(client[0]))
        route = req.path if req.path in ROUTES else "other"
        status, headers, body = await self._handle(scope, receive, req, rid, route)
        self.metrics.observe(route, status, time.perf_counter() - t0)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store"),
                                (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive, req: Req, rid: str,
                      route: str) -> Answer:
        """Who asks decides the path: a client the policy authorizes gets one audit
        record per request, written in the batch of its work; anyone else
        (and the public routes) is limited per address and audited in aggregate."""
        try:
            rule: ClientRule | None = self._client(scope, req)
            refusal: P.Problem | None = None
        except P.Problem as p:
            rule, refusal = None, p
        if rule is None or req.path in PUBLIC:
            ans = await self._public(scope, req, rid, refusal)
            self.anonymous.note(req.peer, route, ans[0], client=req.client)
            return ans
        try:
            self._check_head(scope, req)
            body = None if req.path == "/v1/metrics" else await read_body(
                scope, receive, self.policy.limits.max_body, self.limits.body_timeout)
            early: P.Problem | None = None
        except P.Problem as p:
            body, early = None, p
        ctype = media_type(header(scope, b"content-type"))

        def work() -> Answer:
            return self._authorized(rule, body, ctype, early, req, rid, route)

        try:
            return await self._db(work)
        except StoreError as e:  # the batch failed, or the audit record could not be written
            log.error("request not recorded: %s", e.__class__.__name__)
            self.metrics.count("state_busy" if isinstance(e, Busy) else "state_error")
            return _problem_answer(_state_down(e), rid, req)

    async def _db(self, fn: Callable[[], T], *, timeout: float | None = None) -> T:
        """``fn`` in a batch (on its own, committed statement by statement, without
        group commit)."""
        if self.commits is None:
            return fn()
        return await self.commits.run(fn, timeout=timeout or self.db_timeout)

    # -- anonymous clients and public routes ------------------------------------------
    async def _public(self, scope: Scope, req: Req, rid: str,
                      refusal: P.Problem | None) -> Answer:
        try:
            rate = self.limits.anonymous_rate
            now = time.monotonic()
            if not self._peer_rates.hit(req.peer, rate, now):
                self.metrics.count("rate_limited_anonymous")
                raise P.too_many("rate limit for requests without an authorized client "
                                 "certificate", self._peer_rates.retry_after(req.peer, rate, now))
            self._check_head(scope, req)
            if req.path == "/v1/health":
                return await self._health(req)
            if req.path == "/openapi.json":
                return 200, [(b"content-type", JSON.encode())], self._openapi
            assert refusal is not None
            raise refusal
        except P.Problem as p:
            return _problem_answer(p, rid, req)

    def _check_head(self, scope: Scope, req: Req) -> None:
        head = len(req.path) + len(scope.get("query_string", b"")) + sum(
            len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if head > MAX_HEAD:
            raise P.Problem(431, "head-too-large", "request header fields too large",
                            f"the request line and headers must be at most {MAX_HEAD} bytes")
        allowed = ROUTES.get(req.path)
        if allowed is None:
            raise P.not_found()
        if req.method not in allowed:
            raise P.Problem(405, "method-not-allowed", "method not allowed",
                            f"{req.path} accepts {', '.join(allowed)}",
                            headers={"Allow": ", ".join(allowed)})

    async def _health(self, req: Req) -> Answer:
        """Up only when the state can be written (the probe runs in a batch: a lock
        held elsewhere shows as ``busy``) and the authority answers."""
        seen: dict[str, str] = {}  # what the probe saw, even if its batch then fails

        def probe() -> dict[str, str]:
            checks = seen
            for name, fn in (("state", self.store.ping),
                             ("authority", self.authority.capabilities)):
                try:
                    fn()
                    checks[name] = "ok"
                except Exception as e:  # a failed probe is the answer, not an error
                    log.error("health: %s unavailable (%s)", name, e.__class__.__name__)
                    checks[name] = "busy" if isinstance(e, Busy) else "unavailable"
            return checks

        try:
            checks = await self._db(probe, timeout=min(self.db_timeout, 3.0))
        except StoreError as e:  # the batch could not begin or commit
            checks = {"authority": "unknown", **seen}
            if isinstance(e, Busy) or seen.get("state") == "busy":
                checks["state"] = "busy"
            else:
                checks["state"] = "unavailable"
        down = sorted(k for k, v in checks.items() if v not in ("ok", "unknown"))
        if down:
            req.detail["down"] = down
            what = ", ".join(k if checks[k] == "unavailable" else f"{k} ({checks[k]})"
                             for k in down)
            raise P.Problem(503, "unavailable", "service temporarily unavailable",
                            f"not available: {what}", headers={"Retry-After": "1"})
        return 200, [(b"content-type", JSON.encode())], json.dumps(
            {"status": "ok", "instance": self.instance, "checks": checks}).encode()

    # -- identity --------------------------------------------------------------------
    def _client(self, scope: Scope, req: Req) -> ClientRule:
        """The rule for the request's connection, or the refusal (401, 403) (:mod:`.identity`)."""
        return self.identities.rule(scope.get("extensions", {}).get("tls"), self.policy, req)

    def authorized_client(self, tls: dict[str, Any] | None) -> str | None:
        """The policy's name for a connection's verified certificate, or None (for the
        connection limits: the requests themselves are checked one by one)."""
        try:
            return self.identities.rule(tls, self.policy, None).name
        except P.Problem:
            return None

    # -- an authorized client's request, in a batch ---------------------------------------
    def _authorized(self, rule: ClientRule, body: bytes | None, ctype: str,
                    early: P.Problem | None, req: Req, rid: str, route: str) -> Answer:
        """The request's work and its audit record, in one batch."""
        try:
            if early is not None:
                raise early
            ans = self._route(rule, body, ctype, req)
        except P.Problem as p:
            ans = _problem_answer(p, rid, req)
        except StoreError as e:
            log.error("service state error: %s", e.__class__.__name__)
            ans = _problem_answer(_state_down(e), rid, req)
        except Exception as e:  # the one place: no traceback, no values leave
            log.error("internal error: %s", e.__class__.__name__)
            ans = _problem_answer(P.Problem(500, "internal", "internal error",
                                            "internal error"), rid, req)
        self.store.append("request", {
            "id": rid, "instance": self.instance, "client": req.client,
            "method": req.method[:16], "route": route, "status": ans[0], **req.detail})
        return ans

    def _route(self, rule: ClientRule, body: bytes | None, ctype: str, req: Req) -> Answer:
        if req.path == "/v1/receipts":
            assert body is not None
            return self._receipt(rule, body, ctype, req)  # limited unless its own export
        self._limit_client(rule)
        if req.path == "/v1/metrics":
            if not rule.metrics:
                raise P.Problem(403, "forbidden", "not authorized for metrics")
            return 200, [(b"content-type", b"text/plain; version=0.0.4")], \
                self._render_metrics().encode()
        assert body is not None
        return self._export(rule, body, ctype, req)

    def _render_metrics(self) -> str:
        text = self.metrics.render(self.instance)
        if self.commits is not None:
            text += commit_metrics(self.instance, self.commits)
        return text + connection_metrics(self.instance, {
            **self.connections.counts(), "refused_before_tls": self.doorway.refused})

    # -- policy ------------------------------------------------------------------------
    def reload_policy(self) -> bool:
        """Read the policy file again (SIGHUP). A file that does not parse leaves the
        policy in force unchanged; either way the attempt is audited."""
        if self.policy_path is None:
            return False
        if self.after_reload is not None:  # the workers read the file themselves
            self.after_reload()
        try:
            new = Policy.load(self.policy_path)
        except (OSError, ValueError) as e:
            why = str(e).replace(str(self.policy_path), self.policy_path.name)
            log.error("policy reload refused: %s", why)
            self._audit_soon("policy-reload-refused", {
                "file": self.policy_path.name, "error": " ".join(why.split())[:300]})
            return False
        old, self.policy = self.policy, new
        log.warning("policy reloaded: %d clients, %d denied certificates", len(new.clients),
                    len(new.deny_sha256) + len(new.deny_serials))
        self._audit_soon("policy-reload", {"file": self.policy_path.name, **new.summary(),
                                           "previous_clients": len(old.clients)})
        return True

    def _policy_file_changed(self) -> bool:
        """The policy file is no longer the policy in force (read from it, by digest)."""
        if self.policy_path is None or self.policy.sha256 is None:
            return False
        try:
            data = self.policy_path.read_bytes()
        except OSError:
            return True  # the reload says why, and is audited
        return hashlib.sha256(data).hexdigest() != self.policy.sha256

    def _audit_soon(self, action: str, detail: dict[str, Any]) -> None:
        """An audit record from the event loop, without waiting for it."""
        async def write() -> None:
            try:
                await self._db(lambda: self.store.append(action, detail))
            except Exception as e:
                log.error("audit record %s failed: %s", action, e.__class__.__name__)

        t = asyncio.get_running_loop().create_task(write())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def note_connection(self, peer: str, status: int, *, client: str | None = None) -> None:
        """An answer the server gave on its own (a malformed head, a timeout, a refused
        connection): counted in the metrics and in the address's audit record."""
        self.metrics.observe("connection", status, 0.0)
        self.anonymous.note(peer, "connection", status, client=client)

    async def flush_anonymous(self, *, everything: bool = False) -> int:
        """Write the aggregated records of the minutes that are over."""
        records = self.anonymous.due(everything=everything)
        if not records:
            return 0

        def write() -> None:
            for rec in records:
                self.store.append("requests-anonymous", {"instance": self.instance, **rec})

        await self._db(write)
        return len(records)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.flush_anonymous()
            except Exception as e:  # kept for the next round
                log.error("anonymous audit records: %s", e.__class__.__name__)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                self.loop = loop
                self._flusher = loop.create_task(self._flush_loop())
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.add_signal_handler(signal.SIGHUP, self.reload_policy)
                # SIGHUP was ignored until now: a reload sent while this process started is
                # taken here, from the file itself (each worker checks at its own start;
                # the first process, which passes SIGHUP on, tells the workers again)
                if self._policy_file_changed():
                    self.reload_policy()
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                if self._flusher is not None:
                    self._flusher.cancel()
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.remove_signal_handler(signal.SIGHUP)
                try:
                    await self.flush_anonymous(everything=True)
                except Exception as e:
                    log.error("anonymous audit records: %s", e.__class__.__name__)
                await send({"type": "lifespan.shutdown.complete"})
                return

__all__ = ["ROUTES", "ServiceApp"]
