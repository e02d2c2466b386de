"""ISO/IEC 7816-4 wrappers stacked around any :class:`~keyload.transports.Connection`.

Transport-independent: they speak only C-APDUs and R-APDUs, so they serve a PC/SC reader
(:class:`~keyload.transports.pcsc.PcscConnection` stacks them) as well as any other
connection to a card that answers the T=0 way or takes only short APDUs.

- :class:`GetResponse`: ``61xx`` is followed by GET RESPONSE (``00 C0 00 00 xx``) until
  all response data are in; ``6Cxx`` (wrong Le) resends the same command once with
  Le = xx. Both are how a T=0 card returns data; a T=1 card rarely uses them.
- :class:`CommandChaining`: a command whose data exceed 255 bytes (or Ne 256) is cut
  into short APDUs with CLA bit ``0x10`` on all pieces but the last (§5.3.3).

Status words are not checked here (that is :meth:`keyload.core.apdu.ResponseAPDU.check`'s
job): an answer that is not part of the exchange's mechanics is returned as it is.
"""

from __future__ import annotations

from ..core.apdu import CommandAPDU
from ..core.errors import TransportError, WrongLength
from . import Connection


def is_long(apdu: bytes) -> bool:
    """Extended-length encoding (the only way to carry > 255 bytes or Ne > 256).

    >>> is_long(bytes.fromhex("80140000") + bytes((0, 1, 0x2C)) + bytes(300))
    True
    >>> is_long(bytes.fromhex("8016000100"))
    False
    """
    return len(apdu) >= 7 and apdu[4] == 0


def _with_le(apdu: bytes, ne: int) -> bytes | None:
    try:
        cmd = CommandAPDU.decode(apdu)
    except WrongLength:
        return None
    return CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, ne=ne).encode()


class GetResponse:
    """61xx: GET RESPONSE until the data are complete; 6Cxx: resend once with Le = xx."""

    MAX_ROUNDS = 256  # 256 x 256 bytes: more than any extended response

    def __init__(self, inner: Connection) -> None:
        self.inner = inner

    def transmit(self, apdu: bytes) -> bytes:
        r = self.inner.transmit(apdu)
        if len(r) == 2 and r[0] == 0x6C:
            fixed = _with_le(apdu, r[1] or 256)
            if fixed is not None:
                r = self.inner.transmit(fixed)
        if len(r) < 2 or r[-2] != 0x61:
            return r
        data = bytearray()
        cla = apdu[0] & 0x03 if (apdu[0] & 0x60) == 0 else 0x00  # keep the logical channel
        for _ in range(self.MAX_ROUNDS):
            data += r[:-2]
            le = r[-1]
            r = self.inner.transmit(bytes((cla, 0xC0, 0x00, 0x00, le)))
            if len(r) == 2 and r[0] == 0x6C:
                r = self.inner.transmit(bytes((cla, 0xC0, 0x00, 0x00, r[1])))
            if len(r) < 2 or r[-2] != 0x61:
                return bytes(data) + r
        raise TransportError("the card keeps announcing more response data (61xx)")


class CommandChaining:
    """Sends a long command as a chain of short ones (ISO/IEC 7816-4 §5.3.3): all pieces
    but the last carry CLA bit 0x10 and no Le; a piece not answered 9000 ends the chain
    and its answer is returned. Short commands pass unchanged."""

    PIECE = 255

    def __init__(self, inner: Connection) -> None:
        self.inner = inner

    def transmit(self, apdu: bytes) -> bytes:
        if not is_long(apdu):
            return self.inner.transmit(apdu)
        try:
            cmd = CommandAPDU.decode(apdu)
        except WrongLength:
            raise ValueError("malformed extended C-APDU") from None
        if (cmd.cla & 0x60) != 0:
            raise TransportError(f"CLA {cmd.cla:02X} has no chaining bit")
        data = cmd.data
        pieces = [data[i:i + self.PIECE] for i in range(0, len(data), self.PIECE)] or [b""]
        for piece in pieces[:-1]:
            r = self.inner.transmit(CommandAPDU(cmd.cla | 0x10, cmd.ins, cmd.p1, cmd.p2,
                                                piece).encode())
            if r[-2:] != b"\x90\x00":
                return r
        return self.inner.transmit(CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, pieces[-1],
                                               ne=min(cmd.ne, 256)).encode())


__all__ = ["CommandChaining", "GetResponse", "is_long"]
