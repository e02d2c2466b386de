"""The one argparse helper: a command is a name, a handler, a help line and its options;
the options several commands share are defined here once."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any, TypeAlias

from ..station.home import Home

Opt = tuple[tuple[str, ...], dict[str, Any]]
Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def home_of(args: argparse.Namespace) -> Home:
    return Home.resolve(args.home)


def required(args: argparse.Namespace, *names: str) -> None:
    """argparse's own refusal (exit 2) for options a command needs only in some cases."""
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        args.usage_error(f"the following arguments are required: {', '.join(missing)}")


def opt(*flags: str, **kw: Any) -> Opt:
    return flags, kw


@functools.cache
def common() -> argparse.ArgumentParser:
    """``--home`` and ``--json``, which every command accepts."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--home", default=argparse.SUPPRESS,
                   help="keyload home directory (default $KEYLOAD_HOME or ./keyload-home)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print machine-readable JSON")
    return p


def group(sub: Sub, name: str, help_: str) -> Sub:
    """``keyload NAME ACTION``: the actions' subparsers."""
    g: Sub = sub.add_parser(name, help=help_).add_subparsers(dest="sub", required=True,
                                                             metavar="ACTION")
    return g


def cmd(sub: Sub, name: str, fn: Callable[[argparse.Namespace], int], help_: str,
        *opts: Opt, usage_error: bool = False) -> argparse.ArgumentParser:
    """A command with ``--home``, ``--json`` and ``opts``; ``usage_error``: its handler
    gets ``args.usage_error`` for the checks argparse cannot make."""
    p: argparse.ArgumentParser = sub.add_parser(name, parents=[common()], help=help_,
                                                description=help_)
    p.set_defaults(func=fn)
    if usage_error:
        p.set_defaults(usage_error=p.error)
    for flags, kw in opts:
        p.add_argument(*flags, **kw)
    return p


NAME = opt("name")
QUIET = opt("--quiet", action="store_true")
SET_ID = opt("--set", required=True, dest="set_id", help="set id (hex)")
JOURNAL = opt("--journal", help="journal: a SQLite file (default HOME/journal.db) or a "
                                "postgresql:// URL shared by stations")
CAMPAIGN = opt("--campaign", help="only this campaign")
STATE = opt("--state", help="the service's state (keyload serve --state): a SQLite file or a "
                            "postgresql:// URL; default HOME/service.db when it exists. "
                            "Without it, --campaign leaves the service's ledger out")
