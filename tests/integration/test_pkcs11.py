"""The PKCS#11 authority backend on a private SoftHSM2 token (keyload.units.pkcs11).

SoftHSM2 reads SOFTHSM2_CONF once, when the module is initialized: every token these
tests use is made first, in one directory, then the module is (re)initialized. Without
SoftHSM2 or python-pkcs11 the tests skip on a laptop and fail in CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyload.core import klp1
from keyload.core import messages as msg
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.dukpt import InitialKeyId, InitialKeyOrder, KeyUsage
from keyload.core.errors import (
    SW,
    IntegrityError,
    NoSuchKey,
    PolicyRefused,
    StoreError,
    UnknownSet,
    Unsupported,
    WrongPassphrase,
)
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType, aes_kcv, kcv
from keyload.core.primitives import aes_cmac, aes_ecb_encrypt_into, ecbdiv_into
from keyload.core.ref1 import display_ref1
from keyload.core.secret import Secret
from keyload.core.suites import get_suite
from keyload.lab.softhsm import (
    SoftHsmError,
    SoftHsmToken,
    make_token,
    softhsm_available,
    softhsm_missing_reason,
    token_labels,
    write_conf,
)
from keyload.station.load import AuthorityClient, LoadFailed, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from ..conftest import KLP1_VECTORS, VECTORS, require

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

HAVE_PYTHON_PKCS11 = importlib.util.find_spec("pkcs11") is not None
if HAVE_PYTHON_PKCS11:
    import pkcs11 as ck
    from pkcs11 import exceptions as pkx

    from keyload.units import pkcs11 as p11
    from keyload.units.pkcs11 import export as p11_export
    from keyload.units.pkcs11 import objects as p11_objects
    from keyload.units.pkcs11 import provision as p11_provision

PIN = "24681357"
TOKENS = ("vectors", "world", "gen", "pins", "fails", "lister", "dukpt")
ANY = ExportPolicy(None, None)
CASES: list[dict[str, Any]] = json.loads(KLP1_VECTORS.read_text())["cases"]
SUITE2_EXPORTS = [c for c in CASES if c["kind"] == "export" and c["suite"] == 2]


@dataclass
class Hsm:
    module: str
    tokens: dict[str, SoftHsmToken]
    opened: list[Any] = field(default_factory=list)

    def open(self, label: str, **kw: Any) -> p11.Pkcs11Keystore:
        kw.setdefault("pin", PIN)
        ks = p11.Pkcs11Keystore.open(self.module, label, **kw)
        self.opened.append(ks)
        return ks


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    require(HAVE_PYTHON_PKCS11, "python-pkcs11 is not installed (pip install python-pkcs11)")
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    old_conf = os.environ.get("SOFTHSM2_CONF")
    d = tmp_path_factory.mktemp("softhsm")
    tokens = {label: make_token(d, label=label, user_pin=PIN) for label in TOKENS}
    module = tokens["world"].module
    p11.reinitialize(module)  # the module reads SOFTHSM2_CONF now (module doc)
    h = Hsm(module, tokens)
    yield h
    for ks in h.opened:
        ks.close()
    if old_conf is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old_conf


def _unit(sn: bytes, t: bytes, *, verify_key: bytes | None = None,
          suites: tuple[int, ...] = (1, 2), slots: dict[int, Slot] | None = None) -> Unit:
    if slots is None:
        slots = {1: Slot(1, frozenset({KeyType.AES256})),
                 2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
                 3: Slot(3, frozenset({KeyType.AES128})),
                 4: Slot(4, frozenset({KeyType.AES192}))}
    return Unit(MemoryUnitStore(UnitState.new(sn, Secret(t), dict(slots),
                                              verify_key=verify_key, suites=suites)))


def _client(authority: Authority) -> AuthorityClient:
    return AuthorityClient(LocalConnection(authority), suites=authority.capabilities().suites)


def _uc(unit: Unit) -> UnitClient:
    return UnitClient(LocalConnection(unit))


def _snapshot(unit: Unit) -> list[tuple[int, bytes | None, bytes | None, bytes | None]]:
    return [(s.ref2, s.header, s.kcv, None if s.key is None else bytes(s.key.buffer))
            for s in sorted(unit.state.slots.values(), key=lambda s: s.ref2)]


# -- the SoftHSM helper -----------------------------------------------------------------
def test_softhsm_helper_private_dir_and_labels(tmp_path: Path) -> None:
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    conf = write_conf(tmp_path / "h")
    assert (tmp_path / "h" / "tokens").stat().st_mode & 0o777 == 0o700
    assert f"directories.tokendir = {tmp_path / 'h' / 'tokens'}/" in conf.read_text()
    tok = make_token(tmp_path / "h", label="one", user_pin=PIN, activate=False)
    assert tok.conf == conf and tok.label == "one" and Path(tok.module).is_file()
    assert token_labels(conf) == ["one"]
    with pytest.raises(SoftHsmError, match="already exists"):
        make_token(tmp_path / "h", label="one", activate=False)


# -- conformance vectors, byte for byte ------------------------------------------------
@dataclass
class VectorWorld:
    ks: Any
    authority: Authority
    refused: dict[str, Exception]


@pytest.fixture(scope="module")
def vectors(hsm: Hsm) -> VectorWorld:
    ks = hsm.open("vectors", clear_sas=True)
    refused: dict[str, Exception] = {}
    for c in SUITE2_EXPORTS:
        if c["signing_key"] is not None:
            pub = ks.set_signing_key(Secret(bytes.fromhex(c["signing_key"])))
            assert c["verify_key"] is None or pub.hex() == c["verify_key"]
    for c in SUITE2_EXPORTS:
        info = ks.add_set(Secret(bytes.fromhex(c["T"])), c["name"],
                          signed=c["signing_key"] is not None)
        assert info.set_id.hex() == c["expected"]["set_id"]
        k = c["key"]
        try:
            ks.add_key(bytes.fromhex(c["REF1"]), KeyType(k["type"]),
                       Secret(bytes.fromhex(k["value"])),
                       KeyAttributes(k["usage"], k["mode"], k["exportability"]),
                       version=k["version"], diversify=k["diversify"], policy=ANY)
        except ValueError as e:
            refused[c["name"]] = e
    return VectorWorld(ks, Authority(ks), refused)


def test_vectors_cover_every_suite2_case() -> None:
    assert len(SUITE2_EXPORTS) >= 4
    types = {c["key"]["type"] for c in SUITE2_EXPORTS}
    assert {1, 2, 3, 0x10} <= types
    assert any(c["signing_key"] for c in SUITE2_EXPORTS)
    assert any(c["key"]["diversify"] and c["key"]["type"] == 2 for c in SUITE2_EXPORTS)


@pytest.mark.parametrize("case", SUITE2_EXPORTS, ids=[c["name"] for c in SUITE2_EXPORTS])
def test_suite2_vector_byte_for_byte(vectors: VectorWorld, case: dict[str, Any]) -> None:
    e = case["expected"]
    length = len(case["key"]["value"]) // 2
    if length % 8 and not vectors.ks.wraps_any_length:
        # SoftHSM 2.6.1: CKM_AES_KEY_WRAP_PAD writes the zero-padded length into the
        # RFC 5649 header; such a key is refused at import, plainly (module doc).
        err = vectors.refused[case["name"]]
        assert "RFC 5649" in str(err) and f"{length}-byte" in str(err)
        with pytest.raises(NoSuchKey):
            vectors.authority.export(bytes.fromhex(e["export_request"]))
        return
    assert case["name"] not in vectors.refused
    before = vectors.ks.session_object_count()
    out = vectors.authority.export(bytes.fromhex(e["export_request"]))
    assert out.hex() == e["export_response"]
    assert vectors.ks.session_object_count() == before == 0
    # the receipt the token computes is the one of docs/protocol.md §4
    h, kcv_ = bytes.fromhex(e["H"]), bytes.fromhex(e["kcv"])
    sn, r = bytes.fromhex(case["SN"]), bytes.fromhex(case["R"])
    set_id = bytes.fromhex(e["set_id"])
    want = klp1.receipt(get_suite(2), bytes.fromhex(case["T"]), sn, r, case["REF2"], h, kcv_)
    assert vectors.ks.receipt(2, set_id, sn, r, case["REF2"], h, kcv_) == want
    vectors.authority.verify_receipt(suite=2, set_id=set_id, sn=sn, r=r, ref2=case["REF2"],
                                     h=h, kcv=kcv_, rct=want)


def test_suite1_vector_refused_6a81(vectors: VectorWorld) -> None:
    """The same set and key with suite 0x01: the Authority refuses it from capabilities."""
    c = next(c for c in SUITE2_EXPORTS if c["name"] not in vectors.refused)
    req = msg.ExportRequest.decode(bytes.fromhex(c["expected"]["export_request"]))
    req1 = msg.ExportRequest(req.sn, req.r, req.set_id, 1, req.ref1, req.ref2)
    with pytest.raises(Unsupported) as e:
        vectors.authority.export(req1.encode())
    assert e.value.sw == SW.UNSUPPORTED
    with pytest.raises(Unsupported):  # and the backend alone refuses it too
        vectors.ks.export(req1)
    apdu = CommandAPDU(0x80, 0x12, 0, 0, req1.encode(), ne=256).encode()
    assert ResponseAPDU.decode(vectors.authority.process_apdu(apdu)).sw == 0x6A81


def test_capabilities(vectors: VectorWorld) -> None:
    caps = vectors.authority.capabilities()
    assert caps.suites == frozenset({2, 3}) and caps.ed25519 and caps.backend == "pkcs11"


def test_imported_T_set_id_is_software_kcv(hsm: Hsm) -> None:
    ks = hsm.open("gen")
    t = os.urandom(32)
    assert ks.add_set(Secret(t), "imported").set_id == aes_kcv(t)


# -- key check values of keys generated in the token ------------------------------------
def _dbl(b: bytes) -> bytes:
    n = int.from_bytes(b, "big") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ 0x87
    return n.to_bytes(16, "big")


def _ecb_oracle(ks: Any, key: Any, block: bytes) -> bytes:
    """AES-ECB_T(block) read out of an extractable derived key: what SoftHSM lets any
    logged-in application do with a DERIVE key (module doc, 'not enforced')."""
    tmpl = p11.secret_template(ck.KeyType.GENERIC_SECRET, token=False, extractable=True,
                               sensitive=False)
    d = p11_objects.derive(key, block, tmpl, 128)
    try:
        return bytes(d[ck.Attribute.VALUE])
    finally:
        d.destroy()


def test_generated_T_set_id_is_its_kcv(hsm: Hsm) -> None:
    """KCV(T) = AES-CMAC(T, 0^16) = E_T(dbl(E_T(0))): checked independently of the token's
    CMAC, through two ECB derivations (a test-only oracle; see the module doc)."""
    k = os.urandom(32)
    l_ = bytearray(16)
    aes_ecb_encrypt_into(k, bytes(16), l_)
    m = bytearray(16)
    aes_ecb_encrypt_into(k, _dbl(bytes(l_)), m)
    assert bytes(m) == aes_cmac(k, bytes(16))  # the formula itself
    ks = hsm.open("gen")
    info = ks.generate_set("generated")
    t = ks._sets[info.set_id].key
    l_token = _ecb_oracle(ks, t, bytes(16))
    assert _ecb_oracle(ks, t, _dbl(l_token))[:5] == info.set_id
    a = t.get_attributes([ck.Attribute.NEVER_EXTRACTABLE, ck.Attribute.ALWAYS_SENSITIVE,
                          ck.Attribute.LOCAL, ck.Attribute.SIGN, ck.Attribute.DERIVE,
                          ck.Attribute.EXTRACTABLE, ck.Attribute.MODIFIABLE])
    assert a == {ck.Attribute.NEVER_EXTRACTABLE: True, ck.Attribute.ALWAYS_SENSITIVE: True,
                 ck.Attribute.LOCAL: True, ck.Attribute.SIGN: False, ck.Attribute.DERIVE: True,
                 ck.Attribute.EXTRACTABLE: False, ck.Attribute.MODIFIABLE: False}
    assert ks.session_object_count() == 0


# -- end to end into software units ------------------------------------------------------
@dataclass
class World:
    ks: Any
    authority: Authority
    log: MemoryExportLog
    t: dict[str, bytes]
    sets: dict[str, bytes]
    values: dict[bytes, bytes]  # REF1 -> value, for imported keys

    def unit(self, sn: bytes, set_name: str = "A", **kw: Any) -> Unit:
        if set_name == "S":
            kw.setdefault("verify_key", self.ks.public_key())
        return _unit(sn, self.t[set_name], **kw)


@pytest.fixture(scope="module")
def world(hsm: Hsm) -> World:
    ks = hsm.open("world", clear_sas=True)
    ks.set_signing_key()  # generated in the token
    t = {name: os.urandom(32) for name in "ABS"}
    sets = {name: ks.add_set(Secret(v), f"set {name}", signed=name == "S").set_id
            for name, v in t.items()}
    values = {b"AES": os.urandom(32), b"DIV128": os.urandom(16), b"DIV192": os.urandom(24),
              b"MAC": os.urandom(64), b"A128": os.urandom(16), b"ONLY-B-SLOT1": os.urandom(32)}
    specs: list[tuple[bytes, KeyType, KeyAttributes, int, bool, ExportPolicy]] = [
        (b"AES", KeyType.AES256, KeyAttributes("K0", "B", "E"), 5, False, ANY),
        (b"DIV128", KeyType.AES128, KeyAttributes("K0", "B", "E"), 1, True, ANY),
        (b"DIV192", KeyType.AES192, KeyAttributes("K0", "B", "E"), 1, True, ANY),
        (b"MAC", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"), 1, False, ANY),
        (b"A128", KeyType.AES128, KeyAttributes("P0", "E", "N"), 1, False, ANY),
        (b"ONLY-B-SLOT1", KeyType.AES256, KeyAttributes("K0", "B", "E"), 1, False,
         ExportPolicy(frozenset({sets["B"]}), frozenset({1}))),
    ]
    for ref1, kt, attrs, version, div, policy in specs:
        ks.add_key(ref1, kt, Secret(values[ref1]), attrs, version=version, diversify=div,
                   policy=policy)
    ks.generate_key(b"GEN", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=False, policy=ANY)
    ks.generate_key(b"GENDIV", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=ANY)
    ks.generate_key(b"GENMAC", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"), version=1,
                    diversify=False, policy=ANY, length=32)
    log = MemoryExportLog()
    return World(ks, Authority(ks, log=log), log, t, sets, values)


@pytest.mark.parametrize(("ref1", "ref2", "set_name"), [
    (b"AES", 1, "A"), (b"AES", 1, "S"), (b"DIV128", 3, "A"), (b"DIV192", 4, "S"),
    (b"DIV192", 4, "A"), (b"MAC", 2, "A"), (b"MAC", 2, "S"), (b"GEN", 1, "B"),
    (b"GENDIV", 1, "S"), (b"GENMAC", 2, "A"), (b"A128", 3, "S"),
])
def test_load_into_software_unit(world: World, ref1: bytes, ref2: int, set_name: str) -> None:
    sn = os.urandom(8)
    unit = world.unit(sn, set_name)
    res = load_key(_uc(unit), _client(world.authority), ref1, ref2)
    info = world.ks.key_info(ref1)
    slot = unit.state.slots[ref2]
    assert slot.key is not None and slot.kcv == res.kcv == kcv(info.key_type, slot.key.buffer)
    h = KeyHeader.decode(res.header)
    assert h.suite == 2 and h.ed25519 == (set_name == "S") and h.diversified == info.diversify
    if info.diversify:
        if ref1 in world.values:  # the token's TA' is KLP1's, byte for byte (AES-192 too)
            want = bytearray(info.length)
            ecbdiv_into(world.values[ref1], want, label=klp1.LABEL_TA, context=klp1.lv(sn))
            assert slot.key.equals(want)
    else:
        assert res.kcv == info.kcv  # computed once at import or generation
        if ref1 in world.values:
            assert slot.key.equals(world.values[ref1])
    world.authority.verify_receipt(suite=2, set_id=res.set_id, sn=sn, r=res.r, ref2=ref2,
                                   h=res.header, kcv=res.kcv, rct=res.rct)
    bad = bytes([res.rct[0] ^ 0x80]) + res.rct[1:]
    with pytest.raises(IntegrityError):
        world.authority.verify_receipt(suite=2, set_id=res.set_id, sn=sn, r=res.r, ref2=ref2,
                                       h=res.header, kcv=res.kcv, rct=bad)
    assert world.log.records[-1].kcv == res.kcv and world.log.records[-1].suite == 2
    assert world.ks.session_object_count() == 0


def test_diversified_keys_differ_per_unit(world: World) -> None:
    u1, u2 = world.unit(b"U1", "S"), world.unit(b"U2", "S")
    r1 = load_key(_uc(u1), _client(world.authority), b"GENDIV", 1)
    r2 = load_key(_uc(u2), _client(world.authority), b"GENDIV", 1)
    assert r1.kcv != r2.kcv


def test_unit_speaking_only_suite1(world: World) -> None:
    unit = world.unit(b"SUITE1", suites=(1,))
    with pytest.raises(LoadFailed) as e:  # the station knows the authority's suites
        load_key(_uc(unit), _client(world.authority), b"AES", 1)
    assert e.value.sw == 0x6A81
    with pytest.raises(LoadFailed) as e:  # it does not: the authority answers 6A81
        load_key(_uc(unit), AuthorityClient(LocalConnection(world.authority), suites=None),
                 b"AES", 1)
    assert e.value.sw == 0x6A81 and e.value.step == "authority EXPORTKEY"
    assert unit.state.slots[1].key is None


@pytest.mark.parametrize(("ref1", "ref2", "set_name", "sw"), [
    (b"NOPE", 1, "A", 0x6A88),
    (b"ONLY-B-SLOT1", 1, "A", 0x6986),  # set A not allowed
    (b"ONLY-B-SLOT1", 4, "B", 0x6986),  # slot 4 not allowed
    (b"A128", 1, "A", 0x6986),  # the unit's slot 1 takes AES-256 only
])
def test_refusals(world: World, ref1: bytes, ref2: int, set_name: str, sw: int) -> None:
    unit = world.unit(b"REFUSE", set_name)
    before = _snapshot(unit)
    n = len(world.log.records)
    with pytest.raises(LoadFailed) as e:
        load_key(_uc(unit), _client(world.authority), ref1, ref2)
    assert e.value.sw == sw and _snapshot(unit) == before
    if e.value.step.startswith("authority"):
        assert len(world.log.records) == n
    assert world.ks.session_object_count() == 0


def test_unknown_set_6a82(world: World) -> None:
    unit = _unit(b"ALIEN", os.urandom(32))
    with pytest.raises(LoadFailed) as e:
        load_key(_uc(unit), _client(world.authority), b"AES", 1)
    assert isinstance(e.value.cause, UnknownSet) and e.value.sw == 0x6A82


def test_symmetric_sas_needs_clear_sas(hsm: Hsm, world: World) -> None:
    strict = hsm.open("world")  # same token and login, clear_sas False
    assert not strict.clear_sas
    authority = Authority(strict)
    unit = world.unit(b"STRICT", "A")
    with pytest.raises(PolicyRefused, match="symmetric SAS needs the key in clear"):
        i = _uc(unit).initialize()
        authority.export_request(msg.ExportRequest(i.sn, i.r, i.set_id, 2, b"AES", 1))
    with pytest.raises(LoadFailed) as e:
        load_key(_uc(unit), _client(authority), b"AES", 1)
    assert e.value.sw == 0x6986 and unit.state.slots[1].key is None
    signed = world.unit(b"STRICT", "S")  # a signed set needs no key in clear
    res = load_key(_uc(signed), _client(authority), b"DIV192", 4)
    assert signed.state.slots[4].kcv == res.kcv
    assert strict.session_object_count() == 0


def _flip_positions(data: bytes) -> list[int]:
    """Every bit of the values of W, SAS and CAS (not their tags or lengths)."""
    d = msg.ImportData.decode(data)
    bits: list[int] = []
    end = len(data)
    for value in (d.cas, d.sas, d.w):  # from the end, so that each is found at its place
        start = data.rindex(value, 0, end)
        bits += range(8 * start, 8 * (start + len(value)))
        end = start
    return bits


@pytest.mark.parametrize("set_name", ["A", "S"])
def test_tampered_importkey_refused_6982(world: World, set_name: str) -> None:
    unit = world.unit(b"TAMPER", set_name)
    i = _uc(unit).initialize()
    resp = _client(world.authority).export(msg.ExportRequest(i.sn, i.r, i.set_id, 2,
                                                             b"DIV192", 4))
    data = resp.import_data
    for bit in _flip_positions(data):
        victim = world.unit(b"TAMPER", set_name)
        victim.set_challenge(i.r)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        apdu = CommandAPDU(0x80, 0x14, 0, 0, bytes(flipped), ne=256).encode()
        assert ResponseAPDU.decode(victim.process_apdu(apdu)).sw == 0x6982, f"bit {bit}"
        assert victim.state.slots[4].key is None and victim.pending is None
    unit.set_challenge(i.r)  # the untouched data goes in
    apdu = CommandAPDU(0x80, 0x14, 0, 0, data, ne=256).encode()
    assert ResponseAPDU.decode(unit.process_apdu(apdu)).sw == 0x9000


# -- no derived object survives, on success or failure ---------------------------------
def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, nth: int,
             exc: Exception | None = None) -> None:
    real = getattr(p11_export, name)
    calls = {"n": 0}

    def wrapper(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == nth:
            raise exc if exc is not None else pkx.FunctionFailed()
        return real(*a, **kw)

    monkeypatch.setattr(p11_export, name, wrapper)


@pytest.mark.parametrize(("name", "nth", "ref1", "set_name"), [
    ("derive", 1, b"DIV192", "A"),  # T1
    ("derive", 3, b"DIV192", "A"),  # Kmac
    ("derive", 5, b"DIV192", "A"),  # TA'
    ("sign", 1, b"DIV192", "A"),  # KCV of TA'
    ("wrap", 1, b"AES", "S"),  # W
    ("wrap", 2, b"AES", "A"),  # TA' under the ephemeral key (clear SAS)
    ("aes_kwp_unwrap", 1, b"DIV128", "A"),  # on the host
    ("sign", 2, b"GENDIV", "S"),  # Ed25519 SAS
    ("sign", 2, b"MAC", "A"),  # symmetric SAS
    ("sign", 3, b"DIV128", "S"),  # CAS
])
def test_every_derived_object_destroyed_on_failure(
        world: World, monkeypatch: pytest.MonkeyPatch, name: str, nth: int, ref1: bytes,
        set_name: str) -> None:
    tokens_before = world.ks.token_object_count()
    exc = IntegrityError() if name == "aes_kwp_unwrap" else None
    _fail_on(monkeypatch, name, nth, exc)
    unit = world.unit(b"FAIL", set_name)
    i = _uc(unit).initialize()
    req = msg.ExportRequest(i.sn, i.r, i.set_id, 2, ref1, 4 if ref1 == b"DIV192" else 1)
    with pytest.raises((StoreError, IntegrityError)):
        world.authority.export(req.encode())
    assert world.ks.session_object_count() == 0
    assert world.ks.token_object_count() == tokens_before
    monkeypatch.undo()
    world.authority.export(req.encode())  # the keystore still works
    assert world.ks.session_object_count() == 0


def test_no_object_leaks_over_many_exports(world: World) -> None:
    before = world.ks.token_object_count()
    client = _client(world.authority)
    for n in range(20):
        set_name = "AS"[n % 2]
        unit = world.unit(n.to_bytes(4, "big"), set_name)
        for ref1, ref2 in ((b"AES", 1), (b"DIV128", 3), (b"MAC", 2), (b"DIV192", 4)):
            res = load_key(_uc(unit), client, ref1, ref2)
            world.authority.verify_receipt(suite=2, set_id=res.set_id, sn=res.sn, r=res.r,
                                           ref2=ref2, h=res.header, kcv=res.kcv, rct=res.rct)
    assert world.ks.session_object_count() == 0
    assert world.ks.token_object_count() == before


def test_receipt_matches_software(world: World) -> None:
    sn, r, h, kcv_ = b"RCT", os.urandom(16), os.urandom(12), os.urandom(5)
    for name in "AS":
        want = klp1.receipt(get_suite(2), world.t[name], sn, r, 7, h, kcv_)
        assert world.ks.receipt(2, world.sets[name], sn, r, 7, h, kcv_) == want
    with pytest.raises(Unsupported):
        world.ks.receipt(1, world.sets["A"], sn, r, 7, h, kcv_)
    with pytest.raises(UnknownSet):
        world.ks.receipt(2, b"\x00" * 5, sn, r, 7, h, kcv_)
    assert world.ks.session_object_count() == 0


# -- what an auditor sees with pkcs11-tool -----------------------------------------------
def _list_objects(hsm: Hsm, label: str) -> list[dict[str, str]]:
    require(shutil.which("pkcs11-tool") is not None, "pkcs11-tool (Debian: opensc) missing")
    tok = hsm.tokens[label]
    proc = subprocess.run(
        ["pkcs11-tool", "--module", hsm.module, "--token-label", label, "--login",
         "--pin", PIN, "--list-objects"],
        env=tok.env(), capture_output=True, text=True, check=True, timeout=60)
    objects: list[dict[str, str]] = []
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" "):
            objects.append({"kind": line.strip()})
        elif objects and ":" in line:
            k, _, v = line.strip().partition(":")
            objects[-1][k.strip()] = v.strip().strip("'")
    return objects


def _flags(text: str) -> set[str]:
    return {f.strip() for f in text.split(",") if f.strip()}


def test_pkcs11_tool_shows_the_attributes(hsm: Hsm, world: World) -> None:
    gen = hsm.open("lister", clear_sas=True)
    gen.set_signing_key()
    gen.generate_set("generated")
    gen.add_set(Secret(os.urandom(32)), "imported")
    gen.generate_key(b"K", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                     diversify=False, policy=ANY)
    gen.generate_key(b"D", KeyType.AES128, KeyAttributes("K0", "B", "E"), version=1,
                     diversify=True, policy=ANY)
    gen.add_key(b"M", KeyType.HMAC_SHA256, Secret(os.urandom(48)),
                KeyAttributes("M7", "C", "N"), version=1, diversify=False, policy=ANY)
    for label, ks in (("world", world.ks), ("lister", gen)):
        objs = _list_objects(hsm, label)
        assert len(objs) == ks.token_object_count()  # token objects only, none stray
        ts = [o for o in objs if o.get("label", "").startswith("keyload T ")
              and o["kind"].startswith("Secret Key Object")]
        keys = [o for o in objs if o.get("label", "").startswith("keyload key ")
                and o["kind"].startswith("Secret Key Object")]
        assert len(ts) == len(ks.set_infos()) and len(keys) == len(ks.key_infos())
        for o in ts:
            assert "AES length 32" in o["kind"]
            assert o["Usage"] == "derive"
            access = _flags(o["Access"])
            assert "sensitive" in access and "extractable" not in access
        for o in keys:
            access = _flags(o["Access"])
            assert {"sensitive", "extractable"} <= access
            info = next(k for k in ks.key_infos() if o["label"].startswith(
                f"keyload key {display_ref1(k.ref1)} v"))
            assert o["Usage"] == ("derive" if info.diversify else "none")
        sas = [o for o in objs if o.get("label") == "keyload SAS"
               and o["kind"].startswith("Private Key Object")]
        assert len(sas) == 1 and sas[0]["Usage"] == "sign"
        assert "extractable" not in _flags(sas[0]["Access"])
        data = [o for o in objs if o["kind"].startswith("Data object")]
        assert data and all(o["application"] == "keyload" and "private" in o["flags"]
                            for o in data)
    objs = _list_objects(hsm, "lister")
    generated_t = next(o for o in objs if o.get("label", "").startswith("keyload T ")
                       and o["kind"].startswith("Secret Key Object")
                       and "never extractable" in _flags(o.get("Access", "")))
    assert {"sensitive", "always sensitive", "never extractable", "local"} <= \
        _flags(generated_t["Access"])
    assert gen.session_object_count() == 0


# -- persistence, replacement ----------------------------------------------------------
def test_reopen_reads_the_token(hsm: Hsm) -> None:
    ks = hsm.open("gen")
    pub = ks.set_signing_key()
    s = ks.generate_set("persist", signed=True)
    k = ks.generate_key(b"P", KeyType.AES192, KeyAttributes("K0", "B", "E"), version=3,
                        diversify=True, policy=ExportPolicy(frozenset({s.set_id}), None),
                        label="persisted")
    sets, keys = ks.set_infos(), ks.key_infos()
    ks.close()
    again = hsm.open("gen")
    assert again.public_key() == pub
    assert sorted(again.set_infos(), key=lambda x: x.set_id) == sorted(sets,
                                                                       key=lambda x: x.set_id)
    assert sorted(again.key_infos(), key=lambda x: x.ref1) == sorted(keys, key=lambda x: x.ref1)
    assert again.key_info(b"P") == k
    count = again.token_object_count()
    with pytest.raises(ValueError, match="higher version"):
        again.add_key(b"P", KeyType.AES192, Secret(os.urandom(24)),
                      KeyAttributes("K0", "B", "E"), version=3, diversify=True, policy=ANY,
                      replace=True)
    new = again.add_key(b"P", KeyType.AES192, Secret(os.urandom(24)),
                        KeyAttributes("K0", "B", "E"), version=4, diversify=True, policy=ANY,
                        replace=True)
    assert again.token_object_count() == count  # the old key and metadata are gone
    again.close()
    third = hsm.open("gen")
    assert third.key_info(b"P") == new
    with pytest.raises(ValueError, match="already has a signing key"):
        third.set_signing_key()


def test_generated_hmac_needs_a_length_the_token_can_check(hsm: Hsm) -> None:
    ks = hsm.open("gen")
    with pytest.raises(ValueError):
        ks.generate_key(b"SHORT", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"),
                        version=1, diversify=False, policy=ANY, length=20)
    with pytest.raises(ValueError, match="KCV"):
        ks.generate_key(b"SHORT", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"),
                        version=1, diversify=False, policy=ANY, length=24)
    assert ks.session_object_count() == 0


def test_import_consumes_the_value(hsm: Hsm) -> None:
    ks = hsm.open("gen")
    v = Secret(os.urandom(16))
    ks.add_key(b"WIPE", KeyType.AES128, v, KeyAttributes("K0", "B", "E"), version=1,
               diversify=False, policy=ANY)
    assert v.wiped
    t = Secret(os.urandom(31))
    with pytest.raises(ValueError):
        ks.add_set(t, "short")
    assert t.wiped


# -- PIN --------------------------------------------------------------------------------
def test_wrong_pin_is_a_clear_error(hsm: Hsm, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(p11.WrongPin) as e:  # C_Login refuses it
        p11.Pkcs11Keystore.open(hsm.module, "pins", pin="00000000")
    assert isinstance(e.value, WrongPassphrase) and "wrong PIN" in str(e.value)
    ks = p11.Pkcs11Keystore.open(hsm.module, "pins", pin=PIN)
    try:
        with pytest.raises(p11.WrongPin):  # logged in already: checked against the login
            p11.Pkcs11Keystore.open(hsm.module, "pins", pin="00000000")
        monkeypatch.setenv(p11.PIN_ENV, PIN)
        second = p11.Pkcs11Keystore.open(hsm.module, "pins")
        second.close()  # the first keystore keeps the login
        assert ks.token_object_count() == 0 and ks.session_object_count() == 0
    finally:
        ks.close()
    with pytest.raises(p11.WrongPin):  # logged out: C_Login again
        p11.Pkcs11Keystore.open(hsm.module, "pins", pin="00000000")
    monkeypatch.delenv(p11.PIN_ENV)
    with pytest.raises(p11.Pkcs11Error, match=p11.PIN_ENV):
        p11.Pkcs11Keystore.open(hsm.module, "pins")
    with pytest.raises(p11.Pkcs11Error, match="no token labelled"):
        p11.Pkcs11Keystore.open(hsm.module, "no-such-token", pin=PIN)
    with pytest.raises(p11.Pkcs11Error, match="cannot load PKCS#11 module"):
        p11.Pkcs11Keystore.open(str(Path(hsm.module).with_name("missing.so")), "pins", pin=PIN)


# -- the Ed25519 key ---------------------------------------------------------------------
def test_refused_signing_key_import_is_reported(hsm: Hsm, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    ks = hsm.open("fails")
    before = ks.token_object_count()
    # a key the token stores but cannot use (curve parameters it does not sign with)
    monkeypatch.setattr(p11_provision, "ED25519_OID", bytes.fromhex("06032b6571"))  # Ed448
    v = Secret(os.urandom(32))
    with pytest.raises(p11.Pkcs11Error, match="refused the imported Ed25519 private key"):
        ks.set_signing_key(v)
    assert v.wiped and ks.public_key() is None and ks.token_object_count() == before
    monkeypatch.undo()

    # a token whose C_CreateObject refuses a private key with its value
    class Refusing:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def create_object(self, attrs: dict[Any, Any]) -> Any:
            if attrs.get(ck.Attribute.CLASS) == ck.ObjectClass.PRIVATE_KEY:
                raise pkx.TemplateInconsistent()
            return self.inner.create_object(attrs)

    monkeypatch.setattr(ks, "_session", Refusing(ks.session))
    with pytest.raises(p11.Pkcs11Error, match=r"\(TemplateInconsistent\): generate the key"):
        ks.set_signing_key(Secret(os.urandom(32)))
    monkeypatch.undo()
    assert ks.public_key() is None and ks.token_object_count() == before
    pub = ks.set_signing_key()  # generation in the token still works
    assert len(pub) == 32 and ks.token_object_count() == before + 2


def test_keystore_closed(hsm: Hsm) -> None:
    ks = p11.Pkcs11Keystore.open(hsm.module, "fails", pin=PIN)
    ks.close()
    ks.close()
    with pytest.raises(p11.Pkcs11Error, match="closed"):
        ks.session_object_count()


def test_error_text_has_no_key_material(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on(monkeypatch, "wrap", 1)
    unit = world.unit(b"QUIET", "S")
    i = _uc(unit).initialize()
    with pytest.raises(p11.Pkcs11Error) as e:
        world.authority.export(msg.ExportRequest(i.sn, i.r, i.set_id, 2, b"AES", 1).encode())
    text = str(e.value)
    assert re.fullmatch(r"the token refused to export the key \(FunctionFailed\)", text)
    assert world.values[b"AES"].hex() not in text


# -- AES DUKPT: a BDK's initial keys and working keys, derived in the token ------------------
def test_dukpt_ik_and_working_keys_are_derived_in_the_token(hsm: Hsm) -> None:
    """docs/protocol.md Appendix D: the BDK stays in the token (DERIVE only, never
    extractable); the unit receives the X9.24-3 supplement's IK as B1; the first
    transaction's working keys have the vector's KCVs; no session object is left."""
    dukpt = json.loads((VECTORS / "dukpt" / "aes128_x9_24_3_supplement.json").read_text())
    v = dukpt["aes128_bdk"]
    ks = hsm.open("dukpt", clear_sas=True)
    t = os.urandom(32)
    ks.add_set(Secret(t), "terminals")
    ks.add_key(b"BDK", KeyType.AES128, Secret(bytes.fromhex(v["bdk"])),
               KeyAttributes("B0", "X", "N"), version=2, diversify=False,
               policy=ExportPolicy(None, None, initial_keys_only=True))
    bdk = ks._keys[b"BDK"].key
    assert bdk[ck.Attribute.EXTRACTABLE] is False and bdk[ck.Attribute.DERIVE] is True
    log = MemoryExportLog()
    authority = Authority(ks, log=log)
    unit = _unit(b"TERM-1", t)
    with pytest.raises(LoadFailed) as refused:
        load_key(_uc(unit), _client(authority), b"BDK", 3)
    assert refused.value.sw == SW.POLICY and log.records == []
    authority.order_initial_key(b"TERM-1", b"BDK", 3,
                                InitialKeyOrder(InitialKeyId.parse(v["initial_key_id"])))
    res = load_key(_uc(unit), _client(authority), b"BDK", 3)
    ik = bytes.fromhex(v["initial_key"])
    slot = unit.state.slots[3]
    assert slot.key is not None and slot.key.equals(ik) and res.kcv == aes_kcv(ik)
    assert KeyHeader.decode(res.header).usage == "B1"
    assert log.records[-1].initial_key_id == bytes.fromhex(v["initial_key_id"])
    first = v["transactions"][0]
    for usage, name in ((KeyUsage.PIN_ENCRYPTION, "pin_key_aes128"),
                        (KeyUsage.MAC_GENERATION, "mac_generation_key_aes128"),
                        (KeyUsage.DATA_ENCRYPTION, "data_encryption_key_aes128")):
        assert ks.dukpt_kcv(b"BDK", bytes.fromhex(first["ksn"]), usage) == \
            (KeyType.AES128, aes_kcv(bytes.fromhex(first[name])))
    assert ks.session_object_count() == 0
