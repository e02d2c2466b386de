"""Key rotation end to end through the console script: ``key rotate`` makes the next
version and keeps the older ones, ``campaign create --rotate`` plans exactly the units
whose slot holds an older version, a run killed part-way resumes, the units' slots hold
the new KCV and the ledger shows both versions; and what is refused leaves state as it
was."""

from __future__ import annotations

import hashlib
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psec.tr31
import pytest

from .cli_helpers import KEYLOAD, Result, aes_kcv, assert_error, cli_env, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script (a process each)

EXIT_INPUT, EXIT_WRONG_SECRET, EXIT_REFUSED = 3, 5, 6
UNITS = [f"c0ffee{i:02x}" for i in range(12)]
FIRST = UNITS[:8]  # loaded v1 by the first campaign
SINGLE = UNITS[8]  # loaded v1 by a single load
CURRENT = UNITS[9]  # loaded v1, then v2 by single loads before the rotation campaign
NEVER = UNITS[10:]  # never loaded
KEY_OPTS = ["--type", "aes256", "--usage", "K0", "--mode", "B", "--exportability", "E"]


def _home(root: Path) -> str:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    ok(run("authority", "init", home=root))
    set_id: str = ok(run("set", "create", "--name", "A", "--json", home=root)).json()["set_id"]
    ok(run("key", "generate", "--ref1", "ROT", *KEY_OPTS, "--key-version", "1", "--sets", set_id,
           "--slots", "1,2", "--label", "zone key", home=root))
    for sn in UNITS:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes256",
               home=root))
    return set_id


def _digests(root: Path) -> dict[str, str]:
    """Every file of the home but the audit log's, by its SHA-256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "-wal" not in p.name
            and "-shm" not in p.name}


def _slot(root: Path, sn: str) -> dict[str, Any]:
    st = ok(run("unit", "status", "--sn", sn, "--json", home=root)).json()
    slot: dict[str, Any] = next(s for s in st["slots"] if s["ref2"] == 1)
    return slot


def _imported(root: Path, campaign: str) -> int:
    db = sqlite3.connect(root / "journal.db")
    try:
        n: int = db.execute("SELECT count(*) FROM loads WHERE campaign = ? AND state = "
                            "'imported'", (campaign,)).fetchone()[0]
        return n
    finally:
        db.close()


def _killed_part_way(root: Path, campaign: str) -> None:
    """``campaign run`` killed (SIGKILL) once it has journaled its first import."""
    out = root.parent / f"{campaign}.out"
    with out.open("wb") as fo:
        p = subprocess.Popen([str(KEYLOAD), "campaign", "run", campaign, "--batch", "1",
                              "--quiet", "--home", str(root)], stdin=subprocess.DEVNULL,
                             stdout=fo, stderr=subprocess.STDOUT, env=cli_env())
        try:
            deadline = time.monotonic() + 120
            while p.poll() is None and _imported(root, campaign) < 1:
                assert time.monotonic() < deadline, "no load journaled in 120 s"
                time.sleep(0.002)
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, dict[str,
                                                                                       Any]]]:
    """v1 loaded by a campaign and single loads, rotated to v2, the rotation planned."""
    root = tmp_path_factory.mktemp("rotate") / "home"
    set_id = _home(root)
    manifest = root.parent / "first.csv"
    manifest.write_text("sn\n" + "\n".join(FIRST) + "\n")
    ok(run("campaign", "create", "first", "--set", set_id, "--load", "ROT:1", "--manifest",
           manifest, home=root))
    ok(run("campaign", "run", "first", "--quiet", home=root))
    for sn in (SINGLE, CURRENT):
        ok(run("load", "--sn", sn, "--ref1", "ROT", "--ref2", "1", home=root))
    v1 = ok(run("key", "list", "--json", home=root)).json()["keys"][0]
    rot = ok(run("key", "rotate", "--ref1", "ROT", "--json", home=root)).json()
    ok(run("load", "--sn", CURRENT, "--ref1", "ROT", "--ref2", "1", home=root))
    plan = ok(run("campaign", "create", "r2", "--set", set_id, "--rotate", "ROT", "--json",
                  home=root)).json()
    yield root, set_id, {"v1": v1, "v2": rot, "plan": plan}


def test_rotate_makes_the_next_version_and_keeps_the_older(
        rotated: tuple[Path, str, dict[str, Any]]) -> None:
    root, set_id, facts = rotated
    v1, v2 = facts["v1"], facts["v2"]
    assert (v1["version"], v2["version"]) == (1, 2) and v1["kcv"] != v2["kcv"]
    same = ("type", "length", "usage", "mode", "exportability", "policy", "diversify", "label")
    assert {k: v2[k] for k in same} == {k: v1[k] for k in same}
    assert v2["policy"] == {"sets": [set_id], "slots": [1, 2]} and v2["label"] == "zone key"
    keys = ok(run("key", "list", "--json", home=root)).json()["keys"]
    assert [(k["ref1"], k["version"], k["current"], k["kcv"]) for k in keys] == \
        [("ROT", 1, False, v1["kcv"]), ("ROT", 2, True, v2["kcv"])]
    table = ok(run("key", "list", home=root)).stdout.splitlines()
    assert table[0].split()[5:7] == ["version", "current"]
    assert [ln.split()[5:7] for ln in table[2:]] == [["1", "no"], ["2", "yes"]]
    # an export sends the newest version: the single load after the rotation got v2
    assert (_slot(root, CURRENT)["version"], _slot(root, CURRENT)["kcv"]) == (2, v2["kcv"])


def test_rotation_campaign_plans_the_units_on_the_older_version(
        rotated: tuple[Path, str, dict[str, Any]]) -> None:
    root, _, facts = rotated
    plan = facts["plan"]
    assert (plan["campaign"], plan["units"], plan["rotate"], plan["to_version"]) == \
        ("r2", 9, "ROT", 2)
    assert plan["held"] == {"1": 9}
    st = ok(run("campaign", "status", "r2", "--json", home=root)).json()
    assert [(p["ref1"], p["ref2"], p["version"]) for p in st["plan"]] == [("ROT", 1, 2)]
    db = sqlite3.connect(root / "journal.db")
    try:
        planned = sorted(sn for (sn,) in db.execute(
            "SELECT sn FROM loads WHERE campaign = 'r2'"))
    finally:
        db.close()
    assert planned == sorted([*FIRST, SINGLE])  # not CURRENT (v2), not NEVER (no ROT)


def test_rotation_run_killed_then_resumed(rotated: tuple[Path, str, dict[str, Any]]) -> None:
    root, set_id, facts = rotated
    v2 = facts["v2"]["kcv"]
    # one planned unit gets v2 by a single load after the plan: the run counts it done
    ok(run("load", "--sn", FIRST[-1], "--ref1", "ROT", "--ref2", "1", home=root))
    _killed_part_way(root, "r2")
    assert 1 <= _imported(root, "r2") < 9
    res = ok(run("campaign", "run", "r2", "--json", "--quiet", home=root)).json()
    assert res["run"]["loads_failed"] == 0
    assert res["status"]["states"] == {"planned": 0, "claimed": 0, "exported": 0,
                                       "imported": 9, "failed": 0}
    db = sqlite3.connect(root / "journal.db")
    try:  # the unit loaded meanwhile refused the load (6986): done, on its slot's word
        assert db.execute("SELECT state, reconciled, sw FROM loads WHERE campaign = 'r2' "
                          "AND sn = ?", (FIRST[-1],)).fetchone() == ("imported", 1, None)
    finally:
        db.close()
    for sn in [*FIRST, SINGLE, CURRENT]:
        slot = _slot(root, sn)
        assert (slot["state"], slot["version"], slot["kcv"]) == ("loaded", 2, v2), sn
    for sn in NEVER:
        assert _slot(root, sn)["state"] == "empty"
    ledger = ok(run("ledger", "export", "--format", "json", home=root)).json()
    versions: dict[str, set[int]] = {}
    for e in ledger:
        assert e["ref1"] == "ROT" and e["set_id"] == set_id
        versions.setdefault(e["sn"], set()).add(e["key_version"])
        assert e["kcv"] == (v2 if e["key_version"] == 2 else facts["v1"]["kcv"])
    assert {sn: versions[sn] for sn in FIRST} == {sn: {1, 2} for sn in FIRST}
    assert versions[SINGLE] == {2}  # its v1 was a single load (station records)
    csv_text = ok(run("ledger", "export", "--format", "csv", home=root)).stdout
    assert {ln.split(",")[4] for ln in csv_text.splitlines()[1:]} == {"1", "2"}
    # nobody holds an older version now: a new rotation campaign is refused, nothing made
    before = _digests(root)
    assert_error(run("campaign", "create", "r3", "--set", set_id, "--rotate", "ROT",
                     home=root), EXIT_INPUT, "nothing to rotate")
    assert _digests(root) == before
    ok(run("receipts", home=root))
    # planned again with --load over units that hold it: each refuses (6986) the very key
    # it holds, and is counted done, not failed
    again = root.parent / "again.csv"
    again.write_text("sn\n" + "\n".join(FIRST[:2]) + "\n")
    ok(run("campaign", "create", "again", "--set", set_id, "--load", "ROT:1", "--manifest",
           again, home=root))
    out = ok(run("campaign", "run", "again", "--json", "--quiet", home=root)).json()
    assert (out["run"]["loads_done"], out["run"]["reconciled"], out["run"]["loads_failed"]) \
        == (2, 2, 0)


def test_refusals_leave_state_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "home"
    set_id = _home(root)
    ok(run("key", "import", "--ref1", "BDK", "--type", "aes128", "--usage", "B0", "--mode",
           "X", "--exportability", "N", "--key-version", "1", "--sets", "any", "--slots", "3",
           home=root, input="33" * 16 + "\n"))
    before = _digests(root)
    assert_error(run("key", "rotate", "--ref1", "NOPE", home=root), EXIT_REFUSED, "NOPE")
    assert_error(run("key", "rotate", "--ref1", "BDK", home=root), EXIT_INPUT, "BDK",
                 "not rotated")
    assert_error(run("key", "rotate", "--ref1", "ROT", home=root, passphrase="wrong"),
                 EXIT_WRONG_SECRET)
    assert_error(run("key", "rotate", "--ref1", "ROT", "--key-version", "1", home=root),
                 EXIT_INPUT, "higher version")
    # nobody loaded: an empty plan is refused and no journal is made
    assert_error(run("campaign", "create", "r", "--set", set_id, "--rotate", "ROT",
                     home=root), EXIT_INPUT, "nothing to rotate")
    assert_error(run("campaign", "create", "r", "--set", set_id, "--rotate", "ROT",
                     home=root, passphrase="wrong"), EXIT_WRONG_SECRET)
    for both in (("--load", "ROT:1"), ("--initial-key-id-base", "00" * 8)):
        res = run("campaign", "create", "r", "--set", set_id, "--rotate", "ROT", *both,
                  home=root)
        assert res.rc == 2 and "--rotate REF1" in res.stderr, res.describe()
    assert _digests(root) == before and not (root / "journal.db").exists()


def test_rotate_takes_the_value_as_key_import_does(tmp_path: Path) -> None:
    """A typed value, components, or (``key generate``) a higher version of a REF1."""
    root = tmp_path / "home"
    _home(root)
    value = bytes(range(32))
    out = ok(run("key", "rotate", "--ref1", "ROT", "--typed", "--json", home=root,
                 input=value.hex() + "\n")).json()
    assert (out["version"], out["kcv"]) == (2, aes_kcv(value))
    parts = [b"\x11" * 32, b"\x22" * 32]
    out = ok(run("key", "rotate", "--ref1", "ROT", "--components", "2", "--key-version", "7",
                 "--json", home=root, input="".join(p.hex() + "\n" for p in parts))).json()
    assert (out["version"], out["kcv"]) == (7, aes_kcv(b"\x33" * 32))
    ok(run("key", "generate", "--ref1", "ROT", *KEY_OPTS, "--key-version", "8", "--sets", "any",
           "--slots", "1", home=root))
    # a key block under a KBPK: the header gives the version (09) and attributes
    kbpk, key = b"\x44" * 32, b"\x55" * 32
    ok(run("key", "import", "--ref1", "KBPK", "--type", "aes256", "--usage", "K1", "--mode",
           "B", "--exportability", "N", "--key-version", "1", "--sets", "any", "--slots", "9",
           home=root, input=kbpk.hex() + "\n"))
    block = psec.tr31.wrap(kbpk, psec.tr31.Header("D", "K0", "A", "E", "09", "E"), key)
    out = ok(run("key", "rotate", "--ref1", "ROT", "--tr31", block, "--kbpk", "KBPK",
                 "--json", home=root)).json()
    assert (out["version"], out["mode"], out["kcv"], out["origin"]) == \
        (9, "E", aes_kcv(key), "tr31")
    keys = [k for k in ok(run("key", "list", "--json", home=root)).json()["keys"]
            if k["ref1"] == "ROT"]
    assert [(k["version"], k["current"]) for k in keys] == \
        [(1, False), (2, False), (7, False), (8, False), (9, True)]
    assert keys[-1]["policy"] == {"sets": "any", "slots": [1]}  # the generated v8's


def _readme_session() -> list[tuple[str, list[str]]]:
    """The README's "Rotating a key" commands, each with the lines it prints."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("### Rotating a key")
    block = text[text.index("```console", start) + 10:text.index("```\n", start + 20)]
    steps: list[tuple[str, list[str]]] = []
    for line in block.strip("\n").splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.startswith("      ") and steps and not steps[-1][1]:
            steps[-1] = (steps[-1][0].rstrip("\\ ") + " " + line.strip(), [])
        else:
            steps[-1][1].append(line)
    return steps


def test_the_readme_rotation_session_runs(tmp_path: Path) -> None:
    """Every command of the README's section runs in a home made as its worked session
    (the set id and KCVs are this home's), and prints what the README shows, KCVs aside."""
    root = tmp_path / "home"
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    ok(run("authority", "init", "--signing-key", home=root))
    set_id = ok(run("set", "create", "--name", "operator-a", "--json", home=root)).json()[
        "set_id"]
    ok(run("key", "generate", "--ref1", "TMK-1", *KEY_OPTS, "--key-version", "1", "--diversify",
           "--sets", set_id, "--slots", "1", home=root))
    ok(run("key", "import", "--ref1", "PIN-1", "--type", "aes128", "--usage", "P0", "--mode",
           "E", "--exportability", "N", "--key-version", "3", "--sets", "any", "--slots", "2",
           home=root, input="00112233445566778899aabbccddeeff\n"))
    ok(run("unit", "create", "--set", set_id, "--sn", "0A0B0C0D01", "--slot", "1=aes256",
           "--slot", "2=aes128", "--slot", "3=aes256", "--lock", "3", home=root))
    for ref1, ref2 in (("TMK-1", "1"), ("PIN-1", "2")):
        ok(run("load", "--sn", "0A0B0C0D01", "--ref1", ref1, "--ref2", ref2, home=root))
    kcv = re.compile(r"\b[0-9A-F]{10}\b")

    def plain(lines: list[str]) -> list[str]:
        return [kcv.sub("KCV", ln.replace(set_id, "7b568eb721")).rstrip() for ln in lines]

    steps = _readme_session()
    assert [c.split()[1:3] for c, _ in steps] == [
        ["key", "rotate"], ["key", "list"], ["campaign", "create"], ["campaign", "run"],
        ["unit", "status"], ["campaign", "create"]]
    for command, shown in steps:
        argv = command.replace("7b568eb721", set_id).split()
        res: Result = run(*argv[1:], home=root)
        if shown[0].startswith("keyload: error: "):
            assert res.rc == EXIT_INPUT and plain(res.stderr.splitlines()) == plain(shown), \
                res.describe()
            continue
        got, want = plain(ok(res).stdout.splitlines()), plain(shown)
        if "…" in want:
            want = want[want.index("…") + 1:]
            got = got[-len(want):]
        assert got == want, res.describe()


@pytest.mark.hardware
def test_a_token_refuses_a_new_version_plainly(tmp_path: Path) -> None:
    """A PKCS#11 token keeps one version of a key: ``key rotate`` and ``key generate`` of
    an existing REF1 are refused (exit 3), naming why; the token's keys stay as they were."""
    import importlib.util

    from keyload.lab.softhsm import make_token, softhsm_available, softhsm_missing_reason

    from ..conftest import require

    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    require(importlib.util.find_spec("pkcs11") is not None, "python-pkcs11 is not installed")
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    pin = "35792468"
    token = make_token(tmp_path / "softhsm", label="keyload-rot", user_pin=pin, activate=False)
    env = {"KEYLOAD_PKCS11_PIN": pin, "SOFTHSM2_CONF": str(token.conf)}
    home = tmp_path / "home"
    ok(run("authority", "init", "--pkcs11", token.module, "--token", token.label, home=home,
           env_extra=env))
    gen = ("key", "generate", "--ref1", "ROT", *KEY_OPTS, "--sets", "any", "--slots", "1")
    ok(run(*gen, "--key-version", "1", home=home, env_extra=env))
    before = ok(run("key", "list", "--json", home=home, env_extra=env)).json()
    for argv in (("key", "rotate", "--ref1", "ROT"), (*gen, "--key-version", "2")):
        assert_error(run(*argv, home=home, env_extra=env), EXIT_INPUT, "PKCS#11 token keeps "
                     "one version", "README: rotating a key")
    assert ok(run("key", "list", "--json", home=home, env_extra=env)).json() == before
