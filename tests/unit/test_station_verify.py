"""The ledgers as ``keyload ledger verify|export`` read, check and write them
(:mod:`keyload.station.verify`): the campaigns' check in words, the ledgers written as CSV
or JSON and counted, the service's state and the journal closed after the block."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from keyload.core.errors import StoreError
from keyload.records.ledger import LEDGER_FIELDS
from keyload.station.home import Home
from keyload.station.verify import CampaignsCheck, ledgers, write_ledgers
from keyload.units.storage import KekSource


def _row(sn: str) -> dict[str, object]:
    return {f: "" for f in LEDGER_FIELDS} | {"sn": sn}


def test_campaigns_check_in_words() -> None:
    bad = [{"campaign": "c1", "sn": "0a", "ref2": 2, "reason": "MAC"}]
    chk = CampaignsCheck(verified=3, invalid=1, reconciled=2, invalid_rows=list(bad),
                         auditor=True, unverifiable=4)
    assert chk.invalid_lines() == ["INVALID receipt: campaign c1 unit 0a slot 2: MAC"]
    assert chk.notes() == [
        "2 loads reconciled with the unit after a crash: receipt lost, slot status recorded",
        "4 receipts of suites 0x01/0x02 not verifiable without the authority (MACs under "
        "the set's keys)"]
    assert CampaignsCheck(verified=1).notes() == [] == CampaignsCheck().invalid_lines()


def test_write_ledgers_counts_each_source() -> None:
    out = io.StringIO()
    assert write_ledgers(out, "json", iter([_row("0a"), _row("0b")]), [_row("0c")]) == (2, 1)
    assert [e["sn"] for e in json.loads(out.getvalue())] == ["0a", "0b", "0c"]
    out = io.StringIO()
    assert write_ledgers(out, "csv", [], iter([_row("0c")])) == (0, 1)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["sn"] for r in rows] == ["0c"]


class _State:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_ledgers_close_the_state_and_read_no_journal_that_is_not_there(tmp_path: Path
                                                                       ) -> None:
    home = Home(tmp_path / "home", KekSource())
    home.ensure()
    st = _State()
    with ledgers(home, None, lambda: st) as (store, journal):
        assert store is st and journal is None and not st.closed
    assert st.closed
    with ledgers(home, None, lambda: None) as (store, journal):
        assert store is None and journal is None


def test_ledgers_refuse_a_home_that_does_not_exist(tmp_path: Path) -> None:
    home = Home(tmp_path / "typo", KekSource())
    with pytest.raises(StoreError), ledgers(home, None, lambda: None):
        pass
    assert not (tmp_path / "typo").exists()
