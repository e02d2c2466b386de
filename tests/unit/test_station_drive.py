"""The per-unit driver that customizing a set and the campaigns share: loads in order,
each failure handed to the caller, the rest left when the unit is lost or a stop is
asked for."""

from __future__ import annotations

from collections.abc import Callable

from keyload.core.errors import PolicyRefused, TransportError
from keyload.station.drive import drive_unit
from keyload.station.load import LoadFailed, Step


def _loads(fail: dict[int, LoadFailed]
           ) -> tuple[list[int], list[tuple[int, Step]], Callable[[int], None]]:
    ran: list[int] = []
    failed: list[tuple[int, Step]] = []

    def run(n: int) -> None:
        ran.append(n)
        if n in fail:
            raise fail[n]

    return ran, failed, run


def test_a_refused_load_is_handed_over_and_the_next_one_runs() -> None:
    ran, failed, run = _loads({2: LoadFailed(Step.EXPORT, PolicyRefused("no"))})
    assert drive_unit([1, 2, 3], run, lambda n, e: failed.append((n, e.step))) is True
    assert ran == [1, 2, 3] and failed == [(2, Step.EXPORT)]


def test_a_lost_unit_leaves_the_rest_of_its_loads() -> None:
    ran, failed, run = _loads({2: LoadFailed(Step.IMPORT, TransportError("card removed"))})
    assert drive_unit([1, 2, 3], run, lambda n, e: failed.append((n, e.step))) is False
    assert ran == [1, 2] and failed == [(2, Step.IMPORT)]


def test_a_stop_leaves_the_loads_not_started() -> None:
    ran, failed, run = _loads({})
    assert drive_unit([1, 2, 3], run, lambda n, e: failed.append((n, e.step)),
                      stop=lambda: len(ran) == 2) is False
    assert ran == [1, 2] and failed == []
