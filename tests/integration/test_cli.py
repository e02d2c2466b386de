"""The ``keyload`` console script end to end, in subprocesses.

Every test runs the installed script (``Path(sys.executable).with_name("keyload")``)
with ``--home`` under a temporary directory, ``KEYLOAD_PASSPHRASE`` set and stdin from
/dev/null or given input, and checks real outcomes: exit codes, output, JSON fields and
the files on disk. One worked session (a module-scoped fixture) builds an authority, sets,
keys and units and loads keys; the negative tests then run against that home and check
that a refused or failed command leaves the stored state as it was.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KLP1_VECTORS, require

from .cli_helpers import (
    KEYLOAD,
    PASSPHRASE,
    SEAL_MAGIC,
    Result,
    aes_kcv,
    assert_error,
    assert_no_secrets,
    hmac_kcv,
    ok,
    run,
    secret_byte_forms,
    tree_files,
    xor,
)

pytestmark = pytest.mark.slow  # the worked session and most tests run the console script

EXIT_USAGE, EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE, EXIT_REFUSED, EXIT_INTEGRITY = (
    2, 3, 4, 5, 6, 7)

SN1 = "0102030405"      # unit of set A: slots 1=aes256 2=hmac 3=aes128 (locked) 4,5=aes256
SN2 = "0b0b0b"          # unit of set B (Ed25519 SAS): slot 1=aes256
KCV_LINE = re.compile(r"KCV ([0-9A-F]{10})$")


@pytest.fixture(scope="module")
def keyload_script() -> Path:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    return KEYLOAD


# -- the worked session --------------------------------------------------------------------
@dataclass
class Session:
    home: Path
    res: dict[str, Result] = field(default_factory=dict)
    set_a: str = ""
    set_b: str = ""
    set_c: str = ""
    imp_value: bytes = b""
    him_value: bytes = b""
    cmp_components: list[bytes] = field(default_factory=list)
    set_c_components: list[bytes] = field(default_factory=list)

    @property
    def secrets(self) -> dict[str, bytes]:
        out = {"IMP value": self.imp_value, "HIM value": self.him_value,
               "CMP key": xor(*self.cmp_components),
               "set C transport key": xor(*self.set_c_components)}
        for i, c in enumerate(self.cmp_components, 1):
            out[f"CMP component {i}"] = c
        for i, c in enumerate(self.set_c_components, 1):
            out[f"set C component {i}"] = c
        return out

    def step(self, name: str, *args: str, input: str | None = None) -> Result:
        r = ok(run(*args, home=self.home, input=input))
        self.res[name] = r
        return r

    def keys(self) -> dict[str, dict[str, Any]]:
        return {k["ref1"]: k for k in self.res["key list json"].json()["keys"]}


def _key_args(ref1: str, type_: str, usage: str, mode: str, exp: str, version: int,
              sets: str, slots: str) -> list[str]:
    return ["--ref1", ref1, "--type", type_, "--usage", usage, "--mode", mode,
            "--exportability", exp, "--key-version", str(version), "--sets", sets,
            "--slots", slots]


@pytest.fixture(scope="module")
def session(keyload_script: Path, tmp_path_factory: pytest.TempPathFactory) -> Session:
    s = Session(tmp_path_factory.mktemp("cli-session") / "home")
    s.step("authority init", "authority", "init", "--signing-key")
    s.set_a = s.step("set A", "set", "create", "--name", "A", "--json").json()["set_id"]
    s.set_b = s.step("set B", "set", "create", "--name", "B", "--signed",
                     "--json").json()["set_id"]
    s.set_c_components = [secrets.token_bytes(32) for _ in range(2)]
    s.set_c = s.step("set C", "set", "create", "--name", "C", "--components", "2", "--json",
                     input="".join(c.hex() + "\n" for c in s.set_c_components)
                     ).json()["set_id"]
    s.step("set list", "set", "list", "--json")

    s.step("key TMK", "key", "generate", "--diversify", "--json",
           *_key_args("TMK", "aes256", "K0", "B", "E", 1, s.set_a, "1,4"))
    s.step("key MAC", "key", "generate", "--length", "32", "--json",
           *_key_args("MAC", "hmac-sha256", "M7", "C", "N", 2, s.set_a, "2"))
    s.step("key SGN", "key", "generate", "--json",
           *_key_args("SGN", "aes256", "D0", "B", "S", 7, s.set_b, "1"))
    s.imp_value = secrets.token_bytes(32)
    s.step("key IMP", "key", "import",
           *_key_args("IMP", "aes256", "K0", "B", "E", 3, f"{s.set_a},{s.set_c}", "1,3-5"),
           input=s.imp_value.hex() + "\n")
    s.him_value = secrets.token_bytes(48)
    s.step("key HIM", "key", "import", "--json",
           *_key_args("HIM", "hmac-sha256", "M3", "G", "N", 1, "any", "2"),
           input=s.him_value.hex() + "\n")
    s.cmp_components = [secrets.token_bytes(16) for _ in range(3)]
    s.step("key CMP", "key", "import", "--components", "3",
           *_key_args("CMP", "aes128", "P0", "E", "N", 1, "any", "any"),
           input="".join(c.hex().upper() + "\n" for c in s.cmp_components))
    s.step("key list", "key", "list")
    s.step("key list json", "key", "list", "--json")
    s.step("authority show", "authority", "show", "--json")

    s.step("unit 1", "unit", "create", "--set", s.set_a, "--sn", SN1, "--slot", "1=aes256",
           "--slot", "2=hmac-sha256", "--slot", "3=aes128", "--slot", "4=aes256",
           "--slot", "5=aes256", "--lock", "3", "--json")
    s.step("unit 2", "unit", "create", "--set", s.set_b, "--sn", SN2.upper(), "--json")
    s.step("unit list", "unit", "list", "--json")
    s.step("status before", "unit", "status", "--sn", SN1, "--json")

    s.step("load IMP", "load", "--sn", SN1, "--ref1", "IMP", "--ref2", "1", "--json")
    s.step("load MAC", "load", "--sn", SN1, "--ref1", "MAC", "--ref2", "2", "--json")
    s.step("load TMK", "load", "--sn", SN1, "--ref1", "TMK", "--ref2", "4", "--json")
    s.step("load SGN", "load", "--sn", SN2, "--ref1", "SGN", "--ref2", "1")
    s.step("status after", "unit", "status", "--sn", SN1, "--json")
    s.step("status 2 after", "unit", "status", "--sn", SN2, "--json")
    s.step("receipts", "receipts", "--json")
    s.step("exports", "authority", "exports", "--json")
    return s


def test_authority_init_prints_signing_key(session: Session) -> None:
    out = session.res["authority init"].stdout
    assert f"authority created in {session.home / 'authority'}" in out
    m = re.search(r"Ed25519 SAS public key: ([0-9a-f]+)$", out, re.M)
    assert m and len(bytes.fromhex(m.group(1))) == 32
    show = session.res["authority show"].json()
    assert show["signing_public_key"] == m.group(1)
    assert (session.home / "authority" / "keystore.sealed").is_file()


def test_sets_created_and_listed(session: Session) -> None:
    a, b = session.res["set A"].json(), session.res["set B"].json()
    assert a == {"set_id": session.set_a, "name": "A", "signed": False,
                 "kind": "transport key", "component_kcvs": []}
    assert b["name"] == "B" and b["signed"] is True
    assert all(re.fullmatch(r"[0-9a-f]{10}", x) for x in (session.set_a, session.set_b))
    assert session.set_a != session.set_b
    listed = session.res["set list"].json()["sets"]
    tk = "transport key"
    assert listed == [{"set_id": session.set_a, "name": "A", "signed": False, "kind": tk},
                      {"set_id": session.set_b, "name": "B", "signed": True, "kind": tk},
                      {"set_id": session.set_c, "name": "C", "signed": False, "kind": tk}]


def test_set_from_components_id_is_kcv_of_xor(session: Session) -> None:
    comps = session.set_c_components
    c = session.res["set C"].json()
    assert c["component_kcvs"] == [aes_kcv(x) for x in comps]
    assert c["set_id"] == aes_kcv(xor(*comps)).lower()
    assert c["signed"] is False


def test_key_generate_attributes(session: Session) -> None:
    tmk = session.res["key TMK"].json()
    assert {k: tmk[k] for k in ("ref1", "type", "length", "usage", "mode", "exportability",
                                "version", "diversify")} == {
        "ref1": "TMK", "type": "aes256", "length": 32, "usage": "K0", "mode": "B",
        "exportability": "E", "version": 1, "diversify": True}
    assert tmk["policy"] == {"sets": [session.set_a], "slots": [1, 4]}
    assert re.fullmatch(r"[0-9A-F]{10}", tmk["kcv"])
    mac = session.res["key MAC"].json()
    assert (mac["type"], mac["length"], mac["usage"], mac["mode"], mac["exportability"],
            mac["version"], mac["diversify"]) == ("hmac-sha256", 32, "M7", "C", "N", 2, False)
    assert mac["policy"] == {"sets": [session.set_a], "slots": [2]}
    assert session.keys()["TMK"] == tmk and session.keys()["MAC"] == mac


def test_key_import_value_kcv_is_cmac_of_zero_block(session: Session) -> None:
    res = session.res["key IMP"]
    expected = aes_kcv(session.imp_value)
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("key IMP: aes256, K0/B/E, version 3, ")
    m = KCV_LINE.search(line)
    assert m and m.group(1) == expected
    imp = session.keys()["IMP"]
    assert imp["kcv"] == expected and imp["diversify"] is False
    assert imp["policy"] == {"sets": sorted([session.set_a, session.set_c]),
                             "slots": [1, 3, 4, 5]}


def test_key_import_components_kcvs(session: Session) -> None:
    comps = session.cmp_components
    out = session.res["key CMP"].stdout
    for i, c in enumerate(comps, 1):
        assert f"component {i} KCV  {aes_kcv(c)}" in out
    m = KCV_LINE.search(out.strip().splitlines()[-1])
    assert m and m.group(1) == aes_kcv(xor(*comps))
    cmp_ = session.keys()["CMP"]
    assert (cmp_["type"], cmp_["length"], cmp_["kcv"]) == ("aes128", 16, aes_kcv(xor(*comps)))
    assert cmp_["policy"] == {"sets": "any", "slots": "any"}


def test_key_import_hmac_kcv_is_hmac_of_zero_block(session: Session) -> None:
    him = session.res["key HIM"].json()
    assert (him["ref1"], him["type"], him["length"], him["usage"], him["mode"],
            him["exportability"], him["version"]) == ("HIM", "hmac-sha256", 48, "M3", "G",
                                                      "N", 1)
    assert him["kcv"] == hmac_kcv(session.him_value)
    assert session.keys()["HIM"]["kcv"] == him["kcv"]


def test_no_key_value_or_component_in_any_output(session: Session) -> None:
    for res in session.res.values():
        assert_no_secrets(res.output, session.secrets)
    listing = session.res["key list"].stdout
    assert all(r in listing for r in ("TMK", "MAC", "SGN", "IMP", "HIM", "CMP"))


def test_key_list_text_and_json_agree(session: Session) -> None:
    keys = session.keys()
    assert list(keys) == ["TMK", "MAC", "SGN", "IMP", "HIM", "CMP"]
    text = session.res["key list"].stdout
    for ref1, k in keys.items():
        row = next(line for line in text.splitlines() if line.startswith(ref1 + " "))
        assert k["kcv"] in row and k["type"] in row
    show = session.res["authority show"].json()
    assert [k["ref1"] for k in show["keys"]] == list(keys)
    assert [s["set_id"] for s in show["sets"]] == [session.set_a, session.set_b, session.set_c]


def test_secrets_at_rest_are_sealed(session: Session) -> None:
    files = tree_files(session.home)
    assert files
    for p in files:
        data = p.read_bytes()
        for name, value in session.secrets.items():
            for form in secret_byte_forms(value):
                assert form not in data, f"{name} in clear in {p}"
        if p.suffix in (".unit", ".sealed"):
            assert data.startswith(SEAL_MAGIC), p
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for d in (session.home, session.home / "authority", session.home / "units"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_units_created(session: Session) -> None:
    assert session.res["unit 1"].json() == {"sn": SN1, "set_id": session.set_a,
                                            "slots": [1, 2, 3, 4, 5]}
    assert session.res["unit 2"].json() == {"sn": SN2, "set_id": session.set_b, "slots": [1]}
    assert session.res["unit list"].json()["units"] == sorted([SN1, SN2])
    before = session.res["status before"].json()
    assert before["set_id"] == session.set_a
    assert [(s["ref2"], s["state"], s["accepts"]) for s in before["slots"]] == [
        (1, "empty", ["aes256"]), (2, "empty", ["hmac-sha256"]), (3, "locked", ["aes128"]),
        (4, "empty", ["aes256"]), (5, "empty", ["aes256"])]
    for sfx in (SN1, SN2):
        assert (session.home / "units" / f"{sfx}.unit").is_file()


def test_load_non_diversified_kcv_equals_key_list(session: Session) -> None:
    keys = session.keys()
    for name, ref1, ref2, version in (("load IMP", "IMP", 1, 3), ("load MAC", "MAC", 2, 2)):
        out = session.res[name].json()
        assert out["kcv"] == keys[ref1]["kcv"]
        assert (out["sn"], out["set_id"], out["ref1"], out["ref2"], out["key_version"]) == (
            SN1, session.set_a, ref1, ref2, version)
        assert out["suite"] in (1, 2)
        assert len(bytes.fromhex(out["receipt"])) == 16
    assert session.res["load IMP"].json()["kcv"] == aes_kcv(session.imp_value)


def test_load_diversified_key(session: Session) -> None:
    out = session.res["load TMK"].json()
    assert out["key_version"] == 1 and out["ref2"] == 4
    # TA' = KDF(TA, SN): its KCV is not the KCV of the master key
    assert out["kcv"] != session.keys()["TMK"]["kcv"]


def test_load_into_signed_set(session: Session) -> None:
    out = session.res["load SGN"].stdout
    assert f"loaded SGN v7 into unit {SN2} slot 1: KCV {session.keys()['SGN']['kcv']}" in out
    slot = session.res["status 2 after"].json()["slots"][0]
    assert (slot["state"], slot["version"], slot["kcv"], slot["usage"]) == (
        "loaded", 7, session.keys()["SGN"]["kcv"], "D0")


def test_unit_status_after_loads(session: Session) -> None:
    st = session.res["status after"].json()
    assert st["sn"] == SN1 and st["set_id"] == session.set_a
    slots = {s["ref2"]: s for s in st["slots"]}
    keys = session.keys()
    assert {k: slots[1][k] for k in ("state", "type", "usage", "version", "kcv")} == {
        "state": "loaded", "type": "aes256", "usage": "K0", "version": 3,
        "kcv": keys["IMP"]["kcv"]}
    assert {k: slots[2][k] for k in ("state", "type", "usage", "version", "kcv")} == {
        "state": "loaded", "type": "hmac-sha256", "usage": "M7", "version": 2,
        "kcv": keys["MAC"]["kcv"]}
    assert slots[3]["state"] == "locked" and slots[3]["kcv"] is None
    assert slots[4]["state"] == "loaded" and slots[4]["kcv"] == session.res["load TMK"].json()[
        "kcv"]
    assert slots[5]["state"] == "empty" and slots[5]["version"] is None


def test_receipts_all_verified(session: Session) -> None:
    assert session.res["receipts"].json() == {
        "verified": 4, "invalid": 0, "invalid_rows": [], "reconciled": 0,
        "exports_without_receipt": 0, "without_receipt": []}
    assert session.home.joinpath("station.db").is_file()


def test_authority_exports_listed(session: Session) -> None:
    ex = session.res["exports"].json()
    assert ex["total"] == 4
    got = [(r["sn"], r["set_id"], r["ref1"], r["ref2"], r["key_version"], r["kcv"])
           for r in ex["records"]]
    loads = [session.res[n].json() for n in ("load IMP", "load MAC", "load TMK")]
    assert got[:3] == [(x["sn"], x["set_id"], x["ref1"], x["ref2"], x["key_version"],
                        x["kcv"]) for x in loads]
    assert got[3][:5] == (SN2, session.set_b, "SGN", 1, 7)
    assert_no_secrets(json.dumps(ex), session.secrets)


# -- negative paths ------------------------------------------------------------------------
def snapshot(home: Path) -> tuple[Any, ...]:
    """What a refused command must not change: both units' slots (GET SLOT STATUS), the
    set of unit files, the authority's keystore (keys, sets, signing key) and the vaults."""
    return (ok(run("unit", "status", "--sn", SN1, "--json", home=home)).json(),
            ok(run("unit", "status", "--sn", SN2, "--json", home=home)).json(),
            sorted(p.name for p in (home / "units").iterdir()),
            (home / "authority" / "keystore.sealed").read_bytes(),
            (home / "authority" / "vault.json").read_bytes(),
            (home / "units" / "vault.json").read_bytes())


REFUSALS = [
    pytest.param(SN1, "IMP", "1", "6986", id="rollback-same-version"),
    pytest.param(SN1, "TMK", "2", "6986", id="policy-forbids-slot"),
    pytest.param(SN1, "NOPE", "1", "6A88", id="unknown-ref1"),
    pytest.param(SN1, "CMP", "9", "6A88", id="unknown-slot"),
    pytest.param(SN1, "CMP", "3", "6986", id="locked-slot"),
    pytest.param(SN1, "CMP", "5", "6986", id="wrong-key-type"),
    pytest.param(SN2, "TMK", "1", "6986", id="unit-of-other-set"),
]


@pytest.mark.parametrize(("sn", "ref1", "ref2", "sw"), REFUSALS)
def test_load_refused(session: Session, sn: str, ref1: str, ref2: str, sw: str) -> None:
    before = snapshot(session.home)
    res = run("load", "--sn", sn, "--ref1", ref1, "--ref2", ref2, "--json",
              home=session.home)
    assert_error(res, EXIT_REFUSED, sw)
    assert_no_secrets(res.output, session.secrets)
    assert snapshot(session.home) == before


def test_refused_load_keeps_receipts_valid(session: Session) -> None:
    assert_error(run("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "5", home=session.home),
                 EXIT_REFUSED, "6986")
    res = ok(run("receipts", "--json", home=session.home)).json()
    assert (res["verified"], res["invalid"], res["invalid_rows"]) == (4, 0, [])
    # what the unit refused after the authority exported it is listed, as the station
    # recorded it, and leaves the exit code alone
    assert res["exports_without_receipt"] == len(res["without_receipt"]) >= 1
    assert all(e["station"].startswith("load failed at ")
               for e in res["without_receipt"])


@pytest.mark.parametrize("args", [
    pytest.param(("key", "list"), id="key-list"),
    pytest.param(("set", "list", "--json"), id="set-list"),
    pytest.param(("unit", "status", "--sn", SN1), id="unit-status"),
    pytest.param(("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "5"), id="load"),
])
def test_wrong_passphrase(session: Session, args: tuple[str, ...]) -> None:
    before = snapshot(session.home)
    res = run(*args, home=session.home, passphrase=PASSPHRASE + "x")
    assert_error(res, EXIT_PASSPHRASE, "passphrase")
    assert snapshot(session.home) == before


@pytest.fixture
def damaged_home(session: Session, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(session.home, home)
    ks = home / "authority" / "keystore.sealed"
    data = ks.read_bytes()
    ks.write_bytes(data[: len(data) // 2])
    return home


@pytest.mark.parametrize("args", [
    pytest.param(("key", "list", "--json"), id="key-list"),
    pytest.param(("authority", "show"), id="authority-show"),
    pytest.param(("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "5"), id="load"),
    pytest.param(("receipts",), id="receipts"),
])
def test_damaged_keystore(damaged_home: Path, args: tuple[str, ...]) -> None:
    ks = damaged_home / "authority" / "keystore.sealed"
    data = ks.read_bytes()
    status = ok(run("unit", "status", "--sn", SN1, "--json", home=damaged_home)).json()
    assert_error(run(*args, home=damaged_home), EXIT_STORE)
    assert ks.read_bytes() == data
    assert ok(run("unit", "status", "--sn", SN1, "--json", home=damaged_home)).json() == status


@pytest.mark.parametrize("args", [
    pytest.param(("key", "list"), id="key-list"),
    pytest.param(("set", "list"), id="set-list"),
    pytest.param(("authority", "show", "--json"), id="authority-show"),
    pytest.param(("authority", "exports"), id="authority-exports"),
    pytest.param(("unit", "status", "--sn", SN1), id="unit-status"),
    pytest.param(("load", "--sn", SN1, "--ref1", "IMP", "--ref2", "1"), id="load"),
    pytest.param(("receipts",), id="receipts"),
    pytest.param(("set", "create", "--name", "A"), id="set-create"),
])
def test_missing_home(keyload_script: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    home = tmp_path / "no-such-home"
    assert_error(run(*args, home=home, cwd=tmp_path), EXIT_STORE)
    assert not home.exists()
    assert not (tmp_path / "keyload-home").exists()


@pytest.mark.parametrize("args", [
    pytest.param(("unit", "create", "--set", "SET_A", "--sn", "XYZ"), id="unit-create"),
    pytest.param(("load", "--sn", "01zz", "--ref1", "IMP", "--ref2", "1"), id="load"),
    pytest.param(("unit", "status", "--sn", "zz"), id="unit-status"),
])
def test_bad_hex_sn(session: Session, args: tuple[str, ...]) -> None:
    args = tuple(session.set_a if a == "SET_A" else a for a in args)
    before = snapshot(session.home)
    assert_error(run(*args, home=session.home), EXIT_INPUT, "SN must be hex")
    assert snapshot(session.home) == before


OUT_OF_RANGE = [
    pytest.param(("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "0"), "REF2",
                 id="load-ref2-0"),
    pytest.param(("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "255"), "REF2",
                 id="load-ref2-255"),
    pytest.param(("unit", "create", "--set", "SET_A", "--sn", "0c", "--slot", "0=aes256"),
                 "REF2", id="unit-create-slot-0"),
    pytest.param(("key", "generate", *_key_args("R255", "aes256", "K0", "B", "E", 1, "any",
                                                "255")), "REF2", id="key-generate-slots-255"),
    pytest.param(("unit", "create", "--set", "SET_A", "--sn", "ab" * 33), "SN",
                 id="unit-create-sn-33-bytes"),
]


@pytest.mark.parametrize(("args", "needle"), OUT_OF_RANGE)
def test_out_of_range_input_fails_cleanly(session: Session, args: tuple[str, ...],
                                          needle: str) -> None:
    """Whatever the exit code, the command fails with one line and changes nothing."""
    args = tuple(session.set_a if a == "SET_A" else a for a in args)
    before = snapshot(session.home)
    res = run(*args, home=session.home)
    assert res.rc not in (0, 1), res.describe()
    assert_error(res, res.rc, needle)
    assert snapshot(session.home) == before


@pytest.mark.parametrize(("args", "needle"), OUT_OF_RANGE)
def test_out_of_range_input_exit_code(session: Session, args: tuple[str, ...],
                                      needle: str) -> None:
    args = tuple(session.set_a if a == "SET_A" else a for a in args)
    assert_error(run(*args, home=session.home), EXIT_INPUT, needle)


def test_key_generate_without_usage_is_usage_error(session: Session) -> None:
    res = run("key", "generate", "--ref1", "NOUSE", "--type", "aes256", "--mode", "B",
              "--exportability", "E", "--key-version", "1", "--sets", "any", "--slots", "any",
              home=session.home)
    assert res.rc == EXIT_USAGE, res.describe()
    assert "Traceback" not in res.output and res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("keyload key generate: error: ")
    assert "--usage" in last
    assert "NOUSE" not in ok(run("key", "list", home=session.home)).stdout


def test_load_ref2_not_a_number_is_usage_error(session: Session) -> None:
    res = run("load", "--sn", SN1, "--ref1", "CMP", "--ref2", "abc", home=session.home)
    assert res.rc == EXIT_USAGE and "Traceback" not in res.output
    assert "invalid int value" in res.stderr


def test_sas_from_another_authority_is_integrity_failure(keyload_script: Path,
                                                         tmp_path: Path) -> None:
    """Two authorities hold the same transport key (assembled from the same components)
    but different Ed25519 keys; a unit made by one refuses a SAS signed by the other
    (6988, exit 7) and stores nothing."""
    comps = "".join(secrets.token_bytes(32).hex() + "\n" for _ in range(2))
    homes = {}
    for name in ("maker", "other"):
        home = homes[name] = tmp_path / name
        ok(run("authority", "init", "--signing-key", home=home))
        ok(run("set", "create", "--name", "S", "--signed", "--components", "2", home=home,
               input=comps))
    set_id = ok(run("set", "list", "--json", home=homes["maker"])).json()["sets"][0]["set_id"]
    other = ok(run("set", "list", "--json", home=homes["other"])).json()["sets"]
    assert other[0]["set_id"] == set_id
    ok(run("unit", "create", "--set", set_id, "--sn", "abcd", home=homes["maker"]))
    ok(run("key", "generate", *_key_args("K", "aes256", "K0", "B", "E", 1, "any", "any"),
           home=homes["other"]))
    shutil.copytree(homes["maker"] / "units", homes["other"] / "units")
    before = ok(run("unit", "status", "--sn", "abcd", "--json", home=homes["other"])).json()
    res = run("load", "--sn", "abcd", "--ref1", "K", "--ref2", "1", home=homes["other"])
    assert_error(res, EXIT_INTEGRITY, "6988")
    after = ok(run("unit", "status", "--sn", "abcd", "--json", home=homes["other"])).json()
    assert after == before and after["slots"][0]["state"] == "empty"


# -- conformance ---------------------------------------------------------------------------
def test_conformance_public_vectors(keyload_script: Path) -> None:
    res = ok(run("conformance", KLP1_VECTORS))
    assert res.last_line() == "160 passed, 0 failed"
    assert "FAIL" not in res.stdout and res.stderr == ""


def test_conformance_without_a_file_runs_the_public_vectors_from_anywhere(
        keyload_script: Path, tmp_path: Path) -> None:
    """The README's command, run from a directory that holds nothing of the project."""
    res = ok(run("conformance", cwd=tmp_path))
    suite3 = len(json.loads(KLP1_VECTORS.with_name("klp1-suite3-public.json").read_text())
                 ["cases"])
    assert res.last_line() == f"{160 + suite3} passed, 0 failed" == "348 passed, 0 failed"
    assert "FAIL" not in res.stdout and res.stderr == ""


@pytest.fixture(scope="module")
def altered_vectors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    doc = json.loads(KLP1_VECTORS.read_text())
    export = next(c for c in doc["cases"] if c["kind"] == "export")
    w = bytearray.fromhex(export["expected"]["W"])
    w[-1] ^= 0x01
    export["expected"]["W"] = w.hex()
    imp = next(c for c in doc["cases"] if c["kind"] == "import" and c["expected"]["sw"] == "9000")
    imp["expected"]["sw"] = "6982"
    path = tmp_path_factory.mktemp("vectors") / "altered.json"
    path.write_text(json.dumps(doc))
    return path, export["name"], imp["name"]


def test_conformance_detects_altered_cases(keyload_script: Path,
                                           altered_vectors: tuple[Path, str, str]) -> None:
    path, export_name, import_name = altered_vectors
    res = run("conformance", path)
    assert res.rc == 1 and "Traceback" not in res.output, res.describe()
    lines = res.stdout.strip().splitlines()
    fails = [line for line in lines if line.startswith("FAIL")]
    assert len(fails) == 2, res.describe()
    assert sum(export_name in f for f in fails) == 1
    assert sum(import_name in f for f in fails) == 1
    assert lines[-1] == "158 passed, 2 failed"


def test_conformance_json(keyload_script: Path,
                          altered_vectors: tuple[Path, str, str]) -> None:
    good = ok(run("conformance", "--json", KLP1_VECTORS)).json()
    assert good == {"passed": 160, "failed": 0, "failures": []}
    path, export_name, import_name = altered_vectors
    res = run("conformance", path, "--json")
    assert res.rc == 1, res.describe()
    out = res.json()
    assert (out["passed"], out["failed"]) == (158, 2)
    assert sorted(f["case"] for f in out["failures"]) == sorted([export_name, import_name])
    assert all(f["file"].endswith("altered.json") for f in out["failures"])


def test_conformance_missing_file(keyload_script: Path, tmp_path: Path) -> None:
    assert_error(run("conformance", tmp_path / "nope.json"), EXIT_INPUT, "nope.json")


@pytest.mark.parametrize("content", [
    pytest.param('{"cases": []}', id="no-protocol"),
    pytest.param('{"protocol": "KLP2", "cases": []}', id="other-protocol"),
    pytest.param("[1, 2]", id="a-list"),
    pytest.param("not json at all", id="not-json"),
])
def test_conformance_not_a_klp1_file(keyload_script: Path, tmp_path: Path,
                                     content: str) -> None:
    path = tmp_path / "other.json"
    path.write_text(content)
    assert_error(run("conformance", path), EXIT_INPUT, "other.json")


# -- demo ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo20(keyload_script: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, Result]:
    workdir = tmp_path_factory.mktemp("demo") / "work"
    return workdir, run("demo", "--units", "20", "--workdir", workdir, "--quiet")


def test_demo_customizes_all_units(demo20: tuple[Path, Result]) -> None:
    workdir, res = demo20
    ok(res)
    assert res.last_line() == "customized 20 of 20 units, 0 failed"
    assert f"workdir: {workdir}" in res.stdout
    assert "40 verified by the authority, 0 invalid" in res.stdout


def test_demo_files_on_disk(demo20: tuple[Path, Result]) -> None:
    workdir, _ = demo20
    assert (workdir / "authority").is_dir() and (workdir / "units").is_dir()
    assert (workdir / "journal.db").is_file() and (workdir / "audit.db").is_file()
    units = sorted((workdir / "units").glob("*.unit"))
    assert len(units) == 20
    assert [u.stem for u in units] == [(b"KL" + i.to_bytes(6, "big")).hex()
                                       for i in range(1, 21)]
    assert (workdir / "authority" / "keystore.sealed").is_file()
    for d in (workdir, workdir / "authority", workdir / "units"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for sub in ("authority", "units"):
        for p in tree_files(workdir / sub):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    sealed = [*units, workdir / "authority" / "keystore.sealed"]
    for p in sealed:
        assert p.read_bytes().startswith(SEAL_MAGIC), p


def test_demo_home_is_usable_by_the_cli(demo20: tuple[Path, Result]) -> None:
    workdir, _ = demo20
    receipts = ok(run("receipts", "--json", home=workdir)).json()
    assert receipts == {"verified": 40, "invalid": 0, "invalid_rows": [], "reconciled": 0,
                        "exports_without_receipt": 0, "without_receipt": []}
    st = ok(run("unit", "status", "--sn", "4b4c000000000014", "--json", home=workdir)).json()
    states = {s["ref2"]: s["state"] for s in st["slots"]}
    assert states == {1: "loaded", 2: "loaded", 3: "empty", 4: "locked"}


def test_demo_json(keyload_script: Path, tmp_path: Path) -> None:
    res = ok(run("demo", "--units", "5", "--workdir", tmp_path / "w", "--json"))
    out = res.json()
    assert out["units"] == 5 and out["customized"] == out["units"] and out["failed"] == 0
    assert out["loads_ok"] == 10 and out["receipts_verified"] == 10
    assert out["receipts_invalid"] == 0 and out["workdir"] == str(tmp_path / "w")


def test_demo_refuses_non_empty_workdir(keyload_script: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "busy"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    assert_error(run("demo", "--units", "2", "--workdir", workdir), EXIT_INPUT, "not empty")
    assert [p.name for p in workdir.iterdir()] == ["keep.txt"]
    assert (workdir / "keep.txt").read_text() == "mine"


def test_demo_without_workdir_names_its_temp_dir(keyload_script: Path, tmp_path: Path) -> None:
    """... and its passphrase, and removes that directory at the end."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = run("demo", "--units", "2", "--quiet", env_extra={"TMPDIR": str(tmp)},
              passphrase=None)
    m = re.search(r"^workdir: (.+) \(temporary: removed at the end; --workdir DIR keeps it\)$",
                  res.stdout, re.M)
    named = Path(m.group(1)) if m else None
    try:
        ok(res)
        assert named is not None, res.describe()
        assert named.parent == tmp
        assert named.name.startswith("keyload-demo-")
        assert "vaults sealed with the demo passphrase 'keyload-demo'" in res.stdout
        assert res.last_line() == "customized 2 of 2 units, 0 failed"
        assert not named.exists() and list(tmp.iterdir()) == []
    finally:
        if named is not None and named.is_dir():
            shutil.rmtree(named)


def test_demo_json_without_workdir_names_none(keyload_script: Path, tmp_path: Path) -> None:
    """Its temporary directory is gone at the end: --json does not name it as if kept."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = ok(run("demo", "--units", "2", "--json", env_extra={"TMPDIR": str(tmp)})).json()
    assert out["workdir"] is None and out["customized"] == 2 and list(tmp.iterdir()) == []


def test_demo_home_is_its_workdir(keyload_script: Path, tmp_path: Path) -> None:
    """``demo --home DIR`` works in DIR as ``--workdir DIR`` does (kept), and DIR is then a
    home for the other commands; --home and --workdir naming two places is a usage error."""
    home = tmp_path / "h"
    res = ok(run("demo", "--units", "2", "--quiet", home=home, passphrase=None))
    assert f"workdir: {home}\n" in res.stdout
    assert len(list((home / "units").glob("*.unit"))) == 2
    receipts = ok(run("receipts", "--json", home=home, passphrase="keyload-demo")).json()
    assert (receipts["verified"], receipts["invalid"]) == (4, 0)
    res = run("demo", "--units", "2", "--workdir", tmp_path / "w", home=tmp_path / "other")
    assert res.rc == 2 and "--home and --workdir both name the demo's directory" in res.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("parts, why", [
    (lambda a, b: [a, a], "component 2 is the same as component 1"),
    (lambda a, b: [a, b, b], "component 3 is the same as component 2"),
    (lambda a, b: [a, b, bytes(x ^ y for x, y in zip(a, b, strict=True))],
     "all-zero key"),
    (lambda a, b: [a, b, b[::-1], bytes(x ^ y for x, y in zip(b, b[::-1], strict=True))],
     "equals one of its components"),
])
def test_key_components_that_cancel_out_are_refused(session: Session, parts: Any,
                                                    why: str) -> None:
    """Equal components give the all-zero key (or one component) without a word; they
    are refused, and nothing is stored."""
    a, b = secrets.token_bytes(16), secrets.token_bytes(16)
    comps = parts(a, b)
    before = run("key", "list", "--json", home=session.home).json()["keys"]
    res = run("key", "import", "--components", str(len(comps)),
              *_key_args("ZERO", "aes128", "P0", "E", "N", 1, "any", "any"),
              home=session.home, input="".join(c.hex() + "\n" for c in comps))
    assert_error(res, EXIT_INPUT, why)
    assert run("key", "list", "--json", home=session.home).json()["keys"] == before


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_port_out_of_range_is_an_input_error(tmp_path: Path, port: str) -> None:
    res = run("serve", "--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem", "--policy",
              "p.json", "--port", port, home=tmp_path / "home")
    assert_error(res, EXIT_INPUT, f"--port {port}", "0..65535")
    assert not (tmp_path / "home").exists()  # refused before anything is created


def test_key_for_a_set_the_authority_does_not_have_is_refused(session: Session) -> None:
    before = run("key", "list", "--json", home=session.home).json()["keys"]
    res = run("key", "generate", *_key_args("TYPO", "aes256", "K0", "B", "E", 1,
                                            f"{session.set_a},ffffffffff", "1"),
              home=session.home)
    assert_error(res, EXIT_INPUT, "--sets", "ffffffffff")
    assert run("key", "list", "--json", home=session.home).json()["keys"] == before


@pytest.mark.parametrize("flag, value", [("--threads", "0"), ("--threads", "-3"),
                                         ("--batch", "0")])
def test_campaign_run_counts_below_one_are_refused(tmp_path: Path, flag: str,
                                                   value: str) -> None:
    res = run("campaign", "run", "c1", flag, value, home=tmp_path / "home")
    assert_error(res, EXIT_INPUT, f"{flag} {value}", "at least 1")
    assert not (tmp_path / "home").exists()  # refused before anything is opened


def test_authority_init_on_a_pkcs11_home_is_refused(tmp_path: Path) -> None:
    """A home whose authority lives in a token (backend.json): a software keystore created
    beside it would report a success that did not happen."""
    home = tmp_path / "home"
    (home / "authority").mkdir(parents=True)
    cfg = {"backend": "pkcs11", "module": "/nonexistent/libsofthsm2.so", "token": "T",
           "clear_sas": False}
    (home / "authority" / "backend.json").write_text(json.dumps(cfg))
    res = run("authority", "init", "--signing-key", home=home)
    assert_error(res, EXIT_STORE, "already exists", "PKCS#11")
    assert sorted(p.name for p in (home / "authority").iterdir()) == ["backend.json"]


def test_a_closed_output_pipe_ends_quietly(session: Session) -> None:
    """`keyload … | head -1`: once the reader has gone, no 'Broken pipe' error, no
    traceback, exit 141 (as a process SIGPIPE ends)."""
    import os
    import subprocess

    from .cli_helpers import cli_env

    r, w = os.pipe()
    os.close(r)  # the reader has left before the first line
    try:
        proc = subprocess.run([str(KEYLOAD), "key", "list", "--home", str(session.home)],
                              stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=cli_env(PASSPHRASE), timeout=60, check=False, text=True)
    finally:
        os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_conformance_counts_cases_it_cannot_run_and_goes_on(tmp_path: Path) -> None:
    """A case that is not an object, a suite this build does not know, an empty SN, REF2
    0: each is one failure with its reason, and the run still ends with its count (exit
    1, no traceback). A file nested too deep to parse is an input error, one line."""
    doc = json.loads(KLP1_VECTORS.read_text())
    good = next(c for c in doc["cases"] if c.get("kind") == "export")
    odd = []
    for name, change in (("bad-suite", {"suite": 0x7F}), ("empty-sn", {"SN": ""}),
                         ("ref2-0", {"REF2": 0})):
        c = json.loads(json.dumps(good))
        c.update(change, name=name)
        odd.append(c)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"protocol": "KLP1", "cases": [good, 5, "x", *odd, good]}))
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    res = run("conformance", mixed)
    assert res.rc == 1 and "Traceback" not in res.output, res.describe()
    lines = res.stdout.splitlines()
    assert lines[-1] == "2 passed, 5 failed"
    fails = [ln for ln in lines if ln.startswith("FAIL ")]
    assert len(fails) == 5
    assert any("bad-suite" in ln and "suite 0x7f" in ln for ln in fails)
    assert any(ln.startswith("FAIL empty-sn") for ln in fails)
    assert any(ln.startswith("FAIL ref2-0") for ln in fails)
    assert sum("not a JSON object" in ln for ln in fails) == 2
    assert_error(run("conformance", nested), EXIT_INPUT, "nested.json", "RecursionError")


@pytest.mark.parametrize("args", [
    ("campaign", "status"), ("campaign", "report", "c1", "--out", "rep"),
    ("ledger", "verify"), ("unit", "list")])
def test_reading_commands_refuse_a_missing_home_and_create_nothing(tmp_path: Path,
                                                                   args: tuple[str, ...]
                                                                   ) -> None:
    res = run(*args, home=tmp_path / "typo", cwd=tmp_path)
    assert_error(res, EXIT_STORE, "typo")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_campaign_status_refuses_a_missing_journal_file(tmp_path: Path) -> None:
    res = run("campaign", "status", "--journal", tmp_path / "typo.db", home=tmp_path / "h")
    assert_error(res, EXIT_STORE, "typo.db")
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "h").exists()


def test_a_second_set_with_a_name_already_taken_is_refused(session: Session) -> None:
    before = run("set", "list", "--json", home=session.home).json()["sets"]
    res = run("set", "create", "--name", "A", home=session.home)
    assert_error(res, EXIT_INPUT, "'A' exists already", session.set_a)
    assert run("set", "list", "--json", home=session.home).json()["sets"] == before
