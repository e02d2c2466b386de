"""X9.143 key blocks with the authority's keys in a SoftHSM2 token, through the console
script: the KBPK's CMAC runs in the token, but the block is opened (or made) in host
memory, which a token home refuses without ``--open-in-host`` and does with it. Skips
without SoftHSM2 and python-pkcs11; fails without them in CI."""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

import psec.tr31
import pytest

from keyload.lab.softhsm import make_token, softhsm_available, softhsm_missing_reason

from ..conftest import require
from .cli_helpers import KEYLOAD, aes_kcv, assert_error, assert_no_secrets, ok, run

pytestmark = [pytest.mark.hardware, pytest.mark.slow]

PIN = "35792468"
EXIT_INPUT, EXIT_INTEGRITY = 3, 7
POLICY = ("--sets", "any", "--slots", "1")


@pytest.fixture(scope="module")
def token_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict[str, str]]:
    """A home whose authority is a fresh SoftHSM2 token, with KBPK BANK-KBPK (K1/B)."""
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    require(importlib.util.find_spec("pkcs11") is not None, "python-pkcs11 is not installed")
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    base = tmp_path_factory.mktemp("kb-p11")
    token = make_token(base / "softhsm", label="keyload-kb", user_pin=PIN, activate=False)
    env = {"KEYLOAD_PKCS11_PIN": PIN, "SOFTHSM2_CONF": str(token.conf)}
    home = base / "home"
    ok(run("authority", "init", "--pkcs11", token.module, "--token", token.label, home=home,
           env_extra=env))
    kbpk = secrets.token_bytes(32)
    ok(run("key", "import", "--ref1", "BANK-KBPK", "--type", "aes256", "--usage", "K1",
           "--mode", "B", "--exportability", "N", "--key-version", "1", *POLICY, home=home,
           input=kbpk.hex() + "\n", env_extra=env))
    return home, kbpk, env


def _keys(home: Path, env: dict[str, str]) -> dict[str, str]:
    return {k["ref1"]: k["kcv"] for k in ok(run("key", "list", "--json", home=home,
                                                env_extra=env)).json()["keys"]}


def test_import_needs_open_in_host_and_works_with_it(
        token_home: tuple[Path, bytes, dict[str, str]]) -> None:
    home, kbpk, env = token_home
    key = secrets.token_bytes(16)
    block = psec.tr31.wrap(kbpk, psec.tr31.Header("D", "P0", "A", "E", "03", "E"), key)
    argv = ("key", "import", "--ref1", "ZPK-T", "--tr31", block, "--kbpk", "BANK-KBPK",
            *POLICY)
    before = _keys(home, env)
    assert_error(run(*argv, home=home, env_extra=env), EXIT_INPUT, "--open-in-host")
    assert _keys(home, env) == before
    altered = block[:20] + ("1" if block[20] != "1" else "2") + block[21:]
    bad = [a if a != block else altered for a in argv]
    assert_error(run(*bad, "--open-in-host", home=home, env_extra=env), EXIT_INTEGRITY)
    assert _keys(home, env) == before
    res = ok(run(*argv, "--open-in-host", home=home, env_extra=env))
    assert res.last_line() == f"key ZPK-T: aes128, P0/E/E, version 3, KCV {aes_kcv(key)}"
    assert _keys(home, env)["ZPK-T"] == aes_kcv(key)
    assert_no_secrets(res.output, {"key": key, "kbpk": kbpk})


def test_export_needs_open_in_host_and_opens_with_psec(
        token_home: tuple[Path, bytes, dict[str, str]]) -> None:
    home, kbpk, env = token_home
    ok(run("key", "generate", "--ref1", "DATA-T", "--type", "aes256", "--usage", "D0",
           "--mode", "B", "--exportability", "S", "--key-version", "4", *POLICY, home=home,
           env_extra=env))
    argv = ("key", "export", "--ref1", "DATA-T", "--tr31", "--kbpk", "BANK-KBPK")
    assert_error(run(*argv, home=home, env_extra=env), EXIT_INPUT, "--open-in-host")
    block = ok(run(*argv, "--open-in-host", home=home, env_extra=env)).stdout.strip()
    header, key = psec.tr31.unwrap(kbpk, block)
    assert aes_kcv(key) == _keys(home, env)["DATA-T"]
    assert (header.key_usage, header.mode_of_use, header.version_num,
            header.exportability) == ("D0", "B", "04", "S")


def test_a_kbpk_generated_in_the_token_makes_and_opens_blocks(
        token_home: tuple[Path, bytes, dict[str, str]]) -> None:
    """A K1 key generated in the token keeps CMAC (its session precursor's SIGN): a block it
    makes opens under it again to the same key."""
    home, _, env = token_home
    for ref1, usage in (("GEN-KBPK", "K1"), ("MAC-T", "M6")):
        ok(run("key", "generate", "--ref1", ref1, "--type", "aes256", "--usage", usage,
               "--mode", "B", "--exportability", "E", "--key-version", "1", *POLICY, home=home,
               env_extra=env))
    block = ok(run("key", "export", "--ref1", "MAC-T", "--tr31", "--kbpk", "GEN-KBPK",
                   "--open-in-host", home=home, env_extra=env)).stdout.strip()
    back = ok(run("key", "import", "--ref1", "MAC-T2", "--tr31", block, "--kbpk", "GEN-KBPK",
                  "--open-in-host", *POLICY, "--json", home=home, env_extra=env)).json()
    assert back["kcv"] == _keys(home, env)["MAC-T"] and back["origin"] == "tr31"
