"""REF1 as text (docs/protocol.md §1): how keyload shows and reads the name of an
application key. REF1 itself is 1 to 32 bytes (:func:`keyload.core.messages.check_ref1`).

>>> display_ref1(b"PIN-KEY"), display_ref1(b"\\x31\\x00")
('PIN-KEY', '0x3100')
>>> parse_ref1("0x3100") == b"1\\x00", parse_ref1("PIN-KEY")
(True, b'PIN-KEY')
"""

from __future__ import annotations

from .messages import check_ref1


def display_ref1(ref1: bytes) -> str:
    """REF1 as text when it is printable ASCII, else ``0x…``."""
    if ref1.isascii() and all(0x21 <= c < 0x7F for c in ref1) and not ref1.startswith(b"0x"):
        return ref1.decode()
    return "0x" + ref1.hex()


def parse_ref1(text: str) -> bytes:
    """``0x3175`` is hex; anything else is its ASCII bytes."""
    if text.startswith("0x"):
        try:
            raw = bytes.fromhex(text[2:])
        except ValueError:
            raise ValueError(f"bad hex REF1 {text!r}") from None
        return check_ref1(raw)
    if not text.isascii():
        raise ValueError("REF1 must be ASCII or 0x-hex")
    return check_ref1(text.encode())
