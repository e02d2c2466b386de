"""PC/SC throughput: KLP1 loads into virtual cards through pcscd and the vpcd readers.

Run ``python benchmarks/pcsc.py [--seconds S] [--fed N] [--json]``. It starts pcscd with
the vpcd readers (or reuses a running one, see ``keyload.lab.pcscd.running_pcscd``),
uses the readers alone for its duration, and at the end removes every card and stops the
pcscd it started. Without pyscard, the vpcd driver or pcscd (``pcsc_available()``) it
says why and exits with status 0.

The authority is ``Authority(SoftwareKeystore.ephemeral())`` in this process (unsigned
set, AES-256 key, not diversified; behind a lock, as the keystore is not thread-safe); the
units are keyload's emulated units (``Unit`` over ``MemoryUnitStore``, one empty slot
accepting the key), each served as a virtual card (``VirtualCard`` / ``CardFeeder``) in a
vpcd reader; the station is ``customize`` with ``load_key``, one load per unit.

(a) APDU round trip: GET SLOT STATUS (``80 16 00 01 00``) to a unit card after SELECT,
    over ``PcscConnection`` (pyscard ``SCardTransmit`` -> pcscd -> vpcd -> TCP -> card),
    best of 3 runs; the unit's own ``process_apdu`` time is shown for scale;
(b) APDUs per load after SELECT, counted by wrapper connections on both sides (unit and
    authority), for 4 loads into one unit after one SELECT; and the unit's own count of
    commands on its wire (no GET RESPONSE, no chaining over T=1);
(c) units/s fed through one reader with removal, as a personalization machine feeds
    cards (``CardFeeder(remove=True)`` + ``cards_in_reader``): ``--fed`` cards (default
    6), timed from the feeder's start to the last unit done; bound by pcscd, which polls a
    vpcd reader every 400 ms to see a removal and an insertion (about 1.3 units/s);
(d) units/s with cards swapped in place (``CardFeeder(remove=False)``,
    ``cards_in_reader(expect_removal=False)``): the next card takes the place of the last
    one on the same vpcd connection, so no polling is waited for and the APDU path is what
    is measured: through one reader (one station thread), and through two readers (two
    station threads, one per reader, one authority). Timed from the first card present in
    every reader to the last unit done (units made beforehand, as setup); the count per
    reader is set from a warm-up run to last about ``--seconds`` (default 1.5); best of 3
    runs, one and two readers taking turns.

Every load is checked (every unit customized, its slot loaded). Issue targets, printed
with the figures: 3 APDUs per load after SELECT; at least 1,000 units/s over two readers.
The last line printed is always ``units/s over two readers: N`` (with ``--json``: the JSON
object, nothing after it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from time import perf_counter
from typing import Any

from keyload.core.aids import INS_STATUS
from keyload.core.apdu import CommandAPDU
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.station.customize import Summary, customize
from keyload.station.load import AuthorityClient, UnitClient, load_key
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.transports.wrappers import LockedConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

TARGET_APDUS = 3
TARGET_UNITS_PER_S = 1000
REPETITIONS = 3
RTT_SECONDS = 1.0  # per run of (a), at most
WARMUP_CARDS = 200  # per reader, for (d)'s warm-up (and its count estimate)
MIN_CARDS, MAX_CARDS = 200, 20000  # per reader and run of (d)
STATUS_LOADS = 4  # loads after one SELECT in (b)

REF1 = b"BENCH-AES256"
REF2 = 1
KEY_VERSION = 1
PLAN = [(REF1, REF2)]
ACCEPTS = frozenset({KeyType.AES256})


# -- the authority and the units ---------------------------------------------------------------
@dataclass
class Counting:
    """Counts the C-APDUs sent on one connection."""

    inner: Connection
    count: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        self.count += 1
        return self.inner.transmit(apdu)


class World:
    """The authority, its client for the station threads, and a maker of fresh units."""

    def __init__(self) -> None:
        self.ks = SoftwareKeystore.ephemeral()
        self.set_id = self.ks.generate_set("bench").set_id
        self.ks.generate_key(REF1, KeyType.AES256, KeyAttributes("K0", "B", "E"),
                             version=KEY_VERSION, diversify=False,
                             policy=ExportPolicy(None, None))
        self.authority = Authority(self.ks)
        self.suites = self.authority.capabilities().suites
        self.client = AuthorityClient(LockedConnection(LocalConnection(self.authority)),
                                      suites=self.suites, select=False)
        self._t = self.ks.transport_key_copy(self.set_id)
        self._serial = 0

    def unit(self, slots: int = 1) -> Unit:
        """A unit as a card manufacturer delivers it: SN, T, empty slots 1..``slots``."""
        self._serial += 1
        sn = b"KL" + self._serial.to_bytes(6, "big")
        return Unit(MemoryUnitStore(UnitState.new(
            sn, Secret(self._t.buffer), {r: Slot(r, ACCEPTS) for r in range(1, slots + 1)},
            suites=(0x01, 0x02))))

    def close(self) -> None:
        self._t.wipe()
        self.ks.close()


def check_loaded(units: list[Unit], summaries: list[Summary], what: str) -> None:
    customized = sum(s.customized for s in summaries)
    failures = [f for s in summaries for f in s.failures]
    empty = sum(1 for u in units if u.state.slots[REF2].kcv is None)
    if customized != len(units) or failures or empty:
        detail = f"; first failure: {failures[0]}" if failures else ""
        raise SystemExit(f"{what}: {customized} of {len(units)} units customized, {empty} "
                         f"slots left empty{detail}: benchmark is wrong")


# -- (a) APDU round trip and (b) APDUs per load, on one card -----------------------------------
@dataclass(frozen=True, slots=True)
class OneCard:
    rtt_us: float
    app_us: float
    per_load: list[int]  # APDUs per load after SELECT, both sides
    unit_per_load: list[int]  # of which to the unit
    wire_per_load: float  # commands the unit card saw per load (its own count)


def _best_rate(op: Callable[[], object], seconds: float) -> float:
    """Best of REPETITIONS timed runs of ``seconds`` (after a short warm-up): s per op."""
    end = perf_counter() + min(0.2, seconds / 4)
    while perf_counter() < end:
        op()
    best = float("inf")
    for _ in range(REPETITIONS):
        n, start = 0, perf_counter()
        while True:
            for _ in range(100):
                op()
            n += 100
            elapsed = perf_counter() - start
            if elapsed >= seconds:
                break
        best = min(best, elapsed / n)
    return best


def one_card(world: World, pcscd: Any, port: int, seconds: float) -> OneCard:
    from keyload.lab.cards import VirtualCard
    from keyload.transports.pcsc import PcscConnection, wait_for_card, wait_for_removal

    reader = pcscd.reader_for_port(port)
    unit = world.unit(slots=STATUS_LOADS)
    status = CommandAPDU(0x80, INS_STATUS, 0, REF2, b"", ne=256).encode()
    with VirtualCard(unit, port) as card:
        wait_for_card(reader, 5)
        with PcscConnection(reader) as pc:
            # (b) one SELECT, then loads into slots 1..STATUS_LOADS
            uconn = Counting(pc)
            aconn = Counting(LocalConnection(world.authority))
            client = AuthorityClient(aconn, suites=world.suites, select=False)
            uc = UnitClient(uconn)
            uc.select()
            wire0 = card.stats.commands
            per_load, unit_per_load = [], []
            for ref2 in range(1, STATUS_LOADS + 1):
                u0, a0 = uconn.count, aconn.count
                res = load_key(uc, client, REF1, ref2, select=False)
                if unit.state.slots[ref2].kcv != res.kcv:
                    raise SystemExit("(b): the key is not in the unit: benchmark is wrong")
                per_load.append(uconn.count - u0 + aconn.count - a0)
                unit_per_load.append(uconn.count - u0)
            wire = (card.stats.commands - wire0) / STATUS_LOADS
            # (a) GET SLOT STATUS round trips
            if pc.transmit(status)[-2:] != b"\x90\x00":
                raise SystemExit("(a): GET SLOT STATUS refused: benchmark is wrong")
            rtt = _best_rate(lambda: pc.transmit(status), seconds)
    wait_for_removal(reader, 5)
    app = _best_rate(lambda: unit.process_apdu(status), min(seconds, 0.3))
    return OneCard(rtt * 1e6, app * 1e6, per_load, unit_per_load, wire)


# -- (c) cards fed with removal ------------------------------------------------------------------
def fed_with_removal(world: World, pcscd: Any, port: int, n: int) -> float:
    from keyload.lab.cards import CardFeeder
    from keyload.transports.pcsc import cards_in_reader, wait_for_removal

    reader = pcscd.reader_for_port(port)
    units = [world.unit() for _ in range(n)]
    feeder = CardFeeder(units, port, remove=True)
    try:
        start = perf_counter()
        feeder.start()
        summary = customize(cards_in_reader(reader, n, timeout=10), PLAN, world.client)
        elapsed = perf_counter() - start
        feeder.wait(5)
    finally:
        feeder.stop()
    if feeder.error is not None:
        raise SystemExit(f"(c): the card feeder failed: {feeder.error}")
    check_loaded(units, [summary], "(c)")
    wait_for_removal(reader, 5)
    return n / elapsed


# -- (d) cards swapped in place --------------------------------------------------------------------
def swapped(world: World, pcscd: Any, ports: tuple[int, ...], n: int) -> float:
    """``n`` units per reader through ``ports`` (one station thread per reader): units/s."""
    from keyload.lab.cards import CardFeeder
    from keyload.transports.pcsc import cards_in_reader, wait_for_card, wait_for_removal

    readers = {p: pcscd.reader_for_port(p) for p in ports}
    feeds = {p: [world.unit() for _ in range(n)] for p in ports}  # setup
    summaries: dict[int, Summary] = {}
    errors: list[BaseException] = []

    def station(port: int) -> None:
        try:
            summaries[port] = customize(
                cards_in_reader(readers[port], n, timeout=10, expect_removal=False), PLAN,
                world.client)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    with ExitStack() as stack:
        feeders = []
        for p in ports:
            f = CardFeeder(feeds[p], p, remove=False)
            stack.callback(f.stop)
            feeders.append(f.start())
        for p in ports:
            wait_for_card(readers[p], 5)  # the machine has its first card in: setup
        threads = [threading.Thread(target=station, args=(p,), name=f"station:{p}",
                                    daemon=True) for p in ports]
        start = perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = perf_counter() - start
        for f in feeders:
            f.wait(5)
        if any(t.is_alive() for t in threads):
            raise SystemExit("(d): a station thread did not finish: benchmark is wrong")
        if errors:
            raise SystemExit(f"(d): a station failed: {errors[0]}")
        for f in feeders:
            if f.error is not None:
                raise SystemExit(f"(d): a card feeder failed: {f.error}")
    check_loaded([u for units in feeds.values() for u in units], list(summaries.values()),
                 "(d)")
    for p in ports:
        wait_for_removal(readers[p], 5)
    return len(ports) * n / elapsed


def measure_swapped(world: World, pcscd: Any, ports: tuple[int, int],
                    seconds: float) -> tuple[float, float, int, int]:
    """Warm up (which sizes the runs), then REPETITIONS rounds of one reader and two
    readers taking turns; returns the best units/s of each and the counts per reader."""
    one_port = ports[:1]
    counts = []
    for p in (one_port, ports):
        rate = swapped(world, pcscd, p, WARMUP_CARDS)
        counts.append(max(MIN_CARDS, min(MAX_CARDS, round(rate / len(p) * seconds))))
    best_one = best_two = 0.0
    for _ in range(REPETITIONS):
        best_one = max(best_one, swapped(world, pcscd, one_port, counts[0]))
        best_two = max(best_two, swapped(world, pcscd, ports, counts[1]))
    return best_one, best_two, counts[0], counts[1]


def readers_busy() -> bool:
    """True when another process holds the vpcd lock now (``running_pcscd`` waits for it,
    silently: this only says why the run seems to hang)."""
    import fcntl

    from keyload.lab.pcscd import lock_path

    try:
        fd = os.open(lock_path(), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- report --------------------------------------------------------------------------------------
def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="about how long each run of (d) lasts (default 1.5; (a) runs "
                         f"min(S, {RTT_SECONDS:g}) s)")
    ap.add_argument("--fed", type=int, default=6,
                    help="cards fed with removal in (c) (default 6; about 0.8 s each)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.fed < 1:
        ap.error("--fed must be at least 1")
    seconds: float = args.seconds
    signal.signal(signal.SIGTERM, _terminate)  # unwind: the cleanup runs

    from keyload.lab.pcscd import (
        VPCD_PORTS,
        lock_path,
        pcsc_available,
        running_pcscd,
    )

    avail = pcsc_available()
    if not avail.ok:
        reason = f"skipped: PC/SC with vpcd is not available ({avail.reason})"
        print(json.dumps({"skipped": reason}) if args.json else reason)
        return 0

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    env = {"python": f"{platform.python_version()} ({platform.python_implementation()})",
           "pyscard": version("pyscard"), "cpu_count": os.cpu_count() or 0}
    show(f"python: {env['python']}; pyscard {env['pyscard']}")
    show(f"cpus: {env['cpu_count']}")
    ports = (VPCD_PORTS[0], VPCD_PORTS[1])
    t_start = time.monotonic()
    with ExitStack() as stack:
        world = World()
        stack.callback(world.close)
        if readers_busy():
            show(f"waiting for the vpcd readers: another process uses them ({lock_path()})")
        pcscd = stack.enter_context(running_pcscd())
        show(f"pcscd: {'started, pid ' + str(pcscd.pid) if pcscd.started else 'reused'}; "
             f"readers {', '.join(pcscd.readers)}")

        card = one_card(world, pcscd, ports[0], min(seconds, RTT_SECONDS))
        show(f"(a) APDU round trip, GET SLOT STATUS to a unit card: {card.rtt_us:.1f} us "
             f"({1e6 / card.rtt_us:,.0f} APDUs/s; the unit's own processing "
             f"{card.app_us:.1f} us)")
        per_load = card.per_load[0] if len(set(card.per_load)) == 1 else None
        show(f"(b) APDUs per load after SELECT: "
             f"{per_load if per_load is not None else card.per_load} (target "
             f"{TARGET_APDUS}; unit {card.unit_per_load[0]}: INITIALIZE DOWNLOAD, IMPORTKEY; "
             f"authority {card.per_load[0] - card.unit_per_load[0]}: EXPORTKEY; "
             f"{STATUS_LOADS} loads; on the unit card's wire {card.wire_per_load:g} per load)")

        fed = fed_with_removal(world, pcscd, ports[0], args.fed)
        show(f"(c) units/s, {args.fed} cards fed through one reader with removal: {fed:.2f} "
             "(pcscd polls a vpcd reader every 400 ms)")

        one, two, n_one, n_two = measure_swapped(world, pcscd, ports, seconds)
        show(f"(d) units/s, cards swapped in place, one reader: {one:,.0f} ({n_one} units "
             f"per run, best of {REPETITIONS})")
        show(f"(d) units/s, cards swapped in place, two readers (two threads): {two:,.0f} "
             f"({n_two} units per reader and run, best of {REPETITIONS}; target >= "
             f"{TARGET_UNITS_PER_S:,})")
    took = time.monotonic() - t_start

    if args.json:
        out: dict[str, Any] = {
            **env, "seconds": seconds, "repetitions": REPETITIONS,
            "rtt_us": round(card.rtt_us, 2), "unit_process_apdu_us": round(card.app_us, 2),
            "apdus_per_load_after_select": per_load if per_load is not None
            else card.per_load,
            "unit_apdus_per_load": card.unit_per_load[0],
            "unit_wire_commands_per_load": card.wire_per_load,
            "fed_with_removal": {"cards": args.fed, "units_per_s": round(fed, 3)},
            "swapped_one_reader": {"units_per_run": n_one, "units_per_s": round(one, 1)},
            "swapped_two_readers": {"units_per_reader_and_run": n_two,
                                    "units_per_s": round(two, 1)},
            "targets": {"apdus_per_load_after_select": TARGET_APDUS,
                        "units_per_s_two_readers": TARGET_UNITS_PER_S},
            "elapsed_s": round(took, 1),
        }
        print(json.dumps(out))
    else:
        print(f"targets (issue): {TARGET_APDUS} APDUs per load after SELECT; at least "
              f"{TARGET_UNITS_PER_S:,} units/s over two readers")
        print(f"units/s over two readers: {two:.0f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cleanup has run while unwinding
        print("interrupted", file=sys.stderr)
        sys.exit(130)
