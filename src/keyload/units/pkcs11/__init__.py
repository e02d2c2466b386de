"""The authority's keys in a PKCS#11 token: :class:`Pkcs11Keystore` (module
:mod:`~keyload.units.pkcs11.keystore`) and what its callers name."""

from .keystore import Pkcs11Keystore
from .objects import ID_KEY, ID_SAS, ID_T, secret_template
from .session import PIN_ENV, NoPin, Pkcs11Error, WrongPin, reinitialize

__all__ = [
    "ID_KEY",
    "ID_SAS",
    "ID_T",
    "PIN_ENV",
    "NoPin",
    "Pkcs11Error",
    "Pkcs11Keystore",
    "WrongPin",
    "reinitialize",
    "secret_template",
]
