"""Project Wycheproof vectors through keyload.core.ecc (P-256, docs/protocol.md §10.1).

Files (tests/vectors/wycheproof/, schema v1): ecdh_secp256r1_ecpoint_test.json (the peer's
public key as an X9.62 point), ecdsa_secp256r1_sha256_p1363_test.json (signatures r || s).
Every case is its own test, named by file and tcId.

How results are treated:

- ``valid``: ECDH gives ``shared`` byte for byte; an ECDSA signature verifies (returns None).
- ``invalid``: ECDH refuses the public point with exactly :class:`IntegrityError` (what §10.1
  gives for a point that is not on the curve or whose first byte is not ``04``); ECDSA
  refuses the signature with exactly :class:`AuthenticityError`, whatever the reason
  (a length other than 64, ``r`` or ``s`` out of range, a wrong value).
- ``acceptable`` (only ECDH ``CompressedPublic``: a valid point in compressed form, which
  X9.62 allows and Wycheproof leaves to the implementation): §10.1 says a public key travels
  as the 65-byte uncompressed point and a first byte other than ``04`` makes it invalid, so
  keyload refuses it with IntegrityError. The test pins that stricter choice, and checks
  that the same point uncompressed gives ``shared``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyload.core.ecc import ORDER, ecdh_into, ecdsa_verify
from keyload.core.errors import AuthenticityError, IntegrityError

WYCHEPROOF = Path(__file__).resolve().parents[1] / "vectors" / "wycheproof"


def _cases(name: str) -> list[Any]:
    data = json.loads((WYCHEPROOF / name).read_text())
    stem = name.removesuffix("_test.json")
    params = [pytest.param(group, test, id=f"{stem}:{test['tcId']}")
              for group in data["testGroups"] for test in group["tests"]]
    assert len(params) == data["numberOfTests"]
    return params


def _scalar(hex_: str) -> bytes:
    d = int(hex_, 16)
    assert 1 <= d < ORDER
    return d.to_bytes(32, "big")


@pytest.mark.parametrize(("group", "test"), _cases("ecdh_secp256r1_ecpoint_test.json"))
def test_ecdh(group: dict[str, Any], test: dict[str, Any]) -> None:
    assert group["curve"] == "secp256r1" and group["encoding"] == "ecpoint"
    public, private = bytes.fromhex(test["public"]), _scalar(test["private"])
    out = bytearray(32)
    if test["result"] == "valid":
        ecdh_into(private, public, out)
        assert out.hex() == test["shared"]
        return
    with pytest.raises(IntegrityError) as info:
        ecdh_into(private, public, out)
    assert type(info.value) is IntegrityError
    assert out == bytearray(32)
    if test["result"] == "acceptable":
        assert test["flags"] == ["CompressedPublic", "CompressedPoint"]
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
        ecdh_into(private, point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
                  out)
        assert out.hex() == test["shared"]
    else:
        assert test["result"] == "invalid"


@pytest.mark.parametrize(("group", "test"), _cases("ecdsa_secp256r1_sha256_p1363_test.json"))
def test_ecdsa_p1363(group: dict[str, Any], test: dict[str, Any]) -> None:
    key = group["publicKey"]
    assert key["curve"] == "secp256r1" and group["sha"] == "SHA-256"
    point = bytes.fromhex(key["uncompressed"])
    msg, sig = bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
    if test["result"] == "valid":
        assert ecdsa_verify(point, sig, msg) is None
        return
    assert test["result"] == "invalid"
    with pytest.raises(AuthenticityError) as info:
        ecdsa_verify(point, sig, msg)
    assert type(info.value) is AuthenticityError
