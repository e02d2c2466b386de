"""KLP1 values as an operator writes them (``keyload`` flags): hex, an SN, set ids, REF2
lists. Each reader gives the value or raises ``ValueError`` naming what is wrong (a
caller mistake, never 6A80). REF1 as text is :mod:`keyload.core.ref1`.

>>> parse_hex("0x7b568eb721", "set id").hex(), parse_sn("0a0b").hex()
('7b568eb721', '0a0b')
>>> sorted(parse_ranges("1,2,10-12", "--slots")), parse_ranges("any", "--slots")
([1, 2, 10, 11, 12], None)
>>> sorted(s.hex() for s in parse_sets("7b568eb721, 0102030405"))
['0102030405', '7b568eb721']
>>> parse_load("TMK-A:1"), {k.hex(): q.hex() for k, q in parse_trust(["0a0b0c0d0e=04aa"]).items()}
((b'TMK-A', 1), {'0a0b0c0d0e': '04aa'})
"""

from __future__ import annotations

from .messages import check_ref2, check_sn
from .ref1 import parse_ref1

ANY = "any"


def parse_hex(text: str, what: str) -> bytes:
    """Hex digits, ``0x`` optional; ``what`` names the value in the error."""
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ValueError(f"{what} must be hex, got {text!r}") from None


def parse_sn(text: str) -> bytes:
    """A unit's SN in hex: 1 to 32 bytes."""
    return check_sn(parse_hex(text, "SN"))


def parse_ranges(text: str, what: str) -> frozenset[int] | None:
    """``any`` -> None; ``1,2,10-12`` -> {1, 2, 10, 11, 12}, each in 1..254."""
    if text.strip().lower() == ANY:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number or range") from None
    for x in out:
        check_ref2(x)
    if not out:
        raise ValueError(f"{what}: empty list")
    return frozenset(out)


def parse_sets(text: str) -> frozenset[bytes] | None:
    """``any`` -> None; else set ids (5 bytes in hex each), comma separated."""
    if text.strip().lower() == ANY:
        return None
    sets = frozenset(parse_hex(x.strip(), "set id") for x in text.split(",") if x.strip())
    if not sets or any(len(s) != 5 for s in sets):
        raise ValueError("set ids are 5 bytes (10 hex digits), comma separated, or 'any'")
    return sets


def parse_load(text: str) -> tuple[bytes, int]:
    """``REF1:REF2`` (``--load``): a key and the slot it goes to, REF2 in 1..254."""
    ref1, sep, ref2 = text.rpartition(":")
    if not sep:
        raise ValueError(f"--load {text!r}: expected REF1:REF2")
    try:
        r2 = int(ref2)
    except ValueError:
        raise ValueError(f"--load {text!r}: REF2 must be a number") from None
    if not 1 <= r2 <= 254:
        raise ValueError(f"--load {text!r}: REF2 must be in 1..254")
    return parse_ref1(ref1), r2


def parse_trust(values: list[str]) -> dict[bytes, bytes]:
    """``--ca SETID=Q_CA`` (hex, repeatable): the Q_CA an auditor trusts for each set."""
    out: dict[bytes, bytes] = {}
    for v in values:
        set_id, sep, q_ca = v.partition("=")
        try:
            if not sep:
                raise ValueError
            out[bytes.fromhex(set_id)] = bytes.fromhex(q_ca)
        except ValueError:
            raise ValueError(f"--ca {v[:24]!r}: expected SETID=Q_CA, both hex") from None
    return out


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` things as text says them: thousands separated, the noun plural unless one.

    >>> counted(1, "unit"), counted(1200, "unit"), counted(0, "entry", "entries")
    ('1 unit', '1,200 units', '0 entries')
    """
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
