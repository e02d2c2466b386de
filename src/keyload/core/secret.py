"""Secret bytes: a redacted, wipeable buffer.

A :class:`Secret` keeps key material in a ``bytearray`` so that it can be overwritten
with zeros (:meth:`Secret.wipe`) as soon as it is no longer needed (docs/protocol.md §7).
Its ``repr`` and ``str`` never show the value, and it refuses to be pickled, formatted
into text or compared with ``==`` (comparison is constant-time through :meth:`equals`).

What is and is not enforced: Python may have copied the value before it reached the
buffer (an immutable ``bytes`` returned by a library). :func:`scrub` overwrites such a
``bytes`` object in place as a best effort; interned or shared objects are never touched
(only buffers of 8 bytes or more, which CPython never shares).

>>> s = Secret(bytes(range(16)))
>>> s
Secret(<16 bytes redacted>)
>>> s.wipe(); bytes(s.buffer) == bytes(16)
True
"""

from __future__ import annotations

import ctypes
import hmac
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_BYTES_HEADER = sys.getsizeof(b"") - 1  # offset of ob_sval in a CPython bytes object


def scrub(data: bytes | bytearray | memoryview) -> None:
    """Overwrite ``data`` with zeros, in place, even when it is an immutable ``bytes``.

    Best effort for ``bytes`` on CPython: objects shorter than 8 bytes may be shared
    singletons and are left alone.
    """
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))
    elif isinstance(data, memoryview):
        if not data.readonly:
            data[:] = bytes(data.nbytes)
    elif isinstance(data, bytes) and len(data) >= 8 and sys.implementation.name == "cpython":
        ctypes.memset(id(data) + _BYTES_HEADER, 0, len(data))


class Secret:
    """Key material held in a wipeable buffer."""

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray | memoryview | int) -> None:
        if isinstance(value, int):
            self._buf = bytearray(value)
        else:
            self._buf = bytearray(value)

    @classmethod
    def take(cls, value: bytes) -> Secret:
        """Copy ``value`` into a new Secret, then scrub ``value`` itself."""
        s = cls(value)
        scrub(value)
        return s

    @classmethod
    def from_hex(cls, text: str, *, length: int | None = None) -> Secret:
        """A value typed in hex (spaces and the line end ignored), of ``length`` bytes when
        given. ValueError never shows the digits; the buffer read is wiped on every path.

        >>> Secret.from_hex("00 01 02\\n", length=3).buffer
        bytearray(b'\\x00\\x01\\x02')
        """
        try:
            raw = bytearray.fromhex(text.strip().replace(" ", ""))
        except ValueError:
            raise ValueError("a key value must be hex digits") from None
        try:
            if length is not None and len(raw) != length:
                raise ValueError(f"expected {length} bytes, got {len(raw)}")
            return cls(raw)
        finally:
            raw[:] = bytes(len(raw))

    @property
    def buffer(self) -> bytearray:
        """The live buffer (pass it to a primitive; never log it)."""
        return self._buf

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        """Overwrite the value with zeros (length is kept)."""
        n = len(self._buf)
        self._buf[:] = bytes(n)

    @property
    def wiped(self) -> bool:
        return not any(self._buf)

    def equals(self, other: Secret | bytes | bytearray) -> bool:
        """Constant-time comparison."""
        o = other._buf if isinstance(other, Secret) else other
        return hmac.compare_digest(self._buf, o)

    def hex(self) -> str:
        """The value in hex: only for sealed storage and operator-requested component output."""
        return self._buf.hex()

    def __bytes__(self) -> bytes:
        return bytes(self._buf)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._buf)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        raise TypeError("compare secrets with Secret.equals (constant time)")

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()


@contextmanager
def wiping(*secrets: Secret) -> Iterator[None]:
    """Wipe every secret when the block ends, whatever the outcome."""
    try:
        yield
    finally:
        for s in secrets:
            s.wipe()
