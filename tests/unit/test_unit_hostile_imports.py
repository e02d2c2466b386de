"""A unit and an authority under hostile input (PROTOCOL.md §3, §6, §7, §8).

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

from keyload.core import klp1
from keyload.core.apdu import CommandAPDU
from keyload.core.errors import PolicyRefused
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.messages import ExportRequest, ImportData, ImportResponse
from keyload.core.primitives import aes_cmac, aes_kwp_wrap, hmac_sha256
from keyload.core.secret import Secret
from keyload.core.suites import get_suite
from keyload.transports.vcard import CardOS
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import KEYSTORE_FILE, KIND, SoftwareKeystore
from keyload.units.storage import KekSource, Vault
from keyload.units.unit import FileUnitStore, MemoryUnitStore, Slot, Unit, UnitState

# PROTOCOL.md §6, written out here (not taken from the code under test).
SECTION_6 = frozenset({0x9000, 0x6700, 0x6A80, 0x6A81, 0x6A82, 0x6A86, 0x6A88, 0x6982,
                       0x6983, 0x6985, 0x6986, 0x6988, 0x6581, 0x6D00, 0x6E00})
# PROTOCOL.md §3: the lengths that fit each key type; any other type fits none.
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
    """Kenc, Kmac, Ksas as the holder of T derives them (PROTOCOL.md §4)."""
    suite = get_suite(suite_id if suite_id in (1, 2) else 1)
    t1, s = bytearray(32), bytearray(96)
    klp1.derive_t1(suite, T, SN, t1)
    klp1.derive_session(suite, t1, SN, r, ref2 & 0xFF, s)
    return bytes(s[:32]), bytes(s[32:64]), bytes(s[64:])


def _header(key_type: int, length: int, *, suite: int = 1, version: int = 7,
            flags: int = 0, usage: bytes = b"K0") -> bytes:
    return bytes((1, suite, key_type, length)) + usage + b"B" + version.to_bytes(2, "big") + \
        b"N" + bytes((flags, 0))


def _right_sas(h: bytes, ta: bytes, ksas: bytes, ref2: int) -> bytes:
    if h[10] & 0x02:
        return SIGNING.sign(klp1.sas_message_ed25519(h, SN, ref2 & 0xFF, ta))
    return aes_cmac(ksas, b"KLP1-SAS" + h + ta)


def authentic(r: bytes, ref2: int, h: bytes, ta: bytes, *, w: bytes | None = None,
              sas: bytes | None = None) -> ImportData:
    """IMPORTKEY data with a right CAS (and, unless given, a right W and SAS)."""
    kenc, kmac, ksas = _session(h[1], r, ref2)
    if w is None:
        w = aes_kwp_wrap(kenc, ta)
    if sas is None:
        sas = _right_sas(h, ta, ksas, ref2)
    cas = aes_cmac(kmac, klp1.cas_message(SN, r, ref2 & 0xFF, h, w, sas))
    return ImportData(ref2, h, w, sas, cas)


def importkey(data: bytes) -> bytes:
    return CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=256).encode()


# =========================================================================================
# The length rule (PROTOCOL.md §3, §7 step 6): regression cases
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
# No exception leaves an APDU handler (PROTOCOL.md §6)
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
    authority = Authority(_ExplodingBackend(ks), log=log)  # type: ignore[arg-type]
    req = ExportRequest(SN, bytes(16), set_id, 1, b"AES1", 1).encode()
    with caplog.at_level(logging.DEBUG):
        assert authority.process_apdu(_exportkey(req)) == b"\x65\x81"
    assert log.records == []
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
