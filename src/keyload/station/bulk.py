"""Many emulated units of one set in one call (``keyload unit create --count N --sn-start
HEX`` or ``--manifest CSV``), as a card manufacturer delivers a batch: the authority and
the fleet are opened once for all of them, the set's transport key is read once, and a unit
of an identity set is certified with the others in one write of the authority's register.

All or nothing: the SNs are checked first (hex, 1 to 32 bytes, none twice, none a unit of
the home already, none in an identity set's register), and a failure while the units are
made (a full disk, Ctrl-C) removes the ones made, so that a refused or failed call leaves
the fleet as it was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.messages import check_sn
from ..core.notation import parse_sn
from ..units.unit import Slot
from .admin import Typed, check_unit_suites, unit_key, unit_serials
from .enrolment import certifier, enrol_units
from .fleet import EmulatedFleet
from .home import Home
from .identity import check_new_unit
from .plan import read_manifest

SHOWN = 3  # SNs named in a refusal: the first few, then how many more


def serial_range(sn_start: str, count: int) -> list[bytes]:
    """``count`` SNs from ``sn_start`` (hex) up, each as wide as ``sn_start``; a range that
    would run past the largest SN of that width is refused.

    >>> [s.hex() for s in serial_range("0A0B0C0DFE", 3)]
    ['0a0b0c0dfe', '0a0b0c0dff', '0a0b0c0e00']
    """
    start = parse_sn(sn_start)
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    first, width = int.from_bytes(start, "big"), len(start)
    if first + count > 1 << (8 * width):
        raise ValueError(f"--count {count} from SN {start.hex()} runs past "
                         f"{'ff' * width}, the last SN of {width} bytes")
    return [(first + i).to_bytes(width, "big") for i in range(count)]


def serials_of(*, sn_start: str | None, count: int | None, manifest: str | None
               ) -> list[bytes]:
    """The SNs asked for: a range (``sn_start``, ``count``) or a manifest (a CSV with an
    ``sn`` column, or one SN per line, or a JSON list; none listed twice, none missing)."""
    if manifest is None:
        assert sn_start is not None and count is not None
        return serial_range(sn_start, count)
    serials = read_manifest(Path(manifest)).serials
    if not serials:
        raise ValueError(f"{manifest}: no SN listed, no unit created")
    return serials


def _named(serials: list[bytes]) -> str:
    more = len(serials) - SHOWN
    return ", ".join(s.hex() for s in serials[:SHOWN]) + (f" and {more} more" if more > 0
                                                          else "")


@dataclass(frozen=True)
class UnitsMade:
    """What :func:`create_units` made: the units of ``set_id`` (enrolled: an identity
    set's, each with its certificate), in the order asked, each with ``slots``."""

    set_id: bytes
    serials: list[bytes]
    slots: list[int]
    enrolled: bool

    def to_json(self) -> dict[str, Any]:
        return {"set_id": self.set_id.hex(), "count": len(self.serials), "slots": self.slots,
                "enrolled": self.enrolled, "units": [s.hex() for s in self.serials]}

    def told(self) -> str:
        first, last = self.serials[0].hex(), self.serials[-1].hex()
        return (f"{len(self.serials):,} units {'enrolled' if self.enrolled else 'created'} "
                f"in set {self.set_id.hex()} with slots "
                f"{', '.join(map(str, self.slots))}: {first}" +
                (f" … {last}" if len(self.serials) > 1 else ""))


def create_units(home: Home, set_id: bytes, serials: list[bytes], slots: dict[int, Slot],
                 suites: tuple[int, ...] | None, *, typed: Typed | None = None) -> UnitsMade:
    """One emulated unit of set ``set_id`` per SN, each with ``slots`` (and ``suites``,
    or ``typed``: the set's transport key in components), as
    :func:`~keyload.station.admin.create_unit` makes one; all or none (module docstring)."""
    check_unit_suites(suites)
    for sn in serials:
        check_sn(sn)
    twice = [sn for sn, n in Counter(serials).items() if n > 1]
    if twice:
        raise ValueError(f"SN {_named(twice)} asked for twice: no unit created")
    clash = sorted(set(serials) & set(unit_serials(home)))
    if clash:
        raise ValueError(f"{len(clash)} of the {len(serials)} SNs are units of this home "
                         f"already ({_named(clash)}): no unit created")
    ks = home.open_keystore()
    try:
        key = unit_key(ks, set_id, suites, typed)
        if key.identity:
            for sn in serials:
                check_new_unit(ks, set_id, sn)  # none in the register yet
            fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
            try:  # one batch: the register is written once, after every unit made its key
                enrol_units(fleet, certifier(ks), set_id, serials, slots, batch=len(serials))
            finally:
                fleet.close()
            return UnitsMade(set_id, serials, sorted(slots), True)
    finally:
        ks.close()
    assert key.t is not None
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    made: list[bytes] = []
    try:
        for sn in serials:
            fleet.create_unit(sn, key.t, dict(slots), verify_key=key.verify_key,
                              suites=key.suites)
            made.append(sn)
    except BaseException:
        fleet.remove_units(made)
        raise
    finally:
        key.t.wipe()
        fleet.close()
    return UnitsMade(set_id, serials, sorted(slots), False)
