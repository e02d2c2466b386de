"""ANSI X9.143 (TR-31) key blocks, version D (an AES key block protection key, KBPK).

A key block is ASCII: a 16-character header (version ID, length, key usage, algorithm,
mode of use, key version number, exportability, number of optional blocks, reserved), the
optional blocks, the encrypted key data in hex and a 16-byte MAC in hex (X9.143 §6).
Version D (X9.143 §7.1, TR-31:2018 Annex A.3):

- KBEK and KBAK are derived from the KBPK by AES-CMAC in counter mode (SP 800-108), one
  CMAC per 16 bytes of key: ``counter || usage (0000 enc, 0001 MAC) || 00 || algorithm
  (0002/0003/0004) || length in bits``. The KBPK enters here only as that CMAC (``cmac``),
  so a token can compute it without the KBPK leaving.
- The key data is ``key length in bits (2 bytes) || key || random padding``; the MAC is
  AES-CMAC(KBAK, header || key data) and is the IV of AES-CBC under KBEK.

The MAC covers the key data in clear (MAC-then-encrypt), so the block is necessarily
decrypted before its MAC can be checked: it is decrypted into a buffer wiped on every
path, and nothing decrypted (length, padding) is looked at before the MAC compares equal
(constant-time). A wrong MAC is :class:`IntegrityError` and says nothing more; a block
that does not parse is :class:`MalformedData`; versions A, B and C (TDES KBPK) are
refused (ValueError), as keyload holds no TDES key.

>>> kbpk = bytes(range(32))
>>> from keyload.core.primitives import aes_cmac
>>> cmac = lambda m: aes_cmac(kbpk, m)
>>> h = KeyBlockHeader("D", "P0", "A", "E", "01", "E")
>>> block = wrap(h, Secret(bytes(16)), cmac=cmac, kbpk_length=32, random=bytes,
...              masked_length=32)
>>> block[:16], len(block)
('D0144P0AE01E0000', 144)
>>> header, key = unwrap(block, cmac=cmac, kbpk_length=32)
>>> header == h, bytes(key.buffer) == bytes(16)
(True, True)
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import IntegrityError, MalformedData, StatusError
from .keys import HMAC_MAX, KeyAttributes, KeyType
from .primitives import aes_cmac_parts, ct_equal
from .secret import Secret, scrub

VERSION_D = "D"
KBPK_USAGE = "K1"  # X9.143: a TR-31 key block protection key
MAC_LEN = 16
_BLOCK = 16
_ALNUM = frozenset(string.ascii_uppercase + string.ascii_lowercase + string.digits)
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))
_HEX = frozenset(string.hexdigits)
HMAC_SHA256_BLOCK = ("HM", "21")  # X9.143 optional block HM: the HMAC's hash is SHA-256
_KDF_ALGORITHM = {16: b"\x00\x02\x00\x80", 24: b"\x00\x03\x00\xc0", 32: b"\x00\x04\x01\x00"}


def _bad(text: str) -> MalformedData:
    """A block that does not parse: ``text`` is the whole message (no status word: a key
    block is not a KLP1 message)."""
    return MalformedData(message=text)


class KeyBlockIntegrity(IntegrityError):
    """The block's MAC does not verify under this KBPK: it was altered, or made under
    another KBPK. Says no more."""

    def __init__(self) -> None:
        StatusError.__init__(self, message="key block: the MAC does not verify under this "
                             "KBPK")


@dataclass(frozen=True, slots=True)
class KeyBlockHeader:
    """A key block's header fields (X9.143 §6.2) and its optional blocks, in order."""

    version_id: str
    usage: str
    algorithm: str
    mode: str
    version_num: str
    exportability: str
    blocks: tuple[tuple[str, str], ...] = ()
    reserved: str = "00"

    def __post_init__(self) -> None:
        for name, width in (("version_id", 1), ("usage", 2), ("algorithm", 1), ("mode", 1),
                            ("version_num", 2), ("exportability", 1), ("reserved", 2)):
            value = getattr(self, name)
            if len(value) != width or not set(value) <= _ALNUM:
                raise _bad(f"key block header: {name} must be {width} letters or "
                                    "digits")
        for block_id, data in self.blocks:
            if len(block_id) != 2 or not set(block_id) <= _ALNUM or \
                    not set(data) <= _PRINTABLE:
                raise _bad("key block header: an optional block is malformed")
        if len(self.blocks) > 99:
            raise _bad("key block header: more than 99 optional blocks")

    def block(self, block_id: str) -> str | None:
        """The data of optional block ``block_id``, None when absent."""
        return next((d for i, d in self.blocks if i == block_id), None)

    def encode(self, total_length: int) -> str:
        """The header as it stands in a block of ``total_length`` characters (optional
        blocks as given; version D's header must then be a multiple of 16, see :func:`wrap`)."""
        opt = "".join(_encode_block(i, d) for i, d in self.blocks)
        return (f"{self.version_id}{total_length:04d}{self.usage}{self.algorithm}{self.mode}"
                f"{self.version_num}{self.exportability}{len(self.blocks):02d}{self.reserved}"
                f"{opt}")


def _encode_block(block_id: str, data: str) -> str:
    n = 4 + len(data)
    if n <= 0xFF:
        return f"{block_id}{n:02X}{data}"
    n = 2 + 2 + 2 + 4 + len(data)  # ID, 00, length of length (4 characters), length
    return f"{block_id}0004{n:04X}{data}"


def parse_header(text: str) -> tuple[KeyBlockHeader, int]:
    """The header at the start of ``text`` and the number of characters it takes; the
    length field is not checked here (:func:`unwrap` does). MalformedData when it does not
    parse. An optional block's length ``00`` is followed by the length of the length, in
    characters (X9.143:2021 §6.3), then the length.
    """
    if len(text) < 16:
        raise _bad("key block header: shorter than 16 characters")
    fixed = text[:16]
    if not set(fixed) <= _ALNUM:
        raise _bad("key block header: must be letters and digits")
    count = fixed[12:14]
    if not count.isdigit():
        raise _bad("key block header: the number of optional blocks is not 2 "
                   "digits")
    pos, blocks = 16, []
    for _ in range(int(count)):
        block_id = text[pos:pos + 2]
        if len(block_id) != 2 or not set(block_id) <= _ALNUM:
            raise _bad("key block header: an optional block ID is malformed")
        length, start = _block_length(text, pos + 2)
        if length < start - pos:
            raise _bad(f"key block header: block {block_id}'s length does not "
                                "include its ID and length")
        data = text[start:pos + length]
        if len(data) != length - (start - pos):
            raise _bad(f"key block header: block {block_id} is cut short")
        blocks.append((block_id, data))
        pos += length
    return KeyBlockHeader(fixed[0], fixed[5:7], fixed[7], fixed[8], fixed[9:11], fixed[11],
                          tuple(blocks), fixed[14:16]), pos


def _hex_field(text: str, pos: int, width: int) -> int:
    field = text[pos:pos + width]
    if len(field) != width or not set(field) <= _HEX:
        raise _bad("key block header: an optional block's length is malformed")
    return int(field, 16)


def _block_length(text: str, pos: int) -> tuple[int, int]:
    """An optional block's length (from its ID on) and where its data starts."""
    length = _hex_field(text, pos, 2)
    if length:
        return length, pos + 2
    width = _hex_field(text, pos + 2, 2)
    if width == 0:
        raise _bad("key block header: an optional block's length of length is 0")
    return _hex_field(text, pos + 4, width), pos + 4 + width


def _derive(cmac: Callable[[bytes], bytes], kbpk_length: int, usage: bytes) -> bytearray:
    """KBEK (``usage`` 0000) or KBAK (0001) of version D, the caller wipes it."""
    try:
        algorithm = _KDF_ALGORITHM[kbpk_length]
    except KeyError:
        raise _bad("a version D KBPK is AES-128, -192 or -256") from None
    out = bytearray()
    for counter in range(1, (kbpk_length + 15) // 16 + 1):
        part = cmac(bytes((counter,)) + usage + b"\x00" + algorithm)
        out += part
        scrub(part)
    del out[kbpk_length:]
    return out


def _cbc(key: bytearray, iv: bytes, data: bytes | bytearray, *, encrypt: bool) -> bytearray:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    out = bytearray(len(data) + _BLOCK - 1)  # update_into asks for a block's room more
    n = ctx.update_into(data, out)
    ctx.finalize()
    del out[n:]
    return out


def unwrap(block: str, *, cmac: Callable[[bytes], bytes],
           kbpk_length: int) -> tuple[KeyBlockHeader, Secret]:
    """The header and the key of a version D ``block`` under the KBPK whose AES-CMAC is
    ``cmac`` (``kbpk_length`` bytes). The MAC is checked before anything decrypted is read.
    """
    header, header_len = parse_header(block)
    length_field = block[1:5]
    if not length_field.isdigit() or int(length_field) != len(block):
        raise _bad("key block: the length field does not match the block's "
                   "length")
    if header.version_id in "ABC":
        raise ValueError(f"key block version {header.version_id}: a TDES KBPK, which "
                         "keyload does not hold (version D only)")
    if header.version_id != VERSION_D:
        raise ValueError(f"key block version {header.version_id!r} (version D only)")
    if header_len % _BLOCK or len(block) % _BLOCK:
        raise _bad("key block: not a multiple of 16 characters")
    body = block[header_len:]
    if len(body) < 2 * (MAC_LEN + _BLOCK) or not set(body) <= _HEX:
        raise _bad("key block: the key data and MAC must be hex, at least 16 + 16 "
                            "bytes")
    encrypted, mac = bytes.fromhex(body[:-2 * MAC_LEN]), bytes.fromhex(body[-2 * MAC_LEN:])
    kbek = _derive(cmac, kbpk_length, b"\x00\x00")
    kbak = _derive(cmac, kbpk_length, b"\x00\x01")
    clear = bytearray()
    try:
        clear = _cbc(kbek, mac, encrypted, encrypt=False)
        if not ct_equal(aes_cmac_parts(kbak, block[:header_len].encode("ascii"), clear), mac):
            raise KeyBlockIntegrity()
        bits = int.from_bytes(clear[:2], "big")
        if bits % 8 or not 0 < bits // 8 <= len(clear) - 2:
            raise _bad("key block: the key length in the key data is not valid")
        return header, Secret(memoryview(clear)[2:2 + bits // 8])
    finally:
        scrub(clear)
        scrub(kbek)
        scrub(kbak)


def wrap(header: KeyBlockHeader, key: Secret, *, cmac: Callable[[bytes], bytes],
         kbpk_length: int, random: Callable[[int], bytes], masked_length: int = 0) -> str:
    """A version D key block of ``key`` (not wiped here) under the KBPK whose AES-CMAC is
    ``cmac``. The key data is padded as if the key had ``masked_length`` bytes (key-length
    obfuscation, X9.143 §6.4: give the longest key of the algorithm), then with
    ``random`` bytes to a multiple of 16 (at least one byte, as TR-31:2018 A.3 does).
    A header whose optional blocks do not end on a multiple of 16 is refused (add a
    ``PB`` block).
    """
    if header.version_id != VERSION_D:
        raise ValueError("keyload wraps version D key blocks only")
    n = len(key)
    masked = max(masked_length, n)
    pad = _BLOCK - (2 + masked) % _BLOCK + masked - n
    head_len = len(header.encode(0))
    if head_len % _BLOCK:
        raise ValueError("a version D header must be a multiple of 16 characters")
    total = head_len + 2 * (2 + n + pad) + 2 * MAC_LEN
    text = header.encode(total)
    clear = bytearray((8 * n).to_bytes(2, "big"))
    clear += key.buffer
    clear += random(pad)
    kbek = _derive(cmac, kbpk_length, b"\x00\x00")
    kbak = _derive(cmac, kbpk_length, b"\x00\x01")
    try:
        mac = aes_cmac_parts(kbak, text.encode("ascii"), clear)
        encrypted = _cbc(kbek, mac, clear, encrypt=True)
        return text + encrypted.hex().upper() + mac.hex().upper()
    finally:
        scrub(clear)
        scrub(kbek)
        scrub(kbak)


def key_facts(header: KeyBlockHeader, length: int, *,
              version: int | None) -> tuple[KeyType, KeyAttributes, int]:
    """What keyload records of a key that came in ``header`` with ``length`` bytes: its
    type (algorithm ``A``: AES by length; ``H`` with block HM = 21: HMAC-SHA256), its
    attributes, and its version (the header's two digits; ``version`` when the header
    says ``00``, none; a different ``version`` is refused). ValueError for what KLP1 cannot
    load (TDES and other algorithms) or a key component (version ``c…``).
    """
    if header.algorithm == "A":
        kt = {16: KeyType.AES128, 24: KeyType.AES192, 32: KeyType.AES256}.get(length)
        if kt is None:
            raise _bad(f"key block: an AES key of {length} bytes")
    elif header.algorithm == "H" and header.block(HMAC_SHA256_BLOCK[0]) == \
            HMAC_SHA256_BLOCK[1]:
        kt = KeyType.HMAC_SHA256
    elif header.algorithm in "TD":
        raise ValueError("the key block holds a TDES key: KLP1 has no TDES key type")
    else:
        raise ValueError(f"the key block holds an algorithm {header.algorithm!r} key: "
                         "keyload takes AES (A) and HMAC-SHA256 (H, block HM 21)")
    kt.check_length(length)
    attrs = KeyAttributes(header.usage, header.mode, header.exportability)
    text = header.version_num
    if text.startswith("c"):
        raise ValueError("the key block holds a key component, not a key")
    if text == "00":
        if version is None:
            raise ValueError("the key block carries no key version (00): give --key-version")
        return kt, attrs, version
    if not text.isdigit():
        raise ValueError(f"the key block's version {text!r} is not a number")
    if version is not None and version != int(text):
        raise ValueError(f"the key block says version {int(text)}, not {version}")
    return kt, attrs, int(text)


def header_for(key_type: KeyType, attrs: KeyAttributes, version: int) -> KeyBlockHeader:
    """A version D header for a key of ``key_type`` with ``attrs`` and ``version``
    (0 to 99: the header has two digits; 0 is written ``00``, no version)."""
    if not 0 <= version <= 99:
        raise ValueError(f"key version {version} does not fit a key block's two digits")
    # HM says the HMAC's hash; a version D header is a multiple of 16: PB pads it
    algorithm, blocks = ("A", ()) if key_type.is_aes else \
        ("H", (HMAC_SHA256_BLOCK, ("PB", "0" * 6)))
    return KeyBlockHeader(VERSION_D, attrs.usage, algorithm, attrs.mode, f"{version:02d}",
                          attrs.exportability, blocks)


def masked_length(key_type: KeyType) -> int:
    """The length X9.143 §6.4 recommends padding to: the algorithm's longest key."""
    return 32 if key_type.is_aes else HMAC_MAX
