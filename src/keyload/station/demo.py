"""The demo's world: its workdir (made, resumed or refused), an authority's sets and
keys, a set of emulated units as a card manufacturer delivers them, and the planned
campaign that customizes them (two loads per unit); then the demo's run of it
(:func:`run_demo`), which reaches its authority and its units as the caller says."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.keys import KeyAttributes, KeyType
from ..core.notation import counted
from ..core.ref1 import display_ref1
from ..core.secret import Secret
from ..core.suite3 import SUITE_ECDH
from ..records.exportlog import SqliteExportLog
from ..transports import Connection
from ..units.authority import Authority, ExportPolicy
from ..units.storage import ENV_KEK, ENV_PASSPHRASE, KekSource, atomic_write
from ..units.unit import Slot
from .campaign import Interrupt, RunOptions, RunSummary
from .customize import Summary
from .drive import UnitDone
from .enrolment import certifier, enrol_units
from .fleet import EmulatedFleet
from .home import Home, Keystore
from .identity import AUTHORITY_ID
from .journal import open_journal
from .journal.model import Journal
from .plan import create_campaign
from .receipts import ReceiptsCheck, check_receipts
from .report import campaign_entries
from .run import Bar, journal_summary, open_work, run_emulated, run_reader

DEMO_PASSPHRASE = "keyload-demo"
CAMPAIGN = "demo"
OPTS = RunOptions(station="demo", batch_units=32, lease_s=30.0)
MARKER = "demo.json"
SETUP_PARTS = ("authority", "units", "softhsm", "journal.db", "audit.db", "station.db")

# (REF1, type, usage, mode, exportability, diversify, slot)
DEMO_KEYS = [
    (b"TMK-A", KeyType.AES256, "K0", "B", "E", True, 1),
    (b"MAC-A", KeyType.HMAC_SHA256, "M7", "C", "N", False, 2),
]


def demo_source() -> tuple[KekSource, bool]:
    """The vaults' KEK source: ``$KEYLOAD_PASSPHRASE`` or ``$KEYLOAD_KEK`` when set, else
    the demo passphrase (True: the caller says so plainly)."""
    env = KekSource.from_env()
    if env.passphrase or env.kek_hex:
        return KekSource(passphrase=env.passphrase, kek_hex=env.kek_hex), False
    return KekSource(passphrase=DEMO_PASSPHRASE), True


def prepare_workdir(workdir: str | None, want: dict[str, object]) -> tuple[Path, bool]:
    """The workdir, and whether a finished setup is there to resume.

    A workdir holding a demo made with the same arguments (``want``) is resumed; one
    whose setup was interrupted (no load has run yet) is set up again; anything else is
    refused.
    """
    if not workdir:
        return Path(tempfile.mkdtemp(prefix="keyload-demo-")), False
    root = Path(workdir)
    if not root.exists() or not any(root.iterdir()):
        return root, False
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{root} is not empty: give a new or empty --workdir") from None
    if {k: marker.get(k) for k in want} != want:
        raise ValueError(f"{root} holds a demo made with other arguments "
                         f"({', '.join(f'--{k} {v}' for k, v in marker.items() if k in want)})")
    if marker.get("state") == "ready":
        return root, True
    for part in SETUP_PARTS:  # an interrupted setup: nothing was loaded yet, start over
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        else:
            for p in root.glob(part + "*"):
                p.unlink()
    return root, False


def write_marker(root: Path, want: dict[str, object], state: str) -> None:
    atomic_write(root / MARKER, json.dumps({**want, "state": state}).encode())


def setup_demo(home: Home, ks: Keystore, units: int, *, say: Callable[[str], None],
               on_unit: UnitDone, interrupt: Interrupt, suite: int | None = None) -> None:
    """Sets, keys, the set's ``units`` units and the planned campaign, in a new
    authority ``ks`` (closed here); what the authority holds is told to ``say``.

    ``suite``: 0x01 or 0x02, units that offer only that suite; 0x03, units of an
    identity set (:func:`setup_identity_demo`); None, units offering 0x01 and 0x02."""
    if suite == SUITE_ECDH:
        setup_identity_demo(home, ks, units, say=say, on_unit=on_unit, interrupt=interrupt)
        return
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    # T as the key ceremony makes it: generated once, installed in the authority and
    # handed to the card manufacturer for the units (then wiped)
    t = Secret.take(os.urandom(32))
    try:
        pub = ks.set_signing_key()
        set_a = ks.add_set(Secret(t.buffer), "operator-a", signed=True)
        set_b = ks.generate_set("operator-b", signed=True)
        for ref1, kt, usage, mode, exp, div, slot in DEMO_KEYS:
            ks.generate_key(ref1, kt, KeyAttributes(usage, mode, exp), version=1,
                            diversify=div,
                            policy=ExportPolicy(frozenset({set_a.set_id}), frozenset({slot})))
        ks.generate_key(b"PIN-B", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                        diversify=False,
                        policy=ExportPolicy(frozenset({set_b.set_id}), frozenset({3})))
        caps = ks.capabilities()
        names = ", ".join(display_ref1(k.ref1) for k in ks.key_infos())
        say(f"authority ({caps.backend}, suites "
            f"{', '.join(f'{s:#04x}' for s in sorted(caps.suites))}): sets operator-a "
            f"{set_a.set_id.hex()}, operator-b {set_b.set_id.hex()} (Ed25519 SAS); "
            f"keys {names}")
        # the set's units, as a card manufacturer delivers them: SN, T, slots
        serials = demo_serials(units)
        offered = (0x01, 0x02) if suite is None else (suite,)
        for sn in serials:
            interrupt.check()  # Ctrl-C: the setup is made again by the next run
            fleet.create_unit(sn, t, demo_slots(), verify_key=pub, suites=offered)
            on_unit(True)
    finally:
        t.wipe()
        fleet.close()
        ks.close()
    _plan(home, set_a.set_id, serials)


def setup_identity_demo(home: Home, ks: Keystore, units: int, *, say: Callable[[str], None],
                        on_unit: UnitDone, interrupt: Interrupt) -> None:
    """:func:`setup_demo` for suite 0x03: an identity set (set CA key, authority key and
    C_A) and the demo keys for it in the authority ``ks`` (closed here), ``units`` units
    each enrolled by GENERATE UNIT KEY, the authority's certificate and PUT CERTIFICATE
    (all through one open authority and fleet), and the planned campaign. An authority
    that holds no identity sets is refused (ValueError) before any unit is made."""
    try:
        info = ks.generate_identity_set("operator-id", authority_id=AUTHORITY_ID)
        for ref1, kt, usage, mode, exp, div, slot in DEMO_KEYS:
            ks.generate_key(ref1, kt, KeyAttributes(usage, mode, exp), version=1,
                            diversify=div,
                            policy=ExportPolicy(frozenset({info.set_id}), frozenset({slot})))
        cert = certifier(ks)
        say(f"authority ({ks.capabilities().backend}, suite 0x03): identity set operator-id "
            f"{info.set_id.hex()} (P-256 set CA and authority keys, C_A); keys "
            f"{', '.join(display_ref1(k.ref1) for k in ks.key_infos())}")
        serials = demo_serials(units)
        fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
        try:
            enrol_units(fleet, cert, info.set_id, serials, demo_slots(), on_unit=on_unit,
                        interrupt=interrupt)
        finally:
            fleet.close()
    finally:
        ks.close()
    _plan(home, info.set_id, serials)


def demo_serials(units: int) -> list[bytes]:
    return [b"KL" + i.to_bytes(6, "big") for i in range(1, units + 1)]


def demo_slots() -> dict[int, Slot]:
    """A demo unit's slots, as a card manufacturer delivers them."""
    return {1: Slot(1, frozenset({KeyType.AES256})),
            2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
            3: Slot(3, frozenset({KeyType.AES128, KeyType.AES256})),
            4: Slot(4, frozenset({KeyType.AES256}), locked=True)}


def _plan(home: Home, set_id: bytes, serials: list[bytes]) -> None:
    """The demo's campaign: the two demo keys into every unit of set ``set_id``."""
    journal = open_journal(home.journal_path)
    try:
        create_campaign(home, journal, CAMPAIGN, set_id,
                        [(ref1, slot) for ref1, *_, slot in DEMO_KEYS], serials,
                        {"demo": len(serials)})
    finally:
        journal.close()


def verify_demo(home: Home, journal: Journal, ks: Keystore) -> ReceiptsCheck:
    """Every receipt of the demo's campaign checked against the export the authority
    recorded and by the authority (``ks``): a suite-0x03 receipt is the unit's signature,
    verified with the C_U and E_A of that export."""
    log = SqliteExportLog(home.authority_dir / "exports.db")
    try:
        return check_receipts(campaign_entries(journal, CAMPAIGN), log.records(),
                              home.verifier(ks))
    finally:
        log.close()


def open_demo(workdir: str | None, want: dict[str, Any], *,
              say: Callable[[str], None]) -> tuple[Home, bool]:
    """The demo's home in its workdir (:func:`prepare_workdir`), with the vaults' KEK source
    (:func:`demo_source`); and whether a finished setup is there to resume. Where it is,
    what it runs and, plainly, a demo passphrase in use are told to ``say``."""
    root, resume = prepare_workdir(workdir, want)
    source, demo_pass = demo_source()
    home = Home(root, source)
    home.ensure()
    say(f"workdir: {root}" + ("" if workdir else " (temporary: removed at the end; "
                                                 "--workdir DIR keeps it)"))
    say(f"authority: {want['authority']}, transport: {want['transport']}"
        + (f", suite {want['suite']:#04x}" if want["suite"] is not None else ""))
    if demo_pass:
        say(f"vaults sealed with the demo passphrase {DEMO_PASSPHRASE!r} (set {ENV_PASSPHRASE} "
            f"or {ENV_KEK} for your own)")
    return home, resume


@contextmanager
def removed_unless_kept(home: Home, workdir: str | None) -> Iterator[None]:
    """The demo's temporary workdir (none was given) removed at the end of the block,
    whatever ends it; a given one is kept."""
    try:
        yield
    finally:
        if not workdir:
            shutil.rmtree(home.root, ignore_errors=True)


@dataclass(frozen=True)
class DemoRun:
    """What a demo run did: the campaign's outcome read from its journal (every run's
    loads), its receipts checked by the authority, this run, and how long the setup took
    (0 when resumed, as long as finding that out)."""

    summary: Summary
    check: ReceiptsCheck
    run: RunSummary
    setup_s: float

    @property
    def ok(self) -> bool:
        return self.summary.failed_units == 0 and self.check.invalid == 0

    def to_json(self, **given: Any) -> dict[str, Any]:
        """What ``keyload demo --json`` prints; ``given`` (what the demo was asked for)
        after the summary."""
        return {**self.summary.to_json(), **given, "receipts_verified": self.check.verified,
                "receipts_invalid": self.check.invalid, "reconciled": self.run.reconciled,
                "loads_this_run": self.run.loads_done, "run_s": round(self.run.elapsed, 3),
                "setup_s": round(self.setup_s, 3)}

    def rows(self) -> list[tuple[str, Any]]:
        """The outcome for people, as (name, value)."""
        s, n, t, rec = self.summary, self.run.loads_done, self.run.elapsed, self.run.reconciled
        return [
            ("units", s.units), ("customized", s.customized), ("failed", s.failed_units),
            ("loads", f"{s.loads_ok} ok, {s.loads_failed} failed"),
            ("receipts", f"{self.check.verified} verified by the authority, "
                         f"{self.check.invalid} invalid"
                         + (f", {rec} loads reconciled after an interruption" if rec else "")),
            ("suites", ", ".join(f"{k:#04x}: {v}" for k, v in sorted(s.by_suite.items()))),
            ("this run", f"{n} loads in {t:.2f} s"
                         + (f" ({n / t:,.0f} loads/s)" if t and n else ""))]

    FAILURE_HEADERS = ("SW", "step", "count")

    def failure_rows(self) -> list[tuple[str, str, int]]:
        """The failed loads counted by status word and step, most frequent first."""
        return [(sw, step, n) for (sw, step), n in self.summary.failures_by_sw().most_common()]

    def line(self) -> str:
        s = self.summary
        return (f"customized {s.customized:,} of {counted(s.units, 'unit')}, "
                f"{s.failed_units:,} failed")


def run_demo(home: Home, want: dict[str, Any], resume: bool, *,
             authority: Callable[[], Keystore],
             connect: Callable[[Authority, ExitStack], Connection],
             feed: Callable[[ExitStack], tuple[str, int]] | None,
             say: Callable[[str], None], note: Callable[[str], None], progress: Bar,
             interrupt: Interrupt) -> DemoRun:
    """Set the demo up in ``home`` (unless ``resume``: a finished setup is there) with a
    new ``authority``, then run (or resume) its campaign, reaching the authority through
    ``connect`` and the units in-process, or (``feed``) as cards fed through a PC/SC
    reader (it gives the reader and how many); then every receipt checked. ``want``: what
    the demo was asked for (the workdir's marker). A run interrupted raises
    KeyboardInterrupt: the next one resumes it."""
    t_setup = time.monotonic()
    if resume:
        say("resuming the campaign in this workdir")
    else:
        write_marker(home.root, want, "setup")
        with progress(want["units"], "units created") as bar:
            setup_demo(home, authority(), want["units"], say=say, on_unit=bar.update,
                       interrupt=interrupt, suite=want["suite"])
        write_marker(home.root, want, "ready")
    setup_s = time.monotonic() - t_setup
    with ExitStack() as stack:
        journal = open_journal(home.journal_path)
        stack.callback(journal.close)
        if feed is None:
            units = open_work(journal, CAMPAIGN)[1]
            with progress(units, "units customized") as bar:
                run = run_emulated(home, journal, CAMPAIGN, OPTS, interrupt=interrupt,
                                   connect=connect, on_unit=bar.update)
        else:
            reader, n = feed(stack)
            note("units are fed through the reader one after another (pcscd polls a "
                 "virtual reader every 400 ms: about 1 unit/s)")
            with progress(n, "units customized") as bar:
                run = run_reader(home, journal, CAMPAIGN, OPTS, reader, n, on_unit=bar.update,
                                 interrupt=interrupt, connect=connect, timeout=15)
        if run.interrupted:
            raise KeyboardInterrupt
        summary = journal_summary(journal, CAMPAIGN, run)
        ks = home.open_keystore()
        stack.callback(ks.close)
        return DemoRun(summary, verify_demo(home, journal, ks), run, setup_s)
