"""The remote-download service as a plain ASGI 3 application (no framework).

Endpoints (``docs/openapi.json``):

==========================  =========================================================
``POST /v1/exportkey``      EXPORTKEY: KLP1 TLV bytes (``application/octet-stream``) or
                            JSON with hex fields; answers the IMPORTKEY data (same form)
``POST /v1/receipts``       the unit's receipt (JSON); verified by the authority, then
                            recorded in the ledger
``GET /v1/health``          liveness (no client certificate needed)
``GET /v1/metrics``         Prometheus text (clients with ``"metrics": true``)
``GET /openapi.json``       the OpenAPI document
==========================  =========================================================

What each request goes through, in order: client identity from the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, set by :mod:`.server` from the
verified TLS session) -> policy lookup (401 without a certificate, 403 when its CN or
pin is not in the policy) -> body size limit (413, before reading when Content-Length
says so, else while reading) -> per-client rate limit (429) -> media type (415)
-> strict parsing (400, with SW 6A80) -> policy on set and REF1 (403) -> per-SN rate
limit (429) -> replay cache claim of (SN, R) (409) -> the authority (its status word
in the problem) -> the export recorded -> an audit record -> the commit -> the response.

The writes of a request happen after its last ``await`` (the body), in the batch of
:class:`~.commit.GroupCommit` when the app has one; the response waits for the commit.

Every refusal is ``application/problem+json`` (:mod:`.problems`); an unexpected error
is a 500 problem with no detail and is logged by class name only: no traceback, no
values, ever. The handlers are synchronous and short (the authority's cryptography, a
few indexed writes): they run on the event loop, one at a time per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..core import messages as msg
from ..core.errors import SW, KeyloadError, StatusError, StoreError
from ..core.keys import KeyHeader
from ..core.primitives import ct_equal
from ..units.authority import Authority
from ..units.keystore import display_ref1
from . import problems as P
from .commit import GroupCommit
from .openapi import openapi_document
from .pki import fingerprint
from .policy import ClientRule, Policy
from .store import EXPORTED, RATE_LIMITED, RECEIPTED, REPLAYED, Challenge, ServiceStore

log = logging.getLogger("keyload.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OCTETS = "application/octet-stream"
JSON = "application/json"
_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")
MAX_HEAD = 16 * 1024  # request line and headers, bytes (the HTTP parsers bound them too)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/exportkey": ("POST",),
    "/v1/receipts": ("POST",),
    "/v1/health": ("GET",),
    "/v1/metrics": ("GET",),
    "/openapi.json": ("GET",),
}


@dataclass(frozen=True, slots=True)
class ClientId:
    """A client as its verified certificate names it."""

    cn: str
    sha256: str


@dataclass
class Metrics:
    """Per-process counters (each instance is scraped on its own)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        k = (route, status)
        self.requests[k] = self.requests.get(k, 0) + 1
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def render(self, instance: str) -> str:
        out = ["# HELP keyload_requests_total HTTP requests by route and status.",
               "# TYPE keyload_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'keyload_requests_total{{instance="{instance}",route="{route}",'
                       f'status="{status}"}} {n}')
        out += ["# HELP keyload_events_total Exports, receipts, replays, rate limits.",
                "# TYPE keyload_events_total counter"]
        for ev, n in sorted(self.events.items()):
            out.append(f'keyload_events_total{{instance="{instance}",event="{ev}"}} {n}')
        out += ["# HELP keyload_request_seconds Time to answer a request.",
                "# TYPE keyload_request_seconds histogram"]
        acc = 0
        for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.buckets, strict=True):
            acc += n
            out.append(f'keyload_request_seconds_bucket{{instance="{instance}",le="{le}"}} '
                       f'{acc}')
        out.append(f'keyload_request_seconds_sum{{instance="{instance}"}} '
                   f'{self.latency_sum:.6f}')
        out.append(f'keyload_request_seconds_count{{instance="{instance}"}} '
                   f'{self.latency_count}')
        return "\n".join(out) + "\n"


@dataclass
class _Req:
    """What one request accumulates for its audit record (never key material)."""

    method: str
    path: str
    client: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    tx: asyncio.Future[None] | None = None  # the batch its writes are in


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
    v = d.get(key)
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


class ServiceApp:
    """The ASGI application over one authority, one store and one policy."""

    def __init__(self, authority: Authority, store: ServiceStore, policy: Policy, *,
                 instance: str = "keyload", clock: Callable[[], float] = time.time,
                 commits: GroupCommit | None = None) -> None:
        self.authority = authority
        self.store = store
        self.policy = policy
        self.commits = commits
        self.instance = instance
        self.clock = clock
        self.metrics = Metrics()
        self._ids: dict[str, ClientId | None] = {}
        self._openapi = json.dumps(openapi_document(), indent=1).encode()

    # -- ASGI entry ----------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        rid = os.urandom(8).hex()
        req = _Req(str(scope.get("method", "")), str(scope.get("path", "")))
        route = req.path if req.path in ROUTES else "other"
        status, headers, body = await self._handle(scope, receive, req, rid)
        try:
            self._join(req)
            self.store.append("request", {
                "id": rid, "instance": self.instance, "client": req.client,
                "method": req.method[:16], "route": route, "status": status, **req.detail})
            if req.tx is not None:
                await req.tx
        except KeyloadError as e:  # no audit record: nothing is answered but a 503
            log.error("audit record failed: %s", e.__class__.__name__)
            p = P.Problem(503, "unavailable", "service temporarily unavailable",
                          "the audit record could not be written")
            status, headers, body = p.status, [(b"content-type", P.PROBLEM_JSON.encode()),
                                               (b"retry-after", b"1")], \
                p.body(f"urn:keyload:request:{rid}")
        self.metrics.observe(route, status, time.perf_counter() - t0)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store"),
                                (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _join(self, req: _Req) -> None:
        """Put the request's writes from here on in the open batch (no await may follow
        before its response waits for ``req.tx``)."""
        if self.commits is not None and req.tx is None:
            req.tx = self.commits.join()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive, req: _Req,
                      rid: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        try:
            return await self._route(scope, receive, req)
        except P.Problem as p:
            req.detail["problem"] = p.slug
            if p.sw is not None:
                req.detail["sw"] = f"{p.sw:04X}"
            hdrs = [(b"content-type", P.PROBLEM_JSON.encode())]
            hdrs += [(k.lower().encode(), v.encode()) for k, v in p.headers.items()]
            return p.status, hdrs, p.body(f"urn:keyload:request:{rid}")
        except StoreError as e:
            log.error("service state error: %s", e.__class__.__name__)
            req.detail["problem"] = "unavailable"
            down = P.Problem(503, "unavailable", "service temporarily unavailable")
            return 503, [(b"content-type", P.PROBLEM_JSON.encode()), (b"retry-after", b"1")], \
                down.body(f"urn:keyload:request:{rid}")
        except Exception as e:  # the one place: no traceback, no values leave
            log.error("internal error: %s", e.__class__.__name__)
            req.detail["problem"] = "internal"
            bug = P.Problem(500, "internal", "internal error", "internal error")
            return 500, [(b"content-type", P.PROBLEM_JSON.encode())], \
                bug.body(f"urn:keyload:request:{rid}")

    # -- routing -------------------------------------------------------------------
    async def _route(self, scope: Scope, receive: Receive,
                     req: _Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        head = len(req.path) + len(scope.get("query_string", b"")) + sum(
            len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if head > MAX_HEAD:
            raise P.Problem(431, "head-too-large", "request header fields too large",
                            f"the request line and headers must be at most {MAX_HEAD} bytes")
        allowed = ROUTES.get(req.path)
        if allowed is None:
            raise P.NOT_FOUND
        if req.method not in allowed:
            raise P.Problem(405, "method-not-allowed", "method not allowed",
                            f"{req.path} accepts {', '.join(allowed)}",
                            headers={"Allow": ", ".join(allowed)})
        if req.path == "/v1/health":
            return self._health(req)
        if req.path == "/openapi.json":
            return 200, [(b"content-type", JSON.encode())], self._openapi
        rule = self._client(scope, req)
        if req.path == "/v1/metrics":
            if not rule.metrics:
                raise P.Problem(403, "forbidden", "not authorized for metrics")
            text = self.metrics.render(self.instance)
            if self.commits is not None:
                text += _commit_metrics(self.instance, self.commits)
            return 200, [(b"content-type", b"text/plain; version=0.0.4")], text.encode()
        body = await self._body(scope, receive)
        self._join(req)  # the last await is behind: every write below is in one batch
        rate = rule.per_client or self.policy.limits.per_client
        if not self.store.hit(f"client:{rule.name}", rate, self.clock()):
            self.metrics.count("rate_limited")
            raise _too_many("per-client rate limit", rate.window_s)
        ctype = _media_type(_header(scope, b"content-type"))
        if req.path == "/v1/exportkey":
            return self._export(rule, body, ctype, req)
        return self._receipt(rule, body, ctype, req)

    def _health(self, req: _Req) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Up only when the state can be read and the authority answers."""
        checks: dict[str, str] = {}
        for name, probe in (("state", self.store.ping),
                            ("authority", self.authority.capabilities)):
            try:
                probe()
                checks[name] = "ok"
            except Exception as e:  # a failed probe is the answer, not an error
                log.error("health: %s unavailable (%s)", name, e.__class__.__name__)
                checks[name] = "unavailable"
        down = sorted(k for k, v in checks.items() if v != "ok")
        if down:
            req.detail["down"] = down
            raise P.Problem(503, "unavailable", "service temporarily unavailable",
                            f"not available: {', '.join(down)}", headers={"Retry-After": "1"})
        return 200, [(b"content-type", JSON.encode())], json.dumps(
            {"status": "ok", "instance": self.instance, "checks": checks}).encode()

    def _client(self, scope: Scope, req: _Req) -> ClientRule:
        tls = scope.get("extensions", {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        if not chain:
            raise P.UNAUTHENTICATED
        cid = self._identity(str(chain[0]))
        if cid is None:
            raise P.UNAUTHENTICATED
        req.client = cid.cn
        rule = self.policy.client(cid.cn, cid.sha256)
        if rule is None:
            raise P.FORBIDDEN_CLIENT
        return rule

    def _identity(self, pem: str) -> ClientId | None:
        if pem in self._ids:
            return self._ids[pem]
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cid = ClientId(str(cns[0].value), fingerprint(pem.encode())) if len(cns) == 1 \
                else None
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
        verdict = self.store.admit(f"sn:{er.sn.hex()}", rate, ch, now)
        if verdict == RATE_LIMITED:
            self.metrics.count("rate_limited")
            raise _too_many("per-SN rate limit", rate.window_s)
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
        if ctype != JSON:
            raise _unsupported_media((JSON,))
        d = _json_object(body, {"sn", "r", "ref2", "kcv", "rct"})
        sn, r = _hex(d, "sn", 1, 32), _hex(d, "r", 16, 16)
        ref2, kcv, rct = _int(d, "ref2", 1, 254), _hex(d, "kcv", 5, 5), _hex(d, "rct", 16, 16)
        req.detail.update({"sn": sn.hex(), "ref2": ref2})
        c = self.store.challenge(sn, r)
        if c is None or c.client != rule.name:  # another client's exports are not seen
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


def _commit_metrics(instance: str, gc: GroupCommit) -> str:
    return (
        "# HELP keyload_commit_batches_total Group commits (one transaction per database).\n"
        "# TYPE keyload_commit_batches_total counter\n"
        f'keyload_commit_batches_total{{instance="{instance}"}} {gc.batches}\n'
        "# HELP keyload_commit_requests_total Requests whose writes were group-committed.\n"
        "# TYPE keyload_commit_requests_total counter\n"
        f'keyload_commit_requests_total{{instance="{instance}"}} {gc.requests}\n')


def _too_many(what: str, window_s: float) -> P.Problem:
    retry = str(max(1, int(window_s + 0.999)))
    return P.Problem(429, "rate-limited", "too many requests", f"{what} reached",
                     headers={"Retry-After": retry})


def _too_large(limit: int) -> P.Problem:
    return P.Problem(413, "too-large", "request body too large",
                     f"the body must be at most {limit} bytes")


def _unsupported_media(accepted: tuple[str, ...]) -> P.Problem:
    return P.Problem(415, "unsupported-media-type", "unsupported media type",
                     f"send {' or '.join(accepted)}")


__all__ = ["ROUTES", "ServiceApp"]
