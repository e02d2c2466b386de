"""Customize a set: every unit gets every planned load; one unit's failure stops nothing.

A *plan* is a list of (REF1, REF2). A unit counts as customized when all its loads
succeeded. Results (with receipts) and failures (with step, SW and reason) go to the
records; the returned :class:`Summary` is what the CLI prints as a table or JSON.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..core.errors import KeyloadError
from .drive import UnitDone, UnitSource, drive_unit
from .load import AuthorityClient, LoadFailed, LoadResult, UnitClient, load_key


@dataclass(frozen=True, slots=True)
class Failure:
    unit: str
    ref1: bytes
    ref2: int
    step: str
    sw: str | None
    reason: str


@dataclass
class Summary:
    units: int = 0
    customized: int = 0
    loads_ok: int = 0
    loads_failed: int = 0
    elapsed: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    by_suite: Counter[int] = field(default_factory=Counter)

    @property
    def failed_units(self) -> int:
        return self.units - self.customized

    def failures_by_sw(self) -> Counter[tuple[str, str]]:
        return Counter((f.sw or "-", f.step) for f in self.failures)

    def to_json(self) -> dict[str, object]:
        return {
            "units": self.units, "customized": self.customized, "failed": self.failed_units,
            "loads_ok": self.loads_ok, "loads_failed": self.loads_failed,
            "elapsed_s": round(self.elapsed, 3),
            "units_per_s": round(self.units / self.elapsed, 1) if self.elapsed and self.units
            else None,
            "loads_by_suite": {f"{k:#04x}": v for k, v in sorted(self.by_suite.items())},
            "failures": [{"unit": f.unit, "ref1": f.ref1.hex(), "ref2": f.ref2,
                          "step": f.step, "sw": f.sw, "reason": f.reason}
                         for f in self.failures],
        }


def customize(
    units: Iterable[UnitSource],
    plan: list[tuple[bytes, int]],
    authority: AuthorityClient,
    *,
    on_result: Callable[[LoadResult], None] | None = None,
    on_failure: Callable[[bytes, bytes, int, LoadFailed], None] | None = None,
    on_unit: UnitDone | None = None,
) -> Summary:
    """Run ``plan`` on every unit (:func:`~.drive.drive_unit`); never stops on one unit's
    failure. ``on_unit(ok)`` is called once a unit is done."""
    s = Summary()
    t0 = time.monotonic()
    for src in units:
        s.units += 1
        ok = _customize_unit(src, plan, authority, s, on_result, on_failure)
        if ok:
            s.customized += 1
        if on_unit is not None:
            on_unit(ok)
    s.elapsed = time.monotonic() - t0
    return s


def _customize_unit(src: UnitSource, plan: list[tuple[bytes, int]], authority: AuthorityClient,
                    s: Summary, on_result: Callable[[LoadResult], None] | None,
                    on_failure: Callable[[bytes, bytes, int, LoadFailed], None] | None
                    ) -> bool:
    """One unit through the plan, counted in ``s``: True when every load succeeded."""
    ran = 0
    ok = True
    try:
        with src.connect() as conn:
            client = UnitClient(conn)
            selected = False  # until a load succeeds, each one selects the application

            def run(load: tuple[bytes, int]) -> None:
                nonlocal ran, selected
                res = load_key(client, authority, load[0], load[1], select=not selected)
                selected = True
                ran += 1
                s.loads_ok += 1
                s.by_suite[res.suite] += 1
                if on_result is not None:
                    on_result(res)

            def failed(load: tuple[bytes, int], e: LoadFailed) -> None:
                nonlocal ran, ok
                ok = False
                ran += 1
                s.loads_failed += 1
                sw = None if e.sw is None else f"{e.sw:04X}"
                label = e.sn.hex() if e.sn is not None else src.label
                s.failures.append(Failure(label, load[0], load[1], e.step, sw, e.reason))
                if on_failure is not None:
                    on_failure(e.sn if e.sn is not None else _label_bytes(src.label),
                               load[0], load[1], e)

            drive_unit(plan, run, failed)
    except KeyloadError as e:  # the unit could not be reached, or was lost
        ok = False
        cause = e.cause if isinstance(e, LoadFailed) else e
        step = e.step if isinstance(e, LoadFailed) else "connect"
        s.failures.append(Failure(src.label, b"", 0, step, None, str(cause)))
    s.loads_failed += len(plan) - ran  # left: broke off after a transport failure
    return ok


def _label_bytes(label: str) -> bytes:
    try:
        return bytes.fromhex(label) if label else b""
    except ValueError:
        return label.encode()
