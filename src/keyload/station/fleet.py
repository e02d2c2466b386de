"""Emulated units on disk, as a station sees them: one sealed file per unit in a vault.

A real fleet is reached through readers (PC/SC) or the network; an emulated fleet is the
same unit application (:class:`~keyload.units.unit.Unit`) behind an in-process connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import KeyloadError, StoreError
from ..core.secret import Secret
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.storage import KekSource, Vault
from ..units.unit import FileUnitStore, Slot, Unit, UnitState
from .load import LoadFailed, Step


@dataclass(frozen=True)
class EmulatedUnitSource:
    fleet: EmulatedFleet
    sn: bytes

    @property
    def label(self) -> str:
        return self.sn.hex()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        try:
            unit = self.fleet.open_unit(self.sn)
        except KeyloadError as e:
            raise LoadFailed(Step.OPEN_UNIT, e) from None
        try:
            yield LocalConnection(unit)
        finally:
            unit.close()


class EmulatedFleet:
    """A directory of emulated units sharing one vault (KEK derived once)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    @property
    def directory(self) -> Path:
        return self.vault.directory

    @classmethod
    def open(cls, directory: Path, source: KekSource | None = None, *,
             create: bool = False) -> EmulatedFleet:
        if Vault.exists(directory):
            return cls(Vault.open(directory, source))
        if not create:
            raise StoreError(f"no units in {directory} (create one with `keyload unit create`)")
        return cls(Vault.create(directory, source))

    def create_unit(self, sn: bytes, t: Secret, slots: dict[int, Slot], *,
                    verify_key: bytes | None = None,
                    suites: tuple[int, ...] = (0x01, 0x02)) -> UnitState:
        state = UnitState.new(sn, t, slots, verify_key=verify_key, suites=suites)
        FileUnitStore.create(self.vault, state)
        return state

    def open_unit(self, sn: bytes) -> Unit:
        name = FileUnitStore.filename_for(sn)
        if not (self.directory / name).exists():
            raise StoreError(f"no emulated unit with SN {sn.hex()}")
        return Unit(FileUnitStore(self.vault, name))

    def remove_units(self, serials: list[bytes]) -> None:
        """Remove these units' files (the units a call made before it failed)."""
        for sn in serials:
            (self.directory / FileUnitStore.filename_for(sn)).unlink(missing_ok=True)

    def serials(self) -> list[bytes]:
        return sorted(bytes.fromhex(p.stem) for p in self.directory.glob("*.unit"))

    def sources(self, serials: list[bytes] | None = None) -> list[EmulatedUnitSource]:
        return [EmulatedUnitSource(self, sn) for sn in (serials or self.serials())]

    def close(self) -> None:
        self.vault.close()
