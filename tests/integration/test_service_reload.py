"""Revocation without downtime: ``keyload serve`` (two worker processes) reloads its policy
on SIGHUP. A lost terminal's certificate put on the deny list is refused by every worker
at once, on connections already open too; a policy that does not parse is refused and the
one in force stays; every reload is audited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyload.records.audit import AuditLog
from keyload.service.client import ServiceClient
from keyload.service.pki import fingerprint

from .test_service import PASSPHRASE, World, build_world, policy_doc

pytestmark = pytest.mark.slow  # `keyload serve --workers` processes, reloaded


def _serve(w: World, policy: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLOAD_")}
    env["KEYLOAD_PASSPHRASE"] = PASSPHRASE
    p = subprocess.Popen(
        [sys.executable, "-m", "keyload.cli.main", "serve", "--home", str(w.home), "--cert",
         str(w.pki / "server.pem"), "--key", str(w.pki / "server.key"), "--ca",
         str(w.pki / "ca.pem"), "--policy", str(policy), "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=(w.home.parent / "serve.err").open("a"), text=True,
        env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    return p, next(t for t in line.split() if t.startswith("https://"))


def _status(w: World, url: str, name: str, client: ServiceClient | None = None) -> int:
    own = client is None
    cert, key = w.client_paths(name)
    c = client or ServiceClient(url, ca=w.pki / "ca.pem", cert=cert, key=key, timeout=10)
    try:
        return c.request("GET", "/v1/metrics").status
    finally:
        if own:
            c.close()


def _actions(w: World) -> list[tuple[str, dict[str, object]]]:
    log = AuditLog(w.home / "audit.db")
    try:
        return [(a, json.loads(d)) for a, d in
                log.db.execute("SELECT action, detail FROM audit ORDER BY seq")]
    finally:
        log.close()


def test_sighup_reloads_the_policy_in_every_worker(tmp_path: Path) -> None:
    w = build_world(tmp_path, units=1)
    doc = policy_doc(w)
    doc["clients"]["other"]["metrics"] = True
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    p, url = _serve(w, path, "--processes", "2")
    try:
        cert, key = w.client_paths("other")
        held = ServiceClient(url, ca=w.pki / "ca.pem", cert=cert, key=key, timeout=10)
        assert _status(w, url, "other", held) == 200  # a connection opened before
        assert [_status(w, url, "other") for _ in range(8)] == [200] * 8
        # the terminal is lost: its certificate goes on the deny list
        doc["deny"] = {"sha256": [fingerprint(cert.read_bytes())]}
        path.write_text(json.dumps(doc))
        os.kill(p.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _status(w, url, "other") != 403 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the workers got it too
        # every worker refuses it (fresh connections land on either), and so does the
        # connection it already had open
        assert [_status(w, url, "other") for _ in range(12)] == [403] * 12
        r = held.request("GET", "/v1/metrics")
        assert r.status == 403 and r.problem()["type"] == "urn:keyload:problem:client-revoked"
        held.close()
        assert p.poll() is None  # no downtime
        # a broken policy is refused: the one in force stays
        path.write_text('{"clients": {"other": {"sets": "any"}}}')
        os.kill(p.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert [_status(w, url, "other") for _ in range(6)] == [403] * 6
        mon = w.client_paths("monitor")
        m = ServiceClient(url, ca=w.pki / "ca.pem", cert=mon[0], key=mon[1], timeout=10)
        try:
            assert m.request("GET", "/v1/metrics").status == 200
        finally:
            m.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    actions = _actions(w)
    reloads = [d for a, d in actions if a == "policy-reload"]
    refused = [d for a, d in actions if a == "policy-reload-refused"]
    assert len(reloads) == 2 and len(refused) == 2  # each worker, each time
    assert all(d["denied_sha256"] == 1 and d["file"] == "policy.json" for d in reloads)
    assert all("sha256" in d for d in reloads)
    assert all("policy" in str(d["error"]) for d in refused)
    log = AuditLog(w.home / "audit.db")
    try:
        assert log.verify()[1] == []
    finally:
        log.close()


def test_a_policy_changed_before_a_worker_listens_for_sighup_is_taken_at_its_start(
        tmp_path: Path) -> None:
    """A worker ignores SIGHUP until its handler is in place, so a reload sent while it
    was starting would leave it on the old policy: at its start it reads the file again
    when the file is no longer the policy it was given (and audits that, as a reload)."""
    import asyncio

    from keyload.service.policy import Policy
    from keyload.service.runtime import open_instance

    w = build_world(tmp_path, units=1)
    doc = policy_doc(w)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    policy = Policy.load(path)
    cert, _ = w.client_paths("other")
    doc["deny"] = {"sha256": [fingerprint(cert.read_bytes())]}
    path.write_text(json.dumps(doc))  # changed (and SIGHUP lost) while the worker started
    ks = w.open_keystore()
    inst = open_instance(ks, policy, home_root=w.home, authority_dir=w.home / "authority",
                         audit_path=w.home / "audit.db", policy_path=path)
    try:
        async def start_and_stop() -> list[str]:
            inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
            sent: list[str] = []

            async def send(m: dict[str, str]) -> None:
                sent.append(m["type"])

            await inbox.put({"type": "lifespan.startup"})
            task = asyncio.create_task(inst.app({"type": "lifespan"}, inbox.get, send))
            while "lifespan.startup.complete" not in sent:
                await asyncio.sleep(0.01)
            await asyncio.gather(*list(inst.app._background))
            await inbox.put({"type": "lifespan.shutdown"})
            await task
            return sent

        assert asyncio.run(start_and_stop()) == ["lifespan.startup.complete",
                                                 "lifespan.shutdown.complete"]
        assert inst.app.policy.deny_sha256 == {fingerprint(cert.read_bytes()).lower()}
        assert inst.app.policy.sha256 == Policy.load(path).sha256
    finally:
        inst.close()
        ks.close()
    reloads = [d for a, d in _actions(w) if a == "policy-reload"]
    assert len(reloads) == 1 and reloads[0]["denied_sha256"] == 1
