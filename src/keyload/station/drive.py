"""One unit through its loads: the driver that :func:`~.customize.customize` (a plan over
units) and the campaigns (:mod:`.campaign`: journal rows, reconciled first) share.

Each load runs in order; a failed load is handed to the caller and the next one runs,
except after a transport error: the unit is gone, and the rest of its loads are left.
A stop (Ctrl-C, see :class:`~.campaign.Interrupt`) leaves the loads not yet started.
What a load is, how it runs and what becomes of a failure are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from ..core.errors import TransportError
from ..transports import Connection
from .load import LoadFailed

L = TypeVar("L")


class UnitSource(Protocol):
    """A unit the station can reach: its SN (as listed) and a way to connect."""

    @property
    def label(self) -> str: ...

    def connect(self) -> AbstractContextManager[Connection]: ...


UnitDone = Callable[[bool], None]
"""Called once a unit is done, with True when none of its loads failed (a progress line's
``update``): the station's progress callback."""


def drive_unit(loads: Iterable[L], run: Callable[[L], None],
               failed: Callable[[L, LoadFailed], None], *,
               stop: Callable[[], bool] | None = None) -> bool:
    """Run each of one unit's ``loads`` with ``run`` (which raises LoadFailed); hand each
    failure to ``failed``. True when every load ran to an outcome; False when some were
    left: a stop was asked for, or a transport error lost the unit."""
    for load in loads:
        if stop is not None and stop():
            return False
        try:
            run(load)
        except LoadFailed as e:
            failed(load, e)
            if isinstance(e.cause, TransportError):
                return False  # the unit is gone: the rest cannot run
    return True
