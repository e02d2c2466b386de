"""Identity sets (suite 0x03, docs/protocol.md §10) as a home administers them: the set made
in the authority, emulated units enrolled (GENERATE UNIT KEY, the authority certifies, PUT
CERTIFICATE), units certified for enrolment elsewhere, the register and revocation."""

from __future__ import annotations

from typing import Any

from ..core import tlv
from ..core.aids import INS_GENERATE_KEY, INS_PUT_CERTIFICATE
from ..core.apdu import ResponseAPDU, encode_command
from ..core.identity import T_PUBLIC, Certificate, PutCertificate
from ..core.messages import check_sn
from ..units.authority import IdentityAdministration, SetInfo, UnitRecord
from ..units.unit import FileUnitStore, Slot, Unit, UnitState
from .fleet import EmulatedFleet
from .home import Home, Keystore

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


def _unit_apdu(unit: Unit, ins: int, data: bytes, what: str) -> bytes:
    r = ResponseAPDU.decode(unit.process_apdu(encode_command(0x80, ins, 0, 0, data, 256)))
    return r.check(f"unit {what}")


def enrol_unit(home: Home, ks: Keystore, set_id: bytes, sn: bytes,
               slots: dict[int, Slot]) -> Certificate:
    """An emulated unit of identity set ``set_id`` (``ks``: the home's keystore, open): it
    makes d_U (GENERATE UNIT KEY), the authority certifies Q_U and registers the unit, PUT
    CERTIFICATE gives it C_U and Q_CA. An SN the register or the fleet has already is
    refused before anything is made."""
    check_sn(sn)
    sks = _identity_set(ks, set_id)
    if sks.unit_record(set_id, sn) is not None:
        raise ValueError(f"unit {sn.hex()} is already certified in set {set_id.hex()}")
    q_ca = sks.identity_set(set_id).q_ca
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    try:
        store = FileUnitStore.create(fleet.vault, UnitState.new_identity(sn, slots))
        unit = Unit(store)
        enrolled = False
        try:
            answer = _unit_apdu(unit, INS_GENERATE_KEY, b"", "GENERATE UNIT KEY")
            (q_u,) = tlv.decode(answer, (T_PUBLIC,))
            cert = sks.certify_unit(set_id, sn, q_u)
            _unit_apdu(unit, INS_PUT_CERTIFICATE, PutCertificate(cert, q_ca).encode(),
                       "PUT CERTIFICATE")
            enrolled = True
            return cert
        finally:
            unit.close()
            if not enrolled:  # no unit without its certificate is left in the fleet
                (fleet.vault.directory / store.filename).unlink(missing_ok=True)
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
