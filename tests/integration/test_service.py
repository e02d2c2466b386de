"""The remote-download service: the real server (uvicorn) on loopback with real mutual TLS.

End to end (``fetch`` into emulated units, through the real CLI code in a subprocess),
then every refusal: no client certificate, one from another CA, a client not in the
policy, an unauthorized set or REF1, a replayed challenge, oversized and malformed
bodies, forged receipts, rate limits. Each is refused with its status and a
problem+json body, and nothing is recorded as loaded (ledger and unit unchanged).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyType
from keyload.records.audit import AuditLog
from keyload.service.client import HttpsAuthority, ServiceClient, ServiceRefused
from keyload.service.guard import ConnectionLimits
from keyload.service.openapi import render
from keyload.service.pki import create_ca, init_pki, issue
from keyload.service.policy import Policy
from keyload.service.runtime import Instance, open_instance
from keyload.service.server import ServerThread, bind, make_config, server_context
from keyload.station.fleet import EmulatedFleet
from keyload.station.load import LoadFailed, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

PASSPHRASE = "service-test passphrase"
ROOT = Path(__file__).resolve().parents[2]
SLOTS = {1: Slot(1, frozenset({KeyType.AES256})), 2: Slot(2, frozenset({KeyType.AES128}))}


@dataclass
class World:
    """A home (authority, emulated units), a PKI, a policy."""

    dir: Path
    home: Path
    pki: Path
    set_a: bytes
    set_b: bytes
    units_a: list[bytes]
    unit_b: bytes
    rogue: Path  # a client certificate with a good CN from another CA

    def client_paths(self, name: str) -> tuple[Path, Path]:
        d = self.rogue if name == "rogue" else self.pki / "clients"
        stem = "terminal-1" if name == "rogue" else name
        return d / f"{stem}.pem", d / f"{stem}.key"

    def client(self, url: str, name: str = "terminal-1") -> ServiceClient:
        cert, key = self.client_paths(name)
        return ServiceClient(url, ca=self.pki / "ca.pem", cert=cert, key=key)

    def open_keystore(self) -> SoftwareKeystore:
        return SoftwareKeystore.open(self.home / "authority", KekSource(passphrase=PASSPHRASE))

    def fleet(self) -> EmulatedFleet:
        return EmulatedFleet.open(self.home / "units", KekSource(passphrase=PASSPHRASE))


def build_world(d: Path, *, units: int = 12) -> World:
    src = KekSource(passphrase=PASSPHRASE)
    home = d / "home"
    ks = SoftwareKeystore.create(home / "authority", src, scrypt_n=2**12)
    a = ks.generate_set("A").set_id
    b = ks.generate_set("B").set_id
    anyp = ExportPolicy(None, None)
    ks.generate_key(b"TMK-1", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=ExportPolicy(None, frozenset({1})))
    ks.generate_key(b"PIN-1", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=3,
                    diversify=False, policy=ExportPolicy(None, frozenset({2})))
    ks.generate_key(b"SECRET-9", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=False, policy=anyp)
    from keyload.units import storage

    n, storage.SCRYPT_N = storage.SCRYPT_N, 2**12
    try:
        fleet = EmulatedFleet.open(home / "units", src, create=True)
    finally:
        storage.SCRYPT_N = n
    sns = [bytes.fromhex(f"0A0B0C{i:04X}") for i in range(units)]
    for sn in sns:
        fleet.create_unit(sn, ks.transport_key_copy(a), dict(SLOTS))
    sn_b = bytes.fromhex("0B0B0B0001")
    fleet.create_unit(sn_b, ks.transport_key_copy(b), dict(SLOTS))
    fleet.close()
    ks.close()
    init_pki(d / "pki", clients=("terminal-1", "intruder", "monitor", "slowpoke", "other"))
    create_ca(d / "rogue")
    issue(d / "rogue", "terminal-1", server=False, out=d / "rogue")
    return World(d, home, d / "pki", a, b, sns, sn_b, d / "rogue")


def policy_doc(w: World, **limits: Any) -> dict[str, Any]:
    return {
        "limits": {"max_body": 1024, "per_client": {"limit": 100000, "window_s": 1},
                   "per_sn": {"limit": 5, "window_s": 60}, **limits},
        "clients": {
            "terminal-1": {"sets": [w.set_a.hex()], "ref1": ["TMK-1", "PIN-1", "GHOST"]},
            "other": {"sets": "any", "ref1": "any"},
            "monitor": {"sets": [], "ref1": [], "metrics": True},
            "slowpoke": {"sets": "any", "ref1": "any",
                         "per_client": {"limit": 2, "window_s": 3600}},
        }}


@dataclass
class Running:
    world: World
    inst: Instance
    server: ServerThread
    ks: SoftwareKeystore

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()
        self.inst.close()
        self.ks.close()


def start_service(w: World, policy: dict[str, Any], *, state: str | None = None,
                  instance: str = "test", http: str = "h11",
                  limits: ConnectionLimits | None = None,
                  host: str = "127.0.0.1") -> Running:
    ks = w.open_keystore()
    inst = open_instance(ks, Policy.from_json(policy), home_root=w.home,
                         authority_dir=w.home / "authority", audit_path=w.home / "audit.db",
                         state=state, instance=instance, limits=limits)
    ctx = server_context(w.pki / "server.pem", w.pki / "server.key", w.pki / "ca.pem")
    sock = bind(host, 0)
    srv = ServerThread(make_config(inst.app, ctx, port=sock.getsockname()[1], http=http), sock,
                       handshake_timeout=(limits or ConnectionLimits()).handshake_timeout)
    return Running(w, inst, srv.start(), ks)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(tmp_path_factory.mktemp("service"))
    run = start_service(w, policy_doc(w))
    yield run
    run.stop()


# -- helpers --------------------------------------------------------------------------
def raw(run: Running, method: str, path: str, body: bytes | None = None, *,
        ctype: str | None = "application/json", client: str | None = "terminal-1",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(run.world.pki / "ca.pem"))
    if client is not None:
        cert, key = run.world.client_paths(client)
        ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", run.server.port, context=ctx, timeout=10)
    try:
        h = dict(headers or {})
        if ctype:
            h["Content-Type"] = ctype
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def problem(status: int, headers: dict[str, str], body: bytes, want: int,
            slug: str) -> dict[str, Any]:
    assert status == want, (status, body)
    assert headers["content-type"] == "application/problem+json", headers
    doc = json.loads(body)
    assert doc["status"] == want and doc["type"] == f"urn:keyload:problem:{slug}", doc
    assert "Traceback" not in body.decode()
    return doc


def ledger_count(run: Running) -> int:
    return len(run.inst.store.ledger())


def init(w: World, sn: bytes) -> msg.InitResponse:
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        c = UnitClient(LocalConnection(unit))
        c.select()
        return c.initialize()
    finally:
        unit.close()
        fleet.close()


def export_json(i: msg.InitResponse, ref1: bytes, ref2: int, *, suite: int = 1,
                set_id: bytes | None = None) -> bytes:
    return json.dumps({"sn": i.sn.hex(), "r": i.r.hex(), "set_id": (set_id or i.set_id).hex(),
                       "suite": suite, "ref1": ref1.hex(), "ref2": ref2}).encode()


def slot_state(w: World, sn: bytes, ref2: int) -> msg.SlotStatus:
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        return unit.slot_status(ref2)
    finally:
        unit.close()
        fleet.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KEYLOAD_PASSPHRASE=PASSPHRASE)
    env.pop("KEYLOAD_HOME", None)
    return subprocess.run([sys.executable, "-m", "keyload.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


# -- end to end -----------------------------------------------------------------------
@pytest.mark.slow  # runs the console script
def test_service_fetch_end_to_end_into_emulated_units(svc: Running) -> None:
    w = svc.world
    cert, key = w.client_paths("terminal-1")
    before = ledger_count(svc)
    for sn, ref1, ref2 in ((w.units_a[0], "TMK-1", 1), (w.units_a[0], "PIN-1", 2),
                           (w.units_a[1], "TMK-1", 1)):
        p = run_cli("fetch", "--home", str(w.home), "--server", svc.url, "--sn", sn.hex(),
                    "--ref1", ref1, "--ref2", str(ref2), "--ca", str(w.pki / "ca.pem"),
                    "--cert", str(cert), "--key", str(key), "--json")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["ledger"] is True and out["ref2"] == ref2
        st = slot_state(w, sn, ref2)
        assert st.state == msg.SLOT_LOADED and st.kcv is not None
        assert st.kcv.hex().upper() == out["kcv"]
    entries = svc.inst.store.ledger()
    assert len(entries) == before + 3
    assert {(e.sn, e.ref2) for e in entries[-3:]} == {(w.units_a[0], 1), (w.units_a[0], 2),
                                                      (w.units_a[1], 1)}
    # the authority verifies the ledger's receipts again, and recorded each export
    for e in entries:
        svc.inst.app.authority.verify_receipt(suite=e.suite, set_id=e.set_id, sn=e.sn,
                                              r=e.r, ref2=e.ref2, h=e.header, kcv=e.kcv,
                                              rct=e.rct)
    assert svc.inst.exports.count() >= 3


def test_service_fetch_same_version_again_is_refused_by_the_unit(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[2]
    client = w.client(svc.url)
    try:
        res = load_key(UnitClient(LocalConnection(w.fleet().open_unit(sn))),
                       HttpsAuthority(client), b"TMK-1", 1)
        client.post_receipt(res)
        n = ledger_count(svc)
        with pytest.raises(LoadFailed) as ei:
            load_key(UnitClient(LocalConnection(w.fleet().open_unit(sn))),
                     HttpsAuthority(client), b"TMK-1", 1)
        assert ei.value.sw == 0x6986 and ei.value.step == "unit IMPORTKEY"
        assert ledger_count(svc) == n
    finally:
        client.close()


def test_service_json_export_and_receipt(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[3]
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        uc = UnitClient(LocalConnection(unit))
        uc.select()
        i = uc.initialize()
        status, headers, body = raw(svc, "POST", "/v1/exportkey", export_json(i, b"PIN-1", 2))
        assert status == 200 and headers["content-type"] == "application/json", body
        doc = json.loads(body)
        assert set(doc) == {"import_data", "kcv", "header", "ref2", "suite", "key_version"}
        assert doc["key_version"] == 3
        ans = uc.import_key(bytes.fromhex(doc["import_data"]))
        assert ans.kcv.hex() == doc["kcv"]
        n = ledger_count(svc)
        rc = {"sn": sn.hex(), "r": i.r.hex(), "ref2": 2, "kcv": ans.kcv.hex(),
              "rct": ans.rct.hex()}
        # another client cannot see (or record) this export
        problem(*raw(svc, "POST", "/v1/receipts", json.dumps(rc).encode(), client="other"),
                404, "unknown-export")
        # a forged receipt is refused and not recorded
        forged = dict(rc, rct=bytes(16).hex())
        doc = problem(*raw(svc, "POST", "/v1/receipts", json.dumps(forged).encode()), 422,
                      "receipt-invalid")
        assert doc["sw"] == "6982"
        problem(*raw(svc, "POST", "/v1/receipts", json.dumps(dict(rc, kcv="00" * 5)).encode()),
                422, "kcv-mismatch")
        assert ledger_count(svc) == n
        status, _, body = raw(svc, "POST", "/v1/receipts", json.dumps(rc).encode())
        assert status == 201, body
        assert json.loads(body)["status"] == "recorded"
        assert ledger_count(svc) == n + 1
        # the same receipt again (a client retrying): answered again, recorded once
        status, _, again = raw(svc, "POST", "/v1/receipts", json.dumps(rc).encode())
        assert status == 200 and json.loads(again) == json.loads(body)
        # another receipt for the recorded challenge: refused
        problem(*raw(svc, "POST", "/v1/receipts",
                     json.dumps(dict(rc, rct=bytes(16).hex())).encode()), 409,
                "receipt-recorded")
        problem(*raw(svc, "POST", "/v1/receipts", json.dumps(dict(rc, kcv="00" * 5)).encode()),
                409, "receipt-recorded")
        assert ledger_count(svc) == n + 1
    finally:
        unit.close()
        fleet.close()


# -- refusals -------------------------------------------------------------------------
def test_service_no_client_certificate_is_401(svc: Running) -> None:
    i = init(svc.world, svc.world.units_a[4])
    n = ledger_count(svc)
    problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1), client=None),
            401, "unauthenticated")
    problem(*raw(svc, "GET", "/v1/metrics", client=None), 401, "unauthenticated")
    assert svc.inst.store.challenge(i.sn, i.r) is None  # the challenge was never claimed
    assert ledger_count(svc) == n


def test_service_certificate_from_another_ca_fails_the_handshake(svc: Running) -> None:
    i = init(svc.world, svc.world.units_a[4])
    client = svc.world.client(svc.url, "rogue")
    try:
        from keyload.core.errors import TransportError

        with pytest.raises(TransportError):
            client.export(msg.ExportRequest(i.sn, i.r, i.set_id, 1, b"TMK-1", 1))
    finally:
        client.close()
    assert svc.inst.store.challenge(i.sn, i.r) is None


def test_service_client_not_in_policy_is_403(svc: Running) -> None:
    i = init(svc.world, svc.world.units_a[4])
    problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1), client="intruder"),
            403, "client-not-authorized")
    assert svc.inst.store.challenge(i.sn, i.r) is None


def test_service_unauthorized_set_and_ref1_are_403(svc: Running) -> None:
    w = svc.world
    i = init(w, w.unit_b)
    n = ledger_count(svc)
    problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1)), 403,
            "set-not-authorized")
    i = init(w, w.units_a[4])
    problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"SECRET-9", 1)), 403,
            "ref1-not-authorized")
    # through the field client: the refusal surfaces as a typed, final error
    client = w.client(svc.url)
    try:
        with pytest.raises(LoadFailed) as ei:
            load_key(UnitClient(LocalConnection(w.fleet().open_unit(w.units_a[5]))),
                     HttpsAuthority(client), b"SECRET-9", 1)
        assert isinstance(ei.value.cause, ServiceRefused) and ei.value.cause.status == 403
    finally:
        client.close()
    assert slot_state(w, w.units_a[5], 1).state == msg.SLOT_EMPTY
    assert ledger_count(svc) == n


def test_service_authority_refusals_carry_the_status_word(svc: Running) -> None:
    w = svc.world
    i = init(w, w.units_a[4])
    doc = problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"GHOST", 1)), 404,
                  "unknown-ref1")
    assert doc["sw"] == "6A88"
    i = init(w, w.units_a[4])
    doc = problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 2)), 403,
                  "export-policy")
    assert doc["sw"] == "6986"
    i = init(w, w.units_a[4])
    doc = problem(*raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1, suite=9)),
                  422, "suite-unsupported")
    assert doc["sw"] == "6A81"


def test_service_replayed_challenge_is_409_everywhere(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[6]
    i = init(w, sn)
    req = export_json(i, b"TMK-1", 1)
    status, _, _ = raw(svc, "POST", "/v1/exportkey", req)
    assert status == 200
    n = ledger_count(svc)
    problem(*raw(svc, "POST", "/v1/exportkey", req), 409, "replay")
    # the same challenge in the binary form, by another authorized client: refused too
    er = msg.ExportRequest(i.sn, i.r, i.set_id, 1, b"TMK-1", 1).encode()
    problem(*raw(svc, "POST", "/v1/exportkey", er, ctype="application/octet-stream",
                 client="other"), 409, "replay")
    assert ledger_count(svc) == n
    assert slot_state(w, sn, 1).state == msg.SLOT_EMPTY


def test_service_oversized_bodies_are_413(svc: Running) -> None:
    n = ledger_count(svc)
    problem(*raw(svc, "POST", "/v1/exportkey", b"{" + b" " * 5000 + b"}"), 413, "too-large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, cut while reading
        for _ in range(10):
            yield b"x" * 500

    problem(*raw(svc, "POST", "/v1/exportkey", chunks(),  # type: ignore[arg-type]
                 ctype="application/octet-stream"), 413, "too-large")
    assert ledger_count(svc) == n


def _send_head(port: int, ca: Path, parts: list[bytes], pause: float) -> bytes:
    import socket
    import time

    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_s, \
            ctx.wrap_socket(raw_s, server_hostname="127.0.0.1") as tls:
        try:
            for part in parts:
                tls.sendall(part)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # closed while we were still sending
        answer = b""
        try:
            while chunk := tls.recv(4096):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.startswith(b"HTTP/1.1 431"):
                    break  # a problem answer on a connection kept open
        except (ConnectionResetError, ssl.SSLError):
            pass
        return answer


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_service_oversized_request_heads_are_refused_with_either_parser(
        svc: Running, http: str) -> None:
    """Headers are read before any certificate check: both parsers bound a head that
    arrives slowly (400, connection closed), the app one that arrives whole (431)."""
    run = start_service(svc.world, policy_doc(svc.world), http=http, instance=http)
    ca = svc.world.pki / "ca.pem"
    start = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
    try:
        whole = _send_head(run.server.port, ca,
                           [start + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n"], 0)
        assert whole.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), whole[:80]
        if whole.startswith(b"HTTP/1.1 431 "):
            assert b"application/problem+json" in whole
        slow = _send_head(run.server.port, ca,
                          [start] + [b"X-P%d: %s\r\n" % (i, b"b" * 1000) for i in range(40)],
                          0.005)
        assert slow.startswith(b"HTTP/1.1 400 "), slow[:80]
        status, _, body = raw(run, "GET", "/v1/health", client=None)  # still serving
        assert status == 200, body
    finally:
        run.stop()


@pytest.mark.parametrize("body,ctype,status,slug", [
    (b"\xc1\x01", "application/octet-stream", 400, "malformed"),
    (b"", "application/octet-stream", 400, "malformed"),
    (b"not json", "application/json", 400, "malformed"),
    (b"[1, 2]", "application/json", 400, "malformed"),
    (b'{"sn": "0a"}', "application/json", 400, "malformed"),
    (b'{"sn": "zz", "r": "00", "set_id": "00", "suite": 1, "ref1": "00", "ref2": 1}',
     "application/json", 400, "malformed"),
    (b'{"sn": "0a", "r": "' + b"00" * 16 + b'", "set_id": "' + b"00" * 5 +
     b'", "suite": 1, "ref1": "41", "ref2": 255}', "application/json", 400, "malformed"),
    (b'{"sn": "0a", "r": "' + b"00" * 16 + b'", "set_id": "' + b"00" * 5 +
     b'", "suite": true, "ref1": "41", "ref2": 1}', "application/json", 400, "malformed"),
    (b"[" * 500 + b"]" * 500, "application/json", 400, "malformed"),
    (b"sn=1", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
    (b"{}", None, 415, "unsupported-media-type"),
])
def test_service_malformed_bodies_are_refused(svc: Running, body: bytes, ctype: str | None,
                                              status: int, slug: str) -> None:
    n = ledger_count(svc)
    doc = problem(*raw(svc, "POST", "/v1/exportkey", body, ctype=ctype), status, slug)
    if ctype == "application/octet-stream":
        assert doc["sw"] == "6A80"
    assert ledger_count(svc) == n


def test_service_unknown_paths_and_methods(svc: Running) -> None:
    problem(*raw(svc, "GET", "/nope"), 404, "not-found")
    s, h, b = raw(svc, "GET", "/v1/exportkey")
    problem(s, h, b, 405, "method-not-allowed")
    assert h["allow"] == "POST"
    problem(*raw(svc, "POST", "/v1/receipts", b"<x/>", ctype="application/xml"), 415,
            "unsupported-media-type")


def test_service_rate_limits_per_sn_and_per_client(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[7]
    codes = []
    for _ in range(7):
        i = init(w, sn)
        s, h, b = raw(svc, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1))
        codes.append(s)
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
    assert int(h["retry-after"]) >= 1
    problem(s, h, b, 429, "rate-limited")
    codes = [raw(svc, "POST", "/v1/receipts", b"{}", client="slowpoke")[0] for _ in range(4)]
    assert codes == [400, 400, 429, 429], codes


def test_service_health_metrics_openapi(svc: Running) -> None:
    s, _, b = raw(svc, "GET", "/v1/health", client=None)
    assert s == 200 and json.loads(b)["status"] == "ok"
    s, _, b = raw(svc, "GET", "/openapi.json", client=None)
    assert s == 200
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert json.loads(b) == json.loads(committed) and committed == render()
    problem(*raw(svc, "GET", "/v1/metrics"), 403, "forbidden")
    s, h, b = raw(svc, "GET", "/v1/metrics", client="monitor")
    assert s == 200 and h["content-type"].startswith("text/plain")
    assert b"keyload_requests_total" in b and b'event="exported"' in b


def flush_anonymous(run: Running) -> None:
    """Write the service's aggregated records of anonymous requests now."""
    app = run.inst.app
    assert app.loop is not None
    asyncio.run_coroutine_threadsafe(app.flush_anonymous(everything=True), app.loop).result(10)


def test_service_every_request_is_audited_without_secrets(svc: Running) -> None:
    """An authorized client's request: a record each. Anyone else's (no certificate, a
    client not in the policy): counted in one record per address and minute."""
    audit = AuditLog(svc.world.home / "audit.db")
    try:
        flush_anonymous(svc)
        before = audit.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        raw(svc, "GET", "/v1/health", client=None)
        raw(svc, "POST", "/v1/exportkey", b"junk", ctype="application/octet-stream")
        raw(svc, "GET", "/v1/metrics", client="intruder")
        raw(svc, "GET", "/v1/metrics", client=None)
        rows = audit.db.execute("SELECT actor, action, detail FROM audit WHERE seq > ? "
                                "ORDER BY seq", (before,)).fetchall()
        assert [(a, act) for a, act, _ in rows] == [("service", "request")]
        d = json.loads(rows[0][2])
        assert d["status"] == 400 and d["client"] == "terminal-1"
        assert d["problem"] == "malformed"
        flush_anonymous(svc)
        rows = audit.db.execute("SELECT actor, action, detail FROM audit WHERE seq > ? "
                                "ORDER BY seq", (before + 1,)).fetchall()
        assert [(a, act) for a, act, _ in rows] == [("service", "requests-anonymous")]
        agg = json.loads(rows[0][2])
        assert agg["peer"] == "127.0.0.1" and agg["requests"] == 3
        assert agg["status"] == {"200": 1, "401": 1, "403": 1}
        assert agg["routes"] == {"/v1/health": 1, "/v1/metrics": 2}
        assert agg["clients"] == ["intruder"]
        n, problems_ = audit.verify()
        assert n == before + 2 and not problems_
        # never key material: no wrapped key, MAC or receipt field in any record
        for (d_,) in audit.db.execute("SELECT detail FROM audit WHERE actor = 'service'"):
            assert not {"import_data", "w", "sas", "cas", "rct"} & set(json.loads(d_))
    finally:
        audit.close()


def test_service_pki_keys_are_private(svc: Running) -> None:
    pki = svc.world.pki
    for key in [pki / "ca.key", pki / "server.key", *sorted((pki / "clients").glob("*.key"))]:
        assert key.stat().st_mode & 0o777 == 0o600, key
