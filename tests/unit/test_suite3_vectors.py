"""The public klp1-suite3-public.json through the pure core of suite 0x03.

What the core decides is checked whole: the certificates, sigU, every derivation (Z, T1,
Kenc, Kmac, Ksas, TA'), H, W, SAS, CAS, the KCV, every message byte for byte (all signatures
reproduced with the deterministic keys of the vector, RFC 6979), the receipt, and every
refusal that structure, points, certificates, signatures, CAS or the header decide.

What a role decides with its state (docs/protocol.md §10.4: known sets, the suite offered
for a set, the register of units and revocations, REF1 and export policy; §10.5: the
pending challenge and the slots) is played here by a few lines in the order the contract
gives, over the case's own description of that state, so that every case gets its status
word; the roles themselves (units/) carry those rules for real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.conftest import KLP1_SUITE3_VECTORS

from keyload.core.apdu import encode_command
from keyload.core.ecc import EcdsaKey, ecdh_into, public_point
from keyload.core.errors import NoSuchSlot, PolicyRefused, StatusError
from keyload.core.identity import (
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    check_enrolment,
    identity_set_id,
    issue_certificate,
)
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.klp1 import LABEL_T1
from keyload.core.messages3 import (
    ExportRequest3,
    ExportResponse3,
    ImportData3,
    ImportResponse3,
    decode_export_request,
)
from keyload.core.primitives import ecbdiv_into
from keyload.core.suite3 import (
    SUITE_ECDH,
    Scratch3,
    check_export_request,
    derive_keys,
    export_key3,
    initialize_response,
    open_import3,
    t1_context,
    verify_receipt3,
)

FILE = KLP1_SUITE3_VECTORS
DATA = json.loads(FILE.read_text())
ALL = {c["name"]: c for c in DATA["cases"]}


def _cases(kind: str) -> list[Any]:
    return [pytest.param(c, id=c["name"]) for c in DATA["cases"] if c["kind"] == kind]


def _sw(e: StatusError) -> str:
    return f"{e.code:04X}"


def test_file_shape() -> None:
    assert DATA["protocol"] == "KLP1"
    assert all(c["suite"] == 3 for c in DATA["cases"])
    kinds = {c["kind"] for c in DATA["cases"]}
    assert kinds == {"initialize", "export", "import", "enrol"}


@pytest.mark.parametrize("case", _cases("initialize"))
def test_initialize(case: dict[str, Any]) -> None:
    unit = EcdsaKey(bytes.fromhex(case["unit_key"]))
    c_u = Certificate.decode(bytes.fromhex(case["C_U"]))
    assert c_u.encode().hex() == case["C_U"]
    assert c_u.public_key == unit.public and c_u.role == ROLE_UNIT
    resp = initialize_response(unit, sn=bytes.fromhex(case["SN"]), r=bytes.fromhex(case["R"]),
                               set_id=bytes.fromhex(case["set_id"]),
                               e_u_scalar=bytes.fromhex(case["eph_unit"]), c_u=c_u)
    assert resp.encode().hex() == case["expected"]["response"]


def _authority(case: dict[str, Any]) -> tuple[EcdsaKey, EcdsaKey, Certificate]:
    ca = EcdsaKey(bytes.fromhex(case["ca_key"]))
    authority = EcdsaKey(bytes.fromhex(case["authority_key"]))
    set_id = identity_set_id(ca.public)
    c_a = issue_certificate(ca, role=ROLE_AUTHORITY, set_id=set_id,
                            subject=bytes.fromhex(case["authority_id"]),
                            public_key=authority.public)
    return ca, authority, c_a


def _export_sw(case: dict[str, Any], req: ExportRequest3 | Any, q_ca: bytes) -> str | None:
    """§10.4 after the structure: the role's state from the case, the core's checks."""
    held = case["authority"]
    base = req.base if isinstance(req, ExportRequest3) else req
    set_hex = base.set_id.hex()
    if set_hex not in held["identity_sets"] and set_hex not in held["transport_sets"]:
        return "6A82"
    identity = set_hex in held["identity_sets"]
    if identity != isinstance(req, ExportRequest3) or identity != (base.suite == SUITE_ECDH):
        return "6A81"
    try:
        check_export_request(req, q_ca=q_ca)
    except StatusError as e:
        return _sw(e)
    if base.sn.hex() in held["revoked"]:
        return "6983"
    keys = {k["REF1"]: k["slots"] for k in held["keys"]}
    if base.ref1.hex() not in keys:
        return "6A88"
    slots = keys[base.ref1.hex()]
    if slots is not None and base.ref2 not in slots:
        return "6986"
    return None


@pytest.mark.parametrize("case", _cases("export"))
def test_export(case: dict[str, Any]) -> None:
    ca, authority, c_a = _authority(case)
    exp = case["expected"]
    try:
        req = decode_export_request(bytes.fromhex(case["export_request"]))
    except StatusError as e:
        assert _sw(e) == exp["sw"] == "6A80"
        return
    sw = _export_sw(case, req, ca.public)
    assert (sw or "9000") == exp["sw"]
    if sw is not None:
        return
    assert isinstance(req, ExportRequest3)
    assert req.encode().hex() == case["export_request"] == exp["export_request"]
    key = case["key"]
    e_a = bytes.fromhex(case["eph_authority"])
    sc = Scratch3()
    out = export_key3(req, authority=authority, c_a=c_a, e_a_scalar=e_a,
                      key_type=KeyType(key["type"]), key=bytes.fromhex(key["value"]),
                      attributes=KeyAttributes(key["usage"], key["mode"], key["exportability"]),
                      version=key["version"], diversify=key["diversify"],
                      scratch=sc)
    assert sc.wiped
    assert req.base.set_id.hex() == exp["set_id"] == identity_set_id(ca.public).hex()
    assert req.c_u.encode().hex() == exp["C_U"]
    assert c_a.encode().hex() == exp["C_A"]
    assert req.e_u.hex() == exp["E_U"] == public_point(bytes.fromhex(case["eph_unit"])).hex()
    assert req.sig_u.hex() == exp["sigU"]
    assert out.e_a.hex() == exp["E_A"]
    # the derivations, step by step (Z and T1 are wiped inside export_key3)
    z = bytearray(32)
    ecdh_into(e_a, req.e_u, z)
    assert z.hex() == exp["Z"]
    t1 = bytearray(32)
    sn, r = req.base.sn, req.base.r
    ecbdiv_into(z, t1, label=LABEL_T1, context=t1_context(sn, r, req.e_u, out.e_a))
    assert t1.hex() == exp["T1"]
    assert derive_keys(sc, e_a, req.e_u, sn, r, req.base.ref2, authority=True) == out.e_a
    assert sc.z == bytearray(32) and sc.t1 == bytearray(32)
    assert sc.session.hex() == exp["Kenc"] + exp["Kmac"] + exp["Ksas"]
    sc.wipe()
    data = ImportData3.decode(out.import_data)
    assert out.header.hex() == data.h.hex() == exp["H"]
    assert data.w.hex() == exp["W"]
    assert data.sas.hex() == out.sas.hex() == exp["SAS"]
    assert data.cas.hex() == exp["CAS"]
    assert out.kcv.hex() == exp["kcv"]
    assert out.import_data.hex() == exp["import_data"]
    assert ExportResponse3(out.import_data, out.kcv).encode().hex() == exp["export_response"]
    ne = 256 if len(out.import_data) <= 255 else 65536
    assert encode_command(0x80, 0x14, 0, 0, out.import_data, ne).hex() == exp["import_apdu"]
    # TA' as loaded: the unit of the same case opens it (the import cases check the rest)
    unit = EcdsaKey(bytes.fromhex(case["unit_key"]))
    opened = open_import3(data, unit=unit, sn=req.base.sn, r=req.base.r,
                          e_u_scalar=bytes.fromhex(case["eph_unit"]), q_ca=ca.public,
                          set_id=req.base.set_id, check_slot=lambda ref2, h: None)
    assert opened.key.hex() == exp["TA_loaded"]
    verify_receipt3(req.c_u, sn=sn, r=r, ref2=req.base.ref2, ref1=req.base.ref1, h=data.h,
                    kcv_=opened.kcv, e_a=out.e_a, rct=opened.rct)
    opened.key.wipe()


def _slot_check(case: dict[str, Any]) -> Any:
    slots = {s["ref2"]: s for s in case["slots"]}

    def check(ref2: int, h: KeyHeader) -> None:
        slot = slots.get(ref2)
        if slot is None:
            raise NoSuchSlot()
        if slot["locked"] or h.key_type not in slot["accepts"]:
            raise PolicyRefused()
        if slot["version"] is not None and h.version <= slot["version"]:
            raise PolicyRefused()

    return check


@pytest.mark.parametrize("case", _cases("import"))
def test_import(case: dict[str, Any]) -> None:
    exp = case["expected"]
    if case["R"] is None:  # §10.5 step 1: no pending challenge
        assert case["eph_unit"] is None and exp["sw"] == "6985"
        return
    sn, q_ca = bytes.fromhex(case["SN"]), bytes.fromhex(case["ca_public"])
    unit = EcdsaKey(bytes.fromhex(case["unit_key"]))
    sc = Scratch3()
    try:
        data = ImportData3.decode(bytes.fromhex(case["import_data"]))
        opened = open_import3(data, unit=unit, sn=sn, r=bytes.fromhex(case["R"]),
                              e_u_scalar=bytes.fromhex(case["eph_unit"]), q_ca=q_ca,
                              set_id=identity_set_id(q_ca), check_slot=_slot_check(case),
                              scratch=sc)
    except StatusError as e:
        assert _sw(e) == exp["sw"]
        assert sc.wiped
        return
    assert sc.wiped
    assert exp["sw"] == "9000"
    assert opened.key.hex() == exp["stored"]
    assert opened.ref1.hex() == exp["ref1"]
    assert opened.kcv.hex() == exp["kcv"]
    assert opened.rct.hex() == exp["receipt"]
    assert ImportResponse3(opened.kcv, opened.rct).encode().hex() == exp["response"]
    opened.key.wipe()


@pytest.mark.parametrize("case", _cases("enrol"))
def test_enrol(case: dict[str, Any]) -> None:
    sn = bytes.fromhex(case["SN"])
    q_u = public_point(bytes.fromhex(case["unit_key"]))
    try:
        put = PutCertificate.decode(bytes.fromhex(case["data"]))
        set_id = check_enrolment(put, sn=sn, q_u=q_u)
    except StatusError as e:
        assert _sw(e) == case["expected"]["sw"]
        return
    assert case["expected"]["sw"] == "9000"
    assert put.encode().hex() == case["data"]
    assert set_id == identity_set_id(put.q_ca) == put.certificate.set_id


def test_every_case_is_run() -> None:
    assert len(ALL) == len(DATA["cases"]) == 188
