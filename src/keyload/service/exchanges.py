"""The two routes that move keys: ``POST /v1/exportkey`` and ``POST /v1/receipts``.

:class:`KeyRoutes` is the part of :class:`~.app.ServiceApp` that runs an authorized
client's EXPORTKEY and receipt inside the request's batch (:mod:`.commit`), in order:
media type (415) -> strict parsing (400, with SW 6A80) -> policy on set and REF1 (403)
-> per-unit rate limit, keyed by (set, SN) (429) -> replay cache claim of (SN, R) (409)
-> the authority (its status word in the problem) -> the export recorded. A receipt of
the client's own export is verified by the authority, then recorded in the ledger, and
is never rate limited; anything else counts against the client's limit.

Suite 0x03 (docs/protocol.md §10.4) keeps the authority's order: the authority checks
C_U, sigU and E_U (6982) and the unit's registration (6983) before the challenge is
claimed in the replay cache, which is its register of served challenges (409 with SW
6985), shared by every worker and instance on the state; a refusal after the claim
releases it, so a refused suite-0x03 request records nothing but its audit record. The
export keeps E_A and C_U with R and H, and the unit's ECDSA receipt is verified with that
C_U alone (:func:`~keyload.records.ledger.verify_receipt3`), no authority secret.

It reads the app's state as it is at each request (the policy is replaced on reload).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NoReturn

from ..core import messages as msg
from ..core.ecc import POINT_LEN, SIGNATURE_LEN
from ..core.errors import SW, IntegrityError, NoChallenge, StatusError
from ..core.identity import Certificate
from ..core.keys import KeyHeader
from ..core.messages3 import (
    ExportRequest3,
    ExportResponse3,
    ImportData3,
    decode_export_request,
)
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..core.suite3 import SUITE_ECDH
from ..records.ledger import LedgerEntry, verify_receipt3
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
        full = read_export_request(body, ctype)
        er = full.base if isinstance(full, ExportRequest3) else full
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
        if isinstance(full, ExportRequest3):
            if not self.store.hit(key, rate, now):
                self._per_sn_limited(key, now)
            return self._export3(full, ch, now, ctype, req)
        verdict = self.store.admit(key, rate, ch, now)
        if verdict == RATE_LIMITED:
            self._per_sn_limited(key, now)
        if verdict == REPLAYED:
            raise self._replayed()
        try:
            resp = self.authority.export_request(er)
        except StatusError as e:
            self.store.refused(er.sn, er.r, f"{e.code:04X}")
            self.metrics.count("export_refused")
            raise P.from_status_error(e) from None
        h = resp.header or msg.ImportData.decode(resp.import_data).h
        version = KeyHeader.decode(h).version
        self.store.exported(er.sn, er.r, h, resp.kcv, version)
        return self._exported(er, resp, h, version, ctype, req)

    def _per_sn_limited(self, key: str, now: float) -> NoReturn:
        self.metrics.count("rate_limited")
        raise P.too_many("per-SN rate limit",
                         self.store.retry_after(key, self.policy.limits.per_sn, now))

    def _replayed(self, sw: int | None = None) -> P.Problem:
        self.metrics.count("replay_refused")
        return P.Problem(409, "replay", "challenge already used",
                         "this (SN, R) was already presented: INITIALIZE DOWNLOAD again",
                         sw=sw)

    def _exported(self, er: msg.ExportRequest, resp: msg.ExportResponse | ExportResponse3,
                  h: bytes, version: int, ctype: str, req: Req) -> Answer:
        self.metrics.count("exported")
        req.detail.update({"suite": er.suite, "key_version": version, "kcv": resp.kcv.hex()})
        if ctype == OCTETS:
            return 200, [(b"content-type", OCTETS.encode())], resp.encode()
        return 200, [(b"content-type", JSON.encode())], json.dumps({
            "import_data": resp.import_data.hex(), "kcv": resp.kcv.hex(), "header": h.hex(),
            "ref2": er.ref2, "suite": er.suite, "key_version": version}).encode()

    def _export3(self, full: ExportRequest3, ch: Challenge, now: float, ctype: str,
                 req: Req) -> Answer:
        """Suite 0x03 (docs/protocol.md §10.4): the authority checks C_U, sigU and E_U
        (6982), then the unit's registration (6983), then claims (set id, SN, R) in this
        store, the register of served challenges every instance shares (409 with 6985),
        then REF1 and policy. A refusal records nothing: the claim is released."""
        er = full.base
        try:
            resp = self.authority.export_request3(full, served=_StoreServed(self.store, ch, now))
        except NoChallenge:
            raise self._replayed(int(SW.NO_CHALLENGE)) from None
        except StatusError as e:
            self.metrics.count("export_refused")
            raise P.from_status_error(e) from None
        data = ImportData3.decode(resp.import_data)
        version = KeyHeader.decode(data.h).version
        self.store.exported(er.sn, er.r, data.h, resp.kcv, version, e_a=data.e_a,
                            c_u=full.c_u.encode())
        return self._exported(er, resp, data.h, version, ctype, req)

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
            rct = hex_field(d, "rct", 16, SIGNATURE_LEN)
            if len(rct) not in (16, SIGNATURE_LEN):
                raise P.malformed(f"'rct' must be 16 bytes (suites 0x01, 0x02) or "
                                  f"{SIGNATURE_LEN} (suite 0x03)")
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
            if c.suite == SUITE_ECDH:  # the unit's signature, under the C_U it presented
                if not verify_receipt3(LedgerEntry(
                        "service", None, c.ref1, c.key_version, c.suite, c.set_id, sn, r,
                        ref2, c.header, kcv, rct, client=c.client, e_a=c.e_a, c_u=c.c_u),
                        q_ca=self.authority.q_ca(c.set_id)):
                    raise IntegrityError()
            else:
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


class _StoreServed:
    """The authority's register of served challenges (docs/protocol.md §10.4) as the
    store's replay cache: a claim is this challenge's row; a released claim is gone."""

    def __init__(self, store: ServiceStore, ch: Challenge, now: float) -> None:
        self.store, self.ch, self.now = store, ch, now

    def claim(self, set_id: bytes, sn: bytes, r: bytes) -> bool:
        assert (set_id, sn, r) == (self.ch.set_id, self.ch.sn, self.ch.r)
        return self.store.claim(self.ch, self.now)

    def release(self, set_id: bytes, sn: bytes, r: bytes) -> None:
        self.store.release(sn, r)


def read_export_request(body: bytes, ctype: str) -> msg.ExportRequest | ExportRequest3:
    """EXPORTKEY as a client sends it: the KLP1 TLV bytes (``application/octet-stream``;
    either shape, docs/protocol.md §10.4) or JSON with hex fields (suite 0x03 adds
    ``e_u``, ``c_u`` — the encoded certificate ``E1 …`` — and ``sig_u``); else 400/415."""
    if ctype == OCTETS:
        try:
            return decode_export_request(body)
        except StatusError as e:
            raise P.malformed(e.detail) from None
    if ctype != JSON:
        raise unsupported_media((OCTETS, JSON))
    base_keys = {"sn", "r", "set_id", "suite", "ref1", "ref2"}
    try:
        present = SUITE3_FIELDS & set(json.loads(body))
    except (ValueError, RecursionError, TypeError):
        present = frozenset()  # json_object says what is wrong
    if present and present != SUITE3_FIELDS:  # a suite-0x03 EXPORTKEY missing a TLV: 6A80
        raise P.malformed("a suite-0x03 request carries e_u, c_u and sig_u together "
                          f"(missing {sorted(SUITE3_FIELDS - present)})")
    keys = base_keys | present
    d = json_object(body, keys)
    er = msg.ExportRequest(hex_field(d, "sn", 1, 32), hex_field(d, "r", 16, 16),
                           hex_field(d, "set_id", 5, 5), int_field(d, "suite", 0, 255),
                           hex_field(d, "ref1", 1, 32), int_field(d, "ref2", 1, 254))
    if keys == base_keys:
        return er
    try:
        cert = Certificate.decode(hex_field(d, "c_u", 1, 1024))
    except StatusError as e:
        raise P.malformed(f"'c_u': {e.detail}") from None
    return ExportRequest3(er, hex_field(d, "e_u", POINT_LEN, POINT_LEN), cert,
                          hex_field(d, "sig_u", SIGNATURE_LEN, SIGNATURE_LEN))


SUITE3_FIELDS = frozenset({"e_u", "c_u", "sig_u"})


def _recorded(c: Challenge, sn: bytes, ref2: int, kcv: bytes) -> bytes:
    return json.dumps({
        "status": "recorded", "sn": sn.hex(), "set_id": c.set_id.hex(),
        "ref1": display_ref1(c.ref1), "ref2": ref2, "key_version": c.key_version,
        "kcv": kcv.hex()}).encode()


__all__ = ["KeyRoutes"]
