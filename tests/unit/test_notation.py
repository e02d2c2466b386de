"""The operator's notation for KLP1 values (``keyload`` flags): what is read, what is
refused and how the refusal is named."""

from __future__ import annotations

import pytest

from keyload.core.notation import (
    parse_hex,
    parse_load,
    parse_ranges,
    parse_sets,
    parse_sn,
    parse_trust,
)


def test_hex_with_or_without_0x() -> None:
    assert parse_hex("0x7B568eb721", "set id") == bytes.fromhex("7b568eb721")
    assert parse_hex("0a0b", "SN") == b"\x0a\x0b"


def test_hex_refused_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"^SN must be hex, got 'zz'$"):
        parse_hex("zz", "SN")


@pytest.mark.parametrize("text", ["", "00" * 33])
def test_sn_is_1_to_32_bytes(text: str) -> None:
    with pytest.raises(ValueError, match="SN must be 1 to 32 bytes"):
        parse_sn(text)


def test_ranges() -> None:
    assert parse_ranges(" 1, 2,10-12 ", "--slots") == frozenset({1, 2, 10, 11, 12})
    assert parse_ranges("254", "--slots") == frozenset({254})
    assert parse_ranges(" ANY ", "--slots") is None


@pytest.mark.parametrize(("text", "message"), [
    ("1,x", r"--slots: 'x' is not a number or range"),
    ("1-", r"--slots: '1-' is not a number or range"),
    ("0", r"REF2 must be in 1\.\.254"),
    ("250-255", r"REF2 must be in 1\.\.254"),
    ("3-2", r"--slots: empty list"),
])
def test_ranges_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ranges(text, "--slots")


def test_sets() -> None:
    assert parse_sets("7b568eb721, 0x0102030405,") == frozenset(
        {bytes.fromhex("7b568eb721"), bytes.fromhex("0102030405")})
    assert parse_sets("any") is None


@pytest.mark.parametrize(("text", "message"), [
    ("", "set ids are 5 bytes"),
    ("7b568eb7", "set ids are 5 bytes"),
    ("7b568eb721,zz", "set id must be hex, got 'zz'"),
])
def test_sets_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sets(text)


def test_load() -> None:
    assert parse_load("TMK-A:1") == (b"TMK-A", 1)
    assert parse_load("0x3100:254") == (b"1\x00", 254)
    assert parse_load("A:B:7") == (b"A:B", 7)  # REF2 after the last colon


@pytest.mark.parametrize(("text", "message"), [
    ("TMK-A", r"^--load 'TMK-A': expected REF1:REF2$"),
    ("TMK-A:x", r"^--load 'TMK-A:x': REF2 must be a number$"),
    ("TMK-A:0", r"^--load 'TMK-A:0': REF2 must be in 1\.\.254$"),
    ("TMK-A:255", r"^--load 'TMK-A:255': REF2 must be in 1\.\.254$"),
])
def test_load_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_load(text)


def test_trust() -> None:
    q = "04" + "ab" * 64
    assert parse_trust([f"0102030405={q}", f"0A0B0C0D0E={q}"]) == {
        bytes.fromhex("0102030405"): bytes.fromhex(q),
        bytes.fromhex("0a0b0c0d0e"): bytes.fromhex(q)}
    assert parse_trust([]) == {}


@pytest.mark.parametrize("value", ["0102030405", "0102030405=zz", "xy=04ab"])
def test_trust_refused_without_echoing_the_value(value: str) -> None:
    with pytest.raises(ValueError, match=r"expected SETID=Q_CA, both hex$"):
        parse_trust([value])


def test_trust_refusal_shows_at_most_24_characters() -> None:
    with pytest.raises(ValueError) as e:
        parse_trust(["01" * 40])
    assert str(e.value) == f"--ca {('01' * 40)[:24]!r}: expected SETID=Q_CA, both hex"
