"""X9.143 (TR-31) key blocks through keyload.core.keyblock: the psec test-suite's vectors
(tests/vectors/tr31, SOURCES.md) and blocks made by psec, an independent implementation,
in both directions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psec.tr31
import pytest
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from keyload.core.errors import IntegrityError, MalformedData
from keyload.core.keyblock import (
    KeyBlockHeader,
    header_for,
    key_facts,
    masked_length,
    parse_header,
    unwrap,
    wrap,
)
from keyload.core.keys import KeyAttributes, KeyType, kcv
from keyload.core.secret import Secret

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "tr31" /
                      "psec_tr31_tests.json").read_text())
# psec reads an extended length's "length of length" as bytes; X9.143:2021 as characters
# (SOURCES.md): these psec cases are psec's own and not taken here
PSEC_EXTENDED = {"test_header_load_optional_256_des", "test_header_load_optional_256_aes",
                 "test_header_load_optional_extended_length_des",
                 "test_header_load_optional_extended_length_aes"}


def _cmac(kbpk: bytes) -> Any:
    def mac(data: bytes) -> bytes:
        c = cmac.CMAC(algorithms.AES(kbpk))
        c.update(data)
        return c.finalize()
    return mac


def _open(kbpk: bytes, block: str) -> tuple[KeyBlockHeader, Secret]:
    return unwrap(block, cmac=_cmac(kbpk), kbpk_length=len(kbpk))


def _make(kbpk: bytes, header: KeyBlockHeader, key: bytes, masked: int = 0) -> str:
    return wrap(header, Secret(key), cmac=_cmac(kbpk), kbpk_length=len(kbpk),
                random=os.urandom, masked_length=masked)


@pytest.mark.parametrize("case", VECTORS["known_values"], ids=lambda c: f"tc{c['tc_id']}")
def test_known_values(case: dict[str, Any]) -> None:
    """A version D block opens to its key (the same KCV); A, B and C need a TDES KBPK,
    which keyload does not hold, and are refused saying so."""
    kbpk, key = bytes.fromhex(case["kbpk"]), bytes.fromhex(case["key"])
    if case["version_id"] != "D":
        with pytest.raises(ValueError, match="TDES KBPK"):
            _open(kbpk, case["key_block"])
        return
    header, got = _open(kbpk, case["key_block"])
    assert got.equals(key)
    assert kcv(KeyType.AES128, got.buffer) == kcv(KeyType.AES128, key)
    assert (header.usage, header.algorithm, header.mode, header.version_num,
            header.exportability) == (case["key_usage"], case["algorithm"],
                                      case["mode_of_use"], case["key_version_number"],
                                      case["exportability"])
    assert key_facts(header, len(got), version=4)[::2] == (KeyType.AES128, 4)


def _unwrap_error(case: dict[str, Any]) -> type[Exception]:
    """The error keyload raises for an unwrap_errors case: a block whose length field is
    not its length does not parse; versions A to C are then refused as such (ValueError);
    a version D block with a wrong MAC is an integrity failure; anything else does not
    parse."""
    block = case["key_block"]
    if block[0] in "ABC" and block[1:5].isdigit() and int(block[1:5]) == len(block):
        return ValueError
    if "MAC doesn't match" in case["psec_error"]:
        return IntegrityError
    return MalformedData


@pytest.mark.parametrize("case", VECTORS["unwrap_errors"], ids=lambda c: c["psec_error"][:40])
def test_unwrap_errors(case: dict[str, Any]) -> None:
    with pytest.raises(_unwrap_error(case)):
        _open(bytes.fromhex(case["kbpk"]), case["key_block"])


@pytest.mark.parametrize("case", VECTORS["header_errors"], ids=lambda c: c["input"][:30])
def test_header_errors(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedData):
        parse_header(case["input"])


@pytest.mark.parametrize("case", VECTORS["header_field_errors"],
                         ids=lambda c: c["psec_error"][:30])
def test_header_field_errors(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedData):
        KeyBlockHeader(case["version_id"], case["key_usage"], case["algorithm"],
                       case["mode_of_use"], case["version_num"], case["exportability"])


@pytest.mark.parametrize("case", [c for c in VECTORS["header_parsing"]
                                  if c["name"] not in PSEC_EXTENDED], ids=lambda c: c["name"])
def test_header_parsing(case: dict[str, Any]) -> None:
    for load in case["loads"]:
        header, used = parse_header(load["input"])
        assert used == load["expected_consumed_length"]
    want = case["expected"]
    assert (header.version_id, header.usage, header.algorithm, header.mode,
            header.exportability, header.reserved) == (
        want["version_id"], want["key_usage"], want["algorithm"], want["mode_of_use"],
        want["exportability"], want["reserved"])
    assert {i: d for i, d in header.blocks if i != "PB"} == want.get("blocks", {})


@pytest.mark.parametrize("case", [c for c in VECTORS["wrap_lengths"]
                                  if c["version_id"] == "D" and c["algorithm"] == "A"],
                         ids=lambda c: f"{c['key_len_bytes']}-{c['masked_key_len_bytes']}")
def test_wrap_lengths(case: dict[str, Any]) -> None:
    """Blocks as long as psec's for the same key and obfuscation target (none given: the
    longest AES key, 32 bytes)."""
    masked = case["masked_key_len_bytes"]
    block = _make(b"E" * 24, KeyBlockHeader("D", "P0", "A", "E", "00", "N"),
                  b"F" * case["key_len_bytes"], 32 if masked is None else masked)
    assert len(block) == int(block[1:5]) == case["expected_key_block_len"]


KEYS = [(KeyType.AES128, 16), (KeyType.AES192, 24), (KeyType.AES256, 32),
        (KeyType.HMAC_SHA256, 48)]


@pytest.mark.parametrize("kbpk_len", [16, 24, 32])
@pytest.mark.parametrize(("kt", "n"), KEYS, ids=lambda x: getattr(x, "label", str(x)))
def test_keyload_blocks_open_with_psec(kbpk_len: int, kt: KeyType, n: int) -> None:
    kbpk, key = os.urandom(kbpk_len), os.urandom(n)
    usage = "M7" if kt == KeyType.HMAC_SHA256 else "D0"
    header = header_for(kt, KeyAttributes(usage, "B", "S"), 42)
    block = _make(kbpk, header, key, masked_length(kt))
    got_header, got = psec.tr31.unwrap(kbpk, block)
    assert got == key
    assert (got_header.version_id, got_header.key_usage, got_header.algorithm,
            got_header.mode_of_use, got_header.version_num, got_header.exportability) == (
        "D", usage, "A" if kt.is_aes else "H", "B", "42", "S")


@pytest.mark.parametrize("kbpk_len", [16, 24, 32])
@pytest.mark.parametrize(("kt", "n"), KEYS[:3], ids=lambda x: getattr(x, "label", str(x)))
def test_psec_blocks_open_in_keyload(kbpk_len: int, kt: KeyType, n: int) -> None:
    kbpk, key = os.urandom(kbpk_len), os.urandom(n)
    block = psec.tr31.wrap(kbpk, psec.tr31.Header("D", "P0", "A", "E", "07", "E"), key)
    header, got = _open(kbpk, block)
    assert got.equals(key)
    assert key_facts(header, len(got), version=None) == (
        kt, KeyAttributes("P0", "E", "E"), 7)


def test_key_length_is_hidden() -> None:
    """X9.143 §6.4: an AES-128 and an AES-256 key make blocks of one length."""
    kbpk = os.urandom(32)
    h = header_for(KeyType.AES128, KeyAttributes("P0", "E", "E"), 1)
    assert len(_make(kbpk, h, os.urandom(16), 32)) == len(_make(kbpk, h, os.urandom(32), 32))


@pytest.mark.parametrize("where", ["header", "key data", "mac"])
def test_any_change_is_an_integrity_failure(where: str) -> None:
    kbpk = os.urandom(32)
    block = _make(kbpk, header_for(KeyType.AES256, KeyAttributes("P0", "E", "N"), 1),
                  os.urandom(32), 32)
    i = {"header": 5, "key data": 20, "mac": len(block) - 1}[where]
    altered = block[:i] + ("1" if block[i] != "1" else "2") + block[i + 1:]
    with pytest.raises(IntegrityError):
        _open(kbpk, altered)
    with pytest.raises(IntegrityError):
        _open(os.urandom(32), block)  # another KBPK


@pytest.mark.parametrize(("header", "version", "why"), [
    (KeyBlockHeader("D", "P0", "T", "E", "01", "E"), None, "TDES"),
    (KeyBlockHeader("D", "P0", "A", "E", "00", "E"), None, "--key-version"),
    (KeyBlockHeader("D", "P0", "A", "E", "02", "E"), 3, "says version 2"),
    (KeyBlockHeader("D", "P0", "A", "E", "c1", "E"), None, "component"),
    (KeyBlockHeader("D", "M7", "H", "C", "01", "E"), None, "HM 21"),
])
def test_key_facts_refusals(header: KeyBlockHeader, version: int | None, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        key_facts(header, 16, version=version)


def test_hmac_key_facts() -> None:
    header = header_for(KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "E"), 5)
    assert key_facts(header, 48, version=None) == (
        KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "E"), 5)
    with pytest.raises(ValueError, match="two digits"):
        header_for(KeyType.AES128, KeyAttributes("P0", "E", "E"), 100)


def test_extended_length_counts_characters() -> None:
    """X9.143:2021: after a length of 00, the length of the length is a count of hex
    characters; a block over 255 characters is written that way and read back."""
    header, used = parse_header("D0000P0TE00N0100KS0004001A" + "0" * 16 + "rest")
    assert used == 42 and header.blocks == (("KS", "0" * 16),)
    long = KeyBlockHeader("D", "P0", "A", "E", "01", "E", (("KS", "P" * 300),))
    text = long.encode(0)
    assert text[16:26] == "KS00040136"  # 2 + 2 + 2 + 4 + 300 = 0x136
    assert parse_header(text) == (long, len(text))
