"""KLP1 cryptography (keyload.core.klp1) against klp1-public.json, Scratch wiping, Secret.

Export cases are reproduced through the pure functions (derive_t1, derive_session,
diversify_into, export_key). Import cases are replayed through a minimal unit written here
(docs/protocol.md §7 steps 1-4 and the slot policy of step 6 in the test, steps 5-8 by
``open_import``) so that every status word of the vectors is checked against the core.
"""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tests.conftest import KLP1_VECTORS

from keyload.core import klp1
from keyload.core.errors import (
    AuthenticityError,
    IntegrityError,
    MalformedData,
    PolicyRefused,
    StatusError,
    Unsupported,
)
from keyload.core.keys import KeyHeader, KeyType, kcv
from keyload.core.klp1 import (
    Scratch,
    cas_message,
    derive_session,
    derive_t1,
    diversify_into,
    export_key,
    open_import,
    receipt,
    symmetric_sas,
    verify_receipt,
)
from keyload.core.messages import ImportData, ImportResponse
from keyload.core.primitives import aes_cmac, aes_kwp_wrap
from keyload.core.secret import Secret, scrub, wiping
from keyload.core.suites import get_suite

KLP1 = json.loads(KLP1_VECTORS.read_text())
EXPORTS = [c for c in KLP1["cases"] if c["kind"] == "export"]
IMPORTS = [c for c in KLP1["cases"] if c["kind"] == "import"]
BY_NAME = {c["name"]: c for c in KLP1["cases"]}
EXPORT_BY_INDEX = {c["name"].split("-")[1]: c for c in EXPORTS}  # "export-3-suite1-…" -> "3"


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def _export_params() -> list[Any]:
    assert len(EXPORTS) == 9
    return [pytest.param(c, id=c["name"]) for c in EXPORTS]


def _signer(case: dict[str, Any]) -> Ed25519PrivateKey | None:
    sk = case["signing_key"]
    return Ed25519PrivateKey.from_private_bytes(_h(sk)) if sk else None


def _export(case: dict[str, Any], scratch: Scratch | None = None, signer: Any = None) -> Any:
    key = case["key"]
    return export_key(
        get_suite(case["suite"]), _h(case["T"]), _h(case["SN"]), _h(case["R"]), case["REF2"],
        key_type=KeyType(key["type"]), key=_h(key["value"]), usage=key["usage"],
        mode=key["mode"], version=key["version"], exportability=key["exportability"],
        diversify=key["diversify"], signer=signer if signer is not None else _signer(case),
        scratch=scratch,
    )


# =========================================================================================
# Export vectors
# =========================================================================================


@pytest.mark.parametrize("case", _export_params())
def test_derivations(case: dict[str, Any]) -> None:
    exp = case["expected"]
    suite = get_suite(case["suite"])
    sn, r = _h(case["SN"]), _h(case["R"])
    t1 = bytearray(32)
    derive_t1(suite, _h(case["T"]), sn, t1)
    assert bytes(t1) == _h(exp["T1"])
    session = bytearray(96)
    derive_session(suite, t1, sn, r, case["REF2"], session)
    assert bytes(session) == _h(exp["Kenc"]) + _h(exp["Kmac"]) + _h(exp["Ksas"])
    value = _h(case["key"]["value"])
    if case["key"]["diversify"]:
        ta = bytearray(len(value))
        diversify_into(suite, value, sn, ta)
        assert bytes(ta) == _h(exp["TA_loaded"])
        assert bytes(ta) != value
    else:
        assert _h(exp["TA_loaded"]) == value


@pytest.mark.parametrize("case", _export_params())
def test_export_key_vector(case: dict[str, Any]) -> None:
    exp = case["expected"]
    out = _export(case)
    assert out.header == _h(exp["H"])
    assert out.kcv == _h(exp["kcv"])
    assert out.import_data == _h(exp["import_data"])
    d = ImportData.decode(out.import_data)
    assert (d.w, d.sas, d.cas) == (_h(exp["W"]), _h(exp["SAS"]), _h(exp["CAS"]))
    # the pieces agree with the intermediates of the vector
    kenc, kmac, ksas = _h(exp["Kenc"]), _h(exp["Kmac"]), _h(exp["Ksas"])
    ta = _h(exp["TA_loaded"])
    sn, r, ref2 = _h(case["SN"]), _h(case["R"]), case["REF2"]
    assert aes_kwp_wrap(kenc, ta) == d.w
    assert aes_cmac(kmac, cas_message(sn, r, ref2, d.h, d.w, d.sas)) == d.cas
    if case["signing_key"] is None:
        assert symmetric_sas(ksas, d.h, ta) == d.sas
        assert not KeyHeader.decode(d.h).ed25519
    else:
        assert len(d.sas) == 64
        assert KeyHeader.decode(d.h).ed25519
        pub = _signer(case).public_key()  # type: ignore[union-attr]
        pub.verify(d.sas, klp1.sas_message_ed25519(d.h, sn, ref2, ta))


@pytest.mark.parametrize("case", _export_params())
def test_export_key_accepts_buffers(case: dict[str, Any]) -> None:
    """T and TA as bytearray / memoryview give the same bytes (keys may sit in Secrets)."""
    key = case["key"]
    t = Secret(_h(case["T"]))
    ta = Secret(_h(key["value"]))
    out = export_key(
        get_suite(case["suite"]), t.buffer, _h(case["SN"]), _h(case["R"]), case["REF2"],
        key_type=KeyType(key["type"]), key=memoryview(ta.buffer), usage=key["usage"],
        mode=key["mode"], version=key["version"], exportability=key["exportability"],
        diversify=key["diversify"], signer=_signer(case),
    )
    assert out.import_data == _h(case["expected"]["import_data"])
    # the caller's key buffers are not the function's to wipe
    assert t.buffer == _h(case["T"]) and ta.buffer == _h(key["value"])


def test_export_key_refuses_diversified_hmac() -> None:
    case = next(c for c in EXPORTS if c["key"]["type"] == 0x10)
    bad = copy.deepcopy(case)
    bad["key"]["diversify"] = True
    sc = Scratch()
    with pytest.raises(ValueError):
        _export(bad, scratch=sc)
    assert sc.wiped


# =========================================================================================
# Receipts
# =========================================================================================


def _export_for(imp: dict[str, Any]) -> dict[str, Any]:
    return EXPORT_BY_INDEX[imp["name"].split("-")[1]]


@pytest.mark.parametrize(
    "imp", [pytest.param(c, id=c["name"]) for c in IMPORTS if c["expected"]["sw"] == "9000"])
def test_receipt_agrees_with_import_ok(imp: dict[str, Any]) -> None:
    ex = _export_for(imp)
    data = ImportData.decode(_h(imp["import_data"]))
    t, sn, r = _h(imp["T"]), _h(imp["SN"]), _h(imp["R"])
    assert (t, sn, r) == (_h(ex["T"]), _h(ex["SN"]), _h(ex["R"]))
    want = _h(imp["expected"]["receipt"])
    kcv_ = _h(imp["expected"]["kcv"])
    assert kcv_ == _h(ex["expected"]["kcv"])
    suite = get_suite(imp["suite"])
    sc = Scratch()
    got = receipt(suite, t, sn, r, data.ref2, data.h, kcv_, scratch=sc)
    assert got == want
    assert sc.wiped
    # the receipt uses Kmac of this download
    kmac = _h(ex["expected"]["Kmac"])
    assert aes_cmac(kmac, klp1.rct_message(sn, r, data.ref2, data.h, kcv_)) == want
    verify_receipt(suite, t, sn, r, data.ref2, data.h, kcv_, want)
    bad = bytearray(want)
    bad[0] ^= 1
    with pytest.raises(IntegrityError):
        verify_receipt(suite, t, sn, r, data.ref2, data.h, kcv_, bytes(bad))
    with pytest.raises(IntegrityError):
        verify_receipt(suite, t, sn, r, data.ref2, data.h, bytes(5), want)
    with pytest.raises(IntegrityError):
        verify_receipt(suite, t, sn, bytes(16), data.ref2, data.h, kcv_, want)
    with pytest.raises(IntegrityError):
        verify_receipt(suite, t, sn, r, data.ref2, data.h, kcv_, want[:15])


# =========================================================================================
# Import vectors, through a minimal unit
# =========================================================================================


class _Unit:
    """docs/protocol.md §7 steps 1-4 and the step-6 slot policy; steps 5-8 are open_import."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.t = _h(case["T"])
        self.sn = _h(case["SN"])
        self.r = _h(case["R"]) if case["R"] is not None else None
        self.slots = {s["ref2"]: s for s in case["slots"]}
        self.verify_key = _h(case["verify_key"]) if case["verify_key"] else None

    def policy_for(self, slot: dict[str, Any]) -> Any:
        def check(h: KeyHeader) -> None:
            if slot["locked"]:
                raise PolicyRefused("locked")
            if h.key_type not in slot["accepts"]:
                raise PolicyRefused("key type")
            if slot["version"] is not None and h.version <= slot["version"]:
                raise PolicyRefused("version")
        return check

    def importkey(self, raw: bytes, scratch: Scratch) -> tuple[str, Any]:
        if self.r is None:
            return "6985", None
        r, self.r = self.r, None  # consumed whatever the outcome
        try:
            data = ImportData.decode(raw)
        except MalformedData:
            return "6A80", None
        slot = self.slots.get(data.ref2)
        if slot is None:
            return "6A88", None
        header = KeyHeader.decode(data.h)
        try:
            header.check_supported((1, 2))
        except Unsupported:
            return "6A81", None
        try:
            opened = open_import(get_suite(header.suite), self.t, self.sn, r, data, header,
                                 check_policy=self.policy_for(slot),
                                 verify_key=self.verify_key, scratch=scratch)
        except StatusError as e:
            return f"{int(e.sw):04X}", None
        return "9000", opened


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in IMPORTS])
def test_import_vector(case: dict[str, Any]) -> None:
    unit = _Unit(case)
    sc = Scratch()
    sw, opened = unit.importkey(_h(case["import_data"]), sc)
    exp = case["expected"]
    assert sw == exp["sw"].upper()
    assert sc.wiped
    if sw != "9000":
        assert opened is None
        return
    assert opened.key.equals(_h(exp["stored"]))
    assert opened.kcv == _h(exp["kcv"])
    assert opened.rct == _h(exp["receipt"])
    assert ImportResponse(opened.kcv, opened.rct).encode() == _h(exp["response"])
    assert opened.header == KeyHeader.decode(ImportData.decode(_h(case["import_data"])).h)
    # the challenge is single use
    assert unit.importkey(_h(case["import_data"]), Scratch())[0] == "6985"


def test_import_vectors_cover_every_sw() -> None:
    sws = {c["expected"]["sw"].upper() for c in IMPORTS}
    assert sws == {"9000", "6985", "6982", "6A88", "6986", "6A80", "6988", "6A81"}


# =========================================================================================
# open_import round trip and Scratch wiping on every path
# =========================================================================================


class _Spy:
    """Records whether the Scratch held live (non-zero) material when called."""

    def __init__(self, scratch: Scratch, inner: Any = None, raise_: Exception | None = None):
        self.scratch = scratch
        self.inner = inner
        self.raise_ = raise_
        self.live: list[bool] = []

    def sign(self, data: bytes) -> bytes:
        self.live.append(not self.scratch.wiped)
        return self.inner.sign(data)  # type: ignore[no-any-return]

    def __call__(self, header: KeyHeader) -> None:
        self.live.append(not self.scratch.wiped)
        if self.raise_ is not None:
            raise self.raise_


SYM = [c for c in EXPORTS if c["signing_key"] is None]
SIGNED = [c for c in EXPORTS if c["signing_key"] is not None]


@pytest.mark.parametrize("case", _export_params())
def test_export_key_wipes_scratch(case: dict[str, Any]) -> None:
    sc = Scratch()
    if case["signing_key"]:
        spy = _Spy(sc, inner=_signer(case))
        out = _export(case, scratch=sc, signer=spy)
        assert spy.live == [True]  # the session keys were in this scratch while signing
    else:
        out = _export(case, scratch=sc)
    assert out.import_data == _h(case["expected"]["import_data"])
    assert sc.wiped
    if case["key"]["diversify"]:
        assert len(sc.ta) == len(_h(case["key"]["value"]))  # TA' went through this scratch
    # reused scratch gives the same answer
    assert _export(case, scratch=sc).import_data == out.import_data
    assert sc.wiped


def _open(case: dict[str, Any], data: ImportData, *, sc: Scratch, policy: Any = None,
          verify_key: bytes | None = None, header: KeyHeader | None = None,
          r: bytes | None = None) -> klp1.Opened:
    return open_import(
        get_suite(case["suite"]), _h(case["T"]), _h(case["SN"]),
        r if r is not None else _h(case["R"]), data,
        header if header is not None else KeyHeader.decode(data.h),
        check_policy=policy if policy is not None else (lambda h: None),
        verify_key=verify_key, scratch=sc,
    )


def _pub(case: dict[str, Any]) -> bytes:
    sk = _signer(case)
    assert sk is not None
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _forge(case: dict[str, Any], *, h: bytes | None = None, w: bytes | None = None,
           sas: bytes | None = None) -> ImportData:
    """Import data with some fields replaced and a *valid* CAS (computed with the vector's
    Kmac), so that the check under test is the one after CAS."""
    exp = case["expected"]
    d = ImportData.decode(_h(exp["import_data"]))
    h = d.h if h is None else h
    w = d.w if w is None else w
    sas = d.sas if sas is None else sas
    cas = aes_cmac(_h(exp["Kmac"]),
                   cas_message(_h(case["SN"]), _h(case["R"]), d.ref2, h, w, sas))
    return ImportData(d.ref2, h, w, sas, cas)


@pytest.mark.parametrize("case", _export_params())
def test_open_import_round_trip(case: dict[str, Any]) -> None:
    sc = Scratch()
    out = _export(case)
    data = ImportData.decode(out.import_data)
    policy = _Spy(sc)
    vk = _pub(case) if case["signing_key"] else None
    opened = _open(case, data, sc=sc, policy=policy, verify_key=vk)
    assert policy.live == [True]
    assert sc.wiped
    assert len(sc.ta) == len(_h(case["expected"]["TA_loaded"]))  # TA' sat in the scratch
    assert opened.key.equals(_h(case["expected"]["TA_loaded"]))
    assert opened.kcv == out.kcv
    assert opened.header == KeyHeader.decode(out.header)
    rct = receipt(get_suite(case["suite"]), _h(case["T"]), _h(case["SN"]), _h(case["R"]),
                  case["REF2"], out.header, out.kcv)
    assert opened.rct == rct
    opened.key.wipe()
    assert opened.key.wiped


def _flip(b: bytes, i: int = -1) -> bytes:
    x = bytearray(b)
    x[i] ^= 0x01
    return bytes(x)


@pytest.mark.parametrize("case", _export_params())
def test_open_import_bad_cas(case: dict[str, Any]) -> None:
    d = ImportData.decode(_h(case["expected"]["import_data"]))
    vk = _pub(case) if case["signing_key"] else None
    policy = _Spy(Scratch())
    for bad in (
        ImportData(d.ref2, d.h, d.w, d.sas, _flip(d.cas)),
        ImportData(d.ref2, _flip(d.h, 8), d.w, d.sas, d.cas),
        ImportData(d.ref2, d.h, _flip(d.w, 0), d.sas, d.cas),
        ImportData(d.ref2, d.h, d.w, _flip(d.sas), d.cas),
        ImportData(d.ref2 % 254 + 1, d.h, d.w, d.sas, d.cas),
    ):
        sc = Scratch()
        with pytest.raises(IntegrityError):
            _open(case, bad, sc=sc, policy=policy, verify_key=vk)
        assert sc.wiped
    sc = Scratch()
    with pytest.raises(IntegrityError):
        _open(case, d, sc=sc, policy=policy, verify_key=vk, r=_flip(_h(case["R"])))
    assert sc.wiped
    assert policy.live == []  # CAS is checked before the policy (docs/protocol.md §7 step 5)


@pytest.mark.parametrize("case", _export_params())
def test_open_import_policy_refused(case: dict[str, Any]) -> None:
    d = ImportData.decode(_h(case["expected"]["import_data"]))
    sc = Scratch()
    policy = _Spy(sc, raise_=PolicyRefused("slot locked"))
    vk = _pub(case) if case["signing_key"] else None
    with pytest.raises(PolicyRefused):
        _open(case, d, sc=sc, policy=policy, verify_key=vk)
    assert policy.live == [True]
    assert sc.wiped
    assert len(sc.ta) == 0  # refused before anything was unwrapped


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in SYM])
def test_open_import_wrong_symmetric_sas(case: dict[str, Any]) -> None:
    good = ImportData.decode(_h(case["expected"]["import_data"]))
    data = _forge(case, sas=_flip(good.sas))
    sc = Scratch()
    with pytest.raises(AuthenticityError):
        _open(case, data, sc=sc)
    assert sc.wiped
    assert len(sc.ta) > 0  # failed after the unwrap, and TA' was wiped anyway
    # a unit holding an authority key refuses a symmetric SAS (no downgrade)
    sc = Scratch()
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    with pytest.raises(AuthenticityError):
        _open(case, good, sc=sc, verify_key=other.public_bytes(Encoding.Raw, PublicFormat.Raw))
    assert sc.wiped


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in SIGNED])
def test_open_import_wrong_signature(case: dict[str, Any]) -> None:
    good = ImportData.decode(_h(case["expected"]["import_data"]))
    vk = _pub(case)
    for data, key in (
        (_forge(case, sas=_flip(good.sas, 5)), vk),  # bad signature, valid CAS
        (good, bytes(range(32))),  # another authority key (32 bytes, maybe not a point)
        (good, Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)),
    ):
        sc = Scratch()
        with pytest.raises(AuthenticityError):
            _open(case, data, sc=sc, verify_key=key)
        assert sc.wiped
    # a unit without an authority key refuses a signed SAS
    sc = Scratch()
    with pytest.raises(AuthenticityError):
        _open(case, good, sc=sc, verify_key=None)
    assert sc.wiped


@pytest.mark.parametrize("case", _export_params())
def test_open_import_wrong_length(case: dict[str, Any]) -> None:
    """W holds 8 bytes more than H[3] says (H fits its type, CAS valid): IntegrityError
    after the unwrap (docs/protocol.md §7 step 7)."""
    exp = case["expected"]
    ta = _h(exp["TA_loaded"])
    data = _forge(case, w=aes_kwp_wrap(_h(exp["Kenc"]), ta + bytes(8)))
    sc = Scratch()
    vk = _pub(case) if case["signing_key"] else None
    with pytest.raises(IntegrityError):
        _open(case, data, sc=sc, verify_key=vk)
    assert sc.wiped
    assert len(sc.ta) == len(ta) + 8


@pytest.mark.parametrize("case", _export_params())
def test_open_import_length_not_fitting_type(case: dict[str, Any]) -> None:
    """H[3] that does not fit the key type (CAS valid): PolicyRefused (6986, §7 step 6),
    before anything is unwrapped, whatever the caller's slot policy says."""
    exp = case["expected"]
    h = bytearray(_h(exp["H"]))
    h[3] = 15 if h[2] == KeyType.HMAC_SHA256 else h[3] + 8
    data = _forge(case, h=bytes(h))
    sc = Scratch()
    vk = _pub(case) if case["signing_key"] else None
    with pytest.raises(PolicyRefused):
        _open(case, data, sc=sc, verify_key=vk)
    assert sc.wiped
    assert len(sc.ta) == 0  # nothing was unwrapped


@pytest.mark.parametrize("case", _export_params())
def test_open_import_unwrap_failure(case: dict[str, Any]) -> None:
    """W that does not unwrap under Kenc (CAS valid): IntegrityError, scratch wiped."""
    good = ImportData.decode(_h(case["expected"]["import_data"]))
    sc = Scratch()
    vk = _pub(case) if case["signing_key"] else None
    for w in (_flip(good.w, 3), good.w[:-8], bytes(len(good.w))):
        with pytest.raises(IntegrityError):
            _open(case, _forge(case, w=w), sc=sc, verify_key=vk)
        assert sc.wiped


@pytest.mark.parametrize("case", _export_params())
def test_receipt_wipes_scratch(case: dict[str, Any]) -> None:
    sc = Scratch()
    exp = case["expected"]
    r1 = receipt(get_suite(case["suite"]), _h(case["T"]), _h(case["SN"]), _h(case["R"]),
                 case["REF2"], _h(exp["H"]), _h(exp["kcv"]), scratch=sc)
    assert sc.wiped
    assert len(r1) == 16
    imp = BY_NAME["import-" + case["name"].split("-")[1] + "-ok"]
    assert r1 == _h(imp["expected"]["receipt"])


def test_scratch_wipe() -> None:
    sc = Scratch()
    assert sc.wiped
    sc.t1[0] = 1
    assert not sc.wiped
    sc.wipe()
    assert sc.wiped
    sc.ta = bytearray(b"\x00\x05")
    assert not sc.wiped
    sc.wipe()
    assert sc.wiped and sc.ta == bytearray(2)


# =========================================================================================
# Secret
# =========================================================================================


def test_secret_repr_is_redacted() -> None:
    value = bytes(range(0xA0, 0xB0))
    s = Secret(value)
    for text in (repr(s), str(s), f"{s}", f"{s!s}", f"{s:>40}", "%s" % (s,)):  # noqa: UP031
        assert value.hex() not in text.lower()
        assert "a0a1" not in text.lower()
        assert "16 bytes redacted" in text
    assert repr(s) == "Secret(<16 bytes redacted>)"
    assert repr([s]) == "[Secret(<16 bytes redacted>)]"


def test_secret_wipe_and_buffer() -> None:
    s = Secret(bytes(range(1, 33)))
    assert len(s) == 32
    assert not s.wiped
    assert bytes(s) == bytes(range(1, 33))
    assert s.hex() == bytes(range(1, 33)).hex()
    buf = s.buffer
    s.wipe()
    assert s.wiped
    assert buf == bytearray(32)  # the live buffer itself was zeroed
    assert len(s) == 32
    assert Secret(8).buffer == bytearray(8)


def test_secret_equals() -> None:
    a = Secret(b"0123456789abcdef")
    assert a.equals(Secret(b"0123456789abcdef"))
    assert a.equals(b"0123456789abcdef")
    assert a.equals(bytearray(b"0123456789abcdef"))
    assert not a.equals(b"0123456789abcdeF")
    assert not a.equals(b"0123456789abcde")
    assert not a.equals(Secret(b""))


def test_secret_refuses_eq_hash_pickle() -> None:
    a = Secret(b"0123456789abcdef")
    b = Secret(b"0123456789abcdef")
    with pytest.raises(TypeError):
        _ = a == b
    with pytest.raises(TypeError):
        _ = a == b"0123456789abcdef"
    with pytest.raises(TypeError):
        _ = a != b
    with pytest.raises(TypeError):
        hash(a)
    with pytest.raises(TypeError):
        {a}  # noqa: B018
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(a, protocol=proto)
    with pytest.raises(TypeError):
        copy.copy(a)


def test_secret_context_managers_wipe() -> None:
    with Secret(b"\x01" * 16) as s:
        assert not s.wiped
    assert s.wiped
    a, b = Secret(b"\x02" * 16), Secret(b"\x03" * 16)
    with pytest.raises(RuntimeError), wiping(a, b):
        raise RuntimeError("boom")
    assert a.wiped and b.wiped


def test_scrub_bytes_in_place() -> None:
    import os

    data = os.urandom(24) + b"\x01"  # built at run time: not a shared constant
    alias = data
    scrub(data)
    assert alias == bytes(25)
    assert data == bytes(25)
    short = bytes(bytearray(b"\x01\x02\x03"))
    scrub(short)
    assert short == b"\x01\x02\x03"  # below 8 bytes: left alone (may be shared)


def test_scrub_mutable_buffers() -> None:
    ba = bytearray(b"\xff" * 10)
    scrub(ba)
    assert ba == bytearray(10)
    backing = bytearray(b"\xff" * 10)
    scrub(memoryview(backing)[2:6])
    assert backing == bytearray(b"\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff")
    ro = bytes(bytearray(b"\xee" * 10))
    scrub(memoryview(ro))  # read-only view: untouched
    assert ro == b"\xee" * 10


def test_secret_take_scrubs_source() -> None:
    import os

    src = os.urandom(16) + b"\x01"
    keep = bytes(bytearray(src))
    s = Secret.take(src)
    assert s.equals(keep)
    assert src == bytes(17)


def test_secret_from_hex() -> None:
    assert Secret.from_hex(" 0001 02ff \n", length=4).equals(b"\x00\x01\x02\xff")
    assert Secret.from_hex("00" * 20).equals(bytes(20))


@pytest.mark.parametrize(("text", "length", "message"), [
    ("0g", None, r"^a key value must be hex digits$"),
    ("123", None, r"^a key value must be hex digits$"),
    ("0011", 3, r"^expected 3 bytes, got 2$"),
])
def test_secret_from_hex_refuses_without_the_digits(text: str, length: int | None,
                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Secret.from_hex(text, length=length)


def test_kcv_import() -> None:
    # kcv is reachable from klp1's view of the key types (sanity for the HMAC branch)
    case = next(c for c in EXPORTS if c["key"]["type"] == 0x10)
    assert kcv(0x10, _h(case["expected"]["TA_loaded"])) == _h(case["expected"]["kcv"])
