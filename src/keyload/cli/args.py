"""The one argparse helper: a command is a name, a handler, a help line and its options;
the options several commands share are defined here once."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeAlias

from ..station.home import Home

Opt = tuple[tuple[str, ...], dict[str, Any]]
Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def home_of(args: argparse.Namespace) -> Home:
    return Home.resolve(args.home)


def required(args: argparse.Namespace, *names: str) -> None:
    """argparse's own refusal (exit 2) for options a command needs only in some cases."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        args.usage_error(f"the following arguments are required: {', '.join(missing)}")


class Usage(Exception):
    """A usage error (exit 2), argparse's own or a check of a handler's."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """Its usage errors are raised (:class:`Usage`), for ``keyload`` to tell them as it
    tells every error."""

    def error(self, message: str) -> NoReturn:
        raise Usage(self, message)


class Help(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none (None, off) or says
    its own (``default …``, or the value in parentheses at the end)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, d = action.help or "", action.default
        if not action.option_strings or "default" in text or \
                d is None or d is False or d in ("", [], argparse.SUPPRESS) or \
                text.endswith(f"({d:g})" if isinstance(d, float) else f"({d})"):
            return text
        return f"{text} (default: %(default)s)"


def opt(*flags: str, **kw: Any) -> Opt:
    return flags, kw


def given(args: argparse.Namespace, opts: Iterable[Opt]) -> dict[str, Any]:
    """What ``args`` holds of the options ``opts``, by name (``--a-b``: ``a_b``)."""
    return {name: getattr(args, name) for name in (
        kw.get("dest") or flags[0].lstrip("-").replace("-", "_") for flags, kw in opts)}


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
    g: Sub = sub.add_parser(name, help=help_, description=help_, formatter_class=Help
                            ).add_subparsers(dest="sub", required=True, metavar="ACTION")
    return g


def cmd(sub: Sub, name: str, fn: Callable[[argparse.Namespace], int], help_: str,
        *opts: Opt, usage_error: bool = False) -> argparse.ArgumentParser:
    """A command with ``--home``, ``--json`` and ``opts``; ``usage_error``: its handler
    gets ``args.usage_error`` for the checks argparse cannot make."""
    p: argparse.ArgumentParser = sub.add_parser(name, parents=[common()], help=help_,
                                                description=help_, formatter_class=Help)
    p.set_defaults(func=fn)
    if usage_error:
        p.set_defaults(usage_error=p.error)
    for flags, kw in opts:
        alias(p, p.add_argument(*flags, **{k: v for k, v in kw.items() if k != "old"}),
              *kw.get("old", ()))
    return p


def alias(p: argparse.ArgumentParser, action: argparse.Action, *old: str) -> None:
    """``old`` spellings of ``action``'s option still work, unseen in help, usage and
    messages (scripts written before a rename keep running)."""
    for flag in old:
        p._option_string_actions[flag] = action


NAME = opt("name", help="the campaign's name")
QUIET = opt("--quiet", action="store_true", help="no progress line")
SN = opt("--sn", required=True, help="the unit's serial number (SN), hex (1-32 bytes)")
SET_ID = opt("--set", required=True, dest="set_id", help="set id (hex)")
JOURNAL = opt("--journal", help="journal: a SQLite file (default HOME/journal.db) or a "
                                "postgresql:// URL shared by stations")
CAMPAIGN = opt("--campaign", help="only this campaign")
STATE = opt("--state", help="the service's state (keyload serve --state): a SQLite file or a "
                            "postgresql:// URL; default HOME/service.db when it exists. "
                            "Without it, --campaign leaves the service's ledger out")
