"""Key types, the 12-byte key header H and key check values (docs/protocol.md §2, §3)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .errors import MalformedData, Unsupported
from .primitives import Buf, aes_cmac, hmac_sha256
from .secret import Secret

HEADER_VERSION = 0x01
_HEADER = struct.Struct(">BBBB2s1sH1sBx")  # H (docs/protocol.md §3); the last byte is ignored
HEADER_LEN = 12
FLAG_DIVERSIFIED = 0x01
FLAG_ED25519 = 0x02

MODES = frozenset("BEDGVCNX")
_USAGE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
EXPORTABILITY = frozenset("NES")


class KeyType(IntEnum):
    AES128 = 0x01
    AES192 = 0x02
    AES256 = 0x03
    HMAC_SHA256 = 0x10

    @property
    def is_aes(self) -> bool:
        return self in (KeyType.AES128, KeyType.AES192, KeyType.AES256)

    @property
    def label(self) -> str:
        return _TYPE_LABEL[self]

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """``aes128``, ``aes-256``, ``hmac-sha256``, ``0x03``, ``3`` …"""
        t = text.strip().lower().replace("-", "").replace("_", "")
        for kt, name in _TYPE_LABEL.items():
            if t == name.replace("-", ""):
                return kt
        if t == "hmac":
            return cls.HMAC_SHA256
        try:
            return cls(int(t, 0))
        except ValueError:
            raise ValueError(f"unknown key type {text!r} (aes128, aes192, aes256, hmac-sha256)")\
                from None

    def check_length(self, n: int) -> None:
        """Raise ValueError when ``n`` bytes is not a valid length for this type."""
        if length_fits(self, n):
            return
        if self.is_aes:
            raise ValueError(f"{self.label} needs {_AES_LEN[self]} bytes, got {n}")
        raise ValueError(f"{self.label} keys are {HMAC_MIN} to {HMAC_MAX} bytes, got {n}")

    @property
    def default_length(self) -> int:
        return _AES_LEN.get(self, 32)


_AES_LEN: dict[int, int] = {KeyType.AES128: 16, KeyType.AES192: 24, KeyType.AES256: 32}
HMAC_MIN, HMAC_MAX = 16, 64
# every (type, length) of §3, looked up in one step (length_fits is on every export)
_FITS: frozenset[tuple[int, int]] = frozenset(
    [(int(kt), n) for kt, n in _AES_LEN.items()]
    + [(int(KeyType.HMAC_SHA256), n) for n in range(HMAC_MIN, HMAC_MAX + 1)])
_TYPE_LABEL = {
    KeyType.AES128: "aes128",
    KeyType.AES192: "aes192",
    KeyType.AES256: "aes256",
    KeyType.HMAC_SHA256: "hmac-sha256",
}


def length_fits(key_type: int, length: int) -> bool:
    """Whether a key of ``length`` bytes fits ``key_type`` (docs/protocol.md §3): 16, 24 or 32
    bytes for AES-128, -192, -256, 16 to 64 for HMAC-SHA256. A type §3 does not define
    fits no length. A unit refuses a misfit with 6986 (§7 step 6); an authority never
    wraps one.

    >>> length_fits(0x03, 32), length_fits(0x03, 16), length_fits(0x10, 5), length_fits(0x07, 16)
    (True, False, False, False)
    """
    return (key_type, length) in _FITS


def kcv(key_type: KeyType | int, key: Buf) -> bytes:
    """Key check value: 5 bytes of AES-CMAC(key, 0^16), or of HMAC-SHA256 for HMAC keys."""
    if key_type == KeyType.HMAC_SHA256:
        return hmac_sha256(key, bytes(16))[:5]
    return aes_cmac(key, bytes(16))[:5]


def aes_kcv(key: Buf) -> bytes:
    return aes_cmac(key, bytes(16))[:5]


@dataclass(frozen=True, slots=True)
class KeyAttributes:
    """What X9.143 says of a key: usage (2 chars), mode of use (1), exportability (1).

    Always explicit: keyload has no permissive defaults.
    """

    usage: str
    mode: str
    exportability: str

    def __post_init__(self) -> None:
        if len(self.usage) != 2 or not all(c in _USAGE_CHARS for c in self.usage):
            raise ValueError(f"key usage must be 2 capital letters or digits (X9.143), got "
                             f"{self.usage!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode of use must be one of {''.join(sorted(MODES))}, got "
                             f"{self.mode!r}")
        if self.exportability not in EXPORTABILITY:
            raise ValueError(f"exportability must be N, E or S, got {self.exportability!r}")


class KeyHeader(NamedTuple):
    """The 12-byte key header H (docs/protocol.md §3)."""

    suite: int
    key_type: int
    key_length: int
    usage: str
    mode: str
    version: int
    exportability: str
    flags: int
    header_version: int = HEADER_VERSION

    @property
    def diversified(self) -> bool:
        return bool(self.flags & FLAG_DIVERSIFIED)

    @property
    def ed25519(self) -> bool:
        return bool(self.flags & FLAG_ED25519)

    def encode(self) -> bytes:
        return bytes((self.header_version, self.suite, self.key_type, self.key_length)) + \
            self.usage.encode("ascii") + self.mode.encode("ascii") + \
            self.version.to_bytes(2, "big") + self.exportability.encode("ascii") + \
            bytes((self.flags, 0))

    @classmethod
    def decode(cls, h: bytes) -> KeyHeader:
        """Parse H without judging its content (the unit decides what it accepts)."""
        if len(h) != HEADER_LEN:
            raise MalformedData("key header must be 12 bytes")
        hv, suite, kt, kl, usage, mode, version, exp, flags = _HEADER.unpack(h)
        return cls(suite, kt, kl, usage.decode("latin-1"), mode.decode("latin-1"), version,
                   exp.decode("latin-1"), flags, hv)

    def check_supported(self, suites: frozenset[int] | tuple[int, ...]) -> None:
        """Header version 1 and a supported suite, else 6A81 (docs/protocol.md §7 step 4)."""
        if self.header_version != HEADER_VERSION or self.suite not in suites:
            raise Unsupported("header version or suite not supported")


class KeyComponents:
    """A key as the XOR of ``count`` components, taken one at a time (a key ceremony).

    :meth:`add` answers each component's KCV (``kcv_of``) so that it can be shown right
    after the component is entered. Refused (ValueError, everything wiped): components of
    different lengths, a component equal to an earlier one (the same KCV: two equal
    components cancel out), and, from two components on, a combined key that is all zeros
    or equals one of its components (the others then cancel out).

    >>> kc = KeyComponents(2)
    >>> kcvs = [kc.add(Secret(bytes([1] * 16))), kc.add(Secret(bytes([3] * 16)))]
    >>> key, _ = kc.combined()
    >>> bytes(key) == bytes([2] * 16)
    True
    """

    def __init__(self, count: int, *,
                 kcv_of: Callable[[bytearray], bytes] = aes_kcv) -> None:
        if count < 1:
            raise ValueError("at least one component")
        self.count = count
        self.kcv_of = kcv_of
        self.kcvs: list[bytes] = []
        self._total: Secret | None = None

    def add(self, component: Secret) -> bytes:
        """XOR ``component`` in (it is wiped); its KCV."""
        c = component
        if self._total is None:
            self._total = Secret(len(c))
        total = self._total
        if len(c) != len(total):
            c.wipe()
            total.wipe()
            raise ValueError("components must have the same length")
        k = self.kcv_of(c.buffer)
        if k in self.kcvs:
            c.wipe()
            total.wipe()
            raise ValueError(f"component {len(self.kcvs) + 1} is the same as component "
                             f"{self.kcvs.index(k) + 1} (same KCV): equal components cancel out")
        self.kcvs.append(k)
        for j in range(len(c)):
            total.buffer[j] ^= c.buffer[j]
        c.wipe()
        return k

    def combined(self) -> tuple[Secret, list[bytes]]:
        """The key and the components' KCVs, once all ``count`` are in (the caller wipes
        the key)."""
        total = self._total
        if total is None or len(self.kcvs) != self.count:
            raise ValueError(f"{self.count} components are needed, {len(self.kcvs)} given")
        if self.count > 1:
            if not any(total.buffer):
                total.wipe()
                raise ValueError("the components combine to an all-zero key")
            if self.kcv_of(total.buffer) in self.kcvs:
                total.wipe()
                raise ValueError("the combined key equals one of its components (the others "
                                 "cancel out)")
        return total, self.kcvs
