"""Campaign journal costs, measured in one run.

Run ``python benchmarks/campaign.py [--units N] [--plan-loads N] [--json]``:

1. loads/s of a campaign with the SQLite journal (claims, exported and imported rows,
   receipts) beside the same loads without a journal (``customize``), both over the
   same kind of in-memory units and software authority; ratio journal/bare (target at
   least 0.50);
2. planning a campaign of ``--plan-loads`` loads (default 1,000,000): time, and the peak
   RSS of the planning process (run in a child process, so nothing else counts; target
   flat memory, under 300 MB);
3. resuming that campaign (half of it already imported): time from the start of a run
   (journal opened, claims) to the first new load journaled (target under 5 s).

The last line is ``resume to first new load: X.XX s`` (``--json``: one object, nothing
after it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.station.campaign import RunOptions, run_campaign
from keyload.station.customize import customize
from keyload.station.journal.model import (
    IMPORTED,
    Campaign,
    LoadRow,
    PlannedLoad,
)
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.load import AuthorityClient
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState


def _world(units: int) -> tuple[AuthorityClient, bytes, list[Unit]]:
    ks = SoftwareKeystore.ephemeral()
    set_id = ks.generate_set("bench").set_id
    pol = ExportPolicy(None, None)
    ks.generate_key(b"K1", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=pol)
    ks.generate_key(b"K2", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                    diversify=False, policy=pol)
    t = ks.transport_key_copy(set_id)
    fleet = [Unit(MemoryUnitStore(UnitState.new(
        i.to_bytes(8, "big"), Secret(t.buffer),
        {1: Slot(1, frozenset({3})), 2: Slot(2, frozenset({1}))}))) for i in range(units)]
    authority = Authority(ks)
    return AuthorityClient(LocalConnection(authority), suites=frozenset({1, 2})), set_id, fleet




class _Src:
    def __init__(self, unit: Unit) -> None:
        self.unit = unit

    @property
    def label(self) -> str:
        return self.unit.sn.hex()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        yield LocalConnection(self.unit)


def bench_journal(units: int) -> dict[str, float]:
    plan = [(b"K1", 1), (b"K2", 2)]
    client, _, fleet = _world(units)
    t0 = time.perf_counter()
    s = customize([_Src(u) for u in fleet], plan, client)
    bare = time.perf_counter() - t0
    assert s.loads_ok == 2 * units

    client, set_id, fleet = _world(units)
    by_sn = {u.sn: u for u in fleet}
    with tempfile.TemporaryDirectory() as d:
        j = SqliteJournal(Path(d) / "journal.db")
        camp = Campaign("bench", set_id, time.time(),
                        (PlannedLoad(b"K1", 1, 1), PlannedLoad(b"K2", 2, 1)), {}, units)
        j.create_campaign(camp, (u.sn for u in fleet))

        @contextmanager
        def connect(sn: bytes) -> Iterator[Connection]:
            yield LocalConnection(by_sn[sn])

        t0 = time.perf_counter()
        r = run_campaign(j, "bench", client, connect, RunOptions(station="bench"))
        journaled = time.perf_counter() - t0
        assert r.loads_done == 2 * units and j.counts("bench")[IMPORTED] == 2 * units
        j.close()
    return {"bare_loads_per_s": 2 * units / bare, "journal_loads_per_s": 2 * units / journaled}


def _plan_child(path: str, loads: int) -> None:
    """Child process: plan ``loads`` loads (2 per unit) and report time and peak RSS."""
    j = SqliteJournal(Path(path))
    units = loads // 2
    camp = Campaign("big", bytes(5), time.time(),
                    (PlannedLoad(b"K1", 1, 1), PlannedLoad(b"K2", 2, 1)), {}, units)
    t0 = time.perf_counter()
    j.create_campaign(camp, (i.to_bytes(8, "big") for i in range(units)))
    dt = time.perf_counter() - t0
    j.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"plan_s": dt, "plan_peak_rss_mb": rss_mb}))


def bench_plan_and_resume(loads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "big.db")
        out = subprocess.run([sys.executable, __file__, "--plan-child", path, str(loads)],
                             capture_output=True, text=True, check=True)
        res: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        # half of the campaign done, as after a long run that was stopped
        j = SqliteJournal(Path(path))
        j.db.execute("UPDATE loads SET state = 'imported' WHERE seq < ?", (loads // 4,))
        j.close()
        client, _, fleet = _world(1)
        unit_t = fleet[0].state.t

        first: list[float] = []

        class _Probe(SqliteJournal):
            def imported(self, row: LoadRow, **kw: Any) -> None:
                if not first:
                    first.append(time.perf_counter())
                    raise KeyboardInterrupt  # one new load is enough
                super().imported(row, **kw)

        @contextmanager
        def connect(sn: bytes) -> Iterator[Connection]:
            u = Unit(MemoryUnitStore(UnitState.new(
                sn, Secret(unit_t.buffer),
                {1: Slot(1, frozenset({3})), 2: Slot(2, frozenset({1}))})))
            yield LocalConnection(u)

        t0 = time.perf_counter()
        j2 = _Probe(Path(path))
        # the set of this synthetic campaign is the benchmark authority's set
        j2.db.execute("UPDATE campaigns SET set_id = ?", (fleet[0].state.set_id.hex(),))
        run_campaign(j2, "big", client, connect, RunOptions(station="bench"))
        j2.close()
        res["resume_first_load_s"] = first[0] - t0 if first else float("nan")
        res["plan_loads"] = loads
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=3000)
    ap.add_argument("--plan-loads", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plan-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_child:
        _plan_child(args.plan_child[0], int(args.plan_child[1]))
        return
    out: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    out.update(bench_journal(args.units))
    out["ratio_journal_bare"] = out["journal_loads_per_s"] / out["bare_loads_per_s"]
    out.update(bench_plan_and_resume(args.plan_loads))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"python {out['python']}, {out['cpus']} cpus")
    print(f"loads without a journal: {out['bare_loads_per_s']:,.0f} loads/s")
    print(f"loads with the SQLite journal: {out['journal_loads_per_s']:,.0f} loads/s")
    print(f"ratio journal/bare: {out['ratio_journal_bare']:.2f} (target >= 0.50)")
    print(f"plan {args.plan_loads:,} loads: {out['plan_s']:.2f} s, peak RSS "
          f"{out['plan_peak_rss_mb']:.0f} MB (target < 300 MB)")
    print(f"resume to first new load: {out['resume_first_load_s']:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
