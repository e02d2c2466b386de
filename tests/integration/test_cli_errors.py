"""Errors through the console script: a command that only reads creates nothing, bad
input is refused at the command, each failure has its class's exit code and one line
on standard error that names what is wrong (a file, an option, a host), never a
traceback, and the files on disk are left as they were.
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD, assert_error, ok, run

EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE = 3, 4, 5

SN = "0a0b0c0d01"


@dataclass(frozen=True)
class Home:
    root: Path
    set_id: str


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """An authority with one set, a key TMK (set A, slot 1 only) and one unit."""
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    root = tmp_path_factory.mktemp("cli-errors") / "home"
    ok(run("authority", "init", home=root))
    set_id = ok(run("set", "create", "--name", "A", "--json", home=root)).json()["set_id"]
    ok(run("key", "generate", "--ref1", "TMK", "--type", "aes256", "--usage", "K0",
           "--mode", "B", "--exportability", "E", "--version", "1", "--sets", set_id,
           "--slots", "1", home=root))
    ok(run("unit", "create", "--set", set_id, "--sn", SN, "--slot", "1=aes256", "--slot",
           "2=aes256", home=root))
    return Home(root, set_id)


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and its mode."""
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- item 11: a command that reads creates nothing -------------------------------------
READERS = [
    pytest.param(("campaign", "status"), id="campaign-status"),
    pytest.param(("campaign", "report", "c1", "--out", "rep"), id="campaign-report"),
    pytest.param(("ledger", "verify"), id="ledger-verify"),
    pytest.param(("ledger", "export"), id="ledger-export"),
]


@pytest.mark.parametrize("args", READERS)
@pytest.mark.parametrize("content", [b"hello, not a journal\n", b""], ids=["text", "empty"])
def test_journal_option_on_a_file_that_is_not_a_journal(tmp_path: Path, args: tuple[str, ...],
                                                         content: bytes) -> None:
    """``--journal notes.txt``: refused, naming it; its bytes and mode are left alone."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    notes.chmod(0o644)
    (tmp_path / "h").mkdir()
    res = run(*args, "--journal", notes, home=tmp_path / "h", cwd=tmp_path)
    assert_error(res, EXIT_STORE, str(notes), "not a campaign journal")
    assert notes.read_bytes() == content
    assert stat.S_IMODE(notes.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "notes.txt"]
    assert list((tmp_path / "h").iterdir()) == []


@pytest.mark.parametrize("args", READERS)
def test_journal_option_on_another_database_leaves_it_as_it_was(home: Home, tmp_path: Path,
                                                               args: tuple[str, ...]) -> None:
    """A SQLite file that is not a journal (the audit log) is not given the journal's
    tables by being read."""
    other = tmp_path / "audit-copy.db"
    src, dst = sqlite3.connect(home.root / "audit.db"), sqlite3.connect(other)
    src.backup(dst)
    src.close()
    dst.close()
    before = files(tmp_path)
    res = run(*args, "--journal", other, home=home.root, cwd=tmp_path)
    assert_error(res, EXIT_STORE, str(other), "not a campaign journal")
    assert files(tmp_path) == before


@pytest.mark.parametrize("args", READERS)
def test_journal_option_naming_no_file(home: Home, tmp_path: Path,
                                       args: tuple[str, ...]) -> None:
    before = files(home.root)
    res = run(*args, "--journal", tmp_path / "typo.db", home=home.root, cwd=tmp_path)
    assert_error(res, EXIT_STORE, "typo.db")
    assert list(tmp_path.iterdir()) == [] and files(home.root) == before


@pytest.mark.parametrize("action", ["verify", "export"])
def test_ledger_in_a_home_without_a_journal_creates_none(home: Home, action: str) -> None:
    """No campaign was ever created here: the campaigns' ledger is empty, and no
    ``journal.db`` is left behind by reading it."""
    assert not (home.root / "journal.db").exists()
    before = files(home.root)
    res = ok(run("ledger", action, home=home.root))
    if action == "verify":
        assert res.stdout.splitlines()[0] == "campaign ledger: 0 receipts verified, 0 invalid"
    assert not (home.root / "journal.db").exists()
    assert {k: v for k, v in files(home.root).items() if not k.startswith("audit.db")} == \
        {k: v for k, v in before.items() if not k.startswith("audit.db")}


@pytest.mark.parametrize("args", [
    pytest.param(("campaign", "status"), id="campaign-status"),
    pytest.param(("campaign", "report", "c1", "--out", "rep"), id="campaign-report"),
    pytest.param(("ledger", "verify"), id="ledger-verify"),
    pytest.param(("ledger", "export", "--out", "l.csv"), id="ledger-export"),
    pytest.param(("unit", "list"), id="unit-list"),
    pytest.param(("unit", "status", "--sn", SN), id="unit-status"),
    pytest.param(("receipts",), id="receipts"),
    pytest.param(("audit", "verify"), id="audit-verify"),
    pytest.param(("authority", "exports"), id="authority-exports"),
    pytest.param(("authority", "show"), id="authority-show"),
    pytest.param(("key", "list"), id="key-list"),
    pytest.param(("set", "list"), id="set-list"),
])
def test_every_reading_command_on_a_missing_home_creates_nothing(tmp_path: Path,
                                                                 args: tuple[str, ...]
                                                                 ) -> None:
    res = run(*args, home=tmp_path / "typo", cwd=tmp_path)
    assert_error(res, EXIT_STORE, "typo")
    assert list(tmp_path.iterdir()) == []


# -- item 12: input refused at the command ---------------------------------------------
def _key(ref1: str, usage: str, sets: str) -> list[str]:
    return ["key", "generate", "--ref1", ref1, "--type", "aes128", "--usage", usage, "--mode",
            "E", "--exportability", "N", "--version", "1", "--sets", sets, "--slots", "any"]


@pytest.mark.parametrize("usage", ["ZZ", "K9", "00", "k0", "S0"])
def test_key_usage_outside_the_accepted_list_is_refused(home: Home, usage: str) -> None:
    """Usage is an ANSI X9.143 key usage for a symmetric key (the README's list);
    anything else (an unassigned code, lower case, an asymmetric key's usage) is
    refused and nothing is stored."""
    before = files(home.root)
    res = run(*_key("ODD", usage, "any"), home=home.root)
    line = assert_error(res, EXIT_INPUT, f"--usage {usage!r}", "K0", "P0", "M7")
    assert "README" in line
    assert files(home.root) == before


@pytest.mark.parametrize("usage", ["B0", "D0", "K1", "P0", "V2", "E6", "I0", "C0"])
def test_key_usage_in_the_accepted_list_is_taken(home: Home, tmp_path: Path,
                                                 usage: str) -> None:
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(home.root, copy)
    ok(run(*_key("U" + usage, usage, "any"), home=copy))
    got = {k["ref1"]: k["usage"] for k in ok(run("key", "list", "--json", home=copy)).json()}
    assert got["U" + usage] == usage


def test_campaign_create_with_a_load_the_key_policy_forbids(home: Home) -> None:
    """TMK may go to slot 1 only: a plan that puts it in slot 2 would be refused by the
    authority (6986) for every unit; it is refused at the command, naming the key, the
    slot and the policy, and no journal is written."""
    before = files(home.root)
    res = run("campaign", "create", "c2", "--set", home.set_id, "--load", "TMK:2",
              home=home.root)
    assert_error(res, EXIT_INPUT, "TMK", "slot 2", "policy", f"{home.set_id}; 1")
    assert files(home.root) == before


def test_campaign_create_for_a_set_the_key_policy_forbids(home: Home, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(home.root, copy)
    other = ok(run("set", "create", "--name", "B", "--json", home=copy)).json()["set_id"]
    before = files(copy)
    res = run("campaign", "create", "c3", "--set", other, "--load", "TMK:1", home=copy)
    assert_error(res, EXIT_INPUT, "TMK", f"set {other}", "policy")
    assert files(copy) == before


def test_the_accepted_key_usages_are_the_readme_list(home: Home) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("`--usage` is an ANSI X9.143")
    listed = readme[start:readme.index("`", readme.index("one of: `", start) + 9)]
    listed = listed[listed.index("one of: `") + 9:]
    line = assert_error(run(*_key("ODD", "ZZ", "any"), home=home.root), EXIT_INPUT)
    accepted = line[line.index("accepted: ") + 10:line.index(" (README")]
    assert accepted.split() == listed.split()
    assert {"K0", "P0", "M7", "D0", "B0"} <= set(accepted.split())
