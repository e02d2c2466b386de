"""``--json`` answers: one object with named fields, an error too (on stdout, beside its
one line on stderr), usage errors included, whether argparse or a command finds them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from .cli_helpers import assert_error, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script

EXIT_USAGE, EXIT_INPUT, EXIT_STORE = 2, 3, 4
SN = "0a0b0c0d01"


def _usage_error(res_stdout: str, rc: int, stderr: str, *needles: str) -> None:
    assert rc == EXIT_USAGE
    err = json.loads(res_stdout)["error"]
    assert err["code"] == "usage" and err["exit"] == EXIT_USAGE
    last = stderr.splitlines()[-1]
    assert last.endswith(f"error: {err['message']}") and "Traceback" not in stderr
    for n in needles:
        assert n in err["message"]


@pytest.mark.parametrize("args, needle", [
    (("key", "generate", "--ref1", "K"), "--type"),  # argparse: required options missing
    (("set", "create", "--name", "x", "--components", "two"), "--components"),  # bad type
    (("campaign", "run", "c", "--threads"), "--threads"),  # a value missing
    (("load", "--ref1", "K", "--ref2", "1"), "--sn"),  # the command's own check
    (("fetch", "--server", "https://h", "--ca", "c", "--cert", "c", "--key", "k", "--resend",
      "--sn", SN), "--resend"),
])
def test_usage_errors_under_json_are_json(tmp_path: Path, args: tuple[str, ...],
                                          needle: str) -> None:
    res = run(*args, "--json", home=tmp_path / "h")
    _usage_error(res.stdout, res.rc, res.stderr, needle)
    assert not (tmp_path / "h").exists()


def test_no_json_no_object(tmp_path: Path) -> None:
    res = run("load", "--ref1", "K", "--ref2", "1", home=tmp_path / "h")
    assert res.rc == EXIT_USAGE and res.stdout == ""


def test_an_error_under_json_is_an_object(tmp_path: Path) -> None:
    res = run("campaign", "run", "c1", "--threads", "0", "--json", home=tmp_path / "h")
    line = assert_error(res, EXIT_INPUT, "--threads 0", "at least 1")
    err = json.loads(res.stdout)["error"]
    assert err == {"code": "ValueError", "message": line.removeprefix("keyload: error: "),
                   "exit": EXIT_INPUT}
    res = run("unit", "status", "--sn", SN, "--json", home=tmp_path / "h")
    assert json.loads(res.stdout)["error"]["exit"] == res.rc == EXIT_STORE


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    h = tmp_path_factory.mktemp("json") / "home"
    ok(run("authority", "init", home=h))
    set_id = ok(run("set", "create", "--name", "A", "--json", home=h)).json()["set_id"]
    ok(run("key", "generate", "--ref1", "K", "--type", "aes256", "--usage", "K0", "--mode",
           "B", "--exportability", "E", "--key-version", "1", "--sets", "any", "--slots",
           "1", home=h))
    ok(run("unit", "create", "--set", set_id, "--sn", SN, home=h))
    ok(run("load", "--unit", SN, "--ref1", "K", "--ref2", "1", home=h))  # the old spelling
    return h


@pytest.mark.parametrize("args", [
    ("set", "list"), ("key", "list"), ("unit", "list"), ("authority", "show"),
    ("authority", "exports"), ("unit", "status", "--sn", SN), ("receipts",),
    ("ledger", "export"), ("campaign", "status"), ("audit", "verify")])
def test_every_answer_is_an_object(home: Path, args: tuple[str, ...]) -> None:
    res = run(*args, "--json", home=home)
    if args == ("campaign", "status"):  # no campaign journal here: an error, as an object
        assert set(json.loads(res.stdout)) == {"error"}
        return
    assert isinstance(ok(res).json(), dict), res.stdout


def test_any_times_and_lists(home: Path) -> None:
    (key,) = ok(run("key", "list", "--json", home=home)).json()["keys"]
    assert key["policy"] == {"sets": "any", "slots": [1]}
    assert ok(run("unit", "list", "--json", home=home)).json() == {"units": [SN]}
    (rec,) = ok(run("authority", "exports", "--json", home=home)).json()["records"]
    assert datetime.fromisoformat(rec["time"]).utcoffset() is not None
    text = ok(run("receipts", home=home)).stdout.splitlines()[-1]
    assert text == "1 receipt verified, 0 invalid"


def test_ledger_export_json_is_one_object(home: Path) -> None:
    out = ok(run("ledger", "export", "--json", home=home)).json()
    assert out == {"entries": [], "from_campaigns": 0, "from_service": 0}
