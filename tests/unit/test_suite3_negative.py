"""Suite 0x03 refusals in the core (docs/protocol.md §10): each a typed error, nothing else.

Built from the first valid export of the public klp1-suite3-public.json, then
tampered one field at a time: a certificate, a point, a signature, the header's reserved
bits, a length. Every check asserts the exact error type (and so its status word), and that
the scratch buffers are zeros afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import KLP1_SUITE3_VECTORS

from keyload.core.ecc import (
    EcdsaKey,
    ecdh_into,
    ecdsa_sign,
    ecdsa_verify,
    public_point,
    scalar_from,
)
from keyload.core.errors import (
    AuthenticityError,
    IntegrityError,
    MalformedData,
    PolicyRefused,
    StatusError,
    Unsupported,
)
from keyload.core.identity import (
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    check_enrolment,
    identity_set_id,
    issue_certificate,
    verify_certificate,
)
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.klp1 import KMAC
from keyload.core.messages3 import (
    ExportRequest3,
    ExportResponse3,
    ImportData3,
    ImportResponse3,
    InitResponse3,
    SlotStatus3,
    decode_export_request,
)
from keyload.core.primitives import aes_cmac
from keyload.core.suite3 import (
    Scratch3,
    cas3_message,
    check_export_request,
    check_header3,
    derive_keys,
    export_key3,
    open_import3,
    verify_receipt3,
)

FILE = KLP1_SUITE3_VECTORS
CASE: dict[str, Any] = next(c for c in json.loads(FILE.read_text())["cases"]
                            if c["name"] == "s3-export-0-ok")
SN, R = bytes.fromhex(CASE["SN"]), bytes.fromhex(CASE["R"])
CA = EcdsaKey(bytes.fromhex(CASE["ca_key"]))
AUTHORITY = EcdsaKey(bytes.fromhex(CASE["authority_key"]))
UNIT = EcdsaKey(bytes.fromhex(CASE["unit_key"]))
SET_ID = identity_set_id(CA.public)
E_U_SCALAR, E_A_SCALAR = bytes.fromhex(CASE["eph_unit"]), bytes.fromhex(CASE["eph_authority"])
REQUEST = bytes.fromhex(CASE["export_request"])
C_A = issue_certificate(CA, role=ROLE_AUTHORITY, set_id=SET_ID,
                        subject=bytes.fromhex(CASE["authority_id"]),
                        public_key=AUTHORITY.public)
OFF_CURVE = b"\x04" + bytes(63) + b"\x01"  # (0, 1) is not on P-256


def _raises(cls: type[StatusError], fn: Callable[[], object]) -> StatusError:
    with pytest.raises(StatusError) as info:
        fn()
    assert type(info.value) is cls, f"{type(info.value).__name__} instead of {cls.__name__}"
    return info.value


def _export(req: ExportRequest3, **kw: Any) -> bytes:
    key = CASE["key"]
    args: dict[str, Any] = dict(
        authority=AUTHORITY, c_a=C_A, e_a_scalar=E_A_SCALAR, key_type=KeyType(key["type"]),
        key=bytes.fromhex(key["value"]),
        attributes=KeyAttributes(key["usage"], key["mode"], key["exportability"]),
        version=key["version"], diversify=False)
    args.update(kw)
    return export_key3(req, **args).import_data


def _open(data: bytes, **kw: Any) -> Any:
    sc = Scratch3()
    args: dict[str, Any] = dict(unit=UNIT, sn=SN, r=R, e_u_scalar=E_U_SCALAR, q_ca=CA.public,
                                set_id=SET_ID, check_slot=lambda ref2, h: None, scratch=sc)
    args.update(kw)
    try:
        return open_import3(ImportData3.decode(data), **args)
    finally:
        assert sc.wiped


def _req() -> ExportRequest3:
    req = decode_export_request(REQUEST)
    assert isinstance(req, ExportRequest3)
    return req


def _resign_c_u(**fields: Any) -> Certificate:
    c = _req().c_u._replace(**fields)
    return c._replace(signature=CA.sign(b"KLP1-CRT" + c.signed_part()))


# --- the genuine exchange works (the baseline every refusal departs from) ---------------


def test_baseline() -> None:
    req = _req()
    check_export_request(req, q_ca=CA.public)
    opened = _open(_export(req))
    assert opened.key.hex() == CASE["key"]["value"]
    opened.key.wipe()


# --- certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["version", "role", "set_id", "subject", "public_key",
                                   "signature"])
def test_tampered_certificate(field: str) -> None:
    c_u = _req().c_u
    value = getattr(c_u, field)
    bad = value ^ 0x40 if isinstance(value, int) else bytes((value[0], value[1] ^ 1)) + value[2:]
    tampered = c_u._replace(**{field: bad})
    _raises(IntegrityError, lambda: verify_certificate(
        tampered, q_ca=CA.public, role=ROLE_UNIT, set_id=SET_ID, subject=SN))
    # and through the authority's check, re-encoded
    req = _req()._replace(c_u=tampered)
    _raises(IntegrityError, lambda: check_export_request(
        ExportRequest3.decode(req.encode()), q_ca=CA.public))


def test_certificate_validity_rules() -> None:
    c_u = _req().c_u
    ok = dict(q_ca=CA.public, role=ROLE_UNIT, set_id=SET_ID, subject=SN)
    verify_certificate(c_u, **ok)  # type: ignore[arg-type]
    for change in (dict(role=ROLE_AUTHORITY), dict(set_id=bytes(5)), dict(subject=b"other"),
                   dict(q_ca=AUTHORITY.public)):
        args = {**ok, **change}
        _raises(IntegrityError, lambda a=args: verify_certificate(c_u, **a))  # type: ignore
    # re-signed by the CA, yet invalid: version 02, D0 off the curve or compressed
    for bad in (_resign_c_u(version=2), _resign_c_u(public_key=OFF_CURVE),
                _resign_c_u(public_key=b"\x02" + c_u.public_key[1:])):
        _raises(IntegrityError, lambda b=bad: verify_certificate(b, **ok))  # type: ignore
    # an authority's certificate may name any subject
    verify_certificate(C_A, q_ca=CA.public, role=ROLE_AUTHORITY, set_id=SET_ID)


@pytest.mark.parametrize("cut", [1, 64])
def test_certificate_wrong_lengths_are_malformed(cut: int) -> None:
    c_u = _req().c_u
    for field in ("set_id", "public_key", "signature"):
        short = c_u._replace(**{field: getattr(c_u, field)[:-cut]})
        _raises(MalformedData, lambda s=short: Certificate.decode(s.encode()))
    for subject in (b"", bytes(33)):
        _raises(MalformedData, lambda s=subject: Certificate.decode(
            c_u._replace(subject=s).encode()))
    raw = c_u.encode()
    _raises(MalformedData, lambda: Certificate.decode(raw + b"\x00"))
    _raises(MalformedData, lambda: Certificate.decode(b"\xe2" + raw[1:]))


def test_issue_refuses_caller_mistakes() -> None:
    for kw in (dict(role=3), dict(set_id=bytes(4)), dict(subject=b""),
               dict(public_key=OFF_CURVE)):
        args: dict[str, Any] = {**dict(role=ROLE_UNIT, set_id=SET_ID, subject=SN,
                                       public_key=UNIT.public), **kw}
        with pytest.raises(ValueError):
            issue_certificate(CA, **args)


# --- points ------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", [OFF_CURVE, b"\x05" + bytes(64),
                                   b"\x03" + bytes(64), bytes(65)])
def test_wrong_curve_point(point: bytes) -> None:
    _raises(IntegrityError, lambda: ecdh_into(E_A_SCALAR, point, bytearray(32)))
    _raises(IntegrityError, lambda: ecdsa_verify(point, bytes(64), b"m"))
    # E_U at the authority: its signature is genuine, the point is not (6982)
    req = _req()
    sig = UNIT.sign(b"KLP1-INI" + bytes((len(SN),)) + SN + R + SET_ID + point)
    bad = req._replace(e_u=point, sig_u=sig)
    _raises(IntegrityError, lambda: check_export_request(bad, q_ca=CA.public))
    # E_A at the unit (6982), D6 at enrolment (6982)
    data = ImportData3.decode(_export(req))
    _raises(IntegrityError, lambda: _open(data._replace(e_a=point).encode()))
    put = PutCertificate(req.c_u, point)
    _raises(IntegrityError, lambda: check_enrolment(put, sn=SN, q_u=UNIT.public))


def test_compressed_point_of_a_genuine_key_is_refused() -> None:
    q = UNIT.public
    compressed = bytes((2 + (q[64] & 1),)) + q[1:33]
    _raises(IntegrityError, lambda: ecdh_into(E_A_SCALAR, compressed.ljust(65, b"\0"),
                                              bytearray(32)))
    _raises(IntegrityError, lambda: ecdh_into(E_A_SCALAR, compressed, bytearray(32)))


def test_scalar_out_of_range_is_a_caller_mistake() -> None:
    for scalar in (bytes(32), b"\xff" * 32, bytes(31) + b"\x01" + b"\x00"):
        with pytest.raises(ValueError):
            public_point(scalar)


# --- signatures over other bytes --------------------------------------------------------------


def test_signature_over_other_bytes() -> None:
    sig = ecdsa_sign(bytes.fromhex(CASE["unit_key"]), b"message")
    ecdsa_verify(UNIT.public, sig, b"message")
    _raises(AuthenticityError, lambda: ecdsa_verify(UNIT.public, sig, b"messagf"))
    _raises(AuthenticityError, lambda: ecdsa_verify(CA.public, sig, b"message"))
    for bad in (sig[:63], sig + b"\0", bytes(64), sig[:32] + bytes(32)):
        _raises(AuthenticityError, lambda b=bad: ecdsa_verify(UNIT.public, b, b"message"))
    # sigU over another R: the authority refuses with 6982
    req = _req()
    other = UNIT.sign(b"KLP1-INI" + bytes((len(SN),)) + SN + bytes(16) + SET_ID + req.e_u)
    _raises(IntegrityError, lambda: check_export_request(req._replace(sig_u=other),
                                                         q_ca=CA.public))


def test_sas_over_other_bytes_and_by_another_key() -> None:
    req = _req()
    data = ImportData3.decode(_export(req))
    # a SAS of other bytes, with a CAS that matches it: the unit refuses with 6988
    genuine = ImportData3.decode(_export(req, version=CASE["key"]["version"] + 1))
    sc = Scratch3()
    derive_keys(sc, E_A_SCALAR, req.e_u, SN, R, req.base.ref2, authority=True)
    cas = aes_cmac(sc.session[KMAC], cas3_message(SN, R, genuine.ref2, genuine.ref1,
                                                   genuine.h, genuine.w, data.sas, genuine.e_a))
    sc.wipe()
    mixed = genuine._replace(sas=data.sas, cas=cas)
    _raises(AuthenticityError, lambda: _open(mixed.encode()))
    # without the matching CAS, the CAS check comes first: 6982
    _raises(IntegrityError, lambda: _open(genuine._replace(sas=data.sas).encode()))
    # an export signed by a key that the C_A does not certify: 6988
    rogue = EcdsaKey(b"\x01" * 32)
    _raises(AuthenticityError, lambda: _open(_export(req, authority=rogue)))
    # C_A for another set, or signed by another CA: 6988
    other_ca = EcdsaKey(b"\x02" * 32)
    for c_a in (issue_certificate(other_ca, role=ROLE_AUTHORITY, set_id=SET_ID, subject=b"A",
                                  public_key=AUTHORITY.public),
                issue_certificate(CA, role=ROLE_UNIT, set_id=SET_ID, subject=b"A",
                                  public_key=AUTHORITY.public)):
        _raises(AuthenticityError, lambda c=c_a: _open(_export(req, c_a=c)))


def test_receipt_over_other_bytes() -> None:
    req = _req()
    data = ImportData3.decode(_export(req))
    opened = _open(data.encode())
    opened.key.wipe()
    args: dict[str, Any] = dict(sn=SN, r=R, ref2=data.ref2, ref1=data.ref1, h=data.h,
                                kcv_=opened.kcv, e_a=data.e_a, rct=opened.rct)
    verify_receipt3(req.c_u, **args)
    for change in (dict(r=bytes(16)), dict(ref1=b"x"), dict(kcv_=bytes(5)),
                   dict(e_a=UNIT.public), dict(rct=bytes(64)), dict(e_a=b"\x04")):
        _raises(IntegrityError, lambda c=change: verify_receipt3(req.c_u, **{**args, **c}))


# --- the header: reserved bits, suite, version ---------------------------------------------


@pytest.mark.parametrize(("index", "value"), [(0, 0x02), (1, 0x02), (1, 0x01), (10, 0x02),
                                              (10, 0x80), (11, 0x01)])
def test_reserved_bits_and_header(index: int, value: int) -> None:
    req = _req()
    data = ImportData3.decode(_export(req))
    h = bytearray(data.h)
    h[index] = value if index != 10 else h[10] | value
    _raises(Unsupported, lambda: check_header3(bytes(h)))
    _raises(Unsupported, lambda: _open(data._replace(h=bytes(h)).encode()))


def test_diversified_flag_is_allowed() -> None:
    h = check_header3(bytes.fromhex("010303204b3042c5da4e0100"))
    assert isinstance(h, KeyHeader) and h.diversified


# --- wrong lengths: malformed (6A80) --------------------------------------------------------


def test_export_request_wrong_lengths() -> None:
    req = _req()
    for change in (dict(sn=b""), dict(sn=bytes(33)), dict(r=bytes(15)), dict(set_id=bytes(6)),
                   dict(ref1=b""), dict(ref1=bytes(33)), dict(ref2=0), dict(ref2=255),
                   dict(e_u=req.e_u[:64]), dict(e_u=req.e_u + b"\0"),
                   dict(sig_u=req.sig_u[:63]), dict(sig_u=req.sig_u + b"\0")):
        base = {k: v for k, v in change.items() if k in req.base._fields}
        rest = {k: v for k, v in change.items() if k not in base}
        bad = req._replace(base=req.base._replace(**base), **rest).encode()
        _raises(MalformedData, lambda b=bad: decode_export_request(b))
    _raises(MalformedData, lambda: decode_export_request(REQUEST[:-1]))
    _raises(MalformedData, lambda: decode_export_request(REQUEST + b"\xc0\x00"))
    _raises(MalformedData, lambda: ExportRequest3.decode(REQUEST[:-66]))


def test_import_data_wrong_lengths() -> None:
    data = ImportData3.decode(_export(_req()))
    for change in (dict(ref1=b""), dict(ref2=0), dict(h=bytes(11)), dict(e_a=bytes(64)),
                   dict(sas=bytes(63)), dict(sas=bytes(65)), dict(cas=bytes(8))):
        bad = data._replace(**change).encode()
        _raises(MalformedData, lambda b=bad: ImportData3.decode(b))
    raw = data.encode()
    _raises(MalformedData, lambda: ImportData3.decode(raw[:-1]))
    _raises(MalformedData, lambda: ImportData3.decode(raw + b"\xcb\x00"))


def test_other_messages_wrong_lengths() -> None:
    req = _req()
    init = InitResponse3(SN, R, SET_ID, b"\x03", req.e_u, req.c_u, req.sig_u)
    assert InitResponse3.decode(init.encode()) == init
    for change in (dict(r=bytes(17)), dict(e_u=bytes(1)), dict(sig_u=bytes(1)),
                   dict(suites=b"")):
        bad = init._replace(**change).encode()
        _raises(MalformedData, lambda b=bad: InitResponse3.decode(b))
    _raises(MalformedData, lambda: ImportResponse3.decode(
        ImportResponse3(bytes(5), bytes(16)).encode()))
    _raises(MalformedData, lambda: ExportResponse3.decode(
        ExportResponse3(b"\xc6\x00", bytes(5)).encode()))
    st = SlotStatus3(1, 1, bytes(12), bytes(5), b"R1")
    assert SlotStatus3.decode(st.encode()) == st
    for change in (dict(ref1=b""), dict(h=bytes(11)), dict(state=7)):
        bad = st._replace(**change).encode()
        _raises(MalformedData, lambda b=bad: SlotStatus3.decode(b))
    put = PutCertificate(req.c_u, CA.public)
    _raises(MalformedData, lambda: PutCertificate.decode(
        put._replace(q_ca=CA.public[:64]).encode()))
    _raises(MalformedData, lambda: PutCertificate.decode(put.encode()[:-1]))


def test_enrolment_refusals() -> None:
    c_u = _req().c_u
    put = PutCertificate(c_u, CA.public)
    assert check_enrolment(put, sn=SN, q_u=UNIT.public) == SET_ID
    _raises(IntegrityError, lambda: check_enrolment(put, sn=b"other", q_u=UNIT.public))
    _raises(IntegrityError, lambda: check_enrolment(put, sn=SN, q_u=AUTHORITY.public))
    _raises(IntegrityError, lambda: check_enrolment(put._replace(q_ca=AUTHORITY.public),
                                                    sn=SN, q_u=UNIT.public))
    _raises(IntegrityError, lambda: check_enrolment(
        put._replace(certificate=_resign_c_u(role=ROLE_AUTHORITY)), sn=SN, q_u=UNIT.public))


def test_key_length_not_fitting_its_type_is_never_wrapped() -> None:
    _raises(PolicyRefused, lambda: _export(_req(), key=bytes(16)))
    with pytest.raises(ValueError):
        _export(_req(), key_type=KeyType.HMAC_SHA256, key=bytes(32), diversify=True)


# --- erasure and redaction ------------------------------------------------------------------


def test_scratch_wiped_when_export_fails() -> None:
    req = _req()
    sc = Scratch3()
    _raises(IntegrityError, lambda: _export(req._replace(e_u=OFF_CURVE), scratch=sc))
    assert sc.wiped
    sc.ta = bytearray(b"\x01" * 32)  # a TA' left by an earlier use is wiped too
    _export(req, scratch=sc, diversify=True)
    assert sc.wiped and len(sc.buffers()) == 4


def test_keys_are_redacted_and_wiped() -> None:
    key = EcdsaKey(b"\x07" * 32)
    assert "07" not in repr(key) and "redacted" in repr(key)
    key.wipe()
    assert key._scalar.wiped
    draws = iter([b"\xff" * 32, bytes(32), b"\x05" * 32])
    assert bytes(scalar_from(lambda n: next(draws))) == b"\x05" * 32
