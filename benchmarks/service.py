"""Remote EXPORTKEY over HTTPS with mutual TLS: downloads/s and p50 / p99 latency.

Starts ``keyload serve`` (one uvicorn process, SQLite state, audit on) on loopback, then
drives it with 1, 16 and 64 concurrent keep-alive clients (threads spread over client
processes), each request a fresh (SN, R) EXPORTKEY in KLP1 TLV form: the service does
mTLS identity, policy, two rate-limit counters, the replay-cache claim, the authority's
export (KBKDF, KWP, CMAC) with its export record, the challenge update and an audit
record. Beside it, the in-process EXPORTKEY rate of the same authority.

``--full``: each iteration is a whole download instead: a fresh emulated unit (in the
load generator, billed to its CPU) answers INITIALIZE DOWNLOAD with its own R, the
station's ``load_key`` sends EXPORTKEY to the service and IMPORTKEY to the unit, and the
unit's receipt goes to ``POST /v1/receipts``, where the authority verifies it for real.

``--hostile N``: each row is measured without and with (taking turns, ``--rounds``
times each) N TLS connections without a client certificate, kept open to the server by
a separate process from many loopback source addresses, each a request head that never
ends, trickled one byte at a time; both rows and the ratio with/without are printed.

    .venv/bin/python benchmarks/service.py [--seconds 5] [--http h11|httptools]
        [--full] [--hostile N [--rounds 2]] [--json]   (benchmarks/README.md: all options)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyload.core import klp1
from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.core.suites import get_suite
from keyload.lab.pgserver import postgres_available, private_postgres
from keyload.service.client import HttpsAuthority, ServiceClient, client_context
from keyload.service.pki import init_pki
from keyload.station.load import AuthorityClient, LoadResult, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

PASS = "benchmark passphrase"
REF1, REF2 = b"TMK-1", 1
OCTETS, JSON = "application/octet-stream", "application/json"


def setup(d: Path) -> tuple[bytes, bytes]:
    """The authority's home, a test PKI and a policy whose limits never bind. Returns the
    set's id and a copy of its transport key T, to personalize emulated units (--full)."""
    ks = SoftwareKeystore.create(d / "home" / "authority", KekSource(passphrase=PASS),
                                 scrypt_n=2**12)
    set_id = ks.generate_set("A").set_id
    ks.generate_key(REF1, KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=ExportPolicy(None, None))
    t = ks.transport_key_copy(set_id)
    t_bytes = bytes(t.buffer)
    t.wipe()
    ks.close()
    init_pki(d / "pki", clients=("bench",))
    (d / "policy.json").write_text(json.dumps({
        "limits": {"per_client": {"limit": 10**9, "window_s": 1},
                   "per_sn": {"limit": 10, "window_s": 60}},
        "clients": {"bench": {"sets": "any", "ref1": "any"}}}))
    return set_id, t_bytes


def in_process_rate(d: Path, set_id: bytes, seconds: float) -> float:
    ks = SoftwareKeystore.open(d / "home" / "authority", KekSource(passphrase=PASS))
    a = Authority(ks)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a.export(msg.ExportRequest(os.urandom(8), os.urandom(16), set_id, 1, REF1,
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

    def post(self, path: str, body: bytes, ctype: str = OCTETS) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: {ctype}\r\n"
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


class _NoApdu:
    def transmit(self, apdu: bytes) -> bytes:
        raise RuntimeError("EXPORTKEY goes over HTTPS")


class LeanAuthority(AuthorityClient):
    """``load_key``'s authority over the lean client (what ``HttpsAuthority`` is over
    ``ServiceClient``): EXPORTKEY is one POST."""

    def __init__(self, export: Callable[[msg.ExportRequest], msg.ExportResponse]) -> None:
        super().__init__(_NoApdu(), suites=None, select=False)
        self._export = export

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        return self._export(req)


def receipt_body(res: LoadResult) -> bytes:
    """The receipt JSON, as ``ServiceClient.post_receipt`` sends it."""
    return json.dumps({"sn": res.sn.hex(), "r": res.r.hex(), "ref2": res.ref2,
                       "kcv": res.kcv.hex(), "rct": res.rct.hex()}).encode()


def client_proc(url: str, d: str, set_id: bytes, t: bytes, threads: int, seconds: float,
                lean: bool, full: bool, q: mp.Queue[tuple[list[float], int, float, str]],
                lean_unit: bool = False) -> None:
    # the benchmark stops its clients (terminate) if it is interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    cpu0 = time.process_time()
    lat: list[float] = []
    errors = [0]
    first_error = [""]
    lock = threading.Lock()
    start = threading.Barrier(threads)
    pki = Path(d) / "pki"
    u = urlsplit(url)
    ctx = client_context(pki / "ca.pem", pki / "clients" / "bench.pem",
                         pki / "clients" / "bench.key")
    accepts = frozenset({KeyType.AES256})

    def run() -> None:
        mine: list[float] = []
        bad = 0
        why = ""
        if lean:
            lc = LeanClient(str(u.hostname), int(u.port or 443), ctx)

            def export(er: msg.ExportRequest) -> msg.ExportResponse:
                status, body = lc.post("/v1/exportkey", er.encode())
                if status != 200:
                    raise RuntimeError(f"EXPORTKEY: HTTP {status} {body[:120]!r}")
                return msg.ExportResponse.decode(body)

            def receipt(res: LoadResult) -> None:
                status, body = lc.post("/v1/receipts", receipt_body(res), JSON)
                if status != 201:  # 201: verified by the authority and recorded (new)
                    raise RuntimeError(f"receipt: HTTP {status} {body[:120]!r}")
                if json.loads(body).get("status") != "recorded":
                    raise RuntimeError("receipt: not recorded")
            authority: AuthorityClient = LeanAuthority(export)
            close = lc.close
        else:
            c = ServiceClient(url, ca=pki / "ca.pem", context=ctx)
            c.request("GET", "/v1/health")  # handshake outside the timed loop
            export, close = c.export, c.close  # type: ignore[assignment]

            def receipt(res: LoadResult) -> None:
                if c.post_receipt(res).get("status") != "recorded":
                    raise RuntimeError("receipt: not recorded")
            authority = HttpsAuthority(c)
        tsec = Secret(t)
        start.wait()
        end = time.perf_counter() + seconds
        suite = get_suite(1)
        while time.perf_counter() < end:
            try:
                if full and lean_unit:
                    # the unit's side reduced to what the service sees of it: the receipt
                    # it computes after IMPORTKEY (klp1.receipt, from T, SN, R, REF2, H and
                    # KCV) — the server's work is the same, the generator's far smaller
                    sn, r = os.urandom(8), os.urandom(16)
                    t0 = time.perf_counter()
                    resp = export(msg.ExportRequest(sn, r, set_id, 1, REF1, REF2))
                    rct = klp1.receipt(suite, t, sn, r, REF2, resp.header, resp.kcv)
                    receipt(LoadResult(sn, set_id, REF1, REF2, 1, r, resp.header, resp.kcv,
                                       rct))
                elif full:
                    # a unit as delivered (SN, T, one empty slot): setup, not timed
                    unit = Unit(MemoryUnitStore(UnitState.new(
                        os.urandom(8), tsec, {REF2: Slot(REF2, accepts)})))
                    t0 = time.perf_counter()
                    receipt(load_key(UnitClient(LocalConnection(unit)), authority, REF1,
                                     REF2, select=False))
                else:
                    t0 = time.perf_counter()
                    export(msg.ExportRequest(os.urandom(8), os.urandom(16), set_id, 1, REF1,
                                             REF2))
                mine.append(time.perf_counter() - t0)
            except Exception as e:
                bad += 1
                why = why or f"{e.__class__.__name__}: {e}"[:300]
        close()
        with lock:
            lat.extend(mine)
            errors[0] += bad
            first_error[0] = first_error[0] or why

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    q.put((lat, errors[0], time.process_time() - cpu0, first_error[0]))


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


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the benchmark's process ends, however it ends
    (PR_SET_PDEATHSIG), so that nothing it started outlives it."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass


# -- hostile connections ---------------------------------------------------------------
HOSTILE_HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
TRICKLE = b"X-a: b\r\n"  # more header lines, one byte at a time: the head never ends
# the hostile process's counters (it is their only writer), read by the benchmark
OPEN, INTEGRAL, T_LAST, CLOSED, OPENED, FAILED = range(6)


def hostile_proc(targets: list[tuple[str, int]], n: int, per_addr: int, interval: float,
                 stats: Any, stop: Any, parent: int) -> None:
    """N connections without a client certificate, each from 127.0.0.2 + i // per_addr:
    TLS handshake, a partial request head, then one byte every ``interval`` seconds.
    A connection the server closes (EOF or reset) is counted and opened again: at once
    if it lived at least ``interval``, else after a pause that doubles from 0.25 s to 4 s
    while it keeps being closed early (so a server that refuses it costs a handshake
    every few seconds, not a flood bounded only by this process's CPU)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops this process
    die_with_parent()
    # no client certificate; the server's is not checked either (an attacker would not)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def bump(field: int, delta: int) -> None:
        now = time.monotonic()
        with stats.get_lock():
            stats[INTEGRAL] += stats[OPEN] * (now - stats[T_LAST])
            stats[T_LAST] = now
            stats[field] += delta

    async def one(i: int) -> None:
        host, port = targets[i % len(targets)]
        src = str(ipaddress.IPv4Address("127.0.0.2") + i // per_addr)
        pause = 0.0
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=host, local_addr=(src, 0)), 10)
            except Exception:  # refused, reset, TLS alert, timeout, …
                bump(FAILED, 1)
                await asyncio.sleep(0.5 + random.random())
                continue
            bump(OPENED, 1)
            bump(OPEN, 1)
            opened = time.monotonic()
            async def trickle(writer: asyncio.StreamWriter) -> None:
                k = 0
                await asyncio.sleep(random.uniform(0, interval))  # spread over time
                while not writer.is_closing():
                    j = k % len(TRICKLE)
                    writer.write(TRICKLE[j:j + 1])
                    k += 1
                    await asyncio.sleep(interval)

            dripping = asyncio.get_running_loop().create_task(trickle(writer))
            try:
                with contextlib.suppress(Exception):  # reset by the server, or else: closed
                    writer.write(HOSTILE_HEAD)
                    while await reader.read(4096):  # until the server closes it (an
                        pass                        # answer before, if any)
            finally:
                dripping.cancel()
                bump(OPEN, -1)
                writer.transport.abort()
            bump(CLOSED, 1)
            if time.monotonic() - opened >= interval:
                pause = 0.0
            else:
                pause = min(4.0, max(0.25, 2 * pause))
                await asyncio.sleep(pause * random.uniform(0.75, 1.25))

    async def main() -> None:
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        while not stop.is_set() and os.getppid() == parent:
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:  # the attacker's own CPU shares the cores with the server: keep it small
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class Hostile:
    """The hostile process, seen from the benchmark: started, waited for, read, and always
    stopped (``close`` in a finally and at exit; the process also dies with its parent)."""

    def __init__(self, urls: list[str], n: int, per_addr: int, interval: float) -> None:
        self.n = n
        self.addresses = (n + per_addr - 1) // per_addr
        self.stats: Any = mp.Array("d", 6)
        self.stop = mp.Event()
        targets = [(str(u.hostname), int(u.port or 443)) for u in map(urlsplit, urls)]
        self.proc = mp.Process(target=hostile_proc, name="hostile", daemon=True, args=(
            targets, n, per_addr, interval, self.stats, self.stop, os.getpid()))

    def start(self) -> None:
        self.stats[T_LAST] = time.monotonic()
        atexit.register(self.close)
        self.proc.start()

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        with self.stats.get_lock():
            v = list(self.stats)
        v[INTEGRAL] += v[OPEN] * (now - v[T_LAST])
        return {"t": now, "open": v[OPEN], "integral": v[INTEGRAL], "closed": v[CLOSED],
                "opened": v[OPENED], "failed": v[FAILED],
                "cpu": process_cpu(self.proc.pid or 0)}

    def wait_up(self, timeout: float) -> float:
        """Until all N are open, or the count stops growing for 3 s, or ``timeout``."""
        t0 = last_t = time.monotonic()
        best = 0.0
        while (now := time.monotonic()) - t0 < timeout and self.stats[OPEN] < self.n:
            if self.stats[OPEN] > best:
                best, last_t = self.stats[OPEN], now
            elif now - last_t > 3.0 and now - t0 > 5.0:
                break
            time.sleep(0.05)
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc.pid is None:
            return
        self.stop.set()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def window(h0: dict[str, float], h1: dict[str, float]) -> dict[str, float]:
    """What the hostile connections did between two snapshots."""
    dt = max(1e-9, h1["t"] - h0["t"])
    return {"seconds": dt, "open_avg": (h1["integral"] - h0["integral"]) / dt,
            "open_end": h1["open"], "closed_by_server": h1["closed"] - h0["closed"],
            "opened": h1["opened"] - h0["opened"],
            "failed_connects": h1["failed"] - h0["failed"], "cpu_s": h1["cpu"] - h0["cpu"]}


def merge_windows(ws: list[dict[str, float]]) -> dict[str, float]:
    """Several measurement windows as one: the average open count weighted by time, the
    count at the end of the last one, the events summed."""
    total = sum(w["seconds"] for w in ws)
    out = {"seconds": total,
           "open_avg": sum(w["open_avg"] * w["seconds"] for w in ws) / max(1e-9, total),
           "open_end": ws[-1]["open_end"]}
    for k in ("closed_by_server", "opened", "failed_connects", "cpu_s"):
        out[k] = sum(w[k] for w in ws)
    return out


UNIT = "emulated"  # --unit: how --full plays the unit's side


def sample(urls: list[str], d: Path, set_id: bytes, t: bytes, conc: int, seconds: float,
           server_pids: list[int], lean: bool, full: bool,
           hostile: Hostile | None = None) -> dict[str, Any]:
    """One timed run of ``conc`` clients for ``seconds``: the raw figures."""
    procs_n = min(conc, 4)
    q: mp.Queue[tuple[list[float], int, float, str]] = mp.Queue()
    per = [conc // procs_n + (1 if i < conc % procs_n else 0) for i in range(procs_n)]
    ps = [mp.Process(target=client_proc, args=(urls[i % len(urls)], str(d), set_id, t, n,
                                               seconds, lean, full, q, UNIT == "receipt"))
          for i, n in enumerate(per)]
    for p in ps:
        p.start()
    out: dict[str, Any] = {"lat": [], "errors": 0, "client_cpu": 0.0, "first_error": "",
                           "seconds": seconds}
    done = False
    try:
        srv0 = sum(process_cpu(p) for p in server_pids)
        h0 = hostile.snapshot() if hostile else None
        for _ in ps:
            ls, e, cpu, why = q.get(timeout=seconds + 120)
            out["lat"] += ls
            out["errors"] += e
            out["client_cpu"] += cpu
            out["first_error"] = out["first_error"] or why
        out["server_cpu"] = sum(process_cpu(p) for p in server_pids) - srv0
        if hostile is not None and h0 is not None:
            out["hostile"] = window(h0, hostile.snapshot())
        done = True
    finally:
        for p in ps:
            if not done:
                p.terminate()
            p.join()
    return out


def summarize(conc: int, full: bool, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row from one or more samples (latencies pooled, counts and CPU summed)."""
    lat = sorted(x for s in samples for x in s["lat"])
    seconds = sum(s["seconds"] for s in samples)
    n = max(1, len(lat))
    row: dict[str, Any] = {
        "clients": conc, "download": "full" if full else "exportkey",
        "downloads_per_s": len(lat) / seconds,
        "server_cpu_us": 1e6 * sum(s["server_cpu"] for s in samples) / n,
        "client_cpu_us": 1e6 * sum(s["client_cpu"] for s in samples) / n,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "errors": sum(s["errors"] for s in samples)}
    if len(samples) > 1:
        row["rounds_per_s"] = [len(s["lat"]) / s["seconds"] for s in samples]
    first_error = next((s["first_error"] for s in samples if s["first_error"]), "")
    if first_error:
        row["first_error"] = first_error
    windows = [s["hostile"] for s in samples if "hostile" in s]
    if windows:
        row["hostile"] = merge_windows(windows)
    return row


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
             "--processes", str(args.workers), "--instance", f"bench-{i}",
             # the load generator is one address (127.0.0.1) opening every client's
             # connection in each round: its connect rate is lifted (the hostile
             # connections come from other addresses and keep the default)
             "--connect-rate", "1000000/1",
             *(["--state", state] if state else [])],
            stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=die_with_parent)  # the server ends with the benchmark
        assert srv.stdout is not None
        line = srv.stdout.readline()
        out.append((srv, next(t for t in line.split() if t.startswith("https://"))))
    return out


def print_row(r: dict[str, Any], hostile_column: bool) -> None:
    line = (f"{r['clients']:>7}  {r['downloads_per_s']:>11,.0f}  {r['p50_ms']:>6.1f}  "
            f"{r['p99_ms']:>6.1f}  {r['errors']:>6}  {r['server_cpu_us']:>13,.0f}"
            f"  {r['client_cpu_us']:>13,.0f}")
    if hostile_column:
        line += f"  {r['hostile']['open_avg'] if 'hostile' in r else 0:>12,.0f}"
    print(line)
    if r.get("first_error"):
        print(f"         first error: {r['first_error']}")


def run(d: Path, args: argparse.Namespace, state: str | None) -> dict[str, Any]:
    set_id, t = setup(d)
    servers = start_servers(d, args, state, args.instances)
    hostile: Hostile | None = None
    try:
        urls = [u for _, u in servers]
        pids = [s.pid for s, _ in servers]
        lean = args.client == "lean"
        concs = [int(x) for x in args.concurrency.split(",")]
        where = "PostgreSQL" if state else "SQLite"
        print(f"service: {len(urls)} instance{'s' if len(urls) > 1 else ''} ({args.http}, "
              f"{args.workers} worker{'s' if args.workers > 1 else ''} each, {where} state), "
              f"{os.cpu_count()} CPUs")
        rate = in_process_rate(d, set_id, min(args.seconds, 3.0))
        print(f"in-process EXPORTKEY: {rate:,.0f}/s")
        if args.full:
            if UNIT == "receipt":
                print("download: full (EXPORTKEY to the service, the receipt the unit computes "
                      "after IMPORTKEY, POST /v1/receipts verified there); the unit's "
                      "work is in the client CPU")
            else:
                print("download: full (a fresh emulated unit's INITIALIZE DOWNLOAD, "
                      "EXPORTKEY to the service, IMPORTKEY in the unit, POST /v1/receipts "
                      "verified there); the unit's work is in the client CPU")
        per_addr = args.hostile_per_address
        if args.hostile:
            print(f"hostile: {args.hostile} TLS connections without a client certificate, "
                  f"{per_addr} from each of {(args.hostile + per_addr - 1) // per_addr} "
                  f"loopback addresses, a request head trickled one byte every "
                  f"{args.hostile_trickle:g} s (another process); each row {args.rounds} "
                  f"x {args.seconds:g} s without and with them, taking turns")
        print("clients  downloads/s  p50 ms  p99 ms  errors  server CPU µs  client CPU µs"
              + ("  hostile open" if args.hostile else ""))
        rows: list[dict[str, Any]] = []
        hrows: list[dict[str, Any]] = []
        before: list[dict[str, float]] = []
        for c in concs:
            if not args.hostile:
                r = summarize(c, args.full, [sample(urls, d, set_id, t, c, args.seconds, pids,
                                                    lean, args.full)])
                rows.append(r)
                print_row(r, False)
                continue
            without: list[dict[str, Any]] = []
            with_: list[dict[str, Any]] = []
            for i in range(args.rounds):  # without, with; with, without; …
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    if not on:
                        without.append(sample(urls, d, set_id, t, c, args.seconds, pids,
                                              lean, args.full))
                        continue
                    hostile = Hostile(urls, args.hostile, per_addr, args.hostile_trickle)
                    hostile.start()
                    up = hostile.wait_up(15.0)
                    time.sleep(1.0)  # held a moment before the measurement starts
                    h = hostile.snapshot()
                    before.append({"clients": c, "up_s": up, "open": h["open"],
                                   "closed_by_server": h["closed"],
                                   "failed_connects": h["failed"]})
                    try:
                        with_.append(sample(urls, d, set_id, t, c, args.seconds, pids, lean,
                                            args.full, hostile))
                    finally:
                        hostile.close()
                        hostile = None
            rows.append(summarize(c, args.full, without))
            hrows.append(summarize(c, args.full, with_))
            print_row(rows[-1], True)
            print_row(hrows[-1], True)
        out: dict[str, Any] = {
            "in_process_exports_per_s": rate, "state": where.lower(),
            "instances": len(urls), "workers": args.workers,
            "download": "full" if args.full else "exportkey", "rows": rows}
        if not args.hostile:
            return out
        print("hostile connections open before each 'with' measurement: " + ", ".join(
            f"{b['open']:.0f} after {b['up_s']:.1f} s" for b in before))
        ratios = []
        for r0, r1 in zip(rows, hrows, strict=True):
            w = r1["hostile"]

            def per_round(r: dict[str, Any]) -> str:
                return " ".join(f"{x:,.0f}" for x in r.get("rounds_per_s",
                                                           [r["downloads_per_s"]]))
            print(f"{r1['clients']} clients: downloads/s per round without {per_round(r0)}, "
                  f"with {per_round(r1)}; hostile "
                  f"during the 'with' rounds: {w['open_avg']:,.1f} open on average, "
                  f"{w['open_end']:,.0f} at the end, {w['closed_by_server']:,.0f} closed by "
                  f"the server, {w['opened']:,.0f} opened, {w['failed_connects']:,.0f} failed "
                  f"connects; hostile process CPU {w['cpu_s']:.2f} s")
            ratios.append({"clients": r1["clients"],
                           "ratio": r1["downloads_per_s"] / max(1e-9, r0["downloads_per_s"]),
                           "without_per_s": r0["downloads_per_s"],
                           "with_per_s": r1["downloads_per_s"]})
        for x in ratios:
            print(f"ratio with/without {args.hostile} hostile, {x['clients']} clients: "
                  f"{x['ratio']:.2f} (target ≥ 0.80)")
        out["hostile"] = {
            "connections": args.hostile, "per_address": per_addr,
            "addresses": (args.hostile + per_addr - 1) // per_addr,
            "trickle_s": args.hostile_trickle, "rounds": args.rounds, "before": before}
        out["hostile_rows"] = hrows
        out["hostile_ratios"] = ratios
        return out
    finally:
        if hostile is not None:
            hostile.close()
        for srv, _ in servers:
            srv.terminate()
        for srv, _ in servers:
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--http", choices=["h11", "httptools"], default="httptools")
    ap.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    ap.add_argument("--client", choices=["lean", "stdlib"], default="lean",
                    help="load generator: a minimal HTTP/1.1 client over ssl sockets (lean), "
                         "or keyload's ServiceClient on http.client (stdlib)")
    ap.add_argument("--concurrency", "--clients", default="1,16,64",
                    help="numbers of concurrent clients, one row each")
    ap.add_argument("--workers", type=int, default=1, help="keyload serve --workers")
    ap.add_argument("--state", choices=["sqlite", "postgresql"], default="sqlite",
                    help="postgresql: a private server (fsync on) shared by the instances")
    ap.add_argument("--instances", type=int, default=1,
                    help="keyload serve processes (clients spread over them)")
    ap.add_argument("--full", action="store_true",
                    help="a download is INITIALIZE DOWNLOAD in a fresh emulated unit, "
                         "EXPORTKEY, the unit's IMPORTKEY and POST /v1/receipts")
    ap.add_argument("--unit", choices=["emulated", "receipt"], default="emulated",
                    help="--full: an emulated unit per download (load_key: INITIALIZE "
                         "DOWNLOAD, IMPORTKEY, KCV check), or only the receipt the unit "
                         "computes after IMPORTKEY (klp1.receipt), so that the load "
                         "generator takes less of the cores it shares with the server")
    ap.add_argument("--hostile", type=int, default=0, metavar="N",
                    help="then measure again with N TLS connections without a client "
                         "certificate trickling a request head (another process)")
    ap.add_argument("--hostile-per-address", type=int, default=10, metavar="K",
                    help="hostile connections per loopback source address (127.0.0.2, …)")
    ap.add_argument("--hostile-trickle", type=float, default=2.0, metavar="S",
                    help="seconds between two bytes of a hostile connection")
    ap.add_argument("--rounds", type=int, default=2,
                    help="with --hostile: measurements without and with them per row, "
                         "taking turns (their figures pooled)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    global UNIT
    UNIT = args.unit
    if args.instances > 1 and args.state == "sqlite":
        ap.error("several instances share PostgreSQL: --state postgresql")
    if args.hostile < 0 or args.hostile_per_address < 1 or args.hostile_trickle <= 0 or \
            args.rounds < 1:
        ap.error("--hostile N ≥ 0, --hostile-per-address ≥ 1, --hostile-trickle > 0, "
                 "--rounds ≥ 1")
    if args.hostile and (args.hostile + args.hostile_per_address - 1) // \
            args.hostile_per_address > 60000:
        ap.error("too many source addresses: raise --hostile-per-address")
    # SIGTERM unwinds like Ctrl-C: the finally blocks stop the servers and the hostile process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
