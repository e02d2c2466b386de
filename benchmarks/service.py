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
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyType
from keyload.service.client import ServiceClient, client_context
from keyload.service.pki import init_pki
from keyload.station.pgserver import postgres_available, private_postgres
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


class LeanClient:
    """A load generator's HTTP/1.1 client: one keep-alive TLS socket, the request built
    from a fixed head and the body, the answer read by Content-Length. It checks each
    answer (status 200, an EXPORTKEY response that decodes) but spends far less CPU than
    ``http.client``: server and load generator share the same cores here."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.host = host
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            buf += chunk
        lines = buf[:end].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                      if k.strip().lower() == b"content-length")
        buf = buf[end + 4:]
        while len(buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            buf += chunk
        self.buf = buf[length:]
        return status, buf[:length]

    def close(self) -> None:
        self.sock.close()


def client_proc(url: str, d: str, set_id: bytes, threads: int, seconds: float, lean: bool,
                q: mp.Queue[tuple[list[float], int, float]]) -> None:
    cpu0 = time.process_time()
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(threads)
    pki = Path(d) / "pki"
    u = urlsplit(url)
    ctx = client_context(pki / "ca.pem", pki / "clients" / "bench.pem",
                         pki / "clients" / "bench.key")

    def run() -> None:
        mine: list[float] = []
        bad = 0
        if lean:
            lc = LeanClient(str(u.hostname), int(u.port or 443), ctx)

            def export(er: msg.ExportRequest) -> None:
                status, body = lc.post("/v1/exportkey", er.encode())
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                msg.ExportResponse.decode(body)
            close = lc.close
        else:
            c = ServiceClient(url, ca=pki / "ca.pem", context=ctx)
            c.request("GET", "/v1/health")  # handshake outside the timed loop
            export, close = c.export, c.close  # type: ignore[assignment]
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                export(msg.ExportRequest(os.urandom(8), os.urandom(16), set_id, 1, b"TMK-1", 1))
                mine.append(time.perf_counter() - t)
            except Exception:
                bad += 1
        close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((lat, errors[0], time.process_time() - cpu0))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return float("nan")
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(urls: list[str], d: Path, set_id: bytes, conc: int, seconds: float,
            server_pids: list[int], lean: bool) -> dict[str, float]:
    procs_n = min(conc, 4)
    q: mp.Queue[tuple[list[float], int, float]] = mp.Queue()
    per = [conc // procs_n + (1 if i < conc % procs_n else 0) for i in range(procs_n)]
    ps = [mp.Process(target=client_proc,
                     args=(urls[i % len(urls)], str(d), set_id, n, seconds, lean, q))
          for i, n in enumerate(per)]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    client_cpu = 0.0
    srv0 = sum(process_cpu(p) for p in server_pids)
    for _ in ps:
        ls, e, cpu = q.get(timeout=seconds + 120)
        lat += ls
        errors += e
        client_cpu += cpu
    srv_cpu = sum(process_cpu(p) for p in server_pids) - srv0
    for p in ps:
        p.join()
    lat.sort()
    n = max(1, len(lat))
    return {"clients": conc, "downloads_per_s": len(lat) / seconds,
            "server_cpu_us": 1e6 * srv_cpu / n, "client_cpu_us": 1e6 * client_cpu / n,
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors}


def start_servers(d: Path, args: argparse.Namespace, state: str | None,
                  n: int) -> list[tuple[subprocess.Popen[str], str]]:
    env = dict(os.environ, KEYLOAD_PASSPHRASE=PASS)
    out = []
    for i in range(n):
        srv = subprocess.Popen(
            [sys.executable, "-m", "keyload.cli.main", "serve", "--home",
             str(d / "home"), "--cert", str(d / "pki" / "server.pem"), "--key",
             str(d / "pki" / "server.key"), "--ca", str(d / "pki" / "ca.pem"), "--policy",
             str(d / "policy.json"), "--port", "0", "--http", args.http, "--loop", args.loop,
             "--workers", str(args.workers), "--instance", f"bench-{i}",
             *(["--state", state] if state else [])],
            stdout=subprocess.PIPE, text=True, env=env)
        assert srv.stdout is not None
        line = srv.stdout.readline()
        out.append((srv, next(t for t in line.split() if t.startswith("https://"))))
    return out


def run(d: Path, args: argparse.Namespace, state: str | None) -> dict[str, Any]:
    set_id = setup(d)
    servers = start_servers(d, args, state, args.instances)
    try:
        urls = [u for _, u in servers]
        where = "PostgreSQL" if state else "SQLite"
        print(f"service: {len(urls)} instance{'s' if len(urls) > 1 else ''} ({args.http}, "
              f"{args.workers} worker{'s' if args.workers > 1 else ''} each, {where} state), "
              f"{os.cpu_count()} CPUs")
        rate = in_process_rate(d, set_id, min(args.seconds, 3.0))
        print(f"in-process EXPORTKEY: {rate:,.0f}/s")
        print("clients  downloads/s  p50 ms  p99 ms  errors  server CPU µs  client CPU µs")
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            r = measure(urls, d, set_id, c, args.seconds, [s.pid for s, _ in servers],
                        args.client == "lean")
            rows.append(r)
            print(f"{c:>7}  {r['downloads_per_s']:>11,.0f}  {r['p50_ms']:>6.1f}  "
                  f"{r['p99_ms']:>6.1f}  {r['errors']:>6}  {r['server_cpu_us']:>13,.0f}"
                  f"  {r['client_cpu_us']:>13,.0f}")
        return {"in_process_exports_per_s": rate, "state": where.lower(),
                "instances": len(urls), "workers": args.workers, "rows": rows}
    finally:
        for srv, _ in servers:
            srv.terminate()
        for srv, _ in servers:
            srv.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--http", choices=["h11", "httptools"], default="httptools")
    ap.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    ap.add_argument("--client", choices=["lean", "stdlib"], default="lean",
                    help="load generator: a minimal HTTP/1.1 client over ssl sockets (lean), "
                         "or keyload's ServiceClient on http.client (stdlib)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--workers", type=int, default=1, help="keyload serve --workers")
    ap.add_argument("--state", choices=["sqlite", "postgresql"], default="sqlite",
                    help="postgresql: a private server (fsync on) shared by the instances")
    ap.add_argument("--instances", type=int, default=1,
                    help="keyload serve processes (clients spread over them)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    if args.instances > 1 and args.state == "sqlite":
        ap.error("several instances share PostgreSQL: --state postgresql")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.state == "postgresql":
            ok, why = postgres_available()
            if not ok:
                print(f"skipped: no PostgreSQL here ({why})")
                return 0
            with private_postgres(d / "pg", durable=True) as url:
                out = run(d, args, url)
        else:
            out = run(d, args, None)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
