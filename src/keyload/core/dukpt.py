"""AES DUKPT (ANSI X9.24-3-2017): a terminal's initial key (IK) from a base derivation key
(BDK), and the working keys of a transaction from the IK and the KSN.

Every key is a chain of AES-ECB encryptions of 16-byte derivation data (X9.24-3):
``01 || block counter || key usage (2) || algorithm (2) || length in bits (2) || 8 bytes``,
the 8 bytes being the initial key ID for the IK, else the derivation ID (the ID's
rightmost 4 bytes) || the transaction counter. A key longer than 128 bits takes one block
per 128 bits (block counter 1, 2). The same blocks are what a PKCS#11 token encrypts with
``CKM_AES_ECB_ENCRYPT_DATA`` (:func:`initial_key_data`).

Enforced: an initial key ID of 8 bytes; an AES-128, -192 or -256 derived key never longer
than the key it comes from (a derived key is no stronger than its parent); a KSN of 12
bytes whose counter is not 0 and has at most 16 one-bits (no terminal uses another). Not
here: TDES DUKPT (the IPEK of X9.24-1), which KLP1 cannot load (it has no TDES key type).

Values are :class:`~keyload.core.secret.Secret`; every intermediate key is wiped.

>>> bdk = Secret(bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1"))
>>> ik = initial_key(bdk.buffer, InitialKeyId.parse("1234567890123456"), KeyType.AES128)
>>> bytes(ik.buffer).hex().upper()
'1273671EA26AC29AFA4D1084127652A1'
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .keys import KeyAttributes, KeyType
from .primitives import Buf, aes_ecb_encrypt_into
from .secret import Secret

INITIAL_KEY_ID_LEN = 8
KSN_LEN = 12
MAX_COUNTER_BITS = 16

USAGE_BDK, USAGE_IK = "B0", "B1"  # X9.143 key usages of a BDK and of an initial key


class KeyUsage(IntEnum):
    """X9.24-3 key usage indicators of the derivation data (those keyload derives)."""

    PIN_ENCRYPTION = 0x1000
    MAC_GENERATION = 0x2000
    DATA_ENCRYPTION = 0x3000
    KEY_DERIVATION = 0x8000
    INITIAL_KEY = 0x8001


#: ``keyload dukpt derive --usage``: the working keys an operator checks
WORKING_USAGES = {"pin": KeyUsage.PIN_ENCRYPTION, "mac": KeyUsage.MAC_GENERATION,
                  "data": KeyUsage.DATA_ENCRYPTION}

_ALGORITHM = {KeyType.AES128: 2, KeyType.AES192: 3, KeyType.AES256: 4}


@dataclass(frozen=True, slots=True)
class InitialKeyId:
    """A terminal's initial key ID: BDK ID (4 bytes) || derivation ID (4 bytes)."""

    value: bytes

    def __post_init__(self) -> None:
        if len(self.value) != INITIAL_KEY_ID_LEN:
            raise ValueError(f"an initial key ID is {INITIAL_KEY_ID_LEN} bytes (BDK ID || "
                             f"derivation ID), got {len(self.value)}")

    @classmethod
    def parse(cls, text: str) -> InitialKeyId:
        """16 hex digits; ValueError otherwise."""
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"initial key ID {text!r}: not hex") from None
        return cls(value)

    def hex(self) -> str:
        return self.value.hex().upper()

    def plus(self, n: int) -> InitialKeyId:
        """The ID ``n`` further on (a campaign counts up from a base): the derivation ID
        counts, the BDK ID stays; ValueError past the last derivation ID."""
        derivation = int.from_bytes(self.value[4:], "big") + n
        if not 0 <= derivation <= 0xFFFFFFFF:
            raise ValueError("the derivation IDs run out (past FFFFFFFF)")
        return InitialKeyId(self.value[:4] + derivation.to_bytes(4, "big"))


@dataclass(frozen=True, slots=True)
class InitialKeyOrder:
    """What a station asks of the authority with a BDK's export, beside EXPORTKEY (not on
    the wire, docs/protocol.md Appendix D): derive and deliver the IK of ``initial_key_id``, of
    type ``ik_type`` (None: the BDK's)."""

    initial_key_id: InitialKeyId
    ik_type: KeyType | None = None

    def key_type(self, bdk_type: KeyType) -> KeyType:
        """The IK's type, checked against the BDK's (ValueError when it cannot be)."""
        kt = self.ik_type or bdk_type
        check_derivable(bdk_type, kt)
        return kt


def ik_attributes(bdk: KeyAttributes) -> KeyAttributes:
    """The header attributes of an IK derived from a BDK of ``bdk``: usage B1, the BDK's
    mode of use, never exportable (N)."""
    return KeyAttributes(USAGE_IK, bdk.mode, "N")


def check_bdk(key_type: KeyType, attrs: KeyAttributes, *, diversify: bool) -> None:
    """The rules for a BDK (usage B0) an authority takes in or makes: AES-128 or AES-256,
    exportability N (a BDK never leaves; its IKs do), not diversified (the IK derivation
    is its diversification). ValueError otherwise; nothing for a key of another usage."""
    if attrs.usage != USAGE_BDK:
        return
    if key_type not in (KeyType.AES128, KeyType.AES256):
        raise ValueError("a BDK (usage B0) is an AES-128 or AES-256 key")
    if attrs.exportability != "N":
        raise ValueError("a BDK (usage B0) is never exported: --exportability N")
    if diversify:
        raise ValueError("a BDK (usage B0) is not diversified: each unit receives its "
                         "initial key (--initial-key-id)")


def ksn_order(usage: str, ksn: bytes, ik_type: KeyType | None) -> InitialKeyOrder:
    """The IK a KSN's keys come from, for a key of ``usage`` (ValueError unless a BDK)."""
    if usage != USAGE_BDK:
        raise ValueError(f"not a BDK (usage {usage}, not {USAGE_BDK}): no DUKPT keys derive "
                         "from it")
    return InitialKeyOrder(parse_ksn(ksn)[0], ik_type)


def check_derivable(parent: KeyType, child: KeyType) -> None:
    """ValueError unless ``child`` is an AES type no longer than ``parent``."""
    if parent not in _ALGORITHM or child not in _ALGORITHM:
        raise ValueError("AES DUKPT derives AES-128, -192 or -256 keys from AES keys only")
    if child.default_length > parent.default_length:
        raise ValueError(f"an {child.label} key cannot be derived from an {parent.label} key "
                         "(a derived key is no stronger than its parent)")


def derivation_data(usage: KeyUsage, key_type: KeyType, tail: bytes) -> bytes:
    """The derivation data blocks (block counter 1, 2 …) for a key of ``key_type``."""
    head = usage.to_bytes(2, "big") + _ALGORITHM[key_type].to_bytes(2, "big") + \
        (8 * key_type.default_length).to_bytes(2, "big") + tail
    blocks = -(-key_type.default_length // 16)
    return b"".join(bytes((1, i)) + head for i in range(1, blocks + 1))


def initial_key_data(ik_type: KeyType, initial_key_id: InitialKeyId) -> bytes:
    """The blocks AES-ECB under the BDK encrypts into the IK (X9.24-3)."""
    return derivation_data(KeyUsage.INITIAL_KEY, ik_type, initial_key_id.value)


def derive(key: Buf, key_type: KeyType, data: bytes) -> Secret:
    """The leftmost bits of AES-ECB(key, data) for a key of ``key_type``."""
    out = Secret(len(data))
    aes_ecb_encrypt_into(key, data, out.buffer)
    if len(out) != key_type.default_length:
        cut = Secret(key_type.default_length)
        cut.buffer[:] = memoryview(out.buffer)[:key_type.default_length]
        out.wipe()
        out = cut
    return out


def initial_key(bdk: Buf, initial_key_id: InitialKeyId, ik_type: KeyType) -> Secret:
    """IK = DeriveKey(BDK, ik_type, initial key derivation data) (X9.24-3)."""
    check_derivable(_type_of(len(bdk)), ik_type)
    return derive(bdk, ik_type, initial_key_data(ik_type, initial_key_id))


def _type_of(length: int) -> KeyType:
    for kt in _ALGORITHM:
        if kt.default_length == length:
            return kt
    raise ValueError(f"an AES DUKPT key is 16, 24 or 32 bytes, got {length}")


def parse_ksn(ksn: bytes) -> tuple[InitialKeyId, int]:
    """KSN = initial key ID (8) || transaction counter (4); ValueError for a KSN no
    terminal can send (length, counter 0 or with more than 16 one-bits)."""
    if len(ksn) != KSN_LEN:
        raise ValueError(f"an AES DUKPT KSN is {KSN_LEN} bytes (initial key ID || counter), "
                         f"got {len(ksn)}")
    counter = int.from_bytes(ksn[8:], "big")
    if counter == 0 or bin(counter).count("1") > MAX_COUNTER_BITS:
        raise ValueError(f"transaction counter {counter:08X} is not one a terminal uses "
                         f"(1 to {MAX_COUNTER_BITS} one-bits)")
    return InitialKeyId(ksn[:8]), counter


def _tail(initial_key_id: InitialKeyId, counter: int) -> bytes:
    return initial_key_id.value[4:] + counter.to_bytes(4, "big")


Step = tuple[bytes, KeyType]  # derivation data, and the type of the key it makes


def working_key_steps(ik_type: KeyType, ksn: bytes, usage: KeyUsage,
                      key_type: KeyType | None = None) -> list[Step]:
    """The derivations from the IK to the working key of ``usage`` for a KSN, in order: one
    per one-bit of the counter, highest first, to the intermediate derivation key,
    then the working key of ``key_type`` (default the IK's). The same steps run in
    software (:func:`derive_chain`) or as ``CKM_AES_ECB_ENCRYPT_DATA`` in a token."""
    kt = key_type or ik_type
    check_derivable(ik_type, kt)
    key_id, counter = parse_ksn(ksn)
    steps: list[Step] = []
    done = 0
    for bit in range(31, -1, -1):
        if counter & (1 << bit):
            done |= 1 << bit
            steps.append((derivation_data(KeyUsage.KEY_DERIVATION, ik_type,
                                          _tail(key_id, done)), ik_type))
    steps.append((derivation_data(usage, kt, _tail(key_id, counter)), kt))
    return steps


def derive_chain(key: Buf, steps: list[Step]) -> Secret:
    """``key`` through each step; every intermediate key wiped."""
    cur = Secret(key)
    for data, kt in steps:
        nxt = derive(cur.buffer, kt, data)
        cur.wipe()
        cur = nxt
    return cur


def transaction_key(ik: Buf, ik_type: KeyType, ksn: bytes) -> Secret:
    """The intermediate derivation key of a KSN (X9.24-3)."""
    return derive_chain(ik, working_key_steps(ik_type, ksn, KeyUsage.KEY_DERIVATION)[:-1])


def working_key(ik: Buf, ik_type: KeyType, ksn: bytes, usage: KeyUsage,
                key_type: KeyType | None = None) -> Secret:
    """The working key of ``usage`` for a KSN (X9.24-3), of ``key_type`` (default
    the IK's)."""
    return derive_chain(ik, working_key_steps(ik_type, ksn, usage, key_type))
