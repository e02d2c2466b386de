"""Printing for people (tables) and programs (``--json``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """``rows`` in columns as wide as their widest cell, under ``headers``: the lines."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [list(headers), ["-" * w for w in widths], *cells]]


def aligned(pairs: Sequence[tuple[str, Any]], *, indent: str = "") -> list[str]:
    """``name  value`` lines, the values in one column."""
    w = max((len(k) for k, _ in pairs), default=0)
    return [f"{indent}{k.ljust(w)}  {v}" for k, v in pairs]


def shown(args: argparse.Namespace, obj: Any, *lines: str) -> int:
    """``obj`` as JSON with ``--json``, else ``lines``; 0, a command's exit code when it
    did its job."""
    if args.json or lines:
        print(json.dumps(obj, indent=2) if args.json else "\n".join(lines))
    return 0


def listed(args: argparse.Namespace, obj: Any, headers: Sequence[str],
           rows: Sequence[Sequence[Any]], *lines: str) -> int:
    """``obj`` as JSON with ``--json``, else ``rows`` as a table and then ``lines``; 0."""
    return shown(args, obj, *table(headers, rows), *lines)
