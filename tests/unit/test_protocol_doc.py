"""docs/protocol.md agrees with the code: tables of status words, tags, commands, AIDs,
key types, suites and flags against keyload's constants (and, for commands, against the
emulated unit and the authority), the check order of §7 against the unit's answers, and
the worked example of Appendix A recomputed with keyload.

Each check returns the list of disagreements, so that a test can also show, on a copy of
the document with one value changed, that the check notices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import KLP1_VECTORS

from keyload.core import aids as codes
from keyload.core import keys, klp1, suites
from keyload.core import messages as msg
from keyload.core.apdu import encode_command
from keyload.core.errors import SW, MemoryFailure, Unsupported
from keyload.core.keys import KeyAttributes, KeyType, aes_kcv
from keyload.core.primitives import aes_cmac, aes_ecb_encrypt_into
from keyload.core.secret import Secret
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()
VECTORS = json.loads(KLP1_VECTORS.read_text())
CASES = {c["name"]: c for c in VECTORS["cases"]}
NONE = "—"  # a value the contract defines and keyload does not implement yet (suite 0x03)

# The contract's section titles; citations "§N" must keep pointing at the same rules.
CONTRACT_SECTIONS = {
    "1": "Roles and terms", "2": "Key check values",
    "3": "Key types and the key header H", "4": "Suites", "5": "Messages",
    "6": "Status words", "7": "Unit rules (IMPORTKEY)", "8": "Authority rules (EXPORTKEY)",
    "9": "Conformance vectors", "10": "Suite 0x03",
    "10.1": "Keys and identities", "10.2": "New tags and commands", "10.3": "One download",
    "10.4": "Authority rules (suite 0x03)", "10.5": "Unit rules (IMPORTKEY, suite 0x03)",
    "10.6": "Conformance vectors (suite 0x03)",
}


# -- reading the document ---------------------------------------------------------------
def sections(text: str) -> dict[str, str]:
    """Body of each numbered section and subsection ("7", "10.2") and appendix ("A")."""
    out: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        m = re.match(r"^#{2,3} (?:Appendix )?([0-9]+(?:\.[0-9]+)?|[A-Z])\.? ", line)
        if m:
            key = m.group(1)
            out[key] = ""
        elif key is not None:
            out[key] += line + "\n"
    return out


def headings(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in re.finditer(r"^#{2,3} ([0-9]+(?:\.[0-9]+)?)\.? (.+)$", text, re.M):
        found[m.group(1)] = m.group(2)
    return found


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(body: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``body`` as rows keyed by the header's cells."""
    out: list[list[dict[str, str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        if (lines[i].startswith("|") and i + 1 < len(lines)
                and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1])):
            head = _cells(lines[i])
            rows: list[dict[str, str]] = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, _cells(lines[i]), strict=True)))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def table(body: str, *columns: str) -> list[dict[str, str]]:
    """The first table of ``body`` whose header has all of ``columns``."""
    for rows in tables(body):
        if rows and all(c in rows[0] for c in columns):
            return rows
    raise AssertionError(f"no table with columns {columns}")


def _hex(cell: str) -> bytes:
    return bytes.fromhex(cell.replace(" ", "").strip("`"))


# -- status words (§6) ------------------------------------------------------------------
def status_word_problems(text: str) -> list[str]:
    rows = table(sections(text)["6"], "SW", "keyload name")
    problems: list[str] = []
    seen: dict[int, str] = {}
    for row in rows:
        sw, name = int(row["SW"], 16), row["keyload name"]
        if sw in seen:
            problems.append(f"{sw:04X} listed twice")
        seen[sw] = name
        if name == NONE:
            if sw in {int(s) for s in SW}:
                problems.append(f"{sw:04X} is defined in the code as {SW(sw).name}")
            if "suite 0x03" not in row["meaning"]:
                problems.append(f"{sw:04X} has no keyload name and is not marked suite 0x03")
        elif name not in SW.__members__:
            problems.append(f"{sw:04X}: no status word {name} in the code")
        elif SW[name] != sw:
            problems.append(f"{name} is {SW[name]:04X} in the code, {sw:04X} in the document")
    problems += [f"{s.name} ({s:04X}) missing from §6" for s in SW if seen.get(s) != s.name]
    return problems


# -- tags (§5, §10.2) -------------------------------------------------------------------
def tag_constants() -> dict[str, int]:
    return {k: v for k, v in vars(msg).items() if k.startswith("T_") and isinstance(v, int)}


def tag_problems(text: str) -> list[str]:
    sec = sections(text)
    rows = table(sec["5"], "tag", "keyload name") + table(sec["10.2"], "tag", "keyload name")
    consts = tag_constants()
    problems: list[str] = []
    named: dict[str, int] = {}
    for row in rows:
        tag, name = int(row["tag"], 16), row["keyload name"]
        if name == NONE:
            if tag in consts.values():
                problems.append(f"tag {tag:02X} has a constant in the code but none here")
        elif consts.get(name) != tag:
            code = consts.get(name)
            problems.append(f"{name}: document says {tag:02X}, code says "
                            f"{'nothing' if code is None else f'{code:02X}'}")
        else:
            named[name] = tag
    problems += [f"{k} ({v:02X}) missing from the tag tables"
                 for k, v in consts.items() if k not in named]
    return problems


# -- commands and AIDs (§5) -------------------------------------------------------------
def _roles() -> tuple[Unit, Authority]:
    state = UnitState.new(b"SN-1", Secret(bytes(range(32))), {1: Slot(1, frozenset({3}))})
    return Unit(MemoryUnitStore(state)), Authority(SoftwareKeystore.ephemeral())


def command_problems(text: str) -> list[str]:
    sec = sections(text)
    problems: list[str] = []
    aids = table(sec["5"], "AID", "keyload name")
    for row in aids:
        if getattr(codes, row["keyload name"], None) != _hex(row["AID"]):
            problems.append(f"{row['keyload name']} differs from the code")
    problems += [f"{k} missing from the AID table" for k in vars(codes)
                 if k.startswith("AID_") and k not in {r["keyload name"] for r in aids}]
    cmds = table(sec["5"], "command", "CLA", "INS", "keyload name")
    for row in cmds:
        ins = int(row["INS"], 16)
        if getattr(codes, row["keyload name"], None) != ins:
            problems.append(f"{row['command']}: INS {ins:02X} is not {row['keyload name']}")
        # the role the document names must know the command: anything but 6D00/6E00
        p2 = 1 if row["P2"] == "REF2" else int(row["P2"], 16)
        apdu = bytes((int(row["CLA"], 16), ins, int(row["P1"], 16), p2))
        unit, authority = _roles()
        for who, role in (("unit", unit.process_apdu), ("authority", authority.process_apdu)):
            if who in row["to"] and role(apdu)[-2:] in (b"\x6d\x00", b"\x6e\x00"):
                problems.append(f"{row['command']}: the {who} does not know {apdu.hex()}")
    problems += [f"{k} missing from the command table" for k in vars(codes)
                 if k.startswith("INS_") and k not in {r["keyload name"] for r in cmds}]
    for row in aids:  # each application answers SELECT of its own AID with 9000
        unit, authority = _roles()
        app = unit.process_apdu if row["application"] == "unit" else authority.process_apdu
        select = encode_command(0x00, codes.INS_SELECT, 0x04, 0x00, _hex(row["AID"]))
        if app(select) != b"\x90\x00":
            problems.append(f"SELECT of the {row['application']} AID is not 9000")
    return problems


# -- key types, flags and suites (§3, §4) -----------------------------------------------
def key_type_problems(text: str) -> list[str]:
    problems: list[str] = []
    rows = table(sections(text)["3"], "type", "keyload name", "length in bytes")
    for row in rows:
        kt = KeyType.__members__.get(row["keyload name"])
        if kt is None or kt != int(row["type"], 16):
            problems.append(f"key type {row['type']} is not {row['keyload name']}")
            continue
        lo, _, hi = row["length in bytes"].partition("–")
        lo_n, hi_n = int(lo), int(hi or lo)
        for n, ok in ((lo_n - 1, False), (lo_n, True), (hi_n, True), (hi_n + 1, False)):
            try:
                kt.check_length(n)
                fits = True
            except ValueError:
                fits = False
            if fits != ok:
                problems.append(f"{kt.name}: the document and the code disagree on "
                                f"length {n}")
    listed = {r["keyload name"] for r in rows}
    problems += [f"{kt.name} missing from §3" for kt in KeyType if kt.name not in listed]
    for row in table(sections(text)["3"], "flag bit", "keyload name"):
        bit = int(row["flag bit"].split()[0])
        if getattr(keys, row["keyload name"], None) != 1 << bit:
            problems.append(f"flag bit {bit} is not {row['keyload name']}")
    return problems


def suite_problems(text: str) -> list[str]:
    problems: list[str] = []
    implemented: set[int] = set()
    for row in table(sections(text)["4"], "suite", "keyload name", "KDF"):
        sid, name = int(row["suite"], 16), row["keyload name"]
        if name == NONE:
            if sid in suites.SUITES:
                problems.append(f"suite {sid:02X} is implemented but marked as not")
            continue
        if getattr(suites, name, None) != sid or sid not in suites.SUITES:
            problems.append(f"suite {sid:02X} is not {name}")
            continue
        if not row["KDF"].startswith(suites.SUITES[sid].name):
            problems.append(f"suite {sid:02X} is {suites.SUITES[sid].name} in the code")
        implemented.add(sid)
    if implemented != set(suites.SUITES):
        problems.append(f"the code implements suites {sorted(suites.SUITES)}")
    return problems


# -- the unit's check order (§7) --------------------------------------------------------
def check_order(text: str) -> list[int]:
    """The status word each numbered step of §7 gives, in the document's order."""
    body = sections(text)["7"]
    words: list[int] = []
    for m in re.finditer(r"^(\d+)\. \*\*(.*?)(?=^\d+\. \*\*|^[A-Z*]|\Z)", body, re.M | re.S):
        found = re.findall(r"\b(6[0-9A-F]{3})\b", m.group(2))
        words.append(int(found[0], 16) if found else 0)
    return words


class _FailingStore(MemoryUnitStore):
    def commit(self, state: UnitState, slot: Slot) -> None:
        raise MemoryFailure("write failed")


def _unit_answer(fault: str) -> int:
    """The unit's SW for IMPORTKEY data that fails only at ``fault``."""
    t, sn, r = bytes(range(32)), b"SN-1", bytes(range(16))
    slot = Slot(1, frozenset({3}), locked=fault == "policy")
    state = UnitState.new(sn, Secret(bytearray(t)), {1: slot})
    unit = Unit((_FailingStore if fault == "store" else MemoryUnitStore)(state))
    if fault != "challenge":
        unit.set_challenge(r)
    s = suites.get_suite(1)
    ex = klp1.export_key(s, t, sn, r, 1, key_type=KeyType.AES256, key=bytes(32), usage="K0",
                         mode="B", version=1, exportability="N", diversify=False)
    d = msg.ImportData.decode(ex.import_data)
    h, w, sas = d.h, d.w, d.sas
    if fault == "header":
        h = b"\x02" + h[1:]
    if fault == "unwrap":
        w = bytes(len(w))
    if fault == "sas":
        sas = bytes(16)
    t1, ses = bytearray(32), bytearray(96)
    klp1.derive_t1(s, t, sn, t1)
    klp1.derive_session(s, t1, sn, r, 1, ses)
    cas = aes_cmac(ses[32:64], klp1.cas_message(sn, r, 1, h, w, sas))
    if fault == "cas":
        cas = bytes(16)
    data = msg.ImportData(2 if fault == "slot" else 1, h, w, sas, cas).encode()
    if fault == "structure":
        data += b"\x00"
    answer = unit.process_apdu(encode_command(0x80, codes.INS_IMPORT, 0, 0, data, 256))
    return int.from_bytes(answer[-2:], "big")


FAULTS = ("challenge", "structure", "slot", "header", "cas", "policy", "unwrap", "sas",
          "store")


# -- the worked example (Appendix A) ----------------------------------------------------
def example_values(text: str) -> dict[str, bytes]:
    """Appendix A: the name/value tables and the APDU blocks (first line: the name)."""
    body = sections(text)["A"]
    values: dict[str, bytes] = {}
    for rows in tables(body):
        for row in rows:
            values[row["name"]] = _hex(row["value"])
    for block in re.findall(r"^```\n(.*?)^```", body, re.M | re.S):
        name, *lines = block.strip().splitlines()
        values[name] = b"".join(_hex(line.split("  ")[0]) for line in lines)
    return values


def _kbkdf_fixed(label: bytes, context: bytes, bits: int) -> bytes:
    return label + b"\x00" + context + bits.to_bytes(2, "big")


def _cmac_blocks(key: bytes, fixed: bytes, n: int) -> bytes:
    return b"".join(aes_cmac(key, bytes((i,)) + fixed) for i in range(1, n + 1))


@functools.cache
def example_want() -> dict[str, bytes]:
    """Appendix A computed with keyload's roles and functions (and the vector inputs)."""
    c = CASES["export-2-suite1-type02"]
    k = c["key"]
    t, sn, r, ref1 = (bytes.fromhex(c[x]) for x in ("T", "SN", "R", "REF1"))
    ref2, ta = c["REF2"], bytes.fromhex(k["value"])
    s = suites.get_suite(1)
    want = {"T": t, "SN": sn, "R": r, "REF1": ref1, "REF2": bytes((ref2,)), "TA": ta}
    want["set id"] = aes_kcv(t)
    want["T1 fixed"] = _kbkdf_fixed(b"KLP1-T1", sn, 256)
    want["DL fixed"] = _kbkdf_fixed(b"KLP1-DL", klp1.lv(sn) + r + bytes((ref2,)), 768)
    want["TA fixed"] = _kbkdf_fixed(b"KLP1-TA", klp1.lv(sn), 8 * len(ta))
    t1, ses, ta_ = bytearray(32), bytearray(96), bytearray(len(ta))
    klp1.derive_t1(s, t, sn, t1)
    klp1.derive_session(s, t1, sn, r, ref2, ses)
    klp1.diversify_into(s, ta, sn, ta_)
    # the document's description of KBKDF gives the same bytes as the suite
    assert bytes(t1) == _cmac_blocks(t, want["T1 fixed"], 2)
    assert bytes(ses) == _cmac_blocks(bytes(t1), want["DL fixed"], 6)
    assert bytes(ta_) == _cmac_blocks(ta, want["TA fixed"], 2)[:len(ta)]
    want.update({"T1": bytes(t1), "Kenc": bytes(ses[:32]), "Kmac": bytes(ses[32:64]),
                 "Ksas": bytes(ses[64:]), "TA'": bytes(ta_)})
    # the authority role answers EXPORTKEY
    ks = SoftwareKeystore.ephemeral()
    ks.add_set(Secret(bytearray(t)), "example")
    ks.add_key(ref1, KeyType(k["type"]), Secret(bytearray(ta)),
               KeyAttributes(k["usage"], k["mode"], k["exportability"]),
               version=k["version"], diversify=k["diversify"], policy=ExportPolicy(None, None))
    # the unit role: its R is the vector's, it supports both suites, slot 3 takes AES-192
    state = UnitState.new(sn, Secret(bytearray(t)), {ref2: Slot(ref2, frozenset({2}))})
    unit = Unit(MemoryUnitStore(state), rng=lambda n: r)
    init = encode_command(0x80, codes.INS_INIT, 0, 0, b"", 256)
    want["INITIALIZE DOWNLOAD command"] = init
    want["INITIALIZE DOWNLOAD response"] = unit.process_apdu(init)[:-2]
    req = msg.ExportRequest(sn, r, want["set id"], s.id, ref1, ref2).encode()
    want["EXPORTKEY command"] = encode_command(0x80, codes.INS_EXPORT, 0, 0, req, 256)
    answer = Authority(ks).process_apdu(want["EXPORTKEY command"])
    assert answer[-2:] == b"\x90\x00"
    want["EXPORTKEY response"] = answer[:-2]
    resp = msg.ExportResponse.decode(answer[:-2])
    d = msg.ImportData.decode(resp.import_data)
    want.update({"H": d.h, "W": d.w, "SAS": d.sas, "CAS": d.cas, "KCV": resp.kcv})
    imp = encode_command(0x80, codes.INS_IMPORT, 0, 0, resp.import_data, 256)
    want["IMPORTKEY command"] = imp
    answer = unit.process_apdu(imp)
    assert answer[-2:] == b"\x90\x00"
    want["IMPORTKEY response"] = answer[:-2]
    want["RCT"] = msg.ImportResponse.decode(answer[:-2]).rct
    status = encode_command(0x80, codes.INS_STATUS, 0, ref2, b"", 256)
    want["GET SLOT STATUS command"] = status
    want["GET SLOT STATUS response"] = unit.process_apdu(status)[:-2]
    ks.close()
    # suite 0x02: T1 by ECBDIV, step by step
    c2 = CASES["export-6-suite2-type01"]
    t2, sn2 = bytes.fromhex(c2["T"]), bytes.fromhex(c2["SN"])
    h = hashlib.sha256(b"KLP1-T1\x00" + sn2).digest()[:15]
    t1_2, ecb = bytearray(32), bytearray(32)
    klp1.derive_t1(suites.get_suite(2), t2, sn2, t1_2)
    aes_ecb_encrypt_into(t2, h + b"\x01" + h + b"\x02", ecb)
    assert ecb == t1_2
    want.update({"ECBDIV T": t2, "ECBDIV SN": sn2, "ECBDIV h": h, "ECBDIV B1": h + b"\x01",
                 "ECBDIV B2": h + b"\x02", "ECBDIV T1": bytes(t1_2)})
    return want


def example_problems(text: str) -> list[str]:
    got = example_values(text)
    want = example_want()
    problems = [f"{n}: not what keyload computes" for n in want if n in got and got[n] != want[n]]
    problems += [f"{n}: missing from Appendix A" for n in want if n not in got]
    problems += [f"{n}: not recomputed by this test" for n in got if n not in want]
    return problems


# -- the tests --------------------------------------------------------------------------
def test_sections_keep_the_contract_numbers() -> None:
    found = headings(DOC)
    assert list(found)[:len(CONTRACT_SECTIONS)] == list(CONTRACT_SECTIONS)
    for number, title in CONTRACT_SECTIONS.items():
        assert found[number].startswith(title), number


def test_status_words_match_the_code() -> None:
    assert status_word_problems(DOC) == []


def test_tags_match_the_code() -> None:
    assert tag_problems(DOC) == []


def test_commands_and_aids_match_the_code_and_the_roles() -> None:
    assert command_problems(DOC) == []


def test_key_types_lengths_and_flags_match_the_code() -> None:
    assert key_type_problems(DOC) == []


def test_suites_match_the_code() -> None:
    assert suite_problems(DOC) == []


def test_suite_03_is_refused_as_the_document_says() -> None:
    """"keyload answers suite 0x03 with 6A81 today" (top of the document, §10)."""
    assert "keyload answers suite 0x03 with 6A81 today" in DOC
    c = CASES["export-0-suite1-type03"]
    req = msg.ExportRequest.decode(bytes.fromhex(c["expected"]["export_request"]))
    ks = SoftwareKeystore.ephemeral()
    ks.add_set(Secret(bytearray.fromhex(c["T"])), "s")
    with pytest.raises(Unsupported):
        Authority(ks).export_request(req._replace(suite=3))
    with pytest.raises(Unsupported):
        suites.get_suite(3)


def test_unit_check_order_is_the_documented_one() -> None:
    """Each step of §7, failed alone, gives the SW the document gives that step."""
    documented = check_order(DOC)
    assert len(documented) == len(FAULTS)
    assert [_unit_answer(f) for f in FAULTS] == documented


def test_worked_example_is_what_keyload_computes() -> None:
    assert example_problems(DOC) == []


def test_worked_example_equals_the_vector() -> None:
    e = CASES["export-2-suite1-type02"]["expected"]
    got = example_values(DOC)
    for doc_name, vec_name in (("T1", "T1"), ("Kenc", "Kenc"), ("Kmac", "Kmac"),
                               ("Ksas", "Ksas"), ("TA'", "TA_loaded"), ("H", "H"), ("W", "W"),
                               ("SAS", "SAS"), ("CAS", "CAS"), ("KCV", "kcv"),
                               ("set id", "set_id"), ("IMPORTKEY command", "import_apdu"),
                               ("EXPORTKEY response", "export_response")):
        assert got[doc_name].hex() == e[vec_name], doc_name
    assert got["RCT"].hex() == CASES["import-2-ok"]["expected"]["receipt"]
    assert got["IMPORTKEY response"].hex() == CASES["import-2-ok"]["expected"]["response"]
    assert got["ECBDIV T1"].hex() == CASES["export-6-suite2-type01"]["expected"]["T1"]


# -- each check notices a changed document ----------------------------------------------
def _swap(old: str, new: str) -> str:
    assert DOC.count(old) == 1, old
    return DOC.replace(old, new)


MUTATIONS: list[tuple[str, Callable[[str], list[str]], str, str]] = [
    ("sw value", status_word_problems, "| 6986 | POLICY |", "| 6987 | POLICY |"),
    ("sw dropped", status_word_problems, "| 6E00 | CLA_NOT_SUPPORTED |", "| 6E00 | — |"),
    ("tag value", tag_problems, "| CD | T_KCV |", "| CC | T_KCV |"),
    ("tag name", tag_problems, "| CF | T_RCT |", "| CF | — |"),
    ("ins", command_problems, "| 80 | 16 | 00 | REF2 | INS_STATUS |",
     "| 80 | 18 | 00 | REF2 | INS_STATUS |"),
    ("cla", command_problems, "| 80 | 14 | 00 | 00 | INS_IMPORT |",
     "| 84 | 14 | 00 | 00 | INS_IMPORT |"),
    ("aid", command_problems, "| F0 4B 4C 50 31 45 49 |", "| F0 4B 4C 50 31 45 48 |"),
    ("key length", key_type_problems, "| HMAC-SHA256 secret | 16–64 |",
     "| HMAC-SHA256 secret | 16–63 |"),
    ("key type", key_type_problems, "| 02 | AES192 |", "| 04 | AES192 |"),
    ("flag", key_type_problems, "| 1 (`02`) | FLAG_ED25519 |", "| 2 (`04`) | FLAG_ED25519 |"),
    ("suite", suite_problems, "| 02 | SUITE_ECBDIV | ECBDIV", "| 02 | SUITE_ECBDIV | KBKDF"),
    ("example value", example_problems, "| CAS | 6566eb76bdd6e1bd4c38802f8ea6e24e |",
     "| CAS | 6566eb76bdd6e1bd4c38802f8ea6e24f |"),
    ("example apdu", example_problems, "80 16 00 03 00  CLA", "80 16 00 02 00  CLA"),
    ("example field", example_problems, "cf 10 1cad01f65f2b9d4f0a8f0110f37afe9c",
     "cf 10 1cad01f65f2b9d4f0a8f0110f37afe9d"),
]


@pytest.mark.parametrize(("check", "old", "new"), [m[1:] for m in MUTATIONS],
                         ids=[m[0] for m in MUTATIONS])
def test_each_check_notices_a_changed_value(check: Callable[[str], list[str]], old: str,
                                            new: str) -> None:
    assert check(DOC) == []
    assert check(_swap(old, new)) != []


def test_check_order_parser_notices_a_changed_step() -> None:
    changed = _swap("else 6986: the slot is not", "else 6A86: the slot is not")
    assert check_order(changed) != check_order(DOC)


def test_every_protocol_citation_names_the_document_and_one_of_its_sections() -> None:
    """The code, the tests and the README cite the protocol as ``docs/protocol.md §N`` (the
    page in this repository), and every N they cite is a section of it."""
    import re

    root = Path(__file__).resolve().parents[2]
    sections = {m.group(1) for m in re.finditer(r"^## (\d+)\. ", DOC, re.M)}
    files = [*root.joinpath("src").rglob("*.py"), *root.joinpath("tests").rglob("*.py"),
             *root.joinpath("benchmarks").rglob("*.py"), root / "README.md"]
    bare, cited = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        bare += [f"{f.relative_to(root)}: {m.group(0)}"
                 for m in re.finditer(r"(?<!docs/)PROTOCOL\.md", text)]
        for m in re.finditer(r"docs/protocol\.md §(\d+)", text):
            cited += 1
            assert m.group(1) in sections, f"{f.relative_to(root)} cites §{m.group(1)}"
    assert bare == []
    assert cited > 40
