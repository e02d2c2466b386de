"""Run KLP1 conformance vector files (docs/protocol.md §9, §10.6) through the real roles.

Export cases go through :class:`~keyload.units.authority.Authority` over an ephemeral
software keystore (plus the suite functions for the intermediates); import, initialize and
enrol cases through the :class:`~keyload.units.unit.Unit` emulator's APDU interface. Suite
0x03 cases (``"suite": 3``) give the authority the identity set, keys and revocations the
case describes, and the unit its d_U, C_U or Q_CA and pending challenge (R, e_U). A failure
names the case and the field that differs, never a value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import klp1
from ..core.apdu import CommandAPDU, ResponseAPDU
from ..core.ecc import ecdh_into, public_point
from ..core.errors import KeyloadError
from ..core.identity import identity_set_id
from ..core.keys import KeyAttributes, KeyHeader, KeyType
from ..core.messages3 import ExportRequest3, ExportResponse3, ImportData3, InitResponse3
from ..core.primitives import ecbdiv_into
from ..core.secret import Secret
from ..core.suite3 import SUITE_ECDH, t1_context
from ..core.suites import SUITE_ECBDIV, get_suite
from .authority import Authority, ExportPolicy, SetInfo
from .keystore import SoftwareKeystore
from .unit import MemoryUnitStore, Slot, Unit, UnitState

#: The public KLP1 vector files shipped with keyload (docs/protocol.md §9 and §10.6), which
#: ``keyload conformance`` runs when it is given no file; their origin is in
#: ``vectors/SOURCES.md`` beside them.
PUBLIC_VECTORS = tuple(Path(__file__).with_name("vectors") / name
                       for name in ("klp1-public.json", "klp1-suite3-public.json"))


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    reason: str = ""

    def told(self) -> str:
        return f"{'ok' if self.passed else 'FAIL'} {self.name} ({Path(self.file).name})" + \
            ("" if self.passed else f": {self.reason}")


@dataclass
class Tally:
    """The cases run so far: how many passed, and the failures."""

    passed: int = 0
    failures: list[CaseResult] = field(default_factory=list)

    def add(self, r: CaseResult) -> bool:
        """Count ``r``; whether it passed."""
        self.passed += r.passed
        if not r.passed:
            self.failures.append(r)
        return r.passed

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": len(self.failures), "failures": [
            {"file": r.file, "case": r.name, "reason": r.reason} for r in self.failures]}

    def line(self) -> str:
        return f"{self.passed} passed, {len(self.failures)} failed"


def load_cases(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable JSON vector file ({e.__class__.__name__})")\
            from None
    if not isinstance(doc, dict) or doc.get("protocol") != "KLP1" or \
            not isinstance(doc.get("cases"), list):
        raise ValueError(f"{path}: not a KLP1 vector file")
    return list(doc["cases"])


def _h(x: str | None) -> bytes | None:
    return None if x is None else bytes.fromhex(x)


def import_apdu(data: bytes) -> bytes:
    return CommandAPDU(0x80, 0x14, 0, 0, data, ne=256 if len(data) <= 255 else 65536).encode()


def run_export(case: dict[str, Any]) -> list[str]:
    """Differences between the vector and keyload (field names only)."""
    diffs: list[str] = []
    exp = case["expected"]
    suite = get_suite(case["suite"])
    t, sn, r = bytes.fromhex(case["T"]), bytes.fromhex(case["SN"]), bytes.fromhex(case["R"])
    ref1, ref2, k = bytes.fromhex(case["REF1"]), int(case["REF2"]), case["key"]
    # intermediates through the suite functions
    t1, sess = bytearray(32), bytearray(96)
    klp1.derive_t1(suite, t, sn, t1)
    klp1.derive_session(suite, t1, sn, r, ref2, sess)
    for name, got in (("T1", t1), ("Kenc", sess[:32]), ("Kmac", sess[32:64]),
                      ("Ksas", sess[64:])):
        if got.hex() != exp[name].lower():
            diffs.append(name)
    t1[:] = bytes(32)
    sess[:] = bytes(96)
    # the messages through the authority role
    ks = SoftwareKeystore.ephemeral()
    try:
        if case.get("signing_key"):
            pub = ks.set_signing_key(Secret(bytes.fromhex(case["signing_key"])))
            if case.get("verify_key") and pub.hex() != case["verify_key"].lower():
                diffs.append("verify_key")
        info = ks.add_set(Secret(t), "vector", signed=bool(case.get("signing_key")))
        if info.set_id.hex() != exp["set_id"].lower():
            diffs.append("set_id")
        ks.add_key(ref1, KeyType(k["type"]), Secret(bytes.fromhex(k["value"])),
                   KeyAttributes(k["usage"], k["mode"], k["exportability"]),
                   version=int(k["version"]), diversify=bool(k["diversify"]),
                   policy=ExportPolicy(None, None))
        from ..core.messages import ExportRequest, ExportResponse, ImportData

        req = ExportRequest(sn, r, info.set_id, suite.id, ref1, ref2).encode()
        if req.hex() != exp["export_request"].lower():
            diffs.append("export_request")
        rapdu = ResponseAPDU.decode(Authority(ks).process_apdu(
            CommandAPDU(0x80, 0x12, 0, 0, req, ne=256).encode()))
        if rapdu.sw != 0x9000:
            diffs.append(f"export status {rapdu.sw:04X}")
            return diffs
        resp = rapdu.data
        if resp.hex() != exp["export_response"].lower():
            diffs.append("export_response")
        er = ExportResponse.decode(resp)
        d = ImportData.decode(er.import_data)
        for name, got_b in (("H", d.h), ("W", d.w), ("SAS", d.sas), ("CAS", d.cas),
                            ("kcv", er.kcv), ("import_data", er.import_data),
                            ("import_apdu", import_apdu(er.import_data))):
            if got_b.hex() != exp[name].lower():
                diffs.append(name)
        # TA' as loaded: diversify again independently of the export path
        value = bytes.fromhex(k["value"])
        if k["diversify"]:
            ta = bytearray(len(value))
            klp1.diversify_into(suite, value, sn, ta)
        else:
            ta = bytearray(value)
        if ta.hex() != exp["TA_loaded"].lower():
            diffs.append("TA_loaded")
    finally:
        ks.close()
    return diffs


def _slots(case: dict[str, Any]) -> dict[int, Slot]:
    slots: dict[int, Slot] = {}
    for s in case["slots"]:
        accepts = frozenset(int(x) for x in s["accepts"])
        header = kcv = key = None
        if s.get("version") is not None:
            kt = KeyType(min(accepts)) if accepts else KeyType.AES256
            n = kt.default_length
            header = KeyHeader(1, kt, n, "K0", "B", int(s["version"]), "N", 0).encode()
            key = Secret(bytes(n))
            kcv = bytes(5)
        slots[int(s["ref2"])] = Slot(int(s["ref2"]), accepts, bool(s["locked"]), header, kcv,
                                     key)
    return slots


def _unit_for(case: dict[str, Any]) -> Unit:
    if case.get("suite") == SUITE_ECDH:
        state = UnitState.new_identity(bytes.fromhex(case["SN"]), _slots(case),
                                       unit_key=Secret(bytes.fromhex(case["unit_key"])),
                                       q_ca=bytes.fromhex(case["ca_public"]))
        unit = Unit(MemoryUnitStore(state))
        unit.set_challenge(_h(case.get("R")), _h(case.get("eph_unit")))
        return unit
    state = UnitState.new(bytes.fromhex(case["SN"]), Secret(bytes.fromhex(case["T"])),
                          _slots(case), verify_key=_h(case.get("verify_key")),
                          suites=(0x01, 0x02))
    unit = Unit(MemoryUnitStore(state))
    unit.set_challenge(_h(case.get("R")))
    return unit


def _snapshot(unit: Unit) -> list[tuple[int, bytes | None, bytes | None, bytes | None]]:
    return [(s.ref2, s.header, s.kcv, None if s.key is None else bytes(s.key.buffer))
            for s in unit.state.slots.values()]


def run_import(case: dict[str, Any]) -> list[str]:
    diffs: list[str] = []
    exp = case["expected"]
    unit = _unit_for(case)
    before = _snapshot(unit)
    data = bytes.fromhex(case["import_data"])
    rapdu = ResponseAPDU.decode(unit.process_apdu(import_apdu(data)))
    if f"{rapdu.sw:04X}" != exp["sw"].upper():
        diffs.append(f"sw {rapdu.sw:04X}, expected {exp['sw'].upper()}")
        return diffs
    if unit.pending is not None:
        diffs.append("challenge not consumed")
    if rapdu.sw != 0x9000:
        if _snapshot(unit) != before:
            diffs.append("slot changed on a refused import")
        return diffs
    if rapdu.data.hex() != exp["response"].lower():
        diffs.append("response")
    ref2 = ImportData3.decode(data).ref2 if case.get("suite") == SUITE_ECDH else data[2]
    slot = unit.state.slots[ref2]
    if slot.key is None or slot.key.buffer.hex() != exp["stored"].lower():
        diffs.append("stored")
    if slot.kcv is None or slot.kcv.hex() != exp["kcv"].lower():
        diffs.append("kcv")
    rct_len = 64 if case.get("suite") == SUITE_ECDH else 16
    if rapdu.data[-rct_len:].hex() != exp["receipt"].lower():
        diffs.append("receipt")
    if "ref1" in exp and (slot.ref1 is None or slot.ref1.hex() != exp["ref1"].lower()):
        diffs.append("ref1")
    # a replay of the same data is refused and changes nothing
    snap = _snapshot(unit)
    replay = ResponseAPDU.decode(unit.process_apdu(import_apdu(data)))
    if replay.sw != 0x6985 or _snapshot(unit) != snap:
        diffs.append("replay not refused with 6985")
    return diffs


# -- suite 0x03 (docs/protocol.md §10.6) ------------------------------------------------


class _VectorKeystore(SoftwareKeystore):
    """A keystore that also answers for the T sets a case names by set id alone (a T with
    a given KCV cannot be made): they exist, and are not identity sets."""

    def __init__(self, transport_sets: frozenset[bytes]) -> None:
        super().__init__(None)
        self.transport_sets = transport_sets

    def set_info(self, set_id: bytes) -> SetInfo:
        if set_id in self.transport_sets:
            return SetInfo(set_id, "vector T set")
        return super().set_info(set_id)


def _authority3(case: dict[str, Any]) -> _VectorKeystore:
    held = case["authority"]
    ks = _VectorKeystore(frozenset(bytes.fromhex(x) for x in held["transport_sets"]))
    sn = bytes.fromhex(case["SN"])
    for set_hex in held["identity_sets"]:
        info = ks.add_identity_set(Secret(bytes.fromhex(case["ca_key"])),
                                   Secret(bytes.fromhex(case["authority_key"])), "vector",
                                   authority_id=bytes.fromhex(case["authority_id"]))
        if info.set_id.hex() != set_hex.lower():
            raise ValueError("an identity set's id is not that of ca_key")
        for sn_hex in held["revoked"]:
            revoked = bytes.fromhex(sn_hex)
            q = public_point(bytes.fromhex(case["unit_key"])) if revoked == sn else None
            if q is None:
                raise ValueError("a revoked SN other than the case's has no key")
            ks.certify_unit(info.set_id, revoked, q)
            ks.revoke_unit(info.set_id, revoked)
    k = case["key"]
    for entry in held["keys"]:
        slots = entry["slots"]
        if not 1 <= len(entry["REF1"]) // 2 <= 32:
            continue  # no request can name it (C6 is 1-32 bytes): held or not, 6A88
        ks.add_key(bytes.fromhex(entry["REF1"]), KeyType(k["type"]),
                   Secret(bytes.fromhex(k["value"])),
                   KeyAttributes(k["usage"], k["mode"], k["exportability"]),
                   version=int(k["version"]), diversify=bool(k["diversify"]),
                   policy=ExportPolicy(None, None if slots is None
                                       else frozenset(int(x) for x in slots)))
    e_a = bytes.fromhex(case["eph_authority"])
    ks.draw = lambda n: e_a[:n]
    return ks


def _intermediates3(case: dict[str, Any], req: ExportRequest3, e_a: bytes) -> dict[str, bytes]:
    """Z, T1 and the session keys recomputed from the case's e_A (§10.3)."""
    base = req.base
    z, t1, sess = bytearray(32), bytearray(32), bytearray(96)
    ecdh_into(bytes.fromhex(case["eph_authority"]), req.e_u, z)
    ecbdiv_into(z, t1, label=klp1.LABEL_T1, context=t1_context(base.sn, base.r, req.e_u, e_a))
    klp1.derive_session(get_suite(SUITE_ECBDIV), t1, base.sn, base.r, base.ref2, sess)
    out = {"Z": bytes(z), "T1": bytes(t1), "Kenc": bytes(sess[:32]),
           "Kmac": bytes(sess[32:64]), "Ksas": bytes(sess[64:])}
    for b in (z, t1, sess):
        b[:] = bytes(len(b))
    return out


def run_export3(case: dict[str, Any]) -> list[str]:
    """A suite 0x03 export case through the authority role (§10.4, §10.6)."""
    diffs: list[str] = []
    exp = case["expected"]
    data = bytes.fromhex(case["export_request"])
    ks = _authority3(case)
    try:
        rapdu = ResponseAPDU.decode(Authority(ks).process_apdu(
            CommandAPDU(0x80, 0x12, 0, 0, data, ne=65536).encode()))
        if f"{rapdu.sw:04X}" != exp["sw"].upper():
            return [f"sw {rapdu.sw:04X}, expected {exp['sw'].upper()}"]
        if rapdu.sw != 0x9000:
            return diffs
        req = ExportRequest3.decode(data)
        er = ExportResponse3.decode(rapdu.data)
        d = ImportData3.decode(er.import_data)
        got = {"set_id": req.base.set_id, "C_U": req.c_u.encode(), "C_A": d.c_a.encode(),
               "E_U": req.e_u, "E_A": d.e_a, "sigU": req.sig_u, "H": d.h, "W": d.w,
               "SAS": d.sas, "CAS": d.cas, "kcv": er.kcv, "import_data": er.import_data,
               "import_apdu": import_apdu(er.import_data), "export_request": data,
               "export_response": rapdu.data,
               **_intermediates3(case, req, d.e_a)}
        if ks.identity_set(req.base.set_id).c_a != d.c_a:
            diffs.append("C_A held")
        k = case["key"]
        value = bytes.fromhex(k["value"])
        ta = bytearray(value)
        if k["diversify"]:
            klp1.diversify_into(get_suite(SUITE_ECBDIV), value, req.base.sn, ta)
        got["TA_loaded"] = bytes(ta)
        diffs += [name for name, v in got.items() if v.hex() != exp[name].lower()]
    finally:
        ks.close()
    return diffs


def _unit3(case: dict[str, Any], draws: list[bytes], *, certificate: bytes | None) -> Unit:
    state = UnitState.new_identity(bytes.fromhex(case["SN"]), {},
                                   unit_key=Secret(bytes.fromhex(case["unit_key"])),
                                   certificate=certificate)
    queue = list(draws)
    return Unit(MemoryUnitStore(state), rng=lambda n: queue.pop(0)[:n])


def run_initialize(case: dict[str, Any]) -> list[str]:
    """INITIALIZE DOWNLOAD of a unit of an identity set, its R and e_U those of the case."""
    exp = case["expected"]
    unit = _unit3(case, [bytes.fromhex(case["R"]), bytes.fromhex(case["eph_unit"])],
                  certificate=bytes.fromhex(case["C_U"]))
    rapdu = ResponseAPDU.decode(unit.process_apdu(
        CommandAPDU(0x80, 0x10, 0, 0, ne=65536).encode()))
    if rapdu.sw != 0x9000:
        return [f"sw {rapdu.sw:04X}, expected 9000"]
    diffs = [] if rapdu.data.hex() == exp["response"].lower() else ["response"]
    if unit.state.set_id.hex() != case["set_id"].lower():
        diffs.append("set_id")
    if InitResponse3.decode(rapdu.data).r != unit.pending:
        diffs.append("pending challenge")
    return diffs


def run_enrol(case: dict[str, Any]) -> list[str]:
    """PUT CERTIFICATE to a unit that has its key and no certificate (§10.2)."""
    exp = case["expected"]
    unit = _unit3(case, [], certificate=None)
    data = bytes.fromhex(case["data"])
    rapdu = ResponseAPDU.decode(unit.process_apdu(
        CommandAPDU(0x80, 0x1A, 0, 0, data).encode()))
    if f"{rapdu.sw:04X}" != exp["sw"].upper():
        return [f"sw {rapdu.sw:04X}, expected {exp['sw'].upper()}"]
    st = unit.state
    if rapdu.sw != 0x9000:
        return [] if st.certificate is None and st.q_ca is None else ["state changed"]
    diffs = []
    if st.certificate is None or st.q_ca is None or st.set_id != identity_set_id(st.q_ca):
        diffs.append("certificate not stored")
    again = ResponseAPDU.decode(unit.process_apdu(
        CommandAPDU(0x80, 0x1A, 0, 0, data).encode()))
    if again.sw != 0x6985:
        diffs.append("a second PUT CERTIFICATE not refused with 6985")
    return diffs


def run_case(case: dict[str, Any]) -> list[str]:
    """The differences from the case's expectations (empty: passed). A case this build
    cannot run — malformed, a suite it does not know, a value out of range — is one
    failure with its reason; it never stops the run."""
    if not isinstance(case, dict):
        return ["the case is not a JSON object"]
    kind = case.get("kind")
    try:
        if kind == "export":
            return run_export3(case) if case.get("suite") == SUITE_ECDH else run_export(case)
        if kind == "import":
            return run_import(case)
        if kind == "initialize":
            return run_initialize(case)
        if kind == "enrol":
            return run_enrol(case)
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        return [f"malformed case ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})"]
    except KeyloadError as e:  # e.g. a suite this build does not offer
        return [f"cannot run the case: {' '.join(str(e).split())[:160]}"]
    return [f"unknown kind {kind!r}"]


def run_files(paths: list[Path]) -> Iterator[CaseResult]:
    """Every case of every file, :data:`PUBLIC_VECTORS` when none is given (ValueError for
    a file that is not a KLP1 vector file, nested too deep to parse included: the input is
    wrong, not a case). A path that is not a file is refused before any case runs."""
    paths = paths or list(PUBLIC_VECTORS)
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
    for p in paths:
        for i, case in enumerate(load_cases(p)):
            name = str(case.get("name", f"#{i}")) if isinstance(case, dict) else f"#{i}"
            diffs = run_case(case)
            yield CaseResult(str(p), name, not diffs, "; ".join(diffs))
