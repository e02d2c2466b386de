"""``keyload --help`` and each command's: every option and positional argument says what
it is, and its default when it has one; renamed options keep their old spelling working,
unseen in help."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from keyload.cli.main import build_parser


def _parsers(p: argparse.ArgumentParser, path: str = "keyload"
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _options() -> Iterator[tuple[str, argparse.Action]]:
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
                yield path, a


def test_every_option_and_argument_has_help() -> None:
    bare = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _options()
            if not (a.help or "").strip()]
    assert bare == []


def test_a_default_is_told() -> None:
    helps = {(path, a.dest): p.format_help() for path, p in _parsers(build_parser())
             for a in p._actions}
    run = helps[("keyload campaign run", "batch")]
    assert " ".join(run.split()).count("(default: 32)") == 1
    # an option without a default says none
    assert "(default: None)" not in "".join(helps.values())
    assert "(default: False)" not in "".join(helps.values())


def test_every_command_has_a_description() -> None:
    assert [path for path, p in _parsers(build_parser()) if not p.description] == []


def test_exportability_values_are_explained() -> None:
    gen = dict(_parsers(build_parser()))["keyload key generate"].format_help()
    text = " ".join(gen.split())
    for value in ("E:", "N:", "S:"):
        assert value in text, value


KEY = ["--ref1", "K", "--type", "aes256", "--usage", "P0", "--mode", "E", "--exportability",
       "E", "--sets", "any", "--slots", "any"]
TLS = ["--ca", "c", "--cert", "c", "--key", "k"]


@pytest.mark.parametrize("command, old, new, dest, value", [
    (["key", "generate", *KEY], "--version", "--key-version", "key_version", 3),
    (["load", "--ref1", "K", "--ref2", "1"], "--unit", "--sn", "sn", "0a"),
    (["fetch", "--server", "https://s", *TLS], "--unit", "--sn", "sn", "0a"),
    (["campaign", "run", "c"], "--workers", "--threads", "threads", 2),
    (["serve"], "--workers", "--processes", "processes", 2),
    (["pki", "client", "--dir", "d"], "--name", "--client", "client", "alice")])
def test_an_old_spelling_works_unseen(command: list[str], old: str, new: str, dest: str,
                                      value: object) -> None:
    parser = build_parser()
    for flag in (old, new):
        assert getattr(parser.parse_args([*command, flag, str(value)]), dest) == value
    path = " ".join(["keyload", *(w for w in command[:2] if not w.startswith("-"))])
    shown = dict(_parsers(parser))[path].format_help()
    assert new in shown and f"{old} " not in shown and f"{old}," not in shown
