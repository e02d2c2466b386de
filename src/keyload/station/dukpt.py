"""AES DUKPT at the station: the initial keys a load of a BDK delivers (ordered from the
authority beside EXPORTKEY, docs/protocol.md Appendix D), and the working key of a KSN that an
operator checks against a terminal's first transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..core.dukpt import USAGE_BDK, WORKING_USAGES, InitialKeyId, InitialKeyOrder, KeyUsage
from ..core.errors import NoSuchKey
from ..core.keys import KeyType
from ..core.ref1 import display_ref1
from ..units.authority import Authority, AuthorityBackend
from .journal.model import Campaign, LoadRow


class DukptBackend(Protocol):
    """What checking a working key needs of an authority backend."""

    def dukpt_kcv(self, ref1: bytes, ksn: bytes, usage: KeyUsage,
                  ik_type: KeyType | None = None) -> tuple[KeyType, bytes]: ...


def initial_key_order(initial_key_id: str | None, ik_type: str | None, *,
                      reader: str | None, unit: str | None) -> InitialKeyOrder | None:
    """``keyload load``'s ``--initial-key-id`` and ``--ik-type`` as an order (None without
    them), for the emulated unit ``unit`` or the card in ``reader``. ValueError for
    ``--ik-type`` alone, or an IK ordered for neither."""
    if initial_key_id is None:
        if ik_type is not None:
            raise ValueError("--ik-type goes with --initial-key-id")
        return None
    if reader is None and unit is None:
        raise ValueError("--initial-key-id loads into a unit: give --sn or --reader")
    return InitialKeyOrder(InitialKeyId.parse(initial_key_id),
                           None if ik_type is None else KeyType.parse(ik_type))


def order_load(authority: Authority, backend: AuthorityBackend, sn: bytes, ref1: bytes,
               ref2: int, order: InitialKeyOrder | None) -> None:
    """Before a single load: a BDK needs an order (its IK is loaded, never the BDK), and
    an order needs a BDK. ValueError, before anything is sent, when one is missing; an
    unknown REF1 is left to the authority's answer (6A88)."""
    if order is None:
        refuse_bare_bdk(backend, ref1)
    else:
        authority.order_initial_key(sn, ref1, ref2, order)


def refuse_bare_bdk(backend: AuthorityBackend, ref1: bytes) -> None:
    """ValueError when ``ref1`` is a BDK: its load needs an initial key ID."""
    try:
        usage = backend.key_info(ref1).attrs.usage
    except NoSuchKey:
        return
    if usage == USAGE_BDK:
        raise ValueError(f"key {display_ref1(ref1)} is a BDK (usage {USAGE_BDK}): a load "
                         "delivers a unit's initial key, give --initial-key-id (with --sn)")


def campaign_initial_key(camp: Campaign, row: LoadRow) -> InitialKeyId | None:
    """The initial key ID a campaign's load delivers, as planned: its row's (None: the
    load is not of a BDK). A journal made before the rows kept it has the plan's base,
    counted up by the unit's place in the campaign."""
    if row.initial_key_id is not None:
        return InitialKeyId(row.initial_key_id)
    for p in camp.plan:
        if p.ref2 == row.ref2 and p.ref1 == row.ref1 and p.initial_key_id_base is not None:
            return InitialKeyId(p.initial_key_id_base).plus(row.seq)
    return None


def campaign_orders(authority: Authority, camp: Campaign) -> Callable[[LoadRow], None] | None:
    """What a campaign's run calls before each load's export (None: no load is of a
    BDK): order the IK of a BDK's load from the authority, by the ID and type planned in
    the journal, so that a resumed run, or another station, delivers the same."""
    ik_types = {(p.ref1, p.ref2): p.ik_type for p in camp.plan if p.initial_key}
    if not ik_types:
        return None

    def order(row: LoadRow) -> None:
        ik = campaign_initial_key(camp, row)
        if ik is not None and (row.ref1, row.ref2) in ik_types:
            authority.order_initial_key(row.sn, row.ref1, row.ref2,
                                        InitialKeyOrder(ik, ik_types[(row.ref1, row.ref2)]))
    return order


def working_kcv(backend: DukptBackend, ref1: bytes, ksn: bytes, usage: str,
                ik_type: KeyType | None) -> dict[str, str]:
    """The KCV of the working key of ``usage`` (pin, mac, data) for ``ksn`` under BDK
    ``ref1``, derived in the authority (the BDK never leaves it)."""
    if usage not in WORKING_USAGES:
        raise ValueError(f"--usage {usage!r}: one of {', '.join(WORKING_USAGES)}")
    kt, check = backend.dukpt_kcv(ref1, ksn, WORKING_USAGES[usage], ik_type)
    return {"ref1": display_ref1(ref1), "ksn": ksn.hex().upper(), "usage": usage,
            "type": kt.label, "kcv": check.hex().upper()}
