"""The two routes that move keys: ``POST /v1/exportkey`` and ``POST /v1/receipts``.

:class:`KeyRoutes` is the part of :class:`~.app.ServiceApp` that runs an authorized
client's EXPORTKEY and receipt inside the request's batch (:mod:`.commit`), in order:
media type (415) -> strict parsing (400, with SW 6A80) -> policy on set and REF1 (403)
-> per-unit rate limit, keyed by (set, SN) (429) -> replay cache claim of (SN, R) (409)
-> the authority (its status word in the problem) -> the export recorded. A receipt of
the client's own export is verified by the authority, then recorded in the ledger, and
is never rate limited; anything else counts against the client's limit.

It reads the app's state as it is at each request (the policy is replaced on reload).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..core import messages as msg
from ..core.errors import SW, StatusError
from ..core.keys import KeyHeader
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..units.authority import Authority
from . import problems as P
from .metrics import Metrics
from .policy import ClientRule, Policy
from .requests import (
    JSON,
    OCTETS,
    Answer,
    Req,
    hex_field,
    int_field,
    json_object,
    unsupported_media,
)
from .store import (
    EXPORTED,
    RATE_LIMITED,
    RECEIPTED,
    REPLAYED,
    Challenge,
    ServiceStore,
)


class KeyRoutes:
    """EXPORTKEY and receipts over the app's authority, store, policy and clock."""

    authority: Authority
    store: ServiceStore
    policy: Policy
    clock: Callable[[], float]
    metrics: Metrics

    def _limit_client(self, rule: ClientRule) -> None:
        rate = rule.per_client or self.policy.limits.per_client
        key, now = f"client:{rule.name}", self.clock()
        if not self.store.hit(key, rate, now):
            self.metrics.count("rate_limited")
            raise P.too_many("per-client rate limit", self.store.retry_after(key, rate, now))

    # -- EXPORTKEY -----------------------------------------------------------------
    def _export(self, rule: ClientRule, body: bytes, ctype: str, req: Req) -> Answer:
        if ctype == OCTETS:
            try:
                er = msg.ExportRequest.decode(body)
            except StatusError as e:
                raise P.malformed(e.detail) from None
        elif ctype == JSON:
            d = json_object(body, {"sn", "r", "set_id", "suite", "ref1", "ref2"})
            er = msg.ExportRequest(hex_field(d, "sn", 1, 32), hex_field(d, "r", 16, 16),
                                   hex_field(d, "set_id", 5, 5), int_field(d, "suite", 0, 255),
                                   hex_field(d, "ref1", 1, 32), int_field(d, "ref2", 1, 254))
        else:
            raise unsupported_media((OCTETS, JSON))
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
    def _receipt(self, rule: ClientRule, body: bytes, ctype: str, req: Req) -> Answer:
        # receipts of the client's own exports are evidence and never rate limited;
        # anything else (malformed, or no export of this client) counts against its limit
        try:
            if ctype != JSON:
                raise unsupported_media((JSON,))
            d = json_object(body, {"sn", "r", "ref2", "kcv", "rct"})
            sn, r = hex_field(d, "sn", 1, 32), hex_field(d, "r", 16, 16)
            ref2, kcv = int_field(d, "ref2", 1, 254), hex_field(d, "kcv", 5, 5)
            rct = hex_field(d, "rct", 16, 16)
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


__all__ = ["KeyRoutes"]
