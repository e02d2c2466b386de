"""Known-answer tests of two token behaviours KLP1 relies on, run when a keystore opens.

Diversified AES-192: ECB derivation yields as many bytes as its data (whole blocks); TA'
of 24 bytes is derived from 32 bytes of data with ``CKA_VALUE_LEN`` 24, which SoftHSM
truncates to the leftmost 24 bytes (the KLP1 rule). The self-test checks this with a
fixed test key, through CMAC in the token; a token that does otherwise is refused AES-192
diversification.

Key lengths that are not a multiple of 8 (HMAC keys of 17–23, 25–31… bytes): SoftHSM
2.6.1's ``CKM_AES_KEY_WRAP_PAD`` zero-pads the key *before* wrapping and writes the padded
length in the RFC 5649 header, so a unit unwraps a longer key and refuses it (6982). The
self-test detects this; such keys are then refused at import and at export.
"""

from __future__ import annotations

from typing import NamedTuple

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import exceptions as pkx

from ...core.klp1 import LABEL_TA
from ...core.primitives import aes_cmac, aes_kwp_wrap, ct_equal, ecbdiv_blocks, ecbdiv_into
from .objects import TA_DIV_SESSION, derive, scope, secret_template, sign, wrap


class TokenBehaviour(NamedTuple):
    aes192_diversify: bool  # ECB derivation truncated to CKA_VALUE_LEN
    wrap_any_length: bool  # CKM_AES_KEY_WRAP_PAD is RFC 5649 for any key length


def self_test(session: pkcs11.Session) -> TokenBehaviour:
    """Run both known-answer tests on fixed test keys, as session objects destroyed after:

    - ECB derivation of 32 bytes of data with ``CKA_VALUE_LEN`` 24 keeps the leftmost
      24 bytes (diversified AES-192), checked through CMAC in the token;
    - ``CKM_AES_KEY_WRAP_PAD`` of a 20-byte key is RFC 5649 (SoftHSM 2.6.1 is not: it
      zero-pads the key first and writes the padded length in the header).
    """
    div_key, kek, odd = bytes(range(24)), bytes(range(32, 64)), bytes(range(64, 84))
    want = bytearray(24)
    ecbdiv_into(div_key, want, label=LABEL_TA, context=b"\x03KAT")
    with scope() as sc:
        try:
            base = sc.keep(session.create_object(
                {**secret_template(CKK.AES, token=False, extractable=False,
                                   allow=(A.DERIVE,)), A.VALUE: div_key}))
            d = sc.keep(derive(base, ecbdiv_blocks(LABEL_TA, b"\x03KAT", 2), TA_DIV_SESSION,
                               192))
            div_ok = ct_equal(sign(d, bytes(16), CKM.AES_CMAC), aes_cmac(want, bytes(16)))
        except pkx.PKCS11Error:
            div_ok = False
        try:
            k = sc.keep(session.create_object(
                {**secret_template(CKK.AES, token=False, extractable=False,
                                   allow=(A.WRAP,)), A.VALUE: kek}))
            o = sc.keep(session.create_object(
                {**secret_template(CKK.GENERIC_SECRET, token=False, extractable=True),
                 A.VALUE: odd}))
            wrap_ok = wrap(k, o) == aes_kwp_wrap(kek, odd)
        except pkx.PKCS11Error:
            wrap_ok = False
    return TokenBehaviour(div_ok, wrap_ok)
