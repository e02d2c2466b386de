"""The service policy's deny list, its summary, and ``keyload serve --check-policy``.

Certificates are real ones issued by :mod:`keyload.service.pki`; their fingerprints and
serial numbers are read back with ``cryptography``. The CLI runs as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyload.service.pki import fingerprint, init_pki
from keyload.service.policy import Policy

from .cli_helpers import assert_error, ok, run

SET_A = "7b568eb721"
FP = "ab" * 32


def base(**extra: Any) -> dict[str, Any]:
    return {"limits": {"max_body": 2048, "per_client": {"limit": 50, "window_s": 1},
                       "per_sn": {"limit": 4, "window_s": 30}},
            "clients": {"terminal-1": {"sets": [SET_A], "ref1": ["TMK-1"],
                                       "per_client": {"limit": 3, "window_s": 10}},
                        "pinned": {"sets": "any", "ref1": "any", "sha256": FP},
                        "monitor": {"sets": [], "ref1": [], "metrics": True}},
            **extra}


@dataclass(frozen=True)
class Cert:
    name: str
    sha256: str
    serial: int


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    issued = init_pki(d, clients=("lost", "stolen", "kept"))
    out = {}
    for i in issued:
        pem = i.cert.read_bytes()
        c = x509.load_pem_x509_certificate(pem)
        der = c.public_bytes(serialization.Encoding.DER)
        assert fingerprint(pem) == i.sha256 == hashlib.sha256(der).hexdigest()
        out[i.name] = Cert(i.name, i.sha256, c.serial_number)
    return out


# -- parsing --------------------------------------------------------------------------
def test_no_deny_list_denies_nothing() -> None:
    p = Policy.from_json(base())
    assert p.deny_sha256 == frozenset() and p.deny_serials == frozenset()
    assert not p.revoked(FP, 1) and p.sha256 is None
    assert Policy.from_json(base(deny={})).deny_sha256 == frozenset()
    assert Policy.from_json(base(deny={"sha256": [], "serials": []})).deny_serials == \
        frozenset()


def test_deny_list_is_normalized() -> None:
    p = Policy.from_json(base(deny={"sha256": ["AB" * 32, "0123456789abcdef" * 4],
                                    "serials": ["0x3A0F", "3a0f", "0X00ff", "1"]}))
    assert p.deny_sha256 == {"ab" * 32, "0123456789abcdef" * 4}
    assert p.deny_serials == {0x3A0F, 0xFF, 1}


@pytest.mark.parametrize(("deny", "message"), [
    ([], "policy.deny: an object with 'sha256' and/or 'serials'"),
    ("any", "policy.deny: an object"),
    ({"sha256": [], "serial": []}, "policy.deny: an object"),
    ({"fingerprints": []}, "policy.deny: an object"),
    ({"sha256": FP}, "policy.deny.sha256: a list of certificate fingerprints"),
    ({"sha256": None}, "policy.deny.sha256: a list"),
    ({"sha256": [FP, FP, FP[:-1]]}, "policy.deny.sha256[2]: 64 hex digits"),
    ({"sha256": [FP + "0"]}, "policy.deny.sha256[0]: 64 hex digits"),
    ({"sha256": ["g" * 64]}, "policy.deny.sha256[0]: 64 hex digits"),
    ({"sha256": [FP, 12]}, "policy.deny.sha256[1]: 64 hex digits"),
    ({"sha256": ["ab:" * 31 + "ab"]}, "policy.deny.sha256[0]: 64 hex digits"),
    ({"serials": "3a0f"}, "policy.deny.serials: a list of certificate serial numbers"),
    ({"serials": {"a": 1}}, "policy.deny.serials: a list"),
    ({"serials": [12345]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["3a0f", True]}, "policy.deny.serials[1]: a serial number in hex"),
    ({"serials": [""]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["0x"]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["xyz"]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["-1"]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": [" 3a0f"]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["3a:0f"]}, "policy.deny.serials[0]: a serial number in hex"),
    ({"serials": ["1", "f" * 41]}, "policy.deny.serials[1]: a serial number in hex"),
    ({"serials": [None]}, "policy.deny.serials[0]: a serial number in hex"),
])
def test_bad_deny_lists_are_refused_with_their_path(deny: Any, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        Policy.from_json(base(deny=deny))
    assert message in str(ei.value)


def test_unknown_top_level_fields_are_still_refused() -> None:
    for doc in (base(denied={"sha256": [FP]}), base(deny={"sha256": []}, revoked=[])):
        with pytest.raises(ValueError, match=r"^policy: expected an object with 'clients'"):
            Policy.from_json(doc)


# -- revoked() on real certificates ---------------------------------------------------
def test_revoked_by_fingerprint(certs: dict[str, Cert]) -> None:
    lost, kept = certs["lost"], certs["kept"]
    p = Policy.from_json(base(deny={"sha256": [lost.sha256.upper()]}))
    assert p.revoked(lost.sha256, lost.serial)
    assert p.revoked(lost.sha256.upper(), lost.serial)
    assert p.revoked(lost.sha256, kept.serial)  # the fingerprint alone is enough
    assert not p.revoked(kept.sha256, kept.serial)
    assert not p.revoked(certs["stolen"].sha256, certs["stolen"].serial)


@pytest.mark.parametrize("form", ["{:x}", "{:X}", "0x{:x}", "0X{:X}", "000{:x}"])
def test_revoked_by_serial_number(certs: dict[str, Cert], form: str) -> None:
    stolen, kept = certs["stolen"], certs["kept"]
    assert stolen.serial != kept.serial
    p = Policy.from_json(base(deny={"serials": [form.format(stolen.serial)]}))
    assert p.revoked(stolen.sha256, stolen.serial)
    assert p.revoked("00" * 32, stolen.serial)  # the serial alone is enough
    assert not p.revoked(kept.sha256, kept.serial)
    assert not p.revoked(certs["lost"].sha256, certs["lost"].serial)


def test_revoked_with_both_lists(certs: dict[str, Cert]) -> None:
    lost, stolen, kept = certs["lost"], certs["stolen"], certs["kept"]
    p = Policy.from_json(base(deny={"sha256": [lost.sha256],
                                    "serials": [f"0x{stolen.serial:x}"]}))
    assert p.revoked(lost.sha256, lost.serial) and p.revoked(stolen.sha256, stolen.serial)
    assert not p.revoked(kept.sha256, kept.serial)
    # a deny list does not change who the clients are: client() still answers by CN
    assert p.client("terminal-1", lost.sha256) is not None


# -- summary --------------------------------------------------------------------------
def test_summary_says_what_the_policy_holds_without_fingerprints(
        certs: dict[str, Cert]) -> None:
    deny = {"sha256": [certs["lost"].sha256, FP.upper()],
            "serials": [f"{certs['stolen'].serial:x}"]}
    s = Policy.from_json(base(deny=deny)).summary()
    assert s == {
        "sha256": None,
        "clients": 3,
        "client_names": ["monitor", "pinned", "terminal-1"],
        "metrics_clients": ["monitor"],
        "pinned_clients": ["pinned"],
        "denied_sha256": 2,
        "denied_serials": 1,
        "limits": {"max_body": 2048, "per_client": {"limit": 50, "window_s": 1.0},
                   "per_sn": {"limit": 4, "window_s": 30.0},
                   "per_client_overrides": {"terminal-1": {"limit": 3, "window_s": 10.0}}},
    }
    text = json.dumps(s)
    for secretish in (FP, certs["lost"].sha256, f"{certs['stolen'].serial:x}"):
        assert secretish.lower() not in text.lower()


def test_summary_of_defaults() -> None:
    s = Policy.from_json({}).summary()
    assert s["clients"] == 0 and s["client_names"] == [] and s["denied_sha256"] == 0
    assert s["limits"]["max_body"] == 4096
    assert s["limits"]["per_client"] == {"limit": 100, "window_s": 1.0}


def test_load_keeps_the_digest_of_the_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    data = json.dumps(base(deny={"sha256": [FP]}), indent=2).encode()
    f.write_bytes(data)
    p = Policy.load(f)
    assert p.sha256 == hashlib.sha256(data).hexdigest() == p.summary()["sha256"]
    assert p.revoked(FP, 0)
    f.write_bytes(data + b"\n")  # the same policy, other bytes: another digest
    assert Policy.load(f).sha256 == hashlib.sha256(data + b"\n").hexdigest() != p.sha256


@pytest.mark.parametrize(("content", "message"), [
    (b'{"clients": {}, "limits": {}, "deny": {"sha256": ["ab", "ab"]}}',
     "policy.deny.sha256[0]: 64 hex digits"),
    (b'{"clients": {}, "deny": {"sha256": []}, "deny": {}}', "'deny' given twice"),
    (b'{"clients": {"a": {"sets": "any", "ref1": "any", "sets": []}}}',
     "'sets' given twice"),
    (b'{"clients": ', "not JSON"),
    (b'\xff\xfe{}', "not JSON"),
    (b'[]', "policy: expected an object"),
])
def test_load_errors_name_the_file_and_the_path(tmp_path: Path, content: bytes,
                                                message: str) -> None:
    f = tmp_path / "policy.json"
    f.write_bytes(content)
    with pytest.raises(ValueError) as ei:
        Policy.load(f)
    assert str(ei.value).startswith(f"{f}: ") and message in str(ei.value)


# -- keyload serve --check-policy -----------------------------------------------------
def write(tmp_path: Path, doc: Any, name: str = "policy.json") -> Path:
    f = tmp_path / name
    f.write_text(json.dumps(doc))
    return f


def test_check_policy_prints_a_summary(tmp_path: Path, certs: dict[str, Cert]) -> None:
    f = write(tmp_path, base(deny={"sha256": [certs["lost"].sha256],
                                   "serials": ["0x1", "0x2"]}))
    res = ok(run("serve", "--check-policy", f, home=tmp_path / "home"))
    lines = res.stdout.splitlines()
    assert lines[0] == f"policy {f}: valid"
    table = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines[1:]}
    assert table["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert table["clients"] == "3: monitor, pinned, terminal-1"
    assert table["metrics"] == "monitor"
    assert table["deny"] == "1 certificate fingerprint(s), 2 serial number(s)"
    assert table["max_body"] == "2048 bytes" and table["per_sn"] == "4 per 30 s"
    assert "per_client terminal-1  3 per 10 s" in res.stdout
    assert certs["lost"].sha256 not in res.stdout and FP not in res.stdout
    assert not (tmp_path / "home").exists()  # checking touches no home


@pytest.mark.slow  # the console script, a process per case
def test_check_policy_json(tmp_path: Path) -> None:
    f = write(tmp_path, base(deny={"serials": ["abc"]}))
    res = ok(run("serve", "--check-policy", f, "--json", home=tmp_path / "home"))
    assert res.json() == {"policy": str(f), "valid": True, **Policy.load(f).summary()}
    assert res.json()["denied_serials"] == 1


@pytest.mark.slow  # the console script, a process per case
def test_check_policy_without_cert_key_ca_policy(tmp_path: Path) -> None:
    """The server's files are not needed to check a policy (and are not looked at)."""
    f = write(tmp_path, base())
    ok(run("serve", "--check-policy", f, "--cert", tmp_path / "absent.pem",
           home=tmp_path / "home"))


@pytest.mark.slow  # the console script, a process per case
@pytest.mark.parametrize(("doc", "needle"), [
    (base(deny={"sha256": [FP, FP, "12"]}), "policy.deny.sha256[2]: 64 hex digits"),
    (base(deny={"serials": ["0xZZ"]}), "policy.deny.serials[0]: a serial number in hex"),
    (base(deny={"sha": []}), "policy.deny: an object"),
    ({"clients": {"x": {"sets": "any"}}}, "policy.clients.x: needs 'sets' and 'ref1'"),
    ({"limits": {"max_body": 1}}, "policy.limits.max_body"),
])
def test_check_policy_refuses_a_bad_file(tmp_path: Path, doc: Any, needle: str) -> None:
    f = write(tmp_path, doc)
    line = assert_error(run("serve", "--check-policy", f, home=tmp_path / "home"), 3, needle)
    assert str(f) in line
    assert_error(run("serve", "--check-policy", f, "--json", home=tmp_path / "home"), 3,
                 needle)


@pytest.mark.slow  # the console script, a process per case
def test_check_policy_of_a_missing_or_non_json_file(tmp_path: Path) -> None:
    assert_error(run("serve", "--check-policy", tmp_path / "nope.json",
                     home=tmp_path / "home"), 4, "nope.json")
    f = tmp_path / "p.json"
    f.write_text("{not json")
    assert_error(run("serve", "--check-policy", f, home=tmp_path / "home"), 3, "not JSON")


@pytest.mark.slow  # the console script, a process per case
def test_serve_still_needs_its_files_without_check_policy(tmp_path: Path) -> None:
    res = run("serve", "--policy", write(tmp_path, base()), home=tmp_path / "home")
    assert res.rc == 2, res.describe()
    assert "required: --cert, --key, --ca" in res.stderr and "--policy" not in \
        res.stderr.split("required:")[1]
    res = run("serve", home=tmp_path / "home")
    assert res.rc == 2 and "required: --cert, --key, --ca, --policy" in res.stderr
    assert not (tmp_path / "home").exists()


def test_serve_help_mentions_check_policy() -> None:
    res = ok(run("serve", "--help"))
    assert "--check-policy FILE" in res.stdout
