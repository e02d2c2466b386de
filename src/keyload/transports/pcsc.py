"""PC/SC readers through pyscard: a connection to the card in a reader, and card feeds.

:class:`PcscConnection` is a :class:`~keyload.transports.Connection` (``transmit(apdu)
-> rapdu``) on ``SCardTransmit``, with the two ISO/IEC 7816-4 wrappers of
:mod:`keyload.transports.iso7816` stacked in it: :class:`~.iso7816.GetResponse` (61xx,
6Cxx) on every command, :class:`~.iso7816.CommandChaining` on long ones when chaining is
the way to send them.

Long commands: KLP1 (docs/protocol.md §5) specifies *extended length*, so extended length
is sent as is, which PC/SC passes through over T=1 (vpcd and pcscd too, both ways).
Chaining is used only when the card says it does chaining and either says it has no
extended length (card capabilities in the ATR's historical bytes, ISO/IEC 7816-4
§12.1.1.9), or the reader says it cannot carry one (``SCARD_ATTR_MAXINPUT``, short-APDU
CCID readers), or the protocol is T=0 (which cannot carry an extended APDU without
ENVELOPE, not implemented); ``long_apdus=`` forces either. A chained command asks for at
most 256 bytes of answer: a longer one comes back as ``61xx`` and GET RESPONSE, which
every command goes through anyway. Suites 0x01 and 0x02 stay under 255 bytes (the longest
IMPORTKEY is about 180); suite 0x03 (§10) does not: INITIALIZE DOWNLOAD answers about 300
bytes, EXPORTKEY sends about 350 and answers about 420, IMPORTKEY sends about 400.

Errors: every PC/SC failure becomes a :class:`~keyload.core.errors.TransportError`
naming the reader and what happened (no card, card removed, reader gone, pcscd not
running, protocol refused, ...), with the PC/SC code in ``.code``. Status words are not
checked here (that is :meth:`keyload.core.apdu.ResponseAPDU.check`'s job).

:func:`cards_in_reader` yields one :class:`PcscUnitSource` per card fed into a reader,
for :func:`keyload.station.customize.customize`. A unit's SN is not known before its
INITIALIZE DOWNLOAD (which creates a challenge; reading it any other way would cost an
APDU and a challenge), so a fed card is labelled ``<reader>#<n>``; the SN is in every
:class:`~keyload.station.load.LoadResult`.

>>> # with pcscd and a card in "Virtual PCD 00 00" (tests/integration/test_pcsc.py):
>>> # with PcscConnection("Virtual PCD 00 00") as conn:
>>> #     conn.transmit(bytes.fromhex("00A4040007F04B4C50314549")).hex()  # '9000'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Literal

from ..core.errors import TransportError
from . import Connection
from .iso7816 import CommandChaining, GetResponse, is_long

try:
    from smartcard import scard as _scard  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # reported by keyload.lab.pcscd.pcsc_available()
    _scard = None

LongApdus = Literal["auto", "extended", "chaining"]

# PC/SC return codes (winscard), as pcsc-lite defines them.
S_SUCCESS = 0x00000000
E_CANCELLED = 0x80100002
E_INVALID_HANDLE = 0x80100003
E_UNKNOWN_READER = 0x80100009
E_TIMEOUT = 0x8010000A
E_SHARING_VIOLATION = 0x8010000B
E_NO_SMARTCARD = 0x8010000C
E_PROTO_MISMATCH = 0x8010000F
E_NOT_READY = 0x80100010
F_COMM_ERROR = 0x80100013
E_NOT_TRANSACTED = 0x80100016
E_READER_UNAVAILABLE = 0x80100017
E_NO_SERVICE = 0x8010001D
E_SERVICE_STOPPED = 0x8010001E
E_NO_READERS_AVAILABLE = 0x8010002E
W_UNRESPONSIVE_CARD = 0x80100066
W_UNPOWERED_CARD = 0x80100067
W_RESET_CARD = 0x80100068
W_REMOVED_CARD = 0x80100069

STATE_UNAWARE = 0x0000
STATE_CHANGED = 0x0002
STATE_UNKNOWN = 0x0004
STATE_UNAVAILABLE = 0x0008
STATE_EMPTY = 0x0010
STATE_PRESENT = 0x0020
STATE_EXCLUSIVE = 0x0080
STATE_MUTE = 0x0200

INFINITE = 0xFFFFFFFF


class CardProtocol(IntFlag):
    T0 = 0x0001
    T1 = 0x0002


class Disposition(IntEnum):
    """What happens to the card at disconnect (SCARD_*_CARD)."""

    LEAVE = 0
    RESET = 1
    UNPOWER = 2
    EJECT = 3


# -- errors --------------------------------------------------------------------------
class PcscError(TransportError):
    """A PC/SC call failed; ``code`` is the PC/SC return code, ``reader`` the reader."""

    def __init__(self, message: str, *, code: int | None = None, reader: str | None = None):
        self.code = code
        self.reader = reader
        super().__init__(message)


class NoCard(PcscError):
    """There is no card in the reader."""


class CardRemoved(PcscError):
    """The card was removed (or reset by someone else) while connected."""


class ReaderUnavailable(PcscError):
    """The reader is gone (unplugged, unknown name) or its driver failed."""


class ServiceUnavailable(PcscError):
    """pcscd is not running, or stopped."""


class CardTimeout(PcscError):
    """No card (or no removal) within the time given."""


_MEANING: dict[int, tuple[type[PcscError], str]] = {
    E_NO_SMARTCARD: (NoCard, "no card in the reader"),
    W_REMOVED_CARD: (CardRemoved, "the card was removed"),
    W_RESET_CARD: (CardRemoved, "the card was reset by another application"),
    W_UNPOWERED_CARD: (PcscError, "the card is not powered"),
    W_UNRESPONSIVE_CARD: (PcscError, "the card does not answer (mute)"),
    E_NOT_TRANSACTED: (PcscError, "the exchange with the card failed (card pulled out "
                                  "or mute)"),
    F_COMM_ERROR: (PcscError, "communication error with the reader or card (card pulled "
                              "out?)"),
    E_READER_UNAVAILABLE: (ReaderUnavailable, "the reader is not available (unplugged?)"),
    E_UNKNOWN_READER: (ReaderUnavailable, "no reader with this name"),
    E_NO_READERS_AVAILABLE: (ReaderUnavailable, "no reader connected"),
    E_NO_SERVICE: (ServiceUnavailable, "pcscd is not running"),
    E_SERVICE_STOPPED: (ServiceUnavailable, "pcscd stopped"),
    E_INVALID_HANDLE: (PcscError, "invalid handle (connection already closed, or pcscd "
                                  "restarted)"),
    E_SHARING_VIOLATION: (PcscError, "the card is in exclusive use by another "
                                     "application"),
    E_PROTO_MISMATCH: (PcscError, "the card does not offer the requested protocol"),
    E_NOT_READY: (PcscError, "the reader or card is not ready"),
    E_TIMEOUT: (CardTimeout, "timed out"),
    E_CANCELLED: (PcscError, "cancelled"),
}


def _lib() -> Any:
    if _scard is None:
        raise TransportError("pyscard is not installed (pip install pyscard; it builds "
                             "with swig, gcc and libpcsclite-dev)")
    return _scard


def _error(hr: int, what: str, reader: str | None = None) -> PcscError:
    hr &= 0xFFFFFFFF
    cls, meaning = _MEANING.get(hr, (PcscError, ""))
    if not meaning:
        try:
            meaning = str(_lib().SCardGetErrorMessage(hr))
        except Exception:  # a message is a nicety; the code is kept anyway
            meaning = "PC/SC error"
    where = f" on reader {reader!r}" if reader else ""
    return cls(f"{what}{where}: {meaning} (PC/SC 0x{hr:08X})", code=hr, reader=reader)


def _check(hr: Any, what: str, reader: str | None = None) -> None:
    code = int(hr) & 0xFFFFFFFF
    if code != S_SUCCESS:
        raise _error(code, what, reader)


# -- context and readers ----------------------------------------------------------------
class PcscContext:
    """One ``SCardEstablishContext``. Use a context from one thread at a time; only
    :meth:`cancel` may be called from another thread."""

    def __init__(self) -> None:
        lib = _lib()
        hr, handle = lib.SCardEstablishContext(lib.SCARD_SCOPE_USER)
        _check(hr, "connecting to pcscd")
        self.handle: Any = handle
        self._released = False

    def readers(self) -> list[str]:
        hr, names = _lib().SCardListReaders(self.handle, [])
        code = int(hr) & 0xFFFFFFFF
        if code == E_NO_READERS_AVAILABLE:
            return []
        _check(code, "listing readers")
        return [str(n) for n in names]

    def status_change(self, reader: str, current: int, timeout: float | None) -> tuple[int, bytes]:
        """Wait until the reader's state differs from ``current``; returns (state, ATR).
        Raises :class:`CardTimeout` after ``timeout`` seconds (None: no limit)."""
        ms = INFINITE if timeout is None else max(0, int(timeout * 1000))
        hr, states = _lib().SCardGetStatusChange(self.handle, ms, [(reader, current)])
        code = int(hr) & 0xFFFFFFFF
        _check(code, "waiting for a card event", reader)
        _, event, atr = states[0]
        event = int(event)
        if event & (STATE_UNKNOWN | STATE_UNAVAILABLE):
            raise ReaderUnavailable(f"reader {reader!r} is not available", reader=reader)
        return event, bytes(atr)

    def cancel(self) -> None:
        """Make a blocking :meth:`status_change` of this context return (thread-safe)."""
        if not self._released:
            _lib().SCardCancel(self.handle)

    def release(self) -> None:
        if not self._released:
            self._released = True
            _lib().SCardReleaseContext(self.handle)

    def __enter__(self) -> PcscContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def list_readers() -> list[str]:
    """The readers pcscd knows, in its order; [] when there are none."""
    with PcscContext() as ctx:
        return ctx.readers()


def _wait_state(ctx: PcscContext, reader: str, timeout: float | None, want: str,
                done: Callable[[int], bool]) -> tuple[int, bytes]:
    deadline = None if timeout is None else time.monotonic() + timeout
    state = STATE_UNAWARE
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            event, atr = ctx.status_change(reader, state, left)
        except CardTimeout:
            raise CardTimeout(f"no {want} in reader {reader!r} within {timeout} s",
                              code=E_TIMEOUT, reader=reader) from None
        if done(event):
            return event, atr
        state = event & ~STATE_CHANGED


def _present(event: int) -> bool:
    return bool(event & STATE_PRESENT) and not event & (STATE_MUTE | STATE_EXCLUSIVE)


def wait_for_card(reader: str, timeout: float | None = 10.0, *,
                  context: PcscContext | None = None) -> bytes:
    """Wait until a responsive card is in ``reader``; return its ATR (CardTimeout)."""
    with _maybe_context(context) as ctx:
        return _wait_state(ctx, reader, timeout, "card", _present)[1]


def wait_for_removal(reader: str, timeout: float | None = 10.0, *,
                     context: PcscContext | None = None) -> None:
    """Wait until ``reader`` is empty (CardTimeout)."""
    with _maybe_context(context) as ctx:
        _wait_state(ctx, reader, timeout, "removal", lambda e: bool(e & STATE_EMPTY))


@contextmanager
def _maybe_context(context: PcscContext | None) -> Iterator[PcscContext]:
    if context is not None:
        yield context
        return
    with PcscContext() as ctx:
        yield ctx


# -- ATR -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AtrInfo:
    """What an ATR says that matters here: the protocols offered and, when the card
    capabilities are in its historical bytes, extended length and chaining (None: the
    ATR does not say)."""

    protocols: frozenset[int]
    extended: bool | None
    chaining: bool | None
    historical: bytes


def parse_atr(atr: bytes) -> AtrInfo:
    """Decode the interface bytes (ISO/IEC 7816-3 §8.2) and the card capabilities
    (compact-TLV tag 7 of the historical bytes, ISO/IEC 7816-4 §12.1.1). Lenient: what
    cannot be read is reported as unknown, never an error.

    >>> info = parse_atr(bytes.fromhex("3b8a018073800040544b4c50318a"))
    >>> sorted(info.protocols), info.extended, info.chaining
    ([1], True, False)
    """
    if len(atr) < 2:
        return AtrInfo(frozenset({0}), None, None, b"")
    y, k = atr[1] >> 4, atr[1] & 0x0F
    i, protocols = 2, list[int]()
    while True:
        i += bin(y & 0x07).count("1")  # TA, TB, TC
        if not y & 0x08:
            break
        if i >= len(atr):
            return AtrInfo(frozenset(protocols or [0]), None, None, b"")
        td = atr[i]
        i += 1
        protocols.append(td & 0x0F)
        y = td >> 4
    hist = atr[i:i + k]
    offered = frozenset(p for p in protocols if p in (0, 1)) or frozenset({0})
    extended = chaining = None
    if hist[:1] in (b"\x80", b"\x00"):
        body = hist[1:] if hist[:1] == b"\x80" else hist[1:-3]
        j = 0
        while j < len(body):
            tag, n = body[j] >> 4, body[j] & 0x0F
            value = body[j + 1:j + 1 + n]
            if tag == 7 and len(value) >= 3:
                chaining = bool(value[2] & 0x80)
                extended = bool(value[2] & 0x40)
            j += 1 + n
    return AtrInfo(offered, extended, chaining, bytes(hist))


# -- connection ------------------------------------------------------------------------
class _RawTransmit:
    """SCardTransmit itself, with the error mapping."""

    def __init__(self, conn: PcscConnection) -> None:
        self.conn = conn

    def transmit(self, apdu: bytes) -> bytes:
        c = self.conn
        if c.handle is None:
            raise TransportError(f"connection to reader {c.reader!r} is closed")
        lib = _lib()
        try:
            hr, response = lib.SCardTransmit(c.handle, int(c.protocol), list(apdu))
        except lib.error as e:  # pyscard's own failures (buffers, arguments)
            raise PcscError(f"sending a command on reader {c.reader!r}: {e}",
                            reader=c.reader) from None
        code = int(hr) & 0xFFFFFFFF
        if code != S_SUCCESS:
            raise c._transmit_error(code)
        if len(response) < 2:
            # No status word is no answer: vpcd reports success with an empty response
            # when the card's connection drops in the middle of a command.
            raise c._transmit_error(E_NOT_TRANSACTED, "the card gave no status word")
        return bytes(response)


class PcscConnection:
    """The card in one reader: ``transmit(apdu) -> rapdu`` (connects at construction).

    ``protocols``: T=1, or T=0|T=1 (the default: the card's choice). ``share``: shared
    (the default) or exclusive access. ``long_apdus``: "auto" (see the module docstring),
    "extended" or "chaining". ``disconnect()`` unpowers the card by default, so that its
    volatile state (a unit's pending challenge) is gone and a feeder knows it is done.
    """

    def __init__(self, reader: str, *,
                 protocols: CardProtocol = CardProtocol.T0 | CardProtocol.T1,
                 exclusive: bool = False, long_apdus: LongApdus = "auto",
                 context: PcscContext | None = None, atr: bytes | None = None) -> None:
        lib = _lib()
        self.reader = reader
        self._own_context = context is None
        self.context = context if context is not None else PcscContext()
        self.handle: Any = None
        self._wanted: LongApdus = long_apdus
        self._long: Literal["extended", "chaining"] | None = None
        try:
            share = lib.SCARD_SHARE_EXCLUSIVE if exclusive else lib.SCARD_SHARE_SHARED
            hr, handle, active = lib.SCardConnect(self.context.handle, reader, share,
                                                  int(protocols))
            _check(hr, "connecting to the card", reader)
            self.handle = handle
            self.protocol = CardProtocol(int(active))
            if atr is None:  # else: the caller saw it in the card-insertion event
                hr, _, _, _, got = lib.SCardStatus(handle)
                _check(hr, "reading the card status", reader)
                atr = bytes(got)
            self.atr = atr
            self.atr_info = parse_atr(self.atr)
        except BaseException:
            self.close(Disposition.LEAVE)
            raise
        self._raw: Connection = GetResponse(_RawTransmit(self))
        self._chained: Connection = CommandChaining(self._raw)

    @property
    def long_apdus(self) -> Literal["extended", "chaining"]:
        """How commands longer than a short APDU are sent (decided on first use)."""
        if self._long is None:
            self._long = self._long_mode(self._wanted)
        return self._long

    def _reader_max_input(self) -> int | None:
        """The longest command the reader carries (SCARD_ATTR_MAXINPUT, given by the CCID
        driver; None when the driver does not say, as vpcd)."""
        lib = _lib()
        attr = getattr(lib, "SCARD_ATTR_MAXINPUT", None)
        if attr is None:
            return None
        hr, value = lib.SCardGetAttrib(self.handle, attr)
        if int(hr) & 0xFFFFFFFF != S_SUCCESS or not value:
            return None
        return int.from_bytes(bytes(value)[:4], "little")

    def _long_mode(self, wanted: LongApdus) -> Literal["extended", "chaining"]:
        if wanted != "auto":
            return wanted
        info = self.atr_info
        max_input = self._reader_max_input() if info.chaining else None
        reader_short = max_input is not None and max_input < 4 + 3 + 256 + 2
        if self.protocol == CardProtocol.T1 and info.extended is not False and not (
                reader_short and info.chaining):
            return "extended"
        if info.chaining:
            return "chaining"
        return "extended"  # say it plainly at the card: it answers 6700 if it cannot

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            raise ValueError("a C-APDU has at least 4 bytes")
        if is_long(apdu) and self.long_apdus == "chaining":
            return self._chained.transmit(apdu)
        return self._raw.transmit(apdu)

    def _transmit_error(self, code: int, detail: str = "") -> PcscError:
        if code in (E_NOT_TRANSACTED, F_COMM_ERROR, W_UNRESPONSIVE_CARD):
            # The card side went away in the middle of a command; say so when pcscd
            # already knows (it polls vpcd every 400 ms, a CCID reader interrupts).
            try:
                hr, *_ = _lib().SCardStatus(self.handle)
            except Exception:  # the original error is what matters
                hr = code
            if int(hr) & 0xFFFFFFFF in (W_REMOVED_CARD, E_NO_SMARTCARD):
                return CardRemoved(f"sending a command on reader {self.reader!r}: the card "
                                   f"was removed during the command (PC/SC 0x{code:08X})",
                                   code=code, reader=self.reader)
        if detail:
            return PcscError(f"sending a command on reader {self.reader!r}: {detail} (card "
                             "pulled out or mute?)", code=code, reader=self.reader)
        return _error(code, "sending a command", self.reader)

    def disconnect(self, disposition: Disposition = Disposition.UNPOWER) -> None:
        """End the connection; the card is unpowered unless told otherwise. A card that
        is already gone is not an error here."""
        handle, self.handle = self.handle, None
        if handle is not None:
            _lib().SCardDisconnect(handle, int(disposition))

    def close(self, disposition: Disposition = Disposition.UNPOWER) -> None:
        self.disconnect(disposition)
        if self._own_context:
            self.context.release()

    def __enter__(self) -> PcscConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the station's view: units in readers ---------------------------------------------
@dataclass(frozen=True)
class PcscUnitSource:
    """A unit in a reader, as :class:`keyload.station.drive.UnitSource`: ``label`` is
    ``<reader>#<sequence>`` (the SN is learnt from INITIALIZE DOWNLOAD, see the module
    docstring); ``connect()`` connects, and at the end unpowers the card.

    A failed connect raises :class:`PcscError` (a TransportError), not LoadFailed."""

    reader: str
    sequence: int
    context: PcscContext | None = None
    long_apdus: LongApdus = "auto"
    disposition: Disposition = Disposition.UNPOWER
    atr: bytes | None = None

    @property
    def label(self) -> str:
        return f"{self.reader}#{self.sequence}"

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        conn = PcscConnection(self.reader, context=self.context, long_apdus=self.long_apdus,
                              atr=self.atr)
        try:
            yield conn
        finally:
            conn.close(self.disposition)


def _next_card(last_counter: int | None) -> Callable[[int], bool]:
    """A responsive card, and (given the event counter when the last card was seen, in
    the high 16 bits of the reader state) not the same insertion."""
    def is_next(event: int) -> bool:
        return _present(event) and (last_counter is None or (event >> 16) != last_counter)
    return is_next


def cards_in_reader(reader: str, count: int | None = None, timeout: float | None = 10.0, *,
                    expect_removal: bool = True, first: int = 1,
                    long_apdus: LongApdus = "auto") -> Iterator[PcscUnitSource]:
    """One :class:`PcscUnitSource` per card fed into ``reader``, for ``customize()``.

    Waits for a card, yields it; once the consumer is done (``connect()`` ended, the card
    unpowered), waits for the *next* card: pcscd's card-event counter must have moved
    (the card was removed and another inserted), so the same card is never yielded
    twice. ``count``: stop after that many cards; a card that does not come within
    ``timeout`` then raises :class:`CardTimeout`. Without ``count``, a feed that stays
    empty for ``timeout`` seconds simply ends the iteration.

    ``expect_removal=False`` yields the next source as soon as the previous one is done,
    without waiting for a removal: for a feeder that exchanges cards without the reader
    seeing it (``CardFeeder(remove=False)``), i.e. to measure the APDU path only.
    """
    seq = first
    n = 0
    with PcscContext() as ctx:
        last_counter: int | None = None
        while count is None or n < count:
            is_next = _next_card(last_counter if expect_removal else None)
            try:
                event, atr = _wait_state(ctx, reader, timeout, "card", is_next)
            except CardTimeout:
                if count is None:
                    return
                raise CardTimeout(f"card {n + 1} of {count} did not come into reader "
                                  f"{reader!r} within {timeout} s", code=E_TIMEOUT,
                                  reader=reader) from None
            last_counter = event >> 16
            yield PcscUnitSource(reader, seq, ctx, long_apdus, atr=atr or None)
            seq += 1
            n += 1


__all__ = ["AtrInfo", "CardProtocol", "CardRemoved", "CardTimeout",
           "Disposition", "NoCard", "PcscConnection", "PcscContext",
           "PcscError", "PcscUnitSource", "ReaderUnavailable", "ServiceUnavailable",
           "cards_in_reader", "list_readers", "parse_atr", "wait_for_card",
           "wait_for_removal"]
