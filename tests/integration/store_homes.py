"""A small keyload home made with the real CLI, for tests that damage or edit its stores.

Three emulated units of one set. A campaign ``spring`` loads TMK into slot 1 of all
three (``journal.db``); then ``keyload load`` puts PIN into slot 2 of units 1 and 2
(``station.db``), and a refused load (PIN into slot 1 of unit 3, which takes AES-256
only) leaves one export without a receipt. Every export is in ``authority/exports.db``
and the audit chain in ``audit.db``. Tests copy the home and change the copy.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from .cli_helpers import assert_error, ok, run

UNITS = ("0a0b0c0d01", "0a0b0c0d02", "0a0b0c0d03")
CAMPAIGN = "spring"
EXIT_REFUSED = 6


def make_home(home: Path) -> Path:
    ok(run("authority", "init", home=home))
    set_id = ok(run("set", "create", "--name", "A", "--json", home=home)).json()["set_id"]
    for ref1, type_, usage, mode, version in (("TMK", "aes256", "K0", "B", "1"),
                                              ("PIN", "aes128", "P0", "E", "3")):
        ok(run("key", "generate", "--ref1", ref1, "--type", type_, "--usage", usage,
               "--mode", mode, "--exportability", "E", "--key-version", version, "--sets", "any",
               "--slots", "any", home=home))
    for sn in UNITS:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes256",
               "--slot", "2=aes128", home=home))
    ok(run("campaign", "create", CAMPAIGN, "--set", set_id, "--load", "TMK:1", home=home))
    ok(run("campaign", "run", CAMPAIGN, "--station", "s1", home=home))
    for sn in UNITS[:2]:
        ok(run("load", "--sn", sn, "--ref1", "PIN", "--ref2", "2", home=home))
    assert_error(run("load", "--sn", UNITS[2], "--ref1", "PIN", "--ref2", "1", home=home),
                 EXIT_REFUSED, "6986")
    return home


def copy_home(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sql(path: Path, statement: str, *args: object) -> None:
    """Change a store behind keyload's back (committed, checkpointed into the file)."""
    db = sqlite3.connect(path)
    try:
        db.execute(statement, args)
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
