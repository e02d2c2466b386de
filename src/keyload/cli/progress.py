"""A live progress line on stderr: done/total, rate, ETA, failures.

On a terminal it redraws one line; elsewhere it prints a line every few seconds, so logs
of long runs stay readable. It never prints key material (it only sees counts): a run
calls :meth:`Progress.update` once a unit (its ``on_unit`` callback), and the ``with``
block around the run ends the line.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TextIO


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    h, rem = divmod(int(s), 3600)
    return (f"{h}:" if h else "") + f"{rem // 60:02d}:{rem % 60:02d}"


class Progress(AbstractContextManager["Progress"]):
    def __init__(self, total: int, *, label: str = "units", stream: TextIO | None = None,
                 enabled: bool = True, interval: float | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self._last = 0.0

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.total = max(self.total, self.done)  # a total that was an estimate: never below
        if not ok:
            self.failed += 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 28
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        return (f"[{bar}] {self.done}/{self.total} {self.label}  {rate:,.0f}/s  "
                f"ETA {_fmt_time(eta)}  failed {self.failed}")

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.done != self.total:
            self.stream.write("\n")
            self.stream.flush()


def bars(show: bool) -> Callable[[int, str], Progress]:
    """A progress line over ``total`` units, shown when ``show`` and there are any."""
    return lambda total, label: Progress(max(total, 1), label=label, enabled=show and total > 0)
