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
record -> the batch's commit -> the response. The event loop never waits for a
database: a lock held elsewhere answers 503 after the busy timeout (:mod:`.commit`).

Every answer the service sends is ``application/problem+json`` when it is a refusal
(:mod:`.problems`; the server's own answers too: :mod:`.server`) and is counted in
``/v1/metrics``; an unexpected error is a 500 problem with no detail and is logged by
class name only: no traceback, no values, ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..core import messages as msg
from ..core.errors import SW, StatusError, StoreError
from ..core.keys import KeyHeader
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..units.authority import Authority
from . import problems as P
from .commit import Busy, GroupCommit
from .guard import AnonymousAudit, ConnectionLimits, Connections, Doorway, peer_of
from .metrics import Metrics, commit_metrics
from .openapi import openapi_document
from .pki import fingerprint
from .policy import ClientRule, Policy
from .rates import MemoryRates
from .store import (
    EXPORTED,
    RATE_LIMITED,
    RECEIPTED,
    REPLAYED,
    Challenge,
    ServiceStore,
)

T = TypeVar("T")

log = logging.getLogger("keyload.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OCTETS = "application/octet-stream"
JSON = "application/json"
_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")
MAX_HEAD = 16 * 1024  # request line and headers, bytes (the HTTP parsers bound them too)

ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/exportkey": ("POST",),
    "/v1/receipts": ("POST",),
    "/v1/health": ("GET",),
    "/v1/metrics": ("GET",),
    "/openapi.json": ("GET",),
}
PUBLIC = frozenset({"/v1/health", "/openapi.json"})  # served without a client certificate


@dataclass(frozen=True, slots=True)
class ClientId:
    """A client as its verified certificate names it."""

    cn: str
    sha256: str
    serial: int
    client_auth: bool  # the certificate's extended key usage includes clientAuth


@dataclass
class _Req:
    """What one request accumulates for its audit record (never key material)."""

    method: str
    path: str
    peer: str
    client: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _hex(d: dict[str, Any], key: str, lo: int, hi: int) -> bytes:
    v = d.get(key)
    if not isinstance(v, str) or not _HEX.match(v) or len(v) % 2:
        raise P.malformed(f"'{key}' must be a string of hex digits")
    b = bytes.fromhex(v)
    if not lo <= len(b) <= hi:
        raise P.malformed(f"'{key}' must be {lo} bytes" if lo == hi else
                          f"'{key}' must be {lo} to {hi} bytes")
    return b


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A JSON-Schema integer: ``126`` or ``126.0`` (a number whose value is integral)."""
    v = d.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise P.malformed(f"'{key}' must be an integer in {lo}..{hi}")
    return v


def _json_object(body: bytes, keys: set[str]) -> dict[str, Any]:
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


def _problem_answer(p: P.Problem, rid: str, req: _Req) -> Answer:
    req.detail["problem"] = p.slug
    if p.sw is not None:
        req.detail["sw"] = f"{p.sw:04X}"
    hdrs = [(b"content-type", P.PROBLEM_JSON.encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in p.headers.items()]
    return p.status, hdrs, p.body(f"urn:keyload:request:{rid}")


def _state_down(e: StoreError) -> P.Problem:
    if isinstance(e, Busy):
        return P.unavailable("the service's state is busy (a lock is held elsewhere): "
                             "nothing was done; retry", retry_after=2)
    return P.unavailable("the request could not be recorded: nothing was done")


class ServiceApp:
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
        self._ids: dict[str, ClientId | None] = {}
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
        req = _Req(str(scope.get("method", "")), str(scope.get("path", "")),
                   peer_of(client[0]))
        route = req.path if req.path in ROUTES else "other"
        status, headers, body = await self._handle(scope, receive, req, rid, route)
        self.metrics.observe(route, status, time.perf_counter() - t0)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store"),
                                (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive, req: _Req, rid: str,
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
            body = None if req.path == "/v1/metrics" else await self._body(scope, receive)
            early: P.Problem | None = None
        except P.Problem as p:
            body, early = None, p
        ctype = _media_type(_header(scope, b"content-type"))

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
    async def _public(self, scope: Scope, req: _Req, rid: str,
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

    def _check_head(self, scope: Scope, req: _Req) -> None:
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

    async def _health(self, req: _Req) -> Answer:
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
    def _client(self, scope: Scope, req: _Req) -> ClientRule:
        return self._rule(scope.get("extensions", {}).get("tls"), req)

    def authorized_client(self, tls: dict[str, Any] | None) -> str | None:
        """The policy's name for a connection's verified certificate, or None (for the
        connection limits: the requests themselves are checked one by one)."""
        try:
            return self._rule(tls, None).name
        except P.Problem:
            return None

    def _rule(self, tls: dict[str, Any] | None, req: _Req | None) -> ClientRule:
        """The policy's rule for a verified certificate, or the refusal (401, 403)."""
        chain = (tls or {}).get("client_cert_chain") or []
        if not chain:
            raise P.unauthenticated()
        cid = self._identity(str(chain[0]))
        if cid is None:
            raise P.unauthenticated("the client certificate must name exactly one CN")
        if req is not None:
            req.client = cid.cn
        if not cid.client_auth:
            raise P.unauthenticated("the client certificate is not for client "
                                    "authentication (no clientAuth extended key usage)")
        policy = self.policy
        if policy.revoked(cid.sha256, cid.serial):
            raise P.client_revoked()
        rule = policy.client(cid.cn, cid.sha256)
        if rule is None:
            raise P.forbidden_client()
        return rule

    def _identity(self, pem: str) -> ClientId | None:
        if pem in self._ids:
            return self._ids[pem]
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
            except x509.ExtensionNotFound:
                client_auth = False
            cid = ClientId(str(cns[0].value), fingerprint(pem.encode()), cert.serial_number,
                           client_auth) if len(cns) == 1 else None
        except (ValueError, IndexError):
            cid = None
        if len(self._ids) > 4096:
            self._ids.clear()
        self._ids[pem] = cid
        return cid

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.policy.limits.max_body
        cl = _header(scope, b"content-length")
        if cl is not None:
            if not cl.isdigit():
                raise P.malformed("bad Content-Length", sw=False)
            if int(cl) > limit:
                raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    m = await receive()
                    if m["type"] == "http.disconnect":
                        raise P.malformed("client disconnected", sw=False)
                    chunk = bytes(m.get("body", b""))
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
                    if not m.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise P.timeout("request body", self.limits.body_timeout) from None

    # -- an authorized client's request, in a batch ---------------------------------------
    def _authorized(self, rule: ClientRule, body: bytes | None, ctype: str,
                    early: P.Problem | None, req: _Req, rid: str, route: str) -> Answer:
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
            req.detail["problem"] = "internal"
            bug = P.Problem(500, "internal", "internal error", "internal error")
            ans = 500, [(b"content-type", P.PROBLEM_JSON.encode())], \
                bug.body(f"urn:keyload:request:{rid}")
        self.store.append("request", {
            "id": rid, "instance": self.instance, "client": req.client,
            "method": req.method[:16], "route": route, "status": ans[0], **req.detail})
        return ans

    def _route(self, rule: ClientRule, body: bytes | None, ctype: str, req: _Req) -> Answer:
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

    def _limit_client(self, rule: ClientRule) -> None:
        rate = rule.per_client or self.policy.limits.per_client
        key, now = f"client:{rule.name}", self.clock()
        if not self.store.hit(key, rate, now):
            self.metrics.count("rate_limited")
            raise P.too_many("per-client rate limit", self.store.retry_after(key, rate, now))

    def _render_metrics(self) -> str:
        text = self.metrics.render(self.instance)
        if self.commits is not None:
            text += commit_metrics(self.instance, self.commits)
        conns = {**self.connections.counts(), "refused_before_tls": self.doorway.refused}
        text += ("# HELP keyload_connections Open connections by pool; refused and evicted "
                 "since start.\n# TYPE keyload_connections gauge\n")
        for k, v in conns.items():
            text += f'keyload_connections{{instance="{self.instance}",kind="{k}"}} {v}\n'
        return text

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

    # -- EXPORTKEY -----------------------------------------------------------------
    def _export(self, rule: ClientRule, body: bytes, ctype: str,
                req: _Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if ctype == OCTETS:
            try:
                er = msg.ExportRequest.decode(body)
            except StatusError as e:
                raise P.malformed(e.detail) from None
        elif ctype == JSON:
            d = _json_object(body, {"sn", "r", "set_id", "suite", "ref1", "ref2"})
            er = msg.ExportRequest(_hex(d, "sn", 1, 32), _hex(d, "r", 16, 16),
                                   _hex(d, "set_id", 5, 5), _int(d, "suite", 0, 255),
                                   _hex(d, "ref1", 1, 32), _int(d, "ref2", 1, 254))
        else:
            raise _unsupported_media((OCTETS, JSON))
        req.detail.update({"sn": er.sn.hex(), "set_id": er.set_id.hex(),
                           "ref1": display_ref1(er.ref1), "ref2": er.ref2})
        if not rule.allows_set(er.set_id):
            raise P.Problem(403, "set-not-authorized", "set not authorized",
                            "this client may not request keys for this set")
        if not rule.allows_ref1(er.ref1):
            raise P.Problem(403, "ref1-not-authorized", "REF1 not authorized",
                            "this client may not request this key")
        now = self.clock()
        rate = self.policy.limits.per_sn
        ch = Challenge(er.sn, er.r, rule.name, er.set_id, er.ref1, er.ref2, er.suite)
        # a unit is (set, SN): a client allowed one set cannot spend another set's units'
        # allowance by naming their SNs under its own set
        key = f"sn:{er.set_id.hex()}:{er.sn.hex()}"
        verdict = self.store.admit(key, rate, ch, now)
        if verdict == RATE_LIMITED:
            self.metrics.count("rate_limited")
            raise P.too_many("per-SN rate limit", self.store.retry_after(key, rate, now))
        if verdict == REPLAYED:
            self.metrics.count("replay_refused")
            raise P.Problem(409, "replay", "challenge already used",
                            "this (SN, R) was already presented: INITIALIZE DOWNLOAD again")
        try:
            resp = self.authority.export_request(er)
        except StatusError as e:
            self.store.refused(er.sn, er.r, f"{e.code:04X}")
            self.metrics.count("export_refused")
            raise P.from_status_error(e) from None
        h = resp.header or msg.ImportData.decode(resp.import_data).h
        version = KeyHeader.decode(h).version
        self.store.exported(er.sn, er.r, h, resp.kcv, version)
        self.metrics.count("exported")
        req.detail.update({"suite": er.suite, "key_version": version, "kcv": resp.kcv.hex()})
        if ctype == OCTETS:
            return 200, [(b"content-type", OCTETS.encode())], resp.encode()
        return 200, [(b"content-type", JSON.encode())], json.dumps({
            "import_data": resp.import_data.hex(), "kcv": resp.kcv.hex(), "header": h.hex(),
            "ref2": er.ref2, "suite": er.suite, "key_version": version}).encode()

    # -- receipts ------------------------------------------------------------------
    def _receipt(self, rule: ClientRule, body: bytes, ctype: str,
                 req: _Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        # receipts of the client's own exports are evidence and never rate limited;
        # anything else (malformed, or no export of this client) counts against its limit
        try:
            if ctype != JSON:
                raise _unsupported_media((JSON,))
            d = _json_object(body, {"sn", "r", "ref2", "kcv", "rct"})
            sn, r = _hex(d, "sn", 1, 32), _hex(d, "r", 16, 16)
            ref2, kcv = _int(d, "ref2", 1, 254), _hex(d, "kcv", 5, 5)
            rct = _hex(d, "rct", 16, 16)
        except P.Problem:
            self._limit_client(rule)
            raise
        req.detail.update({"sn": sn.hex(), "ref2": ref2})
        c = self.store.challenge(sn, r)
        if c is None or c.client != rule.name:  # another client's exports are not seen
            self._limit_client(rule)
            raise P.Problem(404, "unknown-export", "no such export",
                            "no key was exported to this client for this (SN, R)")
        if c.state == RECEIPTED:  # the same receipt again (a retry) is answered again
            stored = self.store.receipt_of(sn, r)
            if stored is None or not ct_equal(stored, rct) or ref2 != c.ref2 or \
                    c.kcv is None or not ct_equal(kcv, c.kcv):
                raise P.Problem(409, "receipt-recorded", "receipt already recorded",
                                "another receipt is recorded for this challenge")
            req.detail.update({"key_version": c.key_version, "kcv": kcv.hex(),
                               "ledger": True, "again": True})
            return 200, [(b"content-type", JSON.encode())], _recorded(c, sn, ref2, kcv)
        if c.state != EXPORTED or c.header is None or c.kcv is None:
            raise P.Problem(409, "not-exported", "nothing was exported for this challenge")
        req.detail.update({"set_id": c.set_id.hex(), "ref1": display_ref1(c.ref1)})
        if ref2 != c.ref2:
            raise P.Problem(422, "mismatch", "receipt does not match the export",
                            "REF2 differs from the exported one")
        if not ct_equal(kcv, c.kcv):
            self.metrics.count("receipt_invalid")
            raise P.Problem(422, "kcv-mismatch", "KCV mismatch",
                            "the unit's KCV differs from the authority's")
        try:
            self.authority.verify_receipt(suite=c.suite, set_id=c.set_id, sn=sn, r=r,
                                          ref2=ref2, h=c.header, kcv=kcv, rct=rct)
        except StatusError as e:
            self.metrics.count("receipt_invalid")
            raise P.Problem(422, "receipt-invalid", "receipt invalid",
                            "the authority does not recognize this receipt",
                            sw=int(SW.INTEGRITY)) from e
        if not self.store.add_receipt(c, rct, self.clock()):
            raise P.Problem(409, "receipt-recorded", "receipt already recorded")
        self.metrics.count("receipt_recorded")
        req.detail.update({"key_version": c.key_version, "kcv": kcv.hex(), "ledger": True})
        return 201, [(b"content-type", JSON.encode())], _recorded(c, sn, ref2, kcv)


def _recorded(c: Challenge, sn: bytes, ref2: int, kcv: bytes) -> bytes:
    return json.dumps({
        "status": "recorded", "sn": sn.hex(), "set_id": c.set_id.hex(),
        "ref1": display_ref1(c.ref1), "ref2": ref2, "key_version": c.key_version,
        "kcv": kcv.hex()}).encode()


def _too_large(limit: int) -> P.Problem:
    return P.Problem(413, "too-large", "request body too large",
                     f"the body must be at most {limit} bytes")


def _unsupported_media(accepted: tuple[str, ...]) -> P.Problem:
    return P.Problem(415, "unsupported-media-type", "unsupported media type",
                     f"send {' or '.join(accepted)}")


__all__ = ["ROUTES", "ServiceApp"]
