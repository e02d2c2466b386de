"""Erasure in suite 0x03 (docs/protocol.md §10.3, "Erasure"): what a download derives —
e_U, e_A, Z, T1, Kenc, Kmac, Ksas and TA' — never reaches a store, a record, an output or a
log, so that a past download stays closed even to someone who later holds every long-term
key (d_CA, d_A, d_U) and everything keyload wrote.

The downloads run in this process, through the CLI (``keyload demo --suite 3``: a campaign,
and ``keyload load``: a single load), with the derivation primitives instrumented so that
the test sees the volatile values (the test holds them; the records must not). Captured:
every file under the home (the authority, the units' stores, journal.db, station.db,
audit.db, exports.db, and their SQLite side files), every row of every SQLite table,
stdout and stderr, every log record at DEBUG, and the APDU transcript of every connection
(what a station, or someone on the wire, saw).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyload.cli.main import main
from keyload.core import ecc, klp1, primitives, suite3
from keyload.core.aids import INS_IMPORT, INS_INIT
from keyload.core.apdu import CommandAPDU
from keyload.core.ecc import ORDER, SCALAR_LEN, load_point
from keyload.core.errors import KeyloadError
from keyload.core.klp1 import KENC, KMAC, KSAS, derive_session
from keyload.core.messages3 import ImportData3, InitResponse3
from keyload.core.primitives import aes_kwp_unwrap, ecbdiv_into
from keyload.core.suites import SUITE_ECBDIV, SUITES
from keyload.station.fleet import EmulatedFleet
from keyload.station.home import Home
from keyload.transports.local import LocalConnection
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import ENV_PASSPHRASE, KekSource

pytestmark = pytest.mark.slow  # the demo, a load and the searches: about 15 s

PASSPHRASE = "erasure-test passphrase"
UNITS = 2


@dataclass
class Seen:
    """What the instrumented primitives returned, by name (the test's own copies)."""

    values: dict[str, list[bytes]] = field(default_factory=dict)
    transcript: list[tuple[int, bytes, bytes]] = field(default_factory=list)

    def add(self, name: str, value: bytes | bytearray | memoryview) -> None:
        # a copy: the code under test scrubs even its ``bytes`` objects in place
        self.values.setdefault(name, []).append(bytes(bytearray(value)))

    def secrets(self) -> Iterator[tuple[str, bytes]]:
        for name, vs in self.values.items():
            for v in vs:
                yield name, v


def _instrument(monkeypatch: pytest.MonkeyPatch, seen: Seen) -> None:
    """Record what suite 0x03's derivations produce, as they produce it (the names are the
    ones :mod:`keyload.core.suite3` calls)."""
    ecdh, ecbdiv, session, diversify, unwrap = (ecc.ecdh_into, primitives.ecbdiv_into,
                                                klp1.derive_session, klp1.diversify_into,
                                                primitives.aes_kwp_unwrap)

    def ecdh_into(scalar: Any, peer: bytes, out: bytearray) -> bytes:
        own = ecdh(scalar, peer, out)
        seen.add("e (e_A or e_U)", scalar)
        seen.add("Z", out)
        return own

    def ecbdiv_into(key: Any, out: bytearray, *, label: bytes, context: bytes) -> None:
        ecbdiv(key, out, label=label, context=context)
        seen.add("T1", out)

    def derive_session(suite: Any, t1: Any, sn: bytes, r: bytes, ref2: int,
                       out: bytearray) -> None:
        session(suite, t1, sn, r, ref2, out)
        for name, part in (("Kenc", KENC), ("Kmac", KMAC), ("Ksas", KSAS)):
            seen.add(name, out[part])

    def diversify_into(suite: Any, ta: Any, sn: bytes, out: bytearray) -> None:
        diversify(suite, ta, sn, out)
        seen.add("TA'", out)

    def aes_kwp_unwrap(kek: Any, wrapped: Any) -> bytes:
        ta = unwrap(kek, wrapped)
        seen.add("TA'", ta)
        return ta

    for name, fn in (("ecdh_into", ecdh_into), ("ecbdiv_into", ecbdiv_into),
                     ("derive_session", derive_session), ("diversify_into", diversify_into),
                     ("aes_kwp_unwrap", aes_kwp_unwrap)):
        monkeypatch.setattr(suite3, name, fn)
    transmit = LocalConnection.transmit

    def recorded(self: LocalConnection, apdu: bytes) -> bytes:
        answer = transmit(self, apdu)
        seen.transcript.append((id(self), apdu, answer))
        return answer

    monkeypatch.setattr(LocalConnection, "transmit", recorded)


def _sqlite_dump(path: Path) -> bytes:
    """Every row of every table, as text (bytes columns in hex too)."""
    out: list[str] = []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = "
                                            "'table'")]
        for t in tables:
            for row in con.execute(f'SELECT * FROM "{t}"'):  # noqa: S608 (the DB's own names)
                out.append(repr(row))
                out += [v.hex() for v in row if isinstance(v, bytes)]
    finally:
        con.close()
    return "\n".join(out).encode()


@dataclass
class Captured:
    home: Path
    seen: Seen
    files: dict[str, bytes]
    dumps: dict[str, bytes]
    text: str  # stdout, stderr and every log record

    def everything(self) -> list[tuple[str, bytes]]:
        return [*self.files.items(), *((f"rows of {k}", v) for k, v in self.dumps.items()),
                ("stdout, stderr and logs", self.text.encode())]


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    mp = pytest.MonkeyPatch()
    seen = Seen()
    home = tmp_path_factory.mktemp("erasure") / "work"
    log_lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log_lines.append(f"{record.name} {record.levelname} {record.getMessage()} "
                             f"{record.args!r} {record.exc_text or ''}")

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    out: list[str] = []
    try:
        mp.setenv(ENV_PASSPHRASE, PASSPHRASE)
        mp.delenv("KEYLOAD_KEK", raising=False)
        _instrument(mp, seen)
        import contextlib
        import io

        def cli(*args: str) -> int:
            buf_out, buf_err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                rc = main([*args])
            out.append(buf_out.getvalue() + buf_err.getvalue())
            return rc

        assert cli("demo", "--units", str(UNITS), "--suite", "3", "--workdir", str(home),
                   "--quiet") == 0, out
        assert out[-1].rstrip().endswith(f"customized {UNITS} of {UNITS} units, 0 failed")
        # a single load too (station.db): a third key into slot 3 of the first unit
        ks = SoftwareKeystore.open(home / "authority", KekSource(passphrase=PASSPHRASE))
        try:
            (ident,) = [s for s in ks.set_infos() if s.identity]
            assert cli("key", "generate", "--ref1", "TMK-C", "--type", "aes256",
                       "--usage", "K0", "--mode", "B", "--exportability", "E", "--key-version", "1",
                       "--sets", ident.set_id.hex(), "--slots", "3", "--diversify",
                       "--home", str(home)) == 0, out[-1]
        finally:
            ks.close()
        sn1 = (b"KL" + (1).to_bytes(6, "big")).hex()
        assert cli("load", "--sn", sn1, "--ref1", "TMK-C", "--ref2", "3",
                   "--home", str(home)) == 0, out[-1]
        assert cli("receipts", "--home", str(home)) == 0, out[-1]
        assert cli("unit", "status", "--sn", sn1, "--home", str(home)) == 0, out[-1]
        logging.getLogger("keyload.station").debug("capture check")  # the handler hears it
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        mp.undo()
    files = {str(p.relative_to(home)): p.read_bytes()
             for p in sorted(home.rglob("*")) if p.is_file()}
    dumps = {name: _sqlite_dump(home / name) for name in files if name.endswith(".db")}
    assert {"journal.db", "station.db", "audit.db", "authority/exports.db"} <= set(dumps)
    yield Captured(home, seen, files, dumps, "\n".join(out + log_lines))


def test_the_instrumentation_saw_every_download(captured: Captured) -> None:
    """2 units x 2 keys by the campaign and one single load: 5 downloads, each deriving
    on both sides (Z twice), each TA' seen."""
    v = captured.seen.values
    assert len(v["Z"]) == 2 * (2 * UNITS + 1)
    assert len(v["e (e_A or e_U)"]) == 2 * (2 * UNITS + 1)
    assert len(v["Kenc"]) == len(v["Kmac"]) == len(v["T1"]) == 2 * (2 * UNITS + 1)
    assert len(_downloads(captured)) == 2 * UNITS + 1


def _forms(value: bytes) -> list[bytes]:
    return [value, value.hex().encode(), value.hex().upper().encode()]


def test_no_volatile_value_is_in_any_record(captured: Captured) -> None:
    """e_U, e_A, Z, T1, Kenc, Kmac, Ksas and TA' appear nowhere keyload wrote: not in a file
    (raw, or in hex), not in a database row, not in the output, not in a log record."""
    places = captured.everything()
    assert sum(len(b) for _, b in places) > 10_000
    for name, secret in captured.seen.secrets():
        assert any(secret), f"{name} seen all zero"
        for where, data in places:
            for form in _forms(secret):
                assert form not in data, f"{name} found in {where}"


def test_the_capture_holds_the_downloads_records(captured: Captured) -> None:
    """The control: what a download may leave is found where it is kept (its E_A in the
    export records, its R in the journal or station.db, its receipt in the output of
    nothing but the records), so the searches above look where records are."""
    assert "keyload.station DEBUG capture check" in captured.text
    for d in _downloads(captured):
        assert d.data.e_a.hex().encode() in captured.dumps["authority/exports.db"]
        assert any(d.r.hex().encode() in captured.dumps[db]
                   for db in ("journal.db", "station.db"))


def test_no_volatile_value_is_in_the_transcript(captured: Captured) -> None:
    wire = b"".join(a + r for _, a, r in captured.seen.transcript)
    for name, secret in captured.seen.secrets():
        if name == "TA'":
            continue  # W is TA' wrapped; a key an IMPORTKEY did not unwrap is not TA'
        assert secret not in wire, f"{name} on the wire"


# -- with every long-term key disclosed --------------------------------------------------------
@dataclass(frozen=True)
class Download:
    """One download as a transcript shows it."""

    sn: bytes
    r: bytes
    e_u: bytes
    data: ImportData3

    @property
    def material(self) -> bytes:
        return b"".join((self.sn, self.r, self.e_u, self.data.encode()))


def _downloads(captured: Captured) -> list[Download]:
    """Each unit's INITIALIZE DOWNLOAD answer paired with the IMPORTKEY that followed it
    on the same connection."""
    last: dict[int, InitResponse3] = {}
    out: list[Download] = []
    for conn, apdu, answer in captured.seen.transcript:
        if answer[-2:] != b"\x90\x00" or len(apdu) < 2:
            continue
        if apdu[1] == INS_INIT and apdu[0] == 0x80:
            last[conn] = InitResponse3.decode(answer[:-2])
        elif apdu[1] == INS_IMPORT and conn in last:
            init = last.pop(conn)
            out.append(Download(init.sn, init.r, init.e_u,
                                ImportData3.decode(CommandAPDU.decode(apdu).data)))
    return out


def _disclosed(captured: Captured) -> dict[str, bytes]:
    """d_CA and d_A from the sealed keystore, each unit's d_U from its sealed store, all
    opened with the passphrase (what someone who later seizes the home and learns the
    passphrase holds)."""
    source = KekSource(passphrase=PASSPHRASE)
    out: dict[str, bytes] = {}
    ks = SoftwareKeystore.open(captured.home / "authority", source)
    try:
        for set_id, ident in ks._identities.items():
            out[f"d_CA {set_id.hex()}"] = bytes(ident.ca_value.buffer)
            out[f"d_A {set_id.hex()}"] = bytes(ident.authority_value.buffer)
    finally:
        ks.close()
    fleet = EmulatedFleet.open(Home(captured.home, source).units_dir, source)
    try:
        for sn in fleet.serials():
            unit = fleet.open_unit(sn)
            try:
                assert unit.state.unit_key is not None
                out[f"d_U {sn.hex()}"] = bytes(unit.state.unit_key.buffer)
            finally:
                unit.close()
    finally:
        fleet.close()
    assert len(out) == 2 + UNITS
    return out


def _ecdh(scalar: bytes, point: bytes) -> bytes | None:
    if not 1 <= int.from_bytes(scalar, "big") < ORDER:
        return None
    z = bytearray(32)
    ecc.ecdh_into(scalar, point, z)
    return bytes(z)


def _kenc_from(z: bytes | None, t1: bytes | None, d: Download) -> bytes:
    """Kenc as §10.3 derives it, from Z (through T1) or from T1."""
    if t1 is None:
        assert z is not None
        t1b = bytearray(32)
        ecbdiv_into(z, t1b, label=klp1.LABEL_T1,
                    context=suite3.t1_context(d.sn, d.r, d.e_u, d.data.e_a))
        t1 = bytes(t1b)
    session = bytearray(96)
    derive_session(SUITES[SUITE_ECBDIV], t1, d.sn, d.r, d.data.ref2, session)
    return bytes(session[KENC])


def _unwraps(kek: bytes, w: bytes) -> bool:
    try:
        aes_kwp_unwrap(kek, w)
    except KeyloadError:
        return False
    return True


def test_the_derivation_would_unwrap_w(captured: Captured) -> None:
    """The control: the Z the test saw does unwrap each W, through the same derivation the
    attacks below use; so a failure below is the absence of Z, not a wrong derivation."""
    zs = captured.seen.values["Z"]
    for d in _downloads(captured):
        assert any(_unwraps(_kenc_from(z, None, d), d.data.w) for z in zs)


def test_long_term_keys_and_records_do_not_give_z(captured: Captured) -> None:
    """With d_CA, d_A and every d_U: ECDH of each with E_A and with E_U of a download is not
    its Z, and no Kenc derived from one unwraps its W."""
    keys = _disclosed(captured)
    zs = set(captured.seen.values["Z"])
    for d in _downloads(captured):
        for name, scalar in keys.items():
            for label, point in (("E_A", d.data.e_a), ("E_U", d.e_u)):
                z = _ecdh(scalar, point)
                assert z is not None and z not in zs, f"ECDH({name}, {label}) is Z"
                assert not _unwraps(_kenc_from(z, None, d), d.data.w), (name, label)
            assert not _unwraps(scalar, d.data.w), f"{name} unwraps W"


def _windows(data: bytes, n: int) -> set[bytes]:
    return {data[i:i + n] for i in range(len(data) - n + 1)}


def test_no_substring_of_what_was_recorded_unwraps_w(captured: Captured) -> None:
    """For each download, every 32-byte substring of its transcript and of everything
    keyload wrote in clear (database rows, output, logs), and of each long-term key, taken
    as Z, as T1 or as Kenc; and every 65-byte substring that is a P-256 point, combined by
    ECDH with every long-term key: none unwraps W."""
    keys = _disclosed(captured)
    clear = b"".join(captured.dumps.values()) + captured.text.encode()
    # hex text as it is stored: its bytes too
    decoded = b"".join(bytes.fromhex(tok) for tok in clear.decode(errors="replace").replace(
        "'", " ").replace(",", " ").replace("(", " ").replace(")", " ").split()
        if len(tok) >= 64 and len(tok) % 2 == 0 and _is_hex(tok))
    common32 = _windows(clear + decoded, 32) | set(keys.values())
    common65 = {p for p in _windows(clear + decoded, 65) if p[0] == 4 and _point(p)}
    for d in _downloads(captured):
        cands32 = common32 | _windows(d.material, 32)
        points = common65 | {p for p in _windows(d.material, 65) if p[0] == 4 and _point(p)}
        assert d.e_u in points and d.data.e_a in points
        for c in cands32:
            assert not _unwraps(c, d.data.w)
            assert not _unwraps(_kenc_from(c, None, d), d.data.w)
            assert not _unwraps(_kenc_from(None, c, d), d.data.w)
        for p in points:
            for scalar in keys.values():
                z = _ecdh(scalar, p)
                assert z is None or not _unwraps(_kenc_from(z, None, d), d.data.w)


def _is_hex(tok: str) -> bool:
    try:
        bytes.fromhex(tok)
    except ValueError:
        return False
    return True


def _point(p: bytes) -> bool:
    try:
        load_point(p)
    except KeyloadError:
        return False
    return True


def test_scalars_seen_are_fresh_per_download(captured: Captured) -> None:
    """Every e_A and e_U is new: no two downloads share an ephemeral scalar, none is a
    long-term key."""
    scalars = captured.seen.values["e (e_A or e_U)"]
    assert all(len(s) == SCALAR_LEN for s in scalars)
    assert len(set(scalars)) == len(scalars)
    assert not set(scalars) & set(_disclosed(captured).values())


