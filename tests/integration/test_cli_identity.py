"""Identity sets (suite 0x03, docs/protocol.md §10) through the ``keyload`` console script:
an identity set made in the software authority, emulated units enrolled in it (GENERATE
UNIT KEY, the authority certifies, PUT CERTIFICATE), the register (``unit list --set``),
revocation, certificates for units enrolled elsewhere; and each refusal with its exit
code, its one error line and the stored state as it was."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import require

from .cli_helpers import KEYLOAD, Result, assert_error, ok, run, tree_files

pytestmark = pytest.mark.slow  # every test runs the console script

EXIT_INPUT, EXIT_REFUSED = 3, 6
SN1, SN2 = "1d00000001", "1d00000002"


def snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in tree_files(home)}


def q_u() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


@dataclass
class Home:
    path: Path
    t_set: str        # a transport-key set
    id_set: str       # an identity set
    created: Result   # set create --identity --json

    def run(self, *args: str) -> Result:
        return run(*args, home=self.path)

    def copy(self, to: Path) -> Home:
        shutil.copytree(self.path, to)
        return Home(to, self.t_set, self.id_set, self.created)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Home:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    path = tmp_path_factory.mktemp("identity") / "home"
    ok(run("authority", "init", home=path))
    t_set = ok(run("set", "create", "--name", "plain", "--json", home=path)).json()["set_id"]
    created = ok(run("set", "create", "--name", "plant", "--identity", "--json", home=path))
    home = Home(path, t_set, created.json()["set_id"], created)
    ok(home.run("unit", "create", "--set", home.id_set, "--sn", SN1, "--slot", "1=aes256",
                "--slot", "2=aes128"))
    return home


@pytest.fixture
def home(base: Home, tmp_path: Path) -> Home:
    return base.copy(tmp_path / "home")


def register(home: Home) -> list[dict[str, str]]:
    out: list[dict[str, str]] = home.run("unit", "list", "--set", home.id_set,
                                         "--json").json()["units"]
    return out


def test_set_create_identity_and_set_list_show_its_kind(base: Home) -> None:
    made = base.created.json()
    assert made["name"] == "plant" and made["kind"] == "identity"
    assert len(bytes.fromhex(made["set_id"])) == 5 and made["set_id"] != base.t_set
    listed = {s["set_id"]: s for s in ok(base.run("set", "list", "--json")).json()["sets"]}
    assert listed[base.id_set]["kind"] == "identity"
    assert listed[base.t_set]["kind"] == "transport key"
    table = ok(base.run("set", "list")).stdout.splitlines()
    assert table[0].split() == ["set", "id", "name", "kind", "SAS"]
    row = next(r for r in table if r.startswith(base.id_set))
    assert row.split() == [base.id_set, "plant", "identity", "ecdsa"]
    text = ok(run("set", "create", "--name", "other", "--identity", home=base.path))
    assert text.stdout.startswith("identity set other created: set id ")


def test_unit_create_enrols_the_unit_and_registers_it(base: Home) -> None:
    assert register(base) == [{"set_id": base.id_set, "sn": SN1, "status": "active",
                               "certificate": register(base)[0]["certificate"]}]
    cert = bytes.fromhex(register(base)[0]["certificate"])
    assert bytes.fromhex(SN1) in cert and bytes.fromhex(base.id_set) in cert
    # the unit holds its key and C_U: its slots answer as a unit of this set
    st = ok(base.run("unit", "list")).stdout.splitlines()
    assert SN1 in st
    table = ok(base.run("unit", "list", "--set", base.id_set)).stdout.splitlines()
    assert table[0].split() == ["SN", "status"] and table[2].split() == [SN1, "active"]


def test_unit_create_json_gives_the_certificate(home: Home) -> None:
    out = ok(home.run("unit", "create", "--set", home.id_set, "--sn", SN2, "--json")).json()
    assert out["sn"] == SN2 and out["set_id"] == home.id_set and out["slots"] == [1]
    assert {r["sn"]: r["certificate"] for r in register(home)}[SN2] == out["certificate"]


def test_revoke_shows_in_the_register(home: Home) -> None:
    res = ok(home.run("unit", "revoke", "--set", home.id_set, "--sn", SN1))
    assert res.stdout.strip() == (f"unit {SN1} of set {home.id_set} revoked: its exports "
                                  "are refused (6983)")
    assert [(r["sn"], r["status"]) for r in register(home)] == [(SN1, "revoked")]


def test_certify_prints_c_u_and_registers_the_unit(home: Home) -> None:
    q = q_u()
    c_u = ok(home.run("unit", "certify", "--set", home.id_set, "--sn", SN2, "--public-key",
                      q.hex())).stdout.strip()
    cert = bytes.fromhex(c_u)
    assert q in cert and bytes.fromhex(SN2) in cert
    assert {r["sn"]: (r["status"], r["certificate"]) for r in register(home)}[SN2] == (
        "active", c_u)
    js = ok(home.run("unit", "certify", "--set", home.id_set, "--sn", "1d03",
                     "--public-key", q_u().hex(), "--json")).json()
    assert js["sn"] == "1d03" and js["set_id"] == home.id_set
    assert bytes.fromhex(js["certificate"])


# -- refusals: exit code, one error line, nothing stored changed ---------------------------
UNKNOWN = "0123456789"


@pytest.mark.parametrize("argv", [
    ("unit", "list", "--set", UNKNOWN),
    ("unit", "revoke", "--set", UNKNOWN, "--sn", SN1),
    ("unit", "create", "--set", UNKNOWN, "--sn", SN2),
    ("unit", "certify", "--set", UNKNOWN, "--sn", SN2, "--public-key", "04" + "00" * 64),
], ids=["list", "revoke", "create", "certify"])
def test_unknown_set_is_refused(home: Home, argv: tuple[str, ...]) -> None:
    before = snapshot(home.path)
    assert_error(home.run(*argv), EXIT_REFUSED, UNKNOWN)
    assert snapshot(home.path) == before


@pytest.mark.parametrize("argv", [
    ("unit", "list", "--set"),
    ("unit", "revoke", "--sn", SN1, "--set"),
    ("unit", "certify", "--sn", SN2, "--public-key", "04" + "11" * 64, "--set"),
], ids=["list", "revoke", "certify"])
def test_a_transport_key_set_given_identity_commands_is_refused(
        home: Home, argv: tuple[str, ...]) -> None:
    before = snapshot(home.path)
    assert_error(home.run(*argv, home.t_set), EXIT_INPUT, home.t_set,
                 "not an identity set")
    assert snapshot(home.path) == before


@pytest.mark.parametrize("extra", [("--signed",), ("--components", "2")])
def test_set_create_identity_with_transport_key_options_is_refused(
        home: Home, extra: tuple[str, ...]) -> None:
    before = snapshot(home.path)
    assert_error(home.run("set", "create", "--name", "x", "--identity", *extra), EXIT_INPUT,
                 "--identity takes neither")
    assert snapshot(home.path) == before


@pytest.mark.parametrize("extra", [("--suites", "1,2"), ("--components", "2")])
def test_unit_create_in_an_identity_set_with_transport_key_options_is_refused(
        home: Home, extra: tuple[str, ...]) -> None:
    before = snapshot(home.path)
    assert_error(home.run("unit", "create", "--set", home.id_set, "--sn", SN2, *extra),
                 EXIT_INPUT, "is an identity set")
    assert snapshot(home.path) == before


def test_suite_3_for_a_unit_of_a_transport_key_set_is_refused(home: Home) -> None:
    before = snapshot(home.path)
    assert_error(home.run("unit", "create", "--set", home.t_set, "--sn", SN2, "--suites", "3"),
                 EXIT_INPUT, "identity set alone")
    assert snapshot(home.path) == before


@pytest.mark.parametrize(("key", "needle"), [
    ("zz" * 65, "must be hex"),
    ("04" + "11" * 64, "not an uncompressed P-256 point"),   # not on the curve
    ("02" + "11" * 32, "not an uncompressed P-256 point"),   # compressed
], ids=["not-hex", "off-curve", "compressed"])
def test_certify_a_bad_public_key_is_refused(home: Home, key: str, needle: str) -> None:
    before = snapshot(home.path)
    assert_error(home.run("unit", "certify", "--set", home.id_set, "--sn", SN2,
                          "--public-key", key), EXIT_INPUT, needle)
    assert snapshot(home.path) == before


@pytest.mark.parametrize("argv", [
    ("unit", "create", "--sn", SN1, "--set"),
    ("unit", "certify", "--sn", SN1, "--public-key", "", "--set"),
], ids=["create", "certify"])
def test_a_duplicate_sn_is_refused(home: Home, argv: tuple[str, ...]) -> None:
    argv = tuple(q_u().hex() if a == "" else a for a in argv)
    before = snapshot(home.path)
    assert_error(home.run(*argv, home.id_set), EXIT_INPUT, SN1, "already certified")
    assert snapshot(home.path) == before


def test_revoking_a_unit_not_in_the_register_is_refused(home: Home) -> None:
    before = snapshot(home.path)
    assert_error(home.run("unit", "revoke", "--set", home.id_set, "--sn", SN2), EXIT_INPUT,
                 SN2, "not in the register")
    assert snapshot(home.path) == before


def test_set_create_identity_on_a_pkcs11_home_makes_it_in_the_token(tmp_path: Path) -> None:
    """A home whose authority lives in a PKCS#11 token: the identity set is made there (its
    loads: tests/integration/test_pkcs11_identity.py); no keystore file appears."""
    from .test_cli_hardware import DEMO_PIN, _require_softhsm, keyload

    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    _require_softhsm()
    root = tmp_path / "work"
    ok(keyload("demo", "--units", "1", "--authority", "pkcs11", "--workdir", root, "--quiet"))
    sets = ok(keyload("set", "list", "--json", home=root, pin=DEMO_PIN)).json()["sets"]
    made = ok(keyload("set", "create", "--name", "plant", "--identity", "--json", home=root,
                      pin=DEMO_PIN)).json()
    assert made["kind"] == "identity" and made["name"] == "plant"
    after = ok(keyload("set", "list", "--json", home=root, pin=DEMO_PIN)).json()["sets"]
    def by_id(listed: list[dict[str, str]]) -> list[dict[str, str]]:
        return sorted(listed, key=lambda s: s["set_id"])  # the token's order is its own

    assert by_id([s for s in after if s["set_id"] != made["set_id"]]) == by_id(sets)
    assert {s["set_id"]: s["kind"] for s in after}[made["set_id"]] == "identity"
    assert json.loads((root / "authority" / "backend.json").read_text())["backend"] == "pkcs11"
    assert not (root / "authority" / "keystore.sealed").exists()


# -- loads: suite 0x03 chosen because the unit's set is an identity set --------------------
def _with_key(home: Home) -> None:
    ok(home.run("key", "generate", "--ref1", "TMK-1", "--type", "aes256", "--usage", "K0",
                "--mode", "B", "--exportability", "E", "--key-version", "1", "--sets", "any",
                "--slots", "1"))


def test_load_into_a_unit_of_an_identity_set_and_its_receipt_verifies(home: Home) -> None:
    _with_key(home)
    kcv = next(k["kcv"] for k in home.run("key", "list", "--json").json()["keys"])
    out = ok(home.run("load", "--sn", SN1, "--ref1", "TMK-1", "--ref2", "1", "--json")).json()
    assert (out["sn"], out["set_id"], out["suite"], out["ref2"]) == (SN1, home.id_set, 3, 1)
    assert out["kcv"] == kcv and len(bytes.fromhex(out["receipt"])) == 64  # ECDSA r || s
    exports = ok(home.run("authority", "exports", "--json")).json()["records"]
    assert [(e["sn"], e["suite"], e["kcv"]) for e in exports] == [(SN1, 3, kcv)]
    st = ok(home.run("unit", "status", "--sn", SN1, "--json")).json()
    assert st["set_id"] == home.id_set
    assert [(x["ref2"], x["state"], x["kcv"]) for x in st["slots"]] == [
        (1, "loaded", kcv), (2, "empty", None)]
    rec = ok(home.run("receipts"))
    assert rec.last_line() == "1 receipt verified, 0 invalid"
    js = ok(home.run("receipts", "--json")).json()
    assert (js["verified"], js["invalid"], js["exports_without_receipt"]) == (1, 0, 0)


def test_a_tampered_suite_3_receipt_is_invalid(home: Home) -> None:
    import sqlite3

    _with_key(home)
    ok(home.run("load", "--sn", SN1, "--ref1", "TMK-1", "--ref2", "1"))
    db = sqlite3.connect(home.path / "station.db")
    (rct,) = db.execute("SELECT rct FROM loads").fetchone()
    db.execute("UPDATE loads SET rct = ?", (rct[:-2] + ("00" if rct[-2:] != "00" else "01"),))
    db.commit()
    db.close()
    res = home.run("receipts")
    assert res.rc == 1 and res.last_line() == "0 receipts verified, 1 invalid", res.describe()
    assert "receipt does not verify" in res.stdout


def test_a_load_to_a_revoked_unit_is_refused_6983(home: Home) -> None:
    _with_key(home)
    ok(home.run("unit", "revoke", "--set", home.id_set, "--sn", SN1))

    def kept() -> dict[str, bytes]:  # the keystore and the units (a load records its tries)
        return {k: v for k, v in snapshot(home.path).items()
                if k.startswith(("units/", "authority/")) and k != "authority/exports.db"}

    before = kept()
    res = home.run("load", "--sn", SN1, "--ref1", "TMK-1", "--ref2", "1")
    assert_error(res, EXIT_REFUSED, "6983")
    assert kept() == before
    assert home.run("authority", "exports", "--json").json()["total"] == 0
    rec = home.run("receipts", "--json").json()
    assert (rec["verified"], rec["invalid"], rec["exports_without_receipt"]) == (0, 0, 0)


def test_a_diversified_key_loads_by_suite_3_and_its_receipt_verifies(home: Home) -> None:
    ok(home.run("key", "generate", "--ref1", "TMK-D", "--type", "aes256", "--usage", "K0",
                "--mode", "B", "--exportability", "E", "--key-version", "1", "--diversify",
                "--sets", home.id_set, "--slots", "1"))
    master = next(k["kcv"] for k in home.run("key", "list", "--json").json()["keys"])
    out = ok(home.run("load", "--sn", SN1, "--ref1", "TMK-D", "--ref2", "1", "--json")).json()
    assert out["suite"] == 3 and out["kcv"] != master  # TA' = KDF(TA, SN): its own KCV
    assert ok(home.run("receipts")).last_line() == "1 receipt verified, 0 invalid"


def test_an_enrolment_the_authority_refuses_leaves_no_unit_behind(home: Home) -> None:
    """The unit makes its key before the authority certifies it: when the authority
    cannot (here its register cannot be written), the new unit's file is removed, so the
    SN can be enrolled again and no unit without a certificate is left in the fleet."""
    from keyload.core.errors import StoreError
    from keyload.station.home import Home as StationHome
    from keyload.station.identity import enrol_unit
    from keyload.units.storage import KekSource
    from keyload.units.unit import Slot

    from .cli_helpers import PASSPHRASE

    before = snapshot(home.path)
    station_home = StationHome.resolve(str(home.path), KekSource(passphrase=PASSPHRASE))
    ks = station_home.open_keystore()

    def register_cannot_be_written(*_: object) -> None:
        raise StoreError("register cannot be written")

    ks.certify_unit = register_cannot_be_written  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreError, match="register cannot be written"):
            enrol_unit(station_home, ks, bytes.fromhex(home.id_set), bytes.fromhex(SN2),
                       {1: Slot(1, frozenset())})
    finally:
        ks.close()
    assert snapshot(home.path) == before
    ok(home.run("unit", "create", "--set", home.id_set, "--sn", SN2, "--slot", "1=aes256"))
    assert [r["sn"] for r in register(home)] == [SN1, SN2]


def test_unit_status_of_a_unit_not_enrolled_yet_says_so(home: Home) -> None:
    """A unit created ``--unenrolled`` has no certificate, so no set id yet: its status says
    that rather than an empty set id, and its slots answer as they are (empty)."""
    ok(home.run("unit", "create", "--set", home.id_set, "--sn", SN2, "--slot", "1=aes256",
                "--unenrolled"))
    out = ok(home.run("unit", "status", "--sn", SN2, "--json")).json()
    assert out["sn"] == SN2 and out["set_id"] is None and out["enrolled"] is False
    assert [(s["ref2"], s["state"]) for s in out["slots"]] == [(1, "empty")]
    heading = ok(home.run("unit", "status", "--sn", SN2)).stdout.splitlines()[0]
    assert heading == f"unit {SN2}, not enrolled yet (no certificate, so no set)"
    enrolled = ok(home.run("unit", "status", "--sn", SN1, "--json")).json()
    assert (enrolled["set_id"], enrolled["enrolled"]) == (home.id_set, True)
    assert ok(home.run("unit", "status", "--sn", SN1)).stdout.splitlines()[0] == \
        f"unit {SN1}, set {home.id_set}"
