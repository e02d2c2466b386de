"""Printing for people (tables) and programs (``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
          stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out.write(line.rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def kv(pairs: Sequence[tuple[str, Any]], *, indent: str = "",
       stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    w = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        out.write(f"{indent}{k.ljust(w)}  {v}\n")


def emit_json(obj: Any, *, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def emitted(args: argparse.Namespace, obj: Any) -> bool:
    """With ``--json``, ``obj`` is printed as JSON (True); else the caller prints text."""
    if args.json:
        emit_json(obj)
    return bool(args.json)


def shown(args: argparse.Namespace, obj: Any, *lines: str) -> int:
    """``obj`` as JSON with ``--json``, else ``lines``; 0, a command's exit code when it
    did its job."""
    if not emitted(args, obj):
        for line in lines:
            print(line)
    return 0


def listed(args: argparse.Namespace, obj: Any, headers: Sequence[str],
           rows: Sequence[Sequence[Any]], *lines: str) -> int:
    """``obj`` as JSON with ``--json``, else ``rows`` as a table and then ``lines``; 0."""
    if not args.json:
        table(headers, rows)
    return shown(args, obj, *lines)
