"""Enrolling many emulated units of an identity set at once (docs/protocol.md §10.1): the
authority and the fleet are opened once for all of them, each unit makes d_U (GENERATE
UNIT KEY), the authority certifies Q_U and registers the unit, PUT CERTIFICATE gives it
C_U and Q_CA.

Any authority that can certify (:class:`Certifier`) enrols; one that cannot is refused
before a unit is made."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..core import tlv
from ..core.aids import COMMAND_NAMES, INS_GENERATE_KEY, INS_PUT_CERTIFICATE
from ..core.apdu import ResponseAPDU, encode_command
from ..core.identity import T_PUBLIC, Certificate, PutCertificate
from ..units.authority import IdentitySetInfo
from ..units.unit import FileUnitStore, Slot, Unit, UnitState
from .campaign import Interrupt
from .drive import UnitDone
from .fleet import EmulatedFleet


@runtime_checkable
class Certifier(Protocol):
    """What enrolment needs of the authority's backend: the set's public part, and C_U
    issued and registered for many units at once (the register saved once)."""

    def identity_set(self, set_id: bytes) -> IdentitySetInfo: ...

    def certify_units(self, set_id: bytes, units: Sequence[tuple[bytes, bytes]]
                      ) -> list[Certificate]: ...


def certifier(ks: object) -> Certifier:
    """``ks`` as a :class:`Certifier`; ValueError for a backend that certifies no units."""
    if not isinstance(ks, Certifier):
        raise ValueError(f"this authority ({type(ks).__name__}) cannot certify the units of "
                         "an identity set")
    return ks


def _command(unit: Unit, ins: int, data: bytes) -> bytes:
    answer = unit.process_apdu(encode_command(0x80, ins, 0, 0, data, 256))
    return ResponseAPDU.decode(answer).check(f"unit {COMMAND_NAMES[ins]}")


BATCH = 100  # units made before the authority certifies them all (one register write)


def enrol_units(fleet: EmulatedFleet, ks: Certifier, set_id: bytes, serials: Sequence[bytes],
                slots: dict[int, Slot], *, on_unit: UnitDone | None = None,
                interrupt: Interrupt | None = None, batch: int | None = None) -> int:
    """Make and enrol one emulated unit of identity set ``set_id`` per SN, each with
    ``slots``; how many. Units are made ``batch`` (default ``BATCH``) at a time (GENERATE
    UNIT KEY), certified together, then each given its certificate (PUT CERTIFICATE). When
    anything fails, the units of the batch not yet enrolled are removed from the fleet
    (none is left without its certificate) and the failure raised."""
    q_ca = ks.identity_set(set_id).q_ca
    size = max(batch or BATCH, 1)
    for first in range(0, len(serials), size):
        _enrol_batch(fleet, ks, set_id, q_ca, serials[first:first + size], slots, on_unit,
                     interrupt)
    return len(serials)


def _enrol_batch(fleet: EmulatedFleet, ks: Certifier, set_id: bytes, q_ca: bytes,
                 serials: Sequence[bytes], slots: dict[int, Slot],
                 on_unit: UnitDone | None, interrupt: Interrupt | None) -> None:
    made: list[tuple[bytes, Unit, str]] = []
    try:
        keys: list[tuple[bytes, bytes]] = []
        for sn in serials:
            if interrupt is not None:
                interrupt.check()
            store = FileUnitStore.create(fleet.vault, UnitState.new_identity(sn, dict(slots)))
            made.append((sn, Unit(store), store.filename))
            (q_u,) = tlv.decode(_command(made[-1][1], INS_GENERATE_KEY, b""), (T_PUBLIC,))
            keys.append((sn, q_u))
        for cert in ks.certify_units(set_id, keys):
            unit = made[0][1]
            _command(unit, INS_PUT_CERTIFICATE, PutCertificate(cert, q_ca).encode())
            made.pop(0)
            unit.close()
            if on_unit is not None:
                on_unit(True)
    finally:
        for _, unit, filename in made:  # not enrolled: removed
            unit.close()
            (fleet.directory / filename).unlink(missing_ok=True)
