"""A unit and an authority under hostile input (docs/protocol.md §3, §6, §7, §8).

The messages here are built by a holder of T (the test), so they pass CAS: what they
test is what an authenticated but odd message does. The key length must fit the key type
(§3: 16, 24, 32 bytes for AES-128/192/256, 16–64 for HMAC-SHA256) or the unit answers 6986
(§7 step 6), the challenge is consumed and the slot is unchanged; and no exception ever
leaves a unit's or an authority's APDU handler: every answer is a status word of §6.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from keyload.core import klp1, tlv
from keyload.core.apdu import CommandAPDU
from keyload.core.errors import PolicyRefused
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.messages import ExportRequest, ExportResponse, ImportData, ImportResponse
from keyload.core.primitives import aes_cmac, aes_kwp_wrap, hmac_sha256
from keyload.core.secret import Secret
from keyload.core.suites import get_suite
from keyload.lab.cards import CardOS
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import KEYSTORE_FILE, KIND, SoftwareKeystore
from keyload.units.storage import KekSource, Vault
from keyload.units.unit import FileUnitStore, MemoryUnitStore, Slot, Unit, UnitState

# docs/protocol.md §6, written out here (not taken from the code under test).
SECTION_6 = frozenset({0x9000, 0x6700, 0x6A80, 0x6A81, 0x6A82, 0x6A86, 0x6A88, 0x6982,
                       0x6983, 0x6985, 0x6986, 0x6988, 0x6581, 0x6D00, 0x6E00})
# docs/protocol.md §3: the lengths that fit each key type; any other type fits none.
FITS = {0x01: frozenset({16}), 0x02: frozenset({24}), 0x03: frozenset({32}),
        0x10: frozenset(range(16, 65))}
TYPES = tuple(FITS)

T = hashlib.sha256(b"transport key of the test set").digest()
SN = bytes.fromhex("5a4d0042")
SIGNING = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"authority SAS key").digest())
VERIFY = SIGNING.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
OLD_KEY = bytes(range(0x40, 0x50))  # what slot 2 holds: AES-128, version 5
OLD_H = KeyHeader(1, KeyType.AES128, 16, "K0", "B", 5, "N", 0).encode()

INS_INIT, INS_IMPORT, INS_STATUS = 0x10, 0x14, 0x16


def _rng(seed: bytes) -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: hashlib.sha256(seed + next(counter).to_bytes(8, "big")).digest()[:n]


def _slots() -> dict[int, Slot]:
    """1: empty, takes every type; 2: holds an AES-128 key of version 5; 3: locked;
    4: takes AES-256 only; 5: takes types §3 does not define."""
    every = frozenset(TYPES)
    return {
        1: Slot(1, every),
        2: Slot(2, every, False, OLD_H, aes_cmac(OLD_KEY, bytes(16))[:5], Secret(OLD_KEY)),
        3: Slot(3, every, True),
        4: Slot(4, frozenset({0x03})),
        5: Slot(5, frozenset({0x00, 0x04, 0x11, 0xFF})),
    }


def _state(*, signed: bool) -> UnitState:
    return UnitState.new(SN, Secret(T), _slots(), verify_key=VERIFY if signed else None)


def _unit(*, signed: bool = False, seed: bytes = b"unit") -> Unit:
    return Unit(MemoryUnitStore(_state(signed=signed)), rng=_rng(seed))


Snapshot = list[tuple[int, frozenset[int], bool, bytes | None, bytes | None, bytes | None]]


def _snapshot(unit: Unit) -> Snapshot:
    return [(s.ref2, s.accepts, s.locked, s.header, s.kcv,
             None if s.key is None else bytes(s.key.buffer))
            for s in sorted(unit.state.slots.values(), key=lambda s: s.ref2)]


def _sw(rapdu: bytes) -> int:
    assert len(rapdu) >= 2
    return int.from_bytes(rapdu[-2:], "big")


def _challenge(unit: Unit) -> bytes:
    r = unit.process_apdu(CommandAPDU(0x80, INS_INIT, 0, 0, ne=256).encode())
    assert r[-2:] == b"\x90\x00"
    return unit.pending or b""


def _session(suite_id: int, r: bytes, ref2: int) -> tuple[bytes, bytes, bytes]:
    """Kenc, Kmac, Ksas as the holder of T derives them (docs/protocol.md §4)."""
    suite = get_suite(suite_id if suite_id in (1, 2) else 1)
    t1, s = bytearray(32), bytearray(96)
    klp1.derive_t1(suite, T, SN, t1)
    klp1.derive_session(suite, t1, SN, r, ref2, s)
    return bytes(s[:32]), bytes(s[32:64]), bytes(s[64:])


def _header(key_type: int, length: int, *, flags: int = 0) -> bytes:
    """H (docs/protocol.md §3): suite 0x01, usage K0, mode B, version 7, exportability N."""
    return bytes((1, 1, key_type, length)) + b"K0B" + (7).to_bytes(2, "big") + b"N" + \
        bytes((flags, 0))


def _right_sas(h: bytes, ta: bytes, ksas: bytes, ref2: int) -> bytes:
    if h[10] & 0x02:
        return SIGNING.sign(klp1.sas_message_ed25519(h, SN, ref2, ta))
    return aes_cmac(ksas, b"KLP1-SAS" + h + ta)


def authentic(r: bytes, ref2: int, h: bytes, ta: bytes) -> ImportData:
    """IMPORTKEY data with a right W, SAS and CAS for ``h`` and ``ta``, whatever they say."""
    kenc, kmac, ksas = _session(h[1], r, ref2)
    w = aes_kwp_wrap(kenc, ta)
    sas = _right_sas(h, ta, ksas, ref2)
    cas = aes_cmac(kmac, klp1.cas_message(SN, r, ref2, h, w, sas))
    return ImportData(ref2, h, w, sas, cas)


def importkey(data: bytes) -> bytes:
    return CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=256).encode()


# =========================================================================================
# The length rule (docs/protocol.md §3, §7 step 6): regression cases
# =========================================================================================

LENGTHS = (1, 5, 8, 15, 16, 17, 20, 23, 24, 25, 31, 32, 33, 40, 48, 63, 64, 65, 96, 128, 255)
MISFITS = [(kt, n) for kt in TYPES for n in LENGTHS if n not in FITS[kt]]


def _id(kt_n: tuple[int, int]) -> str:
    return f"type{kt_n[0]:02x}-len{kt_n[1]}"


def _refused_import(unit: Unit, ref2: int, key_type: int, n: int, *,
                    flags: int = 0) -> tuple[int, bytes]:
    r = _challenge(unit)
    ta = hashlib.sha256(b"TA").digest() * 8
    data = authentic(r, ref2, _header(key_type, n, flags=flags), ta[:n]).encode()
    return _sw(unit.process_apdu(importkey(data))), data


@pytest.mark.parametrize("kt_n", MISFITS, ids=[_id(x) for x in MISFITS])
@pytest.mark.parametrize("ref2", [1, 2])
def test_authenticated_key_of_wrong_length_is_refused(kt_n: tuple[int, int],
                                                      ref2: int) -> None:
    """An authenticated header whose length does not fit its type, carrying a key of that
    length: 6986, the challenge consumed, the slot (empty, or loaded) unchanged."""
    unit = _unit()
    before = _snapshot(unit)
    sw, data = _refused_import(unit, ref2, *kt_n)
    assert sw == 0x6986
    assert unit.pending is None
    assert _snapshot(unit) == before
    # the challenge is gone: the same data again is a replay
    assert _sw(unit.process_apdu(importkey(data))) == 0x6985
    assert _snapshot(unit) == before


@pytest.mark.parametrize("kt_n", [(0x03, 16), (0x10, 5), (0x01, 5), (0x10, 65)], ids=_id)
def test_refusal_leaves_the_sealed_unit_file_unchanged(kt_n: tuple[int, int], tmp_path: Path,
                                                       kek_source: KekSource) -> None:
    """The same with the unit's state in its sealed file: the file is not rewritten, and
    the unit opened again from it holds what it held."""
    vault = Vault.create(tmp_path / "units", kek_source)
    store = FileUnitStore.create(vault, _state(signed=False))
    unit = Unit(store, rng=_rng(b"file"))
    before = _snapshot(unit)
    path = tmp_path / "units" / store.filename
    file_before = path.read_bytes()
    sw, _ = _refused_import(unit, 2, *kt_n)
    assert sw == 0x6986
    assert unit.pending is None
    assert path.read_bytes() == file_before
    reloaded = Unit(FileUnitStore(Vault.open(tmp_path / "units", kek_source), store.filename))
    assert _snapshot(reloaded) == before


@pytest.mark.parametrize("kt_n", [(0x03, 16), (0x10, 5), (0x01, 5), (0x02, 32), (0x10, 65)],
                         ids=_id)
def test_wrong_length_refused_for_signed_unit(kt_n: tuple[int, int]) -> None:
    """Also with an Ed25519 SAS: step 6 comes before unwrap and SAS."""
    unit = _unit(signed=True)
    before = _snapshot(unit)
    sw, _ = _refused_import(unit, 1, *kt_n, flags=0x02)
    assert sw == 0x6986
    assert unit.pending is None
    assert _snapshot(unit) == before


@pytest.mark.parametrize("key_type", [0x00, 0x04, 0x11, 0xFF])
def test_type_outside_section_3_fits_no_length(key_type: int) -> None:
    """A slot configured to accept a type §3 does not define still stores nothing of it."""
    unit = _unit()
    before = _snapshot(unit)
    for n in (16, 32):
        sw, _ = _refused_import(unit, 5, key_type, n)
        assert sw == 0x6986
        assert _snapshot(unit) == before


@pytest.mark.parametrize("kt_n", [(0x01, 16), (0x02, 24), (0x03, 32), (0x10, 16), (0x10, 20),
                                  (0x10, 64)], ids=_id)
def test_keys_that_fit_are_stored(kt_n: tuple[int, int]) -> None:
    """The rule refuses misfits only: every fitting length is stored, with its KCV (§2)."""
    key_type, n = kt_n
    unit = _unit()
    r = _challenge(unit)
    ta = hashlib.sha256(b"fits").digest() * 2
    h = _header(key_type, n)
    rapdu = unit.process_apdu(importkey(authentic(r, 1, h, ta[:n]).encode()))
    assert _sw(rapdu) == 0x9000
    resp = ImportResponse.decode(rapdu[:-2])
    want = hmac_sha256(ta[:n], bytes(16))[:5] if key_type == 0x10 \
        else aes_cmac(ta[:n], bytes(16))[:5]
    assert resp.kcv == want
    slot = unit.state.slots[1]
    assert slot.header == h and slot.key is not None and slot.key.equals(ta[:n])


def test_wrong_length_refused_through_the_card_os() -> None:
    """What vpcd hands the card: the card answers 6986 (it answered 6F00 or nothing)."""
    unit = _unit()
    card = CardOS(unit)
    card.control(1)
    r = card.command(CommandAPDU(0x80, INS_INIT, 0, 0, ne=256).encode())
    assert r[-2:] == b"\x90\x00"
    assert unit.pending is not None
    data = authentic(unit.pending, 1, _header(0x01, 5), b"12345").encode()
    assert card.command(importkey(data)) == b"\x69\x86"


def test_open_import_refuses_a_misfit_whatever_the_slot_policy() -> None:
    """The length rule is part of step 6 itself, not of one slot policy: a caller whose
    policy forgets it still gets 6986 (PolicyRefused), never a library exception."""
    r = bytes(16)
    for key_type, n in ((0x01, 5), (0x03, 16), (0x10, 5), (0x10, 65)):
        h = _header(key_type, n)
        d = authentic(r, 1, h, bytes(range(1, n + 1)))
        sc = klp1.Scratch()
        with pytest.raises(PolicyRefused):
            klp1.open_import(get_suite(1), T, SN, r, d, KeyHeader.decode(h),
                             check_policy=lambda _h: None, verify_key=None, scratch=sc)
        assert sc.wiped


# =========================================================================================
# No exception leaves an APDU handler (docs/protocol.md §6)
# =========================================================================================

class _BrokenStore(MemoryUnitStore):
    """A store whose write fails with an error nobody planned for."""

    def commit(self, state: UnitState, slot: Slot) -> None:
        raise RuntimeError("disk controller said 00112233445566778899aabbccddeeff")


def test_unexpected_store_failure_is_6581_and_nothing_stored(
        caplog: pytest.LogCaptureFixture) -> None:
    unit = Unit(_BrokenStore(_state(signed=False)), rng=_rng(b"broken"))
    before = _snapshot(unit)
    r = _challenge(unit)
    ta = bytes(range(16))
    with caplog.at_level(logging.DEBUG):
        rapdu = unit.process_apdu(importkey(authentic(r, 1, _header(0x01, 16), ta).encode()))
    assert rapdu == b"\x65\x81"
    assert _snapshot(unit) == before
    assert unit.pending is None
    assert "RuntimeError" in caplog.text  # the class of the failure, nothing of its text
    assert "00112233" not in caplog.text and ta.hex() not in caplog.text


class _ExplodingBackend:
    """An authority backend whose export fails with an unplanned error."""

    def __init__(self, inner: SoftwareKeystore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def export(self, req: ExportRequest) -> klp1.Exported:
        raise ValueError(f"token said {T.hex()}")


def _keystore() -> tuple[SoftwareKeystore, bytes]:
    ks = SoftwareKeystore.ephemeral()
    ks.set_signing_key(Secret(hashlib.sha256(b"authority SAS key").digest()))
    set_id = ks.add_set(Secret(T), "test set").set_id
    ks.add_set(Secret(hashlib.sha256(b"signed set").digest()), "signed", signed=True)
    any_ = ExportPolicy(None, None)
    ks.add_key(b"AES1", KeyType.AES128, Secret(bytes(range(16))), KeyAttributes("K0", "B", "N"),
               version=3, diversify=False, policy=any_)
    ks.add_key(b"DIV2", KeyType.AES256, Secret(bytes(range(32))), KeyAttributes("D0", "B", "N"),
               version=1, diversify=True, policy=ExportPolicy(None, frozenset({1, 2})))
    ks.add_key(b"MAC3", KeyType.HMAC_SHA256, Secret(bytes(range(20))),
               KeyAttributes("M3", "G", "N"), version=9, diversify=False,
               policy=ExportPolicy(frozenset({set_id}), None))
    return ks, set_id


def _exportkey(data: bytes) -> bytes:
    return CommandAPDU(0x80, 0x12, 0, 0, data, ne=256).encode()


def test_unexpected_authority_failure_is_6581_and_nothing_recorded(
        caplog: pytest.LogCaptureFixture) -> None:
    ks, set_id = _keystore()
    log = MemoryExportLog()
    authority = Authority(_ExplodingBackend(ks), log=log)
    req = ExportRequest(SN, bytes(16), set_id, 1, b"AES1", 1).encode()
    with caplog.at_level(logging.DEBUG):
        assert authority.process_apdu(_exportkey(req)) == b"\x65\x81"
    assert log.records == []
    assert "ValueError" in caplog.text
    assert T.hex() not in caplog.text


def _keystore_file_with(tmp_path: Path, kek_source: KekSource, key_type: int,
                        value: bytes) -> SoftwareKeystore:
    """A sealed keystore whose one application key has a length that does not fit its type
    (written by something other than keyload's own add_key, which refuses it)."""
    ks = SoftwareKeystore.create(tmp_path / "as", kek_source)
    ks.add_set(Secret(T), "test set")
    ks.close()
    vault = Vault.open(tmp_path / "as", kek_source)
    meta, secrets = vault.read_packed(KEYSTORE_FILE, KIND)
    meta["keys"].append({"ref1": b"ODD1".hex(), "type": key_type, "usage": "K0", "mode": "B",
                         "exportability": "N", "version": 1, "diversify": False,
                         "policy": {"sets": None, "slots": None}, "label": "",
                         "secret": len(secrets)})
    vault.write_packed(KEYSTORE_FILE, KIND, meta, [*secrets, Secret(value)])
    vault.close()
    return SoftwareKeystore.open(tmp_path / "as", kek_source)


@pytest.mark.parametrize("kt_n", [(0x03, 16), (0x01, 24), (0x02, 32), (0x10, 5), (0x10, 65)],
                         ids=_id)
def test_authority_refuses_to_export_a_key_that_does_not_fit(
        kt_n: tuple[int, int], tmp_path: Path, kek_source: KekSource) -> None:
    """§8 export policy: a key whose length does not fit its type is never wrapped (6986),
    and no export is recorded."""
    key_type, n = kt_n
    ks = _keystore_file_with(tmp_path, kek_source, key_type, bytes(range(1, n + 1)))
    log = MemoryExportLog()
    authority = Authority(ks, log=log)
    set_id = ks.set_infos()[0].set_id
    req = ExportRequest(SN, bytes(16), set_id, 1, b"ODD1", 1).encode()
    assert authority.process_apdu(_exportkey(req)) == b"\x69\x86"
    assert log.records == []


def test_export_key_refuses_a_key_that_does_not_fit() -> None:
    """The wrap itself refuses a misfit (6986): no backend can send one by mistake."""
    for key_type, n in ((KeyType.AES256, 16), (KeyType.HMAC_SHA256, 5),
                        (KeyType.AES128, 5)):
        sc = klp1.Scratch()
        with pytest.raises(PolicyRefused):
            klp1.export_key(get_suite(1), T, SN, bytes(16), 1, key_type=key_type,
                            key=bytes(range(1, n + 1)), usage="K0", mode="B", version=1,
                            exportability="N", diversify=False, scratch=sc)
        assert sc.wiped


# =========================================================================================
# Bounded fuzzing: the generator holds T (docs/protocol.md §6, §7, §8)
# =========================================================================================
#
# Each example drives one fresh unit (or authority) through a few commands. Authenticated
# IMPORTKEY messages are checked against a model of §7 (the exact status word, and on 9000
# exactly what the slot then holds); mutated encodings and raw APDUs only against §6 (the
# answer is a status word listed there, no data on a refusal) and the unchanged slots.
# derandomize: the same examples on every run, so CI is reproducible; the bounds (and no
# shrinking) keep the whole section to a few tens of seconds, also when it fails.

FUZZ = settings(max_examples=250, derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded on failure
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OTHER_SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(32))

byte = st.integers(0, 255)


def _odd(base: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Mostly ``base`` (five times in six), sometimes any byte."""
    return st.integers(0, 5).flatmap(lambda i: byte if i == 0 else base)


def _mostly(data: st.DataObject, right: str, others: list[str], label: str,
            *, pristine: bool) -> str:
    """``right`` in a pristine message, else ``right`` about two times in three."""
    if pristine:
        return right
    return data.draw(st.sampled_from([right] * (2 * len(others)) + others), label)


def _flip(b: bytes, i: int) -> bytes:
    if not b:
        return b"\x01"
    i %= len(b)
    return b[:i] + bytes((b[i] ^ 0x01,)) + b[i + 1:]


def _mutate(data: st.DataObject, body: bytes, mutation: str) -> bytes:
    """A TLV encoding cut short, with bytes after its end, or with one bit flipped."""
    if mutation == "cut":
        return body[:data.draw(st.integers(0, len(body) - 1))]
    if mutation == "append":
        return body + data.draw(st.binary(min_size=1, max_size=8))
    if mutation == "flip":
        return _flip(body, data.draw(st.integers(0, len(body) - 1)))
    return body


def _check_answer(rapdu: bytes) -> int:
    """Every answer is a status word of §6; a refusal carries no data."""
    sw = _sw(rapdu)
    assert sw in SECTION_6, f"{sw:04X} is not a status word of docs/protocol.md §6"
    if sw != 0x9000:
        assert len(rapdu) == 2
    return sw


def _expected_import_sw(unit: Unit, before: Snapshot, r: bytes | None, ref2: int, h: bytes,
                        ta: bytes, *, w_ok: bool, sas_ok: bool, cas_ok: bool) -> int:
    """docs/protocol.md §7, steps 1-8, for a message with a well-formed TLV (C8 12, CB 16)."""
    if r is None:
        return 0x6985
    if not 1 <= ref2 <= 254:
        return 0x6A80
    slots = {s[0]: s for s in before}
    if ref2 not in slots:
        return 0x6A88
    if h[0] != 1 or h[1] not in (1, 2):
        return 0x6A81
    if not cas_ok:
        return 0x6982
    _, accepts, locked, loaded_h, _, _ = slots[ref2]
    version = int.from_bytes(h[7:9], "big")
    if (locked or h[2] not in accepts or h[3] not in FITS.get(h[2], ())
            or (loaded_h is not None and version <= int.from_bytes(loaded_h[7:9], "big"))):
        return 0x6986
    if not w_ok or len(ta) != h[3]:
        return 0x6982
    signed = unit.state.verify_key is not None
    if not sas_ok or bool(h[10] & 0x02) != signed:
        return 0x6988
    return 0x9000


def _fuzz_import(data: st.DataObject, unit: Unit, r_known: bytes) -> None:
    """One authenticated IMPORTKEY with odd fields, checked against the model of §7."""
    signed = unit.state.verify_key is not None
    pristine = data.draw(st.integers(0, 3), "pristine") == 0  # only the header may be odd
    h_len = 12 if pristine else data.draw(st.sampled_from([12] * 10 + [0, 11, 13]), "len H")
    key_type = data.draw(_odd(st.sampled_from(TYPES)), "key type")
    fits = st.sampled_from(sorted(FITS[key_type])) if key_type in FITS else byte
    h = bytes((
        data.draw(_odd(st.just(1)), "header version"),
        data.draw(_odd(st.sampled_from([1, 2])), "suite"),
        key_type,
        data.draw(_odd(fits), "key length"),
    )) + data.draw(st.one_of(st.just(b"K0B"), st.binary(min_size=3, max_size=3)), "usage") + \
        data.draw(st.integers(0, 0xFFFF), "version").to_bytes(2, "big") + \
        data.draw(st.one_of(st.just(b"N"), st.binary(min_size=1, max_size=1))) + bytes((
            data.draw(_odd(st.just(2 if signed else 0)), "flags"),
            data.draw(_odd(st.just(0)), "H[11]")))
    h = (h + bytes(16))[:h_len]
    ref2 = data.draw(_odd(st.sampled_from([1, 1, 2, 2, 3, 4, 5])), "REF2")
    n = h[3] if h_len > 3 and h[3] else 16
    if _mostly(data, "H[3]", ["other"], "len TA'", pristine=pristine) == "other":
        n = data.draw(st.integers(1, 80), "len TA'")
    ta = data.draw(st.binary(min_size=n, max_size=n), "TA'")
    hh = (h + bytes(12))[:12]
    kenc, kmac, ksas = _session(hh[1], r_known, ref2)
    w_kind = _mostly(data, "wrap", ["other kek", "random", "cut", "pad"], "W", pristine=pristine)
    w = aes_kwp_wrap(kenc if w_kind != "other kek" else ksas, ta)
    if w_kind == "random":
        w = data.draw(st.binary(max_size=300), "W")
    elif w_kind == "cut":
        w = w[:data.draw(st.integers(0, len(w) - 1))]
    elif w_kind == "pad":
        w += data.draw(st.binary(min_size=1, max_size=24))
    right_sas = _right_sas(hh, ta, ksas, ref2)
    sas_kind = _mostly(data, "right", ["random", "flip", "other key"], "SAS", pristine=pristine)
    sas = right_sas
    if sas_kind == "flip":
        sas = _flip(right_sas, data.draw(st.integers(0, 63)))
    elif sas_kind == "other key":
        sas = OTHER_SIGNER.sign(klp1.sas_message_ed25519(hh, SN, ref2, ta))
    elif sas_kind == "random":
        sas = data.draw(st.binary(max_size=80), "SAS")
    cas = aes_cmac(kmac, klp1.cas_message(SN, r_known, ref2, h, w, sas))
    cas_ok = _mostly(data, "right", ["wrong"], "CAS", pristine=pristine) == "right"
    if not cas_ok:
        cas = _flip(cas, data.draw(st.integers(0, 15)))
    body = tlv.encode([(0xC7, bytes((ref2,))), (0xC8, h), (0xC9, w), (0xCA, sas), (0xCB, cas)])
    mutation = _mostly(data, "none", ["cut", "append", "flip", "cas len"], "TLV",
                       pristine=pristine)
    if mutation == "cas len":
        body = body[:-18] + tlv.tlv(0xCB, cas[:data.draw(st.integers(0, 15))])
    body = _mutate(data, body, mutation)
    le = data.draw(st.sampled_from([256, 256, 0, 65536]), "Le")
    before = _snapshot(unit)
    pending = unit.pending
    rapdu = unit.process_apdu(CommandAPDU(0x80, INS_IMPORT, 0, 0, body, ne=le).encode())
    sw = _check_answer(rapdu)
    event(f"IMPORTKEY {sw:04X}")
    assert unit.pending is None  # any IMPORTKEY consumes the challenge (§7 step 1)
    if sw != 0x9000:
        assert _snapshot(unit) == before
    if mutation != "none" or h_len != 12:
        return
    want = _expected_import_sw(unit, before, pending, ref2, h, ta, w_ok=w_kind == "wrap",
                               sas_ok=sas_kind == "right", cas_ok=cas_ok)
    assert sw == want
    if sw != 0x9000:
        return
    # exactly the one slot changed, to exactly this key
    kcv = hmac_sha256(ta, bytes(16))[:5] if h[2] == 0x10 else aes_cmac(ta, bytes(16))[:5]
    assert ImportResponse.decode(rapdu[:-2]).kcv == kcv
    after = [(s[0], s[1], s[2], h, kcv, ta) if s[0] == ref2 else s for s in before]
    assert _snapshot(unit) == after


def _fuzz_raw(data: st.DataObject, app: Unit | Authority, ins: list[int]) -> bytes:
    """Any bytes, or a command header of interest with any P1, P2 and body."""
    if data.draw(st.booleans(), "fully raw"):
        apdu = data.draw(st.binary(max_size=300), "APDU")
    else:
        head = bytes((data.draw(_odd(st.sampled_from([0x00, 0x80]))),
                      data.draw(_odd(st.sampled_from(ins))), data.draw(byte), data.draw(byte)))
        apdu = head + data.draw(st.binary(max_size=40), "body")
    return app.process_apdu(apdu)


@pytest.mark.slow  # fuzzing: 250 sequences of up to 4 commands
@pytest.mark.parametrize("signed", [False, True], ids=["cmac-sas", "ed25519-sas"])
@FUZZ
@given(data=st.data())
def test_fuzz_unit(signed: bool, data: st.DataObject) -> None:
    unit = _unit(signed=signed, seed=b"fuzz")
    r_known = bytes(16)  # the last challenge seen: a stale one once consumed
    for _ in range(data.draw(st.integers(1, 4), "steps")):
        step = data.draw(st.sampled_from(["download"] * 4 + ["import", "raw", "status"]))
        before = _snapshot(unit)
        if step in ("download", "import"):
            if step == "download":
                r_known = _challenge(unit)
            _fuzz_import(data, unit, unit.pending or r_known)
            continue
        if step == "raw":
            rapdu = _fuzz_raw(data, unit, [0xA4, INS_INIT, INS_IMPORT, INS_STATUS])
        else:
            p2 = data.draw(byte, "REF2")
            rapdu = unit.process_apdu(CommandAPDU(0x80, INS_STATUS, 0, p2, ne=256).encode())
        _check_answer(rapdu)
        assert _snapshot(unit) == before  # not an authenticated IMPORTKEY: nothing stored


AUTH_REF1 = [b"AES1", b"DIV2", b"MAC3"]


def _expected_export_sw(fields: list[bytes], set_ids: list[bytes]) -> int:
    """docs/protocol.md §8 for a well-formed TLV in the order of §5."""
    sn, r, set_id, suite, ref1, ref2 = fields
    if (not 1 <= len(sn) <= 32 or len(r) != 16 or len(set_id) != 5 or len(suite) != 1
            or not 1 <= len(ref1) <= 32 or len(ref2) != 1 or not 1 <= ref2[0] <= 254):
        return 0x6A80
    if set_id not in set_ids:
        return 0x6A82
    if suite[0] not in (1, 2):
        return 0x6A81
    if ref1 not in AUTH_REF1:
        return 0x6A88
    if (ref1 == b"DIV2" and ref2[0] not in (1, 2)) or (ref1 == b"MAC3" and set_id != set_ids[0]):
        return 0x6986
    return 0x9000


def _import_as_unit(set_t: bytes, signed: bool, sn: bytes, r: bytes, ref2: int,
                    response: bytes) -> bytes:
    """A unit of the set, holding challenge ``r``, imports what the authority answered."""
    state = UnitState.new(sn, Secret(set_t), {ref2: Slot(ref2, frozenset(TYPES))},
                          verify_key=VERIFY if signed else None)
    unit = Unit(MemoryUnitStore(state))
    unit.set_challenge(r)
    return unit.process_apdu(importkey(ExportResponse.decode(response).import_data))


@pytest.mark.slow  # fuzzing: 250 sequences of up to 3 requests
@FUZZ
@given(data=st.data())
def test_fuzz_authority(data: st.DataObject) -> None:
    ks, set_a = _keystore()
    set_b = next(s.set_id for s in ks.set_infos() if s.signed)
    t_of = {set_a: (T, False), set_b: (hashlib.sha256(b"signed set").digest(), True)}
    log = MemoryExportLog()
    authority = Authority(ks, log=log)
    for _ in range(data.draw(st.integers(1, 3), "steps")):
        n_records = len(log.records)
        if data.draw(st.integers(0, 3), "kind") == 0:
            _check_answer(_fuzz_raw(data, authority, [0xA4, 0x12]))
            assert len(log.records) == n_records
            continue
        pristine = data.draw(st.integers(0, 2), "pristine") == 0  # well-formed TLV

        def field(valid: st.SearchStrategy[bytes], odd: st.SearchStrategy[bytes],
                  label: str, pristine: bool = pristine) -> bytes:
            if pristine:
                return data.draw(valid, label)
            return data.draw(st.integers(0, 5).flatmap(lambda i: odd if i == 0 else valid),
                             label)

        fields = [
            field(st.one_of(st.just(SN), st.binary(min_size=1, max_size=32)),
                  st.binary(max_size=40), "SN"),
            field(st.binary(min_size=16, max_size=16), st.binary(max_size=20), "R"),
            data.draw(_odd(st.sampled_from([0, 1])).map(
                lambda i: [set_a, set_b][i] if i < 2 else bytes((i,)) * 5), "set id"),
            data.draw(_odd(st.sampled_from([1, 2])).map(lambda i: bytes((i,))), "suite"),
            data.draw(st.one_of(st.sampled_from(AUTH_REF1), st.binary(min_size=1, max_size=32)),
                      "REF1"),
            field(st.integers(1, 254).map(lambda x: bytes((x,))), st.binary(max_size=3), "REF2"),
        ]
        body = tlv.encode(zip([0xC1, 0xC2, 0xC3, 0xC4, 0xC6, 0xC7], fields, strict=True))
        mutation = _mostly(data, "none", ["cut", "append", "flip"], "TLV", pristine=pristine)
        body = _mutate(data, body, mutation)
        rapdu = authority.process_apdu(_exportkey(body) if body else b"\x80\x12\x00\x00")
        sw = _check_answer(rapdu)
        event(f"EXPORTKEY {sw:04X}")
        assert len(log.records) == n_records + (sw == 0x9000)
        if mutation != "none":
            continue
        assert sw == _expected_export_sw(fields, [set_a, set_b])
        if sw == 0x9000:
            set_t, signed = t_of[fields[2]]
            answer = _import_as_unit(set_t, signed, fields[0], fields[1], fields[5][0],
                                     rapdu[:-2])
            assert answer[-2:] == b"\x90\x00"
            assert ImportResponse.decode(answer[:-2]).kcv == ExportResponse.decode(
                rapdu[:-2]).kcv


# =========================================================================================
# SELECT of another application ends the download (docs/protocol-notes.md, SELECT row)
# =========================================================================================

def test_select_of_another_application_ends_the_pending_challenge() -> None:
    unit = _unit()
    r = _challenge(unit)
    data = authentic(r, 1, _header(0x01, 16), bytes(range(16))).encode()
    other = CommandAPDU(0x00, 0xA4, 0x04, 0x00, bytes.fromhex("F04B4C5031FFFF"), ne=256)
    assert _sw(unit.process_apdu(other.encode())) == 0x6A82
    assert unit.pending is None
    before = _snapshot(unit)
    assert _sw(unit.process_apdu(importkey(data))) == 0x6985  # no challenge: refused
    assert _snapshot(unit) == before
