"""Customize a set: every unit gets every planned load; one unit's failure stops nothing.

A *plan* is a list of (REF1, REF2). A unit counts as customized when all its loads
succeeded. Results (with receipts) and failures (with step, SW and reason) go to the
records; the returned :class:`Summary` is what the CLI prints as a table or JSON.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from ..core.errors import KeyloadError, TransportError
from ..transports import Connection
from .load import AuthorityClient, LoadFailed, LoadResult, UnitClient, load_key
from .progress import Progress


class UnitSource(Protocol):
    """A unit the station can reach: its SN (as listed) and a way to connect."""

    @property
    def label(self) -> str: ...

    def connect(self) -> AbstractContextManager[Connection]: ...


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
            "units_per_s": round(self.units / self.elapsed, 1) if self.elapsed else None,
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
    total: int,
    on_result: Callable[[LoadResult], None] | None = None,
    on_failure: Callable[[bytes, bytes, int, LoadFailed], None] | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Run ``plan`` on every unit; never stops on one unit's failure."""
    s = Summary()
    t0 = time.monotonic()
    for src in units:
        s.units += 1
        ok = True
        done = 0
        try:
            with src.connect() as conn:
                client = UnitClient(conn)
                first = True
                for ref1, ref2 in plan:
                    try:
                        res = load_key(client, authority, ref1, ref2, select=first)
                    except LoadFailed as e:
                        ok = False
                        done += 1
                        s.loads_failed += 1
                        sw = None if e.sw is None else f"{e.sw:04X}"
                        label = e.sn.hex() if e.sn is not None else src.label
                        s.failures.append(Failure(label, ref1, ref2, e.step, sw, e.reason))
                        if on_failure is not None:
                            on_failure(e.sn if e.sn is not None else _label_bytes(src.label),
                                       ref1, ref2, e)
                        if isinstance(e.cause, TransportError):
                            break  # the unit is gone: the rest of its plan cannot run
                        continue
                    first = False
                    done += 1
                    s.loads_ok += 1
                    s.by_suite[res.suite] += 1
                    if on_result is not None:
                        on_result(res)
        except KeyloadError as e:  # the unit could not be reached, or was lost
            ok = False
            cause = e.cause if isinstance(e, LoadFailed) else e
            step = e.step if isinstance(e, LoadFailed) else "connect"
            s.loads_failed += len(plan) - done
            s.failures.append(Failure(src.label, b"", 0, step, None, str(cause)))
        else:
            if done < len(plan):  # broke off after a transport failure
                s.loads_failed += len(plan) - done
        if ok:
            s.customized += 1
        if progress is not None:
            progress.update(ok=ok)
    s.elapsed = time.monotonic() - t0
    if progress is not None:
        progress.close()
    return s


def _label_bytes(label: str) -> bytes:
    try:
        return bytes.fromhex(label) if label else b""
    except ValueError:
        return label.encode()
