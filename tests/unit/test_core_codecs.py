"""TLV, APDU, key header, attributes, KCV and KLP1 message codecs (docs/protocol.md §2-§5)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import KLP1_VECTORS

from keyload.core import tlv
from keyload.core.apdu import CommandAPDU, ResponseAPDU, sw_bytes
from keyload.core.errors import (
    SW,
    AuthenticityError,
    ClaNotSupported,
    InsNotSupported,
    IntegrityError,
    MalformedData,
    MemoryFailure,
    NoChallenge,
    NotFound,
    PolicyRefused,
    Revoked,
    StatusError,
    UnexpectedStatus,
    UnknownSet,
    Unsupported,
    WrongLength,
    WrongP1P2,
    error_for_sw,
)
from keyload.core.keys import (
    HEADER_LEN,
    KeyAttributes,
    KeyHeader,
    KeyType,
    aes_kcv,
    kcv,
)
from keyload.core.messages import (
    T_R,
    T_REF1,
    T_REF2,
    T_SET,
    T_SN,
    T_SUITE,
    ExportRequest,
    ExportResponse,
    ImportData,
    ImportResponse,
    InitResponse,
    SlotStatus,
    check_ref1,
    check_ref2,
    check_sn,
)

KLP1 = json.loads(KLP1_VECTORS.read_text())
EXPORTS = [c for c in KLP1["cases"] if c["kind"] == "export"]
IMPORT_OK = [c for c in KLP1["cases"] if c["kind"] == "import" and c["expected"]["sw"] == "9000"]


def _export_params() -> list[Any]:
    assert len(EXPORTS) == 9
    return [pytest.param(c, id=c["name"]) for c in EXPORTS]


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


# =========================================================================================
# TLV
# =========================================================================================

values = st.binary(max_size=300)
items_st = st.lists(st.tuples(st.integers(0, 255), values), max_size=8)


@settings(max_examples=200, deadline=None)
@given(items_st)
def test_tlv_round_trip(items: list[tuple[int, bytes]]) -> None:
    data = tlv.encode(items)
    assert tlv.iter_tlv(data) == items
    assert tlv.decode(data, [t for t, _ in items]) == [v for _, v in items]


@pytest.mark.parametrize(
    ("n", "length_bytes"),
    [
        (0, "00"),
        (1, "01"),
        (0x7F, "7f"),
        (0x80, "8180"),
        (0xFF, "81ff"),
        (0x100, "820100"),
        (0x1234, "821234"),
        (0xFFFF, "82ffff"),
    ],
)
def test_tlv_length_forms(n: int, length_bytes: str) -> None:
    assert tlv.encode_length(n).hex() == length_bytes
    value = bytes(i & 0xFF for i in range(n))
    data = tlv.tlv(0xC9, value)
    assert data == b"\xc9" + _h(length_bytes) + value
    assert tlv.decode(data, (0xC9,)) == [value]
    # followed by a second object, the boundary is found exactly
    data2 = data + tlv.tlv(0xCA, b"\x01")
    assert tlv.decode(data2, (0xC9, 0xCA)) == [value, b"\x01"]


def test_tlv_too_long_value_refused() -> None:
    with pytest.raises(ValueError):
        tlv.encode_length(0x10000)
    with pytest.raises(ValueError):
        tlv.tlv(0xC9, bytes(0x10000))


@pytest.mark.parametrize(
    "data",
    [
        "c9817f" + "00" * 0x7F,  # 81 form for a length below 0x80
        "c98100",  # 81 form, length 0
        "c98200ff" + "00" * 0xFF,  # 82 form for a length below 0x100
        "c9820000",  # 82 form, length 0
        "c982007f" + "00" * 0x7F,
        "c980",  # indefinite length (BER) is not KLP1
        "c98300000100",  # 83 form not allowed
        "c984000000010000",
        "c9ff",
    ],
    ids=lambda d: d[:12],
)
def test_tlv_non_minimal_or_unsupported_length(data: str) -> None:
    with pytest.raises(MalformedData):
        tlv.iter_tlv(_h(data))
    with pytest.raises(MalformedData):
        tlv.decode(_h(data), (0xC9,))


@pytest.mark.parametrize(
    "data",
    ["c9", "c981", "c982", "c98201", "c901", "c90201", "c98180" + "00" * 0x7F,
     "c9820100" + "00" * 0xFF, "c70101c8"],
)
def test_tlv_truncated(data: str) -> None:
    with pytest.raises(MalformedData):
        tlv.iter_tlv(_h(data))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), values), min_size=1, max_size=5), st.data())
def test_tlv_every_proper_prefix_is_malformed(
    items: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    enc = tlv.encode(items)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(MalformedData):
        tlv.decode(enc[:cut], [t for t, _ in items])


@settings(max_examples=100, deadline=None)
@given(items_st, st.binary(min_size=1, max_size=20))
def test_tlv_trailing_bytes_are_malformed(items: list[tuple[int, bytes]], extra: bytes) -> None:
    with pytest.raises(MalformedData):
        tlv.decode(tlv.encode(items) + extra, [t for t, _ in items])


@pytest.mark.parametrize(("check", "value", "text"), [
    (check_sn, b"", "SN must be 1 to 32 bytes"),
    (check_sn, bytes(33), "SN must be 1 to 32 bytes"),
    (check_ref1, b"", "REF1 must be 1 to 32 bytes"),
    (check_ref1, bytes(33), "REF1 must be 1 to 32 bytes"),
    (check_ref2, 0, "REF2 must be in 1..254"),
    (check_ref2, 255, "REF2 must be in 1..254"),
], ids=["sn-empty", "sn-33", "ref1-empty", "ref1-33", "ref2-0", "ref2-255"])
def test_a_callers_bad_value_is_a_value_error(check: Any, value: Any, text: str) -> None:
    """check_sn/ref1/ref2 judge what a caller gives: a ValueError, not a status word."""
    with pytest.raises(ValueError, match=r"^" + re.escape(text) + "$") as info:
        check(value)
    assert type(info.value) is ValueError


@pytest.mark.parametrize(("tag", "value", "text"), [
    (T_SN, b"", "SN must be 1 to 32 bytes"),
    (T_REF1, bytes(33), "REF1 must be 1 to 32 bytes"),
    (T_REF2, b"\xff", "REF2 must be in 1..254"),
], ids=["sn", "ref1", "ref2"])
def test_the_same_field_in_a_message_is_malformed_data(tag: int, value: bytes,
                                                        text: str) -> None:
    """The same rules on a message received (EXPORTKEY data) answer 6A80."""
    fields = {T_SN: b"SN-1", T_REF1: b"TMK", T_REF2: b"\x01", T_SET: bytes(5),
              T_SUITE: b"\x01", T_R: bytes(16)}
    fields[tag] = value
    order = (T_SN, T_R, T_SET, T_SUITE, T_REF1, T_REF2)
    with pytest.raises(MalformedData) as info:
        ExportRequest.decode(tlv.encode([(t, fields[t]) for t in order]))
    assert info.value.sw == SW.MALFORMED and info.value.detail == text


def _export_request_by_the_rules(data: bytes) -> ExportRequest | None:
    """docs/protocol.md §5 read plainly, field by field through the generic TLV reader:
    the request, or None where the data must be refused with 6A80."""
    order = (T_SN, T_R, T_SET, T_SUITE, T_REF1, T_REF2)
    try:
        sn, r, set_id, suite, ref1, ref2 = tlv.decode(data, order)
    except MalformedData:
        return None
    if not (1 <= len(sn) <= 32 and len(r) == 16 and len(set_id) == 5 and len(suite) == 1
            and 1 <= len(ref1) <= 32 and len(ref2) == 1 and 1 <= ref2[0] <= 254):
        return None
    return ExportRequest(sn, r, set_id, suite[0], ref1, ref2[0])


@st.composite
def _export_request_data(draw: st.DrawFn) -> bytes:
    """An EXPORTKEY request whose fields are each of a valid length (most often) or just
    outside it, then perhaps one byte changed, some cut off or some added: what a request
    decoded by offsets must accept or refuse exactly as the rules do."""
    def field(lo: int, hi: int) -> bytes:
        if draw(st.integers(0, 3)):  # three times in four: a valid length
            return draw(st.binary(min_size=lo, max_size=hi))
        return draw(st.sampled_from([bytes(max(lo - 1, 0)), bytes(hi + 1)]))

    ref2 = draw(st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\xfe", b"\xff", b"", b"\x01\x01"]))
    fields = [(T_SN, field(1, 32)), (T_R, field(16, 16)), (T_SET, field(5, 5)),
              (T_SUITE, field(1, 1)), (T_REF1, field(1, 32)), (T_REF2, ref2)]
    data = bytearray(tlv.encode(fields))
    change = draw(st.sampled_from(["none", "none", "byte", "cut", "add"]))
    if change == "byte":
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif change == "cut":
        del data[draw(st.integers(0, len(data))):]
    elif change == "add":
        data += draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


@given(_export_request_data())
@settings(max_examples=1500)
def test_export_request_decode_accepts_and_refuses_as_the_rules(data: bytes) -> None:
    want = _export_request_by_the_rules(data)
    if want is None:
        with pytest.raises(MalformedData):
            ExportRequest.decode(data)
    else:
        got = ExportRequest.decode(data)
        assert got == want and type(got.sn) is bytes and type(got.ref1) is bytes


@pytest.mark.parametrize(("field", "value"), [
    (0, b""), (0, bytes(33)), (1, bytes(15)), (1, bytes(17)), (2, bytes(4)), (2, bytes(6)),
    (3, b""), (3, b"\x01\x01"), (4, b""), (4, bytes(33)), (5, b"\x00"), (5, b"\xff"),
    (5, b"\x01\x01"),
], ids=["sn-empty", "sn-33", "r-15", "r-17", "set-4", "set-6", "suite-empty", "suite-2",
        "ref1-empty", "ref1-33", "ref2-0", "ref2-255", "ref2-2-bytes"])
def test_export_request_decode_refuses_each_field_out_of_its_bounds(field: int,
                                                                   value: bytes) -> None:
    fields = [(T_SN, b"SN-1"), (T_R, bytes(16)), (T_SET, b"SET-1"), (T_SUITE, b"\x01"),
              (T_REF1, b"TMK"), (T_REF2, b"\x01")]
    fields[field] = (fields[field][0], value)
    with pytest.raises(MalformedData):
        ExportRequest.decode(tlv.encode(fields))


def test_export_request_decode_takes_every_valid_length() -> None:
    """Every SN and REF1 length from 1 to 32 (the offsets depend on both) round-trips."""
    for n_sn in range(1, 33):
        for n_ref1 in range(1, 33):
            req = ExportRequest(bytes(range(n_sn)), bytes(16), b"SET-1", 1,
                                bytes([0x41] * n_ref1), 254 if n_ref1 % 2 else 1)
            assert ExportRequest.decode(req.encode()) == req


TAGS = (0xC7, 0xC8, 0xC9, 0xCA, 0xCB)
GOOD = [(0xC7, b"\x01"), (0xC8, bytes(12)), (0xC9, bytes(40)), (0xCA, bytes(16)),
        (0xCB, bytes(16))]


def test_tlv_decode_good_reference() -> None:
    assert tlv.decode(tlv.encode(GOOD), TAGS) == [v for _, v in GOOD]


@pytest.mark.parametrize(
    "items",
    [
        [GOOD[1], GOOD[0], *GOOD[2:]],  # wrong order
        [*GOOD[:4][::-1], GOOD[4]],
        [*GOOD, GOOD[4]],  # duplicate at the end
        [GOOD[0], GOOD[0], *GOOD[1:]],  # duplicate inside
        GOOD[:4],  # missing last
        GOOD[1:],  # missing first
        [*GOOD[:2], *GOOD[3:]],  # missing middle
        [*GOOD[:2], (0xCC, b"\x00"), *GOOD[3:]],  # unknown tag in place of one
        [*GOOD, (0xCC, b"")],  # extra unknown tag
        [],
    ],
    ids=["swap01", "reversed", "dup-last", "dup-first", "miss-last", "miss-first",
         "miss-mid", "foreign", "extra", "empty"],
)
def test_tlv_order_duplicates_missing(items: list[tuple[int, bytes]]) -> None:
    with pytest.raises(MalformedData):
        tlv.decode(tlv.encode(items), TAGS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(0, 255), max_size=4))
def test_tlv_decode_arbitrary_bytes(data: bytes, tags: list[int]) -> None:
    """Any input gives values or MalformedData, nothing else; values re-encode to input."""
    try:
        got = tlv.decode(data, tags)
    except MalformedData:
        return
    assert tlv.encode(zip(tags, got, strict=True)) == data


# =========================================================================================
# APDU
# =========================================================================================

header_st = st.tuples(*(st.integers(0, 255) for _ in range(4)))
apdu_data = st.one_of(
    st.binary(max_size=300),
    st.integers(256, 65535).map(lambda n: bytes((n % 251,)) * n),
)
apdu_ne = st.one_of(st.integers(0, 300), st.integers(0, 65536), st.sampled_from([256, 257, 65536]))


@settings(max_examples=200, deadline=None)
@given(header_st, apdu_data, apdu_ne)
def test_command_apdu_round_trip(h: tuple[int, int, int, int], data: bytes, ne: int) -> None:
    cmd = CommandAPDU(*h, data, ne=ne)
    enc = cmd.encode()
    assert enc[:4] == bytes(h)
    nc = len(data)
    short = nc <= 255 and ne <= 256
    if short:
        assert len(enc) == 4 + (1 + nc if nc else 0) + (1 if ne else 0)
    else:
        expected = 4 + (3 + nc if nc else 0) + ((2 if nc else 3) if ne else 0)
        assert len(enc) == expected
    assert CommandAPDU.decode(enc) == cmd


def test_command_apdu_too_long() -> None:
    with pytest.raises(ValueError):
        CommandAPDU(0, 0, 0, 0, bytes(65536)).encode()
    with pytest.raises(ValueError):
        CommandAPDU(0, 0, 0, 0, b"", ne=65537).encode()


D3 = "aabbcc"


@pytest.mark.parametrize(
    ("hexapdu", "data", "ne"),
    [
        ("80100000", "", 0),  # case 1
        ("8010000000", "", 256),  # case 2S, Le 00
        ("8010000010", "", 16),  # case 2S
        ("80140000" + "03" + D3, D3, 0),  # case 3S
        ("80140000" + "03" + D3 + "00", D3, 256),  # case 4S, Le 00
        ("80140000" + "03" + D3 + "05", D3, 5),  # case 4S
        ("80100000" + "000000", "", 65536),  # case 2E, Le 0000
        ("80100000" + "000100", "", 256),  # case 2E
        ("80140000" + "000003" + D3, D3, 0),  # case 3E
        ("80140000" + "000003" + D3 + "0000", D3, 65536),  # case 4E
        ("80140000" + "000003" + D3 + "0102", D3, 0x102),  # case 4E
    ],
    ids=["1", "2S-00", "2S", "3S", "4S-00", "4S", "2E-0000", "2E", "3E", "4E-0000", "4E"],
)
def test_command_apdu_seven_cases(hexapdu: str, data: str, ne: int) -> None:
    cmd = CommandAPDU.decode(_h(hexapdu))
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2) == tuple(_h(hexapdu)[:4])
    assert cmd.data == _h(data)
    assert cmd.ne == ne


def test_command_apdu_extended_data_boundary() -> None:
    data = bytes(range(256))
    enc = CommandAPDU(0x80, 0x14, 0, 0, data, ne=256).encode()
    assert enc == _h("80140000000100") + data + _h("0100")
    enc = CommandAPDU(0x80, 0x14, 0, 0, data[:255], ne=256).encode()
    assert enc == _h("80140000ff") + data[:255] + _h("00")


@pytest.mark.parametrize(
    "hexapdu",
    [
        "",
        "80",
        "801400",
        "80140000" + "01" + D3,  # Lc 1 but 3 data bytes
        "80140000" + "04" + D3,  # Lc 4 but 3 data bytes
        "80140000" + "ff" + D3,
        "80140000" + "0000",  # extended marker, truncated
        "80140000" + "00000000",  # extended Lc of zero
        "80140000" + "000000" + D3,
        "80140000" + "000004" + D3,  # extended Lc larger than the data
        "80140000" + "000002" + D3,  # extended Lc smaller (no valid Le split)
        "80140000" + "000001" + D3 + "00",
    ],
)
def test_command_apdu_inconsistent_lc(hexapdu: str) -> None:
    with pytest.raises(WrongLength):
        CommandAPDU.decode(_h(hexapdu))


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=4, max_size=4).flatmap(
        lambda h: st.binary(max_size=300).map(lambda b: h + b"\x00" + b)),
))
def test_command_apdu_decode_arbitrary(raw: bytes) -> None:
    """decode either returns a command or raises WrongLength; a result re-encodes stably."""
    try:
        cmd = CommandAPDU.decode(raw)
    except WrongLength:
        return
    assert CommandAPDU.decode(cmd.encode()) == cmd


def test_response_apdu_codec() -> None:
    r = ResponseAPDU.decode(_h("cd0501020304059000"))
    assert r.data == _h("cd050102030405")
    assert r.sw == 0x9000
    assert r.encode() == _h("cd0501020304059000")
    assert ResponseAPDU.decode(_h("6a80")) == ResponseAPDU(b"", 0x6A80)
    for short in (b"", b"\x90"):
        with pytest.raises(WrongLength):
            ResponseAPDU.decode(short)
    assert sw_bytes(0x6982) == b"\x69\x82"


EXPECTED_ERRORS: dict[int, type[StatusError]] = {
    0x6700: WrongLength,
    0x6A80: MalformedData,
    0x6A81: Unsupported,
    0x6A82: UnknownSet,
    0x6A86: WrongP1P2,
    0x6A88: NotFound,
    0x6982: IntegrityError,
    0x6983: Revoked,
    0x6985: NoChallenge,
    0x6986: PolicyRefused,
    0x6988: AuthenticityError,
    0x6581: MemoryFailure,
    0x6D00: InsNotSupported,
    0x6E00: ClaNotSupported,
}


def test_every_protocol_sw_is_mapped() -> None:
    assert set(EXPECTED_ERRORS) | {0x9000} == {int(s) for s in SW}


@pytest.mark.parametrize(("sw", "cls"), list(EXPECTED_ERRORS.items()),
                         ids=[f"{s:04X}" for s in EXPECTED_ERRORS])
def test_response_check_raises_typed_error(sw: int, cls: type[StatusError]) -> None:
    with pytest.raises(StatusError) as info:
        ResponseAPDU(b"\x01\x02", sw).check("context")
    assert type(info.value) is cls
    assert info.value.sw == sw
    assert str(info.value).startswith(f"{sw:04X} ")
    err = error_for_sw(sw)
    assert type(err) is cls
    assert err.sw == sw


def test_response_check_success_returns_data() -> None:
    assert ResponseAPDU(b"\xcd\x00", 0x9000).check() == b"\xcd\x00"
    assert ResponseAPDU(b"", 0x9000).check() == b""


@pytest.mark.parametrize("sw", [0x6F00, 0x6A83, 0x6300, 0x9001, 0x6100])
def test_response_check_unexpected_sw(sw: int) -> None:
    with pytest.raises(UnexpectedStatus) as info:
        ResponseAPDU(b"", sw).check()
    assert info.value.raw == sw
    assert str(info.value) == f"{sw:04X} unexpected status word"
    assert info.value.code == sw


@pytest.mark.parametrize("raw", [0x6F00, 0x6A83, 0x9001])
def test_unexpected_status_sw_is_the_word_received(raw: int) -> None:
    """``.sw`` is the status word received (it was the class default 6A80), so a handler
    that converts it at the boundary answers that word."""
    e = UnexpectedStatus(raw)
    assert e.sw == raw and e.code == raw and e.raw == raw
    assert sw_bytes(e.sw) == raw.to_bytes(2, "big")
    assert str(e) == f"{raw:04X} unexpected status word"
    assert e.detail == f"unexpected status word {raw:04X}"
    assert isinstance(e, StatusError)


def test_unexpected_status_keeps_its_own_code() -> None:
    """An SW outside §6 is reported as itself (``code``), never as a known refusal."""
    e = error_for_sw(0x6F00)
    assert e.code == 0x6F00
    assert error_for_sw(0x6A80).code == SW.MALFORMED


# =========================================================================================
# Key header, attributes, KCV
# =========================================================================================

ascii_char = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.text(ascii_char, min_size=2, max_size=2), st.text(ascii_char, min_size=1, max_size=1),
    st.integers(0, 65535), st.text(ascii_char, min_size=1, max_size=1), st.integers(0, 255),
)
def test_key_header_round_trip(hv: int, suite: int, kt: int, kl: int, usage: str, mode: str,
                               version: int, exp: str, flags: int) -> None:
    h = KeyHeader(suite=suite, key_type=kt, key_length=kl, usage=usage, mode=mode,
                  version=version, exportability=exp, flags=flags, header_version=hv)
    enc = h.encode()
    assert len(enc) == HEADER_LEN == 12
    assert enc[0] == hv and enc[1] == suite and enc[2] == kt and enc[3] == kl
    assert enc[4:6] == usage.encode() and enc[6:7] == mode.encode()
    assert int.from_bytes(enc[7:9], "big") == version
    assert enc[9:10] == exp.encode() and enc[10] == flags and enc[11] == 0
    assert KeyHeader.decode(enc) == h
    assert h.diversified == bool(flags & 1)
    assert h.ed25519 == bool(flags & 2)


@pytest.mark.parametrize("n", [0, 11, 13, 24])
def test_key_header_wrong_length(n: int) -> None:
    with pytest.raises(MalformedData):
        KeyHeader.decode(bytes(n))


def _header_for(case: dict[str, Any]) -> KeyHeader:
    key = case["key"]
    flags = (1 if key["diversify"] else 0) | (2 if case["signing_key"] else 0)
    return KeyHeader(suite=case["suite"], key_type=key["type"],
                     key_length=len(_h(case["expected"]["TA_loaded"])), usage=key["usage"],
                     mode=key["mode"], version=key["version"],
                     exportability=key["exportability"], flags=flags)


@pytest.mark.parametrize("case", _export_params())
def test_key_header_vectors(case: dict[str, Any]) -> None:
    want = _h(case["expected"]["H"])
    assert _header_for(case).encode() == want
    dec = KeyHeader.decode(want)
    assert dec == _header_for(case)
    assert dec.header_version == 1
    dec.check_supported((1, 2))
    with pytest.raises(Unsupported):
        dec.check_supported((3 - case["suite"],))


def test_key_header_check_supported_version() -> None:
    h = KeyHeader(suite=1, key_type=3, key_length=32, usage="K0", mode="B", version=1,
                  exportability="N", flags=0, header_version=2)
    with pytest.raises(Unsupported):
        h.check_supported((1, 2))


def test_key_attributes_accepts_valid() -> None:
    for usage in ("K0", "D0", "M3", "P0", "B0"):
        for mode in "BEDGVCNX":
            for exp in "NES":
                a = KeyAttributes(usage, mode, exp)
                assert (a.usage, a.mode, a.exportability) == (usage, mode, exp)


@pytest.mark.parametrize(
    ("usage", "mode", "exp"),
    [
        ("K", "B", "N"), ("K00", "B", "N"), ("", "B", "N"), ("K-", "B", "N"),
        ("K ", "B", "N"), ("\u00c40", "B", "N"), ("\u0661\u0662", "B", "N"),
        ("K0", "A", "N"), ("K0", "", "N"), ("K0", "BE", "N"), ("K0", "b", "N"),
        ("K0", "B", "X"), ("K0", "B", ""), ("K0", "B", "n"), ("K0", "B", "NE"),
    ],
)
def test_key_attributes_rejects(usage: str, mode: str, exp: str) -> None:
    with pytest.raises(ValueError):
        KeyAttributes(usage, mode, exp)


@pytest.mark.parametrize("case", _export_params())
def test_kcv_vectors(case: dict[str, Any]) -> None:
    exp = case["expected"]
    kt = KeyType(case["key"]["type"])
    ta = _h(exp["TA_loaded"])
    assert kcv(kt, ta) == _h(exp["kcv"])
    assert kcv(int(kt), bytearray(ta)) == _h(exp["kcv"])
    t = _h(case["T"])
    assert aes_kcv(t) == _h(exp["set_id"])
    assert kcv(KeyType.AES256, t) == _h(exp["set_id"])
    if kt == KeyType.HMAC_SHA256:
        # independent check with the standard library (docs/protocol.md §2)
        assert hmac.new(ta, bytes(16), hashlib.sha256).digest()[:5] == _h(exp["kcv"])
        if len(ta) in (16, 24, 32):  # same bytes as an AES key: the KCVs must differ
            assert aes_kcv(ta) != _h(exp["kcv"])
    else:
        assert aes_kcv(ta) == _h(exp["kcv"])


def test_kcv_of_import_ok_matches_stored() -> None:
    assert len(IMPORT_OK) == 9
    for c in IMPORT_OK:
        ty = _h(c["import_data"])[7]  # C7 01 xx C8 0C | 01 suite TYPE ...
        assert kcv(ty, _h(c["expected"]["stored"])) == _h(c["expected"]["kcv"]), c["name"]


def test_key_type_lengths() -> None:
    KeyType.AES128.check_length(16)
    KeyType.AES192.check_length(24)
    KeyType.AES256.check_length(32)
    KeyType.HMAC_SHA256.check_length(16)
    KeyType.HMAC_SHA256.check_length(64)
    for kt, n in [(KeyType.AES128, 32), (KeyType.AES256, 16), (KeyType.AES192, 16),
                  (KeyType.HMAC_SHA256, 15), (KeyType.HMAC_SHA256, 65)]:
        with pytest.raises(ValueError):
            kt.check_length(n)


# =========================================================================================
# Messages
# =========================================================================================


@pytest.mark.parametrize("case", _export_params())
def test_export_request_vector(case: dict[str, Any]) -> None:
    exp = case["expected"]
    raw = _h(exp["export_request"])
    req = ExportRequest.decode(raw)
    assert req.sn == _h(case["SN"])
    assert req.r == _h(case["R"])
    assert req.set_id == _h(exp["set_id"])
    assert req.suite == case["suite"]
    assert req.ref1 == _h(case["REF1"])
    assert req.ref2 == case["REF2"]
    assert req.encode() == raw


@pytest.mark.parametrize("case", _export_params())
def test_import_data_and_export_response_vectors(case: dict[str, Any]) -> None:
    exp = case["expected"]
    raw = _h(exp["import_data"])
    d = ImportData.decode(raw)
    assert d.ref2 == case["REF2"]
    assert d.h == _h(exp["H"])
    assert d.w == _h(exp["W"])
    assert d.sas == _h(exp["SAS"])
    assert d.cas == _h(exp["CAS"])
    assert d.encode() == raw
    resp = ExportResponse.decode(_h(exp["export_response"]))
    assert resp.import_data == raw
    assert resp.kcv == _h(exp["kcv"])
    assert resp.encode() == _h(exp["export_response"])
    apdu = CommandAPDU.decode(_h(exp["import_apdu"]))
    assert (apdu.cla, apdu.ins, apdu.p1, apdu.p2) == (0x80, 0x14, 0, 0)
    assert apdu.data == raw
    assert apdu.ne == 256
    assert CommandAPDU(0x80, 0x14, 0, 0, raw, ne=256).encode() == _h(exp["import_apdu"])


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in IMPORT_OK])
def test_import_response_vector(case: dict[str, Any]) -> None:
    raw = _h(case["expected"]["response"])
    r = ImportResponse.decode(raw)
    assert r.kcv == _h(case["expected"]["kcv"])
    assert r.rct == _h(case["expected"]["receipt"])
    assert r.encode() == raw


# --- wrong-length fields -------------------------------------------------------------------

SN = bytes(range(1, 17))
R16 = bytes(range(16, 32))
SET = bytes(5)


def _req(sn: bytes = SN, r: bytes = R16, set_id: bytes = SET, suite: bytes = b"\x01",
         ref1: bytes = b"\x31", ref2: bytes = b"\x01") -> bytes:
    return tlv.encode([(0xC1, sn), (0xC2, r), (0xC3, set_id), (0xC4, suite), (0xC6, ref1),
                       (0xC7, ref2)])


def _imp(ref2: bytes = b"\x01", h: bytes = bytes(12), w: bytes = bytes(40),
         sas: bytes = bytes(16), cas: bytes = bytes(16)) -> bytes:
    return tlv.encode([(0xC7, ref2), (0xC8, h), (0xC9, w), (0xCA, sas), (0xCB, cas)])


def test_message_builders_are_well_formed() -> None:
    req = ExportRequest.decode(_req())
    assert (req.sn, req.r, req.set_id, req.suite, req.ref1, req.ref2) == (
        SN, R16, SET, 1, b"\x31", 1)
    assert ExportRequest.decode(_req(sn=bytes(32), ref1=bytes(32), ref2=b"\xfe")).ref2 == 254
    assert ExportRequest.decode(_req(sn=b"\x01")).sn == b"\x01"
    imp = ImportData.decode(_imp())
    assert imp.ref2 == 1 and len(imp.h) == 12 and len(imp.cas) == 16
    assert ImportData.decode(_imp(ref2=b"\xfe")).ref2 == 254


@pytest.mark.parametrize(
    "raw",
    [
        _req(ref2=b"\x00"), _req(ref2=b"\xff"), _req(ref2=b""), _req(ref2=b"\x01\x01"),
        _req(sn=b""), _req(sn=bytes(33)),
        _req(r=bytes(15)), _req(r=bytes(17)), _req(r=b""),
        _req(set_id=bytes(4)), _req(set_id=bytes(6)),
        _req(suite=b""), _req(suite=b"\x01\x02"),
        _req(ref1=b""), _req(ref1=bytes(33)),
    ],
    ids=["ref2-0", "ref2-255", "ref2-empty", "ref2-2bytes", "sn-empty", "sn-33", "r-15", "r-17",
         "r-empty", "set-4", "set-6", "suite-empty", "suite-2", "ref1-empty", "ref1-33"],
)
def test_export_request_bad_fields(raw: bytes) -> None:
    with pytest.raises(MalformedData):
        ExportRequest.decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        _imp(ref2=b"\x00"), _imp(ref2=b"\xff"), _imp(ref2=b""), _imp(ref2=b"\x00\x01"),
        _imp(h=bytes(11)), _imp(h=bytes(13)), _imp(h=b""),
        _imp(cas=bytes(15)), _imp(cas=bytes(17)), _imp(cas=b""),
        _imp() + b"\x00", _imp()[:-1],
    ],
    ids=["ref2-0", "ref2-255", "ref2-empty", "ref2-2bytes", "h-11", "h-13", "h-empty",
         "cas-15", "cas-17", "cas-empty", "trailing", "truncated"],
)
def test_import_data_bad_fields(raw: bytes) -> None:
    with pytest.raises(MalformedData):
        ImportData.decode(raw)


def test_export_response_bad_fields() -> None:
    good = ExportResponse(_imp(), bytes(5)).encode()
    assert ExportResponse.decode(good).kcv == bytes(5)
    for bad in (
        ExportResponse(_imp(), bytes(4)).encode(),
        ExportResponse(_imp(), bytes(6)).encode(),
        ExportResponse(_imp(h=bytes(11)), bytes(5)).encode(),  # E0 content checked too
        ExportResponse(_imp(ref2=b"\x00"), bytes(5)).encode(),
        tlv.tlv(0xCD, bytes(5)) + tlv.tlv(0xE0, _imp()),  # order
        good + b"\x00",
    ):
        with pytest.raises(MalformedData):
            ExportResponse.decode(bad)


def test_import_response_bad_fields() -> None:
    assert ImportResponse.decode(ImportResponse(bytes(5), bytes(16)).encode()).rct == bytes(16)
    for kcv_, rct in ((bytes(4), bytes(16)), (bytes(6), bytes(16)), (bytes(5), bytes(15)),
                      (bytes(5), bytes(17))):
        with pytest.raises(MalformedData):
            ImportResponse.decode(ImportResponse(kcv_, rct).encode())


def _init(version: bytes = b"\x01", sn: bytes = SN, r: bytes = R16, set_id: bytes = SET,
          suites: bytes = b"\x01\x02") -> bytes:
    return tlv.encode([(0xC0, version), (0xC1, sn), (0xC2, r), (0xC3, set_id), (0xC4, suites)])


def test_init_response() -> None:
    ir = InitResponse.decode(_init())
    assert (ir.sn, ir.r, ir.set_id, ir.suites, ir.version) == (SN, R16, SET, b"\x01\x02", 1)
    assert ir.encode() == _init()
    for bad in (_init(version=b"\x02"), _init(version=b""), _init(sn=b""), _init(sn=bytes(33)),
                _init(r=bytes(15)), _init(set_id=bytes(4)), _init(suites=b"")):
        with pytest.raises(MalformedData):
            InitResponse.decode(bad)


def test_slot_status() -> None:
    empty = SlotStatus(3, 0)
    assert SlotStatus.decode(empty.encode()) == empty
    loaded = SlotStatus(3, 1, bytes(12), bytes(5))
    assert SlotStatus.decode(loaded.encode()) == loaded
    for bad in (
        SlotStatus(3, 3).encode(),  # unknown state
        SlotStatus(0, 0).encode(),
        SlotStatus(3, 1, bytes(11), bytes(5)).encode(),
        SlotStatus(3, 1, bytes(12), bytes(4)).encode(),
        empty.encode() + tlv.tlv(0xC8, bytes(12)),  # H without KCV
        tlv.encode([(0xC7, b"\x03"), (0xCE, b"\x00\x00")]),
    ):
        with pytest.raises(MalformedData):
            SlotStatus.decode(bad)
