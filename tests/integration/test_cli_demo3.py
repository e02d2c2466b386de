"""``keyload demo --suite``: the demo's units offering one suite, or (``--suite 3``) units
of an identity set, each enrolled (GENERATE UNIT KEY, the authority certifies, PUT
CERTIFICATE) and customized by suite 0x03 through the demo's campaign; the receipts,
the units' unit ECDSA signatures, verified by the CLI and independently; ``--suite``
checked."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.conftest import require

from .cli_helpers import KEYLOAD, Result, assert_error, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script

EXIT_USAGE, EXIT_INPUT = 2, 3


@pytest.fixture(scope="module")
def demo3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    workdir = tmp_path_factory.mktemp("demo3") / "work"
    return workdir, run("demo", "--units", "20", "--suite", "3", "--workdir", workdir,
                        "--quiet")


def test_demo_suite3_customizes_every_unit(demo3: tuple[Path, Result]) -> None:
    workdir, res = demo3
    ok(res)
    assert res.last_line() == "customized 20 of 20 units, 0 failed", res.describe()
    assert "authority: software, transport: local, suite 0x03" in res.stdout
    assert "40 verified by the authority, 0 invalid" in res.stdout
    assert "0x03: 40" in res.stdout
    assert len(list((workdir / "units").glob("*.unit"))) == 20


def test_demo_suite3_units_are_in_the_register(demo3: tuple[Path, Result]) -> None:
    workdir, _ = demo3
    sets = ok(run("set", "list", "--json", home=workdir)).json()["sets"]
    (ident,) = [s for s in sets if s["kind"] == "identity"]
    units = ok(run("unit", "list", "--set", ident["set_id"], "--json",
                   home=workdir)).json()["units"]
    assert sorted(u["sn"] for u in units) == [(b"KL" + i.to_bytes(6, "big")).hex()
                                            for i in range(1, 21)]
    assert {u["status"] for u in units} == {"active"}


def test_demo_suite3_receipts_verify(demo3: tuple[Path, Result]) -> None:
    workdir, _ = demo3
    receipts = ok(run("receipts", "--json", home=workdir)).json()
    assert receipts["verified"] == 40 and receipts["invalid"] == 0
    assert receipts["exports_without_receipt"] == 0


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def test_demo_suite3_receipts_are_the_units_signatures(demo3: tuple[Path, Result]) -> None:
    """Checked without keyload: each receipt in the campaign's journal is the unit's
    ECDSA P-256 signature (r || s) over "KLP1-RCT3" || lv(SN) || R || REF2 || lv(REF1) ||
    H || KCV || E_A (docs/protocol.md §10.5), under the Q_U of the C_U and with the E_A
    that the authority's export record keeps; one bit changed, it fails."""
    workdir, _ = demo3
    exports = {(sn, ref1, ref2): (bytes.fromhex(e_a), bytes.fromhex(c_u))
               for sn, ref1, ref2, e_a, c_u in _rows(
                   workdir / "authority" / "exports.db",
                   "SELECT sn, ref1, ref2, e_a, c_u FROM exports WHERE suite = 3")}
    loads = _rows(workdir / "journal.db", "SELECT sn, ref1, ref2, r, header, kcv, rct FROM "
                                          "loads WHERE state = 'imported'")
    assert len(loads) == 40 and len(exports) == 40
    for sn, ref1, ref2, r, h, kcv, rct in loads:
        e_a, c_u = exports[(sn, ref1, ref2)]
        at = c_u.index(b"\xd0\x41\x04")  # the certificate's subject key, 04 || X || Y
        q_u = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), c_u[at + 2:at + 67])
        sn_b, ref1_b = bytes.fromhex(sn), bytes.fromhex(ref1)
        signed = b"".join((b"KLP1-RCT3", bytes((len(sn_b),)), sn_b, bytes.fromhex(r),
                           bytes((ref2,)), bytes((len(ref1_b),)), ref1_b, bytes.fromhex(h),
                           bytes.fromhex(kcv), e_a))
        sig = bytes.fromhex(rct)
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                   int.from_bytes(sig[32:], "big"))
        q_u.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            q_u.verify(der, signed[:-1] + bytes((signed[-1] ^ 1,)), ec.ECDSA(hashes.SHA256()))


def test_demo_suite3_json(tmp_path: Path) -> None:
    out = ok(run("demo", "--units", "3", "--suite", "3", "--workdir", tmp_path / "w",
                 "--json")).json()
    assert out["suite"] == 3 and out["customized"] == 3 and out["failed"] == 0
    assert out["receipts_verified"] == 6 and out["receipts_invalid"] == 0
    assert out["loads_by_suite"] == {"0x03": 6}


def test_demo_suite_1_offers_only_that_suite(tmp_path: Path) -> None:
    res = ok(run("demo", "--units", "3", "--suite", "1", "--workdir", tmp_path / "w",
                 "--quiet"))
    assert res.last_line() == "customized 3 of 3 units, 0 failed", res.describe()
    (suites,) = [line for line in res.stdout.splitlines() if line.startswith("suites ")]
    assert suites.split() == ["suites", "0x01:", "6"], res.describe()


@pytest.mark.parametrize("value", ["4", "0", "x"])
def test_demo_suite_is_checked(tmp_path: Path, value: str) -> None:
    res = run("demo", "--units", "2", "--suite", value, "--workdir", tmp_path / "w")
    assert res.rc == EXIT_USAGE, res.describe()
    assert "Traceback" not in res.output and "--suite" in res.stderr, res.describe()
    assert not (tmp_path / "w").exists()


def test_demo_workdir_of_another_suite_is_refused(demo3: tuple[Path, Result]) -> None:
    workdir, _ = demo3
    assert_error(run("demo", "--units", "20", "--workdir", workdir), EXIT_INPUT,
                 "other arguments", "--suite 3")


@pytest.mark.hardware
@pytest.mark.parametrize("authority, transport", [("pkcs11", "local"), ("software", "pcsc"),
                                                  ("card", "local"), ("pkcs11", "pcsc")])
def test_demo_suite3_other_authorities_and_transports(tmp_path: Path, authority: str,
                                                      transport: str) -> None:
    """Every unit customized, the authority in a token or a card, the units in process or
    fed through a reader."""
    res = run("demo", "--units", "2", "--suite", "3", "--authority", authority,
              "--transport", transport, "--workdir", tmp_path / "w", "--quiet")
    assert res.rc == 0, res.describe()
    assert res.last_line() == "customized 2 of 2 units, 0 failed", res.describe()
