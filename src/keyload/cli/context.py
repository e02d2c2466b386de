"""How secrets are read at the terminal: one hex value, or a key in components."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable

from ..core.keys import aes_kcv
from ..core.secret import Secret


def read_secret_hex(prompt: str, *, length: int | None = None) -> Secret:
    """One hex value from the terminal (not echoed) or one line of stdin."""
    if sys.stdin.isatty():
        text = getpass.getpass(prompt)
    else:
        text = sys.stdin.readline()
        if not text:
            raise ValueError(f"no input for: {prompt.strip()}")
    text = text.strip().replace(" ", "")
    try:
        raw = bytearray.fromhex(text)
    except ValueError:
        raise ValueError("a key value must be hex digits") from None
    finally:
        text = ""
    if length is not None and len(raw) != length:
        n = len(raw)
        raw[:] = bytes(n)
        raise ValueError(f"expected {length} bytes, got {n}")
    s = Secret(raw)
    raw[:] = bytes(len(raw))
    return s


def read_components(count: int, length: int | None, *,
                    kcv_of: Callable[[bytearray], bytes] = aes_kcv,
                    show: bool | None = None) -> tuple[Secret, list[bytes]]:
    """XOR of ``count`` hex components, each shown with its KCV (a key ceremony).

    Refused (ValueError, nothing kept): a component equal to an earlier one (the same
    KCV: two equal components cancel out), and a combined key that is all zeros or
    equals one of its components (the others then cancel out)."""
    if count < 1:
        raise ValueError("at least one component")
    if show is None:  # at a terminal, each KCV right after its component is typed
        show = sys.stdin.isatty()
    total: Secret | None = None
    kcvs: list[bytes] = []
    for i in range(1, count + 1):
        c = read_secret_hex(f"component {i} of {count} (hex): ", length=length)
        if total is None:
            total = Secret(len(c))
        if len(c) != len(total):
            c.wipe()
            total.wipe()
            raise ValueError("components must have the same length")
        k = kcv_of(c.buffer)
        if k in kcvs:
            c.wipe()
            total.wipe()
            raise ValueError(f"component {i} is the same as component {kcvs.index(k) + 1} "
                             "(same KCV): equal components cancel out")
        kcvs.append(k)
        if show:
            sys.stderr.write(f"component {i} KCV: {k.hex().upper()}\n")
        for j in range(len(c)):
            total.buffer[j] ^= c.buffer[j]
        c.wipe()
    assert total is not None
    if count > 1:
        if not any(total.buffer):
            total.wipe()
            raise ValueError("the components combine to an all-zero key")
        if kcv_of(total.buffer) in kcvs:
            total.wipe()
            raise ValueError("the combined key equals one of its components (the others "
                             "cancel out)")
    return total, kcvs

