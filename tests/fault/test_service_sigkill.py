"""Fault test: ``keyload serve`` killed with SIGKILL while 8 clients download, three times.

Nothing may be answered before it is recorded: every download a client received has its
challenge (exported), the authority's export record and its audit record, after each
kill; a challenge answered before a kill is refused after the restart; the audit chain
verifies at the end. Group commit makes this the interesting case: the answers wait for
a commit that the kill may prevent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keyload.core import messages as msg
from keyload.records.audit import AuditLog
from keyload.service.client import ServiceClient

from ..integration.test_service import PASSPHRASE, World, build_world, policy_doc

pytestmark = pytest.mark.slow

KILLS = 3
CLIENTS = 8
# each run is killed once this many more downloads were answered (a seeded draw): after
# work, never before it, however fast or slow this machine is
MORE = (5, 60)


def _serve(w: World, policy: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLOAD_")}
    env["KEYLOAD_PASSPHRASE"] = PASSPHRASE
    p = subprocess.Popen(
        [sys.executable, "-m", "keyload.cli.main", "serve", "--home", str(w.home), "--cert",
         str(w.pki / "server.pem"), "--key", str(w.pki / "server.key"), "--ca",
         str(w.pki / "ca.pem"), "--policy", str(policy), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    return p, next(t for t in line.split() if t.startswith("https://"))


def _download(w: World, url: str, stop: threading.Event, answered: list[tuple[bytes, bytes]],
              lock: threading.Lock, seed: int) -> None:
    rng = random.Random(seed)
    cert, key = w.client_paths("other")
    client = ServiceClient(url, ca=w.pki / "ca.pem", cert=cert, key=key, timeout=5)
    try:
        while not stop.is_set():
            sn, r = rng.randbytes(8), rng.randbytes(16)
            try:
                client.export(msg.ExportRequest(sn, r, w.set_a, 1, b"TMK-1", 1))
            except Exception:  # the server died under us: stop
                return
            with lock:
                answered.append((sn, r))
    finally:
        client.close()


def _recorded(home: Path) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """(exported challenges, SNs with an export record, SNs with a 200 audit record)."""
    def rows(db: str, sql: str) -> list[tuple[str, ...]]:
        c = sqlite3.connect(home / db)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()

    challenges = {(sn, r) for sn, r in rows(
        "service.db", "SELECT sn, r FROM challenges WHERE state = 'exported'")}
    exports = {sn for (sn,) in rows("authority/exports.db", "SELECT sn FROM exports")}
    audited = set()
    for (d,) in rows("audit.db", "SELECT detail FROM audit WHERE action = 'request'"):
        doc = json.loads(d)
        if doc.get("status") == 200 and "sn" in doc:
            audited.add(doc["sn"])
    return challenges, exports, audited


def test_service_sigkill_under_load_loses_no_answered_download(tmp_path: Path) -> None:
    w = build_world(tmp_path, units=1)
    policy = tmp_path / "policy.json"
    doc = policy_doc(w)
    doc["limits"]["per_sn"] = {"limit": 100, "window_s": 60}
    policy.write_text(json.dumps(doc))
    rng = random.Random(int(os.environ.get("KEYLOAD_FAULT_SEED", "20261127")))
    answered: list[tuple[bytes, bytes]] = []
    for k in range(KILLS):
        srv, url = _serve(w, policy)
        stop, lock = threading.Event(), threading.Lock()
        before = len(answered)
        ts = [threading.Thread(target=_download, args=(w, url, stop, answered, lock,
                                                       rng.randrange(2**32)))
              for _ in range(CLIENTS)]
        for t in ts:
            t.start()
        more = rng.randint(*MORE)  # the kill lands once that many more were answered
        deadline = time.monotonic() + 60
        while len(answered) < before + more:
            assert srv.poll() is None, f"kill {k}: the service ended by itself"
            assert time.monotonic() < deadline, f"kill {k}: only {len(answered) - before} " \
                f"of {more} downloads answered in 60 s"
            time.sleep(0.005)
        srv.send_signal(signal.SIGKILL)  # mid-batch, most likely: 8 clients keep it busy
        srv.wait(10)
        stop.set()
        for t in ts:
            t.join(15)
        assert len(answered) > before, f"kill {k}: no download was answered"
        challenges, exports, audited = _recorded(w.home)
        for sn, r in answered:
            assert (sn.hex(), r.hex()) in challenges, "answered but not recorded as exported"
            assert sn.hex() in exports, "answered without the authority's export record"
            assert sn.hex() in audited, "answered without its audit record"
    # after a restart: a challenge answered before a kill is never served again
    srv, url = _serve(w, policy)
    try:
        cert, key = w.client_paths("other")
        client = ServiceClient(url, ca=w.pki / "ca.pem", cert=cert, key=key)
        sn, r = answered[0]
        status = client.request("POST", "/v1/exportkey", msg.ExportRequest(
            sn, r, w.set_a, 1, b"TMK-1", 1).encode(), "application/octet-stream").status
        client.close()
        assert status == 409
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(15)
    log = AuditLog(w.home / "audit.db")
    try:
        n, problems = log.verify()
        assert problems == [] and n >= len(answered)
    finally:
        log.close()
