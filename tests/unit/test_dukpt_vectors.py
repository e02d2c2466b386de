"""AES DUKPT (keyload.core.dukpt) against the ANSI X9.24-3-2017 supplement's published
values for an AES-128 BDK (tests/vectors/dukpt/aes128_x9_24_3_supplement.json): the IK,
every transaction's intermediate derivation key, and the PIN, MAC and data working keys of
the first eight transactions; and the refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.conftest import VECTORS

from keyload.core.dukpt import (
    InitialKeyId,
    InitialKeyOrder,
    KeyUsage,
    initial_key,
    initial_key_data,
    parse_ksn,
    transaction_key,
    working_key,
)
from keyload.core.keys import KeyType
from keyload.core.primitives import aes_ecb_encrypt_into

SET: dict[str, Any] = json.loads(
    (VECTORS / "dukpt" / "aes128_x9_24_3_supplement.json").read_text())["aes128_bdk"]
BDK = bytes.fromhex(SET["bdk"])
IK_ID = InitialKeyId.parse(SET["initial_key_id"])
IK = bytes.fromhex(SET["initial_key"])
AES128 = KeyType.AES128
WORKING = [("pin_key_aes128", KeyUsage.PIN_ENCRYPTION),
           ("mac_generation_key_aes128", KeyUsage.MAC_GENERATION),
           ("data_encryption_key_aes128", KeyUsage.DATA_ENCRYPTION)]


def test_initial_key() -> None:
    assert bytes(initial_key(BDK, IK_ID, AES128).buffer) == IK


def test_initial_key_data_is_what_aes_ecb_under_the_bdk_encrypts() -> None:
    """The blocks a token encrypts (CKM_AES_ECB_ENCRYPT_DATA) give the same IK."""
    out = bytearray(16)
    aes_ecb_encrypt_into(BDK, initial_key_data(AES128, IK_ID), out)
    assert bytes(out) == IK


@pytest.mark.parametrize("t", SET["transactions"], ids=lambda t: t["ksn"])
def test_derivation_key(t: dict[str, Any]) -> None:
    ksn = bytes.fromhex(t["ksn"])
    assert parse_ksn(ksn) == (IK_ID, t["transaction_counter"])
    assert bytes(transaction_key(IK, AES128, ksn).buffer).hex().upper() == t["derivation_key"]


@pytest.mark.parametrize("t", [t for t in SET["transactions"] if "pin_key_aes128" in t],
                         ids=lambda t: t["ksn"])
def test_working_keys(t: dict[str, Any]) -> None:
    ksn = bytes.fromhex(t["ksn"])
    for name, usage in WORKING:
        assert bytes(working_key(IK, AES128, ksn, usage).buffer).hex().upper() == t[name]


def test_aes128_ik_from_an_aes256_bdk_and_not_the_other_way() -> None:
    bdk256 = bytes(range(32))
    assert len(initial_key(bdk256, IK_ID, AES128)) == 16
    assert len(initial_key(bdk256, IK_ID, KeyType.AES256)) == 32
    assert len(initial_key(bdk256, IK_ID, KeyType.AES192)) == 24
    with pytest.raises(ValueError, match="no stronger than its parent"):
        initial_key(BDK, IK_ID, KeyType.AES256)
    with pytest.raises(ValueError, match="AES keys only"):
        InitialKeyOrder(IK_ID, KeyType.HMAC_SHA256).key_type(AES128)


@pytest.mark.parametrize(("text", "match"), [
    ("12345678901234", "8 bytes"), ("123456789012345678", "8 bytes"), ("12345678ZZ123456", "hex")])
def test_initial_key_id_refused(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InitialKeyId.parse(text)


@pytest.mark.parametrize("ksn", ["1234567890123456000001", "123456789012345600000000",
                                 "12345678901234560001FFFF"])
def test_ksn_refused(ksn: str) -> None:
    """Wrong length, counter 0, counter 1FFFF (17 one-bits: no terminal uses it)."""
    with pytest.raises(ValueError):
        parse_ksn(bytes.fromhex(ksn))


def test_initial_key_ids_count_up_in_the_derivation_id() -> None:
    assert IK_ID.plus(2).hex() == "1234567890123458"
    with pytest.raises(ValueError, match="run out"):
        InitialKeyId.parse("12345678FFFFFFFF").plus(1)
