"""Stores at rest: sealed, atomic, mode 0600; bad passphrase or damage is a clear error and
the previous state stays readable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keyload.core.errors import DamagedStore, MemoryFailure, StoreError, WrongPassphrase
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.station.load import AuthorityClient, LoadFailed, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units import storage
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import KEYSTORE_FILE, SoftwareKeystore
from keyload.units.storage import KekSource, Vault
from keyload.units.unit import FileUnitStore, Slot, Unit

from .fixtures import slots_snapshot

ANY = ExportPolicy(None, None)
ATTRS = KeyAttributes("K0", "B", "E")


def _keystore(path: Path, src: KekSource) -> tuple[SoftwareKeystore, bytes, bytes]:
    ks = SoftwareKeystore.create(path, src)
    t = os.urandom(32)
    ks.add_set(Secret(t), "A")
    value = os.urandom(32)
    ks.add_key(b"K1", KeyType.AES256, Secret(value), ATTRS, version=1, diversify=False,
               policy=ANY)
    ks.set_signing_key()
    return ks, t, value


def test_keystore_round_trip(tmp_path: Path, kek_source: KekSource) -> None:
    ks, t, _ = _keystore(tmp_path / "a", kek_source)
    pub, sets, infos = ks.public_key(), ks.set_infos(), ks.key_infos()
    ks.close()
    again = SoftwareKeystore.open(tmp_path / "a", kek_source)
    assert again.public_key() == pub
    assert again.set_infos() == sets and again.key_infos() == infos
    assert again.transport_key_copy(sets[0].set_id).equals(t)


def test_secrets_never_in_clear_on_disk(tmp_path: Path, kek_source: KekSource) -> None:
    ks, t, value = _keystore(tmp_path / "a", kek_source)
    ks.close()
    for f in (tmp_path / "a").iterdir():
        blob = f.read_bytes()
        for secret in (t, value):
            assert secret not in blob and secret.hex().encode() not in blob
            assert secret.hex().upper().encode() not in blob
    assert (tmp_path / "a" / KEYSTORE_FILE).read_bytes().startswith(storage.MAGIC)


def test_file_modes(tmp_path: Path, kek_source: KekSource) -> None:
    ks, _, _ = _keystore(tmp_path / "a", kek_source)
    ks.close()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    for f in (tmp_path / "a").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def test_wrong_passphrase(tmp_path: Path, kek_source: KekSource) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    with pytest.raises(WrongPassphrase) as e:
        SoftwareKeystore.open(tmp_path / "a", KekSource(passphrase="wrong"))
    assert "wrong" in str(e.value) and kek_source.passphrase not in str(e.value)  # type: ignore[operator]


def test_missing_passphrase_is_a_clear_error(tmp_path: Path, kek_source: KekSource) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    with pytest.raises(StoreError, match="KEYLOAD_PASSPHRASE"):
        SoftwareKeystore.open(tmp_path / "a", KekSource())


def test_raw_kek_from_environment(tmp_path: Path) -> None:
    kek = os.urandom(32).hex()
    ks, _, _ = _keystore(tmp_path / "a", KekSource(kek_hex=kek))
    ks.close()
    assert SoftwareKeystore.open(tmp_path / "a", KekSource(kek_hex=kek)).key_infos()
    with pytest.raises(WrongPassphrase):
        SoftwareKeystore.open(tmp_path / "a", KekSource(kek_hex=os.urandom(32).hex()))
    with pytest.raises(ValueError, match="64 hex"):  # a malformed value: an input error
        SoftwareKeystore.open(tmp_path / "a", KekSource(kek_hex="abcd"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "swap-kind"])
def test_damaged_keystore(tmp_path: Path, kek_source: KekSource, damage: str) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    path = tmp_path / "a" / KEYSTORE_FILE
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        path.write_bytes(blob[:-5] + bytes([blob[-5] ^ 0x40]) + blob[-4:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    else:  # a sealed file of another kind put in its place
        vault = Vault.open(tmp_path / "a", kek_source)
        path.write_bytes(vault.seal("unit", b"{}"))
    with pytest.raises(DamagedStore):
        SoftwareKeystore.open(tmp_path / "a", kek_source)


def test_damaged_vault_file(tmp_path: Path, kek_source: KekSource) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    (tmp_path / "a" / "vault.json").write_text("{not json")
    with pytest.raises(DamagedStore):
        SoftwareKeystore.open(tmp_path / "a", kek_source)


def test_no_store(tmp_path: Path, kek_source: KekSource) -> None:
    with pytest.raises(StoreError, match="authority init"):
        SoftwareKeystore.open(tmp_path / "nothing", kek_source)


def test_create_refuses_to_overwrite(tmp_path: Path, kek_source: KekSource) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    with pytest.raises(StoreError):
        SoftwareKeystore.create(tmp_path / "a", kek_source)


def test_crash_between_temp_write_and_rename(tmp_path: Path, kek_source: KekSource,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ks, _, _ = _keystore(tmp_path / "a", kek_source)
    before = ks.key_infos()

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "simulated power failure before rename")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError):
        ks.add_key(b"K2", KeyType.AES128, Secret(os.urandom(16)), ATTRS, version=1,
                   diversify=False, policy=ANY)
    assert ks.key_infos() == before  # memory rolled back too
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    again = SoftwareKeystore.open(tmp_path / "a", kek_source)
    assert again.key_infos() == before


def test_crash_leaves_a_stale_temp_file_that_is_ignored(tmp_path: Path,
                                                        kek_source: KekSource) -> None:
    ks, _, _ = _keystore(tmp_path / "a", kek_source)
    ks.close()
    (tmp_path / "a" / f".{KEYSTORE_FILE}.999.tmp").write_bytes(b"half a file")
    assert SoftwareKeystore.open(tmp_path / "a", kek_source).key_infos()


# -- unit files ------------------------------------------------------------------------
def _unit_env(tmp_path: Path, src: KekSource) -> tuple[Authority, AuthorityClient, Vault, bytes]:
    ks = SoftwareKeystore.ephemeral()
    set_id = ks.generate_set("A").set_id
    ks.generate_key(b"K1", KeyType.AES256, ATTRS, version=1, diversify=False, policy=ANY)
    vault = Vault.create(tmp_path / "units", src)
    from keyload.units.unit import UnitState

    t = ks.transport_key_copy(set_id)
    FileUnitStore.create(vault, UnitState.new(b"SN1", t, {1: Slot(1, frozenset({3}))}))
    authority = Authority(ks)
    return authority, AuthorityClient(LocalConnection(authority)), vault, set_id


def test_unit_file_persists_loads(tmp_path: Path, kek_source: KekSource) -> None:
    _, client, vault, _ = _unit_env(tmp_path, kek_source)
    unit = Unit(FileUnitStore(vault, FileUnitStore.filename_for(b"SN1")))
    res = load_key(UnitClient(LocalConnection(unit)), client, b"K1", 1)
    reopened = Unit(FileUnitStore(Vault.open(tmp_path / "units", kek_source),
                                  FileUnitStore.filename_for(b"SN1")))
    assert reopened.state.slots[1].kcv == res.kcv
    assert slots_snapshot(reopened) == slots_snapshot(unit)


def test_unit_write_failure_is_6581_and_changes_nothing(
        tmp_path: Path, kek_source: KekSource, monkeypatch: pytest.MonkeyPatch) -> None:
    _, client, vault, _ = _unit_env(tmp_path, kek_source)
    name = FileUnitStore.filename_for(b"SN1")
    unit = Unit(FileUnitStore(vault, name))
    before_mem = slots_snapshot(unit)
    before_disk = (tmp_path / "units" / name).read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(LoadFailed) as e:
        load_key(UnitClient(LocalConnection(unit)), client, b"K1", 1)
    assert isinstance(e.value.cause, MemoryFailure) and e.value.sw == 0x6581
    monkeypatch.undo()
    assert slots_snapshot(unit) == before_mem
    assert (tmp_path / "units" / name).read_bytes() == before_disk
    # and the unit still works once the disk is back
    res = load_key(UnitClient(LocalConnection(unit)), client, b"K1", 1)
    assert unit.state.slots[1].kcv == res.kcv


def test_damaged_unit_file(tmp_path: Path, kek_source: KekSource) -> None:
    _, _, vault, _ = _unit_env(tmp_path, kek_source)
    path = tmp_path / "units" / FileUnitStore.filename_for(b"SN1")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DamagedStore):
        Unit(FileUnitStore(vault, path.name))


def test_kek_source_and_home_never_show_the_passphrase_or_kek(tmp_path: Path) -> None:
    from keyload.station.home import Home

    secret, kek = "correct horse battery staple", "a5" * 32
    src = KekSource(passphrase=secret, kek_hex=kek)
    home = Home(tmp_path, src)
    for text in (repr(src), str(src), repr(home), str(home), f"{[home]}"):
        assert secret not in text and kek not in text and "a5a5" not in text, text
    assert repr(src) == "KekSource(passphrase=<set>, kek=<set>, interactive=False)"
    assert repr(KekSource()) == "KekSource(passphrase=<unset>, kek=<unset>, interactive=False)"


@pytest.mark.parametrize("field, value", [
    ("n", 4194304), ("n", 3000), ("n", 2**9), ("r", 64), ("r", 0), ("p", 1000)])
def test_vault_scrypt_parameters_are_bounded(tmp_path: Path, kek_source: KekSource,
                                             field: str, value: int) -> None:
    """A vault.json asking scrypt for 4 GiB (or nonsense) is refused as damaged, naming the
    bounds, instead of a MemoryError (or minutes of work)."""
    import json

    _keystore(tmp_path / "a", kek_source)[0].close()
    path = tmp_path / "a" / storage.VAULT_FILE
    meta = json.loads(path.read_bytes())
    meta[field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(DamagedStore, match="out of bounds") as e:
        SoftwareKeystore.open(tmp_path / "a", kek_source)
    assert "2^20" in str(e.value)


def test_a_passphrase_that_is_not_utf8_is_an_input_error(tmp_path: Path,
                                                        kek_source: KekSource) -> None:
    _keystore(tmp_path / "a", kek_source)[0].close()
    bad = KekSource(passphrase=b"caf\xe9".decode("utf-8", "surrogateescape"))  # from os.environ
    with pytest.raises(ValueError, match="not valid UTF-8") as e:
        SoftwareKeystore.open(tmp_path / "a", bad)
    assert not isinstance(e.value, StoreError)
