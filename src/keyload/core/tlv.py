"""BER-TLV with one-byte tags, as KLP1 uses it (docs/protocol.md §5).

A length is one byte below 0x80, else ``81 xx`` (0x80–0xFF) or ``82 xx xx``
(0x100–0xFFFF). Decoding is strict: only the shortest length form is accepted, every
expected tag appears exactly once and in the given order, and nothing may follow the
last one. Any deviation raises :class:`~keyload.core.errors.MalformedData` (6A80).

>>> encode([(0xC7, b"\\x01"), (0xCE, b"\\x00")]).hex()
'c70101ce0100'
>>> decode(bytes.fromhex("c70101ce0100"), (0xC7, 0xCE))
[b'\\x01', b'\\x00']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import MalformedData


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return bytes((0x82, n >> 8, n & 0xFF))
    raise ValueError("TLV value longer than 65535 bytes")


def tlv(tag: int, value: bytes) -> bytes:
    """One TLV: tag, length, value."""
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    return bytes((tag,)) + encode_length(n) + value


def encode(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join([tlv(t, v) for t, v in items])


def iter_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """Split ``data`` into (tag, value) pairs; strict lengths, no order check."""
    out: list[tuple[int, bytes]] = []
    i, n = 0, len(data)
    while i < n:
        if i + 2 > n:
            raise MalformedData("truncated TLV")
        tag = data[i]
        ln = data[i + 1]
        i += 2
        if ln >= 0x80:
            if ln == 0x81:
                if i + 1 > n:
                    raise MalformedData("truncated TLV length")
                ln = data[i]
                i += 1
                if ln < 0x80:
                    raise MalformedData("non-minimal TLV length")
            elif ln == 0x82:
                if i + 2 > n:
                    raise MalformedData("truncated TLV length")
                ln = (data[i] << 8) | data[i + 1]
                i += 2
                if ln < 0x100:
                    raise MalformedData("non-minimal TLV length")
            else:
                raise MalformedData("unsupported TLV length form")
        end = i + ln
        if end > n:
            raise MalformedData("TLV value runs past the data")
        out.append((tag, data[i:end]))
        i = end
    return out


def decode(data: bytes, tags: Sequence[int]) -> list[bytes]:
    """Values of exactly ``tags``, in that order, each once, nothing else."""
    # fast path: well-formed data with one-byte lengths; anything else takes the
    # strict path below, which gives the exact error
    values: list[bytes] = []
    i, n = 0, len(data)
    for want in tags:
        if i + 2 > n or data[i] != want or data[i + 1] >= 0x80:
            return _decode_strict(data, tags)
        end = i + 2 + data[i + 1]
        if end > n:
            return _decode_strict(data, tags)
        values.append(data[i + 2:end])
        i = end
    if i != n:
        return _decode_strict(data, tags)
    return values


def _decode_strict(data: bytes, tags: Sequence[int]) -> list[bytes]:
    return values_of(iter_tlv(data), tags)


def values_of(items: Sequence[tuple[int, bytes]], tags: Sequence[int]) -> list[bytes]:
    """The values of ``items`` (from :func:`iter_tlv`) when their tags are exactly ``tags``,
    in that order, else MalformedData: :func:`decode` for data already split."""
    if len(items) != len(tags):
        raise MalformedData("unexpected number of TLV objects")
    values: list[bytes] = []
    for (tag, value), want in zip(items, tags, strict=True):
        if tag != want:
            raise MalformedData(f"expected tag {want:02X}, got {tag:02X}")
        values.append(value)
    return values
