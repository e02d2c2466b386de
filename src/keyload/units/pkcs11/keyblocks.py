"""What X9.143 key blocks (:mod:`keyload.station.keyblocks`) need of the token.

The KBPK (an application key of usage ``K1``) stays in the token: it is the one
application key made with ``CKA_SIGN``, and only for ``CKM_AES_CMAC``, by which the token
derives a block's KBEK and KBAK (X9.143 version D). PKCS#11 2.40 has no TR-31 mechanism,
so those two keys, the block's key data and the key itself are then in host memory: the
block is opened (or made) on the host, which the station allows only when asked
explicitly (``--open-in-host``). An imported key then enters the token as a key given by
value does; an exported one leaves it wrapped under an ephemeral session key and is
unwrapped on the host, as ``clear_sas`` does for TA'.
"""

from __future__ import annotations

from pkcs11 import Mechanism as CKM
from pkcs11 import exceptions as pkx

from ...core.secret import Secret, scrub
from .export import host_copy
from .index import TokenIndex
from .objects import scope, sign
from .session import token_error


class KeyBlocks(TokenIndex):
    """The KBPK's CMAC in the token, and a copy of an application key on the host."""

    def key_cmac(self, ref1: bytes, data: bytes) -> bytes:
        """AES-CMAC of ``data`` under application key ``ref1`` (a KBPK made since keys of
        usage K1 may SIGN; an older one is refused by the token)."""
        with self._lock:
            k = self._key(ref1)
            try:
                return sign(k.key, data, CKM.AES_CMAC)
            except pkx.PKCS11Error as e:
                raise token_error("compute the KBPK's CMAC (a KBPK imported before key "
                                  "blocks may not sign: import it again)", e) from e

    def application_key_copy(self, ref1: bytes) -> Secret:
        """Application key ``ref1`` in host memory (wipe it after use), by
        :func:`~keyload.units.pkcs11.export.host_copy`."""
        with self._lock:
            k = self._key(ref1)
            clear = b""
            try:
                with scope() as sc:
                    clear = host_copy(self.session, sc, k.key)
                return Secret(clear)
            except pkx.PKCS11Error as e:
                raise token_error("copy the key out wrapped", e) from e
            finally:
                scrub(clear)
