"""A remote download from the client's side: one key into one unit from the service,
its receipt delivered or kept in the outbox, and the outbox's pending receipts sent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import KeyloadError
from ..core.messages import InitResponse
from ..core.messages3 import InitResponse3
from ..station.fleet import EmulatedFleet
from ..station.load import LoadResult, UnitClient, load_key, load_key3
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.storage import KekSource
from .client import Delivery, HttpsAuthority, Outbox, Pending, ServiceClient, deliver_receipt


class IdentityUnit(UnitClient):
    """A unit of an identity set: loaded by suite 0x03 (docs/protocol.md §10.3)."""


class ExpectedUnit(UnitClient):
    """A unit in a reader that must be the one ``--sn`` names: stops before EXPORTKEY."""

    def __init__(self, conn: Connection, sn: bytes, reader: str) -> None:
        super().__init__(conn)
        self.expected, self.reader = sn, reader

    def _expected(self, sn: bytes) -> None:
        if sn != self.expected:
            raise ValueError(f"the card in reader {self.reader!r} is unit {sn.hex()}, "
                             f"not {self.expected.hex()} (--sn)")

    def initialize(self) -> InitResponse:
        init = super().initialize()
        self._expected(init.sn)
        return init

    def initialize3(self) -> InitResponse3:
        init = super().initialize3()
        self._expected(init.sn)
        return init


class ExpectedIdentityUnit(ExpectedUnit, IdentityUnit):
    """A card of an identity set that must be the unit ``--sn`` names."""


def speaks_suite3(conn: Connection) -> bool:
    """Whether the unit on ``conn`` belongs to an identity set: SELECT, then INITIALIZE
    DOWNLOAD answers the suite-0x03 shape (its challenge is replaced by the load's)."""
    probe = UnitClient(conn)
    try:
        probe.select()
        probe.initialize3()
    except KeyloadError:
        return False
    return True


@contextmanager
def unit_for(units_dir: Path, source: KekSource, sn: bytes | None,
             reader: str | None) -> Iterator[UnitClient]:
    """The unit to load: the card in ``reader`` (which must be unit ``sn`` when it is
    given), or else the emulated unit ``sn`` of ``units_dir``; an :class:`IdentityUnit`
    when it belongs to an identity set."""
    with ExitStack() as stack:
        conn: Connection
        if reader:
            from ..transports.pcsc import PcscConnection

            conn = PcscConnection(reader)
            stack.callback(conn.close)
            if speaks_suite3(conn):
                yield IdentityUnit(conn) if sn is None else ExpectedIdentityUnit(conn, sn,
                                                                                 reader)
            else:
                yield UnitClient(conn) if sn is None else ExpectedUnit(conn, sn, reader)
            return
        assert sn is not None
        fleet = EmulatedFleet.open(units_dir, source)
        stack.callback(fleet.close)
        unit = fleet.open_unit(sn)
        stack.callback(unit.close)
        kind = IdentityUnit if unit.state.identity else UnitClient
        yield kind(LocalConnection(unit))


def fetch_one(client: ServiceClient, unit: UnitClient, ref1: bytes, ref2: int, *,
              deadline: float) -> tuple[LoadResult, Delivery]:
    """Load the key into the unit from the service (suite 0x03 into a unit of an identity
    set); then its receipt, tried for ``deadline`` seconds (the key is in the unit: the
    receipt must get through, or be kept by the caller)."""
    load = load_key3 if isinstance(unit, IdentityUnit) else load_key
    res = load(unit, HttpsAuthority(client), ref1, ref2)
    return res, deliver_receipt(client, res, until=time.monotonic() + deadline)


#: What becomes of a fetch's receipts, and its exit codes (``keyload fetch --help``).
RECEIPT_RULES = (
    "Receipts are evidence: the key is in the unit before its receipt is sent, so fetch "
    "retries a receipt the service cannot take yet (429 after its Retry-After, 503, a "
    "lost connection) for --receipt-deadline seconds, then keeps it in HOME/outbox/ and "
    "exits 8 (done, evidence pending). Every fetch to a server first sends that server's "
    "pending receipts, oldest first; --resend sends only those. A pending receipt the "
    "service refuses for good (409, 404, 422...) moves to HOME/outbox/refused/ with the "
    "reason, and fetch exits 1. Exit codes: 0 done, 8 done but a receipt is pending, "
    "1 a pending receipt was refused, 9 the service is unreachable (no connection, or the "
    "TLS handshake failed), others as for every keyload command.")

#: ``keyload fetch``'s own exit codes beside every command's: a pending receipt the service
#: refused for good (the job ran but something failed), and done but evidence pending (the
#: key is loaded, its receipt kept in HOME/outbox).
EXIT_FAILED, EXIT_PENDING = 1, 8


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_key` did: the pending receipts it sent first (one report each); then,
    when it loaded a key, the load, what became of its receipt and, when the service did
    not record it, where the receipt is kept."""

    resent: list[dict[str, Any]]
    result: LoadResult | None = None
    delivery: Delivery | None = None
    kept: Path | None = None
    server: str = ""

    def to_json(self) -> dict[str, Any]:
        """What ``keyload fetch --json`` prints: the key loaded, or (``--resend``) the
        receipts sent."""
        res, d = self.result, self.delivery
        if res is None or d is None:
            return {"server": self.server, "resent": self.resent}
        return {**res.to_json(),
                "ledger": d.outcome == "recorded" and d.answer.get("status") == "recorded",
                "pending": None if self.kept is None or d.outcome != "pending"
                else str(self.kept),
                "resent": self.resent}

    def lines(self, server: str) -> list[str]:
        """What ``keyload fetch`` prints on stdout (each receipt sent again was told as it
        went, :func:`resent_told`)."""
        if self.result is not None:
            return [self.told(server)]
        return [] if self.resent else [f"no pending receipts for {server}"]

    def exit_code(self) -> int:
        """:data:`EXIT_FAILED` when the service refused a pending receipt for good,
        :data:`EXIT_PENDING` when a receipt stays pending, else 0."""
        if self.refused_resent():
            return EXIT_FAILED
        return EXIT_PENDING if self.pending() else 0

    def warnings(self, server: str, *, resend_note: bool = True) -> list[str]:
        """What ``keyload fetch`` says on stderr after its output: pending receipts the
        service refused for good; with ``resend_note``, after ``--resend``, that receipts
        are still pending."""
        refused = self.refused_resent()
        if refused:
            return [f"keyload: the service refused {len(refused)} pending receipt(s) for "
                    f"good; kept with its reason in {Path(refused[0]['path']).parent}/ (exit "
                    f"{EXIT_FAILED})"]
        if resend_note and self.result is None and self.pending():
            return [f"keyload: receipts are still pending for {server} (exit {EXIT_PENDING}: "
                    "evidence pending)"]
        return []

    def refused_resent(self) -> list[dict[str, Any]]:
        """The pending receipts sent that the service refused for good."""
        return [e for e in self.resent if e["status"] == "refused"]

    def pending(self) -> bool:
        """Whether a receipt is still pending: this load's, or one sent again."""
        return (self.delivery is not None and self.delivery.outcome == "pending") or \
            any(e["status"] == "pending" for e in self.resent)

    def notice(self, server: str, deadline: float, exit_pending: int) -> str | None:
        """What to warn of when the key is loaded but its receipt not recorded: refused
        for good, or not taken within ``deadline`` seconds (kept pending: the command
        exits ``exit_pending``)."""
        res, d = self.result, self.delivery
        assert res is not None and d is not None
        loaded = res.told(f" from {server}").removeprefix("loaded ")
        if d.outcome == "refused":  # never taken: kept as evidence all the same
            return (f"keyload: the key IS loaded ({loaded}), but the service refused its "
                    f"receipt for good ({d.error}); the receipt is kept at {self.kept}")
        if d.outcome == "pending":
            return (f"keyload: the key IS loaded ({loaded}), but the service did not take "
                    f"its receipt within {deadline:g} s ({d.error}).\nkeyload: the receipt is "
                    f"kept at {self.kept}; it will be sent by `keyload fetch --resend --server "
                    f"{server} --ca … --cert … --key …`, or by the next fetch to that server "
                    f"(exit {exit_pending}: done, evidence pending)")
        return None

    def told(self, server: str) -> str:
        """The key loaded and what became of its receipt, for people."""
        res, d = self.result, self.delivery
        assert res is not None and d is not None
        if d.outcome == "pending":
            return (f"{res.told(f' from {server}')}; receipt {res.rct.hex()} NOT recorded "
                    f"yet: kept at {self.kept}")
        return f"{res.told(f' from {server}')}, receipt {res.rct.hex()} recorded by the service"


def damaged_told(path: Path) -> str:
    """A file of the outbox that is not a pending receipt (left as it is), for people."""
    return f"keyload: warning: {path} is not a readable pending receipt (left as it is)"


def resent_told(p: Pending, entry: dict[str, Any]) -> str:
    """A pending receipt sent again (one report of :func:`send_pending`), for people."""
    what = {"recorded": "recorded by the service",
            "refused": f"REFUSED by the service ({entry['detail']}): moved to "
                       f"{entry['path']}",
            "pending": f"still pending ({entry['detail']}): kept at {entry['path']}"}
    return f"resent the receipt of {p.label}: {what[entry['status']]}"


def fetch_key(client: ServiceClient, outbox: Outbox, server: str, *, deadline: float,
              unit: Callable[[], AbstractContextManager[UnitClient]] | None = None,
              ref1: bytes = b"", ref2: int = 0, on_damaged: Callable[[Path], None],
              on_sent: Callable[[Pending, dict[str, Any]], None] | None = None) -> Fetched:
    """The server's pending receipts sent (:func:`send_pending`); then, given a ``unit``
    to open, the key ``ref1`` loaded into its slot ``ref2`` from the service and its
    receipt tried for ``deadline`` seconds (the key is in the unit: the receipt must get
    through, or it is kept in the outbox). The client is closed after."""
    try:
        resent = send_pending(client, outbox, server, deadline, on_damaged=on_damaged,
                              on_sent=on_sent)
        if unit is None:
            return Fetched(resent, server=server)
        with unit() as u:
            res, d = fetch_one(client, u, ref1, ref2, deadline=deadline)
    finally:
        client.close()
    return Fetched(resent, res, d, keep_undelivered(outbox, server, res, d), server)


def send_pending(client: ServiceClient, outbox: Outbox, server: str, deadline: float, *,
                 on_damaged: Callable[[Path], None],
                 on_sent: Callable[[Pending, dict[str, Any]], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Send the server's pending receipts, oldest first, within ``deadline`` seconds in
    all; once one stays pending, the younger ones wait too. One report per receipt, each
    also given to ``on_sent`` (when given) as it is made (a file that is not a pending
    receipt, left as it is, to ``on_damaged``)."""
    items, damaged = outbox.pending(server)
    for path in damaged:
        on_damaged(path)
    until = time.monotonic() + deadline
    blocked = ""
    report: list[dict[str, Any]] = []
    for p in items:
        entry: dict[str, Any] = {
            "file": str(p.path), "sn": p.doc.get("sn"), "ref1": p.doc.get("ref1"),
            "ref2": p.doc.get("ref2"), "key_version": p.doc.get("key_version"),
            "time": p.doc.get("time")}
        if blocked:
            entry.update(status="pending", ledger=False, detail=f"not sent: {blocked}",
                         path=str(p.path))
        else:
            d = deliver_receipt(client, p.receipt, until=until)
            if d.outcome == "recorded":
                outbox.remove(p)
                entry.update(status="recorded", ledger=True, detail=d.answer.get("status"),
                             path=None)
            elif d.outcome == "refused":
                moved = outbox.refuse(p, d)
                entry.update(status="refused", ledger=False, detail=d.error,
                             path=str(moved))
            else:
                outbox.retried(p, d)
                blocked = "an older receipt is still pending"
                entry.update(status="pending", ledger=False, detail=d.error,
                             path=str(p.path))
        report.append(entry)
        if on_sent is not None:
            on_sent(p, entry)
    return report


def keep_undelivered(outbox: Outbox, server: str, res: LoadResult, d: Delivery) -> Path | None:
    """The receipt of ``res`` kept in the outbox when the service did not record it:
    pending (sent again later), or refused for good (kept with its reason); its path."""
    if d.outcome == "recorded":
        return None
    return outbox.keep(server, res, error=d.error, attempts=d.attempts,
                       refused=(d.status or 0) if d.outcome == "refused" else None)
