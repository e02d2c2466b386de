"""AES DUKPT through the console script: a BDK imported (the X9.24-3 supplement's AES-128
BDK), its initial keys loaded into emulated units (one by one, and by a campaign counting
up from a base), the working keys of a terminal's first transactions checked by KCV, and
the refusals. Every expected value is the published vector's, its KCV computed here
independently of keyload."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.conftest import VECTORS

from .cli_helpers import KEYLOAD, aes_kcv, assert_error, assert_no_secrets, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script (a process each)

EXIT_INPUT, EXIT_STORE = 3, 4
SET: dict[str, Any] = json.loads(
    (VECTORS / "dukpt" / "aes128_x9_24_3_supplement.json").read_text())["aes128_bdk"]
BDK, IK_ID, IK = bytes.fromhex(SET["bdk"]), SET["initial_key_id"], bytes.fromhex(SET["initial_key"])
FIRST = SET["transactions"][0]
UNITS = ["7E000001", "7E000002", "7E000003"]


@dataclass
class Home:
    root: Path
    set_id: str

    def status(self, sn: str) -> dict[int, dict[str, Any]]:
        st = ok(run("unit", "status", "--sn", sn, "--json", home=self.root)).json()
        return {s["ref2"]: s for s in st["slots"]}


def _key(ref1: str, type_: str, usage: str, exp: str, slots: str) -> list[str]:
    return ["key", "import", "--ref1", ref1, "--type", type_, "--usage", usage, "--mode", "X",
            "--exportability", exp, "--key-version", "1", "--sets", "any", "--slots", slots]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """The vector's BDK, a key KEK of another usage, four emulated terminals."""
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    root = tmp_path_factory.mktemp("dukpt") / "home"
    for step in (("authority", "init"), ("set", "create", "--name", "terminals")):
        made = ok(run(*step, "--json", home=root))
    set_id = made.json()["set_id"]
    ok(run(*_key("BDK", "aes128", "B0", "N", "1"), home=root, input=BDK.hex() + "\n"))
    ok(run(*_key("KEK", "aes128", "K0", "E", "2"), home=root, input="11" * 16 + "\n"))
    for sn in [*UNITS, "7E0000FF"]:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes128",
               "--slot", "2=aes128", home=root))
    return Home(root, set_id)


@pytest.fixture(scope="module")
def loaded(home: Home) -> dict[str, Any]:
    out: dict[str, Any] = ok(run("load", "--sn", "7E0000FF", "--ref1", "BDK", "--ref2", "1",
                                 "--initial-key-id", IK_ID, "--json", home=home.root)).json()
    return out


def test_the_unit_holds_the_vector_ik(home: Home, loaded: dict[str, Any]) -> None:
    assert loaded["initial_key_id"] == IK_ID and loaded["kcv"] == aes_kcv(IK)
    slot = home.status("7E0000FF")[1]
    assert (slot["state"], slot["type"], slot["usage"], slot["kcv"]) == \
        ("loaded", "aes128", "B1", aes_kcv(IK))
    assert aes_kcv(IK) != aes_kcv(BDK)


def test_the_export_record_keeps_the_initial_key_id(home: Home, loaded: dict[str, Any]) -> None:
    recs = ok(run("authority", "exports", "--json", home=home.root)).json()["records"]
    mine = [r for r in recs if r["sn"] == "7e0000ff"]
    assert [(r["ref1"], r["initial_key_id"], r["kcv"]) for r in mine] == \
        [("BDK", IK_ID, aes_kcv(IK))]
    table = ok(run("authority", "exports", home=home.root)).stdout
    assert IK_ID in table
    assert_no_secrets(table + json.dumps(recs), {"BDK": BDK, "IK": IK})


@pytest.mark.parametrize("usage,name", [("pin", "pin_key_aes128"),
                                        ("mac", "mac_generation_key_aes128"),
                                        ("data", "data_encryption_key_aes128")])
def test_dukpt_derive_gives_the_first_transactions_keys(home: Home, usage: str,
                                                        name: str) -> None:
    for t in SET["transactions"][:3]:
        out = ok(run("dukpt", "derive", "--ref1", "BDK", "--ksn", t["ksn"], "--usage", usage,
                     "--json", home=home.root)).json()
        assert out == {"ref1": "BDK", "ksn": t["ksn"], "usage": usage, "type": "aes128",
                       "kcv": aes_kcv(bytes.fromhex(t[name]))}
    line = ok(run("dukpt", "derive", "--ref1", "BDK", "--ksn", FIRST["ksn"], "--usage", "pin",
                  home=home.root)).stdout
    assert aes_kcv(bytes.fromhex(FIRST["pin_key_aes128"])) in line


def test_a_campaign_counts_the_initial_key_ids_up(home: Home, loaded: dict[str, Any],
                                                 tmp_path: Path) -> None:
    manifest = tmp_path / "units.csv"
    manifest.write_text("sn\n" + "\n".join(UNITS) + "\n")
    ok(run("campaign", "create", "terminals", "--set", home.set_id, "--load", "BDK:1",
           "--manifest", str(manifest), "--initial-key-id-base", IK_ID, home=home.root))
    ok(run("campaign", "run", "terminals", "--quiet", home=home.root))
    plan = ok(run("campaign", "status", "terminals", "--json", home=home.root)).json()["plan"]
    assert plan == [{"ref1": "BDK", "ref2": 1, "version": 1, "initial_key_id_base": IK_ID}]
    assert home.status(UNITS[0])[1]["kcv"] == aes_kcv(IK)  # the first unit: the base's IK
    ids = [f"{int(IK_ID, 16) + i:016X}" for i in range(3)]
    rows = list(csv.DictReader(io.StringIO(ok(run(
        "ledger", "export", "--format", "csv", home=home.root)).stdout)))
    assert [(r["sn"], r["initial_key_id"]) for r in rows] == \
        [(sn.lower(), i) for sn, i in zip(UNITS, ids, strict=True)]
    header = ok(run("ledger", "export", "--format", "csv", home=home.root)).stdout.split("\n")[0]
    assert header.rstrip().endswith(",set_id,e_a,c_u,initial_key_id")
    js = ok(run("ledger", "export", "--format", "json", home=home.root)).json()
    assert [e["initial_key_id"] for e in js] == ids
    assert len({home.status(sn)[1]["kcv"] for sn in UNITS}) == 3
    assert ok(run("ledger", "verify", home=home.root)).last_line() == \
        "3 receipts verified, 0 invalid"
    receipts = ok(run("receipts", "--json", home=home.root)).json()  # with the single load
    assert (receipts["verified"], receipts["invalid"]) == (4, 0)


@pytest.mark.parametrize("args,code,needle", [
    (["--ref1", "BDK", "--ref2", "2"], EXIT_INPUT, "give --initial-key-id"),
    (["--ref1", "BDK", "--ref2", "2", "--initial-key-id", "12345678901234"], EXIT_INPUT,
     "8 bytes"),
    (["--ref1", "KEK", "--ref2", "2", "--initial-key-id", IK_ID], EXIT_INPUT, "not a BDK"),
    (["--ref1", "BDK", "--ref2", "2", "--initial-key-id", IK_ID, "--ik-type", "aes256"],
     EXIT_INPUT, "no stronger than its parent"),
], ids=["bdk-without-id", "short-id", "id-with-another-key", "ik-stronger-than-bdk"])
def test_refused_with_one_line_and_nothing_stored(home: Home, args: list[str], code: int,
                                                  needle: str) -> None:
    sn = "7E000001"
    before = home.status(sn)[2]
    assert_error(run("load", "--sn", sn, *args, home=home.root), code, needle)
    assert home.status(sn)[2] == before and before["state"] == "empty"


def test_key_list_shows_a_bdk_lets_only_initial_keys_leave(home: Home) -> None:
    keys = {k["ref1"]: k for k in ok(run("key", "list", "--json", home=home.root)).json()["keys"]}
    assert (keys["BDK"]["usage"], keys["BDK"]["exportability"], keys["BDK"]["kcv"]) == \
        ("B0", "N", aes_kcv(BDK))
    assert keys["BDK"]["policy"] == {"sets": "any", "slots": [1], "initial_keys_only": True}
    assert keys["KEK"]["policy"] == {"sets": "any", "slots": [2]}
    table = ok(run("key", "list", home=home.root)).stdout
    assert "any set; 1; initial keys only" in table


def test_a_bdk_from_components_and_the_station_records(home: Home) -> None:
    parts = [bytes(range(16)), bytes(range(16, 32))]
    out = ok(run(*_key("BDK-C", "aes128", "B0", "N", "1"), "--components", "2", "--json",
                 home=home.root, input="".join(p.hex() + "\n" for p in parts))).json()
    assert out["kcv"] == aes_kcv(bytes(a ^ b for a, b in zip(*parts, strict=True)))
    assert out["policy"]["initial_keys_only"] is True
    with contextlib.closing(sqlite3.connect(home.root / "station.db")) as db:
        rows = db.execute("SELECT sn, initial_key_id FROM loads WHERE status = 'loaded'")
        assert ("7e0000ff", IK_ID.lower()) in list(rows)


@pytest.mark.parametrize("args,needle", [
    (["--load", "BDK:1"], "give --initial-key-id-base"),
    (["--load", "KEK:2", "--initial-key-id-base", IK_ID], "no load is of a BDK"),
    (["--load", "BDK:1", "--initial-key-id-base", "12345678FFFFFFFF"], "run out"),
], ids=["bdk-without-base", "base-without-bdk", "ids-run-out"])
def test_a_campaign_of_a_bdk_is_planned_with_its_ids(home: Home, args: list[str],
                                                     needle: str) -> None:
    assert_error(run("campaign", "create", "refused", "--set", home.set_id, *args,
                     home=home.root), EXIT_INPUT, needle)
    assert_error(run("campaign", "status", "refused", home=home.root), EXIT_STORE)


def test_an_aes128_ik_from_an_aes256_bdk(home: Home) -> None:
    """The IK computed here as X9.24-3 says: AES-ECB under the BDK of 01 01 8001 0002 0080
    || initial key ID (usage initial key, algorithm AES-128, 128 bits)."""
    bdk = bytes(range(100, 132))
    ok(run(*_key("BDK-256", "aes256", "B0", "N", "2"), home=home.root, input=bdk.hex() + "\n"))
    ok(run("load", "--sn", "7E000003", "--ref1", "BDK-256", "--ref2", "2",
           "--initial-key-id", IK_ID, "--ik-type", "aes128", home=home.root))
    enc = Cipher(algorithms.AES(bdk), modes.ECB()).encryptor()  # noqa: S305 - X9.24-3
    ik = enc.update(bytes.fromhex("010180010002008" + "0" + IK_ID)) + enc.finalize()
    slot = home.status("7E000003")[2]
    assert (slot["type"], slot["usage"], slot["kcv"]) == ("aes128", "B1", aes_kcv(ik))


def test_a_bdk_load_in_a_reader_is_refused_before_the_reader(home: Home) -> None:
    """Without its ID (with it, the card's IK is loaded: test_cards_dukpt)."""
    assert_error(run("load", "--reader", "no such reader", "--ref1", "BDK", "--ref2", "1",
                     home=home.root), EXIT_INPUT, "give --initial-key-id")


def test_a_bdk_is_never_exportable(home: Home) -> None:
    res = run(*_key("BDK2", "aes128", "B0", "E", "1"), home=home.root, input="22" * 16 + "\n")
    assert_error(res, EXIT_INPUT, "never exported")
    listed = ok(run("key", "list", "--json", home=home.root)).json()["keys"]
    assert "BDK2" not in {k["ref1"] for k in listed}


def test_a_bad_ksn_is_refused(home: Home) -> None:
    assert_error(run("dukpt", "derive", "--ref1", "BDK", "--ksn", FIRST["ksn"][:-2],
                     "--usage", "pin", home=home.root), EXIT_INPUT, "12 bytes")
    assert_error(run("dukpt", "derive", "--ref1", "KEK", "--ksn", FIRST["ksn"],
                     "--usage", "pin", home=home.root), EXIT_INPUT, "not a BDK")
