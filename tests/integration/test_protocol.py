"""End-to-end KLP1 through the station: loads, refusals, replay, tampering, wiping."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyload.core import messages as msg
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.errors import (
    SW,
    AuthenticityError,
    IntegrityError,
    KcvMismatch,
    MalformedData,
    NoChallenge,
    NotFound,
    PolicyRefused,
    UnknownSet,
    Unsupported,
)
from keyload.core.keys import KeyHeader, KeyType, kcv
from keyload.station.load import AuthorityClient, LoadFailed, load_key
from keyload.transports.local import LocalConnection
from keyload.units.unit import Slot

from .fixtures import Recorder, World, make_world, slots_snapshot, unit_client


@pytest.fixture
def world() -> World:
    return make_world()


def _import_data_of(rec: Recorder) -> bytes:
    apdu = next(a for a in rec.sent if a[1] == 0x14)
    return CommandAPDU.decode(apdu).data


def test_load_success_kcv_receipt_and_slot(world: World) -> None:
    unit = world.unit(b"SN-0001")
    res = load_key(unit_client(unit), world.client(), b"AES", 1)
    slot = unit.state.slots[1]
    assert slot.key is not None and slot.kcv == res.kcv
    assert res.kcv == world.ks.key_info(b"AES").kcv  # not diversified: the key's own KCV
    assert KeyHeader.decode(res.header).version == 5
    world.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=res.sn, r=res.r,
                                   ref2=1, h=res.header, kcv=res.kcv, rct=res.rct)
    st_ = unit_client(unit).slot_status(1)
    assert st_.state == msg.SLOT_LOADED and st_.kcv == res.kcv and st_.h == res.header
    rec = world.log.records[-1]
    assert (rec.sn, rec.ref1, rec.ref2, rec.key_version, rec.kcv) == \
        (b"SN-0001", b"AES", 1, 5, res.kcv)


def test_receipt_forgery_is_caught(world: World) -> None:
    unit = world.unit(b"SN-0002")
    res = load_key(unit_client(unit), world.client(), b"AES", 1)
    bad = bytes([res.rct[0] ^ 1]) + res.rct[1:]
    with pytest.raises(IntegrityError):
        world.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=res.sn, r=res.r,
                                       ref2=1, h=res.header, kcv=res.kcv, rct=bad)
    with pytest.raises(IntegrityError):  # a receipt for another slot or SN is not this one
        world.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=b"SN-0003",
                                       r=res.r, ref2=1, h=res.header, kcv=res.kcv,
                                       rct=res.rct)


def test_diversified_key_differs_per_unit(world: World) -> None:
    u1, u2 = world.unit(b"U1"), world.unit(b"U2")
    r1 = load_key(unit_client(u1), world.client(), b"DIV", 1)
    r2 = load_key(unit_client(u2), world.client(), b"DIV", 1)
    assert r1.kcv != r2.kcv
    assert KeyHeader.decode(r1.header).diversified
    k1, k2 = u1.state.slots[1].key, u2.state.slots[1].key
    assert k1 is not None and k2 is not None and not k1.equals(k2)


def test_hmac_and_signed_set(world: World) -> None:
    pub = world.ks.public_key()
    unit = world.unit(b"SIGNED-1", world.signed_set, verify_key=pub)
    res = load_key(unit_client(unit), world.client(), b"MAC", 2)
    h = KeyHeader.decode(res.header)
    assert h.ed25519 and h.key_type == KeyType.HMAC_SHA256 and h.key_length == 64
    key = unit.state.slots[2].key
    assert key is not None and res.kcv == kcv(KeyType.HMAC_SHA256, key.buffer)


@pytest.mark.parametrize("suites", [(1,), (2,), (2, 1)])
def test_suite_negotiation(world: World, suites: tuple[int, ...]) -> None:
    unit = world.unit(b"SUITES", suites=suites)
    res = load_key(unit_client(unit), world.client(), b"AES", 1)
    assert res.suite == (1 if 1 in suites else 2)


def test_authority_without_common_suite(world: World) -> None:
    unit = world.unit(b"S2ONLY", suites=(2,))
    client = AuthorityClient(LocalConnection(world.authority), suites=frozenset({1}))
    with pytest.raises(LoadFailed) as e:
        load_key(unit_client(unit), client, b"AES", 1)
    assert isinstance(e.value.cause, Unsupported)


def _refused(world: World, unit_sn: bytes, ref1: bytes, ref2: int, **kw: object) -> LoadFailed:
    unit = world.unit(unit_sn, **kw)  # type: ignore[arg-type]
    before = slots_snapshot(unit)
    n_exports = len(world.log.records)
    with pytest.raises(LoadFailed) as e:
        load_key(unit_client(unit), world.client(), ref1, ref2)
    assert slots_snapshot(unit) == before, "a refused load changed the unit"
    if e.value.step.startswith("authority"):
        assert len(world.log.records) == n_exports, "a refused export was recorded"
    assert unit.pending is None or e.value.step.startswith("authority")
    return e.value


@pytest.mark.parametrize(("ref1", "ref2", "err", "sw", "step"), [
    (b"NOPE", 1, NotFound, SW.NOT_FOUND, "authority"),
    (b"ONLY-B-SLOT1", 1, PolicyRefused, SW.POLICY, "authority"),  # set A not allowed
    (b"AES", 9, NotFound, SW.NOT_FOUND, "unit"),  # unit has no slot 9
    (b"A128", 3, PolicyRefused, SW.POLICY, "unit"),  # locked slot
    (b"A128", 1, PolicyRefused, SW.POLICY, "unit"),  # slot 1 takes AES-256 only
    (b"MAC", 1, PolicyRefused, SW.POLICY, "unit"),  # HMAC into an AES slot
])
def test_refusals(world: World, ref1: bytes, ref2: int, err: type, sw: SW, step: str) -> None:
    e = _refused(world, b"REFUSE", ref1, ref2)
    assert isinstance(e.cause, err) and e.sw == sw and e.step.startswith(step)


def test_unknown_set(world: World) -> None:
    other = make_world()  # a unit whose T this authority does not hold
    unit = other.unit(b"ALIEN")
    with pytest.raises(LoadFailed) as e:
        load_key(unit_client(unit), world.client(), b"AES", 1)
    assert isinstance(e.value.cause, UnknownSet) and e.value.sw == 0x6A82


def test_policy_allows_its_own_set_and_slot(world: World) -> None:
    unit = world.unit(b"B-UNIT", world.set_b)
    load_key(unit_client(unit), world.client(), b"ONLY-B-SLOT1", 1)
    with pytest.raises(LoadFailed) as e:
        load_key(unit_client(unit), world.client(), b"ONLY-B-SLOT1", 4)
    assert e.value.sw == SW.POLICY


def test_rollback_and_same_version_refused(world: World) -> None:
    unit = world.unit(b"ROLL")
    load_key(unit_client(unit), world.client(), b"AES", 1)
    before = slots_snapshot(unit)
    with pytest.raises(LoadFailed) as e:  # same version 5 again
        load_key(unit_client(unit), world.client(), b"AES", 1)
    assert e.value.sw == SW.POLICY and slots_snapshot(unit) == before
    # a higher version goes in
    from keyload.core.keys import KeyAttributes
    from keyload.core.secret import Secret
    from keyload.units.authority import ExportPolicy


    # generate_key refuses an existing REF1: add_key(replace=True) gives version 6
    world.ks.add_key(b"AES", KeyType.AES256, Secret(os.urandom(32)),
                     KeyAttributes("K0", "B", "E"), version=6, diversify=False,
                     policy=ExportPolicy(None, None), replace=True)
    res = load_key(unit_client(unit), world.client(), b"AES", 1)
    assert res.key_version == 6 and unit.state.slots[1].kcv == res.kcv


def test_symmetric_sas_refused_by_unit_holding_authority_key(world: World) -> None:
    e = _refused(world, b"WANTSIG", b"AES", 1, verify_key=world.ks.public_key())
    assert isinstance(e.cause, AuthenticityError) and e.sw == 0x6988


def test_signed_sas_refused_by_unit_without_key(world: World) -> None:
    e = _refused(world, b"NOKEY", b"AES", 1, set_id=world.signed_set)
    assert isinstance(e.cause, AuthenticityError)


def test_wrong_authority_key(world: World) -> None:
    other = make_world()
    e = _refused(world, b"OTHERPK", b"AES", 1, set_id=world.signed_set,
                 verify_key=other.ks.public_key())
    assert e.sw == 0x6988


def _export_for(world: World, unit_sn: bytes, r: bytes, set_id: bytes, ref1: bytes = b"AES",
                ref2: int = 1, suite: int = 1) -> bytes:
    resp = world.client().export(msg.ExportRequest(unit_sn, r, set_id, suite, ref1, ref2))
    return resp.import_data


def _send_import(unit: object, data: bytes) -> int:
    from keyload.units.unit import Unit

    assert isinstance(unit, Unit)
    apdu = CommandAPDU(0x80, 0x14, 0, 0, data, ne=256).encode()
    return ResponseAPDU.decode(unit.process_apdu(apdu)).sw


def test_replay_refused(world: World) -> None:
    unit = world.unit(b"REPLAY")
    rec = Recorder(LocalConnection(unit))
    from keyload.station.load import UnitClient

    load_key(UnitClient(rec), world.client(), b"AES", 1)
    data = _import_data_of(rec)
    before = slots_snapshot(unit)
    assert _send_import(unit, data) == SW.NO_CHALLENGE
    # even after a new challenge, the old data (old R) is refused
    unit_client(unit).initialize()
    assert _send_import(unit, data) == SW.INTEGRITY
    assert slots_snapshot(unit) == before and unit.pending is None


def test_data_for_another_unit_or_set_or_challenge(world: World) -> None:
    a, b = world.unit(b"UNIT-A"), world.unit(b"UNIT-B")
    other_set = world.unit(b"UNIT-A", world.set_b)  # same SN, other set
    ia = unit_client(a).initialize()
    data = _export_for(world, ia.sn, ia.r, ia.set_id)
    for victim in (b, other_set):
        unit_client(victim).initialize()
        before = slots_snapshot(victim)
        victim.set_challenge(ia.r)  # even the same R does not help
        assert _send_import(victim, data) == SW.INTEGRITY
        assert slots_snapshot(victim) == before
    # for A itself, but after A made a new challenge
    unit_client(a).initialize()
    assert _send_import(a, data) == SW.INTEGRITY
    assert a.state.slots[1].key is None


def test_kcv_mismatch_detected_by_station(world: World) -> None:
    unit = world.unit(b"KCVMM")

    class LyingAuthority:
        def transmit(self, apdu: bytes) -> bytes:
            r = world.authority.process_apdu(apdu)
            if apdu[1] == 0x12 and r[-2:] == b"\x90\x00":
                return r[:-3] + bytes([r[-3] ^ 1]) + r[-2:]
            return r

    with pytest.raises(LoadFailed) as e:
        load_key(unit_client(unit), AuthorityClient(LyingAuthority(), suites=None), b"AES", 1)
    assert isinstance(e.value.cause, KcvMismatch)


def test_extended_length_import_is_accepted(world: World) -> None:
    unit = world.unit(b"EXT")
    i = unit_client(unit).initialize()
    data = _export_for(world, i.sn, i.r, i.set_id)
    ext = b"\x80\x14\x00\x00\x00" + len(data).to_bytes(2, "big") + data + b"\x00\x00"
    r = ResponseAPDU.decode(unit.process_apdu(ext))
    assert r.sw == 0x9000 and msg.ImportResponse.decode(r.data).kcv == unit.state.slots[1].kcv


# -- tampering: any single-bit flip is refused, nothing stored -----------------------
@pytest.fixture(scope="module")
def tamper_setup() -> tuple[World, bytes, bytes, bytes]:
    w = make_world()
    unit = w.unit(b"TAMPER")
    i = unit_client(unit).initialize()
    data = _export_for(w, i.sn, i.r, i.set_id, ref1=b"MAC", ref2=2)
    return w, i.sn, i.r, data


def _fresh_flip_result(setup: tuple[World, bytes, bytes, bytes], bit: int) -> int:
    w, sn, r, data = setup
    unit = w.unit(sn)
    unit.set_challenge(r)
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    before = slots_snapshot(unit)
    sw = _send_import(unit, bytes(flipped))
    assert slots_snapshot(unit) == before
    assert unit.pending is None
    return sw


def test_unflipped_data_is_accepted(tamper_setup: tuple[World, bytes, bytes, bytes]) -> None:
    w, sn, r, data = tamper_setup
    unit = w.unit(sn)
    unit.set_challenge(r)
    assert _send_import(unit, data) == 0x9000


def test_every_single_bit_flip_is_refused(
        tamper_setup: tuple[World, bytes, bytes, bytes]) -> None:
    data = tamper_setup[3]
    seen = set()
    for bit in range(len(data) * 8):
        sw = _fresh_flip_result(tamper_setup, bit)
        assert sw != 0x9000, f"bit {bit} flipped and accepted"
        seen.add(sw)
    assert seen <= {0x6A80, 0x6A88, 0x6A81, 0x6982, 0x6986, 0x6988}
    assert 0x6982 in seen and 0x6A80 in seen


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(min_value=0), extra=st.binary(max_size=3))
def test_bit_flip_property(tamper_setup: tuple[World, bytes, bytes, bytes], bit: int,
                           extra: bytes) -> None:
    data = tamper_setup[3]
    assert _fresh_flip_result(tamper_setup, bit % (len(data) * 8)) != 0x9000


# -- random APDUs: a defined SW, never an exception ----------------------------------
DEFINED = {int(s) for s in SW} | {0x6A82}


@settings(max_examples=400, deadline=None)
@given(apdu=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda cla, ins, p1, p2, body: bytes([cla, ins, p1, p2]) + body,
              st.sampled_from([0x00, 0x80, 0x84, 0xFF]),
              st.sampled_from([0xA4, 0x10, 0x12, 0x14, 0x16, 0x00, 0xC0]),
              st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))))
def test_random_apdus_get_a_defined_status_word(apdu: bytes) -> None:
    w = _RANDOM_WORLD
    unit = w.unit(b"RANDOM")
    unit_client(unit).initialize()
    before = slots_snapshot(unit)
    for app in (unit, w.authority):
        r = app.process_apdu(apdu)
        assert len(r) >= 2
        sw = int.from_bytes(r[-2:], "big")
        assert sw in DEFINED
        if sw != 0x9000:
            assert len(r) == 2
    assert slots_snapshot(unit) == before


_RANDOM_WORLD = make_world()


# -- wiping -------------------------------------------------------------------------
def test_buffers_wiped_after_success_and_each_failure(world: World) -> None:
    cases = [
        (b"AES", 1, None),  # success
        (b"AES", 1, SW.POLICY),  # rollback: refused after CAS
        (b"MAC", 1, SW.POLICY),  # wrong type
        (b"AES", 9, SW.NOT_FOUND),
    ]
    unit = world.unit(b"WIPE", slots={1: Slot(1, frozenset({3})),
                                      2: Slot(2, frozenset({0x10}))})
    ks_scratch = world.ks._scratch
    unit_scratch = unit._scratch
    for ref1, ref2, sw in cases:
        try:
            load_key(unit_client(unit), world.client(), ref1, ref2)
            assert sw is None
        except LoadFailed as e:
            assert e.sw == sw
        assert ks_scratch.wiped and unit_scratch.wiped
        assert len(ks_scratch.t1) == 32 and len(ks_scratch.session) == 96
    # integrity and authenticity failures inside the unit
    i = unit_client(unit).initialize()
    data = bytearray(_export_for(world, i.sn, i.r, i.set_id, ref1=b"MAC", ref2=2))
    data[-1] ^= 1  # CAS
    assert _send_import(unit, bytes(data)) == SW.INTEGRITY
    assert unit_scratch.wiped
    signed = world.unit(b"WIPE", world.signed_set)  # no verify key: signed SAS refused
    i = unit_client(signed).initialize()
    data = bytearray(_export_for(world, i.sn, i.r, i.set_id, ref1=b"MAC", ref2=2))
    assert _send_import(signed, bytes(data)) == SW.AUTHENTICITY
    assert signed._scratch.wiped and len(signed._scratch.ta) == 64  # TA' was in clear, now 0


def test_import_data_structure_errors(world: World) -> None:
    unit = world.unit(b"STRUCT")
    i = unit_client(unit).initialize()
    data = _export_for(world, i.sn, i.r, i.set_id)
    d = msg.ImportData.decode(data)
    bad = [
        data + b"\xc0\x00",  # trailing TLV
        data[:-1],  # truncated
        msg.ImportData(d.ref2, d.h + b"\x00", d.w, d.sas, d.cas).encode(),  # H 13 bytes
        msg.ImportData(d.ref2, d.h, d.w, d.sas, d.cas[:15]).encode(),  # CAS 15 bytes
        b"\xc7\x01\x00" + data[3:],  # REF2 0
        b"\xc7\x01\xff" + data[3:],  # REF2 255
    ]
    for b in bad:
        unit.set_challenge(i.r)
        assert _send_import(unit, b) == SW.MALFORMED
        assert unit.state.slots[1].key is None
    with pytest.raises(MalformedData):
        msg.ImportData.decode(bad[0])


@pytest.mark.parametrize("bad", [
    lambda data: bytes([0x80, 0x14, 0, 0, len(data) + 3]) + data,  # Lc says 3 bytes more
    lambda data: bytes([0x80, 0x14, 0, 0]) + data[:1],  # a truncated command
    lambda data: CommandAPDU(0x80, 0x14, 1, 0, data, ne=256).encode(),  # wrong P1
])
def test_a_refused_importkey_ends_the_challenge(world: World, bad: Any) -> None:
    """§7 step 1: any IMPORTKEY consumes the challenge, also one refused for its encoding;
    the genuine one sent after it finds no challenge, and nothing is stored."""
    unit = world.unit(b"BADLC")
    i = unit_client(unit).initialize()
    data = _export_for(world, i.sn, i.r, i.set_id)
    before = slots_snapshot(unit)
    sw = ResponseAPDU.decode(unit.process_apdu(bad(data))).sw
    assert sw in (SW.WRONG_LENGTH, SW.MALFORMED, SW.WRONG_P1P2), hex(sw)
    assert unit.pending is None
    assert _send_import(unit, data) == SW.NO_CHALLENGE
    assert slots_snapshot(unit) == before


def test_out_of_order_and_no_challenge(world: World) -> None:
    unit = world.unit(b"ORDER")
    i = unit_client(unit).initialize()
    data = _export_for(world, i.sn, i.r, i.set_id)
    unit.reset()  # power cycle loses the challenge
    assert _send_import(unit, data) == SW.NO_CHALLENGE
    with pytest.raises(NoChallenge):
        unit_client(unit).import_key(data)
