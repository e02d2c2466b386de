"""How secrets are read at the terminal: one hex value, or a key in components."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable

from ..core.keys import KeyComponents, aes_kcv
from ..core.secret import Secret


def read_secret_hex(prompt: str, *, length: int | None = None) -> Secret:
    """One hex value from the terminal (not echoed) or one line of stdin."""
    if sys.stdin.isatty():
        text = getpass.getpass(prompt)
    else:
        text = sys.stdin.readline()
        if not text:
            raise ValueError(f"no input for: {prompt.strip()}")
    return Secret.from_hex(text, length=length)


def read_components(count: int, length: int | None, *,
                    kcv_of: Callable[[bytearray], bytes] = aes_kcv) -> tuple[Secret, list[bytes]]:
    """XOR of ``count`` hex components read here, each shown with its KCV (a key ceremony);
    what is refused is :class:`~keyload.core.keys.KeyComponents`'s to say."""
    components = KeyComponents(count, kcv_of=kcv_of)
    show = sys.stdin.isatty()  # at a terminal, each KCV right after its component is typed
    for i in range(1, count + 1):
        k = components.add(read_secret_hex(f"component {i} of {count} (hex): ", length=length))
        if show:
            sys.stderr.write(f"component {i} KCV: {k.hex().upper()}\n")
    return components.combined()

