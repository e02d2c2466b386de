"""Running a campaign of a home: over its emulated units, in-process (the one wiring the
``campaign run`` command and the demo share), or over the cards in a PC/SC reader; one
load into one emulated unit, and what its slots hold."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..core import messages as msg
from ..core import tlv
from ..core.aids import INS_INIT
from ..core.apdu import ResponseAPDU, encode_command
from ..core.dukpt import InitialKeyOrder
from ..core.errors import KeyloadError, MalformedData
from ..core.keys import KeyHeader, KeyType
from ..core.suite3 import SUITE_ECDH
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import Authority
from ..units.unit import Unit
from .campaign import Interrupt, RunOptions, RunSummary, run_campaign, run_campaign_cards
from .customize import Failure, Summary
from .drive import UnitDone
from .dukpt import campaign_orders, order_load, refuse_bare_bdk
from .fleet import EmulatedFleet, EmulatedUnitSource
from .home import Home
from .journal.model import Journal
from .load import (
    UNIT_MEANING,
    AuthorityClient,
    LoadFailed,
    LoadResult,
    Step,
    UnitClient,
    load_key,
    load_key3,
)
from .records import LoadRecords


def _local(authority: Authority, stack: ExitStack) -> Connection:
    return LocalConnection(authority)


def _stop_record(name: str, opts: RunOptions, summary: RunSummary) -> dict[str, Any]:
    return {"campaign": name, "station": opts.station,
            **{k: v for k, v in summary.to_json().items() if k != "failures"}}


def open_work(journal: Journal, name: str) -> tuple[int, int, int]:
    """What a run of campaign ``name`` has before it: (open loads, units they make up
    (rounded up), the units a progress line counts: all of them while no load is
    imported yet, else the open ones)."""
    camp = journal.campaign(name)
    counts = journal.counts(name)
    todo = counts["planned"] + counts["claimed"] + counts["exported"]
    open_units = -(-todo // max(len(camp.plan), 1))
    return todo, open_units, (open_units if counts["imported"] else camp.units)


def run_emulated(home: Home, journal: Journal, name: str, opts: RunOptions, *,
                 on_unit: UnitDone | None, interrupt: Interrupt,
                 connect: Callable[[Authority, ExitStack], Connection] = _local
                 ) -> RunSummary:
    """Run (or resume) a campaign over the home's emulated units, in-process; the
    authority is reached through ``connect`` (in-process by default). The units of an
    identity set load by suite 0x03."""
    camp = journal.campaign(name)
    journal.lock_station(name, opts.station)
    with ExitStack() as stack:
        ks = home.open_keystore()
        stack.callback(ks.close)
        identity = ks.set_info(camp.set_id).identity
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        stack.callback(fleet.close)
        audit = home.audit()
        stack.callback(audit.close)
        authority = home.authority(ks, audit)
        client = AuthorityClient(connect(authority, stack), suites=ks.capabilities().suites)
        todo, _, _ = open_work(journal, name)
        audit.append("campaign run", {"campaign": name, "station": opts.station,
                                      "open_loads": todo})
        summary = run_campaign(journal, name, client,
                               lambda sn: EmulatedUnitSource(fleet, sn).connect(), opts,
                               on_unit=on_unit, interrupt=interrupt, identity=identity,
                               order=campaign_orders(authority, camp))
        audit.append("campaign stop", _stop_record(name, opts, summary))
    return summary


def run_reader(home: Home, journal: Journal, name: str, opts: RunOptions, reader: str,
               cards: int | None, *, on_unit: UnitDone | None, interrupt: Interrupt,
               connect: Callable[[Authority, ExitStack], Connection] = _local,
               timeout: float = 30.0) -> RunSummary:
    """Run a campaign over the cards presented in a PC/SC reader, in any order (until
    ``cards`` are done, or the reader stays empty ``timeout`` seconds)."""
    from ..transports.pcsc import cards_in_reader

    camp = journal.campaign(name)
    journal.lock_station(name, opts.station)
    with ExitStack() as stack:
        ks = home.open_keystore()
        stack.callback(ks.close)
        identity = ks.set_info(camp.set_id).identity
        audit = home.audit()
        stack.callback(audit.close)
        authority = home.authority(ks, audit)
        client = AuthorityClient(connect(authority, stack), suites=ks.capabilities().suites)
        audit.append("campaign run", {"campaign": name, "station": opts.station,
                                      "reader": reader})
        summary = run_campaign_cards(journal, name, client,
                                     cards_in_reader(reader, count=cards, timeout=timeout),
                                     opts, on_unit=on_unit, interrupt=interrupt,
                                     identity=identity, order=campaign_orders(authority, camp))
        audit.append("campaign stop", _stop_record(name, opts, summary))
    return summary


class Tally(Protocol):
    """A progress line: told once a unit is done (``ok``: customized)."""

    def update(self, ok: bool) -> None: ...


#: A progress line over ``total`` units (``label``), for as long as its block lasts.
Bar = Callable[[int, str], AbstractContextManager[Tally]]


def run_home(home: Home, journal: Journal, name: str, opts: RunOptions, *, reader: str | None,
             cards: int | None, progress: Bar, interrupt: Interrupt) -> RunSummary:
    """Run (or resume) campaign ``name`` over the cards presented in ``reader`` (its
    progress over ``cards``, 0 when not given: until the reader stays empty), or else over
    the home's emulated units (its progress over the units :func:`open_work` counts)."""
    if reader:
        with progress(cards or 0, "cards") as bar:
            return run_reader(home, journal, name, opts, reader, cards, on_unit=bar.update,
                              interrupt=interrupt)
    with progress(open_work(journal, name)[2], "units") as bar:
        return run_emulated(home, journal, name, opts, interrupt=interrupt,
                            on_unit=bar.update)


def journal_summary(journal: Journal, name: str, run: RunSummary) -> Summary:
    """A campaign's outcome as a :class:`Summary`, read from its journal (every run's
    loads, not only ``run``'s)."""
    camp = journal.campaign(name)
    s = Summary(units=camp.units)
    bad_units: set[bytes] = set()
    for row in journal.rows(name):
        if row.state == "imported":
            s.loads_ok += 1
            if row.suite is not None:
                s.by_suite[row.suite] += 1
        else:
            s.loads_failed += 1
            bad_units.add(row.sn)
            step, _, reason = (row.reason or "").partition(": ")
            s.failures.append(Failure(row.sn.hex(), row.ref1, row.ref2, step or row.state,
                                      row.sw, reason or row.state))
    s.customized = camp.units - len(bad_units)
    s.elapsed = run.elapsed
    return s


def load_one(home: Home, sn: bytes, ref1: bytes, ref2: int,
             initial_key: InitialKeyOrder | None = None) -> LoadResult:
    """Load one key into one emulated unit of the home; the load (or its failure) is
    recorded in ``station.db``. A BDK's load delivers the IK ``initial_key`` orders
    (docs/protocol.md Appendix D), and needs one."""
    with ExitStack() as stack:
        ks = home.open_keystore()
        stack.callback(ks.close)
        authority = home.authority(ks)
        order_load(authority, ks, sn, ref1, ref2, initial_key)
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        stack.callback(fleet.close)
        unit = fleet.open_unit(sn)
        stack.callback(unit.close)
        ac = AuthorityClient(LocalConnection(authority), suites=ks.capabilities().suites)
        records = LoadRecords(home.station_db)
        stack.callback(records.close)
        try:
            load = load_key3 if unit.state.identity else load_key
            res = load(UnitClient(LocalConnection(unit)), ac, ref1, ref2)
        except LoadFailed as e:
            records.add_failure(sn, ref1, ref2, e)
            raise
        res = _with_initial_key(res, initial_key)
        records.add(res)
    return res


def _with_initial_key(res: LoadResult, order: InitialKeyOrder | None) -> LoadResult:
    """A load as the station records and tells it: a BDK's with the ID of the IK it
    delivered."""
    return res if order is None else res._replace(initial_key_id=order.initial_key_id.value)


@dataclass(frozen=True)
class UnitSlots:
    """An emulated unit's set id and its slots as GET SLOT STATUS gives them (with the key
    types each accepts, and the loaded key's header and KCV; never a value)."""

    sn: bytes
    set_id: bytes
    slots: list[dict[str, Any]]
    HEADERS: ClassVar[tuple[str, ...]] = ("REF2", "state", "accepts", "type", "usage",
                                          "version", "KCV")

    @property
    def enrolled(self) -> bool:
        """False for a unit of an identity set before its enrolment: no certificate, so no
        set id yet."""
        return bool(self.set_id)

    def to_json(self) -> dict[str, Any]:
        return {"sn": self.sn.hex(), "set_id": self.set_id.hex() if self.enrolled else None,
                "enrolled": self.enrolled, "slots": self.slots}

    def heading(self) -> str:
        if not self.enrolled:
            return f"unit {self.sn.hex()}, not enrolled yet (no certificate, so no set)"
        return f"unit {self.sn.hex()}, set {self.set_id.hex()}"

    def rows(self) -> list[list[Any]]:
        """One row a slot under :attr:`HEADERS` ("-" where a slot holds nothing)."""
        return [[r["ref2"], r["state"], ",".join(r["accepts"]), r["type"] or "-",
                 r["usage"] or "-", "-" if r["version"] is None else r["version"],
                 r["kcv"] or "-"] for r in self.slots]


def unit_slots(home: Home, sn: bytes) -> UnitSlots:
    """Emulated unit ``sn``'s slots, read by GET SLOT STATUS."""
    fleet = EmulatedFleet.open(home.units_dir, home.source)
    try:
        unit = fleet.open_unit(sn)
        try:
            client = UnitClient(LocalConnection(unit))
            client.select()
            status = client.slot_status3 if unit.state.identity else client.slot_status
            sts = [status(r) for r in sorted(unit.state.slots)]
            accepts = {r: sorted(KeyType(t).label for t in s.accepts)
                       for r, s in unit.state.slots.items()}
            set_id = unit.state.set_id
        finally:
            unit.close()
    finally:
        fleet.close()
    rows: list[dict[str, Any]] = []
    for st in sts:
        h = KeyHeader.decode(st.h) if st.h else None
        rows.append({"ref2": st.ref2, "state": ["empty", "loaded", "locked"][st.state],
                     "accepts": accepts[st.ref2],
                     "type": None if h is None else KeyType(h.key_type).label,
                     "usage": None if h is None else h.usage,
                     "version": None if h is None else h.version,
                     "kcv": None if st.kcv is None else st.kcv.hex().upper()})
    return UnitSlots(sn, set_id, rows)


def units_in_turn(fleet: EmulatedFleet, serials: list[bytes]) -> Iterator[Unit]:
    """The units, one after another, each closed once the next is asked for (as a feeder
    presents cards)."""
    for sn in serials:
        unit = fleet.open_unit(sn)
        try:
            yield unit
        finally:
            unit.close()


def load_in_reader(home: Home, reader: str, ref1: bytes, ref2: int,
                   sn: bytes | None = None,
                   initial_key: InitialKeyOrder | None = None) -> LoadResult:
    """Load one key into the card in PC/SC ``reader``: suite 0x03 when its INITIALIZE
    DOWNLOAD says it is a unit of an identity set, else suite 0x01/0x02; ``sn``, when
    given, must be the card's SN (else ValueError, nothing exported). A BDK's load
    delivers the IK ``initial_key`` orders for the card's SN, and needs one (refused
    before the reader is opened). Recorded in ``station.db`` as :func:`load_one` does;
    the card is unpowered at the end."""
    from ..transports.pcsc import PcscConnection

    with ExitStack() as stack:
        ks = home.open_keystore()
        stack.callback(ks.close)
        if initial_key is None:
            refuse_bare_bdk(ks, ref1)
        authority = home.authority(ks)
        ac = AuthorityClient(LocalConnection(authority), suites=ks.capabilities().suites)
        conn = stack.enter_context(PcscConnection(reader))
        unit = UnitClient(conn)
        card_sn, identity = _card_in_reader(unit, reader)
        if sn is not None and card_sn != sn:
            raise ValueError(f"the card in reader {reader!r} is unit {card_sn.hex()}, not "
                             f"{sn.hex()}")
        order_load(authority, ks, card_sn, ref1, ref2, initial_key)
        records = LoadRecords(home.station_db)
        stack.callback(records.close)
        try:
            res = (load_key3 if identity else load_key)(unit, ac, ref1, ref2, select=False)
        except LoadFailed as e:
            records.add_failure(card_sn, ref1, ref2, e)
            raise
        res = _with_initial_key(res, initial_key)
        records.add(res)
    return res


def card_facts(unit: UnitClient, reader: str) -> tuple[bytes, bytes, bytes | None]:
    """One INITIALIZE DOWNLOAD of the unit application selected in the card in ``reader``:
    its SN, the suites it speaks (C4) and its set id (C3, when it gives one). The challenge
    it draws is replaced by the next INITIALIZE DOWNLOAD, and gone with any SELECT or when
    the card is unpowered (§7)."""
    r = ResponseAPDU.decode(unit.conn.transmit(encode_command(0x80, INS_INIT, 0, 0, b"",
                                                              65536)))
    found = dict(tlv.iter_tlv(r.check(UNIT_MEANING.get(r.sw, ""))))
    sn, suites = found.get(msg.T_SN), found.get(msg.T_SUITE)
    if sn is None or suites is None:
        raise MalformedData(f"the card in reader {reader!r} answers no SN or suites")
    return sn, suites, found.get(msg.T_SET)


def load_unit(home: Home, ref1: bytes, ref2: int, *, sn: bytes | None, reader: str | None,
              initial_key: InitialKeyOrder | None = None) -> LoadResult:
    """One key into one unit (``keyload load``): the card in PC/SC ``reader``
    (:func:`load_in_reader`, which must then be unit ``sn`` when it is given), or else the
    emulated unit ``sn`` (:func:`load_one`)."""
    if reader is not None:
        return load_in_reader(home, reader, ref1, ref2, sn, initial_key)
    if sn is None:
        raise ValueError("no unit: give its SN, or the reader holding it")
    return load_one(home, sn, ref1, ref2, initial_key)


def _card_in_reader(unit: UnitClient, reader: str) -> tuple[bytes, bool]:
    """SELECT and :func:`card_facts`: the card's SN, and whether it is a unit of an
    identity set (its C4 is ``03`` alone, docs/protocol.md §10.1). The challenge it draws
    is replaced by the load's own (§7)."""
    try:
        unit.select()
        sn, suites, _ = card_facts(unit, reader)
    except KeyloadError as e:
        raise LoadFailed(Step.UNIT_INIT, e) from None
    return sn, suites == bytes((SUITE_ECDH,))
