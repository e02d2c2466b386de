"""Campaigns: customize a whole set, crash-safe and resumable, on one or many stations.

A campaign is a set, its units (SNs) and the loads per unit (REF1 -> REF2 at a key
version). :func:`run_campaign` claims units in batches from the journal, reconciles any
load whose outcome was not journaled with the unit itself (GET SLOT STATUS), then runs
the remaining loads, journaling ``exported`` before IMPORTKEY is sent and ``imported``
with the unit's receipt after. A campaign of an identity set loads by suite 0x03
(:func:`~.load.load_key3`; its receipts are kept with E_A and C_U), the others by
suites 0x01/0x02: the same run, claims and reconciliation. Security refusals are final;
transport errors, memory failures and units that cannot be reached are retried,
:data:`ATTEMPTS` attempts per load by default, then failed with their reason: a run ends.
Ctrl-C stops after the loads in flight; running again resumes.

Guarantee (checked by the fault tests): a load the unit already imported is never
exported again, whatever moment the station was killed at.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import groupby

from ..core import messages as msg
from ..core import messages3 as msg3
from ..core.errors import KeyloadError, MemoryFailure, StatusError, StoreError, TransportError
from ..core.keys import KeyHeader
from ..transports import Connection
from .drive import UnitDone, UnitSource, drive_unit
from .journal.model import CLAIMED, EXPORTED, Journal, LoadRow
from .load import (
    AuthorityClient,
    LoadFailed,
    LoadResult,
    Step,
    UnitClient,
    load_key,
    load_key3,
)

Connector = Callable[[bytes], AbstractContextManager[Connection]]
#: called with each load before it is exported: a BDK's load orders its unit's initial key
#: from the authority (:func:`~.dukpt.campaign_orders`)
Order = Callable[[LoadRow], None]

ATTEMPTS = 3
"""Attempts per load (``--retries``) before a transient failure is final: a transport
error, a memory failure in the unit, a unit that cannot be reached."""


@dataclass(frozen=True)
class RunOptions:
    station: str = "station"
    batch_units: int = 32
    lease_s: float = 60.0
    retries: int = ATTEMPTS  # attempts per load, at least 1
    workers: int = 1
    #: Wall-clock time (seconds): leases, their renewal, journal stamps and events. The
    #: run reads no other clock but for its elapsed time; a test passes its own.
    clock: Callable[[], float] = time.time


@dataclass
class RunSummary:
    loads_done: int = 0
    loads_failed: int = 0
    loads_retried: int = 0
    reconciled: int = 0
    units_seen: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    failures: list[tuple[str, int, str | None, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"loads_done": self.loads_done, "loads_failed": self.loads_failed,
                "loads_retried": self.loads_retried, "reconciled": self.reconciled,
                "units": self.units_seen, "elapsed_s": round(self.elapsed, 3),
                "interrupted": self.interrupted,
                "failures": [{"sn": sn, "ref2": r2, "sw": sw, "reason": why}
                             for sn, r2, sw, why in self.failures]}


def is_transient(e: LoadFailed) -> bool:
    """Retry transport errors and unit memory failures; never security refusals."""
    return isinstance(e.cause, (TransportError, MemoryFailure)) or \
        (not isinstance(e.cause, StatusError) and e.step != Step.KCV)


class Interrupt:
    """Ctrl-C as a request to stop at the next safe point (see :func:`sigint_deferred`).

    :attr:`stop` is set by the first SIGINT; the run loops look at it before each load
    and each claim, so a run stops once the loads in flight are done and journaled, which
    takes far less than a second. Inside :meth:`waiting` (a wait with nothing in flight,
    such as for the next card in a reader) and on a second SIGINT, KeyboardInterrupt is
    raised at once.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._waiting = False

    def on_sigint(self, signum: int, frame: object) -> None:
        if self.stop.is_set() or self._waiting:
            raise KeyboardInterrupt
        self.stop.set()

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for (at a safe point)."""
        if self.stop.is_set():
            raise KeyboardInterrupt

    @contextmanager
    def waiting(self) -> Iterator[None]:
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


@contextmanager
def sigint_deferred() -> Iterator[Interrupt]:
    """Within the block, SIGINT sets the returned :class:`Interrupt`'s stop instead of
    raising KeyboardInterrupt wherever the program happens to be (in a journal commit, an
    audit record, a unit's slot write). Only in the main thread, and only where SIGINT has
    its default Python handler (an ignored SIGINT stays ignored)."""
    intr = Interrupt()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield intr
        return
    signal.signal(signal.SIGINT, intr.on_sigint)
    try:
        yield intr
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _Shared:
    """What worker threads share: the authority (serialized), counters, the journal."""

    def __init__(self, journal: Journal, authority: AuthorityClient, summary: RunSummary,
                 on_unit: UnitDone | None, opts: RunOptions,
                 interrupt: Interrupt | None, identity: bool,
                 order: Order | None = None) -> None:
        self.journal = journal
        self.order = order  # called before each load's export (a BDK's initial key)
        self.identity = identity  # the campaign's set is an identity set: suite 0x03
        self.authority = authority
        self.summary = summary
        self.on_unit = on_unit
        self.opts = opts
        self.lock = threading.Lock()
        self.interrupt = interrupt or Interrupt()
        self.stop = self.interrupt.stop
        self.failed_units: set[bytes] = set()  # units with a load failed for good
        self.renewed = opts.clock()

    def keep_lease(self, campaign_id: str) -> None:
        """Renew this station's claims once a third of the lease has passed, so that a
        long batch is never taken over while it is still being worked on."""
        now = self.opts.clock()
        with self.lock:
            if now - self.renewed < self.opts.lease_s / 3:
                return
            self.renewed = now
        self.journal.renew(campaign_id, self.opts.station, self.opts.lease_s, now)


class _LockedAuthority(AuthorityClient):
    """One EXPORTKEY at a time: an authority backend may not be thread-safe."""

    def __init__(self, inner: AuthorityClient, lock: threading.Lock) -> None:
        self.conn = inner.conn
        self.suites = inner.suites
        self._inner = inner
        self._lock = lock

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        with self._lock:
            return self._inner.export(req)

    def export3(self, req: msg3.ExportRequest3) -> msg3.ExportResponse3:
        with self._lock:
            return self._inner.export3(req)


def _reconcile(client: UnitClient, row: LoadRow, *,
               identity: bool) -> tuple[bytes, bytes] | None:
    """The unit's word on a load whose outcome was not journaled: (H, KCV) when the slot
    already holds the planned version, else None (the load must run). A unit of an
    identity set answers the REF1 of a key loaded by suite 0x03 too: a slot that holds
    another REF1 does not hold this load."""
    st = client.slot_status3(row.ref2) if identity else client.slot_status(row.ref2)
    if st.h is None or st.kcv is None:
        return None
    if isinstance(st, msg3.SlotStatus3) and st.ref1 != row.ref1:
        return None
    held = KeyHeader.decode(st.h)
    if row.state == EXPORTED and row.header is not None and row.kcv is not None:
        if st.h == row.header and st.kcv == row.kcv:
            return st.h, st.kcv
        if row.version is not None and held.version >= row.version:
            return st.h, st.kcv
        return None
    if row.version is not None and held.version >= row.version:
        return st.h, st.kcv
    return None


def _process_unit(sh: _Shared, rows: list[LoadRow], connect: Connector,
                  opts: RunOptions) -> None:
    sn = rows[0].sn
    if sh.stop.is_set():
        return  # its loads stay claimed, reconciled by the next run
    with ExitStack() as stack:
        try:
            client = UnitClient(stack.enter_context(connect(sn)))
            client.select()
        except KeyloadError as e:  # no such unit, no answer: each load uses an attempt
            cause = e.cause if isinstance(e, LoadFailed) else e
            unreachable = LoadFailed(Step.UNIT_UNREACHABLE, cause)
            retry = [_failed(sh, row, unreachable, opts) for row in rows]
            if not any(retry):
                _count_unit(sh, sn)
            return
        _process_rows(sh, client, rows, opts)


def _count_unit(sh: _Shared, sn: bytes | None, *, ok: bool = True) -> None:
    """Count a unit once, when none of its loads is left to retry in this run; it is ok
    when none of its loads failed for good."""
    with sh.lock:
        ok = ok and sn not in sh.failed_units
        sh.summary.units_seen += 1
        if sh.on_unit is not None:
            sh.on_unit(ok)


def _failed(sh: _Shared, row: LoadRow, e: LoadFailed, opts: RunOptions) -> bool:
    """Journal a failed attempt at ``row``: True when it is to be retried (a transient
    error with attempts left), False when the load has failed for good."""
    retry = is_transient(e) and row.attempts + 1 < opts.retries
    sw = None if e.sw is None else f"{e.sw:04X}"
    reason = f"{e.step}: {e.reason}"
    sh.journal.failed(row, sw, reason, opts.clock(), final=not retry)
    with sh.lock:
        if retry:
            sh.summary.loads_retried += 1
        else:
            sh.summary.loads_failed += 1
            sh.summary.failures.append((row.sn.hex(), row.ref2, sw, reason))
            sh.failed_units.add(row.sn)
    return retry


def _holds_already(client: UnitClient, row: LoadRow, e: LoadFailed,
                   sent: list[tuple[bytes, bytes]], *, identity: bool) -> bool:
    """A unit that refused IMPORTKEY 6986 (version not higher) because its slot already
    holds the very key exported (its header and KCV): a rotation's unit loaded meanwhile,
    or a campaign planned again over loaded units. Asked once; an error: no."""
    if e.step != Step.IMPORT or e.sw != 0x6986 or not sent:
        return False
    try:
        st = client.slot_status3(row.ref2) if identity else client.slot_status(row.ref2)
    except KeyloadError:
        return False
    if isinstance(st, msg3.SlotStatus3) and st.ref1 != row.ref1:
        return False
    return (st.h, st.kcv) == sent[0]


def _held_by_unit(sh: _Shared, row: LoadRow, held: tuple[bytes, bytes], same: bool) -> None:
    """Journal ``row`` imported on the unit's word (its slot holds ``held``: H and KCV),
    without a receipt; ``same``: the export journaled is that key."""
    sh.journal.imported(row, suite=row.suite if same else None, r=row.r if same else None,
                        header=held[0], kcv=held[1], rct=None, reconciled=True,
                        now=sh.opts.clock())
    with sh.lock:
        sh.summary.reconciled += 1
        sh.summary.loads_done += 1


def _load_row(sh: _Shared, client: UnitClient, row: LoadRow) -> None:
    """Reconcile a row left claimed or exported, else load it; raise LoadFailed."""
    j, s = sh.journal, sh.summary
    if row.state in (CLAIMED, EXPORTED):
        try:
            held = _reconcile(client, row, identity=sh.identity)
        except KeyloadError as e:
            raise LoadFailed(Step.UNIT_STATUS, e) from None
        if held is not None:
            same = row.state == EXPORTED and held == (row.header, row.kcv)
            _held_by_unit(sh, row, held, same)
            return
    sent: list[tuple[bytes, bytes]] = []

    def journal_export(init: msg.InitResponse | msg3.InitResponse3, suite: int,
                       resp: msg.ExportResponse) -> None:
        sent.append((resp.header, resp.kcv))
        j.exported(row, suite, init.r, resp.header, resp.kcv, sh.opts.clock())

    if sh.order is not None:
        sh.order(row)
    load = load_key3 if sh.identity else load_key
    try:
        res: LoadResult = load(client, sh.authority, row.ref1, row.ref2, select=False,
                               on_export=journal_export)
    except LoadFailed as e:
        if not _holds_already(client, row, e, sent, identity=sh.identity):
            raise
        _held_by_unit(sh, row, sent[0], False)
        return
    j.imported(row, suite=res.suite, r=res.r, header=res.header, kcv=res.kcv, rct=res.rct,
               reconciled=False, now=sh.opts.clock(), e_a=res.e_a, c_u=res.c_u)
    with sh.lock:
        s.loads_done += 1


def _process_rows(sh: _Shared, client: UnitClient, rows: list[LoadRow],
                  opts: RunOptions) -> None:
    """Reconcile, then load, each of one unit's claimed rows over a selected client.

    The unit is counted when all its rows are done or failed for good; a row to retry, or
    left claimed (Ctrl-C, the unit gone), brings it back in a later claim."""
    sh.keep_lease(rows[0].campaign)
    retry = False

    def failed(row: LoadRow, e: LoadFailed) -> None:
        nonlocal retry
        retry = _failed(sh, row, e, opts) or retry

    # a stop, or the unit gone: the rest stays claimed, reconciled by the next run
    if drive_unit(rows, lambda row: _load_row(sh, client, row), failed, stop=sh.stop.is_set) \
            and not retry:
        _count_unit(sh, rows[0].sn)


def run_campaign_cards(journal: Journal, campaign_id: str, authority: AuthorityClient,
                       cards: Iterable[UnitSource], opts: RunOptions, *,
                       on_unit: UnitDone | None = None,
                       interrupt: Interrupt | None = None,
                       identity: bool = False, order: Order | None = None) -> RunSummary:
    """Run a campaign over whatever cards the readers present (a feeder's order).

    Each card is asked who it is (INITIALIZE DOWNLOAD gives its SN; the challenge it
    makes is simply replaced by the next one), then that unit's open loads are claimed
    and run as in :func:`run_campaign`. A card that is not in the campaign, or already
    done, is left untouched and reported.
    """
    summary = RunSummary()
    sh = _Shared(journal, authority, summary, on_unit, opts, interrupt, identity, order)
    feed = iter(cards)
    with _running(sh, campaign_id):
        while not sh.stop.is_set():
            with sh.interrupt.waiting():  # nothing in flight: Ctrl-C stops the wait at once
                src = next(feed, None)
            if src is None:
                break
            try:
                with src.connect() as conn:
                    client = UnitClient(conn)
                    client.select()
                    sn = (client.initialize3 if identity else client.initialize)().sn
                    rows = journal.claim_unit(campaign_id, sn, opts.station, opts.lease_s,
                                              opts.clock())
                    if not rows:
                        summary.failures.append((sn.hex(), 0, None,
                                                 "not in this campaign, or already done"))
                        _count_unit(sh, sn, ok=False)
                        continue
                    _process_rows(sh, client, rows, opts)
            except StoreError:
                raise  # the journal's: the run cannot go on
            except KeyloadError as e:
                summary.failures.append((src.label, 0, None, f"card: {e}"))
                _count_unit(sh, None, ok=False)
    return summary


@contextmanager
def _running(sh: _Shared, campaign_id: str) -> Iterator[None]:
    """A run's frame: Ctrl-C stops it cleanly (what is in flight stays claimed, to be
    reconciled), and its counters and elapsed time are recorded however it ends."""
    t0 = time.monotonic()
    s = sh.summary
    try:
        yield
        s.interrupted = sh.stop.is_set()
    except KeyboardInterrupt:
        sh.stop.set()
        s.interrupted = True
    finally:
        sh.journal.event(campaign_id, sh.opts.station, sh.opts.clock(), s.loads_done,
                         s.loads_failed)
        s.elapsed = time.monotonic() - t0


def _batches(journal: Journal, campaign_id: str, opts: RunOptions,
             stop: threading.Event) -> Iterator[list[list[LoadRow]]]:
    while not stop.is_set():
        rows = journal.claim(campaign_id, opts.station, opts.batch_units, opts.lease_s,
                             opts.clock())
        if not rows:
            return
        yield [list(g) for _, g in groupby(rows, key=lambda r: r.seq)]


def run_campaign(journal: Journal, campaign_id: str, authority: AuthorityClient,
                 connect: Connector, opts: RunOptions, *,
                 on_unit: UnitDone | None = None,
                 interrupt: Interrupt | None = None, identity: bool = False,
                 order: Order | None = None) -> RunSummary:
    """Run (or resume) a campaign until no load is left to claim, or Ctrl-C (raised, or
    asked for through ``interrupt``): then ``interrupted`` is set in the summary.
    ``identity``: the campaign's set is an identity set (its units load by suite 0x03);
    ``order``: called with each load before its export."""
    summary = RunSummary()
    sh = _Shared(journal, authority, summary, on_unit, opts, interrupt, identity, order)
    if opts.workers > 1:
        sh.authority = _LockedAuthority(authority, threading.Lock())
    last_event = opts.clock()
    with _running(sh, campaign_id):
        for batch in _batches(journal, campaign_id, opts, sh.stop):
            if opts.workers <= 1:
                for rows in batch:
                    _process_unit(sh, rows, connect, opts)
            else:
                _run_threads(sh, batch, connect, opts)
            now = opts.clock()
            if now - last_event >= 1.0:
                last_event = now
                journal.event(campaign_id, opts.station, now, summary.loads_done,
                              summary.loads_failed)
    return summary


def _run_threads(sh: _Shared, batch: list[list[LoadRow]], connect: Connector,
                 opts: RunOptions) -> None:
    it = iter(batch)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while not sh.stop.is_set():
            with lock:
                rows = next(it, None)
            if rows is None:
                return
            try:
                _process_unit(sh, rows, connect, opts)
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)
                sh.stop.set()
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(opts.workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        sh.stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
