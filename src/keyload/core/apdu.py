"""ISO/IEC 7816-4 command and response APDUs, short and extended length.

``CommandAPDU.encode`` picks short form when the data fit in 255 bytes and Ne in 256,
extended form otherwise (docs/protocol.md §5). ``CommandAPDU.decode`` accepts all seven
cases (1, 2S, 3S, 4S, 2E, 3E, 4E) and raises :class:`WrongLength` (6700) on any
inconsistency.

>>> CommandAPDU(0x80, 0x10, 0, 0, b"", ne=256).encode().hex()
'8010000000'
>>> CommandAPDU.decode(bytes.fromhex("8010000000")).ne
256
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import SW, WrongLength, error_for_sw


def encode_command(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", ne: int = 0) -> bytes:
    """A C-APDU's bytes: short form when the data fit in 255 bytes and Ne in 256,
    extended form otherwise (what :meth:`CommandAPDU.encode` does, without the object)."""
    nc = len(data)
    head = bytes((cla, ins, p1, p2))
    if nc > 65535 or ne > 65536:
        raise ValueError("APDU too long")
    if nc <= 255 and ne <= 256:
        body = (bytes((nc,)) + data) if nc else b""
        if ne:
            body += bytes((ne & 0xFF,))
        return head + body
    # extended
    body = (b"\x00" + nc.to_bytes(2, "big") + data) if nc else b""
    if ne:
        le = (ne & 0xFFFF).to_bytes(2, "big")
        body += le if nc else b"\x00" + le
    return head + body


class CommandAPDU(NamedTuple):
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int = 0  # expected response length; 0 = no response data expected

    def encode(self) -> bytes:
        return encode_command(self.cla, self.ins, self.p1, self.p2, self.data, self.ne)

    @classmethod
    def decode(cls, apdu: bytes) -> CommandAPDU:
        n = len(apdu)
        if n < 4:
            raise WrongLength("APDU shorter than its header")
        cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
        body = apdu[4:]
        b = len(body)
        if b == 0:  # case 1
            return cls(cla, ins, p1, p2)
        if b == 1:  # case 2S
            return cls(cla, ins, p1, p2, ne=body[0] or 256)
        if body[0] != 0:  # short with data: case 3S or 4S
            nc = body[0]
            if b == 1 + nc:
                return cls(cla, ins, p1, p2, body[1:])
            if b == 2 + nc:
                return cls(cla, ins, p1, p2, body[1 : 1 + nc], ne=body[-1] or 256)
            raise WrongLength("Lc does not match the data")
        # extended: body[0] == 0 and b >= 2
        if b == 3:  # case 2E
            le = (body[1] << 8) | body[2]
            return cls(cla, ins, p1, p2, ne=le or 65536)
        if b < 3:
            raise WrongLength("truncated extended length")
        nc = (body[1] << 8) | body[2]
        if nc == 0:
            raise WrongLength("extended Lc of zero")
        if b == 3 + nc:  # case 3E
            return cls(cla, ins, p1, p2, body[3:])
        if b == 5 + nc:  # case 4E
            le = (body[-2] << 8) | body[-1]
            return cls(cla, ins, p1, p2, body[3 : 3 + nc], ne=le or 65536)
        raise WrongLength("extended Lc does not match the data")


class ResponseAPDU(NamedTuple):
    data: bytes
    sw: int

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def decode(cls, rapdu: bytes) -> ResponseAPDU:
        if len(rapdu) < 2:
            raise WrongLength("response shorter than a status word")
        return cls(rapdu[:-2], (rapdu[-2] << 8) | rapdu[-1])

    def check(self, context: str = "") -> bytes:
        """Return the data on 9000, else raise the typed error for the status word."""
        if self.sw != SW.SUCCESS:
            raise error_for_sw(self.sw, context)
        return self.data


def sw_bytes(sw: int) -> bytes:
    return sw.to_bytes(2, "big")
