"""``keyload fetch`` never loses a receipt: the real service (uvicorn, mutual TLS on
loopback), the real CLI in a subprocess.

The key is in the unit before its receipt is posted. A receipt answered 429 is sent again
after ``Retry-After``; one that still cannot be delivered within ``--receipt-deadline`` is
kept in ``HOME/outbox/`` (exit 8: done, evidence pending) and sent by ``fetch --resend``
or by the next fetch to that server; one the service refuses for good moves to
``HOME/outbox/refused/``.

To make the service answer 429 to receipts, the real ``ServiceApp`` is wrapped in a small
ASGI gate that answers the first N ``POST /v1/receipts`` itself (429 problem+json,
``Retry-After: 1``) and hands every other request to the app.
"""

from __future__ import annotations

import itertools
import json
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyload.core import messages as msg
from keyload.core.errors import SW
from keyload.service.client import (
    Receipt,
    ServiceClient,
    ServiceRefused,
    deliver_receipt,
    parse_retry_after,
)
from keyload.service.policy import Policy
from keyload.service.runtime import Instance, open_instance
from keyload.service.server import ServerThread, bind, make_config, server_context
from keyload.units.keystore import SoftwareKeystore

from .test_service import World, build_world, policy_doc, run_cli, slot_state

pytestmark = pytest.mark.slow  # console-script loads and fetches that wait out receipt deadlines

EXIT_PENDING = 8
EXIT_FAILED = 1
EXIT_REFUSED = 6


@dataclass
class ReceiptGate:
    """ASGI: the first ``refuse`` receipt POSTs are answered ``status`` (429, with
    ``Retry-After: 1``) here; every other request goes on to the real app."""

    app: Any
    refuse: int = 0
    status: int = 429
    posts: list[float] = field(default_factory=list)  # monotonic time of each receipt POST

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                      send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and \
                scope["path"] == "/v1/receipts":
            self.posts.append(time.monotonic())
            if self.refuse > 0:
                self.refuse -= 1
                while True:  # read the request to its end before answering
                    m = await receive()
                    if m["type"] != "http.request" or not m.get("more_body"):
                        break
                slug = "rate-limited" if self.status == 429 else "receipt-recorded"
                body = json.dumps({"type": f"urn:keyload:problem:{slug}",
                                   "title": "refused", "status": self.status,
                                   "detail": f"receipt answered {self.status} (test gate)"}
                                  ).encode()
                await send({"type": "http.response.start", "status": self.status,
                            "headers": [(b"content-type", b"application/problem+json"),
                                        (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclass
class Gated:
    world: World
    inst: Instance
    server: ServerThread
    ks: SoftwareKeystore
    gate: ReceiptGate
    next_unit: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def outbox(self) -> Path:
        return self.world.home / "outbox"

    def unit(self) -> bytes:
        """A unit no test used yet (each key version loads once per slot)."""
        sn = self.world.units_a[self.next_unit]
        self.next_unit += 1
        return sn

    def stop(self) -> None:
        self.server.stop()
        self.inst.close()
        self.ks.close()


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    w = build_world(tmp_path_factory.mktemp("outbox"), units=24)
    ks = w.open_keystore()
    inst = open_instance(ks, Policy.from_json(policy_doc(w)), home_root=w.home,
                         authority_dir=w.home / "authority", audit_path=w.home / "audit.db",
                         instance="gated")
    gate = ReceiptGate(inst.app)
    ctx = server_context(w.pki / "server.pem", w.pki / "server.key", w.pki / "ca.pem")
    sock = bind("127.0.0.1", 0)
    srv = ServerThread(make_config(gate, ctx, port=sock.getsockname()[1], http="h11"), sock)
    g = Gated(w, inst, srv.start(), ks, gate)
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def clean_outbox(gated: Gated) -> Iterator[None]:
    """Each test starts with an empty outbox and an open gate."""
    _empty(gated)
    gated.gate.refuse = 0
    yield
    gated.gate.refuse = 0
    _empty(gated)


def _empty(g: Gated) -> None:
    for p in sorted(g.outbox.rglob("*"), reverse=True) if g.outbox.exists() else []:
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()


# -- helpers --------------------------------------------------------------------------
def fetch(g: Gated, *args: str, client: str = "terminal-1") -> subprocess.CompletedProcess[str]:
    cert, key = g.world.client_paths(client)
    return run_cli("fetch", "--home", str(g.world.home), "--server", g.url,
                   "--ca", str(g.world.pki / "ca.pem"), "--cert", str(cert), "--key", str(key),
                   *args)


def load(g: Gated, sn: bytes, *args: str, ref1: str = "TMK-1",
         ref2: int = 1) -> subprocess.CompletedProcess[str]:
    return fetch(g, "--sn", sn.hex(), "--ref1", ref1, "--ref2", str(ref2), *args)


def describe(p: subprocess.CompletedProcess[str]) -> str:
    return f"rc={p.returncode}\n--- stdout ---\n{p.stdout}--- stderr ---\n{p.stderr}"


def in_ledger(g: Gated, sn: bytes, r: bytes | None = None) -> list[Any]:
    return [e for e in g.inst.store.ledger() if e.sn == sn and (r is None or e.r == r)]


def pending_files(g: Gated) -> list[Path]:
    return sorted(g.outbox.glob("*.json")) if g.outbox.exists() else []


def refused_files(g: Gated) -> list[Path]:
    d = g.outbox / "refused"
    return sorted(d.glob("*.json")) if d.exists() else []


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def keep_one(g: Gated, sn: bytes, *, deadline: str = "1.5") -> tuple[dict[str, Any], Path]:
    """A fetch whose receipt cannot be delivered: the key is loaded, the receipt kept."""
    g.gate.refuse = 10**6
    p = load(g, sn, "--json", "--receipt-deadline", deadline)
    assert p.returncode == EXIT_PENDING, describe(p)
    g.gate.refuse = 0
    out = json.loads(p.stdout)
    return out, Path(out["pending"])


# -- a 429 is retried after Retry-After -----------------------------------------------
def test_receipt_answered_429_twice_is_sent_again_after_retry_after(gated: Gated) -> None:
    """Today's fetch exits 6 on the first 429 and nothing is kept: the receipt is lost."""
    g = gated
    sn = g.unit()
    g.gate.refuse = 2
    n = len(g.gate.posts)
    p = load(g, sn, "--json")  # the default deadline (30 s)
    assert p.returncode == 0, describe(p)
    out = json.loads(p.stdout)
    assert out["ledger"] is True and out["pending"] is None and out["resent"] == []
    posts = g.gate.posts[n:]
    assert len(posts) == 3, posts  # 429, 429, recorded
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(posts)), posts
    [entry] = in_ledger(g, sn)
    assert entry.kcv.hex().upper() == out["kcv"] and entry.rct.hex() == out["receipt"]
    assert pending_files(g) == []
    assert "IS loaded" not in p.stderr


# -- kept in the outbox, then resent ----------------------------------------------------
def test_receipt_refused_past_the_deadline_is_kept_and_resent(gated: Gated) -> None:
    g = gated
    w = g.world
    sn = g.unit()
    g.gate.refuse = 10**6
    n = len(g.gate.posts)
    t0 = time.monotonic()
    p = load(g, sn, "--receipt-deadline", "2")
    took = time.monotonic() - t0
    g.gate.refuse = 0
    assert p.returncode == EXIT_PENDING, describe(p)
    assert "Traceback" not in p.stdout + p.stderr
    posts = g.gate.posts[n:]
    assert 2 <= len(posts) <= 4, posts  # Retry-After: 1, within 2 s
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(posts)), posts
    assert took < 20, took
    # the key IS in the unit, and the output says so and where the receipt is
    st = slot_state(w, sn, 1)
    assert st.state == msg.SLOT_LOADED and st.kcv is not None
    [kept] = pending_files(g)
    assert "the key IS loaded" in p.stderr and str(kept) in p.stderr
    assert "--resend" in p.stderr and g.url in p.stderr and "HTTP 429" in p.stderr
    assert "NOT recorded yet" in p.stdout and str(kept) in p.stdout
    assert in_ledger(g, sn) == []
    # the file: 0600 in a 0700 directory, the receipt and what the operator needs
    assert mode(g.outbox) == 0o700 and mode(kept) == 0o600
    doc = json.loads(kept.read_text())
    assert {"server", "url", "sn", "r", "ref2", "kcv", "rct", "ref1", "set_id", "suite",
            "key_version", "time", "last_error", "attempts"} <= set(doc)
    assert doc["url"] == g.url and doc["sn"] == sn.hex() and doc["ref2"] == 1
    assert doc["ref1"] == "TMK-1" and doc["key_version"] == 1
    assert doc["set_id"] == w.set_a.hex() and doc["kcv"] == st.kcv.hex()
    assert "429" in doc["last_error"] and doc["attempts"] == len(posts)
    assert not [f for f in g.outbox.iterdir() if f.name.startswith(".")]  # no temp file left
    # --resend (no unit, no REF1/REF2) against the open service: recorded, file removed
    r = fetch(g, "--resend", "--json")
    assert r.returncode == 0, describe(r)
    [sent] = json.loads(r.stdout)["resent"]
    assert sent["status"] == "recorded" and sent["ledger"] is True and sent["sn"] == sn.hex()
    assert sent["file"] == str(kept) and sent["path"] is None
    [entry] = in_ledger(g, sn)
    assert entry.rct.hex() == doc["rct"] and entry.r.hex() == doc["r"]
    assert pending_files(g) == []
    # the authority accepts every receipt of the service's ledger
    v = run_cli("ledger", "verify", "--home", str(w.home), "--json")
    assert v.returncode == 0, describe(v)
    assert json.loads(v.stdout)["service"]["invalid"] == 0
    # nothing left to send
    r = fetch(g, "--resend")
    assert r.returncode == 0 and "no pending receipts" in r.stdout, describe(r)
    # the unit refuses the same key version again: the receipt was the only evidence
    again = load(g, sn)
    assert again.returncode == EXIT_REFUSED and "6986" in again.stderr, describe(again)
    assert len(in_ledger(g, sn)) == 1


def test_next_fetch_sends_pending_receipts_first_oldest_first(gated: Gated) -> None:
    g = gated
    first, second, third = g.unit(), g.unit(), g.unit()
    _, kept1 = keep_one(g, first)
    _, kept2 = keep_one(g, second)
    assert kept1.name < kept2.name  # names sort oldest first
    p = load(g, third, "--json")
    assert p.returncode == 0, describe(p)
    out = json.loads(p.stdout)
    assert out["ledger"] is True and out["pending"] is None
    assert [(e["sn"], e["status"]) for e in out["resent"]] == [
        (first.hex(), "recorded"), (second.hex(), "recorded")]
    assert pending_files(g) == []
    ledger = g.inst.store.ledger()
    order = [e.sn for e in ledger if e.sn in (first, second, third)]
    assert order == [first, second, third]
    # text output reports them too
    fourth = g.unit()
    keep_one(g, fourth)
    p = load(g, g.unit())
    assert p.returncode == 0, describe(p)
    assert f"resent the receipt of unit {fourth.hex()} slot 1" in p.stdout
    assert "recorded by the service" in p.stdout


def test_pending_receipts_stay_pending_while_the_service_refuses_them(gated: Gated) -> None:
    g = gated
    a, b = g.unit(), g.unit()
    _, kept_a = keep_one(g, a)
    _, kept_b = keep_one(g, b)
    before, before_b = json.loads(kept_a.read_text()), json.loads(kept_b.read_text())
    g.gate.refuse = 10**6
    n = len(g.gate.posts)
    r = fetch(g, "--resend", "--json", "--receipt-deadline", "1")
    assert r.returncode == EXIT_PENDING, describe(r)
    resent = json.loads(r.stdout)["resent"]
    assert [(e["sn"], e["status"]) for e in resent] == [(a.hex(), "pending"),
                                                       (b.hex(), "pending")]
    assert "429" in resent[0]["detail"] and "not sent" in resent[1]["detail"]
    # only the oldest was tried; the younger one waited
    posts = len(g.gate.posts) - n
    after = json.loads(kept_a.read_text())
    assert after["attempts"] == before["attempts"] + posts
    assert json.loads(kept_b.read_text()) == before_b
    assert pending_files(g) == [kept_a, kept_b] and refused_files(g) == []
    assert in_ledger(g, a) == [] and in_ledger(g, b) == []
    g.gate.refuse = 0
    r = fetch(g, "--resend")
    assert r.returncode == 0, describe(r)
    assert len(in_ledger(g, a)) == 1 and len(in_ledger(g, b)) == 1


def test_transport_failure_keeps_the_receipt(gated: Gated, tmp_path: Path) -> None:
    """No service at that address at all: --resend keeps the receipts pending (exit 8)."""
    g = gated
    sn = g.unit()
    _, kept = keep_one(g, sn)
    doc = json.loads(kept.read_text())
    # move the receipt to a server that is not there: the same file, another URL
    closed = bind("127.0.0.1", 0)
    url = f"https://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    kept.write_text(json.dumps(dict(doc, url=url, server=f"{url}")))
    cert, key = g.world.client_paths("terminal-1")
    r = run_cli("fetch", "--home", str(g.world.home), "--server", url, "--resend", "--json",
                "--receipt-deadline", "1", "--ca", str(g.world.pki / "ca.pem"),
                "--cert", str(cert), "--key", str(key))
    assert r.returncode == EXIT_PENDING, describe(r)
    [e] = json.loads(r.stdout)["resent"]
    assert e["status"] == "pending" and "service 127.0.0.1" in e["detail"]
    assert pending_files(g) == [kept] and json.loads(kept.read_text())["attempts"] >= 2
    # the receipts of one server are not sent to another
    r = fetch(g, "--resend", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resent"] == [], describe(r)


# -- refused for good: moved to refused/ ---------------------------------------------
def test_pending_receipt_of_another_client_is_refused_404(gated: Gated) -> None:
    g = gated
    sn = g.unit()
    _, kept = keep_one(g, sn)
    r = fetch(g, "--resend", "--json", client="other")  # not the client that loaded it
    assert r.returncode == EXIT_FAILED, describe(r)
    [e] = json.loads(r.stdout)["resent"]
    assert e["status"] == "refused" and "HTTP 404 unknown-export" in e["detail"]
    assert "refused 1 pending receipt(s) for good" in r.stderr
    assert pending_files(g) == []
    [moved] = refused_files(g)
    assert moved.name == kept.name and e["path"] == str(moved)
    assert mode(g.outbox / "refused") == 0o700 and mode(moved) == 0o600
    doc = json.loads(moved.read_text())
    assert doc["refused"]["status"] == 404 and "unknown-export" in doc["refused"]["reason"]
    assert doc["sn"] == sn.hex() and doc["rct"]  # the evidence is still there
    assert in_ledger(g, sn) == []
    # refused/ is not pending: nothing more is sent
    r = fetch(g, "--resend")
    assert r.returncode == 0 and "no pending receipts" in r.stdout, describe(r)


@pytest.mark.parametrize(("case", "status", "slug"), [
    ("another receipt recorded", 409, "receipt-recorded"),
    ("forged receipt", 422, "receipt-invalid"),
])
def test_pending_receipt_the_service_will_never_take_moves_to_refused(
        gated: Gated, case: str, status: int, slug: str) -> None:
    g = gated
    sn = g.unit()
    _, kept = keep_one(g, sn)
    doc = json.loads(kept.read_text())
    if status == 409:  # the real receipt got through some other way; the file is damaged
        c = g.world.client(g.url)
        try:
            assert c.post_receipt(Receipt.from_body(doc))["status"] == "recorded"
        finally:
            c.close()
    kept.write_text(json.dumps(dict(doc, rct="00" * len(bytes.fromhex(doc["rct"])))))
    r = fetch(g, "--resend")
    assert r.returncode == EXIT_FAILED, describe(r)
    assert f"HTTP {status} {slug}" in r.stdout and "REFUSED" in r.stdout, case
    [moved] = refused_files(g)
    assert json.loads(moved.read_text())["refused"]["status"] == status
    assert pending_files(g) == []
    assert len(in_ledger(g, sn)) == (1 if status == 409 else 0)


def test_pending_receipt_already_recorded_is_answered_200_and_removed(gated: Gated) -> None:
    """The service recorded it but the answer was lost: the resend is answered 200."""
    g = gated
    sn = g.unit()
    _, kept = keep_one(g, sn)
    c: ServiceClient = g.world.client(g.url)
    try:
        c.post_receipt(Receipt.from_body(json.loads(kept.read_text())))
    finally:
        c.close()
    r = fetch(g, "--resend", "--json")
    assert r.returncode == 0, describe(r)
    [e] = json.loads(r.stdout)["resent"]
    assert e["status"] == "recorded" and pending_files(g) == [] and refused_files(g) == []
    assert len(in_ledger(g, sn)) == 1


def test_own_receipt_refused_for_good_is_kept_in_refused(gated: Gated) -> None:
    """A receipt refused at once (the gate answers 409 this time) is not retried, but it
    is kept all the same, in refused/, and fetch fails with the refusal's exit code."""
    g = gated
    sn = g.unit()
    g.gate.status, g.gate.refuse = 409, 1
    n = len(g.gate.posts)
    try:
        p = load(g, sn, "--json")
    finally:
        g.gate.status = 429
    assert p.returncode == EXIT_REFUSED, describe(p)
    assert len(g.gate.posts) - n == 1  # refused for good: not sent again
    assert "the key IS loaded" in p.stderr and "HTTP 409" in p.stderr
    assert p.stderr.splitlines()[-1].startswith("keyload: error: service refused (HTTP 409")
    assert slot_state(g.world, sn, 1).state == msg.SLOT_LOADED
    assert pending_files(g) == []
    [kept] = refused_files(g)
    assert str(kept) in p.stderr and mode(kept) == 0o600
    doc = json.loads(kept.read_text())
    assert doc["refused"]["status"] == 409 and doc["sn"] == sn.hex()
    assert in_ledger(g, sn) == []


def test_service_refused_is_a_status_error_of_6986() -> None:
    e = ServiceRefused(429, "rate-limited", "too many requests", 2.0)
    assert e.sw == SW.POLICY and e.code == 0x6986
    assert str(e) == "service refused (HTTP 429 rate-limited): too many requests"
    assert e.detail == "HTTP 429 rate-limited: too many requests"
    assert (e.status, e.slug, e.retry_after) == (429, "rate-limited", 2.0)


# -- the client: Retry-After, and never sleeping past the deadline ------------------------
def test_reply_and_refusal_carry_retry_after(gated: Gated) -> None:
    g = gated
    g.gate.refuse = 1
    c = g.world.client(g.url)
    bogus = Receipt(b"\x01" * 5, b"\x02" * 16, 1, b"\x03" * 5, b"\x04" * 16)
    try:
        reply = c.send_receipt(bogus)
        assert reply.status == 429 and reply.retry_after == 1.0
        err = c.refusal(reply)
        assert isinstance(err, ServiceRefused) and err.status == 429
        assert err.retry_after == 1.0 and err.slug == "rate-limited"
        # the real service (no gate now): a receipt for an unknown export, no Retry-After
        reply = c.send_receipt(bogus)
        assert reply.status == 404 and reply.retry_after is None
        with pytest.raises(ServiceRefused) as ei:
            c.post_receipt(bogus)
        assert ei.value.status == 404 and ei.value.retry_after is None
    finally:
        c.close()


def test_delivery_never_sleeps_past_its_deadline(gated: Gated) -> None:
    g = gated
    g.gate.refuse = 10**6
    c = g.world.client(g.url)
    bogus = Receipt(b"\x01" * 5, b"\x02" * 16, 1, b"\x03" * 5, b"\x04" * 16)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    try:
        t0 = time.monotonic()
        d = deliver_receipt(c, bogus, until=t0 + 0.3, sleep=sleep)
        took = time.monotonic() - t0
        assert d.outcome == "pending" and d.status == 429 and "HTTP 429" in d.error
        assert d.attempts == 2 and len(slept) == 1 and slept[0] <= 0.3  # not Retry-After: 1
        assert took < 0.9, took
        d = deliver_receipt(c, bogus, until=time.monotonic())  # no time at all: one try
        assert d.outcome == "pending" and d.attempts == 1
        g.gate.refuse = 0
        d = deliver_receipt(c, bogus, until=time.monotonic() + 5)  # refused at once
        assert d.outcome == "refused" and d.status == 404 and d.attempts == 1
    finally:
        c.close()


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("") is None
    assert parse_retry_after("soon") is None and parse_retry_after("-1") is None
    assert parse_retry_after("１") is None  # digits, but not ASCII ones
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT",
                             now=1445412480.0 - 10) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 + 5) == 0.0


# -- arguments ------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "needle"), [
    (("--resend", "--sn", "0A0B0C0001"), "--resend"),
    (("--resend", "--ref1", "TMK-1"), "--resend"),
    (("--sn", "0A0B0C0001", "--ref2", "1"), "--ref1"),
    (("--sn", "0A0B0C0001", "--ref1", "TMK-1"), "--ref2"),
    (("--ref1", "TMK-1", "--ref2", "1"), "--sn"),
    (("--resend", "--receipt-deadline", "-1"), "--receipt-deadline"),
    (("--resend", "--receipt-deadline", "nan"), "--receipt-deadline"),
])
def test_fetch_argument_errors_are_usage_errors(gated: Gated, args: tuple[str, ...],
                                                needle: str) -> None:
    n = len(gated.gate.posts)
    p = fetch(gated, *args)
    assert p.returncode == 2, describe(p)
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(gated.gate.posts) == n


def test_fetch_help_documents_the_outbox_and_exit_8() -> None:
    p = run_cli("fetch", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "--resend" in text and "--receipt-deadline" in text
    assert "HOME/outbox/" in text and "exits 8" in text and "refused/" in text
