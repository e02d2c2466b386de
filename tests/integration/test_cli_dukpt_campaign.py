"""AES DUKPT campaigns through the console script: each unit's initial key ID from the
manifest's ``initial_key_id`` column (CSV and JSON) or counted up from a base, the IK's
type by ``--ik-type``, the refusals (nothing planned), and a campaign interrupted and
resumed, by its station and by another on the same journal (SQLite and PostgreSQL): every
unit holds the IK of the ID planned for it, checked by KCV against ``core.dukpt`` and the
X9.24-3 supplement's IK, and the ledger and the authority's export records name that ID."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyload.core.dukpt import InitialKeyId, initial_key
from keyload.core.keys import KeyType
from keyload.core.secret import Secret
from keyload.lab.pgserver import make_database
from keyload.station.campaign import Interrupt, RunOptions
from keyload.station.home import Home as StationHome
from keyload.station.journal import open_journal
from keyload.station.journal.model import Journal, LoadRow
from keyload.station.run import run_emulated
from keyload.units.storage import KekSource
from tests.conftest import require

from .cli_helpers import KEYLOAD, PASSPHRASE, aes_kcv, assert_error, ok, run
from .test_cli_dukpt import BDK, IK, IK_ID, _key
from .test_postgres_journal import pg_server  # noqa: F401  (the module's private server)

pytestmark = pytest.mark.slow  # every test runs the console script (a process each)

EXIT_INPUT, EXIT_STORE = 3, 4
BDK256 = bytes(range(100, 132))
UNITS = ["7E100001", "7E100002", "7E100003", "7E100004"]
# not in the units' order, and not one base counted up: only the plan can give them
IDS = [IK_ID, "AABBCCDD00000007", "1234567800000100", "AABBCCDD00000003"]
_databases = itertools.count()


def ik_kcv(bdk: bytes, ik_id: str, ik_type: KeyType = KeyType.AES128) -> str:
    """The KCV of the IK of ``ik_id`` as keyload's X9.24-3 derivation gives it."""
    ik = initial_key(Secret(bdk).buffer, InitialKeyId.parse(ik_id), ik_type)
    try:
        return aes_kcv(bytes(ik.buffer))
    finally:
        ik.wipe()


@dataclass
class Home:
    path: Path
    set_id: str

    def run(self, *args: str, input: str | None = None) -> Any:
        return run(*args, home=self.path, input=input)

    def slot(self, sn: str, ref2: int) -> dict[str, Any]:
        st = ok(self.run("unit", "status", "--sn", sn, "--json")).json()
        slot: dict[str, Any] = {s["ref2"]: s for s in st["slots"]}[ref2]
        return slot

    def manifest(self, name: str, text: str) -> str:
        path = self.path.parent / name
        path.write_text(text)
        return str(path)

    def ledger(self, *journal: str) -> list[dict[str, str]]:
        text = ok(self.run("ledger", "export", "--format", "csv", *journal)).stdout
        return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """The vector's BDK (slot 1), an AES-256 BDK (slot 2), a KEK (slot 3), four units."""
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    root = tmp_path_factory.mktemp("dukpt-campaign") / "home"
    made = [ok(run(*step, "--json", home=root)).json() for step in (
        ("authority", "init"), ("set", "create", "--name", "terminals"))]
    set_id = made[-1]["set_id"]
    for ref1, kt, usage, exp, slot, value in (("BDK", "aes128", "B0", "N", "1", BDK),
                                              ("BDK-256", "aes256", "B0", "N", "2", BDK256),
                                              ("KEK", "aes128", "K0", "E", "3", bytes(16))):
        ok(run(*_key(ref1, kt, usage, exp, slot), home=root, input=value.hex() + "\n"))
    for sn in UNITS:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes128",
               "--slot", "2=aes128", "--slot", "3=aes128", home=root))
    return Home(root, set_id)


@pytest.fixture
def home(base: Home, tmp_path: Path) -> Home:
    shutil.copytree(base.path, tmp_path / "home")
    return Home(tmp_path / "home", base.set_id)


def _csv(ids: list[str], units: list[str] = UNITS) -> str:
    return "sn,initial_key_id\n" + "".join(f"{sn},{i}\n" for sn, i in zip(units, ids,
                                                                          strict=True))


def _check_units(home: Home, ref2: int, bdk: bytes, ids: list[str], *journal: str,
                 ik_type: KeyType = KeyType.AES128) -> None:
    """Each unit holds the IK of its planned ID; the ledger (CSV and JSON) and the
    authority's export records name that ID for it."""
    for sn, i in zip(UNITS, ids, strict=True):
        slot = home.slot(sn, ref2)
        assert (slot["state"], slot["type"], slot["usage"], slot["kcv"]) == \
            ("loaded", ik_type.label, "B1", ik_kcv(bdk, i, ik_type)), sn
    want = {sn.lower(): i for sn, i in zip(UNITS, ids, strict=True)}
    assert {r["sn"]: r["initial_key_id"] for r in home.ledger(*journal)
            if r["ref2"] == str(ref2)} == want
    js = ok(home.run("ledger", "export", "--format", "json", *journal)).json()
    assert {e["sn"]: e["initial_key_id"] for e in js if e["ref2"] == ref2} == want
    recs = ok(home.run("authority", "exports", "--json")).json()["records"]
    assert {(r["sn"], r["initial_key_id"]) for r in recs if r["ref2"] == ref2} == \
        set(want.items())


def test_the_manifest_column_gives_each_unit_its_id(home: Home) -> None:
    manifest = home.manifest("units.csv", _csv(IDS))
    out = ok(home.run("campaign", "create", "terminals", "--set", home.set_id, "--load",
                      "BDK:1", "--manifest", manifest, "--json")).json()
    assert (out["units"], out["loads"]) == (4, 4)
    ok(home.run("campaign", "run", "terminals", "--quiet"))
    plan = ok(home.run("campaign", "status", "terminals", "--json")).json()["plan"]
    assert plan == [{"ref1": "BDK", "ref2": 1, "version": 1, "initial_key_ids": "manifest"}]
    assert home.slot(UNITS[0], 1)["kcv"] == aes_kcv(IK)  # the supplement's IK
    _check_units(home, 1, BDK, IDS)
    assert ok(home.run("ledger", "verify")).last_line() == "4 receipts verified, 0 invalid"


def test_a_json_manifest_and_an_aes128_ik_of_an_aes256_bdk(home: Home) -> None:
    doc = [{"sn": sn, "initial_key_id": i} for sn, i in zip(UNITS, IDS, strict=True)]
    manifest = home.manifest("units.json", json.dumps(doc))
    ok(home.run("campaign", "create", "terminals", "--set", home.set_id, "--load",
                "BDK-256:2", "--load", "KEK:3", "--manifest", manifest, "--ik-type", "aes128"))
    ok(home.run("campaign", "run", "terminals", "--quiet"))
    plan = ok(home.run("campaign", "status", "terminals", "--json")).json()["plan"]
    assert plan == [{"ref1": "BDK-256", "ref2": 2, "version": 1,
                     "initial_key_ids": "manifest", "ik_type": "aes128"},
                    {"ref1": "KEK", "ref2": 3, "version": 1}]
    _check_units(home, 2, BDK256, IDS)
    assert {r["initial_key_id"] for r in home.ledger() if r["ref2"] == "3"} == {""}
    assert home.slot(UNITS[0], 3)["kcv"] == aes_kcv(bytes(16))


def test_ik_type_with_a_base_over_the_emulated_units(home: Home) -> None:
    """No manifest: every emulated unit of the home, in the home's order, counted up."""
    ok(home.run("campaign", "create", "terminals", "--set", home.set_id, "--load",
                "BDK-256:2", "--initial-key-id-base", "AABBCCDD000000F0", "--ik-type",
                "aes128"))
    ok(home.run("campaign", "run", "terminals", "--quiet"))
    order = [r["sn"].upper() for r in home.ledger()]
    assert sorted(order) == sorted(UNITS)
    planned = dict(zip(order, (f"AABBCCDD{0xF0 + n:08X}" for n in range(4)), strict=True))
    _check_units(home, 2, BDK256, [planned[sn] for sn in UNITS])


@pytest.mark.parametrize(("load", "manifest", "extra", "needle"), [
    ("BDK:1", _csv(IDS), ["--initial-key-id-base", IK_ID], "give one"),
    ("BDK:1", _csv([IDS[0], "ZZ" * 8, *IDS[2:]]), [], "not hex"),
    ("BDK:1", _csv([IDS[0], IDS[1][:14], *IDS[2:]]), [], "8 bytes"),
    ("BDK:1", _csv([IDS[0], IDS[1], IDS[2], IDS[1]]), [], "is given to units"),
    ("BDK:1", _csv([IDS[0], "", *IDS[2:]]), [], "has no initial_key_id"),
    ("KEK:3", _csv(IDS), [], "initial_key_id column: no load is of a BDK"),
    ("KEK:3", "sn\n" + "\n".join(UNITS), ["--ik-type", "aes128"],
     "--ik-type: no load is of a BDK"),
    ("BDK:1", _csv(IDS), ["--ik-type", "aes256"], "no stronger than its parent"),
    ("BDK:1", "sn\n" + "\n".join(UNITS), [], "give --initial-key-id-base"),
], ids=["column-and-base", "bad-hex", "wrong-length", "duplicate-id", "unit-without-id",
        "column-without-bdk", "ik-type-without-bdk", "ik-stronger-than-bdk",
        "bdk-without-ids"])
def test_refused_with_one_line_and_nothing_planned(home: Home, load: str, manifest: str,
                                                   extra: list[str], needle: str) -> None:
    path = home.manifest("units.csv", manifest)
    assert_error(home.run("campaign", "create", "refused", "--set", home.set_id, "--load",
                          load, "--manifest", path, *extra), EXIT_INPUT, needle)
    assert_error(home.run("campaign", "status", "refused"), EXIT_STORE)
    assert not (home.path / "journal.db").exists()


def test_a_json_manifest_with_ids_for_some_units_only_is_refused(home: Home) -> None:
    doc: list[Any] = [{"sn": UNITS[0], "initial_key_id": IK_ID}, *UNITS[1:]]
    path = home.manifest("units.json", json.dumps(doc))
    assert_error(home.run("campaign", "create", "refused", "--set", home.set_id, "--load",
                          "BDK:1", "--manifest", path), EXIT_INPUT,
                 f"SN {UNITS[1]} has no initial_key_id")
    assert not (home.path / "journal.db").exists()


def test_a_bdk_campaign_on_an_identity_set_is_refused_before_anything_is_planned(
        home: Home) -> None:
    """An identity set's EXPORTKEY (suite 0x03) carries no initial key ID, so the authority
    would refuse every unit's load (6986): the plan says so at once and records nothing."""
    id_set = ok(home.run("set", "create", "--name", "plant", "--identity",
                         "--json")).json()["set_id"]
    path = home.manifest("units.csv", _csv(IDS))
    assert_error(home.run("campaign", "create", "refused", "--set", id_set, "--load", "BDK:1",
                          "--manifest", path), EXIT_INPUT, f"set {id_set} is an identity set")
    assert_error(home.run("campaign", "status", "refused"), EXIT_STORE)
    assert not (home.path / "journal.db").exists()


# -- interrupted and resumed -------------------------------------------------------------
class _Killed(BaseException):
    """The station dies here (as under SIGKILL: nothing after it is written)."""


class _DiesAt:
    """The journal of a station that dies at its ``n``-th ``exported`` (the authority has
    exported, IMPORTKEY has not left) or ``imported`` (the unit holds the key, the
    journal does not say so) write."""

    def __init__(self, inner: Journal, write: str, n: int) -> None:
        self._inner = inner
        self._write = write
        self._left = n

    def _dies(self) -> None:
        self._left -= 1
        if self._left == 0:
            raise _Killed

    def exported(self, row: LoadRow, *args: Any) -> None:
        if self._write == "exported":
            self._dies()
        self._inner.exported(row, *args)

    def imported(self, row: LoadRow, **kw: Any) -> None:
        if self._write == "imported":
            self._dies()
        self._inner.imported(row, **kw)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@pytest.fixture(params=["sqlite", "postgres"])
def journal_at(request: pytest.FixtureRequest, home: Home) -> Iterator[str]:
    """Where the campaign's journal is: the home's SQLite file, or a PostgreSQL database
    shared by the stations."""
    if request.param == "sqlite":
        yield str(home.path / "journal.db")
        return
    server: str = request.getfixturevalue("pg_server")
    yield make_database(server, f"dukpt_{os.getpid()}_{next(_databases)}")


@pytest.mark.parametrize("dies_at", ["exported", "imported"])
def test_a_resumed_campaign_loads_each_unit_with_its_planned_id(
        home: Home, journal_at: str, dies_at: str) -> None:
    """Station s1 dies at its second unit (batch of one unit); s2, on the same journal,
    loads the units still planned; s1, run again, resumes its own: its unit receives
    the IK of the ID planned for it (exported again, or reconciled with the unit), read
    from the journal, not from the process that planned it."""
    where = ["--journal", journal_at]
    manifest = home.manifest("units.csv", _csv(IDS))
    ok(home.run("campaign", "create", "terminals", "--set", home.set_id, "--load", "BDK:1",
                "--manifest", manifest, *where))
    station = StationHome.resolve(str(home.path), KekSource(passphrase=PASSPHRASE))
    journal = open_journal(journal_at)
    try:
        with pytest.raises(_Killed):
            run_emulated(station, _DiesAt(journal, dies_at, 2),  # type: ignore[arg-type]
                         "terminals", RunOptions(station="s1", batch_units=1),
                         on_unit=None, interrupt=Interrupt())
    finally:
        journal.close()
    other = ok(home.run("campaign", "run", "terminals", "--station", "s2", "--quiet",
                        "--json", *where)).json()
    assert other["run"]["loads_done"] == 2  # the planned units; s1's claim is alive
    again = ok(home.run("campaign", "run", "terminals", "--station", "s1", "--quiet",
                        "--json", *where)).json()
    assert again["run"]["loads_done"] == 1 and again["status"]["done"]
    assert again["run"]["reconciled"] == (1 if dies_at == "imported" else 0)
    _check_units(home, 1, BDK, IDS, *where)
    recs = ok(home.run("authority", "exports", "--json")).json()["records"]
    assert len(recs) == (5 if dies_at == "exported" else 4)  # one unit exported twice
    js = ok(home.run("ledger", "verify", "--json", *where)).json()
    assert (js["invalid"], js["reconciled_without_receipt"]) == \
        (0, 1 if dies_at == "imported" else 0)
