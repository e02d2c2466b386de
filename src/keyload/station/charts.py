"""Self-contained SVG charts for reports (no script, no fetch): a line over UTC time
with its gaps shaded, and horizontal bars, each with axes ticked in real units.

Every label is escaped here; callers pass plain text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

WIDTH = 720
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    note: str = ""  # shown after the value (e.g. a count beside a rate)


def nice_step(rough: float) -> float:
    """The smallest of 1, 2, 5 × 10^k at least ``rough`` (> 0).

    >>> nice_step(0.03), nice_step(7), nice_step(120)
    (0.05, 10, 200)
    """
    k = math.floor(math.log10(rough))
    for m in (1, 2, 5, 10):
        step = m * 10.0 ** k
        if step >= rough * (1 - 1e-9):
            return round(step, 12) if k < 0 else int(step)
    raise AssertionError("unreachable")  # pragma: no cover


_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
               21600, 43200, 86400)


def time_step(span: float, ticks: int = 6) -> float:
    """A tick step (seconds) that reads well on a clock, about ``ticks`` over ``span``."""
    rough = span / ticks
    if rough < 1:
        return nice_step(max(rough, 0.001))
    return float(next((s for s in _TIME_STEPS if s >= rough), nice_step(rough / 86400) * 86400))


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:,.3g}"


def _clock(t: float, step: float) -> str:
    d = utc(t)
    if step < 1:
        return d.strftime("%H:%M:%S.") + f"{d.microsecond // 1000:03d}"[:2]
    return d.strftime("%H:%M:%S")


def _svg(height: int, label: str, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
            f'width="{WIDTH}" height="{height}" role="img" aria-label="{escape(label)}">'
            f'<rect width="100%" height="100%" fill="#fff"/>{body}</svg>')


def time_chart(segments: Sequence[Sequence[tuple[float, float]]],
               gaps: Sequence[tuple[float, float]], *, y_label: str, title: str,
               height: int = 260) -> str:
    """Points (UTC seconds, value) as one line per segment; ``gaps`` (start, end) shaded
    between them, the line broken there. The x axis is ticked in UTC HH:MM:SS."""
    pts = [p for seg in segments for p in seg]
    if not pts:
        return ""
    left, right, top, bottom = 64, 16, 16, 40
    t0 = min([p[0] for p in pts] + [g[0] for g in gaps])
    t1 = max([p[0] for p in pts] + [g[1] for g in gaps])
    if t1 <= t0:
        t0, t1 = t0 - 0.5, t1 + 0.5
    ystep = nice_step(max(max(p[1] for p in pts), 1e-9) / 4)
    ymax = ystep * max(1, math.ceil(max(p[1] for p in pts) / ystep))
    w, h = WIDTH - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + w * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return top + h - h * v / ymax

    out = []
    for a, b in gaps:
        out.append(f'<rect class="gap" x="{x(a):.1f}" y="{top}" width="{max(x(b) - x(a), 1):.1f}"'
                   f' height="{h}" fill="#eee" stroke="#bbb" stroke-dasharray="3 3">'
                   f'<title>no loads for {b - a:,.0f} s (paused or interrupted)</title></rect>')
    n = 0
    while n * ystep <= ymax * (1 + 1e-9):
        v = n * ystep
        out.append(f'<line class="ytick" x1="{left - 4}" y1="{y(v):.1f}" x2="{left + w}" '
                   f'y2="{y(v):.1f}" stroke="#e4e4e4"/><text x="{left - 6}" y="{y(v) + 4:.1f}" '
                   f'text-anchor="end" {_FONT}>{_fmt(v)}</text>')
        n += 1
    step = time_step(t1 - t0)
    t = math.ceil(t0 / step) * step
    while t <= t1 + 1e-9:
        out.append(f'<line class="xtick" x1="{x(t):.1f}" y1="{top + h}" x2="{x(t):.1f}" '
                   f'y2="{top + h + 4}" stroke="#444"/><text x="{x(t):.1f}" y="{top + h + 16}" '
                   f'text-anchor="middle" {_FONT}>{_clock(t, step)}</text>')
        t += step
    for seg in segments:
        line = " ".join(f"{x(a):.1f},{y(v):.1f}" for a, v in seg)
        out.append(f'<polyline class="segment" fill="none" stroke="#1f6feb" stroke-width="2" '
                   f'points="{line}"/>')
        out.extend(f'<circle cx="{x(a):.1f}" cy="{y(v):.1f}" r="2" fill="#1f6feb"/>'
                   for a, v in seg if len(seg) == 1)
    out.append(f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#444"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#444"/>'
               f'<text class="axis-label" x="{left + w / 2:.1f}" y="{height - 4}" '
               f'text-anchor="middle" {_FONT}>time (UTC)</text>'
               f'<text class="axis-label" x="12" y="{top + h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + h / 2:.1f})" {_FONT}>{escape(y_label)}</text>')
    return _svg(height, title, "".join(out))


def bar_chart(bars: Sequence[Bar], *, x_label: str, title: str) -> str:
    """Horizontal bars, labelled on the left, on an axis ticked in ``x_label``'s unit."""
    if not bars:
        return ""
    left, right, top, row = 260, 170, 8, 22
    height = top + row * len(bars) + 44
    vmax = max(max(b.value for b in bars), 1e-9)
    step = nice_step(vmax / 4)
    xmax = step * max(1, math.ceil(vmax / step))
    w = WIDTH - left - right
    out = []
    for i, b in enumerate(bars):
        yy = top + i * row
        bw = w * b.value / xmax
        out.append(f'<text x="{left - 6}" y="{yy + 15}" text-anchor="end" {_FONT}>'
                   f'{escape(b.label[:44])}</text><rect class="bar" x="{left}" y="{yy + 3}" '
                   f'width="{bw:.1f}" height="{row - 6}" fill="#1f6feb">'
                   f'<title>{escape(b.label)}: {_fmt(b.value)}</title></rect>'
                   f'<text x="{left + bw + 4:.1f}" y="{yy + 15}" {_FONT}>{_fmt(b.value)}'
                   f'{escape(" " + b.note if b.note else "")}</text>')
    base = top + row * len(bars)
    n = 0
    while n * step <= xmax * (1 + 1e-9):
        xx = left + w * n * step / xmax
        out.append(f'<line class="xtick" x1="{xx:.1f}" y1="{base}" x2="{xx:.1f}" y2="{base + 4}"'
                   f' stroke="#444"/><text x="{xx:.1f}" y="{base + 16}" text-anchor="middle" '
                   f'{_FONT}>{_fmt(n * step)}</text>')
        n += 1
    out.append(f'<line x1="{left}" y1="{base}" x2="{left + w}" y2="{base}" stroke="#444"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#444"/>'
               f'<text class="axis-label" x="{left + w / 2:.1f}" y="{base + 34}" '
               f'text-anchor="middle" {_FONT}>{escape(x_label)}</text>')
    return _svg(height, title, "".join(out))
