"""Key administration on any backend: the KeyAdministration Protocol, the one
validate_new_key both backends apply, and key components combined by XOR."""

from __future__ import annotations

import importlib.util
import inspect
import os
from functools import reduce

import pytest

from keyload.core.keys import KeyAttributes, KeyComponents, KeyType, aes_kcv, kcv
from keyload.core.secret import Secret
from keyload.units.authority import (
    ExportPolicy,
    KeyAdministration,
    validate_new_key,
    validate_new_set,
)
from keyload.units.keystore import SoftwareKeystore

ANY = ExportPolicy(None, None)
ENC = KeyAttributes("D0", "E", "E")


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(KeyAdministration, name))
            for name in dir(KeyAdministration)
            if not name.startswith("_") and callable(getattr(KeyAdministration, name))}


def _backends() -> list[type]:
    found: list[type] = [SoftwareKeystore]
    if importlib.util.find_spec("pkcs11") is not None:
        from keyload.units.pkcs11 import Pkcs11Keystore

        found.append(Pkcs11Keystore)
    return found


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.__name__)
def test_every_backend_offers_the_protocol(backend: type) -> None:
    methods = _protocol_methods()
    assert {"add_key", "generate_key", "add_set", "generate_set", "transport_key_copy",
            "set_signing_key", "key_infos", "set_infos", "export", "receipt"} <= set(methods)
    for name, want in methods.items():
        got = inspect.signature(getattr(backend, name))
        for p in want.parameters.values():
            assert p.name in got.parameters, f"{backend.__name__}.{name} lacks {p.name}"
            q = got.parameters[p.name]
            assert (q.kind, q.default) == (p.kind, p.default), f"{backend.__name__}.{name}"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ref1": b""}, "REF1 must be 1 to 32 bytes"),
    ({"ref1": bytes(33)}, "REF1 must be 1 to 32 bytes"),
    ({"length": 24}, "aes256 needs 32 bytes, got 24"),
    ({"key_type": KeyType.HMAC_SHA256, "length": 8}, "hmac-sha256 keys are 16 to 64 bytes"),
    ({"version": 0x10000}, "key version must be in 0..65535"),
    ({"version": -1}, "key version must be in 0..65535"),
    ({"key_type": KeyType.HMAC_SHA256, "diversify": True},
     "only AES keys can be diversified"),
    ({"key_type": KeyType.HMAC_SHA256}, "an HMAC key must have a MAC usage"),
])
def test_validate_new_key_refuses(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"ref1": b"K", "key_type": KeyType.AES256, "length": 32,
                               "attrs": ENC, "version": 1, "diversify": False, "old": None,
                               "replace": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        validate_new_key(**args)  # type: ignore[arg-type]


def test_software_keystore_applies_validate_new_key() -> None:
    ks = SoftwareKeystore.ephemeral()
    old = ks.add_key(b"K", KeyType.AES128, Secret(os.urandom(16)), ENC, version=3,
                     diversify=False, policy=ANY)
    validate_new_key(b"K", KeyType.AES128, 16, ENC, version=4, diversify=False, old=old,
                     replace=True)
    for replace, version, message in ((False, 4, "REF1 K already exists"),
                                      (True, 3, "a replacing key needs a higher version")):
        with pytest.raises(ValueError, match=message):
            validate_new_key(b"K", KeyType.AES128, 16, ENC, version=version, diversify=False,
                             old=old, replace=replace)
        with pytest.raises(ValueError, match=message):
            ks.add_key(b"K", KeyType.AES128, Secret(os.urandom(16)), ENC, version=version,
                       diversify=False, policy=ANY, replace=replace)
    with pytest.raises(ValueError, match="an HMAC key must have a MAC usage"):
        ks.generate_key(b"H", KeyType.HMAC_SHA256, ENC, version=1, diversify=False,
                        policy=ANY)
    assert [k.version for k in ks.key_infos()] == [3]


def test_validate_new_set_on_the_software_keystore() -> None:
    validate_new_set(32, signed=True, has_signer=True)
    with pytest.raises(ValueError, match=r"a transport key is AES-256 \(32 bytes\)"):
        validate_new_set(16, signed=False, has_signer=True)
    ks = SoftwareKeystore.ephemeral()
    with pytest.raises(ValueError, match=r"a transport key is AES-256 \(32 bytes\)"):
        ks.add_set(Secret(os.urandom(16)), "short")
    with pytest.raises(ValueError, match="a signed set needs the authority's signing key"):
        ks.generate_set("signed", signed=True)
    ks.set_signing_key()
    assert ks.generate_set("signed", signed=True).signed
    assert [s.name for s in ks.set_infos()] == ["signed"]


# -- components --------------------------------------------------------------------------
def test_components_xor_to_the_key_with_their_kcvs() -> None:
    parts = [os.urandom(32) for _ in range(3)]
    kc = KeyComponents(3, kcv_of=lambda b: kcv(KeyType.HMAC_SHA256, b))
    given = [Secret(p) for p in parts]
    shown = [kc.add(s) for s in given]
    key, kcvs = kc.combined()
    want = bytes(reduce(lambda a, b: bytes(x ^ y for x, y in zip(a, b, strict=True)), parts))
    assert bytes(key) == want
    assert shown == kcvs == [kcv(KeyType.HMAC_SHA256, p) for p in parts]
    assert all(s.wiped for s in given)


def test_one_component_is_the_key() -> None:
    kc = KeyComponents(1)
    value = os.urandom(16)
    assert kc.add(Secret(value)) == aes_kcv(value)
    assert bytes(kc.combined()[0]) == value


@pytest.mark.parametrize(("parts", "message"), [
    ([b"\x01" * 16, b"\x01" * 16], "component 2 is the same as component 1"),
    ([b"\x01" * 16, b"\x02" * 24], "components must have the same length"),
    ([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16], "the components combine to an all-zero key"),
    ([b"\x05" * 16, b"\x01" * 16, b"\x02" * 16, b"\x03" * 16],
     "the combined key equals one of its components"),
])
def test_components_refused(parts: list[bytes], message: str) -> None:
    kc = KeyComponents(len(parts))
    given = [Secret(p) for p in parts]
    with pytest.raises(ValueError, match=message):
        for s in given:
            kc.add(s)
        kc.combined()
    assert all(s.wiped for s in given[:len(kc.kcvs) + 1])


def test_components_counted() -> None:
    with pytest.raises(ValueError, match="at least one component"):
        KeyComponents(0)
    kc = KeyComponents(2)
    kc.add(Secret(os.urandom(16)))
    with pytest.raises(ValueError, match="2 components are needed, 1 given"):
        kc.combined()
