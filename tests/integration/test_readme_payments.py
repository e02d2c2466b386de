"""The README's worked examples for payment keys, run as printed through the console
script: its "Key blocks" session (a KBPK from components, the bank HSM's key block
imported, a key exported for backup) and its "AES DUKPT" session (a BDK, one terminal's
initial key, a campaign of terminals from the manifest shown, and the first PIN key of a
terminal checked). Each command is read from the README; its output must be the README's,
line for line, but for ``…`` (anything) and the values of a key generated at random (a
KCV, the key data of its block). The values the README shows are checked against the
published vectors: ASC X9 TR-31:2018 Annex A (version D) and the X9.24-3 supplement."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS

from .cli_helpers import KEYLOAD, Result, aes_kcv, ok, run
from .test_cli_dukpt_campaign import ik_kcv

pytestmark = pytest.mark.slow  # every step runs the console script

README = Path(__file__).resolve().parents[2] / "README.md"
TR31 = next(c for c in json.loads((VECTORS / "tr31" / "psec_tr31_tests.json").read_text())
            ["known_values"] if c["header"] == "D0112P0AE00E0000")  # TR-31:2018 Annex A
DUKPT: dict[str, Any] = json.loads(
    (VECTORS / "dukpt" / "aes128_x9_24_3_supplement.json").read_text())["aes128_bdk"]
KBPK = bytes.fromhex(TR31["kbpk"])
# the components the README's key ceremony types (their XOR is the Annex A KBPK)
COMPONENTS = [bytes(range(32)), bytes(a ^ b for a, b in zip(KBPK, range(32), strict=True))]
BDK = bytes.fromhex(DUKPT["bdk"])
HEX = re.compile(r"^[0-9A-Fa-f]{10,}$")


@dataclass
class Step:
    argv: list[str]
    expected: list[str]


def session(heading: str) -> list[Step]:
    """The first console block of the README's section ``## heading…``, as steps."""
    text = README.read_text()
    section = text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```console\n", 1)[1].split("\n```", 1)[0]
    steps: list[Step] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.startswith("$ "):
            steps[-1].expected.append(line)
            continue
        cmd = line[2:]
        while cmd.rstrip().endswith("\\"):
            cmd = cmd.rstrip()[:-1] + " " + next(lines).strip()
        steps.append(Step(shlex.split(re.sub(r"\s+#.*$", "", cmd)), []))
    return steps


def _same(want: str, got: str, *, random_key: bool) -> bool:
    """A line as the README prints it; ``…`` at its end: anything after; of a key made at
    random, its KCV (10 hex digits) any, its key block's header the same and its length."""
    if want.endswith("…"):
        return got.startswith(want[:-1])
    if not random_key:
        return want == got
    w, g = want.split(" "), got.split(" ")
    return len(w) == len(g) and all(
        a == b or (HEX.match(a) is not None and HEX.match(b) is not None and len(a) == len(b)
                   and (len(a) <= 32 or a[:16] == b[:16])) for a, b in zip(w, g, strict=True))


def check(step: Step, res: Result, *, random_key: bool = False) -> None:
    got = ok(res).stdout.splitlines()
    want = step.expected
    if "…" in want:  # anything (a progress line) up to the lines after it
        at = want.index("…")
        tail = want[at + 1:]
        want, got = want[:at] + tail, got[:at] + (got[len(got) - len(tail):] if tail else [])
    assert len(want) == len(got), (step.argv, got)
    for w, g in zip(want, got, strict=True):
        assert _same(w, g, random_key=random_key), (step.argv, w, g)


def test_the_readme_key_block_session(tmp_path: Path) -> None:
    """A bank's HSM hands PIN-2 over as the Annex A block under the KBPK assembled from
    two components; DEK-1, generated, is exported for backup, and the block opens."""
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    home = tmp_path / "home"
    ok(run("authority", "init", home=home))
    steps = session("Key blocks")
    inputs = {"BANK-KBPK": "".join(c.hex() + "\n" for c in COMPONENTS)}
    exported = ""
    for step in steps:
        assert step.argv[0] == "keyload", step.argv
        args = step.argv[1:]
        res = run(*args, home=home, input=inputs.get(args[args.index("--ref1") + 1]))
        check(step, res, random_key="DEK-1" in args)
        if args[:2] == ["key", "export"]:
            exported = res.stdout.strip()
    # the values printed are the published ones: the KBPK's and the block's key's KCVs
    assert f"KCV {aes_kcv(KBPK)}" in steps[0].expected[-1]
    assert [f"component {n} KCV  {aes_kcv(c)}" for n, c in enumerate(COMPONENTS, 1)] == \
        steps[0].expected[:2]
    assert TR31["key_block"] in steps[1].argv
    assert steps[1].expected == [f"key PIN-2: aes128, P0/E/E, version 3, KCV "
                                 f"{aes_kcv(bytes.fromhex(TR31['key']))}"]
    back = ok(run("key", "import", "--ref1", "DEK-2", "--tr31", exported, "--kbpk",
                  "BANK-KBPK", "--sets", "any", "--slots", "3", "--json", home=home)).json()
    keys = {k["ref1"]: k for k in ok(run("key", "list", "--json", home=home)).json()["keys"]}
    assert back["kcv"] == keys["DEK-1"]["kcv"] and keys["PIN-2"]["origin"] == "tr31"
    table = ok(run("key", "list", home=home)).stdout.splitlines()
    assert table[0].split()[-1] == "origin"
    origin = {line.split()[0]: line.split()[-1] for line in table[2:]}
    assert origin == {"BANK-KBPK": "-", "PIN-2": "tr31", "DEK-1": "-", "DEK-2": "tr31"}


def test_the_readme_dukpt_session(tmp_path: Path) -> None:
    """The BDK and the first terminal's ID are the X9.24-3 supplement's: the terminal's
    IK and its first PIN key have the published KCVs; the manifest's terminals hold the
    IKs of their IDs."""
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    home = tmp_path / "home"
    ok(run("authority", "init", home=home))
    set_id = ok(run("set", "create", "--name", "terminals", "--json",
                    home=home)).json()["set_id"]
    steps = session("AES DUKPT")
    shown_set = _shown_set(steps)
    terminals = ["7E000001", "7E000002", "7E000003"]
    for sn in terminals:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes128",
               home=home))
    manifest: list[str] = []
    for step in steps:
        if step.argv[0] == "cat":  # the file the README shows, written as shown
            (tmp_path / step.argv[1]).write_text("\n".join(step.expected) + "\n")
            manifest = step.expected[1:]
            continue
        args = [set_id if a == shown_set else a for a in step.argv[1:]]
        res = run(*args, home=home, cwd=tmp_path,
                  input=BDK.hex() + "\n" if args[:2] == ["key", "import"] else None)
        check(step, res)
    first = DUKPT["transactions"][0]
    derive = next(s for s in steps if s.argv[1:3] == ["dukpt", "derive"])
    assert derive.argv[derive.argv.index("--ksn") + 1] == first["ksn"]
    assert derive.expected[-1].endswith(f"KCV {aes_kcv(bytes.fromhex(first['pin_key_aes128']))}")
    single = next(s for s in steps if s.argv[1] == "load")
    assert single.argv[single.argv.index("--initial-key-id") + 1] == DUKPT["initial_key_id"]
    assert f"KCV {aes_kcv(bytes.fromhex(DUKPT['initial_key']))} " in single.expected[0]
    for line in manifest:
        sn, ik_id = line.split(",")
        slot = ok(run("unit", "status", "--sn", sn, "--json", home=home)).json()["slots"][0]
        assert (slot["usage"], slot["kcv"]) == ("B1", ik_kcv(BDK, ik_id)), sn


def _shown_set(steps: list[Step]) -> str:
    """The set id the README's session names (the test's own set takes its place)."""
    for s in steps:
        for flag in ("--set", "--sets"):
            if flag in s.argv:
                return s.argv[s.argv.index(flag) + 1]
    raise AssertionError("the session names no set")
