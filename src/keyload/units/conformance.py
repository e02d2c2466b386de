"""Run KLP1 conformance vector files (docs/protocol.md §9) through the real roles.

Export cases go through :class:`~keyload.units.authority.Authority` over an ephemeral
software keystore (plus the suite functions for the intermediates); import cases through
the :class:`~keyload.units.unit.Unit` emulator's APDU interface. A failure names the case
and the field that differs, never a value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import klp1
from ..core.apdu import CommandAPDU, ResponseAPDU
from ..core.errors import KeyloadError
from ..core.keys import KeyAttributes, KeyHeader, KeyType
from ..core.secret import Secret
from ..core.suites import get_suite
from .authority import Authority, ExportPolicy
from .keystore import SoftwareKeystore
from .unit import MemoryUnitStore, Slot, Unit, UnitState


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    reason: str = ""


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


def _unit_for(case: dict[str, Any]) -> Unit:
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
    state = UnitState.new(bytes.fromhex(case["SN"]), Secret(bytes.fromhex(case["T"])), slots,
                          verify_key=_h(case.get("verify_key")), suites=(0x01, 0x02))
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
    ref2 = data[2]
    slot = unit.state.slots[ref2]
    if slot.key is None or slot.key.buffer.hex() != exp["stored"].lower():
        diffs.append("stored")
    if slot.kcv is None or slot.kcv.hex() != exp["kcv"].lower():
        diffs.append("kcv")
    if rapdu.data[-16:].hex() != exp["receipt"].lower():
        diffs.append("receipt")
    # a replay of the same data is refused and changes nothing
    snap = _snapshot(unit)
    replay = ResponseAPDU.decode(unit.process_apdu(import_apdu(data)))
    if replay.sw != 0x6985 or _snapshot(unit) != snap:
        diffs.append("replay not refused with 6985")
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
            return run_export(case)
        if kind == "import":
            return run_import(case)
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        return [f"malformed case ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})"]
    except KeyloadError as e:  # e.g. a suite this build does not offer
        return [f"cannot run the case: {' '.join(str(e).split())[:160]}"]
    return [f"unknown kind {kind!r}"]


def run_files(paths: list[Path]) -> Iterator[CaseResult]:
    """Every case of every file (ValueError for a file that is not a KLP1 vector file,
    nested too deep to parse included: the input is wrong, not a case)."""
    for p in paths:
        for i, case in enumerate(load_cases(p)):
            name = str(case.get("name", f"#{i}")) if isinstance(case, dict) else f"#{i}"
            diffs = run_case(case)
            yield CaseResult(str(p), name, not diffs, "; ".join(diffs))
