"""keyload serve --workers: several processes on one socket share the replay cache and
the ledger, and none outlives the server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD, cli_env, ok, run

pytestmark = pytest.mark.slow  # a home made with the console script; `keyload serve --workers`


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


def test_service_workers_share_state_and_stop_together(tmp_path: Path) -> None:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    home = tmp_path / "home"
    ok(run("authority", "init", home=home))
    ok(run("set", "create", "--name", "A", home=home))
    set_id = ok(run("set", "list", "--json", home=home)).json()["sets"][0]["set_id"]
    ok(run("key", "generate", "--ref1", "TMK-1", "--type", "aes256", "--usage", "K0", "--mode",
           "B", "--exportability", "E", "--key-version", "1", "--sets", "any", "--slots", "1",
           home=home))
    sns = [f"0A0B0C0D{i:02x}" for i in range(4)]
    for sn in sns:
        ok(run("unit", "create", "--set", set_id, "--sn", sn, home=home))
    pki = tmp_path / "pki"
    ok(run("pki", "init", "--dir", pki, "--client", "terminal-1", home=home))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"clients": {"terminal-1": {"sets": [set_id],
                                                             "ref1": ["TMK-1"]}}}))
    srv = subprocess.Popen(
        [str(KEYLOAD), "serve", "--home", str(home), "--cert", str(pki / "server.pem"),
         "--key", str(pki / "server.key"), "--ca", str(pki / "ca.pem"), "--policy",
         str(policy), "--port", "0", "--processes", "2"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        first = srv.stdout.readline()  # the port the server bound (no pick-then-bind race)
        assert "(2 processes)" in first, first
        found = re.search(r"listening on https://127\.0\.0\.1:(\d+) ", first)
        assert found is not None, first
        port = int(found.group(1))
        assert port > 0
        deadline = time.monotonic() + 10
        while not (workers := _workers_of(srv.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 1  # the parent serves too
        assert "HTTP " in srv.stdout.readline()  # what it runs on, for the operator
        for sn in sns:
            res = ok(run("fetch", "--server", f"https://localhost:{port}", "--sn", sn,
                         "--ref1", "TMK-1", "--ref2", "1", "--ca", pki / "ca.pem", "--cert",
                         pki / "clients" / "terminal-1.pem", "--key",
                         pki / "clients" / "terminal-1.key", "--json", home=home))
            assert res.json()["ledger"] is True
        for sn in sns:
            st = ok(run("unit", "status", "--sn", sn, "--json", home=home)).json()
            assert st["slots"][0]["state"] == "loaded"
        assert ok(run("audit", "verify", "--json", home=home)).json()["problems"] == []
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [w for w in workers if _alive(w)]
        if not alive:
            break
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "a worker outlived the server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"
