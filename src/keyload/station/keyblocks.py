"""Application keys in and out as ANSI X9.143 (TR-31) key blocks, version D
(``keyload key import --tr31``, ``keyload key export --tr31``); the format is
:mod:`keyload.core.keyblock`.

The key block protection key (KBPK) is an application key of the authority with usage
``K1`` (X9.143: TR-31 key block protection key), AES, taken in by value or from components
like any other; its mode of use says what it may do: ``B`` both, ``D`` open blocks (import),
``E`` make them (export). A KBPK is an application key like any other for KLP1: a unit
receives it only where its export policy (``--sets``, ``--slots``) allows.

Where the work is done. The KBPK enters only as its AES-CMAC (``key_cmac``), by which
KBEK and KBAK are derived. The software authority holds every key in host memory anyway.
A PKCS#11 authority computes the CMAC in the token (the KBPK never leaves it), but
PKCS#11 has no TR-31 mechanism: KBEK, KBAK, the key data and the key are then in host
memory (an exported key leaves the token wrapped under an ephemeral key, see
:mod:`keyload.units.pkcs11.keyblocks`), so a token home refuses key blocks unless
``open_in_host`` says so explicitly (``--open-in-host``), as ``clear_sas`` does for a
symmetric SAS.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..core.keyblock import KBPK_USAGE, header_for, key_facts, masked_length, unwrap, wrap
from ..core.keys import KeyType
from ..core.ref1 import display_ref1
from ..units.authority import ExportPolicy, KeyInfo
from ..units.keystore import SoftwareKeystore, check_usage
from .admin import known_sets, new_version_of
from .home import Home, Keystore

_IMPORT_MODES, _EXPORT_MODES = "BD", "BE"
IN_HOST_REFUSED = ("this authority's keys are in a PKCS#11 token, which cannot open or make "
                   "a key block itself: the block would be opened in host memory (the KBPK "
                   "stays in the token); give --open-in-host to allow it")


def _open(home: Home, open_in_host: bool) -> Keystore:
    ks = home.open_keystore()
    if not isinstance(ks, SoftwareKeystore) and not open_in_host:
        ks.close()
        raise ValueError(IN_HOST_REFUSED)
    return ks


def _kbpk(ks: Keystore, ref1: bytes, modes: str) -> tuple[Callable[[bytes], bytes], int]:
    """The AES-CMAC of KBPK ``ref1`` and its length, once its usage, type and mode allow
    this use."""
    info = ks.key_info(ref1)
    if info.attrs.usage != KBPK_USAGE or not info.key_type.is_aes:
        raise ValueError(f"key {display_ref1(ref1)} is not a KBPK: an AES key of usage "
                         f"{KBPK_USAGE} protects key blocks")
    if info.attrs.mode not in modes:
        raise ValueError(f"KBPK {display_ref1(ref1)} has mode of use {info.attrs.mode}: "
                         f"{' or '.join(modes)} is needed here")
    return (lambda data: ks.key_cmac(ref1, data)), info.length


def import_key_block(home: Home, ref1: bytes, block: str, kbpk_ref1: bytes,
                     policy: ExportPolicy, *, version: int | None, diversify: bool,
                     label: str, open_in_host: bool = False) -> KeyInfo:
    """Take in the key of version D ``block`` under KBPK ``kbpk_ref1`` as application key
    ``ref1``: type, length, usage, mode, exportability and version from the header
    (``version`` when it says none). Refused, nothing stored: a wrong MAC
    (IntegrityError), a block that does not parse (MalformedData), a key KLP1 cannot load
    or a header keyload does not take (ValueError)."""
    ks = _open(home, open_in_host)
    try:
        known_sets(ks, policy)
        cmac, n = _kbpk(ks, kbpk_ref1, _IMPORT_MODES)
        header, key = unwrap(block.strip(), cmac=cmac, kbpk_length=n)
        try:
            kt, attrs, v = key_facts(header, len(key), version=version)
            check_usage(attrs.usage)
            return ks.add_key(ref1, kt, key, attrs, version=v, diversify=diversify,
                              policy=policy, label=label, origin="tr31",
                              replace=new_version_of(ks, ref1))
        except BaseException:
            key.wipe()
            raise
    finally:
        ks.close()


def export_key_block(home: Home, ref1: bytes, kbpk_ref1: bytes, *, open_in_host: bool = False,
                     random: Callable[[int], bytes] = os.urandom) -> tuple[KeyInfo, str]:
    """A version D key block of application key ``ref1`` under KBPK ``kbpk_ref1``, its
    header from the key's attributes, its key data padded to the algorithm's longest key
    (X9.143 §6.4). Refused (ValueError): exportability ``N``."""
    ks = _open(home, open_in_host)
    try:
        info = ks.key_info(ref1)
        if ref1 == kbpk_ref1:
            raise ValueError("a KBPK does not protect itself")
        if info.attrs.exportability == "N":
            raise ValueError(f"key {display_ref1(ref1)} is not exportable (exportability N)")
        header = header_for(info.key_type, info.attrs, info.version)
        cmac, n = _kbpk(ks, kbpk_ref1, _EXPORT_MODES)
        key = ks.application_key_copy(ref1)
        try:
            return info, wrap(header, key, cmac=cmac, kbpk_length=n, random=random,
                              masked_length=masked_length(KeyType(info.key_type)))
        finally:
            key.wipe()
    finally:
        ks.close()
