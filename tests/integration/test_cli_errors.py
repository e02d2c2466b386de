"""Errors through the console script: a command that only reads creates nothing, bad
input is refused at the command, each failure has its class's exit code and one line
on standard error that names what is wrong (a file, an option, a host), never a
traceback, and the files on disk are left as they were.
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD, assert_error, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script (a process each)

EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE = 3, 4, 5

SN = "0a0b0c0d01"


@dataclass(frozen=True)
class Home:
    root: Path
    set_id: str


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """An authority with one set, a key TMK (set A, slot 1 only) and one unit."""
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    root = tmp_path_factory.mktemp("cli-errors") / "home"
    ok(run("authority", "init", home=root))
    set_id = ok(run("set", "create", "--name", "A", "--json", home=root)).json()["set_id"]
    ok(run("key", "generate", "--ref1", "TMK", "--type", "aes256", "--usage", "K0",
           "--mode", "B", "--exportability", "E", "--key-version", "1", "--sets", set_id,
           "--slots", "1", home=root))
    ok(run("unit", "create", "--set", set_id, "--sn", SN, "--slot", "1=aes256", "--slot",
           "2=aes256", home=root))
    return Home(root, set_id)


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and its mode."""
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- item 11: a command that reads creates nothing -------------------------------------
READERS = [
    pytest.param(("campaign", "status"), id="campaign-status"),
    pytest.param(("campaign", "report", "c1", "--out", "rep"), id="campaign-report"),
    pytest.param(("ledger", "verify"), id="ledger-verify"),
    pytest.param(("ledger", "export"), id="ledger-export"),
]


@pytest.mark.parametrize("args", READERS)
@pytest.mark.parametrize("content", [b"hello, not a journal\n", b""], ids=["text", "empty"])
def test_journal_option_on_a_file_that_is_not_a_journal(tmp_path: Path, args: tuple[str, ...],
                                                         content: bytes) -> None:
    """``--journal notes.txt``: refused, naming it; its bytes and mode are left alone."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    notes.chmod(0o644)
    (tmp_path / "h").mkdir()
    res = run(*args, "--journal", notes, home=tmp_path / "h", cwd=tmp_path)
    assert_error(res, EXIT_STORE, str(notes), "not a campaign journal")
    assert notes.read_bytes() == content
    assert stat.S_IMODE(notes.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "notes.txt"]
    assert list((tmp_path / "h").iterdir()) == []


@pytest.mark.parametrize("args", READERS)
def test_journal_option_on_another_database_leaves_it_as_it_was(home: Home, tmp_path: Path,
                                                               args: tuple[str, ...]) -> None:
    """A SQLite file that is not a journal (the audit log) is not given the journal's
    tables by being read."""
    other = tmp_path / "audit-copy.db"
    src, dst = sqlite3.connect(home.root / "audit.db"), sqlite3.connect(other)
    src.backup(dst)
    src.close()
    dst.close()
    before = files(tmp_path)
    res = run(*args, "--journal", other, home=home.root, cwd=tmp_path)
    assert_error(res, EXIT_STORE, str(other), "not a campaign journal")
    assert files(tmp_path) == before


@pytest.mark.parametrize("args", READERS)
def test_journal_option_naming_no_file(home: Home, tmp_path: Path,
                                       args: tuple[str, ...]) -> None:
    before = files(home.root)
    res = run(*args, "--journal", tmp_path / "typo.db", home=home.root, cwd=tmp_path)
    assert_error(res, EXIT_STORE, "typo.db")
    assert list(tmp_path.iterdir()) == [] and files(home.root) == before


@pytest.mark.parametrize("action", ["verify", "export"])
def test_ledger_in_a_home_without_a_journal_creates_none(home: Home, action: str) -> None:
    """No campaign was ever created here: the campaigns' ledger is empty, and no
    ``journal.db`` is left behind by reading it."""
    assert not (home.root / "journal.db").exists()
    before = files(home.root)
    res = ok(run("ledger", action, home=home.root))
    if action == "verify":
        assert res.stdout.splitlines()[0] == "campaign ledger: 0 receipts verified, 0 invalid"
    assert not (home.root / "journal.db").exists()
    assert {k: v for k, v in files(home.root).items() if not k.startswith("audit.db")} == \
        {k: v for k, v in before.items() if not k.startswith("audit.db")}


@pytest.mark.parametrize("args", [
    pytest.param(("campaign", "status"), id="campaign-status"),
    pytest.param(("campaign", "report", "c1", "--out", "rep"), id="campaign-report"),
    pytest.param(("ledger", "verify"), id="ledger-verify"),
    pytest.param(("ledger", "export", "--out", "l.csv"), id="ledger-export"),
    pytest.param(("unit", "list"), id="unit-list"),
    pytest.param(("unit", "status", "--sn", SN), id="unit-status"),
    pytest.param(("receipts",), id="receipts"),
    pytest.param(("audit", "verify"), id="audit-verify"),
    pytest.param(("authority", "exports"), id="authority-exports"),
    pytest.param(("authority", "show"), id="authority-show"),
    pytest.param(("key", "list"), id="key-list"),
    pytest.param(("set", "list"), id="set-list"),
])
def test_every_reading_command_on_a_missing_home_creates_nothing(tmp_path: Path,
                                                                 args: tuple[str, ...]
                                                                 ) -> None:
    res = run(*args, home=tmp_path / "typo", cwd=tmp_path)
    assert_error(res, EXIT_STORE, "typo")
    assert list(tmp_path.iterdir()) == []


# -- item 12: input refused at the command ---------------------------------------------
def _key(ref1: str, usage: str, sets: str) -> list[str]:
    return ["key", "generate", "--ref1", ref1, "--type", "aes128", "--usage", usage, "--mode",
            "E", "--exportability", "N", "--key-version", "1", "--sets", sets, "--slots", "any"]


@pytest.mark.parametrize("usage", ["ZZ", "K9", "00", "k0", "S0"])
def test_key_usage_outside_the_accepted_list_is_refused(home: Home, usage: str) -> None:
    """Usage is an ANSI X9.143 key usage for a symmetric key (the README's list);
    anything else (an unassigned code, lower case, an asymmetric key's usage) is
    refused and nothing is stored."""
    before = files(home.root)
    res = run(*_key("ODD", usage, "any"), home=home.root)
    line = assert_error(res, EXIT_INPUT, f"--usage {usage!r}", "K0", "P0", "M7")
    assert "README" in line
    assert files(home.root) == before


@pytest.mark.parametrize("usage", ["B0", "D0", "K1", "P0", "V2", "E6", "I0", "C0"])
def test_key_usage_in_the_accepted_list_is_taken(home: Home, tmp_path: Path,
                                                 usage: str) -> None:
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(home.root, copy)
    ok(run(*_key("U" + usage, usage, "any"), home=copy))
    listed = ok(run("key", "list", "--json", home=copy)).json()["keys"]
    got = {k["ref1"]: k["usage"] for k in listed}
    assert got["U" + usage] == usage


def test_campaign_create_with_a_load_the_key_policy_forbids(home: Home) -> None:
    """TMK may go to slot 1 only: a plan that puts it in slot 2 would be refused by the
    authority (6986) for every unit; it is refused at the command, naming the key, the
    slot and the policy, and no journal is written."""
    before = files(home.root)
    res = run("campaign", "create", "c2", "--set", home.set_id, "--load", "TMK:2",
              home=home.root)
    assert_error(res, EXIT_INPUT, "TMK", "slot 2", "policy", f"{home.set_id}; 1")
    assert files(home.root) == before


def test_campaign_create_for_a_set_the_key_policy_forbids(home: Home, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(home.root, copy)
    other = ok(run("set", "create", "--name", "B", "--json", home=copy)).json()["set_id"]
    before = files(copy)
    res = run("campaign", "create", "c3", "--set", other, "--load", "TMK:1", home=copy)
    assert_error(res, EXIT_INPUT, "TMK", f"set {other}", "policy")
    assert files(copy) == before


def test_the_accepted_key_usages_are_the_readme_list(home: Home) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("`--usage` is an ANSI X9.143")
    listed = readme[start:readme.index("`", readme.index("one of: `", start) + 9)]
    listed = listed[listed.index("one of: `") + 9:]
    line = assert_error(run(*_key("ODD", "ZZ", "any"), home=home.root), EXIT_INPUT)
    accepted = line[line.index("accepted: ") + 10:line.index(" (README")]
    assert accepted.split() == listed.split()
    assert {"K0", "P0", "M7", "D0", "B0"} <= set(accepted.split())


# -- item 13: each failure has its class's exit code -----------------------------------
EXIT_UNREACHABLE = 9
KEK = "5a" * 32


@pytest.fixture(scope="module")
def kek_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home sealed with a raw KEK from $KEYLOAD_KEK (no passphrase)."""
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    root = tmp_path_factory.mktemp("cli-kek") / "home"
    ok(run("authority", "init", home=root, passphrase=None, env_extra={"KEYLOAD_KEK": KEK}))
    ok(run("key", "list", home=root, passphrase=None, env_extra={"KEYLOAD_KEK": KEK}))
    return root


def test_no_passphrase_is_a_passphrase_error(home: Home) -> None:
    """A store that needs a passphrase, and none is given (no terminal): exit 5, as a
    wrong one, naming where it is given."""
    before = files(home.root)
    res = run("key", "list", home=home.root, passphrase=None)
    assert_error(res, EXIT_PASSPHRASE, "no passphrase", "KEYLOAD_PASSPHRASE")
    assert files(home.root) == before


def test_no_kek_for_a_kek_vault_is_a_passphrase_error(kek_home: Path) -> None:
    res = run("key", "list", home=kek_home, passphrase=None)
    assert_error(res, EXIT_PASSPHRASE, "KEYLOAD_KEK")


@pytest.mark.parametrize("kek", ["zz" * 32, "5a" * 31, "5a" * 33, "not hex at all"])
def test_malformed_kek_is_an_input_error(kek_home: Path, kek: str) -> None:
    """A KEK that is not 64 hex digits is a malformed value (exit 3), not a damaged
    store; the value itself is never shown."""
    before = files(kek_home)
    res = run("key", "list", home=kek_home, passphrase=None, env_extra={"KEYLOAD_KEK": kek})
    line = assert_error(res, EXIT_INPUT, "KEYLOAD_KEK", "64 hex digits")
    assert kek not in line
    assert files(kek_home) == before


def test_a_wrong_kek_is_still_a_passphrase_error(kek_home: Path) -> None:
    res = run("key", "list", home=kek_home, passphrase=None,
              env_extra={"KEYLOAD_KEK": "a5" * 32})
    assert_error(res, EXIT_PASSPHRASE, "wrong passphrase or KEK")


@pytest.mark.parametrize("args", [
    pytest.param(("load", "--sn", "", "--ref1", "TMK", "--ref2", "1"), id="load"),
    pytest.param(("unit", "status", "--sn", ""), id="unit-status"),
    pytest.param(("unit", "serve-card", "--sn", ""), id="unit-serve-card"),
    pytest.param(("fetch", "--server", "https://127.0.0.1:1", "--sn", "", "--ref1", "TMK",
                  "--ref2", "1", "--ca", "ca.pem", "--cert", "c.pem", "--key", "c.key"),
                 id="fetch"),
])
def test_an_empty_sn_is_an_input_error(home: Home, args: tuple[str, ...]) -> None:
    """A caller's mistake, not a card's status word: no "6A80 MALFORMED" in the line."""
    before = files(home.root)
    line = assert_error(run(*args, home=home.root), EXIT_INPUT, "SN must be 1 to 32 bytes")
    assert line == "keyload: error: SN must be 1 to 32 bytes"
    assert files(home.root) == before


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(("load", "--sn", SN, "--ref1", "R" * 33, "--ref2", "1"),
                 "REF1 must be 1 to 32 bytes", id="long-ref1"),
    pytest.param(("load", "--sn", SN, "--ref1", "0x" + "31" * 33, "--ref2", "1"),
                 "REF1 must be 1 to 32 bytes", id="long-hex-ref1"),
    pytest.param(("load", "--sn", SN, "--ref1", "TMK", "--ref2", "255"),
                 "REF2 must be in 1..254", id="ref2-255"),
])
def test_a_bad_ref_is_an_input_error_not_a_status_word(home: Home, args: tuple[str, ...],
                                                       message: str) -> None:
    before = files(home.root)
    line = assert_error(run(*args, home=home.root), EXIT_INPUT, message)
    assert line == f"keyload: error: {message}"
    assert files(home.root) == before


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    d = tmp_path_factory.mktemp("cli-pki") / "pki"
    ok(run("pki", "init", "--dir", d))
    return d


def _fetch(pki: Path, server: str, **files_: Path | str) -> tuple[str, ...]:
    f = {"ca": pki / "ca.pem", "cert": pki / "clients" / "client.pem",
         "key": pki / "clients" / "client.key", **files_}
    return ("fetch", "--server", server, "--sn", SN, "--ref1", "TMK", "--ref2", "1",
            "--ca", str(f["ca"]), "--cert", str(f["cert"]), "--key", str(f["key"]))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_fetch_with_the_service_down_is_unreachable(home: Home, pki: Path) -> None:
    """Nothing listens at --server: exit 9 (service unreachable), naming the address;
    the unit is not touched."""
    before = files(home.root)
    port = _closed_port()
    res = run(*_fetch(pki, f"https://127.0.0.1:{port}"), home=home.root)
    assert_error(res, EXIT_UNREACHABLE, f"127.0.0.1:{port}", "Connection refused")
    assert files(home.root) == before


def test_fetch_to_a_server_that_does_not_speak_tls_is_unreachable(home: Home,
                                                                   pki: Path) -> None:
    """A listener that answers in clear text: the TLS handshake fails, exit 9."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nthis is not TLS\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        before = files(home.root)
        res = run(*_fetch(pki, f"https://127.0.0.1:{port}"), home=home.root)
        assert_error(res, EXIT_UNREACHABLE, f"127.0.0.1:{port}", "TLS")
        assert files(home.root) == before
    finally:
        srv.close()
        t.join(10)


def test_exit_code_table_in_readme_and_in_main_agree() -> None:
    """The README's exit-code table and the one in ``keyload.cli.main``'s docstring list
    the same codes, 9 (service unreachable) among them."""
    import re

    root = Path(__file__).resolve().parents[2]
    readme = root / "README.md"
    main = root / "src" / "keyload" / "cli" / "main.py"
    table = readme.read_text().split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    in_readme = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    doc = main.read_text().split('"""', 2)[1]
    in_main = [int(m) for m in re.findall(r"^(\d+)\s{2,}", doc, re.M)]
    assert in_readme == in_main
    assert 9 in in_readme and "unreachable" in table.split("| 9 |", 1)[1].splitlines()[0]


# -- item 14: each message names what is wrong -----------------------------------------
def _no_ssl_text(line: str) -> None:
    for raw in ("_ssl.c", "X509:", "[SSL]", "PEM lib", "No such file or directory"):
        assert raw not in line, line


@pytest.mark.parametrize("option, what", [("ca", "CA"), ("cert", "certificate"),
                                          ("key", "key")])
def test_fetch_names_a_missing_tls_file(home: Home, pki: Path, tmp_path: Path, option: str,
                                        what: str) -> None:
    missing = tmp_path / "nonexistent.pem"
    before = files(home.root)
    res = run(*_fetch(pki, "https://127.0.0.1:1", **{option: missing}), home=home.root)
    line = assert_error(res, EXIT_STORE, f"{what} file not found: {missing}")
    _no_ssl_text(line)
    assert files(home.root) == before


def _serve(pki: Path, **given: Path | str) -> tuple[str, ...]:
    f = {"ca": pki / "ca.pem", "cert": pki / "server.pem", "key": pki / "server.key",
         "policy": "policy.json", **given}
    return ("serve", "--port", "0", "--ca", str(f["ca"]), "--cert", str(f["cert"]), "--key",
            str(f["key"]), "--policy", str(f["policy"]))


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    p = tmp_path / "policy.json"
    p.write_text('{"clients": {}}')
    return p


@pytest.mark.parametrize("option, what", [("ca", "CA"), ("cert", "certificate"),
                                          ("key", "key"), ("policy", "policy")])
def test_serve_names_a_missing_file(pki: Path, tmp_path: Path, policy: Path, option: str,
                                    what: str) -> None:
    missing = tmp_path / "nonexistent"
    res = run(*_serve(pki, **{"policy": policy, option: missing}), home=tmp_path / "h")
    line = assert_error(res, EXIT_STORE, f"{what} file not found: {missing}")
    _no_ssl_text(line)
    assert not (tmp_path / "h").exists()


def test_serve_check_policy_names_a_missing_file(tmp_path: Path) -> None:
    res = run("serve", "--check-policy", tmp_path / "nope.json", home=tmp_path / "h")
    assert_error(res, EXIT_STORE, f"policy file not found: {tmp_path / 'nope.json'}")


def test_fetch_certificate_and_key_that_do_not_match(home: Home, pki: Path) -> None:
    cert, key = pki / "clients" / "client.pem", pki / "server.key"
    res = run(*_fetch(pki, "https://127.0.0.1:1", cert=cert, key=key), home=home.root)
    line = assert_error(res, EXIT_INPUT, f"certificate {cert} and key {key} do not match")
    _no_ssl_text(line)


def test_serve_certificate_and_key_that_do_not_match(pki: Path, tmp_path: Path,
                                                     policy: Path) -> None:
    cert, key = pki / "server.pem", pki / "clients" / "client.key"
    res = run(*_serve(pki, policy=policy, cert=cert, key=key), home=tmp_path / "h")
    line = assert_error(res, EXIT_INPUT, f"certificate {cert} and key {key} do not match")
    _no_ssl_text(line)
    assert not (tmp_path / "h").exists()


def test_serve_with_a_postgresql_state_it_cannot_reach_never_says_listening(
        home: Home, pki: Path, policy: Path) -> None:
    """The shared state is opened before the socket is bound: a PostgreSQL nobody answers
    at is a store error (exit 4) naming it, and no "listening" line is printed first."""
    state = f"postgresql://keyload@127.0.0.1:{_closed_port()}/keyload"
    res = run(*_serve(pki, policy=policy), "--state", state, home=home.root)
    assert_error(res, EXIT_STORE, f"service state {state}: cannot connect")
    assert "listening" not in res.stdout + res.stderr, res.stdout


@pytest.mark.parametrize("option, what, other", [
    ("ca", "CA file", "clients/client.key"),
    ("cert", "certificate file", "clients/client.key"),
    ("key", "key file", "clients/client.pem"),
])
def test_fetch_tls_file_of_the_wrong_kind(home: Home, pki: Path, option: str, what: str,
                                          other: str) -> None:
    """A key given as the CA, a certificate as the key: named, without OpenSSL's text."""
    res = run(*_fetch(pki, "https://127.0.0.1:1", **{option: pki / other}), home=home.root)
    line = assert_error(res, EXIT_INPUT, f"{what} {pki / other}")
    _no_ssl_text(line)


@pytest.mark.parametrize("args", [
    pytest.param(("authority", "init"), id="authority-init"),
    pytest.param(("key", "list"), id="key-list"),
    pytest.param(("campaign", "status"), id="campaign-status"),
    pytest.param(("unit", "list"), id="unit-list"),
])
def test_home_that_is_a_file(tmp_path: Path, args: tuple[str, ...]) -> None:
    """$KEYLOAD_HOME names a file: said so (not 'File exists'), and the file is kept."""
    f = tmp_path / "home.txt"
    f.write_text("notes\n")
    res = run(*args, cwd=tmp_path, env_extra={"KEYLOAD_HOME": str(f)})
    assert_error(res, EXIT_STORE, f"home {f} is a file, not a directory")
    assert f.read_text() == "notes\n" and sorted(tmp_path.iterdir()) == [f]


def test_pkcs11_without_a_pin_names_the_variable(tmp_path: Path) -> None:
    """An authority in a PKCS#11 token, and no PIN: exit 5 (as a missing passphrase),
    naming $KEYLOAD_PKCS11_PIN (the only way the CLI takes it)."""
    pytest.importorskip("pkcs11")
    import json

    home = tmp_path / "home"
    (home / "authority").mkdir(parents=True)
    cfg = {"backend": "pkcs11", "module": str(tmp_path / "libnone.so"), "token": "T"}
    (home / "authority" / "backend.json").write_text(json.dumps(cfg))
    before = files(home)
    res = run("key", "list", home=home, env_extra={"KEYLOAD_PKCS11_PIN": ""})
    line = assert_error(res, EXIT_PASSPHRASE, "no PIN for token 'T'", "KEYLOAD_PKCS11_PIN")
    assert "pin=" not in line
    assert files(home) == before


@pytest.mark.parametrize("args", [
    pytest.param(("ledger", "verify", "--state", "URL"), id="ledger-verify"),
    pytest.param(("audit", "verify", "--state", "URL"), id="audit-verify"),
    pytest.param(("campaign", "status", "--journal", "URL"), id="campaign-status"),
])
def test_postgresql_that_cannot_be_reached_is_named(home: Home, args: tuple[str, ...]) -> None:
    """One line naming the host, port and database and the server's (or the network's)
    reason; never the password."""
    pytest.importorskip("psycopg")
    port = _closed_port()
    url = f"postgresql://keyload:s3cret-pw@127.0.0.1:{port}/ledgerdb?connect_timeout=5"
    res = run(*(url if a == "URL" else a for a in args), home=home.root)
    line = assert_error(res, EXIT_STORE, f"127.0.0.1:{port}/ledgerdb", "cannot connect",
                        "Connection refused")
    assert "s3cret-pw" not in res.output and "OperationalError" not in line


def test_serve_card_reports_its_failure_once(home: Home) -> None:
    """No vpcd reader listening: one error line on stderr (the feeder's failure is not
    logged a second time)."""
    res = run("unit", "serve-card", "--port", str(_closed_port()), home=home.root)
    assert_error(res, 1, "card feeder", "vpcd", stdout_empty=False)
