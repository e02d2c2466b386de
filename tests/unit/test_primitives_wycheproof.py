"""Project Wycheproof vectors through keyload.core.primitives.

Files (tests/vectors/wycheproof/, schema v1): aes_cmac_test.json, aes_wrap_test.json,
aes_kwp_test.json, hmac_sha256_test.json. Every case is its own test, named by file and tcId.

How results are treated:

- ``valid``: the primitive reproduces the vector (MAC equal, wrap gives ``ct``, unwrap gives
  ``msg``; CMAC tags also verify through ``aes_cmac_verify``).
- ``invalid``: unwrapping ``ct`` raises exactly :class:`IntegrityError`; a MAC tag does not
  verify (IntegrityError) / differs from the computed one; wrapping ``msg``, when the library
  accepts to, must not give ``ct``. CMAC cases flagged ``InvalidKeySize`` raise exactly
  ``ValueError`` (what pyca/cryptography raises for an AES key of a bad size).
- ``acceptable`` (only AES-KW ``ShortKey``: RFC 3394 allows wrapping an 8-byte key as one AES
  block, SP 800-38F does not define it): keyload follows SP 800-38F. Wrapping an 8-byte key
  is refused with ``ValueError`` and unwrapping the 16-byte result is refused with
  ``IntegrityError``. The test pins that stricter choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keyload.core.errors import IntegrityError
from keyload.core.primitives import (
    aes_cmac,
    aes_cmac_verify,
    aes_kw_unwrap,
    aes_kw_wrap,
    aes_kwp_unwrap,
    aes_kwp_wrap,
    hmac_sha256,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
WYCHEPROOF = VECTORS / "wycheproof"


def _cases(name: str) -> list[Any]:
    """One pytest.param per test of a Wycheproof file: (group, test), id = file:tcId."""
    data = json.loads((WYCHEPROOF / name).read_text())
    stem = name.removesuffix("_test.json")
    params = []
    for group in data["testGroups"]:
        for test in group["tests"]:
            params.append(pytest.param(group, test, id=f"{stem}:{test['tcId']}"))
    assert len(params) == data["numberOfTests"]
    return params


def _hex(test: dict[str, Any], field: str) -> bytes:
    return bytes.fromhex(test[field])


# --- AES-CMAC ---------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "test"), _cases("aes_cmac_test.json"))
def test_aes_cmac(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, msg, tag = _hex(test, "key"), _hex(test, "msg"), _hex(test, "tag")
    tag_len = group["tagSize"] // 8
    assert len(key) * 8 == group["keySize"]
    if "InvalidKeySize" in test["flags"]:
        assert test["result"] == "invalid"
        with pytest.raises(ValueError) as info:
            aes_cmac(key, msg)
        assert type(info.value) is ValueError
        # a full-length tag reaches the key check: same ValueError, never "verified"
        with pytest.raises(ValueError) as info:
            aes_cmac_verify(key, msg, bytes(16))
        assert type(info.value) is ValueError
        if not tag:
            # the vector's tag is empty: refused before the key is used
            with pytest.raises(IntegrityError) as ierr:
                aes_cmac_verify(key, msg, tag)
            assert type(ierr.value) is IntegrityError
        return
    full = aes_cmac(key, msg)
    assert len(full) == 16
    if test["result"] == "valid":
        assert full[:tag_len] == tag
        aes_cmac_verify(key, msg, tag)  # must not raise
        aes_cmac_verify(bytearray(key), memoryview(msg), tag)  # any buffer type
    else:
        assert test["result"] == "invalid"
        assert full[:tag_len] != tag
        with pytest.raises(IntegrityError) as ierr:
            aes_cmac_verify(key, msg, tag)
        assert type(ierr.value) is IntegrityError


# --- HMAC-SHA256 ------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "test"), _cases("hmac_sha256_test.json"))
def test_hmac_sha256(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, msg, tag = _hex(test, "key"), _hex(test, "msg"), _hex(test, "tag")
    tag_len = group["tagSize"] // 8
    assert len(key) * 8 == group["keySize"]
    full = hmac_sha256(key, msg)
    assert len(full) == 32
    if test["result"] == "valid":
        assert full[:tag_len] == tag
    else:
        assert test["result"] == "invalid"
        assert full[:tag_len] != tag


# --- AES-KW / AES-KWP -------------------------------------------------------------------


def _check_wrap(
    group: dict[str, Any],
    test: dict[str, Any],
    wrap: Any,
    unwrap: Any,
) -> None:
    key, msg, ct = _hex(test, "key"), _hex(test, "msg"), _hex(test, "ct")
    assert len(key) * 8 == group["keySize"]
    result = test["result"]
    if result == "valid":
        assert wrap(key, msg) == ct
        assert unwrap(key, ct) == msg
        assert unwrap(bytearray(key), bytearray(ct)) == msg
        return
    if result == "acceptable":
        # Only AES-KW "ShortKey" (8-byte key data) is acceptable in these files;
        # keyload follows SP 800-38F and refuses both directions.
        assert "ShortKey" in test["flags"]
        assert len(msg) == 8
        with pytest.raises(ValueError) as verr:
            wrap(key, msg)
        assert type(verr.value) is ValueError
        with pytest.raises(IntegrityError) as ierr:
            unwrap(key, ct)
        assert type(ierr.value) is IntegrityError
        return
    assert result == "invalid"
    with pytest.raises(IntegrityError) as ierr:
        unwrap(key, ct)
    assert type(ierr.value) is IntegrityError
    try:
        produced = wrap(key, msg)
    except ValueError:
        return  # refusing to wrap bad key data (empty, short, not a multiple of 8) is right
    assert produced != ct


@pytest.mark.parametrize(("group", "test"), _cases("aes_wrap_test.json"))
def test_aes_kw(group: dict[str, Any], test: dict[str, Any]) -> None:
    _check_wrap(group, test, aes_kw_wrap, aes_kw_unwrap)


@pytest.mark.parametrize(("group", "test"), _cases("aes_kwp_test.json"))
def test_aes_kwp(group: dict[str, Any], test: dict[str, Any]) -> None:
    _check_wrap(group, test, aes_kwp_wrap, aes_kwp_unwrap)


def test_unwrap_errors_say_nothing() -> None:
    """IntegrityError carries no detail: the message is the same for every failure."""
    key = bytes(16)
    messages = set()
    for bad in (b"", bytes(7), bytes(16), bytes(24), bytes(25)):
        for unwrap in (aes_kw_unwrap, aes_kwp_unwrap):
            with pytest.raises(IntegrityError) as info:
                unwrap(key, bad)
            messages.add(str(info.value))
            assert info.value.__cause__ is None
            assert info.value.__suppress_context__
    # a KEK of a size AES does not have: unwrap still says only "integrity"
    for kek in (b"", bytes(15), bytes(20)):
        for unwrap in (aes_kw_unwrap, aes_kwp_unwrap):
            with pytest.raises(IntegrityError) as info:
                unwrap(kek, bytes(24))
            messages.add(str(info.value))
        for wrap in (aes_kw_wrap, aes_kwp_wrap):
            with pytest.raises(ValueError) as verr:
                wrap(kek, bytes(16))
            assert type(verr.value) is ValueError
    assert messages == {"6982 INTEGRITY: integrity check failed"}
