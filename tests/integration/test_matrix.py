"""The interop matrix: authority {software, pkcs11, card} x transport {local, pcsc} for
suites 0x01/0x02, and authority {software, pkcs11, card} x unit {emulated, card, remote}
for suite 0x03 (``test_matrix_suite3``, described where it begins below).

Every cell builds its authority, installs the same kind of set (T generated here, on the
host, imported with ``add_set`` and given to the units, as a key ceremony does), two
application keys with values known to the test (an AES-256 key diversified per unit and
an HMAC-SHA256 key), and customizes four units through the cell's transport:

- authority ``software``: :meth:`SoftwareKeystore.ephemeral`, reached in process;
- authority ``pkcs11``: a :class:`Pkcs11Keystore` on a fresh SoftHSM2 token (one token
  per cell, all made before the module is reinitialized), a signed set: suite 0x02 and
  the Ed25519 SAS run in the token;
- authority ``card``: the software authority served as a virtual card on vpcd port
  35964 and reached over PC/SC;
- transport ``local``: ``LocalConnection(unit)``; ``pcsc``: the units are virtual cards
  fed one after another through the first vpcd reader (``CardFeeder`` +
  ``cards_in_reader``), as a personalization machine feeds cards.

What each load must show, computed here with ``cryptography`` and hashlib only (not with
keyload): the key the unit stored is KLP1's TA' (KBKDF for suite 0x01, ECBDIV for 0x02,
docs/protocol.md §4), its KCV (§2) is the one the authority answered in EXPORTKEY and the one
the unit answered, the header says what was loaded, and the unit's receipt is the RCT of
§4 and verifies with :meth:`Authority.verify_receipt` (a forged one does not). Each unit
also gets one tampered IMPORTKEY (a station on the unit side flips one bit of W, SAS, CAS
or H): 6982, and its slots are as they were.

SoftHSM2 and PC/SC: skipped with the reason on a laptop without them, a failure in CI.
SoftHSM2 reads ``SOFTHSM2_CONF`` at C_Initialize: the module fixture makes its tokens,
then :func:`keyload.units.pkcs11.reinitialize` (as test_pkcs11.py does, so that both
modules run in one process in either order), and gives the previous configuration back
at the end.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyload.core.aids import INS_EXPORT, INS_IMPORT, INS_INIT
from keyload.core.apdu import CommandAPDU
from keyload.core.errors import IntegrityError
from keyload.core.identity import Certificate
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.messages3 import ExportRequest3, ImportData3
from keyload.core.secret import Secret
from keyload.core.suite3 import Exported3
from keyload.lab.cards import CardFeeder, VirtualCard
from keyload.lab.pcscd import VPCD_PORTS
from keyload.lab.softhsm import make_token, softhsm_available, softhsm_missing_reason
from keyload.service.client import ServiceClient
from keyload.service.fetch import IdentityUnit, fetch_one
from keyload.service.pki import init_pki
from keyload.service.policy import Policy
from keyload.service.runtime import open_instance
from keyload.service.server import ServerThread, bind, make_config, server_context
from keyload.station.identity import enrol
from keyload.station.load import (
    AuthorityClient,
    LoadFailed,
    LoadResult,
    UnitClient,
    load_key,
    load_key3,
)
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.transports.pcsc import (
    PcscConnection,
    cards_in_reader,
    wait_for_card,
    wait_for_removal,
)
from keyload.transports.wrappers import LockedConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from ..conftest import require

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

HAVE_PYTHON_PKCS11 = importlib.util.find_spec("pkcs11") is not None

UNIT_PORT, AUTHORITY_PORT = VPCD_PORTS  # 35963: units; 35964: the authority card
AUTHORITIES = ("software", "pkcs11", "card")
TRANSPORTS = ("local", "pcsc")
CELLS = [(a, t) for a in AUTHORITIES for t in TRANSPORTS]
PIN = "13572468"
N_UNITS = 4
TMK, MAC = b"TMK", b"MAC"  # REF1 of the AES-256 diversified key and of the HMAC key
TMK_SLOT, MAC_SLOT = 1, 2
MAC_LENGTH = 48
SW_INTEGRITY = 0x6982

# the bit flipped by the tampering station, per unit: (field, tag, byte index in the value)
FLIPS = [("W", 0xC9, 17), ("SAS", 0xCA, 40), ("CAS", 0xCB, 15),
         ("H key version", 0xC8, 8)]


# -- KLP1 computed independently (docs/protocol.md §2, §4), cryptography + hashlib only ------
def _cmac(key: bytes, data: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _ecb(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 (ECBDIV is ECB)
    return enc.update(data) + enc.finalize()


def kbkdf(key: bytes, label: bytes, context: bytes, nbytes: int) -> bytes:
    """Suite 0x01: SP 800-108 counter mode, PRF AES-CMAC, 8-bit counter first."""
    fixed = label + b"\x00" + context + (8 * nbytes).to_bytes(2, "big")
    out = b"".join(_cmac(key, bytes((i,)) + fixed) for i in range(1, -(-nbytes // 16) + 1))
    return out[:nbytes]


def ecbdiv(key: bytes, label: bytes, context: bytes, nbytes: int) -> bytes:
    """Suite 0x02: AES-ECB_K(h || 1, h || 2, ...), h = SHA-256(label || 0 || context)[:15]."""
    h = hashlib.sha256(label + b"\x00" + context).digest()[:15]
    blocks = b"".join(h + bytes((i,)) for i in range(1, -(-nbytes // 16) + 1))
    return _ecb(key, blocks)[:nbytes]


KDF = {1: kbkdf, 2: ecbdiv}


def lv(x: bytes) -> bytes:
    return bytes((len(x),)) + x


def aes_kcv(key: bytes) -> bytes:
    return _cmac(key, bytes(16))[:5]


def hmac_kcv(key: bytes) -> bytes:
    return hmac.new(key, bytes(16), hashlib.sha256).digest()[:5]


def expected_rct(suite: int, t: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                 kcv: bytes) -> bytes:
    kdf = KDF[suite]
    t1 = kdf(t, b"KLP1-T1", sn, 32)
    kmac = kdf(t1, b"KLP1-DL", lv(sn) + r + bytes((ref2,)), 96)[32:64]
    return _cmac(kmac, b"KLP1-RCT" + lv(sn) + r + bytes((ref2,)) + h + kcv)


def tlv_values(data: bytes) -> dict[int, tuple[int, int]]:
    """tag -> (offset, length) of each value in a run of one-byte-tag BER-TLVs."""
    out: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(data):
        tag, n = data[i], data[i + 1]
        i += 2
        if n == 0x81:
            n, i = data[i], i + 1
        elif n == 0x82:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        out[tag] = (i, n)
        i += n
    assert i == len(data)
    return out


# -- connection wrappers ----------------------------------------------------------------
@dataclass
class TamperImport:
    """A malicious station on the unit side: flips one bit of one field of IMPORTKEY."""

    inner: Connection
    tag: int
    index: int
    flipped: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) > 4 and apdu[1] == INS_IMPORT:
            cmd = CommandAPDU.decode(apdu)
            data = bytearray(cmd.data)
            off, n = tlv_values(bytes(data))[self.tag]
            assert 0 <= self.index < n
            data[off + self.index] ^= 0x04
            apdu = CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, bytes(data),
                               ne=cmd.ne).encode()
            self.flipped += 1
        return self.inner.transmit(apdu)


@dataclass
class AuthorityKcvs:
    """Keeps the KCV of TA' from every successful EXPORTKEY answer (``... CD 05 kcv``)."""

    inner: Connection
    kcvs: list[bytes] = field(default_factory=list)

    def transmit(self, apdu: bytes) -> bytes:
        r = self.inner.transmit(apdu)
        if len(apdu) > 1 and apdu[1] == INS_EXPORT and r[-2:] == b"\x90\x00":
            assert r[-9:-7] == b"\xcd\x05", r.hex()
            self.kcvs.append(r[-7:-2])
        return r


# -- fixtures ----------------------------------------------------------------------------
@dataclass
class SoftHsm:
    module: str
    labels: dict[str, str]
    opened: list[Any] = field(default_factory=list)

    def open(self, cell: str) -> Any:
        """The token of one cell: a transport of the first matrix, or ``s3-<unit kind>``."""
        from keyload.units import pkcs11 as p11

        ks = p11.Pkcs11Keystore.open(self.module, self.labels[cell], pin=PIN)
        self.opened.append(ks)
        return ks


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One fresh token per pkcs11 cell, all made before the module is (re)initialized."""
    require(HAVE_PYTHON_PKCS11, "python-pkcs11 is not installed (pip install python-pkcs11)")
    require(softhsm_available(), f"SoftHSM2: {softhsm_missing_reason()}")
    from keyload.units import pkcs11 as p11

    old_conf = os.environ.get("SOFTHSM2_CONF")
    d = tmp_path_factory.mktemp("matrix-softhsm")
    labels = {t: f"matrix-{t}" for t in TRANSPORTS}
    labels.update({f"s3-{u}": f"matrix-s3-{u}" for u in UNIT_KINDS})  # suite 0x03 cells
    tokens = [make_token(d, label=label, user_pin=PIN) for label in labels.values()]
    module = tokens[0].module
    p11.reinitialize(module)  # SoftHSM reads SOFTHSM2_CONF now (keyload.lab.softhsm)
    hsm = SoftHsm(module, labels)
    try:
        yield hsm
    finally:
        for ks in hsm.opened:
            ks.close()
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:  # give the module back the tokens another fixture made
            os.environ["SOFTHSM2_CONF"] = old_conf
            p11.reinitialize(module)


# -- one cell ----------------------------------------------------------------------------
def unit_slots() -> dict[int, Slot]:
    """Every unit's slots: TMK (AES-256) and MAC (HMAC-SHA256)."""
    return {TMK_SLOT: Slot(TMK_SLOT, frozenset({KeyType.AES256})),
            MAC_SLOT: Slot(MAC_SLOT, frozenset({KeyType.HMAC_SHA256}))}


@dataclass
class Cell:
    authority: Authority  # the in-process authority object (receipts are checked on it)
    client: AuthorityClient
    kcvs: AuthorityKcvs
    suite: int
    t: bytes
    set_id: bytes
    tmk: bytes
    mac: bytes
    verify_key: bytes

    def unit(self, sn: bytes) -> Unit:
        return Unit(MemoryUnitStore(UnitState.new(sn, Secret(self.t), unit_slots(),
                                                  verify_key=self.verify_key)))


def _authority(kind: str, ks: Any, set_id: bytes, tmk: bytes, mac: bytes,
               request: pytest.FixtureRequest, stack: ExitStack) -> tuple[Authority, Connection]:
    """The two application keys installed for ``set_id``, and the cell's authority with a
    connection to it: in process, or (``card``) served as a virtual card on the second
    vpcd reader and reached over PC/SC."""
    ks.add_key(TMK, KeyType.AES256, Secret(tmk), KeyAttributes("K0", "B", "E"), version=1,
               diversify=True, policy=ExportPolicy(frozenset({set_id}), frozenset({TMK_SLOT})))
    ks.add_key(MAC, KeyType.HMAC_SHA256, Secret(mac), KeyAttributes("M7", "C", "N"),
               version=1, diversify=False,
               policy=ExportPolicy(frozenset({set_id}), frozenset({MAC_SLOT})))
    authority = Authority(ks)
    if kind != "card":
        return authority, LocalConnection(authority)
    reader = request.getfixturevalue("pcscd").reader_for_port(AUTHORITY_PORT)
    card = VirtualCard(authority, AUTHORITY_PORT).start()

    def remove() -> None:
        card.stop()
        wait_for_removal(reader, 5)

    stack.callback(remove)
    wait_for_card(reader, 5)
    return authority, stack.enter_context(PcscConnection(reader))


def _build_cell(kind: str, transport: str, request: pytest.FixtureRequest,
                stack: ExitStack) -> Cell:
    if kind == "pkcs11":
        ks: Any = request.getfixturevalue("softhsm").open(transport)
    else:
        ks = SoftwareKeystore.ephemeral()
        stack.callback(ks.close)
    pub = ks.set_signing_key()
    # the key ceremony: T generated on the host, installed in the authority, given to units
    t, tmk, mac = os.urandom(32), os.urandom(32), os.urandom(MAC_LENGTH)
    set_id = ks.add_set(Secret(t), "matrix", signed=True).set_id
    assert set_id == aes_kcv(t)
    authority, conn = _authority(kind, ks, set_id, tmk, mac, request, stack)
    suites = authority.capabilities().suites
    kcvs = AuthorityKcvs(conn)
    client = AuthorityClient(kcvs, suites=suites)  # SELECT (over PC/SC for the card)
    suite = min(suites)  # the station's preference among (1, 2) the unit also speaks
    assert suite == (2 if kind == "pkcs11" else 1)
    return Cell(authority, client, kcvs, suite, t, set_id, tmk, mac, pub)


def _snapshot(unit: Unit) -> list[tuple[int, bytes | None, bytes | None, bytes | None]]:
    return [(s.ref2, s.header, s.kcv, None if s.key is None else bytes(s.key.buffer))
            for s in sorted(unit.state.slots.values(), key=lambda s: s.ref2)]


def _load(cell: Cell, uc: UnitClient, ref1: bytes, ref2: int, *, select: bool
          ) -> tuple[LoadResult, bytes]:
    before = len(cell.kcvs.kcvs)
    res = load_key(uc, cell.client, ref1, ref2, select=select)
    assert len(cell.kcvs.kcvs) == before + 1
    return res, cell.kcvs.kcvs[-1]


def _customize_unit(cell: Cell, conn: Connection, unit: Unit, flip: tuple[str, int, int]
                    ) -> list[tuple[LoadResult, bytes]]:
    """TMK into slot 1, a tampered MAC (refused, nothing changes), then MAC into slot 2."""
    uc = UnitClient(conn)
    done = [_load(cell, uc, TMK, TMK_SLOT, select=True)]
    before = _snapshot(unit)
    name, tag, index = flip
    tamper = TamperImport(conn, tag, index)
    with pytest.raises(LoadFailed) as ei:
        load_key(UnitClient(tamper), cell.client, MAC, MAC_SLOT, select=False)
    assert tamper.flipped == 1
    assert ei.value.step == "unit IMPORTKEY", name
    assert ei.value.sw == SW_INTEGRITY, f"{name}: SW {ei.value.sw}"
    assert ei.value.sn == unit.sn
    assert _snapshot(unit) == before and unit.state.slots[MAC_SLOT].key is None
    assert unit.pending is None  # the challenge was consumed
    done.append(_load(cell, uc, MAC, MAC_SLOT, select=False))
    return done


def _check(cell: Cell, unit: Unit, res: LoadResult, authority_kcv: bytes) -> None:
    sn = unit.sn
    assert res.sn == sn and res.set_id == cell.set_id and res.suite == cell.suite
    slot = unit.state.slots[res.ref2]
    assert slot.key is not None
    stored = bytes(slot.key.buffer)
    h = res.header
    if res.ref1 == TMK:
        want = KDF[cell.suite](cell.tmk, b"KLP1-TA", lv(sn), 32)
        independent = aes_kcv(stored)
        assert (h[2], h[3], h[4:7], h[10]) == (0x03, 32, b"K0B", 0b11)  # diversified, Ed25519
    else:
        want = cell.mac
        independent = hmac_kcv(stored)
        assert (h[2], h[3], h[4:7], h[10]) == (0x10, MAC_LENGTH, b"M7C", 0b10)
    assert (h[0], h[1], h[7:9], h[11]) == (1, cell.suite, b"\x00\x01", 0)
    assert stored == want, "the unit holds KLP1's TA'"
    assert authority_kcv == independent == res.kcv == slot.kcv
    assert slot.header == h
    assert res.rct == expected_rct(cell.suite, cell.t, sn, res.r, res.ref2, h, res.kcv)
    cell.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=sn, r=res.r,
                                  ref2=res.ref2, h=h, kcv=res.kcv, rct=res.rct)
    forged = bytes((res.rct[0] ^ 1,)) + res.rct[1:]
    with pytest.raises(IntegrityError):
        cell.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=sn, r=res.r,
                                      ref2=res.ref2, h=h, kcv=res.kcv, rct=forged)


@pytest.mark.parametrize(("kind", "transport"), CELLS, ids=[f"{a}-{t}" for a, t in CELLS])
def test_matrix(kind: str, transport: str, request: pytest.FixtureRequest) -> None:
    if kind == "pkcs11":
        request.getfixturevalue("softhsm")  # skip (or fail in CI) before anything starts
    if kind == "card" or transport == "pcsc":
        request.getfixturevalue("pcscd")
    with ExitStack() as stack:
        cell = _build_cell(kind, transport, request, stack)
        units = [cell.unit(b"MX-%s-%s-%d" % (kind.encode(), transport.encode(), i))
                 for i in range(N_UNITS)]
        loads: list[tuple[Unit, LoadResult, bytes]] = []
        if transport == "local":
            for i, unit in enumerate(units):
                for res, akcv in _customize_unit(cell, LocalConnection(unit), unit,
                                                 FLIPS[i % len(FLIPS)]):
                    loads.append((unit, res, akcv))
        else:
            reader = request.getfixturevalue("pcscd").reader_for_port(UNIT_PORT)
            seen: list[bytes] = []
            with CardFeeder(units, UNIT_PORT) as feeder:
                for i, src in enumerate(cards_in_reader(reader, len(units), 10)):
                    unit = feeder.in_reader
                    assert isinstance(unit, Unit)
                    seen.append(unit.sn)
                    with src.connect() as conn:
                        for res, akcv in _customize_unit(cell, conn, unit,
                                                         FLIPS[i % len(FLIPS)]):
                            loads.append((unit, res, akcv))
                assert feeder.wait(10), "the feeder did not finish"
                assert feeder.error is None
            wait_for_removal(reader, 5)
            assert seen == [u.sn for u in units] and feeder.fed == seen
            assert feeder.finished == len(units)
        # checked before the stack closes the software keystore (close wipes T)
        assert len(loads) == 2 * N_UNITS
        for unit, res, akcv in loads:
            _check(cell, unit, res, akcv)
        for unit in units:
            assert {r.ref2 for u, r, _ in loads if u is unit} == {TMK_SLOT, MAC_SLOT}
        # three EXPORTKEYs per unit went through (the tampered one too), each KCV once
        assert len(cell.kcvs.kcvs) == 3 * N_UNITS
        if kind == "pkcs11":
            ks = cell.authority.backend
            assert ks.session_object_count() == 0  # type: ignore[attr-defined]


# == suite 0x03: authority {software, pkcs11, card} x unit {emulated, card, remote} =========
# Each cell makes an identity set in its authority (set CA key, authority key, C_A), the
# same two application keys, and four units of the set, each enrolled (GENERATE UNIT KEY,
# the authority certifies, PUT CERTIFICATE): the emulated and remote units in process
# beforehand, the cards in the reader as they are fed (enrolment then customization, as a
# personalization machine does). The unit kinds:
#
# - ``emulated``: ``LocalConnection(unit)``, the station in process with the authority;
# - ``card``: blank units fed as virtual cards through the first vpcd reader;
# - ``remote``: an emulated unit at a terminal that fetches from the HTTPS service (the
#   real server on loopback, mutual TLS) with :func:`keyload.service.fetch.fetch_one`;
#   the service's authority is the cell's (the ``card`` cell's service makes each export
#   on the authority card over PC/SC, reading sets, keys and the register from the
#   keystore the card holds).
#
# What each load must show, computed with ``cryptography`` and hashlib only: the stored key
# is TA' (ECBDIV, diversified for TMK), its KCV is the unit's and the authority's, the
# header says suite 0x03, the unit's C_U is the set CA's signature of (SN, Q_U) and the
# receipt is the unit's ECDSA signature of §10.3 under Q_U with the E_A of the download;
# :meth:`Authority.verify_receipt3` takes it with certificates only and refuses a forged
# one. Each unit also meets a station in the middle: it swaps in its own ephemeral key
# E_A' and a CAS it computes itself from its ECDH with E_U (so the unit's CAS check
# passes), keeping the genuine SAS: the unit answers 6988 and its slots are as they were.
UNIT_KINDS = ("emulated", "card", "remote")
SW_AUTHENTICITY = 0x6988
def cell3(authority: str, unit: str) -> Any:
    return pytest.param(authority, unit, id=f"{authority}-{unit}")


CELLS3 = [cell3(a, u) for a in AUTHORITIES for u in UNIT_KINDS]


def p256(point: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def ecdsa_verify(point: bytes, sig: bytes, message: bytes) -> None:
    """``sig`` is r || s (§10.1); raises InvalidSignature."""
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    p256(point).verify(der, message, ec.ECDSA(hashes.SHA256()))


def values(data: bytes) -> dict[int, bytes]:
    return {tag: data[off:off + n] for tag, (off, n) in tlv_values(data).items()}


def check_unit_certificate(cert: bytes, q_ca: bytes, set_id: bytes, sn: bytes) -> bytes:
    """C_U = E1 { C0 C5 C3 C1 D0 D2 } signed by the set CA (§10.1); returns Q_U."""
    assert hashlib.sha256(b"KLP1-SET" + q_ca).digest()[:5] == set_id
    content = values(cert)[0xE1]
    f = values(content)
    assert (f[0xC0], f[0xC5], f[0xC3], f[0xC1]) == (b"\x01", b"\x02", set_id, sn)
    signed = content[:tlv_values(content)[0xD2][0] - 2]  # the five objects before D2 40
    ecdsa_verify(q_ca, f[0xD2], b"KLP1-CRT" + signed)
    return f[0xD0]


@dataclass
class UnitSide:
    """The station's connection to a unit, at the unit's side: keeps the fields of the
    unit's last INITIALIZE DOWNLOAD answer and the E_A of each IMPORTKEY. With ``mitm``,
    a station in the middle: in IMPORTKEY it puts its own E_A' and the CAS that goes with
    it (Z' = ECDH(e_A', E_U), then T1, Kmac and CAS of §10.3), and keeps the genuine SAS."""

    inner: Connection
    mitm: bool = False
    init: dict[int, bytes] = field(default_factory=dict)
    e_a: list[bytes] = field(default_factory=list)
    swapped: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) > 4 and apdu[1] == INS_IMPORT:
            if self.mitm:
                apdu = self._swap(CommandAPDU.decode(apdu))
            self.e_a.append(values(CommandAPDU.decode(apdu).data)[0xD4])
        r = self.inner.transmit(apdu)
        if len(apdu) > 1 and apdu[1] == INS_INIT and r[-2:] == b"\x90\x00":
            self.init = values(r[:-2])
        return r

    def _swap(self, cmd: CommandAPDU) -> bytes:
        data = bytearray(cmd.data)
        at = tlv_values(cmd.data)
        f = values(cmd.data)
        sn, r, e_u = self.init[0xC1], self.init[0xC2], self.init[0xD3]
        ref1, ref2, h, w, sas = f[0xC6], f[0xC7], f[0xC8], f[0xC9], f[0xCA]
        mine = ec.generate_private_key(ec.SECP256R1())
        e_a = mine.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        assert e_a != f[0xD4]
        z = mine.exchange(ec.ECDH(), p256(e_u))
        t1 = ecbdiv(z, b"KLP1-T1", lv(sn) + r + e_u + e_a, 32)
        kmac = ecbdiv(t1, b"KLP1-DL", lv(sn) + r + ref2, 96)[32:64]
        cas = _cmac(kmac, b"KLP1-CAS" + lv(sn) + r + ref2 + lv(ref1) + h + w + sas + e_a)
        for tag, value in ((0xD4, e_a), (0xCB, cas)):
            off, n = at[tag]
            assert n == len(value)
            data[off:off + n] = value
        self.swapped += 1
        return CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, bytes(data), ne=cmd.ne).encode()


@dataclass
class AuthorityCardBackend:
    """The service's authority backend in the card x remote cell: every export is made by
    the authority card over PC/SC; sets, keys and the register are read from the keystore
    the card holds."""

    ks: SoftwareKeystore
    card: AuthorityClient

    def capabilities(self) -> Any:
        return self.ks.capabilities()

    def set_info(self, set_id: bytes) -> Any:
        return self.ks.set_info(set_id)

    def key_info(self, ref1: bytes) -> Any:
        return self.ks.key_info(ref1)

    def identity_set(self, set_id: bytes) -> Any:
        return self.ks.identity_set(set_id)

    def unit_record(self, set_id: bytes, sn: bytes) -> Any:
        return self.ks.unit_record(set_id, sn)

    def export(self, req: Any) -> Any:
        raise AssertionError("suite 0x03 only in this cell")

    def receipt(self, *args: Any) -> bytes:
        raise AssertionError("suite 0x03 receipts need no secret")

    def export3(self, req: ExportRequest3) -> Exported3:
        resp = self.card.export3(req)
        d = ImportData3.decode(resp.import_data)
        return Exported3(resp.import_data, d.h, resp.kcv, d.e_a, d.sas)


def _service(backend: Any, set_id: bytes, d: Path, stack: ExitStack) -> ServiceClient:
    """The HTTPS service over ``backend`` on loopback (mutual TLS); a client for it."""
    pki = d / "pki"
    init_pki(pki, clients=("terminal-1",))
    (d / "authority").mkdir()
    policy = {"limits": {"max_body": 16384, "per_client": {"limit": 100000, "window_s": 1},
                         "per_sn": {"limit": 100, "window_s": 60}},
              "clients": {"terminal-1": {"sets": [set_id.hex()], "ref1": ["TMK", "MAC"]}}}
    inst = open_instance(backend, Policy.from_json(policy), home_root=d,
                         authority_dir=d / "authority", audit_path=d / "audit.db",
                         instance="matrix")
    stack.callback(inst.close)
    sock = bind("127.0.0.1", 0)
    ctx = server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    srv = ServerThread(make_config(inst.app, ctx, port=sock.getsockname()[1]), sock).start()
    stack.callback(srv.stop)
    client = ServiceClient(f"https://127.0.0.1:{srv.port}", ca=pki / "ca.pem",
                           cert=pki / "clients" / "terminal-1.pem",
                           key=pki / "clients" / "terminal-1.key")
    stack.callback(client.close)
    return client


@dataclass
class Cell3:
    ks: Any
    verifier: Authority  # verify_receipt3: certificates only
    client: AuthorityClient | None  # None: the unit is remote, the station fetches
    service: ServiceClient | None
    kcvs: AuthorityKcvs | None
    set_id: bytes
    q_ca: bytes
    tmk: bytes
    mac: bytes

    def blank(self, sn: bytes) -> Unit:
        return Unit(MemoryUnitStore(UnitState.new_identity(sn, unit_slots())))

    def load(self, conn: Connection, ref1: bytes, ref2: int, *, select: bool) -> LoadResult:
        uc = UnitClient(conn)
        if self.service is not None:  # a unit of an identity set: fetch speaks suite 0x03
            res, delivered = fetch_one(self.service, IdentityUnit(conn), ref1, ref2,
                                       deadline=5.0)
            assert delivered.outcome == "recorded", delivered.error
            return res
        assert self.client is not None and self.kcvs is not None
        before = len(self.kcvs.kcvs)
        res = load_key3(uc, self.client, ref1, ref2, select=select)
        assert self.kcvs.kcvs[before:] == [res.kcv]  # the authority's KCV is the unit's
        return res


def _build_cell3(kind: str, unit_kind: str, request: pytest.FixtureRequest,
                 stack: ExitStack, d: Path) -> Cell3:
    if kind == "pkcs11":
        ks: Any = request.getfixturevalue("softhsm").open(f"s3-{unit_kind}")
    else:
        ks = SoftwareKeystore.ephemeral()
        stack.callback(ks.close)
    set_id = ks.generate_identity_set("matrix-3", authority_id=b"matrix authority").set_id
    q_ca = ks.identity_set(set_id).q_ca
    tmk, mac = os.urandom(32), os.urandom(MAC_LENGTH)
    authority, conn = _authority(kind, ks, set_id, tmk, mac, request, stack)
    kcvs = AuthorityKcvs(LockedConnection(conn))  # the service's thread uses a card too
    client = AuthorityClient(kcvs, suites=authority.capabilities().suites)  # SELECT
    service = None
    if unit_kind == "remote":
        backend = AuthorityCardBackend(ks, client) if kind == "card" else ks
        service = _service(backend, set_id, d, stack)
    return Cell3(ks, authority, None if service else client, service,
                 None if service else kcvs, set_id, q_ca, tmk, mac)


def _snapshot3(unit: Unit) -> list[tuple[Any, ...]]:
    return [(*row, unit.state.slots[row[0]].ref1) for row in _snapshot(unit)]


def _customize3(cell: Cell3, conn: Connection, unit: Unit) -> list[tuple[LoadResult, bytes]]:
    """TMK into slot 1; a station in the middle with MAC (6988, nothing changes); then MAC
    into slot 2. Each load with the E_A the unit was sent."""
    side = UnitSide(conn)
    done = [(cell.load(side, TMK, TMK_SLOT, select=True), side.e_a[-1])]
    before = _snapshot3(unit)
    mitm = UnitSide(conn, mitm=True)
    with pytest.raises(LoadFailed) as ei:
        cell.load(mitm, MAC, MAC_SLOT, select=False)
    assert mitm.swapped == 1
    assert ei.value.step == "unit IMPORTKEY"
    assert ei.value.sw == SW_AUTHENTICITY, f"SW {ei.value.sw}"
    assert ei.value.sn == unit.sn
    assert _snapshot3(unit) == before and unit.state.slots[MAC_SLOT].key is None
    assert unit.pending is None  # the challenge was consumed
    done.append((cell.load(side, MAC, MAC_SLOT, select=False), side.e_a[-1]))
    return done


def _check3(cell: Cell3, unit: Unit, res: LoadResult, e_a: bytes) -> None:
    sn = unit.sn
    assert res.sn == sn and res.set_id == cell.set_id and res.suite == 3
    slot = unit.state.slots[res.ref2]
    assert slot.key is not None
    stored = bytes(slot.key.buffer)
    h = res.header
    if res.ref1 == TMK:
        want = ecbdiv(cell.tmk, b"KLP1-TA", lv(sn), 32)
        independent = aes_kcv(stored)
        assert (h[2], h[3], h[4:7], h[10]) == (0x03, 32, b"K0B", 0b01)  # diversified
    else:
        want = cell.mac
        independent = hmac_kcv(stored)
        assert (h[2], h[3], h[4:7], h[10]) == (0x10, MAC_LENGTH, b"M7C", 0b00)
    assert (h[0], h[1], h[7:9], h[11]) == (1, 3, b"\x00\x01", 0)
    assert stored == want, "the unit holds KLP1's TA'"
    assert independent == res.kcv == slot.kcv
    assert slot.header == h and slot.ref1 == res.ref1
    assert unit.state.certificate is not None
    q_u = check_unit_certificate(unit.state.certificate, cell.q_ca, cell.set_id, sn)
    ecdsa_verify(q_u, res.rct, b"KLP1-RCT3" + lv(sn) + res.r + bytes((res.ref2,)) +
                 lv(res.ref1) + h + res.kcv + e_a)
    args = dict(set_id=res.set_id, c_u=Certificate.decode(unit.state.certificate), r=res.r,
                ref2=res.ref2, ref1=res.ref1, h=h, kcv=res.kcv, e_a=e_a)
    cell.verifier.verify_receipt3(**args, rct=res.rct)
    with pytest.raises(IntegrityError):
        cell.verifier.verify_receipt3(**args, rct=bytes((res.rct[0] ^ 1,)) + res.rct[1:])


@pytest.mark.parametrize(("kind", "unit_kind"), CELLS3)
def test_matrix_suite3(kind: str, unit_kind: str, request: pytest.FixtureRequest,
                       tmp_path: Path) -> None:
    if kind == "pkcs11":
        request.getfixturevalue("softhsm")  # skip (or fail in CI) before anything starts
    if kind == "card" or unit_kind == "card":
        request.getfixturevalue("pcscd")
    with ExitStack() as stack:
        cell = _build_cell3(kind, unit_kind, request, stack, tmp_path)
        units = [cell.blank(b"M3-%s-%s-%d" % (kind.encode(), unit_kind.encode(), i))
                 for i in range(N_UNITS)]
        loads: list[tuple[Unit, LoadResult, bytes]] = []
        if unit_kind != "card":
            for unit in units:  # enrolled at manufacture
                enrol(LocalConnection(unit), cell.ks, cell.set_id, unit.sn)
                for res, e_a in _customize3(cell, LocalConnection(unit), unit):
                    loads.append((unit, res, e_a))
        else:
            reader = request.getfixturevalue("pcscd").reader_for_port(UNIT_PORT)
            with CardFeeder(units, UNIT_PORT) as feeder:
                for src in cards_in_reader(reader, len(units), 10):
                    unit = feeder.in_reader
                    assert isinstance(unit, Unit) and unit.state.certificate is None
                    with src.connect() as conn:  # enrolled, then customized
                        enrol(conn, cell.ks, cell.set_id, unit.sn)
                        for res, e_a in _customize3(cell, conn, unit):
                            loads.append((unit, res, e_a))
                assert feeder.wait(10), "the feeder did not finish"
                assert feeder.error is None
            wait_for_removal(reader, 5)
            assert feeder.fed == [u.sn for u in units] and feeder.finished == len(units)
        assert len(loads) == 2 * N_UNITS
        for unit, res, e_a in loads:
            _check3(cell, unit, res, e_a)
        for unit in units:
            assert {r.ref2 for u, r, _ in loads if u is unit} == {TMK_SLOT, MAC_SLOT}
            rec = cell.ks.unit_record(cell.set_id, unit.sn)
            assert rec is not None and not rec.revoked
        if cell.kcvs is not None:  # three EXPORTKEYs per unit (the one in the middle too)
            assert len(cell.kcvs.kcvs) == 3 * N_UNITS
        if kind == "pkcs11":
            assert cell.ks.session_object_count() == 0
