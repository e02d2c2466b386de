"""Identity sets (suite 0x03, docs/protocol.md §10) as a home administers them: the set made
in the authority, units enrolled (GENERATE UNIT KEY, the authority certifies, PUT
CERTIFICATE) — emulated ones in process, cards in a PC/SC reader, both by one
:func:`enrol` over a connection —, units certified for enrolment elsewhere, the register
and revocation.

A card's SN: §10 gives a unit no way to tell its SN before it is enrolled (INITIALIZE
DOWNLOAD answers 6985 until PUT CERTIFICATE, GENERATE UNIT KEY answers Q_U alone), so the
operator names it (``keyload unit enrol --sn``), as printed on the card or in the
manufacturer's list. The card checks it: a certificate whose subject is not its own SN is
refused (6982) and nothing is stored in the card; the authority has registered that SN by
then (it certified before the card could check), so ``unit list --set`` shows it and
``unit revoke`` retires it. The card keeps the key pair it made: §10.2 lets no key be made
twice, so such a card cannot be enrolled again.
"""

from __future__ import annotations

from typing import Any

from ..core import tlv
from ..core.aids import INS_GENERATE_KEY, INS_PUT_CERTIFICATE
from ..core.apdu import ResponseAPDU, encode_command
from ..core.errors import SW, StatusError
from ..core.identity import T_PUBLIC, Certificate, PutCertificate
from ..core.messages import check_sn
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import IdentityAdministration, SetInfo, UnitRecord
from ..units.unit import FileUnitStore, Slot, Unit, UnitState
from .fleet import EmulatedFleet
from .home import Home, Keystore
from .load import UnitClient

# the subject of C_A in the identity sets a home makes (docs/protocol.md §10.1)
AUTHORITY_ID = b"keyload authority"


def record_json(r: UnitRecord) -> dict[str, Any]:
    return {"set_id": r.set_id.hex(), "sn": r.sn.hex(),
            "status": "revoked" if r.revoked else "active",
            "certificate": r.certificate.encode().hex()}


def create_identity_set(home: Home, name: str) -> SetInfo:
    """A new identity set: the set CA key, the authority key and C_A, made in the
    authority (a backend that holds none refuses: ValueError, nothing made)."""
    ks = home.open_keystore()
    try:
        unique_name(ks, name)
        return ks.generate_identity_set(name, authority_id=AUTHORITY_ID)
    finally:
        ks.close()


def unique_name(ks: Keystore, name: str) -> None:
    """Sets are told apart by name in lists and reports: one set per name."""
    taken = [i.set_id.hex() for i in ks.set_infos() if i.name == name]
    if taken:
        raise ValueError(f"a set named {name!r} exists already (set id {taken[0]})")


def _identity_set(ks: Keystore, set_id: bytes) -> IdentityAdministration:
    """The keystore holding identity set ``set_id`` (an unknown set: 6A82); ValueError
    when ``set_id`` is a transport-key set."""
    info: SetInfo = ks.set_info(set_id)
    if not info.identity or not isinstance(ks, IdentityAdministration):
        raise ValueError(f"set {set_id.hex()} is a transport-key set, not an identity set "
                         "(keyload set create --identity)")
    return ks


# what a unit's refusal of an enrolment command means (docs/protocol.md §10.2)
ENROL_MEANING = {
    0x6985: "the unit has its key already, or its certificate (enrolled before; a unit of a "
            "transport-key set has no identity to enrol)",
    0x6982: "the unit refused its certificate (its SN or its key is not the certificate's: "
            "is the SN given the unit's own?)",
    0x6A80: "malformed data",
    0x6D00: "the unit does not do enrolment",
    0x6581: "memory failure in the unit: nothing was stored",
}


def _enrol_call(conn: Connection, ins: int, data: bytes, what: str) -> bytes:
    """One enrolment command; its answer's data, or a StatusError naming the command and
    what its status word means there."""
    r = ResponseAPDU.decode(conn.transmit(encode_command(0x80, ins, 0, 0, data, 256)))
    if r.sw != SW.SUCCESS:
        raise StatusError(sw=r.sw, message=f"unit {what}: {r.sw:04X} "
                                           f"{ENROL_MEANING.get(r.sw, 'refused')}")
    return r.data


def check_new_unit(ks: Keystore, set_id: bytes, sn: bytes) -> None:
    """``set_id`` is an identity set (an unknown set: 6A82) whose register does not hold
    ``sn`` yet, else ValueError: checked before a unit is made or touched."""
    check_sn(sn)
    if _identity_set(ks, set_id).unit_record(set_id, sn) is not None:
        raise ValueError(f"unit {sn.hex()} is already certified in set {set_id.hex()}")


def enrol(conn: Connection, ks: Keystore, set_id: bytes, sn: bytes) -> Certificate:
    """Enrol the unit at the end of ``conn`` (in process or a card in a reader) in identity
    set ``set_id`` as unit ``sn``: SELECT, GENERATE UNIT KEY (the unit makes d_U and answers
    Q_U), the authority certifies Q_U for ``sn`` and registers the unit, PUT CERTIFICATE
    gives the unit C_U and Q_CA. The unit's refusal is a StatusError with its status word,
    naming the command and what the word means there."""
    check_new_unit(ks, set_id, sn)
    sks = _identity_set(ks, set_id)
    q_ca = sks.identity_set(set_id).q_ca
    UnitClient(conn).select()
    answer = _enrol_call(conn, INS_GENERATE_KEY, b"", "GENERATE UNIT KEY")
    (q_u,) = tlv.decode(answer, (T_PUBLIC,))
    cert = sks.certify_unit(set_id, sn, q_u)
    _enrol_call(conn, INS_PUT_CERTIFICATE, PutCertificate(cert, q_ca).encode(),
                "PUT CERTIFICATE")
    return cert


def enrol_unit(home: Home, ks: Keystore, set_id: bytes, sn: bytes,
               slots: dict[int, Slot]) -> Certificate:
    """A new emulated unit of identity set ``set_id`` (``ks``: the home's keystore, open),
    enrolled by :func:`enrol` in process. An SN the register or the fleet has already is
    refused before anything is made."""
    check_new_unit(ks, set_id, sn)
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    try:
        store = FileUnitStore.create(fleet.vault, UnitState.new_identity(sn, slots))
        unit = Unit(store)
        enrolled = False
        try:
            cert = enrol(LocalConnection(unit), ks, set_id, sn)
            enrolled = True
            return cert
        finally:
            unit.close()
            if not enrolled:  # no unit without its certificate is left in the fleet
                (fleet.vault.directory / store.filename).unlink(missing_ok=True)
    finally:
        fleet.close()


def enrol_card(home: Home, reader: str, set_id: bytes, sn: bytes) -> Certificate:
    """Enrol the card in PC/SC ``reader`` as unit ``sn`` of identity set ``set_id`` (see
    the module docstring for where ``sn`` comes from); the card is unpowered at the end."""
    from ..transports.pcsc import PcscConnection

    ks = home.open_keystore()
    try:
        check_new_unit(ks, set_id, sn)  # before the card is touched
        with PcscConnection(reader) as conn:
            return enrol(conn, ks, set_id, sn)
    finally:
        ks.close()


def create_unenrolled(home: Home, set_id: bytes, sn: bytes, slots: dict[int, Slot]) -> None:
    """An emulated unit for identity set ``set_id`` that is not enrolled yet (no key, no
    certificate): served as a card (``keyload unit serve-card``), it is what a blank card
    from the manufacturer is to ``keyload unit enrol --reader``."""
    ks = home.open_keystore()
    try:
        check_new_unit(ks, set_id, sn)
    finally:
        ks.close()
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    try:
        FileUnitStore.create(fleet.vault, UnitState.new_identity(sn, slots))
    finally:
        fleet.close()


def certify_unit(home: Home, set_id: bytes, sn: bytes, public_key: bytes) -> Certificate:
    """C_U for a unit enrolled elsewhere, the unit registered as active."""
    check_sn(sn)
    ks = home.open_keystore()
    try:
        return _identity_set(ks, set_id).certify_unit(set_id, sn, public_key)
    finally:
        ks.close()


def revoke_unit(home: Home, set_id: bytes, sn: bytes) -> UnitRecord:
    """Mark a registered unit revoked: the authority answers its exports 6983."""
    ks = home.open_keystore()
    try:
        return _identity_set(ks, set_id).revoke_unit(set_id, sn)
    finally:
        ks.close()


def unit_records(home: Home, set_id: bytes) -> list[UnitRecord]:
    """The register of identity set ``set_id``: each unit certified and its status."""
    ks = home.open_keystore()
    try:
        return sorted(_identity_set(ks, set_id).unit_records(set_id), key=lambda r: r.sn)
    finally:
        ks.close()
