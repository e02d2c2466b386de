"""The ledger: which unit holds which key, with the unit's receipt; and its one verifier.

A :class:`LedgerEntry` is a load as one of keyload's records holds it: a single load
(``station.db``), a campaign's (the journal) or one whose receipt a field client posted
to the service (the service's state). :func:`verify_entries` checks any of them the same
way (docs/protocol.md §8):

- an entry without a receipt is a load reconciled with the unit after a crash (its slot
  status backs it): counted apart, not checked;
- an entry missing its suite, R, header or KCV is incomplete;
- its header must parse, with the entry's suite and (when the entry records one) key
  version; its KCV and R must have their sizes;
- when the caller knows the export the entry claims (the authority's export records, or
  the service's replay cache), every field that export recorded must match the entry's,
  and an export the service recorded must be receipted;
- when the caller knows the key's current description, a header at the key's version
  must carry the key's type, length and attributes;
- suites 0x01/0x02: the authority recomputes the receipt, a MAC over (set, SN, R, REF2,
  header, KCV); without the authority (:class:`CertificatesOnly`, an auditor's check)
  such an entry is not verifiable, and counted apart;
- suite 0x03 (§10.3): :func:`verify_receipt3`, with the E_A and the unit's C_U the entry
  keeps and the set's Q_CA (the authority's, or one an auditor trusts): no secret.

The receipt binds the header and the KCV (and in suite 0x03 REF1 and E_A); the export
binds what it does not (REF1, the client, the key version column). A refusal by the
authority makes an entry invalid; a store or keystore failure is raised. Nothing here
reads or writes a database: the callers turn their rows into entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core import suite3
from ..core.dukpt import USAGE_IK
from ..core.errors import KeyloadError, StatusError
from ..core.identity import ROLE_UNIT, Certificate, identity_set_id, verify_certificate
from ..core.keys import KeyHeader
from ..core.suite3 import SUITE_ECDH

# "source": "campaign" (a station's load, in the journal: "campaign" and "station" set)
# or "service" (a receipt posted to ``keyload serve``: "client" set); the columns from
# "source" on came later, at the end, so that older readers of the CSV by position still
# work; "e_a" and "c_u" (suite 0x03: what verifies its receipt) are empty for the others,
# "initial_key_id" (the AES DUKPT initial key ID of an IK delivered, docs/protocol.md
# Appendix D) for any other load.
LEDGER_FIELDS = ["campaign", "sn", "ref2", "ref1", "key_version", "kcv", "suite", "r",
                 "header", "receipt", "reconciled", "station", "time", "source", "client",
                 "set_id", "e_a", "c_u", "initial_key_id"]
KCV_LEN = 5
R_LEN = 16


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One load with its receipt (``rct`` None: reconciled with the unit, no receipt).

    ``source``: "station" (a single load), "campaign" (``campaign`` names it) or
    "service" (``client`` names who posted the receipt). ``key_version``: the version
    the record keeps in its own column (None: it keeps none). ``e_a`` and ``c_u``: in
    suite 0x03, the authority's ephemeral key and the unit's encoded certificate, which
    verify its receipt (:func:`verify_receipt3`)."""

    source: str
    time: float | None
    ref1: bytes
    key_version: int | None
    suite: int | None
    # what the receipt covers, in the MAC's order (docs/protocol.md §8), and the receipt
    set_id: bytes
    sn: bytes
    r: bytes | None
    ref2: int
    header: bytes | None
    kcv: bytes | None
    rct: bytes | None
    campaign: str | None = None
    station: str | None = None
    client: str | None = None
    reconciled: bool = False
    e_a: bytes | None = None
    c_u: bytes | None = None
    # a BDK's load (docs/protocol.md Appendix D): the initial key ID of the IK delivered
    initial_key_id: bytes | None = None

    @property
    def label(self) -> str:
        """Where the entry comes from, for people: ``station``, ``campaign NAME``, ``service``."""
        return f"campaign {self.campaign}" if self.campaign is not None else self.source

    @property
    def download(self) -> tuple[bytes, bytes, bytes, int, bytes | None]:
        """What the entry claims was downloaded: (set, SN, REF1, REF2, KCV)."""
        return self.set_id, self.sn, self.ref1, self.ref2, self.kcv

    @property
    def delivered_version(self) -> int | None:
        """The key version delivered: a campaign's is its header's when it has one (its
        own column holds the version planned)."""
        if self.source == "campaign" and self.header is not None:
            return KeyHeader.decode(self.header).version
        return self.key_version

    def to_row(self, ref1_text: str) -> dict[str, Any]:
        """The entry in the ledger export's shape (:data:`LEDGER_FIELDS`); ``ref1_text``:
        REF1 as people read it; its key version the one delivered."""
        return {"campaign": self.campaign, "sn": self.sn.hex(), "ref2": self.ref2,
                "ref1": ref1_text, "key_version": self.delivered_version,
                "kcv": None if self.kcv is None else self.kcv.hex().upper(),
                "suite": self.suite, "r": None if self.r is None else self.r.hex(),
                "header": None if self.header is None else self.header.hex(),
                "receipt": None if self.rct is None else self.rct.hex(),
                "reconciled": self.reconciled, "station": self.station, "time": self.time,
                "source": self.source, "client": self.client, "set_id": self.set_id.hex(),
                "e_a": None if self.e_a is None else self.e_a.hex(),
                "c_u": None if self.c_u is None else self.c_u.hex(),
                "initial_key_id": None if self.initial_key_id is None else
                self.initial_key_id.hex().upper()}


COMPARED = ("client", "set_id", "ref1", "ref2", "suite", "header", "kcv", "key_version")
SUITE3_COMPARED = ("e_a", "c_u")  # compared when both the export and the entry keep them


@dataclass(frozen=True, slots=True)
class Export:
    """An export as recorded where the key left (the authority's export records, or the
    service's replay cache): each field of ``recorded`` is compared with the entry's (the
    key version with the entry's column, else its header's)."""

    set_id: bytes
    ref1: bytes
    ref2: int
    suite: int
    key_version: int | None
    kcv: bytes | None
    header: bytes | None = None
    client: str | None = None
    unreceipted: str | None = None  # the service's state of an export it has no receipt for
    recorded: tuple[str, ...] = COMPARED
    # suite 0x03 (docs/protocol.md §10.5): the unit's certificate C_U and the authority's
    # ephemeral key E_A it signed its receipt over, as the export recorded them
    c_u: bytes | None = None
    e_a: bytes | None = None
    initial_key_id: bytes | None = None  # compared when ``recorded`` names it


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """A key as the authority holds it now: its version and what its header must say."""

    version: int
    key_type: int
    length: int
    usage: str
    mode: str
    exportability: str

    def header_facts(self, h: KeyHeader, initial_key_id: bytes | None) -> tuple[Any, ...]:
        """(type, length, usage, mode, exportability) a header of this key must carry: the
        key's own, or for the IK of a BDK (``initial_key_id`` given) usage B1, never
        exportable, of an AES type no longer than the BDK (the header's own)."""
        if initial_key_id is None:
            return self.key_type, self.length, self.usage, self.mode, self.exportability
        if h.key_length > self.length:
            return self.key_type, self.length, USAGE_IK, self.mode, "N"
        return h.key_type, h.key_length, USAGE_IK, self.mode, "N"


class ReceiptChecker(Protocol):
    """What verifying needs of the authority (:class:`~keyload.units.authority.Authority`),
    or of an auditor without it (:class:`CertificatesOnly`)."""

    def verify_receipt(self, *, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int,
                       h: bytes, kcv: bytes, rct: bytes) -> None:
        """Suites 0x01/0x02: None for the unit's genuine receipt; a StatusError otherwise;
        :class:`Unverifiable` where the set's keys are not at hand."""
        ...

    def q_ca(self, set_id: bytes) -> bytes | None:
        """The Q_CA of identity set ``set_id``, under which its units' certificates are
        checked (None: not known)."""
        ...


class Unverifiable(KeyloadError):
    """A receipt of suite 0x01/0x02 is a MAC under the set's keys: only the authority can
    verify it."""


@dataclass(frozen=True, slots=True)
class CertificatesOnly:
    """An auditor's checker: no authority, no secret. Suite-0x03 receipts are verified
    with the certificates the entries keep and ``trust``, the Q_CA of each identity set
    by set id (each given by whoever runs the audit); the others are
    :class:`Unverifiable`."""

    trust: Mapping[bytes, bytes]

    def __post_init__(self) -> None:
        for set_id, q_ca in self.trust.items():
            if identity_set_id(q_ca) != set_id:
                raise ValueError(f"Q_CA {q_ca.hex()[:16]}… is not the key of set "
                                 f"{set_id.hex()} (its set id is {identity_set_id(q_ca).hex()})")

    def verify_receipt(self, *, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int,
                       h: bytes, kcv: bytes, rct: bytes) -> None:
        raise Unverifiable(f"a suite {suite:#04x} receipt is verifiable by the authority only")

    def q_ca(self, set_id: bytes) -> bytes | None:
        return self.trust.get(set_id)


def verify_receipt3(e: LedgerEntry, *, q_ca: bytes | None = None) -> bool:
    """Whether ``e`` holds the unit's receipt of a suite-0x03 load (docs/protocol.md §10.3):
    RCT an ECDSA signature by the key of the entry's C_U over (SN, R, REF2, REF1, H, KCV,
    E_A), and C_U the certificate of a unit with the entry's SN in its set, valid under
    ``q_ca`` (the set's Q_CA, whose hash is the set id). Without ``q_ca`` C_U is not
    checked: only that its key signed. Needs no secret.
    """
    if e.c_u is None or e.e_a is None or e.r is None or e.header is None or e.kcv is None \
            or e.rct is None:
        return False
    try:
        c_u = Certificate.decode(e.c_u)
        if q_ca is not None:
            if identity_set_id(q_ca) != e.set_id:
                return False
            verify_certificate(c_u, q_ca=q_ca, role=ROLE_UNIT, set_id=e.set_id, subject=e.sn)
        elif c_u.subject != e.sn:
            return False
        suite3.verify_receipt3(c_u, sn=e.sn, r=e.r, ref2=e.ref2, ref1=e.ref1, h=e.header,
                               kcv_=e.kcv, e_a=e.e_a, rct=e.rct)
    except KeyloadError:
        return False
    return True


def entry_problems(e: LedgerEntry, checker: ReceiptChecker, *, export: Export | None = None,
                   matched_by: str | None = None,
                   key_now: Callable[[bytes], KeyFacts | None] | None = None) -> list[str]:
    """Why ``e``, which has a receipt, is not a genuine, consistent entry (empty when it
    is). ``export``: the export it claims, looked up by ``matched_by`` (None, with
    ``matched_by`` given: none was recorded; ``matched_by`` None: no export is known to
    compare with); ``key_now``: the current facts of a key by REF1 (None: the key is
    gone)."""
    if not e.set_id or e.suite is None or e.r is None or e.header is None or e.kcv is None \
            or e.rct is None:
        return ["incomplete record"]
    out: list[str] = []
    try:
        h: KeyHeader | None = KeyHeader.decode(e.header)
    except KeyloadError:
        h = None
    version = e.key_version if e.key_version is not None or h is None else h.version
    if export is not None:
        if export.unreceipted is not None:
            out.append(f"the export is {export.unreceipted}, not receipted")
        mine = {"client": e.client, "set_id": e.set_id, "ref1": e.ref1, "ref2": e.ref2,
                "suite": e.suite, "header": e.header, "kcv": e.kcv, "key_version": version,
                "initial_key_id": e.initial_key_id}
        differ = [name for name in export.recorded if mine[name] != getattr(export, name)]
        differ += [name for name in SUITE3_COMPARED if getattr(export, name) is not None
                   and getattr(e, name) is not None and getattr(e, name) != getattr(export, name)]
        if differ:
            out.append("differs from the export: " + ", ".join(differ))
    elif matched_by is not None:
        out.append(f"no export recorded for this {matched_by}")
    if len(e.kcv) != KCV_LEN:
        out.append(f"KCV is {len(e.kcv)} bytes, not {KCV_LEN}")
    if h is None:
        out.append("header malformed")
    else:
        if h.suite != e.suite:
            out.append("header suite differs from the entry's")
        if e.key_version is not None and h.version != e.key_version:
            out.append("header version differs from the entry's key version")
        facts = key_now(e.ref1) if key_now is not None else None
        if facts is not None and facts.version == h.version and (
                h.key_type, h.key_length, h.usage, h.mode, h.exportability) != \
                facts.header_facts(h, e.initial_key_id):
            out.append("key header's type or attributes differ from the key's")
    if len(e.r) != R_LEN:
        out.append(f"R is {len(e.r)} bytes, not {R_LEN}")
    if e.suite == SUITE_ECDH:
        q_ca = checker.q_ca(e.set_id)
        full = e if e.c_u is not None or e.e_a is not None or export is None else \
            dataclasses.replace(e, e_a=export.e_a, c_u=export.c_u)  # kept by the export only
        if full.c_u is None or full.e_a is None:
            out.append("no certificate recorded to verify this suite 0x03 receipt")
        elif q_ca is None:
            out.append(f"no Q_CA known for set {e.set_id.hex()}: its certificates cannot "
                       "be checked")
        elif not verify_receipt3(full, q_ca=q_ca):
            out.append("receipt does not verify (the unit's certificate or signature)")
        return out
    try:
        checker.verify_receipt(suite=e.suite, set_id=e.set_id, sn=e.sn, r=e.r, ref2=e.ref2,
                               h=e.header, kcv=e.kcv, rct=e.rct)
    except StatusError as err:
        out.append(f"receipt does not verify (SW {err.sw:04X})")
    except Unverifiable:
        if not out:
            raise
    return out


@dataclass(frozen=True, slots=True)
class Invalid:
    """An entry that does not verify, and why."""

    entry: LedgerEntry
    problems: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


@dataclass
class LedgerCheck:
    """How many entries verify; those reconciled without a receipt; those only the
    authority can verify (checked without it); the invalid ones."""

    verified: int = 0
    reconciled: int = 0
    invalid_entries: list[Invalid] = field(default_factory=list)
    unverifiable: int = 0

    @property
    def invalid(self) -> int:
        return len(self.invalid_entries)


def verify_entries(entries: Iterable[LedgerEntry], checker: ReceiptChecker, *,
                   export_of: Callable[[LedgerEntry], Export | None] | None = None,
                   matched_by: str = "",
                   key_now: Callable[[bytes], KeyFacts | None] | None = None) -> LedgerCheck:
    """Check every entry, in the order given (:func:`entry_problems`). ``export_of``: the
    export an entry claims, asked for every entry, those without a receipt too (so that
    they take theirs); None when no export is known to compare with."""
    out = LedgerCheck()
    for e in entries:
        export = None if export_of is None else export_of(e)
        if e.rct is None:
            out.reconciled += 1
            continue
        try:
            problems = entry_problems(e, checker, export=export,
                                      matched_by=None if export_of is None else matched_by,
                                      key_now=key_now)
        except Unverifiable:
            out.unverifiable += 1
            continue
        if problems:
            out.invalid_entries.append(Invalid(e, tuple(problems)))
        else:
            out.verified += 1
    return out
