"""AES DUKPT initial keys into cards over real PC/SC (pcscd + vpcd, the card an emulated
unit served by ``keyload unit serve-card``): ``keyload load --reader … --initial-key-id``
loads the IK derived for the SN the card answers, and ``campaign run --reader`` loads
each card with the IK of the ID its campaign planned for it. The IKs are checked by KCV
(the X9.24-3 supplement's IK; the others by ``core.dukpt``); what is refused stores and
exports nothing.

Needs pcscd, the vpcd driver and pyscard: skipped with the reason on a laptop without
them, a failure in CI."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from keyload.lab.pcscd import VPCD_PORTS, Pcscd
from keyload.transports.pcsc import CardTimeout, wait_for_card, wait_for_removal

from .cli_helpers import KEYLOAD, Result, aes_kcv, assert_error, ok, run
from .test_cards_identity import serving
from .test_cli_dukpt import BDK, IK, IK_ID
from .test_cli_dukpt_campaign import ik_kcv

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

UNIT_PORT = VPCD_PORTS[0]
EXIT_INPUT = 3



def _next_card(reader: str) -> None:
    """The next card the feeder inserts once the last one was powered off: pcscd polls
    every 400 ms, so it may still list the card just taken out; wait for the removal it
    sees (none when the next card came before its poll), then for a card."""
    with contextlib.suppress(CardTimeout):
        wait_for_removal(reader, 1)
    wait_for_card(reader, 10)

def _home(root: Path, serials: list[str]) -> tuple[str, str]:
    """A home with the vector's BDK (slot 1), a KEK (slot 2) and these units; its set id."""
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    ok(run("authority", "init", home=root))
    set_id: str = ok(run("set", "create", "--name", "terminals", "--json",
                         home=root)).json()["set_id"]
    for ref1, usage, exp, slot, value in (("BDK", "B0", "N", "1", BDK),
                                          ("KEK", "K0", "E", "2", bytes(16))):
        ok(run("key", "import", "--ref1", ref1, "--type", "aes128", "--usage", usage, "--mode",
               "X", "--exportability", exp, "--key-version", "1", "--sets", "any", "--slots", slot,
               home=root, input=value.hex() + "\n"))
    for sn in serials:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, "--slot", "1=aes128", "--slot",
               "2=aes128", home=root))
    return set_id, str(root)


@pytest.mark.slow
def test_cli_load_an_initial_key_into_the_card_in_a_reader(pcscd: Pcscd, tmp_path: Path) -> None:
    home = tmp_path / "home"
    sn = "7e200001"
    _home(home, [sn])

    def k(*args: str) -> Result:
        return run(*args, home=home)

    reader = pcscd.reader_for_port(UNIT_PORT)
    # a BDK's load without an ID: refused before the reader is opened (it is empty)
    assert_error(k("load", "--reader", reader, "--ref1", "BDK", "--ref2", "1"), EXIT_INPUT,
                 "give --initial-key-id")
    with serving(home, sn, times=3) as served:
        wait_for_card(reader, 10)
        # an ID for a key that is not a BDK: refused once the card told its SN, before
        # anything is exported
        assert_error(k("load", "--reader", reader, "--ref1", "KEK", "--ref2", "2",
                       "--initial-key-id", IK_ID), EXIT_INPUT, "not a BDK")
        _next_card(reader)
        assert_error(k("load", "--reader", reader, "--sn", "7e2000ff", "--ref1", "BDK",
                       "--ref2", "1", "--initial-key-id", IK_ID), EXIT_INPUT,
                     f"is unit {sn}, not 7e2000ff")
        _next_card(reader)
        out = ok(k("load", "--reader", reader, "--sn", sn, "--ref1", "BDK", "--ref2", "1",
                   "--initial-key-id", IK_ID, "--json")).json()
        stdout, _ = served.communicate(timeout=15)
        assert served.returncode == 0 and stdout.splitlines()[-1] == "3 units served"
    wait_for_removal(reader, 5)
    assert (out["sn"], out["ref2"], out["initial_key_id"], out["kcv"]) == \
        (sn, 1, IK_ID, aes_kcv(IK))
    slots = ok(k("unit", "status", "--sn", sn, "--json")).json()["slots"]
    assert [(s["state"], s["usage"], s["kcv"]) for s in slots] == \
        [("loaded", "B1", aes_kcv(IK)), ("empty", None, None)]
    recs = ok(k("authority", "exports", "--json")).json()["records"]
    assert [(r["sn"], r["ref1"], r["initial_key_id"], r["kcv"]) for r in recs] == \
        [(sn, "BDK", IK_ID, aes_kcv(IK))]
    assert ok(k("receipts")).last_line() == "1 receipt verified, 0 invalid"
    line = ok(k("load", "--sn", sn, "--ref1", "KEK", "--ref2", "2")).stdout
    assert "KEK v1 into unit" in line  # the same unit, emulated: its other slot as usual


@pytest.mark.slow
def test_cli_campaign_over_a_reader_loads_each_card_with_its_planned_id(
        pcscd: Pcscd, tmp_path: Path) -> None:
    home = tmp_path / "home"
    serials = ["7e300001", "7e300002"]
    ids = ["AABBCCDD00000009", IK_ID]
    set_id, _ = _home(home, serials)
    manifest = tmp_path / "cards.csv"
    manifest.write_text("sn,initial_key_id\n" + "".join(
        f"{sn},{i}\n" for sn, i in zip(serials, ids, strict=True)))

    def k(*args: str) -> Result:
        return run(*args, home=home)

    ok(k("campaign", "create", "cards", "--set", set_id, "--load", "BDK:1", "--manifest",
         str(manifest)))
    reader = pcscd.reader_for_port(UNIT_PORT)
    for n, sn in enumerate(serials, 1):  # a card at a time, a run for each
        with serving(home, sn):
            res = ok(k("campaign", "run", "cards", "--reader", reader, "--cards", "1",
                       "--quiet"))
        wait_for_removal(reader, 5)
        assert res.last_line() == f"{n} of 2 loads imported, 0 failed"
    for sn, i in zip(serials, ids, strict=True):
        slot = ok(k("unit", "status", "--sn", sn, "--json")).json()["slots"][0]
        assert (slot["usage"], slot["kcv"]) == ("B1", ik_kcv(BDK, i)), sn
    assert ik_kcv(BDK, IK_ID) == aes_kcv(IK)
    assert ok(k("ledger", "verify")).last_line() == "2 receipts verified, 0 invalid"
