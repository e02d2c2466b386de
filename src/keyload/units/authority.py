"""The authority (AS, first security unit): EXPORTKEY and receipt checks (docs/protocol.md §8,
and §10.4 for identity sets, suite 0x03).

:class:`Authority` is the role: it parses requests, applies the checks in the order of §8
(TLV 6A80, set id 6A82, suite 6A81, REF1 6A88, export policy 6986 — which includes a key
whose length does not fit its type, §3), records every export (never key material) and
answers. As a card application its :meth:`Authority.process_apdu` never raises: an error
nobody planned for answers 6581 (nothing exported, nothing recorded), logged by its class
name only. The key material and the cryptography sit behind an
:class:`AuthorityBackend` (software keystore here; PKCS#11 token or card elsewhere), which
says what it can do through :meth:`AuthorityBackend.capabilities`. A backend that holds
identity sets (suite 0x03) is also an :class:`IdentityBackend`: the set CA key, the
authority key with C_A, and the register of the units it certified (active or revoked).

>>> from keyload.units.keystore import SoftwareKeystore
>>> ks = SoftwareKeystore.ephemeral()
>>> authority = Authority(ks)
>>> sorted(authority.capabilities().suites)
[1, 2, 3]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from ..core import messages as msg
from ..core.aids import AID_AUTHORITY, INS_EXPORT, INS_SELECT
from ..core.apdu import CommandAPDU, sw_bytes
from ..core.dukpt import USAGE_BDK, InitialKeyOrder
from ..core.ecc import check_point
from ..core.errors import (
    SW,
    ClaNotSupported,
    InsNotSupported,
    IntegrityError,
    NoChallenge,
    NoSuchKey,
    PolicyRefused,
    Revoked,
    StatusError,
    UnknownSet,
    Unsupported,
    WrongLength,
    WrongP1P2,
)
from ..core.identity import ROLE_UNIT, Certificate, verify_certificate
from ..core.keys import KeyAttributes, KeyType, length_fits
from ..core.klp1 import Exported
from ..core.messages3 import ExportRequest3, ExportResponse3, decode_export_request
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..core.secret import Secret
from ..core.suite3 import SUITE_ECDH, Exported3, check_export_request, verify_receipt3
from ..records.exportlog import ExportRecord

log = logging.getLogger("keyload.authority")

_Entry = TypeVar("_Entry")


@dataclass(frozen=True, slots=True)
class ExportPolicy:
    """Which sets and unit slots may receive a key. ``None`` means any (said explicitly).

    ``initial_keys_only``: the key itself never leaves; a load delivers only the AES DUKPT
    initial key a station orders (a BDK, docs/protocol.md Appendix D). The contract lets a
    policy restrict usages (§8 step 5): keyload gives every BDK it takes in this policy.
    """

    sets: frozenset[bytes] | None
    slots: frozenset[int] | None
    initial_keys_only: bool = False

    def check(self, set_id: bytes, ref2: int) -> None:
        if self.sets is not None and set_id not in self.sets:
            raise PolicyRefused("export policy: set not allowed for this key")
        if self.slots is not None and ref2 not in self.slots:
            raise PolicyRefused("export policy: slot not allowed for this key")

    def to_json(self) -> dict[str, list[str] | list[int] | bool | None]:
        return {"sets": None if self.sets is None else sorted(s.hex() for s in self.sets),
                "slots": None if self.slots is None else sorted(self.slots),
                **({"initial_keys_only": True} if self.initial_keys_only else {})}

    @classmethod
    def from_json(cls, d: dict[str, list[str] | list[int] | bool | None]) -> ExportPolicy:
        sets, slots = d.get("sets"), d.get("slots")
        if isinstance(sets, bool) or isinstance(slots, bool):
            raise ValueError("sets and slots are lists or null")
        return cls(None if sets is None else frozenset(bytes.fromhex(str(s)) for s in sets),
                   None if slots is None else frozenset(int(x) for x in slots),
                   d.get("initial_keys_only") is True)

    def describe(self) -> str:
        sets = "any set" if self.sets is None else ",".join(sorted(s.hex() for s in self.sets))
        slots = "any slot" if self.slots is None else ",".join(map(str, sorted(self.slots)))
        return f"{sets}; {slots}" + ("; initial keys only" if self.initial_keys_only else "")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An application key's public description (no value)."""

    ref1: bytes
    key_type: KeyType
    length: int
    attrs: KeyAttributes
    version: int
    diversify: bool
    policy: ExportPolicy
    kcv: bytes
    label: str = ""
    origin: str = ""  # "tr31": taken in from an X9.143 key block; "" otherwise


@dataclass(frozen=True, slots=True)
class SetInfo:
    """A set of units sharing one transport key; ``signed``: SAS is Ed25519 for this set.

    ``identity``: a set of units with their own identities (suite 0x03, docs/protocol.md
    §10): no transport key; its set id is that of the set CA's key.
    """

    set_id: bytes
    name: str
    signed: bool = False
    identity: bool = False


@dataclass(frozen=True, slots=True)
class IdentitySetInfo:
    """An identity set's public part: Q_CA and the authority's certificate C_A."""

    set_id: bytes
    name: str
    q_ca: bytes
    c_a: Certificate


@dataclass(frozen=True, slots=True)
class UnitRecord:
    """A unit the authority certified (docs/protocol.md §10.4): its certificate and status."""

    set_id: bytes
    sn: bytes
    certificate: Certificate
    revoked: bool = False  # from then on EXPORTKEY answers 6983


@dataclass(frozen=True, slots=True)
class Capabilities:
    suites: frozenset[int]
    ed25519: bool
    backend: str


class ExportLog(Protocol):
    def append(self, record: ExportRecord) -> None: ...


class ServedRegister(Protocol):
    """The register of served challenges (docs/protocol.md §10.4), by (set id, SN, R)."""

    def claim(self, set_id: bytes, sn: bytes, r: bytes) -> bool:
        """Take (set id, SN, R) for this export; False when it was served before."""
        ...

    def release(self, set_id: bytes, sn: bytes, r: bytes) -> None:
        """Give back a claim whose export was then refused (nothing was served)."""
        ...


@dataclass
class MemoryServed:
    """The register kept while one authority runs (a service keeps it in its state)."""

    served: set[tuple[bytes, bytes, bytes]] = field(default_factory=set)

    def claim(self, set_id: bytes, sn: bytes, r: bytes) -> bool:
        if (set_id, sn, r) in self.served:
            return False
        self.served.add((set_id, sn, r))
        return True

    def release(self, set_id: bytes, sn: bytes, r: bytes) -> None:
        self.served.discard((set_id, sn, r))


@dataclass
class MemoryExportLog:
    records: list[ExportRecord] = field(default_factory=list)

    def append(self, record: ExportRecord) -> None:
        self.records.append(record)


class AuthorityBackend(Protocol):
    """Where the authority's keys live and its cryptography runs."""

    def capabilities(self) -> Capabilities: ...

    def set_info(self, set_id: bytes) -> SetInfo:
        """Raise UnknownSet (6A82) when there is no transport key for ``set_id``."""
        ...

    def key_info(self, ref1: bytes) -> KeyInfo:
        """Raise NoSuchKey (6A88) when ``ref1`` is unknown."""
        ...

    def export(self, req: msg.ExportRequest, *,
               initial_key: InitialKeyOrder | None = None) -> Exported:
        """The wrap of docs/protocol.md §4 for an already-checked request; with
        ``initial_key`` (REF1 a BDK), of the IK derived from it in the backend instead
        (docs/protocol.md Appendix D)."""
        ...

    def receipt(self, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                kcv_: bytes) -> bytes:
        """The RCT the unit should have answered for this load."""
        ...


@runtime_checkable
class IdentityBackend(Protocol):
    """What the authority needs of a backend for identity sets (suite 0x03)."""

    def identity_set(self, set_id: bytes) -> IdentitySetInfo:
        """Raise UnknownSet (6A82) when ``set_id`` is not an identity set held here."""
        ...

    def unit_record(self, set_id: bytes, sn: bytes) -> UnitRecord | None:
        """The register's entry for (set id, SN), None for a unit it never certified."""
        ...

    def export3(self, req: ExportRequest3) -> Exported3:
        """The export of docs/protocol.md §10.3 for an already-checked request, with a
        fresh e_A; everything derived is wiped before it returns."""
        ...


@runtime_checkable
class IdentityAdministration(IdentityBackend, Protocol):
    """The register of an identity set as a home administers it, on any backend (software
    keystore, PKCS#11 token): certify a unit, revoke it, list the register. The refusals
    are :func:`check_new_unit` and :func:`registered_unit`, whatever the backend."""

    def certify_unit(self, set_id: bytes, sn: bytes, public_key: bytes) -> Certificate:
        """Issue C_U for (SN, Q_U) and register the unit as active."""
        ...

    def revoke_unit(self, set_id: bytes, sn: bytes) -> UnitRecord:
        """Mark a certified unit revoked: EXPORTKEY answers it 6983 from then on."""
        ...

    def unit_records(self, set_id: bytes) -> list[UnitRecord]: ...


def check_new_unit(units: Mapping[bytes, UnitRecord], set_id: bytes, sn: bytes) -> None:
    """The rules for a unit a backend is about to certify: a valid SN (1 to 32 bytes) not
    yet in the register of ``set_id`` (``units``, by SN), else ValueError."""
    msg.check_sn(sn)
    if sn in units:
        raise ValueError(f"unit {sn.hex()} is already certified in set {set_id.hex()}")


def check_new_units(units: Mapping[bytes, UnitRecord], set_id: bytes,
                    new: Sequence[tuple[bytes, bytes]]) -> None:
    """:func:`check_new_unit` for each (SN, Q_U) of ``new``, none twice, and each Q_U an
    uncompressed P-256 point: ValueError before anything is certified."""
    seen: set[bytes] = set()
    for sn, public_key in new:
        check_new_unit(units, set_id, sn)
        if sn in seen:
            raise ValueError(f"unit {sn.hex()} is given twice")
        seen.add(sn)
        try:
            check_point(public_key)
        except IntegrityError:
            raise ValueError("the public key is not an uncompressed P-256 point") from None


def registered_unit(units: Mapping[bytes, UnitRecord], set_id: bytes,
                    sn: bytes) -> UnitRecord:
    """The register's entry for ``sn`` (a unit to revoke), else ValueError."""
    old = units.get(sn)
    if old is None:
        raise ValueError(f"unit {sn.hex()} is not in the register of set {set_id.hex()}")
    return old


def find_set(sets: Mapping[bytes, _Entry], set_id: bytes) -> _Entry:
    """A backend's entry for ``set_id``, else UnknownSet (6A82)."""
    try:
        return sets[set_id]
    except KeyError:
        raise UnknownSet(f"no transport key for set {set_id.hex()}") from None


def find_key(keys: Mapping[bytes, _Entry], ref1: bytes) -> _Entry:
    """A backend's entry for application key ``ref1``, else NoSuchKey (6A88)."""
    try:
        return keys[ref1]
    except KeyError:
        raise NoSuchKey(f"no application key {display_ref1(ref1)}") from None


def validate_new_key(ref1: bytes, key_type: KeyType, length: int, attrs: KeyAttributes, *,
                     version: int, diversify: bool, old: KeyInfo | None,
                     replace: bool) -> None:
    """The rules for a key a backend is about to take in or make, whatever the backend:
    ValueError (a caller mistake) when one is broken.

    REF1 of 1 to 32 bytes; a length that fits the type (docs/protocol.md §3); a version in
    0..65535; diversification for AES keys only (§4); a MAC usage (``M…``) for an HMAC key;
    and, when ``old`` holds the key of that REF1, ``replace`` and a higher version.
    """
    msg.check_ref1(ref1)
    key_type.check_length(length)
    if not 0 <= version <= 0xFFFF:
        raise ValueError("key version must be in 0..65535")
    if diversify and not key_type.is_aes:
        raise ValueError("only AES keys can be diversified (docs/protocol.md §4)")
    if key_type == KeyType.HMAC_SHA256 and attrs.usage[0] != "M":
        raise ValueError("an HMAC key must have a MAC usage (M…)")
    if old is not None:
        if not replace:
            raise ValueError(f"REF1 {display_ref1(ref1)} already exists")
        if version <= old.version:
            raise ValueError("a replacing key needs a higher version")


def validate_new_set(length: int, *, signed: bool, has_signer: bool) -> None:
    """The rules for a transport key a backend is about to take in or make: ValueError
    unless T is AES-256 (32 bytes) and, for a signed set, the authority can sign."""
    if length != 32:
        raise ValueError("a transport key is AES-256 (32 bytes)")
    if signed and not has_signer:
        raise ValueError("a signed set needs the authority's signing key first")


class KeyAdministration(AuthorityBackend, Protocol):
    """What administering an authority's keys needs, on any backend (software keystore,
    PKCS#11 token): sets, application keys and the signing key, as the CLI manages them.

    Values given to ``add_*`` and ``set_signing_key`` are :class:`Secret`; every new key
    passes :func:`validate_new_key`, every new set :func:`validate_new_set`.
    """

    def set_infos(self) -> list[SetInfo]: ...

    def key_infos(self) -> list[KeyInfo]: ...

    def older_key_infos(self) -> list[KeyInfo]:
        """The older versions of the REF1s given a new one (none where only one is kept)."""
        ...

    def public_key(self) -> bytes | None:
        """The Ed25519 SAS public key, or None when the authority has none."""
        ...

    def add_set(self, value: Secret, name: str, *, signed: bool = False) -> SetInfo:
        """Take in a transport key T (32 bytes); its set id is KCV(T)."""
        ...

    def generate_set(self, name: str, *, signed: bool = False) -> SetInfo: ...

    def generate_identity_set(self, name: str, *, authority_id: bytes) -> SetInfo:
        """Make the set CA key, the authority key and C_A (subject ``authority_id``) of a new
        identity set (suite 0x03); ValueError on a backend that holds none."""
        ...

    def add_key(self, ref1: bytes, key_type: KeyType, value: Secret, attrs: KeyAttributes, *,
                version: int, diversify: bool, policy: ExportPolicy, label: str = "",
                replace: bool = False, origin: str = "") -> KeyInfo:
        """Take in an application key; ``origin``: where it came from (``tr31``)."""
        ...

    def generate_key(self, ref1: bytes, key_type: KeyType, attrs: KeyAttributes, *,
                     version: int, diversify: bool, policy: ExportPolicy,
                     length: int | None = None, label: str = "",
                     replace: bool = False) -> KeyInfo: ...

    def set_signing_key(self, value: Secret | None = None) -> bytes:
        """Generate (``value`` None) or take in the Ed25519 SAS key; its public key."""
        ...

    def transport_key_copy(self, set_id: bytes) -> Secret:
        """A copy of T, to personalize an emulated unit; ValueError where T never leaves
        the backend."""
        ...

    def close(self) -> None: ...


class Authority:
    """The authority role over a backend: EXPORTKEY (§8) and receipt verification."""

    def __init__(self, backend: AuthorityBackend, *, log: ExportLog | None = None,
                 clock: Callable[[], float] = time.time,
                 served: ServedRegister | None = None) -> None:
        self.backend = backend
        self.log = log
        self.clock = clock
        self._caps = backend.capabilities()
        # the suites a set that is not an identity set is served by (§8)
        self._plain_suites = self._caps.suites - {SUITE_ECDH}
        # a runtime Protocol check costs more than the rest of the checks: made once
        self._identity = backend if isinstance(backend, IdentityBackend) else None
        # §10.4: the (set id, SN, R) served; by default kept while this authority runs
        self._served: ServedRegister = MemoryServed() if served is None else served
        # Appendix D: the initial keys ordered, by (SN, REF1, REF2), until their EXPORTKEY
        self._initial_keys: dict[tuple[bytes, bytes, int], InitialKeyOrder] = {}

    def capabilities(self) -> Capabilities:
        return self._caps

    def export(self, request: bytes) -> bytes:
        """EXPORTKEY data in, response data (``E0{…} CD``) out; StatusError on refusal."""
        req = decode_export_request(request)  # the section-5 shape in one pass first
        if isinstance(req, ExportRequest3):
            return self.export_request3(req).encode()
        out = self._export(req)
        return msg.encode_export_response(out.import_data, out.kcv)

    def _offered(self, set_info: SetInfo, suite: int, identity_message: bool) -> None:
        """§8 and §10.4: the suite offered for this set and matching the message, else 6A81."""
        identity = set_info.identity
        if (suite not in self._caps.suites or identity != (suite == SUITE_ECDH)
                or identity != identity_message):
            offers = "0x03" if identity else ", ".join(
                f"{s:#04x}" for s in sorted(self._caps.suites - {SUITE_ECDH}))
            raise Unsupported(f"the authority offers suite {offers} for this set, "
                              f"not {suite:#04x} with this message")

    def _checked_key(self, ref1: bytes, set_id: bytes, ref2: int) -> KeyInfo:
        """REF1 known (6A88) and the key's export policy (6986)."""
        info = self.backend.key_info(ref1)
        if not length_fits(info.key_type, info.length):
            raise PolicyRefused("export policy: the key's length does not fit its type")
        info.policy.check(set_id, ref2)
        return info

    def order_initial_key(self, sn: bytes, ref1: bytes, ref2: int,
                          order: InitialKeyOrder) -> None:
        """Have the next EXPORTKEY of BDK ``ref1`` for slot ``ref2`` of unit ``sn``
        deliver that unit's initial key (docs/protocol.md Appendix D): the order a station
        gives beside the wire, since EXPORTKEY has no field for the initial key ID; each
        order serves one EXPORTKEY (a station orders again before another attempt).
        ValueError (nothing ordered) when ``ref1`` is not a BDK or the IK's type cannot be
        derived from it; NoSuchKey for an unknown REF1."""
        info = self.backend.key_info(ref1)
        if info.attrs.usage != USAGE_BDK:
            raise ValueError(f"key {display_ref1(ref1)} is not a BDK (usage "
                             f"{info.attrs.usage}, not {USAGE_BDK}): no initial key derives "
                             "from it")
        order.key_type(info.key_type)
        self._initial_keys[(sn, ref1, ref2)] = order

    def _initial_key(self, info: KeyInfo, sn: bytes, ref2: int) -> InitialKeyOrder | None:
        """The IK ordered for this export of a BDK; a key whose policy allows initial keys
        only is never exported itself (6986)."""
        order = self._initial_keys.pop((sn, info.ref1, ref2), None)
        if order is None and info.policy.initial_keys_only:
            raise PolicyRefused("export policy: a BDK is never exported, only a unit's "
                                "initial key, which needs the unit's initial key ID: "
                                "EXPORTKEY cannot carry it (docs/protocol.md Appendix D), "
                                "a station gives it with the load")
        return order

    def export_request(self, req: msg.ExportRequest) -> msg.ExportResponse:
        """EXPORTKEY of suite 0x01/0x02, the checks in the order of docs/protocol.md §8."""
        out = self._export(req)
        return msg.ExportResponse(out.import_data, out.kcv)

    def _export(self, req: msg.ExportRequest) -> Exported:
        set_info = self.backend.set_info(req.set_id)
        if set_info.identity or req.suite not in self._plain_suites:
            self._offered(set_info, req.suite, False)  # refused: 6A81
        info = self._checked_key(req.ref1, req.set_id, req.ref2)
        order = None  # the checks of an initial key only where one can be asked for
        if self._initial_keys or info.policy.initial_keys_only:
            order = self._initial_key(info, req.sn, req.ref2)
        if order is None:
            out = self.backend.export(req)
        else:
            out = self.backend.export(req, initial_key=order)
        if self.log is not None:
            self.log.append(ExportRecord(
                self.clock(), req.set_id, req.sn, req.ref1, req.ref2, req.suite, info.version,
                out.kcv, initial_key_id=None if order is None else order.initial_key_id.value))
        return out

    def _identity_backend(self) -> IdentityBackend:
        if self._identity is None:
            raise Unsupported("this authority holds no identity sets")
        return self._identity

    def export_request3(self, req: ExportRequest3, *,
                        served: ServedRegister | None = None) -> ExportResponse3:
        """EXPORTKEY of suite 0x03, the checks in the order of docs/protocol.md §10.4.

        ``served``: the register of served challenges (default: this authority's own); a
        claim an export then refuses is released, so a refusal records nothing.
        """
        base = req.base
        self._offered(self.backend.set_info(base.set_id), base.suite, True)  # 6A82, 6A81
        ident = self._identity_backend()
        record = ident.unit_record(base.set_id, base.sn)
        issued = None if record is None or record.revoked else record.certificate
        check_export_request(req, q_ca=ident.identity_set(base.set_id).q_ca,  # 6982
                             issued=issued)
        if record is not None and record.revoked:
            raise Revoked(f"unit {base.sn.hex()} is revoked")
        register = self._served if served is None else served
        if not register.claim(base.set_id, base.sn, base.r):
            raise NoChallenge("this challenge was served before")
        try:
            info = self._checked_key(base.ref1, base.set_id, base.ref2)  # 6A88, 6986
            if info.policy.initial_keys_only:
                raise PolicyRefused("export policy: a BDK is never exported; its initial "
                                    "keys go to units of a transport-key set (suite "
                                    "0x01/0x02)")
            out = ident.export3(req)
            if self.log is not None:
                self.log.append(ExportRecord(self.clock(), base.set_id, base.sn, base.ref1,
                                             base.ref2, base.suite, info.version, out.kcv,
                                             r=base.r, h=out.header, e_a=out.e_a,
                                             c_u=req.c_u.encode()))
        except BaseException:
            register.release(base.set_id, base.sn, base.r)
            raise
        return ExportResponse3(out.import_data, out.kcv)

    def q_ca(self, set_id: bytes) -> bytes | None:
        """Q_CA of identity set ``set_id``, under which its units' certificates (and so
        their receipts) are checked; None when no such identity set is held here."""
        if self._identity is None:
            return None
        try:
            return self._identity.identity_set(set_id).q_ca
        except UnknownSet:
            return None

    def verify_receipt3(self, *, set_id: bytes, c_u: Certificate, r: bytes, ref2: int,
                        ref1: bytes, h: bytes, kcv: bytes, e_a: bytes, rct: bytes) -> None:
        """Return None when ``rct`` is the receipt of the unit of ``c_u`` (valid under the
        set's Q_CA) for this load, else raise IntegrityError. Needs no secret."""
        q_ca = self._identity_backend().identity_set(set_id).q_ca
        verify_certificate(c_u, q_ca=q_ca, role=ROLE_UNIT, set_id=set_id)
        verify_receipt3(c_u, sn=c_u.subject, r=r, ref2=ref2, ref1=ref1, h=h, kcv_=kcv,
                        e_a=e_a, rct=rct)

    def verify_receipt(self, *, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int,
                       h: bytes, kcv: bytes, rct: bytes) -> None:
        """Return None when ``rct`` is the unit's genuine receipt, else raise IntegrityError."""
        want = self.backend.receipt(suite, set_id, sn, r, ref2, h, kcv)
        if not ct_equal(want, rct):
            raise IntegrityError()

    # -- the authority as a card application (SELECT, EXPORTKEY) --------------------
    def process_apdu(self, apdu: bytes) -> bytes:
        """C-APDU in, R-APDU out; never raises (errors become status words, an
        unexpected one 6581)."""
        try:
            cmd = CommandAPDU.decode(apdu)
            if cmd.cla not in (0x00, 0x80):
                raise ClaNotSupported()
            if cmd.ins == INS_SELECT and cmd.cla == 0x00:
                if (cmd.p1, cmd.p2) != (0x04, 0x00):
                    raise WrongP1P2()
                if cmd.data != AID_AUTHORITY:
                    return sw_bytes(0x6A82)
                return sw_bytes(SW.SUCCESS)
            if cmd.ins == INS_EXPORT and cmd.cla == 0x80:
                if (cmd.p1, cmd.p2) != (0, 0):
                    raise WrongP1P2()
                if not cmd.data:
                    raise WrongLength("EXPORTKEY needs data")
                return self.export(cmd.data) + sw_bytes(SW.SUCCESS)
            raise InsNotSupported()
        except StatusError as e:
            return sw_bytes(e.sw)
        except Exception as e:  # no exception leaves the card (docs/protocol.md §6)
            log.error("authority: %s while handling INS %02X; answered 6581",
                      type(e).__name__, apdu[1] if len(apdu) > 1 else 0)
            return sw_bytes(SW.MEMORY_FAILURE)

