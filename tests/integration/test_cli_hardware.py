"""The ``keyload`` console script with real parts: SoftHSM2 tokens and PC/SC readers.

Runs the installed script in subprocesses, as tests/integration/test_cli.py does, with an
environment built here from scratch for each command: ``KEYLOAD_PASSPHRASE`` always,
``KEYLOAD_PKCS11_PIN`` and ``SOFTHSM2_CONF`` only where a test gives them (so a value left
in this process by another test module never leaks into a command).

- ``keyload demo`` for every authority {software, pkcs11, card} x transport {local, pcsc};
- a worked PKCS#11 session on a SoftHSM2 token made here with ``softhsm2-util``: authority
  init, a signed set assembled from components, keys generated and imported in the token,
  a unit given the set's components, loads, receipts, the refusals (wrong component,
  wrong or missing PIN, T asked of the token), and what ``pkcs11-tool`` shows;
- the home a PKCS#11 demo leaves behind, used by later commands with only the PIN.

Check values are computed with ``cryptography`` (cli_helpers). Without SoftHSM2 or PC/SC
the tests that need them skip with the reason on a laptop and fail in CI (``CI=true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keyload.lab.demo import DEMO_PIN
from keyload.lab.pcscd import pcsc_available
from keyload.lab.softhsm import find_module

from ..conftest import require
from .cli_helpers import (
    KEYLOAD,
    PASSPHRASE,
    Result,
    aes_kcv,
    assert_error,
    assert_no_secrets,
    hmac_kcv,
    ok,
    xor,
)

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE = 3, 4, 5
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "KEYLOAD_PKCS11_PIN"
CONF_ENV = "SOFTHSM2_CONF"
PIN = "97531246"
SO_PIN = "1122334455667788"
LABEL = "keyload-cli-hw"
SN = "0102"
TIMEOUT_S = 300  # a PC/SC demo may first wait for another process's use of the readers
ENV_DROPPED = ("KEYLOAD_HOME", "KEYLOAD_KEK", "KEYLOAD_PASSPHRASE", PIN_ENV, CONF_ENV)

AUTHORITIES = ("software", "pkcs11", "card")
TRANSPORTS = ("local", "pcsc")
CELLS = [(a, t) for a in AUTHORITIES for t in TRANSPORTS]
DEMO_UNITS = {"local": 5, "pcsc": 3}  # a PC/SC feed runs at about one unit per second


# -- running the script -------------------------------------------------------------------
def keyload(*args: str | os.PathLike[str], home: Path | None = None, input: str | None = None,
            pin: str | None = None, conf: Path | None = None,
            timeout: float = TIMEOUT_S) -> Result:
    """``keyload ARGS [--home HOME]`` with exactly the environment asked for."""
    argv = [str(a) for a in args]
    if home is not None:
        argv += ["--home", str(home)]
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROPPED}
    env["KEYLOAD_PASSPHRASE"] = PASSPHRASE
    if pin is not None:
        env[PIN_ENV] = pin
    if conf is not None:
        env[CONF_ENV] = str(conf)
    kwargs: dict[str, Any] = {"input": input} if input is not None else {
        "stdin": subprocess.DEVNULL}
    proc = subprocess.run([str(KEYLOAD), *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False, **kwargs)
    return Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def _require_script() -> None:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")


def _require_softhsm() -> str:
    module = SOFTHSM_MODULE if Path(SOFTHSM_MODULE).is_file() else find_module()
    require(module is not None, "SoftHSM2 module missing (Debian: apt-get install softhsm2)")
    require(shutil.which("softhsm2-util") is not None, "softhsm2-util is not on PATH")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        require(False, "python-pkcs11 is not installed (pip install python-pkcs11)")
    assert module is not None
    return module


def _require_pcsc() -> None:
    avail = pcsc_available()
    require(avail.ok, f"PC/SC with vpcd: {avail.reason}")


def _ecbdiv(key: bytes, label: bytes, context: bytes, nbytes: int) -> bytes:
    """KLP1 suite 0x02 (docs/protocol.md §4), independently of keyload."""
    h = hashlib.sha256(label + b"\x00" + context).digest()[:15]
    data = b"".join(h + bytes((i,)) for i in range(1, -(-nbytes // 16) + 1))
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 (ECBDIV is ECB)
    return (enc.update(data) + enc.finalize())[:nbytes]


# -- keyload demo, every authority x transport ---------------------------------------------
@pytest.mark.parametrize(("authority", "transport"), CELLS,
                         ids=[f"{a}-{t}" for a, t in CELLS])
def test_demo(authority: str, transport: str, tmp_path: Path) -> None:
    _require_script()
    if authority == "pkcs11":
        _require_softhsm()
    if authority == "card" or transport == "pcsc":
        _require_pcsc()
    n = DEMO_UNITS[transport]
    workdir = tmp_path / "demo"
    res = ok(keyload("demo", "--units", str(n), "--authority", authority, "--transport",
                     transport, "--workdir", workdir))
    assert res.last_line() == f"customized {n} of {n} units, 0 failed", res.describe()
    out = res.stdout
    assert f"authority: {authority}, transport: {transport}" in out
    assert re.search(rf"^receipts +{2 * n} verified by the authority, 0 invalid$", out,
                     re.M), res.describe()
    suite = "0x02" if authority == "pkcs11" else "0x01"
    assert re.search(rf"^suites +{suite}: {2 * n}$", out, re.M), res.describe()
    assert len(list((workdir / "units").glob("*.unit"))) == n
    assert (workdir / "authority" / "backend.json").exists() == (authority == "pkcs11")


# -- the home a PKCS#11 demo leaves ----------------------------------------------------------
@dataclass
class DemoHome:
    root: Path
    result: Result


@pytest.fixture(scope="module")
def pkcs11_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoHome:
    _require_script()
    _require_softhsm()
    root = tmp_path_factory.mktemp("p11-demo") / "work"
    # neither PIN nor SOFTHSM2_CONF: the demo's own token, with the demo PIN
    res = ok(keyload("demo", "--units", "2", "--authority", "pkcs11", "--workdir", root,
                     "--quiet"))
    return DemoHome(root, res)


def test_pkcs11_demo_records_its_token(pkcs11_demo: DemoHome) -> None:
    res = pkcs11_demo.result
    assert res.last_line() == "customized 2 of 2 units, 0 failed"
    # the demo says plainly that it uses its fixed PIN (module doc of keyload.cli.demo)
    assert f"demo token PIN in use (set {PIN_ENV} for your own)" in res.stdout, \
        "the demo no longer announces its demo PIN\n" + res.describe()
    cfg = json.loads((pkcs11_demo.root / "authority" / "backend.json").read_text())
    conf = (pkcs11_demo.root / "softhsm" / "softhsm2.conf").resolve()
    assert cfg == {"backend": "pkcs11", "module": cfg["module"], "token": "keyload-demo",
                   "softhsm2_conf": str(conf), "clear_sas": False}
    assert Path(cfg["module"]).is_file() and conf.is_file()
    assert not (pkcs11_demo.root / "authority" / "keystore.sealed").exists()  # keys: token


def test_pkcs11_demo_home_used_by_later_commands(pkcs11_demo: DemoHome) -> None:
    """Only the PIN is given: backend.json says which module, token and SoftHSM config."""
    home = pkcs11_demo.root
    keys = {k["ref1"]: k for k in ok(keyload("key", "list", "--json", home=home,
                                             pin=DEMO_PIN)).json()["keys"]}
    assert set(keys) == {"TMK-A", "MAC-A", "PIN-B"}
    assert (keys["TMK-A"]["type"], keys["TMK-A"]["diversify"]) == ("aes256", True)
    assert (keys["MAC-A"]["type"], keys["MAC-A"]["diversify"]) == ("hmac-sha256", False)
    show = ok(keyload("authority", "show", "--json", home=home, pin=DEMO_PIN)).json()
    assert show["backend"] == "pkcs11" and show["suites"] == [2, 3]
    assert show["signing_public_key"] and all(s["signed"] for s in show["sets"])
    assert len(show["sets"]) == 2
    # the authority checks every receipt the demo recorded: station records (receipts), or
    # the campaign journal (ledger verify) where the demo keeps its loads there
    check = ("ledger", "verify") if (home / "journal.db").exists() and not (
        home / "station.db").exists() else ("receipts",)
    rec = ok(keyload(*check, home=home, pin=DEMO_PIN))
    assert rec.last_line() == "4 receipts verified, 0 invalid", rec.describe()
    # the unit holds what the token exported: the HMAC key is not diversified
    st = ok(keyload("unit", "status", "--sn", "4b4c000000000001", "--json", home=home)).json()
    slots = {s["ref2"]: s for s in st["slots"]}
    assert slots[2]["state"] == "loaded" and slots[2]["kcv"] == keys["MAC-A"]["kcv"]
    assert slots[1]["state"] == "loaded" and slots[1]["type"] == "aes256"
    # without the PIN: a clear error naming the variable (exit 5, as a missing passphrase)
    assert_error(keyload("key", "list", home=home), EXIT_PASSPHRASE, PIN_ENV)
    assert_error(keyload("key", "list", home=home, pin="000000"), EXIT_PASSPHRASE,
                 "wrong PIN")


def test_pkcs11_demo_home_with_another_softhsm_conf_in_env(
        pkcs11_demo: DemoHome, tmp_path: Path) -> None:
    """A user who keeps their own SoftHSM2 tokens (SOFTHSM2_CONF set) opens the demo home."""
    other = tmp_path / "other"
    (other / "tokens").mkdir(parents=True, mode=0o700)
    conf = other / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {other / 'tokens'}/\nobjectstore.backend = file\n")
    res = keyload("key", "list", "--json", home=pkcs11_demo.root, pin=DEMO_PIN, conf=conf)
    assert res.rc == 0, res.describe()


# -- the worked PKCS#11 session ---------------------------------------------------------
@dataclass
class P11Session:
    home: Path
    conf: Path
    module: str
    res: dict[str, Result] = field(default_factory=dict)
    components: list[bytes] = field(default_factory=list)
    set_id: str = ""
    imp_value: bytes = b""

    def step(self, name: str, *args: str, input: str | None = None,
             conf: bool = False) -> Result:
        r = ok(keyload(*args, home=self.home, input=input, pin=PIN,
                       conf=self.conf if conf else None))
        self.res[name] = r
        return r

    @property
    def component_input(self) -> str:
        return "".join(c.hex() + "\n" for c in self.components)

    @property
    def secrets(self) -> dict[str, bytes]:
        out = {"T": xor(*self.components), "IMP value": self.imp_value}
        out.update({f"component {i}": c for i, c in enumerate(self.components, 1)})
        return out


def _key_args(ref1: str, type_: str, usage: str, mode: str, exp: str, sets: str,
              slots: str) -> list[str]:
    return ["--ref1", ref1, "--type", type_, "--usage", usage, "--mode", mode,
            "--exportability", exp, "--key-version", "1", "--sets", sets, "--slots", slots]


def _make_token(directory: Path) -> Path:
    """A private SoftHSM2 token store and one token in it, with softhsm2-util only."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}/\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {**os.environ, CONF_ENV: str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL,
                    "--so-pin", SO_PIN, "--pin", PIN], env=env, check=True,
                   capture_output=True, timeout=60)
    return conf


@pytest.fixture(scope="module")
def p11(tmp_path_factory: pytest.TempPathFactory) -> P11Session:
    _require_script()
    module = _require_softhsm()
    base = tmp_path_factory.mktemp("p11-cli")
    s = P11Session(base / "home", _make_token(base / "softhsm"), module)
    s.step("authority init", "authority", "init", "--pkcs11", module, "--token", LABEL,
           "--signing-key", conf=True)
    s.components = [secrets.token_bytes(32) for _ in range(2)]
    s.step("set create", "set", "create", "--name", "X", "--signed", "--components", "2",
           input=s.component_input)
    m = re.search(r"^set X created: set id ([0-9a-f]{10}) \(= KCV of T\)$",
                  s.res["set create"].stdout, re.M)
    assert m, s.res["set create"].describe()
    s.set_id = m.group(1)
    s.step("key GEN", "key", "generate", "--diversify",
           *_key_args("GEN", "aes256", "K0", "B", "E", s.set_id, "1"))
    s.step("key MAC", "key", "generate", "--length", "32", "--json",
           *_key_args("MAC", "hmac-sha256", "M7", "C", "N", s.set_id, "2"))
    s.imp_value = secrets.token_bytes(32)
    s.step("key IMP", "key", "import", "--diversify",
           *_key_args("IMP", "aes256", "K0", "B", "E", s.set_id, "3"),
           input=s.imp_value.hex() + "\n")
    s.step("key list", "key", "list", "--json")
    unit_args = ["unit", "create", "--set", s.set_id, "--sn", SN, "--components", "2",
                 "--slot", "1=aes256", "--slot", "2=hmac-sha256", "--slot", "3=aes256"]
    wrong = bytearray(s.components[1])
    wrong[7] ^= 0x20
    s.res["unit wrong component"] = keyload(
        *unit_args, home=s.home, pin=PIN, input=s.components[0].hex() + "\n" + wrong.hex())
    s.res["units after wrong"] = keyload("unit", "list", "--json", home=s.home)
    s.step("unit create", *unit_args, input=s.component_input)
    s.step("load GEN", "load", "--sn", SN, "--ref1", "GEN", "--ref2", "1")
    s.step("load MAC", "load", "--sn", SN, "--ref1", "MAC", "--ref2", "2", "--json")
    s.step("load IMP", "load", "--sn", SN, "--ref1", "IMP", "--ref2", "3")
    s.step("status", "unit", "status", "--sn", SN, "--json")
    s.step("receipts", "receipts")
    s.step("receipts json", "receipts", "--json")
    s.step("exports", "authority", "exports", "--json")
    return s


LOADED = re.compile(r"^loaded (\S+) v1 into unit 0102 slot (\d): KCV ([0-9A-F]{10}) "
                    r"\(authority and unit agree\), receipt ([0-9a-f]{32})$")


def test_p11_authority_init(p11: P11Session) -> None:
    out = p11.res["authority init"].stdout
    assert (f"authority created in token {LABEL!r} of {p11.module} "
            "(pkcs11; suites 0x02, 0x03)") in out
    assert re.search(r"^Ed25519 SAS public key: [0-9a-f]{64}$", out, re.M)
    cfg = json.loads((p11.home / "authority" / "backend.json").read_text())
    assert cfg == {"backend": "pkcs11", "module": p11.module, "token": LABEL,
                   "clear_sas": False, "softhsm2_conf": str(p11.conf.resolve())}
    assert not (p11.home / "authority" / "keystore.sealed").exists()


def test_p11_set_from_components(p11: P11Session) -> None:
    out = p11.res["set create"].stdout
    kcvs = re.findall(r"^component (\d) KCV  ([0-9A-F]{10})$", out, re.M)
    assert kcvs == [("1", aes_kcv(p11.components[0])), ("2", aes_kcv(p11.components[1]))]
    assert p11.set_id == aes_kcv(xor(*p11.components)).lower()


def test_p11_keys_in_the_token(p11: P11Session) -> None:
    keys = {k["ref1"]: k for k in p11.res["key list"].json()["keys"]}
    assert set(keys) == {"GEN", "MAC", "IMP"}
    assert keys["MAC"] == p11.res["key MAC"].json()
    assert (keys["MAC"]["type"], keys["MAC"]["length"]) == ("hmac-sha256", 32)
    assert keys["IMP"]["kcv"] == aes_kcv(p11.imp_value)  # computed when it entered the token
    for k in keys.values():
        assert k["policy"]["sets"] == [p11.set_id]
    assert keys["GEN"]["diversify"] and keys["IMP"]["diversify"]
    assert not keys["MAC"]["diversify"]


def test_p11_wrong_component_no_unit(p11: P11Session) -> None:
    assert_error(p11.res["unit wrong component"], EXIT_INPUT,
                 "do not make this set's transport key")
    assert p11.res["units after wrong"].json() == {"units": []}
    assert p11.res["units after wrong"].rc == 0
    # the right components made exactly one unit, 0102
    assert sorted(p.name for p in (p11.home / "units").glob("*.unit")) == [f"{SN}.unit"]
    assert p11.res["unit create"].stdout.strip() == (
        f"unit {SN} created in set {p11.set_id} with slots 1, 2, 3")


def test_p11_loads_kcvs(p11: P11Session) -> None:
    got = {}
    for name in ("load GEN", "load IMP"):
        m = LOADED.match(p11.res[name].stdout.strip())
        assert m, p11.res[name].describe()
        got[m.group(1)] = (int(m.group(2)), m.group(3), m.group(4))
    mac = p11.res["load MAC"].json()
    assert (mac["sn"], mac["set_id"], mac["ref2"], mac["suite"]) == (SN, p11.set_id, 2, 2)
    keys = {k["ref1"]: k for k in p11.res["key list"].json()["keys"]}
    assert mac["kcv"] == keys["MAC"]["kcv"]  # not diversified: the key's own KCV
    # IMP is diversified for this unit: TA' = ECBDIV(TA, "KLP1-TA", lv(SN)), computed here
    sn = bytes.fromhex(SN)
    ta = _ecbdiv(p11.imp_value, b"KLP1-TA", bytes((len(sn),)) + sn, 32)
    assert got["IMP"][:2] == (3, aes_kcv(ta))
    assert got["GEN"][0] == 1 and got["GEN"][1] != keys["GEN"]["kcv"]  # diversified
    slots = {s["ref2"]: s for s in p11.res["status"].json()["slots"]}
    assert slots[1]["kcv"] == got["GEN"][1] and slots[3]["kcv"] == got["IMP"][1]
    assert slots[2]["kcv"] == mac["kcv"]
    assert all(slots[r]["state"] == "loaded" and slots[r]["version"] == 1 for r in (1, 2, 3))
    assert hmac_kcv(bytes(32)) != mac["kcv"]  # sanity: not an all-zero key


def test_p11_receipts_verified(p11: P11Session) -> None:
    assert p11.res["receipts"].last_line() == "3 receipts verified, 0 invalid"
    assert p11.res["receipts json"].json() == {
        "verified": 3, "invalid": 0, "invalid_rows": [], "reconciled": 0,
        "exports_without_receipt": 0, "without_receipt": []}
    exports = p11.res["exports"].json()
    assert exports["total"] == 3
    assert {(r["ref1"], r["ref2"], r["suite"], r["sn"]) for r in exports["records"]} == {
        ("GEN", 1, 2, SN), ("MAC", 2, 2, SN), ("IMP", 3, 2, SN)}


def test_p11_no_secret_in_any_output(p11: P11Session) -> None:
    for r in p11.res.values():
        assert_no_secrets(r.output, p11.secrets)


def test_p11_wrong_pin(p11: P11Session) -> None:
    res = keyload("key", "list", home=p11.home, pin="00000000")
    assert_error(res, EXIT_PASSPHRASE, "wrong PIN", LABEL)
    # still fine with the right one (no lockout from one failure)
    assert len(ok(keyload("key", "list", "--json", home=p11.home, pin=PIN)).json()["keys"]) == 3


def test_p11_unit_create_without_components(p11: P11Session) -> None:
    res = keyload("unit", "create", "--set", p11.set_id, "--sn", "0a0b", home=p11.home,
                  pin=PIN)
    assert_error(res, EXIT_INPUT, "T never leaves this token", "--components")
    assert not (p11.home / "units" / "0a0b.unit").exists()


def _list_objects(p11: P11Session) -> list[dict[str, str]]:
    require(shutil.which("pkcs11-tool") is not None, "pkcs11-tool (Debian: opensc) missing")
    proc = subprocess.run(
        ["pkcs11-tool", "--module", p11.module, "--token-label", LABEL, "--login", "--pin",
         PIN, "--list-objects"],
        env={**os.environ, CONF_ENV: str(p11.conf)}, capture_output=True, text=True,
        check=True, timeout=60)
    objects: list[dict[str, str]] = []
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" "):
            objects.append({"kind": line.strip()})
        elif objects and ":" in line:
            k, _, v = line.strip().partition(":")
            objects[-1][k.strip()] = v.strip().strip("'")
    return objects


def _flags(text: str) -> set[str]:
    return {f.strip() for f in text.split(",") if f.strip()}


def test_p11_pkcs11_tool_shows_sane_attributes(p11: P11Session) -> None:
    objs = _list_objects(p11)
    secret_keys = [o for o in objs if o["kind"].startswith("Secret Key Object")]
    ts = [o for o in secret_keys if o.get("label") == f"keyload T {p11.set_id}"]
    assert len(ts) == 1, objs
    t = ts[0]
    assert "AES length 32" in t["kind"] and t["Usage"] == "derive"
    access = _flags(t["Access"])
    assert "sensitive" in access and "extractable" not in access
    assert t["ID"] == (b"KLP1-T" + bytes.fromhex(p11.set_id)).hex()
    keys = {o["label"]: o for o in secret_keys if o.get("label", "").startswith("keyload key ")}
    assert set(keys) == {"keyload key GEN v1", "keyload key MAC v1", "keyload key IMP v1"}
    for label, o in keys.items():
        assert "sensitive" in _flags(o["Access"]), label  # leaves the token only wrapped
        assert o["Usage"] == ("none" if "MAC" in label else "derive"), label
    assert "Generic secret length 32" in keys["keyload key MAC v1"]["kind"]
    assert "never extractable" not in _flags(keys["keyload key IMP v1"]["Access"])
    sas = [o for o in objs if o["kind"].startswith("Private Key Object")]
    assert len(sas) == 1 and sas[0]["label"] == "keyload SAS" and sas[0]["Usage"] == "sign"
    assert {"sensitive", "never extractable"} <= _flags(sas[0]["Access"])
    assert "extractable" not in _flags(sas[0]["Access"])
    assert len(secret_keys) == 4  # T and three application keys, no stray derived object
    data = [o for o in objs if o["kind"].startswith("Data object")]
    assert len(data) == 4 and all("private" in o["flags"] for o in data)
