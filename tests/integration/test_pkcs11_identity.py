"""Identity sets (suite 0x03, docs/protocol.md §10) in the PKCS#11 authority, on a private
SoftHSM2 token: the set CA key and the authority key made in the token and kept there
(sensitive, not extractable), each export's e_A, Z and session keys made and destroyed in
it; emulated units enrolled and loaded through :class:`~keyload.units.authority.Authority`;
every refusal of §10.4 changing nothing; then the same through the ``keyload`` console
script on a PKCS#11 home.

The token signs with random nonces: its signatures are verified, never compared (§10.3).
Without SoftHSM2 or python-pkcs11 the tests skip on a laptop and fail in CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keyload.core import messages3
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.ecc import ecdsa_verify
from keyload.core.errors import StoreError, UnknownSet
from keyload.core.identity import (
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    identity_set_id,
    verify_certificate,
)
from keyload.core.keys import KeyAttributes, KeyType, aes_kcv, kcv
from keyload.core.klp1 import LABEL_TA, lv
from keyload.core.messages import ExportRequest
from keyload.core.messages3 import ExportRequest3, ExportResponse3, ImportData3, InitResponse3
from keyload.core.primitives import ecbdiv_into
from keyload.core.secret import Secret
from keyload.core.suite3 import sas3_message
from keyload.lab.softhsm import make_token, softhsm_available, softhsm_missing_reason
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from ..conftest import require
from .cli_helpers import KEYLOAD, assert_error, ok

pytestmark = pytest.mark.hardware  # SoftHSM2 (skips without)

HAVE_PYTHON_PKCS11 = importlib.util.find_spec("pkcs11") is not None
PIN = "86420975"
LABEL = "identity"
INIT, EXPORT, IMPORT, STATUS, GENKEY, PUTCERT = 0x10, 0x12, 0x14, 0x16, 0x18, 0x1A
KEY = bytes(range(0x40, 0x60))  # AES-256 application key K1 (imported: its value is known)
ATTRS = KeyAttributes("K0", "B", "E")
ANY = ExportPolicy(None, None)


def tx(app: Unit | Authority, ins: int, data: bytes = b"", p2: int = 0) -> tuple[int, bytes]:
    r = ResponseAPDU.decode(app.process_apdu(
        CommandAPDU(0x80, ins, 0, p2, data, ne=65536).encode()))
    return r.sw, r.data


def _slots() -> dict[int, Slot]:
    return {1: Slot(1, frozenset({KeyType.AES256})), 2: Slot(2, frozenset({KeyType.AES256}))}


@dataclass
class Token:
    module: str
    ks: Any  # Pkcs11Keystore
    set_id: bytes
    q_ca: bytes
    log: MemoryExportLog
    authority: Authority
    units: dict[bytes, Unit] = field(default_factory=dict)

    def enrol(self, sn: bytes) -> Unit:
        unit = Unit(MemoryUnitStore(UnitState.new_identity(sn, _slots())))
        sw, data = tx(unit, GENKEY)
        assert sw == 0x9000
        cert = self.ks.certify_unit(self.set_id, sn, data[2:])
        assert tx(unit, PUTCERT, PutCertificate(cert, self.q_ca).encode()) == (0x9000, b"")
        self.units[sn] = unit
        return unit

    def request(self, unit: Unit, ref1: bytes = b"K1", ref2: int = 1) -> ExportRequest3:
        sw, data = tx(unit, INIT)
        assert sw == 0x9000
        ini = InitResponse3.decode(data)
        return ExportRequest3(ExportRequest(ini.sn, ini.r, ini.set_id, 3, ref1, ref2),
                              ini.e_u, ini.c_u, ini.sig_u)

    def state(self) -> tuple[Any, ...]:
        """What a refusal must leave as it was: export log, register, token objects."""
        return (len(self.log.records),
                [(r.sn, r.revoked) for r in self.ks.unit_records(self.set_id)],
                self.ks.token_object_count(), self.ks.session_object_count())


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    require(HAVE_PYTHON_PKCS11, "python-pkcs11 is not installed (pip install python-pkcs11)")
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    from keyload.units import pkcs11 as p11

    old_conf = os.environ.get("SOFTHSM2_CONF")
    tok = make_token(tmp_path_factory.mktemp("id-softhsm"), label=LABEL, user_pin=PIN)
    p11.reinitialize(tok.module)  # SoftHSM reads SOFTHSM2_CONF now (keyload.lab.softhsm)
    ks = p11.Pkcs11Keystore.open(tok.module, LABEL, pin=PIN)
    try:
        set_id = ks.generate_identity_set("plant", authority_id=b"AS-P11").set_id
        ks.add_key(b"K1", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=False,
                   policy=ANY)
        ks.add_key(b"KD", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=True,
                   policy=ANY)
        ks.add_key(b"K9", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=False,
                   policy=ExportPolicy(None, frozenset({9})))
        log = MemoryExportLog()
        yield Token(tok.module, ks, set_id, ks.identity_set(set_id).q_ca, log,
                    Authority(ks, log=log))
    finally:
        ks.close()
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:  # give the module back the tokens another fixture made
            os.environ["SOFTHSM2_CONF"] = old_conf
            p11.reinitialize(tok.module)


def _key_objects(ks: Any, prefix: bytes) -> list[Any]:
    from pkcs11 import Attribute as A
    from pkcs11 import ObjectClass as CKO

    return [o for o in ks.session.get_objects({A.CLASS: CKO.PRIVATE_KEY})
            if bytes(o[A.ID]).startswith(prefix)]


# -- the set and its keys -------------------------------------------------------------------
def test_capabilities_offer_suite_3(token: Token) -> None:
    assert token.ks.capabilities().suites == frozenset({2, 3})
    info = token.ks.set_info(token.set_id)
    assert info.identity and info.name == "plant"
    assert token.set_id in {s.set_id for s in token.ks.set_infos()}


def test_the_set_keys_are_in_the_token_sensitive_and_not_extractable(token: Token) -> None:
    from pkcs11 import Attribute as A
    from pkcs11 import exceptions as pkx

    public = token.ks.identity_set(token.set_id)
    assert identity_set_id(public.q_ca) == token.set_id  # §10.1
    c_a = public.c_a
    verify_certificate(c_a, q_ca=public.q_ca, role=ROLE_AUTHORITY, set_id=token.set_id)
    assert c_a.subject == b"AS-P11"
    for prefix in (b"KLP1-CA", b"KLP1-AS"):
        (priv,) = _key_objects(token.ks, prefix)
        attrs = priv.get_attributes([A.TOKEN, A.SENSITIVE, A.EXTRACTABLE, A.ALWAYS_SENSITIVE,
                                     A.NEVER_EXTRACTABLE, A.SIGN, A.DERIVE, A.DECRYPT,
                                     A.UNWRAP, A.MODIFIABLE, A.COPYABLE])
        assert attrs == {A.TOKEN: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                         A.ALWAYS_SENSITIVE: True, A.NEVER_EXTRACTABLE: True, A.SIGN: True,
                         A.DERIVE: False, A.DECRYPT: False, A.UNWRAP: False,
                         A.MODIFIABLE: False, A.COPYABLE: False}
        with pytest.raises(pkx.AttributeSensitive):
            priv[A.VALUE]


def test_reopen_reads_the_set_and_its_register(token: Token) -> None:
    from keyload.units import pkcs11 as p11

    q_u = tx(Unit(MemoryUnitStore(UnitState.new_identity(b"RE-1", _slots()))), GENKEY)[1][2:]
    token.ks.certify_unit(token.set_id, b"RE-1", q_u)
    token.ks.certify_unit(token.set_id, b"RE-2", q_u)
    token.ks.revoke_unit(token.set_id, b"RE-2")
    with p11.Pkcs11Keystore.open(token.module, LABEL, pin=PIN) as again:
        assert again.identity_set(token.set_id) == token.ks.identity_set(token.set_id)
        assert again.set_info(token.set_id) == token.ks.set_info(token.set_id)
        got = {r.sn: (r.revoked, r.certificate) for r in again.unit_records(token.set_id)}
        want = {r.sn: (r.revoked, r.certificate) for r in token.ks.unit_records(token.set_id)}
        assert got == want and got[b"RE-2"][0] and not got[b"RE-1"][0]


def test_register_refusals(token: Token) -> None:
    q_u = tx(Unit(MemoryUnitStore(UnitState.new_identity(b"RF-1", _slots()))), GENKEY)[1][2:]
    cert = token.ks.certify_unit(token.set_id, b"RF-1", q_u)
    verify_certificate(cert, q_ca=token.q_ca, role=ROLE_UNIT, set_id=token.set_id,
                       subject=b"RF-1")
    before = token.state()
    with pytest.raises(ValueError, match="already certified"):
        token.ks.certify_unit(token.set_id, b"RF-1", q_u)
    with pytest.raises(ValueError, match="not an uncompressed P-256 point"):
        token.ks.certify_unit(token.set_id, b"RF-2", b"\x04" + bytes(64))
    with pytest.raises(ValueError, match="not in the register"):
        token.ks.revoke_unit(token.set_id, b"RF-3")
    with pytest.raises(UnknownSet):
        token.ks.certify_unit(bytes(5), b"RF-2", q_u)
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        token.ks.generate_identity_set("x", authority_id=b"")
    assert token.state() == before


def test_a_damaged_register_is_refused_at_open(token: Token) -> None:
    """A revocation of a unit the register does not hold: the token's metadata is damaged."""
    from keyload.core.errors import DamagedStore
    from keyload.units import pkcs11 as p11

    bad = token.ks._put_meta("keyload revocation test", {
        "kind": "revocation", "set_id": token.set_id.hex(), "sn": b"NOBODY".hex()})
    try:
        with pytest.raises(DamagedStore, match="register of set"):
            p11.Pkcs11Keystore.open(token.module, LABEL, pin=PIN)
    finally:
        bad.destroy()
    with p11.Pkcs11Keystore.open(token.module, LABEL, pin=PIN) as again:
        assert again.identity_set(token.set_id) == token.ks.identity_set(token.set_id)


# -- loads ---------------------------------------------------------------------------------
def _aes_block(key: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 (one block)
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(block) + op.finalize()


def test_load_kcvs_agree_the_key_decrypts_and_the_receipt_verifies(token: Token) -> None:
    unit = token.enrol(b"LD-0001")
    req = token.request(unit)
    n = len(token.log.records)
    sw, data = tx(token.authority, EXPORT, req.encode())
    assert sw == 0x9000
    er = ExportResponse3.decode(data)
    assert er.kcv == kcv(KeyType.AES256, KEY)
    assert token.ks.session_object_count() == 0  # e_A, E_A, Z, T1, Kenc, Kmac: gone
    d = ImportData3.decode(er.import_data)
    assert d.c_a == token.ks.identity_set(token.set_id).c_a
    # the SAS by d_A in the token verifies under C_A's key (random nonce: verified)
    ecdsa_verify(d.c_a.public_key, d.sas, sas3_message(req.base.sn, req.base.r, 1, b"K1", d.h,
                                                       d.w, req.e_u, d.e_a))
    sw, resp = tx(unit, IMPORT, er.import_data)
    assert sw == 0x9000  # the unit derived the same Z (software ECDH), CAS and SAS verify
    rct = messages3.ImportResponse3.decode(resp)
    assert rct.kcv == er.kcv
    slot = unit.state.slots[1]
    assert slot.key is not None and slot.ref1 == b"K1"
    # a block encrypted with the application key decrypts with the unit's key
    block = _aes_block(KEY, b"keyload unit 001")
    assert _aes_block(bytes(slot.key.buffer), block, decrypt=True) == b"keyload unit 001"
    # the record keeps R, H, E_A and C_U: the receipt verifies with certificates only
    record = token.log.records[n]
    assert (record.suite, record.r, record.e_a, record.h) == (3, req.base.r, d.e_a, d.h)
    assert record.c_u == req.c_u.encode()
    token.authority.verify_receipt3(set_id=token.set_id, c_u=Certificate.decode(record.c_u),
                                    r=record.r, ref2=1, ref1=b"K1", h=d.h, kcv=er.kcv,
                                    e_a=d.e_a, rct=rct.rct)


def test_a_diversified_key_loads_with_its_own_kcv(token: Token) -> None:
    unit = token.enrol(b"LD-0002")
    sw, data = tx(token.authority, EXPORT, token.request(unit, b"KD", 2).encode())
    assert sw == 0x9000
    want = bytearray(32)
    ecbdiv_into(KEY, want, label=LABEL_TA, context=lv(b"LD-0002"))
    er = ExportResponse3.decode(data)
    assert er.kcv == aes_kcv(bytes(want)) != kcv(KeyType.AES256, KEY)
    assert tx(unit, IMPORT, er.import_data)[0] == 0x9000
    assert unit.state.slots[2].key is not None and unit.state.slots[2].key.equals(bytes(want))
    assert token.ks.session_object_count() == 0


def test_two_exports_differ_in_e_a_and_sas_and_both_verify(token: Token) -> None:
    unit = token.enrol(b"LD-0003")
    outs = []
    for ref2 in (1, 2):  # a slot takes a key of one version once
        req = token.request(unit, ref2=ref2)
        sw, data = tx(token.authority, EXPORT, req.encode())
        assert sw == 0x9000
        outs.append(ImportData3.decode(ExportResponse3.decode(data).import_data))
        assert tx(unit, IMPORT, ExportResponse3.decode(data).import_data)[0] == 0x9000
    assert outs[0].e_a != outs[1].e_a and outs[0].sas != outs[1].sas


# -- refusals: the status word of §10.4, nothing changed -------------------------------------
def _tampered_sig(req: ExportRequest3) -> ExportRequest3:
    sig = bytearray(req.sig_u)
    sig[7] ^= 0x01
    return req._replace(sig_u=bytes(sig))


REFUSALS: dict[str, tuple[Callable[[Token, ExportRequest3], bytes], int]] = {
    "malformed": (lambda t, r: r.encode()[:-1], 0x6A80),
    "tampered-sigU": (lambda t, r: _tampered_sig(r).encode(), 0x6982),
    "tampered-C_U": (lambda t, r: r._replace(c_u=r.c_u._replace(subject=b"RX-9")).encode(),
                     0x6982),
    "unknown-set": (lambda t, r: r._replace(base=r.base._replace(set_id=bytes(5))).encode(),
                    0x6A82),
    "suite-2": (lambda t, r: r._replace(base=r.base._replace(suite=2)).encode(), 0x6A81),
    "t-shaped": (lambda t, r: r.base._replace(suite=2).encode(), 0x6A81),
    "unknown-ref1": (lambda t, r: r._replace(base=r.base._replace(ref1=b"NONE")).encode(),
                     0x6A88),
    "policy": (lambda t, r: r._replace(base=r.base._replace(ref1=b"K9")).encode(), 0x6986),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_changes_nothing(token: Token, case: str) -> None:
    unit = token.units.get(b"RX-0001") or token.enrol(b"RX-0001")
    req = token.request(unit)
    make, sw = REFUSALS[case]
    before = token.state()
    assert tx(token.authority, EXPORT, make(token, req)) == (sw, b"")
    assert token.state() == before
    assert tx(token.authority, EXPORT, req.encode())[0] == 0x9000  # the genuine one passes


def test_served_challenge_is_refused_6985(token: Token) -> None:
    unit = token.enrol(b"RX-0002")
    req = token.request(unit)
    assert tx(token.authority, EXPORT, req.encode())[0] == 0x9000
    before = token.state()
    assert tx(token.authority, EXPORT, req.encode()) == (0x6985, b"")
    assert token.state() == before


def test_revoked_unit_is_refused_6983(token: Token) -> None:
    unit = token.enrol(b"RX-0003")
    assert tx(token.authority, EXPORT, token.request(unit).encode())[0] == 0x9000
    token.ks.revoke_unit(token.set_id, b"RX-0003")
    before = token.state()
    assert tx(token.authority, EXPORT, token.request(unit).encode()) == (0x6983, b"")
    assert token.state() == before


# -- every session object destroyed, whatever fails ------------------------------------------
FAILURES = [  # (module, function, which call fails, REF1)
    ("identity", "raw_p256_point", 1, b"K1"),  # E_A read (e_A, E_A made): unplanned error
    ("identity", "ecdh", 1, b"K1"),  # Z
    ("identity", "derive", 1, b"K1"),  # T1
    ("identity", "derive", 3, b"KD"),  # Kmac
    ("export", "derive", 1, b"KD"),  # TA'
    ("export", "sign", 1, b"KD"),  # KCV of TA'
    ("identity", "wrap", 1, b"KD"),  # W
    ("objects", "sign", 1, b"KD"),  # SAS (CKM_ECDSA, through TokenEcdsa)
    ("identity", "sign", 1, b"KD"),  # CAS
]


@pytest.mark.parametrize(("module", "name", "nth", "ref1"), FAILURES,
                         ids=[f"{m}.{n}-{k}" for m, n, k, _ in FAILURES])
def test_no_session_object_left_when_the_token_fails(
        token: Token, monkeypatch: pytest.MonkeyPatch, module: str, name: str, nth: int,
        ref1: bytes) -> None:
    import importlib

    from pkcs11 import exceptions as pkx

    from keyload.units.pkcs11.session import Pkcs11Error

    mod = importlib.import_module(f"keyload.units.pkcs11.{module}")
    real = getattr(mod, name)
    calls = {"n": 0}

    def wrapper(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == nth:
            raise RuntimeError("forced") if name == "raw_p256_point" else pkx.FunctionFailed()
        return real(*a, **kw)

    unit = token.units.get(b"FX-0001") or token.enrol(b"FX-0001")
    req = token.request(unit, ref1)
    before = token.state()
    monkeypatch.setattr(mod, name, wrapper)
    with pytest.raises((Pkcs11Error, RuntimeError)):
        token.ks.export3(req)
    monkeypatch.undo()
    assert calls["n"] == nth
    assert token.state() == before  # no session object, no token object left
    assert tx(token.authority, EXPORT, req.encode())[0] == 0x9000  # it still works


def test_no_session_object_left_for_a_point_off_the_curve(token: Token) -> None:
    """export3 on its own (the authority checks E_U first): the token refuses the point."""
    unit = token.units.get(b"FX-0002") or token.enrol(b"FX-0002")
    req = token.request(unit)
    before = token.state()
    with pytest.raises(StoreError):
        token.ks.export3(req._replace(e_u=b"\x04" + bytes(63) + b"\x01"))
    assert token.state() == before


def test_no_session_object_left_over_many_exports(token: Token) -> None:
    unit = token.enrol(b"FX-0003")
    for _ in range(20):
        assert tx(token.authority, EXPORT, token.request(unit).encode())[0] == 0x9000
    assert token.ks.session_object_count() == 0


# -- the console script on a PKCS#11 home -------------------------------------------------------
SN1, SN2, SN3 = "1d00000001", "1d00000002", "1d00000003"


@pytest.mark.slow  # runs the console script
def test_cli_identity_set_in_a_pkcs11_home(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from .test_cli_hardware import LABEL as CLI_LABEL
    from .test_cli_hardware import PIN as CLI_PIN
    from .test_cli_hardware import _make_token, _require_softhsm, keyload

    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    module = _require_softhsm()
    conf = _make_token(tmp_path / "softhsm")
    home = tmp_path / "home"

    def run(*args: str, **kw: Any) -> Any:
        return keyload(*args, home=home, pin=CLI_PIN, **kw)

    init = ok(run("authority", "init", "--pkcs11", module, "--token", CLI_LABEL, conf=conf))
    assert "(pkcs11; suites 0x02, 0x03)" in init.stdout
    made = ok(run("set", "create", "--name", "plant", "--identity", "--json")).json()
    set_id = made["set_id"]
    assert made["kind"] == "identity"
    listed = {s["set_id"]: s["kind"] for s in ok(run("set", "list", "--json")).json()["sets"]}
    assert listed == {set_id: "identity"}
    ok(run("key", "generate", "--ref1", "TMK-1", "--type", "aes256", "--usage", "K0",
           "--mode", "B", "--exportability", "E", "--key-version", "1", "--sets", "any",
           "--slots", "1"))
    ok(run("key", "generate", "--ref1", "TMK-D", "--type", "aes256", "--usage", "K0",
           "--mode", "B", "--exportability", "E", "--key-version", "1", "--diversify",
           "--sets", set_id, "--slots", "2"))
    kcvs = {k["ref1"]: k["kcv"] for k in ok(run("key", "list", "--json")).json()["keys"]}
    for sn in (SN1, SN2):
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes256",
               "--slot", "2=aes256"))
    q = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint)
    c_u = ok(run("unit", "certify", "--set", set_id, "--sn", SN3, "--public-key",
                 q.hex())).stdout.strip()
    cert = Certificate.decode(bytes.fromhex(c_u))  # its signature: checked in-process above
    assert (cert.role, cert.set_id, cert.subject, cert.public_key) == (
        ROLE_UNIT, bytes.fromhex(set_id), bytes.fromhex(SN3), q)
    out = ok(run("load", "--sn", SN1, "--ref1", "TMK-1", "--ref2", "1", "--json")).json()
    assert (out["suite"], out["kcv"]) == (3, kcvs["TMK-1"])
    assert len(bytes.fromhex(out["receipt"])) == 64
    out = ok(run("load", "--sn", SN1, "--ref1", "TMK-D", "--ref2", "2", "--json")).json()
    assert out["suite"] == 3 and out["kcv"] != kcvs["TMK-D"]
    st = ok(run("unit", "status", "--sn", SN1, "--json")).json()
    assert [(s["ref2"], s["state"]) for s in st["slots"]] == [(1, "loaded"), (2, "loaded")]
    assert st["slots"][0]["kcv"] == kcvs["TMK-1"]
    # revocation: 6983 from then on, nothing exported
    line = ok(run("unit", "revoke", "--set", set_id, "--sn", SN2)).stdout.strip()
    assert line.endswith("revoked: its exports are refused (6983)")
    reg = {r["sn"]: r["status"] for r in ok(run("unit", "list", "--set", set_id,
                                                "--json")).json()["units"]}
    assert reg == {SN1: "active", SN2: "revoked", SN3: "active"}
    total = ok(run("authority", "exports", "--json")).json()["total"]
    assert_error(run("load", "--sn", SN2, "--ref1", "TMK-1", "--ref2", "1"), 6, "6983")
    assert ok(run("authority", "exports", "--json")).json()["total"] == total == 2
    rec = ok(run("receipts"))
    assert rec.last_line() == "2 receipts verified, 0 invalid", rec.describe()
    table = ok(run("unit", "list", "--set", set_id)).stdout
    assert re.search(rf"^{SN2} +revoked$", table, re.M)

