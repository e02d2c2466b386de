"""The software keystore keeps the older versions of a REF1 given a new one: sealed with
it, read back, wiped on close, never exported; a failed save leaves the older current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType, aes_kcv
from keyload.core.secret import Secret
from keyload.units.authority import ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource

ANY = ExportPolicy(None, None)
K0 = KeyAttributes("K0", "B", "E")


def test_older_versions_are_kept_sealed_and_read_back(tmp_path: Path,
                                                      kek_source: KekSource) -> None:
    ks = SoftwareKeystore.create(tmp_path / "as", kek_source)
    values = [os.urandom(32) for _ in range(3)]
    for v, value in zip((1, 2, 5), values, strict=True):
        ks.add_key(b"ROT", KeyType.AES256, Secret(value), K0, version=v, diversify=False,
                   policy=ANY, replace=v > 1)
    with pytest.raises(ValueError, match="higher version"):
        ks.add_key(b"ROT", KeyType.AES256, Secret(os.urandom(32)), K0, version=5,
                   diversify=False, policy=ANY, replace=True)
    assert [(k.version, k.kcv) for k in ks.key_infos()] == [(5, aes_kcv(values[2]))]
    assert [(k.version, k.kcv) for k in ks.older_key_infos()] == \
        [(1, aes_kcv(values[0])), (2, aes_kcv(values[1]))]
    ks.close()
    again = SoftwareKeystore.open(tmp_path / "as", kek_source)
    try:
        assert [k.version for k in again.key_infos()] == [5]
        assert [k.version for k in again.older_key_infos()] == [1, 2]
        assert again.key_info(b"ROT").kcv == aes_kcv(values[2])
        copy = again.application_key_copy(b"ROT")  # what a key block exports: the newest
        assert bytes(copy.buffer) == values[2]
        copy.wipe()
    finally:
        again.close()
    assert again.older_key_infos() == []  # wiped and forgotten


def test_an_export_sends_the_current_version() -> None:
    ks = SoftwareKeystore.ephemeral()
    set_info = ks.generate_set("A")
    for v in (1, 2):
        ks.generate_key(b"ROT", KeyType.AES128, K0, version=v, diversify=False, policy=ANY,
                        replace=v > 1)
    out = ks.export(msg.ExportRequest(b"\x01" * 5, os.urandom(16), set_info.set_id, 0x01,
                                      b"ROT", 1))
    header = KeyHeader.decode(out.header)
    assert (out.kcv, header.version) == (ks.key_info(b"ROT").kcv, 2)


def test_a_failed_save_keeps_the_older_version_current(tmp_path: Path, kek_source: KekSource,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ks = SoftwareKeystore.create(tmp_path / "as", kek_source)
    first = ks.generate_key(b"ROT", KeyType.AES256, K0, version=1, diversify=False, policy=ANY)

    def refuse() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ks, "save", refuse)
    with pytest.raises(OSError, match="disk full"):
        ks.generate_key(b"ROT", KeyType.AES256, K0, version=2, diversify=False, policy=ANY,
                        replace=True)
    assert ks.key_infos() == [first] and ks.older_key_infos() == []
    ks.close()
