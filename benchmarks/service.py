"""Remote EXPORTKEY over HTTPS with mutual TLS: downloads/s and p50 / p99 latency.

Starts ``keyload serve`` (one uvicorn process, SQLite state, audit on) on loopback, then
drives it with 1, 16 and 64 concurrent keep-alive clients (threads spread over client
processes), each request a fresh (SN, R) EXPORTKEY in KLP1 TLV form: the service does
mTLS identity, policy, two rate-limit counters, the replay-cache claim, the authority's
export (KBKDF, KWP, CMAC) with its export record, the challenge update and an audit
record. Beside it, the in-process EXPORTKEY rate of the same authority.

    .venv/bin/python benchmarks/service.py [--seconds 5] [--http h11|httptools]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyType
from keyload.service.client import ServiceClient
from keyload.service.pki import init_pki
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource

PASS = "benchmark passphrase"


def setup(d: Path) -> bytes:
    ks = SoftwareKeystore.create(d / "home" / "authority", KekSource(passphrase=PASS),
                                 scrypt_n=2**12)
    set_id = ks.generate_set("A").set_id
    ks.generate_key(b"TMK-1", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=ExportPolicy(None, None))
    ks.close()
    init_pki(d / "pki", clients=("bench",))
    (d / "policy.json").write_text(json.dumps({
        "limits": {"per_client": {"limit": 10**9, "window_s": 1},
                   "per_sn": {"limit": 10, "window_s": 60}},
        "clients": {"bench": {"sets": "any", "ref1": "any"}}}))
    return set_id


def in_process_rate(d: Path, set_id: bytes, seconds: float) -> float:
    ks = SoftwareKeystore.open(d / "home" / "authority", KekSource(passphrase=PASS))
    a = Authority(ks)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a.export(msg.ExportRequest(os.urandom(8), os.urandom(16), set_id, 1, b"TMK-1",
                                   1).encode())
        n += 1
    ks.close()
    return n / (time.perf_counter() - t0)


def client_proc(url: str, d: str, set_id: bytes, threads: int, seconds: float,
                q: mp.Queue[tuple[list[float], int]]) -> None:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run() -> None:
        c = ServiceClient(url, ca=Path(d) / "pki" / "ca.pem",
                          cert=Path(d) / "pki" / "clients" / "bench.pem",
                          key=Path(d) / "pki" / "clients" / "bench.key")
        mine: list[float] = []
        bad = 0
        c.request("GET", "/v1/health")  # handshake outside the timed loop
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                c.export(msg.ExportRequest(os.urandom(8), os.urandom(16), set_id, 1, b"TMK-1",
                                           1))
                mine.append(time.perf_counter() - t)
            except Exception:
                bad += 1
        c.close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((lat, errors[0]))


def measure(url: str, d: Path, set_id: bytes, conc: int, seconds: float) -> dict[str, float]:
    procs_n = min(conc, 4)
    q: mp.Queue[tuple[list[float], int]] = mp.Queue()
    per = [conc // procs_n + (1 if i < conc % procs_n else 0) for i in range(procs_n)]
    ps = [mp.Process(target=client_proc, args=(url, str(d), set_id, n, seconds, q))
          for n in per]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in ps:
        ls, e = q.get(timeout=seconds + 120)
        lat += ls
        errors += e
    for p in ps:
        p.join()
    lat.sort()
    return {"clients": conc, "downloads_per_s": len(lat) / seconds,
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--http", choices=["h11", "httptools"], default="httptools")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--workers", type=int, default=1, help="keyload serve --workers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        set_id = setup(d)
        env = dict(os.environ, KEYLOAD_PASSPHRASE=PASS)
        srv = subprocess.Popen(
            [sys.executable, "-m", "keyload.cli.main", "serve", "--home",
             str(d / "home"), "--cert", str(d / "pki" / "server.pem"), "--key",
             str(d / "pki" / "server.key"), "--ca", str(d / "pki" / "ca.pem"), "--policy",
             str(d / "policy.json"), "--port", "0", "--http", args.http,
             "--workers", str(args.workers)],
            stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert srv.stdout is not None
            line = srv.stdout.readline()
            url = next(t for t in line.split() if t.startswith("https://"))
            print(f"service: {url} ({args.http}, {args.workers} worker"
                  f"{'s' if args.workers > 1 else ''}), {os.cpu_count()} CPUs")
            rate = in_process_rate(d, set_id, min(args.seconds, 3.0))
            print(f"in-process EXPORTKEY: {rate:,.0f}/s")
            print("clients  downloads/s  p50 ms  p99 ms  errors")
            for c in (int(x) for x in args.concurrency.split(",")):
                r = measure(url, d, set_id, c, args.seconds)
                print(f"{c:>7}  {r['downloads_per_s']:>11,.0f}  {r['p50_ms']:>6.1f}  "
                      f"{r['p99_ms']:>6.1f}  {r['errors']:>6}")
        finally:
            srv.terminate()
            srv.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
