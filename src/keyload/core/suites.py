"""KLP1 suites (docs/protocol.md §4): the KDF each one uses.

- 0x01 KBKDF: SP 800-108r1 counter mode, PRF AES-CMAC, 8-bit counter before
  ``label || 0x00 || context || [L]_16``.
- 0x02 ECBDIV: ``h = SHA-256(label || 0x00 || context)[0:15]``, ``B_i = h || [i]_8``,
  output = leftmost L bits of AES-ECB_K(B_1 || … || B_n); runs in any PKCS#11 2.40 token
  with ``CKM_AES_ECB_ENCRYPT_DATA``.

Both use AES-KWP to wrap and AES-CMAC for CAS. A suite is a value, not a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import Unsupported
from .primitives import Buf, ecbdiv_into, kbkdf_klp1_into

KdfInto = Callable[[Buf, bytearray, bytes, bytes], None]

SUITE_KBKDF = 0x01
SUITE_ECBDIV = 0x02
PREFERENCE = (SUITE_KBKDF, SUITE_ECBDIV)  # the station's order (docs/protocol.md §5)


def _ecbdiv(key: Buf, out: bytearray, label: bytes, context: bytes) -> None:
    ecbdiv_into(key, out, label=label, context=context)


@dataclass(frozen=True, slots=True)
class Suite:
    id: int
    name: str
    kdf_into: KdfInto


SUITES: dict[int, Suite] = {
    SUITE_KBKDF: Suite(SUITE_KBKDF, "KBKDF", kbkdf_klp1_into),
    SUITE_ECBDIV: Suite(SUITE_ECBDIV, "ECBDIV", _ecbdiv),
}


def get_suite(suite_id: int) -> Suite:
    try:
        return SUITES[suite_id]
    except KeyError:
        raise Unsupported(f"suite {suite_id:#04x} not supported") from None

