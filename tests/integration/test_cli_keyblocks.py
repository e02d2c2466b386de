"""X9.143 (TR-31) key blocks through the ``keyload`` console script: ``key import --tr31``
and ``key export --tr31`` under a KBPK (usage K1) of the software authority. Blocks come
from the psec vector file and from psec itself; exported blocks are opened with psec; KCVs
are computed here with ``cryptography``. Each refusal has its exit code, one error line,
and the keys as they were."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psec.tr31
import pytest

from tests.conftest import VECTORS, require

from .cli_helpers import (
    KEYLOAD,
    Result,
    aes_kcv,
    assert_error,
    assert_no_secrets,
    hmac_kcv,
    ok,
    run,
    xor,
)

pytestmark = pytest.mark.slow  # every test runs the console script

EXIT_INPUT, EXIT_REFUSED, EXIT_INTEGRITY = 3, 6, 7
TR31 = json.loads((VECTORS / "tr31" / "psec_tr31_tests.json").read_text())
POLICY = ("--sets", "any", "--slots", "1")
SN = "5e0001"


@dataclass
class Home:
    path: Path
    kbpk: bytes            # BANK-KBPK, K1/B, from two components
    kbpks: dict[str, str]  # the vector file's KBPKs (hex) -> their REF1 here
    set_id: str

    def run(self, *args: str, input: str | None = None) -> Result:
        return run(*args, home=self.path, input=input)

    def keys(self) -> dict[str, Any]:
        return {k["ref1"]: k for k in ok(self.run("key", "list", "--json")).json()["keys"]}


def _import_value(path: Path, ref1: str, value: bytes, *attrs: str) -> None:
    kt = {16: "aes128", 24: "aes192", 32: "aes256"}[len(value)]
    ok(run("key", "import", "--ref1", ref1, "--type", kt, *attrs, "--key-version", "1", *POLICY,
           home=path, input=value.hex() + "\n"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Home:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    path = tmp_path_factory.mktemp("keyblocks") / "home"
    ok(run("authority", "init", home=path))
    set_id = ok(run("set", "create", "--name", "branch", "--json", home=path)).json()["set_id"]
    parts = [secrets.token_bytes(32), secrets.token_bytes(32)]
    ok(run("key", "import", "--ref1", "BANK-KBPK", "--components", "2", "--type", "aes256",
           "--usage", "K1", "--mode", "B", "--exportability", "N", "--key-version", "1",
           "--sets", "any", "--slots", "9", home=path,
           input="".join(p.hex() + "\n" for p in parts)))
    kbpks: dict[str, str] = {}
    for case in TR31["known_values"] + TR31["unwrap_errors"]:
        if case["kbpk"] not in kbpks and len(case["kbpk"]) in (32, 48, 64):
            kbpks[case["kbpk"]] = f"KBPK-{len(kbpks)}"
            _import_value(path, kbpks[case["kbpk"]], bytes.fromhex(case["kbpk"]), "--usage",
                          "K1", "--mode", "D", "--exportability", "N")
    ok(run("unit", "create", "--set", set_id, "--sn", SN, "--slot", "1=aes256",
           "--slot", "9=aes256", home=path))
    return Home(path, xor(*parts), kbpks, set_id)


@pytest.fixture
def home(base: Home, tmp_path: Path) -> Home:
    shutil.copytree(base.path, tmp_path / "home")
    return Home(tmp_path / "home", base.kbpk, base.kbpks, base.set_id)


def test_every_known_block_imports_or_is_refused_plainly(home: Home) -> None:
    """Every block of the vector file: version D becomes the key it holds (its KCV); A, B
    and C (a TDES KBPK, TDES keys) are refused in one line, nothing stored."""
    stored = {}
    for case in TR31["known_values"]:
        ref1 = f"TC-{case['tc_id']}"
        res = home.run("key", "import", "--ref1", ref1, "--tr31", case["key_block"],
                       "--kbpk", home.kbpks[case["kbpk"]], *POLICY, "--key-version", "2", "--json")
        if case["version_id"] != "D":
            assert_error(res, EXIT_INPUT, f"version {case['version_id']}", "TDES")
            continue
        got = ok(res).json()
        key = bytes.fromhex(case["key"])
        assert (got["kcv"], got["type"], got["usage"], got["mode"], got["exportability"],
                got["version"], got["origin"]) == (aes_kcv(key), "aes128", case["key_usage"],
                                                   case["mode_of_use"], case["exportability"],
                                                   2, "tr31")
        assert_no_secrets(res.output, {"key": key})
        stored[ref1] = got
    keys = home.keys()
    assert {r: keys[r] for r in keys if r.startswith("TC-")} == stored
    assert len(stored) == sum(c["version_id"] == "D" for c in TR31["known_values"]) > 0


def test_every_bad_version_d_block_is_refused(home: Home) -> None:
    """The vector file's version D unwrap errors: a wrong MAC exits 7, any other mismatch
    (length, hex, padding, key length) 3; nothing stored."""
    cases = [c for c in TR31["unwrap_errors"]
             if c["key_block"][0] == "D" and c["kbpk"] in home.kbpks]
    assert len(cases) >= 5
    before = home.keys()
    for case in cases:
        res = home.run("key", "import", "--ref1", "FROM-BLOCK", "--tr31", case["key_block"],
                       "--kbpk", home.kbpks[case["kbpk"]], "--key-version", "1", *POLICY)
        code = EXIT_INTEGRITY if "MAC doesn't match" in case["psec_error"] else EXIT_INPUT
        assert_error(res, code)
    assert home.keys() == before


def test_a_bank_block_imports_with_its_header(home: Home) -> None:
    """A block made by another implementation (psec) under the KBPK assembled from
    components: type, usage, mode, exportability and version from its header."""
    key = secrets.token_bytes(32)
    block = psec.tr31.wrap(home.kbpk, psec.tr31.Header("D", "P0", "A", "E", "07", "S"), key)
    res = ok(home.run("key", "import", "--ref1", "ZPK-1", "--tr31", block, "--kbpk",
                      "BANK-KBPK", *POLICY))
    assert res.last_line() == f"key ZPK-1: aes256, P0/E/S, version 7, KCV {aes_kcv(key)}"
    got = home.keys()["ZPK-1"]
    assert (got["usage"], got["mode"], got["exportability"], got["version"],
            got["origin"]) == ("P0", "E", "S", 7, "tr31")
    assert home.keys()["BANK-KBPK"]["origin"] is None
    listing = ok(home.run("key", "list")).stdout
    assert "ZPK-1" in listing and "P0" in listing
    assert_no_secrets(res.output + listing, {"key": key, "kbpk": home.kbpk})


@pytest.mark.parametrize(("where", "code"), [(20, EXIT_INTEGRITY), (6, EXIT_INTEGRITY),
                                             (2, EXIT_INPUT)])
def test_an_altered_block_stores_nothing(home: Home, where: int, code: int) -> None:
    block = psec.tr31.wrap(home.kbpk, psec.tr31.Header("D", "P0", "A", "E", "07", "E"),
                           secrets.token_bytes(16))
    altered = block[:where] + ("1" if block[where] != "1" else "2") + block[where + 1:]
    before = home.keys()
    why = "the MAC does not verify" if code == EXIT_INTEGRITY else "length field"
    assert_error(home.run("key", "import", "--ref1", "ZPK-2", "--tr31", altered, "--kbpk",
                          "BANK-KBPK", *POLICY), code, why)
    assert home.keys() == before


def test_a_tdes_key_in_a_version_d_block_is_refused(home: Home) -> None:
    block = psec.tr31.wrap(home.kbpk, psec.tr31.Header("D", "P0", "T", "E", "07", "E"),
                           secrets.token_bytes(16))
    assert_error(home.run("key", "import", "--ref1", "ZPK-3", "--tr31", block, "--kbpk",
                          "BANK-KBPK", *POLICY), EXIT_INPUT, "TDES")


@pytest.mark.parametrize(("kt", "usage", "kcv_of"), [("aes128", "D0", aes_kcv),
                                                     ("hmac-sha256", "M7", hmac_kcv)])
def test_export_for_backup_opens_with_psec(home: Home, kt: str, usage: str,
                                           kcv_of: Any) -> None:
    ok(home.run("key", "generate", "--ref1", "DATA-1", "--type", kt, "--usage", usage,
                "--mode", "B", "--exportability", "E", "--key-version", "12", *POLICY))
    want = home.keys()["DATA-1"]["kcv"]
    block = ok(home.run("key", "export", "--ref1", "DATA-1", "--tr31", "--kbpk",
                        "BANK-KBPK")).stdout.strip()
    header, key = psec.tr31.unwrap(home.kbpk, block)
    assert kcv_of(key) == want
    assert (header.version_id, header.key_usage, header.algorithm, header.mode_of_use,
            header.version_num, header.exportability) == (
        "D", usage, "A" if kt == "aes128" else "H", "B", "12", "E")
    # padded as for the longest key: AES 32 bytes (2 + 32 + 14), HMAC 64 (2 + 64 + 14);
    # the HMAC header carries HM 21 and a PB block (32 characters)
    assert len(block) == (16 + 2 * 48 + 32 if kt == "aes128" else 32 + 2 * 80 + 32)
    back = ok(home.run("key", "import", "--ref1", "DATA-2", "--tr31", block, "--kbpk",
                       "BANK-KBPK", *POLICY, "--json")).json()
    assert back["kcv"] == want and back["type"] == kt


def test_export_refusals(home: Home) -> None:
    ok(home.run("key", "generate", "--ref1", "KEEP", "--type", "aes256", "--usage", "P0",
                "--mode", "E", "--exportability", "N", "--key-version", "1", *POLICY))
    ok(home.run("key", "generate", "--ref1", "OUT", "--type", "aes256", "--usage", "P0",
                "--mode", "E", "--exportability", "E", "--key-version", "1", *POLICY))
    assert_error(home.run("key", "export", "--ref1", "KEEP", "--tr31", "--kbpk", "BANK-KBPK"),
                 EXIT_INPUT, "not exportable")
    assert_error(home.run("key", "export", "--ref1", "OUT", "--tr31", "--kbpk", "KEEP"),
                 EXIT_INPUT, "not a KBPK")
    assert_error(home.run("key", "export", "--ref1", "BANK-KBPK", "--tr31", "--kbpk",
                          "BANK-KBPK"), EXIT_INPUT, "does not protect itself")
    only_import = home.kbpks[TR31["known_values"][-1]["kbpk"]]  # mode D
    assert_error(home.run("key", "export", "--ref1", "OUT", "--tr31", "--kbpk", only_import),
                 EXIT_INPUT, "mode of use D")


def test_a_kbpk_goes_to_a_unit_only_where_its_policy_allows(home: Home) -> None:
    """BANK-KBPK's policy names slot 9 alone: a load into slot 1 is refused (6986)."""
    assert_error(home.run("load", "--sn", SN, "--ref1", "BANK-KBPK", "--ref2", "1"),
                 EXIT_REFUSED, "6986")
    ok(home.run("load", "--sn", SN, "--ref1", "BANK-KBPK", "--ref2", "9"))


def test_tr31_options_are_checked(home: Home) -> None:
    res = home.run("key", "import", "--ref1", "X", "--tr31", "D0016P0AE00E0000", "--type",
                   "aes128", "--kbpk", "BANK-KBPK", *POLICY)
    assert res.rc == 2 and "header gives the type" in res.stderr
    res = home.run("key", "import", "--ref1", "X", "--type", "aes128", *POLICY)
    assert res.rc == 2 and "--usage, --mode, --exportability, --key-version" in res.stderr


def test_a_usage_keyload_does_not_take_is_refused(home: Home) -> None:
    block = psec.tr31.wrap(home.kbpk, psec.tr31.Header("D", "S0", "A", "C", "01", "E"),
                           secrets.token_bytes(32))
    before = home.keys()
    assert_error(home.run("key", "import", "--ref1", "ASYM", "--tr31", block, "--kbpk",
                          "BANK-KBPK", *POLICY), EXIT_INPUT, "'S0'")
    assert home.keys() == before
