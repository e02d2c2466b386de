"""Administering a home: its authority, sets, application keys and emulated units
(``keyload authority|set|key|unit …``). Key values typed by an operator come in through
callbacks, asked for once the keystore is open."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..core.dukpt import USAGE_BDK, check_bdk
from ..core.errors import StoreError
from ..core.identity import Certificate
from ..core.keys import KeyAttributes, KeyType, aes_kcv
from ..core.messages import check_ref2
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..core.secret import Secret
from ..core.suite3 import SUITE_ECDH
from ..core.suites import get_suite
from ..records.exportlog import SqliteExportLog
from ..units.authority import ExportPolicy, KeyInfo, SetInfo
from ..units.keystore import SoftwareKeystore
from ..units.unit import Slot
from .fleet import EmulatedFleet
from .home import Home, Keystore
from .identity import create_identity_set, create_unenrolled, enrol_unit, unique_name
from .report import iso

T = TypeVar("T")
# an operator's key value: the value and the KCV of each component typed (none when whole)
Typed = Callable[[], tuple[Secret, list[bytes]]]


def key_json(i: KeyInfo, current: bool = True) -> dict[str, Any]:
    """A key's description; ``current``: the version exported (an older one is kept)."""
    return {"ref1": display_ref1(i.ref1), "ref1_hex": i.ref1.hex(), "type": i.key_type.label,
            "length": i.length, "usage": i.attrs.usage, "mode": i.attrs.mode,
            "exportability": i.attrs.exportability, "version": i.version,
            "diversify": i.diversify, "kcv": i.kcv.hex().upper(),
            "policy": {k: "any" if v is None else v for k, v in i.policy.to_json().items()},
            "label": i.label, "origin": i.origin or None, "current": current}


#: ``keyload key list``'s table: what :func:`key_json` gives, for people
KEY_COLUMNS = ["REF1", "type", "usage", "mode", "exp", "version", "current", "div", "KCV",
               "policy", "origin"]


def key_row(i: KeyInfo, current: bool = True) -> list[Any]:
    """A key (``current``: the version exported) as a row of :data:`KEY_COLUMNS`: its
    origin is ``tr31`` for a key taken in from an X9.143 key block, else ``-``; a BDK's
    policy ends ``initial keys only``."""
    return [display_ref1(i.ref1), i.key_type.label, i.attrs.usage, i.attrs.mode,
            i.attrs.exportability, i.version, "yes" if current else "no",
            "yes" if i.diversify else "no", i.kcv.hex().upper(), i.policy.describe(),
            i.origin or "-"]


def set_json(s: SetInfo) -> dict[str, Any]:
    return {"set_id": s.set_id.hex(), "name": s.name, "signed": s.signed,
            "kind": "identity" if s.identity else "transport key"}


def kcv_lines(kcvs: list[bytes]) -> list[str]:
    """The KCV of each component typed, for people."""
    return [f"component {i} KCV  {k.hex().upper()}" for i, k in enumerate(kcvs, 1)]


@dataclass(frozen=True)
class KeyAdded:
    """An application key taken in (``keyload key generate|import``), and the KCV of each
    component typed (none when whole)."""

    info: KeyInfo
    component_kcvs: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        kcvs = [k.hex().upper() for k in self.component_kcvs]
        return {**key_json(self.info), **({"component_kcvs": kcvs} if kcvs else {})}

    def lines(self) -> list[str]:
        i, a = self.info, self.info.attrs
        return [*kcv_lines(self.component_kcvs),
                f"key {display_ref1(i.ref1)}: {i.key_type.label}, {a.usage}/{a.mode}/"
                f"{a.exportability}, version {i.version}, KCV {i.kcv.hex().upper()}"]


# -- the authority -----------------------------------------------------------------------
@dataclass(frozen=True)
class AuthorityMade:
    where: str  # the home's authority directory, or the token
    backend: str
    suites: list[int]
    signing_public_key: bytes | None

    def to_json(self) -> dict[str, Any]:
        pub = self.signing_public_key
        return {"authority": self.where, "backend": self.backend, "suites": self.suites,
                "signing_public_key": None if pub is None else pub.hex()}

    def lines(self) -> list[str]:
        pub = self.signing_public_key
        return [f"authority created in {self.where} ({self.backend}; suites "
                f"{suites_text(self.suites)})",
                *([] if pub is None else [f"Ed25519 SAS public key: {pub.hex()}"])]


def suites_text(suites: list[int]) -> str:
    return ", ".join(f"{s:#04x}" for s in suites)


def create_authority(home: Home, *, pkcs11: str | None = None, token: str | None = None,
                     clear_sas: bool = False, signing_key: bool = False) -> AuthorityMade:
    """A new authority in ``home``: a sealed software keystore, or the PKCS#11 token
    ``token`` of module ``pkcs11``; with ``signing_key``, an Ed25519 SAS key too."""
    home.ensure()
    cfg: dict[str, Any] | None = None
    where = str(home.authority_dir)
    if pkcs11:
        if not token:
            raise ValueError("--pkcs11 needs --token LABEL")
        cfg = {"backend": "pkcs11", "module": pkcs11, "token": token, "clear_sas": clear_sas}
        conf = os.environ.get("SOFTHSM2_CONF")
        if conf and "softhsm" in pkcs11:
            cfg["softhsm2_conf"] = str(Path(conf).resolve())
        where = f"token {token!r} of {pkcs11}"
    ks = home.create_authority(cfg)  # a token: module, token and PIN checked first
    try:
        pub = ks.set_signing_key() if signing_key else None
        caps = ks.capabilities()
        return AuthorityMade(where, caps.backend, sorted(caps.suites), pub)
    finally:
        ks.close()


def authority_facts(home: Home) -> dict[str, Any]:
    """What the authority holds, never a key value."""
    ks = home.open_keystore()
    try:
        pub = ks.public_key()
        caps = ks.capabilities()
        return {"backend": caps.backend, "suites": sorted(caps.suites),
                "signing_public_key": None if pub is None else pub.hex(),
                "sets": [set_json(s) for s in ks.set_infos()],
                "keys": [key_json(k) for k in ks.key_infos()]}
    finally:
        ks.close()


def facts_rows(facts: dict[str, Any]) -> list[tuple[str, Any]]:
    """:func:`authority_facts` for people: what it holds, counted."""
    return [("backend", facts["backend"]), ("suites", suites_text(facts["suites"])),
            ("signing key", facts["signing_public_key"] or "none"),
            ("sets", len(facts["sets"])), ("application keys", len(facts["keys"]))]


EXPORT_HEADERS = ("set id", "SN", "REF1", "REF2", "suite", "version", "KCV", "initial key ID")


def export_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """:func:`export_rows` under :data:`EXPORT_HEADERS`, for people."""
    return [[r["set_id"], r["sn"], r["ref1"], r["ref2"], r["suite"], r["key_version"],
             r["kcv"], r["initial_key_id"] or ""] for r in rows]


def export_rows(home: Home, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """How many exports the authority recorded, and the last ``limit`` (all: 0)."""
    path = home.authority_dir / "exports.db"
    if not path.exists():
        raise StoreError(f"no export records at {path}")
    log = SqliteExportLog(path)
    try:
        recs = log.records()
    finally:
        log.close()
    shown = recs[-limit:] if limit > 0 else recs
    return len(recs), [
        {"time": iso(r.time), "set_id": r.set_id.hex(), "sn": r.sn.hex(),
         "ref1": display_ref1(r.ref1), "ref2": r.ref2, "suite": r.suite,
         "key_version": r.key_version, "kcv": r.kcv.hex().upper(),
         "initial_key_id": None if r.initial_key_id is None else r.initial_key_id.hex().upper()}
        for r in shown]


# -- sets and keys -------------------------------------------------------------------------
def read_keystore(home: Home, read: Callable[[Keystore], T]) -> T:
    """What ``read`` finds in the home's keystore, opened for it and closed after."""
    ks = home.open_keystore()
    try:
        return read(ks)
    finally:
        ks.close()


@dataclass(frozen=True)
class SetMade:
    """A set ``keyload set create`` made, with the KCV of each component of T typed."""

    info: SetInfo
    component_kcvs: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return set_json(self.info) if self.info.identity else {
            **set_json(self.info), "component_kcvs": [k.hex().upper()
                                                      for k in self.component_kcvs]}

    def lines(self) -> list[str]:
        i = self.info
        if i.identity:
            return [f"identity set {i.name} created: set id {i.set_id.hex()} (from the set "
                    "CA's key)"]
        return [*kcv_lines(self.component_kcvs),
                f"set {i.name} created: set id {i.set_id.hex()} (= KCV of T)"]


def create_set(home: Home, name: str, *, signed: bool, identity: bool = False,
               typed: Typed | None = None) -> SetMade:
    """A new set, its transport key generated, or ``typed`` (in components); or an
    ``identity`` set (:func:`~keyload.station.identity.create_identity_set`), which has
    no transport key. Names are unique, as sets are told apart by name in lists and
    reports."""
    if identity:
        if typed is not None or signed:
            raise ValueError("an identity set has no transport key: --identity takes neither "
                             "--components nor --signed")
        return SetMade(create_identity_set(home, name))
    ks = home.open_keystore()
    try:
        unique_name(ks, name)
        if typed is None:
            return SetMade(ks.generate_set(name, signed=signed))
        value, kcvs = typed()
        return SetMade(ks.add_set(value, name, signed=signed), kcvs)
    finally:
        ks.close()


def known_sets(ks: Keystore, policy: ExportPolicy) -> None:
    """``--sets`` names sets of this authority (a typo would make a key no unit can get)."""
    if policy.sets is None:
        return
    missing = sorted(s.hex() for s in policy.sets - {i.set_id for i in ks.set_infos()})
    if missing:
        raise ValueError(f"--sets: no set {', '.join(missing)} in this authority "
                         "(keyload set list)")


def bdk_policy(kt: KeyType, attrs: KeyAttributes, policy: ExportPolicy, *,
               diversify: bool) -> ExportPolicy:
    """A BDK (usage B0) keyload takes in: checked (:func:`~keyload.core.dukpt.check_bdk`)
    and given the policy that lets only its initial keys leave; any other key as given."""
    check_bdk(kt, attrs, diversify=diversify)
    if attrs.usage != USAGE_BDK:
        return policy
    return ExportPolicy(policy.sets, policy.slots, initial_keys_only=True)


def new_version_of(ks: Keystore, ref1: bytes) -> bool:
    """True when ``ref1`` is a key of ``ks`` and what is taken in for it is its next
    version (the older ones kept); False for a new REF1. Refused (ValueError): a BDK,
    whose initial keys are named by its BDK ID (a new BDK gets its own REF1 and ID), and
    a PKCS#11 token, which keeps one version of a REF1."""
    if ref1 not in {k.ref1 for k in ks.key_infos()}:
        return False
    name = display_ref1(ref1)
    if ks.key_info(ref1).attrs.usage == USAGE_BDK:
        raise ValueError(f"key {name} is a BDK (usage {USAGE_BDK}): it is not rotated; make "
                         "a new BDK under its own REF1 and BDK ID and load its initial keys")
    if not isinstance(ks, SoftwareKeystore):
        raise ValueError(f"key {name} exists: a PKCS#11 token keeps one version of a key, "
                         "so a new version is made in a software keystore only "
                         "(README: rotating a key)")
    return True


def add_key(home: Home, ref1: bytes, kt: KeyType, attrs: KeyAttributes, policy: ExportPolicy,
            *, version: int, diversify: bool, label: str, length: int | None = None,
            typed: Callable[[int | None], tuple[Secret, list[bytes]]] | None = None
            ) -> KeyAdded:
    """A new application key, or the next version of an existing REF1
    (:func:`new_version_of`), generated (``length``: HMAC only), or ``typed`` (given the
    length an AES key must have)."""
    policy = bdk_policy(kt, attrs, policy, diversify=diversify)
    ks = home.open_keystore()
    try:
        known_sets(ks, policy)
        replace = new_version_of(ks, ref1)
        if typed is None:
            return KeyAdded(ks.generate_key(ref1, kt, attrs, version=version,
                                            diversify=diversify, policy=policy,
                                            length=length, label=label, replace=replace))
        value, kcvs = typed(kt.default_length if kt.is_aes else None)
        return KeyAdded(ks.add_key(ref1, kt, value, attrs, version=version,
                                   diversify=diversify, policy=policy, label=label,
                                   replace=replace), kcvs)
    finally:
        ks.close()


# -- emulated units --------------------------------------------------------------------------
def parse_slots(specs: list[str], locked: list[int]) -> dict[int, Slot]:
    """A new unit's slots from ``--slot REF2=TYPES`` (each slot accepts the key types
    named, comma separated; none given: ``1=aes256``) and ``--lock REF2`` (locked)."""
    slots: dict[int, Slot] = {}
    for spec in specs or ["1=aes256"]:
        ref2_text, _, types = spec.partition("=")
        try:
            ref2 = int(ref2_text)
        except ValueError:
            raise ValueError(f"--slot {spec!r}: expected REF2=TYPES") from None
        check_ref2(ref2)
        if ref2 in slots:
            raise ValueError(f"slot {ref2} given twice")
        accepts = frozenset(int(KeyType.parse(t)) for t in types.split(",") if t.strip())
        if not accepts:
            raise ValueError(f"--slot {spec!r}: no key type")
        slots[ref2] = Slot(ref2, accepts)
    for ref2 in locked:
        if ref2 not in slots:
            raise ValueError(f"--lock {ref2}: no such slot")
        s = slots[ref2]
        slots[ref2] = Slot(ref2, s.accepts, True)
    return slots


def check_unit_suites(suites: tuple[int, ...] | None) -> None:
    """``--suites`` of a new unit: suites keyload knows, 0x03 alone or not at all."""
    if suites is not None and suites != (SUITE_ECDH,):
        for s in suites:
            if s == SUITE_ECDH:
                raise ValueError("suite 0x03 is for the units of an identity set alone")
            get_suite(s)


@dataclass(frozen=True)
class UnitKey:
    """What a new emulated unit of a set is given: nothing when the set is an identity set
    (the unit makes its own key and is enrolled), else the set's transport key ``t`` (the
    caller wipes it), the authority's SAS public key of a signed set, and its suites."""

    identity: bool
    t: Secret | None = None
    verify_key: bytes | None = None
    suites: tuple[int, ...] = (0x01, 0x02)


def unit_key(ks: Keystore, set_id: bytes, suites: tuple[int, ...] | None,
             typed: Typed | None) -> UnitKey:
    """The :class:`UnitKey` of set ``set_id`` in the open keystore ``ks``: T from the
    authority, or ``typed`` in components (as a card manufacturer receives it; a token's
    never leaves), checked against the set id."""
    info = ks.set_info(set_id)
    if info.identity:
        if typed is not None or suites not in (None, (0x03,)):
            raise ValueError(f"set {set_id.hex()} is an identity set: its units speak "
                             "suite 0x03 only and hold no transport key")
        return UnitKey(True)
    if suites == (SUITE_ECDH,):
        raise ValueError("suite 0x03 is for the units of an identity set alone")
    vk = ks.public_key() if info.signed else None
    if typed is not None:
        t, _ = typed()
        if not ct_equal(aes_kcv(t.buffer), set_id):
            t.wipe()
            raise ValueError("the components do not make this set's transport key "
                             "(KCV differs)")
    else:
        t = ks.transport_key_copy(set_id)
    return UnitKey(False, t, vk, suites or (0x01, 0x02))


@dataclass(frozen=True)
class UnitMade:
    """A unit ``keyload unit create`` made: enrolled in an identity set (its C_U), not
    enrolled yet (``enrolled`` false), or of a transport-key set (no certificate)."""

    sn: bytes
    set_id: bytes
    slots: list[int]
    certificate: Certificate | None = None
    enrolled: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sn": self.sn.hex(), "set_id": self.set_id.hex(),
                               "slots": self.slots}
        if not self.enrolled:
            out["enrolled"] = False
        if self.certificate is not None:
            out["certificate"] = self.certificate.encode().hex()
        return out

    def told(self) -> str:
        slots = ", ".join(map(str, self.slots))
        if not self.enrolled:
            return (f"unit {self.sn.hex()} created for set {self.set_id.hex()} with slots "
                    f"{slots}, not enrolled: serve it as a card (unit serve-card) and enrol "
                    "it (unit enrol --reader)")
        return (f"unit {self.sn.hex()} {'created' if self.certificate is None else 'enrolled'}"
                f" in set {self.set_id.hex()} with slots {slots}")


def create_unit(home: Home, set_id: bytes, sn: bytes, slots: dict[int, Slot],
                suites: tuple[int, ...] | None, *, typed: Typed | None = None,
                unenrolled: bool = False) -> UnitMade:
    """An emulated unit of set ``set_id`` given its :func:`unit_key`. A unit of an
    identity set is enrolled instead (suite 0x03 only), or with ``unenrolled`` left without
    key and certificate, to be served as a card and enrolled by ``unit enrol --reader``."""
    made = UnitMade(sn, set_id, sorted(slots), enrolled=not unenrolled)
    if unenrolled:
        if suites is not None or typed is not None:
            raise ValueError("--unenrolled makes a unit of an identity set: it takes neither "
                             "--suites nor --components")
        create_unenrolled(home, set_id, sn, slots)
        return made
    check_unit_suites(suites)
    ks = home.open_keystore()
    try:
        key = unit_key(ks, set_id, suites, typed)
        if key.identity:
            return replace(made, certificate=enrol_unit(home, ks, set_id, sn, slots))
    finally:
        ks.close()
    assert key.t is not None
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    try:
        fleet.create_unit(sn, key.t, slots, verify_key=key.verify_key, suites=key.suites)
    finally:
        key.t.wipe()
        fleet.close()
    return made


def unit_serials(home: Home) -> list[bytes]:
    """The home's emulated units (none when it has no units' vault)."""
    home.existing()
    if not (home.units_dir / "vault.json").exists():
        return []
    return sorted(bytes.fromhex(p.stem) for p in home.units_dir.glob("*.unit"))
