"""Virtual cards for vpcd: a card application served to pcscd over TCP, one card or a feed.

vpcd (the vsmartcard reader driver loaded by pcscd) listens on TCP ports 35963 and 35964
(all interfaces), one reader per port; a virtual card connects to it as a TCP client.
Frames, both ways: a 2-byte big-endian length, then the payload. A 1-byte payload from
vpcd is a control: ``0`` power off, ``1`` power on, ``2`` reset, ``4`` get ATR (answered
with the ATR; pcscd also asks for it every 400 ms as its presence check). Any longer
payload is a C-APDU, answered with the R-APDU (data || SW1 SW2). Nothing else is answered.

Latency: Linux delays the ACK of a small segment when it thinks more is coming (delayed
ACK), and vpcd waits for it: about 40 ms per APDU. ``TCP_QUICKACK`` is not sticky, so it
is re-armed before every read; one APDU then takes about 0.05 ms (measured here: 47 ms
without, 58 us with).

Between vpcd and the application sits a small *card OS* (:class:`CardOS`), as on a real
card: it answers power and ATR requests, resets the application (``app.reset()`` when it
has one: a unit loses its pending challenge) on power off and reset, assembles command
chains (CLA bit ``0x10``) when the ATR says the card does chaining, refuses extended
length when the ATR says it does not (and then hands out an answer longer than 256 bytes
in pieces: the first Ne bytes with ``61xx``, the rest by GET RESPONSE), and with
``t0=True`` behaves like a T=0 card: ``61xx`` + GET RESPONSE for case 4 commands,
``6Cxx`` for a case 2 command with the wrong Le. The application only ever sees whole
commands.

Suite 0x03 (docs/protocol.md §10) is why long messages matter: INITIALIZE DOWNLOAD of a unit
of an identity set answers about 300 bytes (E_U, C_U, sigU), EXPORTKEY asks with about 350
and answers with about 420 (C_A), IMPORTKEY sends about 400. vpcd and pcscd here carry
extended APDUs both ways over T=1 unchanged, so an extended-length card (the default ATR)
gets each message in one APDU; a card whose ATR announces chaining without extended
length gets chained commands and answers in 256-byte pieces; a T=0 card, chains and
GET RESPONSE. The unit and authority applications are the same in all three.

:class:`VirtualCard` keeps one card in a reader until stopped (or :meth:`VirtualCard.remove`
pulls it out, also in the middle of a command). :class:`CardFeeder` presents a series of
cards the way a personalization machine feeds them: each card stays until the reader
powers it off after it served at least one command (the station disconnected with the
UNPOWER or EJECT disposition), then it is removed (socket closed) and the next one is
inserted (new connection); pcscd notices removal and insertion on its next polls.

An authority is served as a card the same way: ``VirtualCard(authority, 35964)`` (its
``process_apdu`` answers SELECT of ``F04B4C50314153`` and EXPORTKEY).

Not enforced: anything about who connects. vpcd itself listens on all interfaces; keep
those ports firewalled on a station.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from ..core.apdu import CommandAPDU, sw_bytes
from ..core.errors import TransportError, WrongLength
from ..transports.local import CardApplication

log = logging.getLogger("keyload.vcard")

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963  # reader "Virtual PCD 00 00"; 35964 is "Virtual PCD 00 01"

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_LAST_OF_CHAIN_EXPECTED = 0x6883
SW_CHAINING_UNSUPPORTED = 0x6884
SW_NO_RESPONSE = 0x6985  # GET RESPONSE with nothing pending: conditions of use not satisfied

LongApdus = Literal["extended", "chaining"]


def make_atr(*, t0: bool = False, extended: bool = True, chaining: bool = False,
             name: bytes = b"KLP1") -> bytes:
    """An ATR offering T=1 (or T=0 only with ``t0``) whose historical bytes carry the card
    capabilities (ISO/IEC 7816-4 §12.1.1.9, third software function table: b8 command
    chaining, b7 extended Lc and Le) and ``name`` as the card issuer's data.

    >>> make_atr().hex()
    '3b8a018073800040544b4c50318a'
    """
    if len(name) > 15:
        raise ValueError("issuer data is at most 15 bytes")
    caps = (0x80 if chaining else 0) | (0x40 if extended else 0)
    hist = bytes((0x80, 0x73, 0x80, 0x00, caps, 0x50 | len(name))) + name
    if len(hist) > 15:
        raise ValueError("too many historical bytes")
    if t0:  # no TD1: T=0 only, no TCK
        return bytes((0x3B, len(hist))) + hist
    body = bytes((0x80 | len(hist), 0x01)) + hist  # TD1: T=1, no more interface bytes
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes((tck,))


DEFAULT_ATR = make_atr()


@dataclass
class CardStats:
    """What the card saw (counters only, never data)."""

    commands: int = 0  # C-APDUs received, including chained pieces and GET RESPONSE
    delivered: int = 0  # whole commands handed to the application
    power_ons: int = 0
    power_offs: int = 0
    resets: int = 0


class CardOS:
    """The card side between vpcd frames and the application (see the module docstring)."""

    def __init__(self, app: CardApplication, *, atr: bytes | None = None,
                 long_apdus: LongApdus = "extended", t0: bool = False) -> None:
        self.app = app
        self.long_apdus: LongApdus = long_apdus
        self.t0 = t0
        self.atr = atr if atr is not None else make_atr(
            t0=t0, extended=long_apdus == "extended", chaining=long_apdus == "chaining")
        self.stats = CardStats()
        self.powered = False
        self.used = False  # served a command since it was inserted
        self._chain: tuple[bytes, bytearray] | None = None  # (CLA INS P1 P2, data so far)
        self._pending: bytes = b""  # response data waiting for GET RESPONSE (t0)
        self._retry: tuple[bytes, bytes] | None = None  # (command without Le, R-APDU) for 6Cxx

    # -- control frames ---------------------------------------------------------
    def control(self, code: int) -> bytes | None:
        """A 1-byte frame; returns the answer (the ATR) or None (no answer is sent)."""
        if code == CTRL_ATR:
            return self.atr
        if code == CTRL_ON:
            self.stats.power_ons += 1
            self.powered = True
        elif code == CTRL_OFF:
            self.stats.power_offs += 1
            self.powered = False
            self._lose_volatile_state()
        elif code == CTRL_RESET:
            self.stats.resets += 1
            self.powered = True
            self._lose_volatile_state()
        return None

    def _lose_volatile_state(self) -> None:
        self._chain = None
        self._pending = b""
        self._retry = None
        reset: Callable[[], None] | None = getattr(self.app, "reset", None)
        if reset is not None:
            reset()

    # -- commands -----------------------------------------------------------------
    def command(self, apdu: bytes) -> bytes:
        """One C-APDU from the reader; returns the R-APDU."""
        self.stats.commands += 1
        self.used = True
        if len(apdu) < 4:
            return sw_bytes(SW_WRONG_LENGTH)
        cla, ins = apdu[0], apdu[1]
        if ins == 0xC0 and (cla & 0x60) == 0 and self._chain is None:
            return self._get_response(apdu)
        self._pending = b""
        chained = (cla & 0x60) == 0 and bool(cla & 0x10)
        if chained or self._chain is not None:
            whole = self._chain_piece(apdu, chained)
            if whole is None or len(whole) == 2:
                return whole if whole is not None else sw_bytes(SW_OK)
            apdu = whole
        elif len(apdu) >= 7 and apdu[4] == 0 and self.long_apdus != "extended":
            return sw_bytes(SW_WRONG_LENGTH)  # extended length not supported by this card
        return self._deliver(apdu)

    def _chain_piece(self, apdu: bytes, chained: bool) -> bytes | None:
        """Add one piece of a chain; None while the chain goes on, the whole command at
        its end, or a 2-byte status word on error."""
        if self.long_apdus != "chaining":
            self._chain = None
            return sw_bytes(SW_CHAINING_UNSUPPORTED)
        try:
            cmd = CommandAPDU.decode(apdu)
        except WrongLength:
            self._chain = None
            return sw_bytes(SW_WRONG_LENGTH)
        if len(apdu) >= 7 and apdu[4] == 0:  # pieces are short APDUs
            self._chain = None
            return sw_bytes(SW_WRONG_LENGTH)
        head = bytes((cmd.cla & ~0x10 & 0xFF, cmd.ins, cmd.p1, cmd.p2))
        if self._chain is not None and self._chain[0] != head:
            self._chain = None
            return sw_bytes(SW_LAST_OF_CHAIN_EXPECTED)
        if self._chain is None:
            self._chain = (head, bytearray())
        self._chain[1].extend(cmd.data)
        if chained:
            if cmd.ne:
                self._chain = None
                return sw_bytes(SW_WRONG_LENGTH)
            return None
        data = bytes(self._chain[1])
        self._chain = None
        ne = cmd.ne
        if ne == 256 and len(data) > 255:
            ne = 65536  # the reader asked "all": keep that meaning in extended form
        return CommandAPDU(head[0], head[1], head[2], head[3], data, ne=ne).encode()

    def _deliver(self, apdu: bytes) -> bytes:
        if self.t0:
            return self._deliver_t0(apdu)
        self.stats.delivered += 1
        r = self.app.process_apdu(apdu)
        if self.long_apdus == "extended" or len(r) <= 256 + 2 or r[-2:] != b"\x90\x00":
            return r
        return self._in_pieces(apdu, r[:-2])

    def _in_pieces(self, apdu: bytes, data: bytes) -> bytes:
        """A card without extended length answers at most 256 bytes at a time: the first
        Ne of them with ``61xx``, the rest by GET RESPONSE (ISO/IEC 7816-4 §5.3.4)."""
        try:
            ne = min(CommandAPDU.decode(apdu).ne or 256, 256)
        except WrongLength:
            ne = 256
        chunk, self._pending = data[:ne], data[ne:]
        return chunk + bytes((0x61, min(len(self._pending), 256) & 0xFF))

    def _deliver_t0(self, apdu: bytes) -> bytes:
        """T=0 behaviour: 61xx for response data of a case 4 command, 6Cxx for a case 2
        command whose Le is not the length of the data (checked, as on a real card, before
        the command takes effect: the answer is kept for the corrected command)."""
        try:
            cmd = CommandAPDU.decode(apdu)
        except WrongLength:
            return sw_bytes(SW_WRONG_LENGTH)
        bare = CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data).encode()
        retry, self._retry = self._retry, None
        if retry is not None and retry[0] == bare and cmd.ne and not cmd.data:
            r = retry[1]
        else:
            self.stats.delivered += 1
            r = self.app.process_apdu(apdu)
        data, sw = r[:-2], r[-2:]
        if not data or sw != b"\x90\x00":
            return r
        if cmd.data:  # case 4: announce the data, served by GET RESPONSE
            self._pending = data
            return bytes((0x61, min(len(data), 256) & 0xFF))
        if len(data) > 256:
            return self._in_pieces(apdu, data)
        if cmd.ne != len(data):
            self._retry = (bare, data + sw)
            return bytes((0x6C, len(data) & 0xFF))
        return r

    def _get_response(self, apdu: bytes) -> bytes:
        if not self._pending:
            return sw_bytes(SW_NO_RESPONSE)
        try:
            ne = CommandAPDU.decode(apdu).ne or 256
        except WrongLength:
            return sw_bytes(SW_WRONG_LENGTH)
        avail = min(len(self._pending), 256)
        if self.t0 and ne != avail:
            return bytes((0x6C, avail & 0xFF))
        chunk, self._pending = self._pending[:ne], self._pending[ne:]
        if self._pending:
            return chunk + bytes((0x61, min(len(self._pending), 256) & 0xFF))
        return chunk + sw_bytes(SW_OK)


class _Link:
    """One TCP connection to vpcd (= a card in the reader)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"vpcd does not accept a card on {host}:{port} ({e}); is "
                                 "pcscd running with the vpcd reader?") from None
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closed = False

    def _read_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            # Re-armed before every read: the kernel drops back to delayed ACKs.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            try:
                chunk = self.sock.recv(n - len(buf), socket.MSG_WAITALL)
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def read(self) -> bytes | None:
        """The next frame's payload, or None when vpcd (or :meth:`shutdown`) closed it."""
        head = self._read_exact(2)
        if head is None:
            return None
        (n,) = struct.unpack(">H", head)
        return self._read_exact(n) if n else b""

    def write(self, payload: bytes) -> bool:
        if len(payload) > 0xFFFF:
            raise ValueError("frame too long for vpcd")
        try:
            self.sock.sendall(struct.pack(">H", len(payload)) + payload)
        except OSError:
            return False
        return True

    def shutdown(self) -> None:
        """Wake the reading thread (thread-safe): the card is pulled out."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()


class VirtualCard:
    """One card application in one vpcd reader, served by a thread.

    ``start()`` inserts the card (connects; pcscd sees it on its next poll), ``stop()``
    removes it and waits for the thread; also a context manager. ``remove()`` pulls the
    card out at once, from any thread, also from inside the application while it handles
    a command: that command is then never answered.

    ``swap``: called when the reader powers the card off after it served a command; a
    non-None application returned replaces the current one on the same connection (a
    card exchanged without the reader seeing a removal; used by :class:`CardFeeder`).
    """

    def __init__(self, app: CardApplication, port: int = VPCD_PORT, *, host: str = VPCD_HOST,
                 atr: bytes | None = None, long_apdus: LongApdus = "extended", t0: bool = False,
                 connect_timeout: float = 5.0,
                 swap: Callable[[], CardApplication | None] | None = None) -> None:
        self.port = port
        self.host = host
        self._opts = (atr, long_apdus, t0)
        self.os = CardOS(app, atr=atr, long_apdus=long_apdus, t0=t0)
        self.connect_timeout = connect_timeout
        self.swap = swap
        self.done = threading.Event()  # powered off after serving a command
        self.gone = threading.Event()  # the connection ended (removed, or vpcd closed it)
        self.changed = threading.Event()  # done or gone
        self._link: _Link | None = None
        self._thread: threading.Thread | None = None
        self._removed = False

    @property
    def app(self) -> CardApplication:
        return self.os.app

    @property
    def stats(self) -> CardStats:
        return self.os.stats

    def start(self) -> VirtualCard:
        if self._thread is not None:
            raise RuntimeError("card already started")
        self._link = _Link(self.host, self.port, self.connect_timeout)
        self._thread = threading.Thread(target=self._run, name=f"vcard:{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def remove(self) -> None:
        self._removed = True
        if self._link is not None:
            self._link.shutdown()

    def stop(self, timeout: float = 5.0) -> None:
        self.remove()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> VirtualCard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        link = self._link
        assert link is not None
        try:
            while not self._removed:
                frame = link.read()
                if frame is None or self._removed:
                    break
                if len(frame) == 1:
                    answer = self.os.control(frame[0])
                    if frame[0] == CTRL_OFF and self.os.used:
                        self._powered_off_after_use()
                else:
                    try:
                        answer = self.os.command(frame)
                    except Exception:  # an application must not take the reader down
                        log.exception("card application failed")
                        answer = sw_bytes(0x6F00)
                if self._removed:
                    break  # pulled out while the command ran: no answer
                if answer is not None and not link.write(answer):
                    break
        finally:
            link.close()
            self.gone.set()
            self.changed.set()

    def _powered_off_after_use(self) -> None:
        nxt = self.swap() if self.swap is not None else None
        if nxt is None:
            self.done.set()
            self.changed.set()
            return
        atr, long_apdus, t0 = self._opts
        stats = self.os.stats
        self.os = CardOS(nxt, atr=atr, long_apdus=long_apdus, t0=t0)
        self.os.stats = stats


class CardFeeder:
    """Feeds card applications one after another into one vpcd reader.

    Each card stays in the reader until the reader powers it off after it served at least
    one command (the station is done and disconnected with UNPOWER or EJECT; pcscd's own
    power-off of a card nobody used does not count). With ``remove=True`` (the default,
    what a machine does) the card is then removed and the next one inserted, which pcscd
    notices on its next two presence polls (vpcd is polled every 400 ms: this, not the
    APDUs, bounds the feed rate). With ``remove=False`` the next card takes the place of
    the last one on the same connection, without the reader seeing a removal: only useful
    to measure the APDU path (a station must then not wait for a removal, see
    ``cards_in_reader(..., expect_removal=False)``).

    :attr:`in_reader` / :attr:`sn_in_reader` say which card is in the reader now,
    :attr:`fed` lists the SNs of the cards presented so far (``app.sn`` when the
    application has one, else None), :attr:`finished` counts the cards the station is
    done with. :meth:`wait` returns once every card was fed and finished.
    """

    def __init__(self, apps: Iterable[CardApplication], port: int = VPCD_PORT, *,
                 host: str = VPCD_HOST, remove: bool = True, atr: bytes | None = None,
                 long_apdus: LongApdus = "extended", t0: bool = False) -> None:
        self._apps: Iterator[CardApplication] = iter(apps)
        self.port = port
        self.host = host
        self.remove = remove
        self._opts: tuple[bytes | None, LongApdus, bool] = (atr, long_apdus, t0)
        self.fed: list[bytes | None] = []
        self.finished = 0
        self.in_reader: CardApplication | None = None
        self.error: BaseException | None = None
        self.all_done = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._card: VirtualCard | None = None
        self._thread: threading.Thread | None = None

    @property
    def sn_in_reader(self) -> bytes | None:
        app = self.in_reader
        return None if app is None else _sn_of(app)

    def start(self) -> CardFeeder:
        if self._thread is not None:
            raise RuntimeError("feeder already started")
        self._thread = threading.Thread(target=self._run, name=f"feeder:{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop feeding and remove the card in the reader, if any."""
        self._stop.set()
        with self._lock:
            card = self._card
        if card is not None:
            card.remove()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every card was fed and finished (or the feeder stopped)."""
        return self.all_done.wait(timeout)

    def __enter__(self) -> CardFeeder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_app(self) -> CardApplication | None:
        app = None if self._stop.is_set() else next(self._apps, None)
        self.in_reader = app
        if app is not None:
            self.fed.append(_sn_of(app))
        return app

    def _swap(self) -> CardApplication | None:
        self.finished += 1
        return self._next_app()

    def _run(self) -> None:
        atr, long_apdus, t0 = self._opts
        try:
            app = self._next_app()
            while app is not None:
                card = VirtualCard(app, self.port, host=self.host, atr=atr,
                                   long_apdus=long_apdus, t0=t0,
                                   swap=None if self.remove else self._swap)
                with self._lock:
                    if self._stop.is_set():
                        break
                    self._card = card
                card.start()
                card.changed.wait()
                finished = card.done.is_set()
                card.stop()  # removed
                self.in_reader = None
                if not finished:
                    break  # stopped, or vpcd went away
                if self.remove:
                    self.finished += 1
                    app = self._next_app()
                else:
                    app = None  # the swap callback ran out of cards
        except BaseException as e:  # kept and logged, never silent
            self.error = e
            log.error("card feeder on port %d failed: %s", self.port, e)
        finally:
            self.in_reader = None
            with self._lock:
                self._card = None
            self.all_done.set()


def _sn_of(app: CardApplication) -> bytes | None:
    sn = getattr(app, "sn", None)
    return sn if isinstance(sn, bytes) else None


__all__ = ["DEFAULT_ATR", "VPCD_HOST", "VPCD_PORT", "CardFeeder", "CardOS", "CardStats",
           "LongApdus", "VirtualCard", "make_atr"]
