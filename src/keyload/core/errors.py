"""Status words (docs/protocol.md §6) and the typed errors of keyload.

One root, :class:`KeyloadError`. Errors that a card or authority answers with a status
word derive from :class:`StatusError` and carry that word; the text never holds key
material or message bytes. An integrity failure says nothing more than that.
"""

from __future__ import annotations

from enum import IntEnum


class SW(IntEnum):
    """ISO/IEC 7816-4 status words used by KLP1 (docs/protocol.md §6)."""

    SUCCESS = 0x9000
    WRONG_LENGTH = 0x6700
    MALFORMED = 0x6A80
    UNSUPPORTED = 0x6A81
    UNKNOWN_SET = 0x6A82
    WRONG_P1P2 = 0x6A86
    NOT_FOUND = 0x6A88
    INTEGRITY = 0x6982
    REVOKED = 0x6983
    NO_CHALLENGE = 0x6985
    POLICY = 0x6986
    AUTHENTICITY = 0x6988
    MEMORY_FAILURE = 0x6581
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00

    @property
    def hex(self) -> str:
        return f"{int(self):04X}"

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING = {
    SW.SUCCESS: "success",
    SW.WRONG_LENGTH: "wrong length",
    SW.MALFORMED: "malformed data",
    SW.UNSUPPORTED: "suite or header version not supported",
    SW.UNKNOWN_SET: "no transport key for this set id",
    SW.WRONG_P1P2: "wrong P1/P2",
    SW.NOT_FOUND: "REF1 or slot unknown",
    SW.INTEGRITY: "integrity check failed",
    SW.REVOKED: "the unit is revoked",
    SW.NO_CHALLENGE: "no pending challenge",
    SW.POLICY: "policy refuses",
    SW.AUTHENTICITY: "authenticity check failed",
    SW.MEMORY_FAILURE: "memory failure, nothing stored",
    SW.INS_NOT_SUPPORTED: "instruction not supported",
    SW.CLA_NOT_SUPPORTED: "class not supported",
}


class KeyloadError(Exception):
    """Root of every error keyload raises on purpose."""


class StatusError(KeyloadError):
    """A refusal that maps to one status word (docs/protocol.md §6)."""

    #: The status word: a :class:`SW` for the words of §6, a plain int for any other.
    sw: int = SW.MALFORMED

    def __init__(self, detail: str | None = None, *, sw: int | None = None,
                 message: str | None = None) -> None:
        """``message``, when given, is the whole text (else ``"6A80 MALFORMED: detail"``)."""
        if sw is not None:
            self.sw = sw
        if message is None:
            word = SW(self.sw)
            self.detail = detail or word.meaning
            message = f"{word.hex} {word.name}: {self.detail}"
        else:
            self.detail = detail or message
        super().__init__(message)

    @property
    def code(self) -> int:
        """The status word as an integer (also for words outside §6)."""
        return int(self.sw)


class WrongLength(StatusError):
    sw = SW.WRONG_LENGTH


class MalformedData(StatusError):
    sw = SW.MALFORMED


class Unsupported(StatusError):
    sw = SW.UNSUPPORTED


class UnknownSet(StatusError):
    sw = SW.UNKNOWN_SET


class WrongP1P2(StatusError):
    sw = SW.WRONG_P1P2


class NotFound(StatusError):
    sw = SW.NOT_FOUND


class NoSuchKey(NotFound):
    """The authority holds no application key under this REF1."""


class NoSuchSlot(NotFound):
    """The unit has no slot with this REF2."""


class IntegrityError(StatusError):
    """CAS wrong, unwrap failed, or length mismatch. Deliberately says no more."""

    sw = SW.INTEGRITY

    def __init__(self, detail: str | None = None, *, sw: int | None = None) -> None:
        super().__init__("integrity check failed", sw=sw)


class Revoked(StatusError):
    """The authority: this unit's certificate is revoked (suite 0x03, docs/protocol.md §10.4)."""

    sw = SW.REVOKED


class NoChallenge(StatusError):
    sw = SW.NO_CHALLENGE


class PolicyRefused(StatusError):
    sw = SW.POLICY


class AuthenticityError(StatusError):
    sw = SW.AUTHENTICITY


class MemoryFailure(StatusError):
    sw = SW.MEMORY_FAILURE


class InsNotSupported(StatusError):
    sw = SW.INS_NOT_SUPPORTED


class ClaNotSupported(StatusError):
    sw = SW.CLA_NOT_SUPPORTED


_BY_SW: dict[int, type[StatusError]] = {
    SW.WRONG_LENGTH: WrongLength,
    SW.MALFORMED: MalformedData,
    SW.UNSUPPORTED: Unsupported,
    SW.UNKNOWN_SET: UnknownSet,
    SW.WRONG_P1P2: WrongP1P2,
    SW.NOT_FOUND: NotFound,
    SW.INTEGRITY: IntegrityError,
    SW.NO_CHALLENGE: NoChallenge,
    SW.POLICY: PolicyRefused,
    SW.AUTHENTICITY: AuthenticityError,
    SW.REVOKED: Revoked,
    SW.MEMORY_FAILURE: MemoryFailure,
    SW.INS_NOT_SUPPORTED: InsNotSupported,
    SW.CLA_NOT_SUPPORTED: ClaNotSupported,
}


class UnexpectedStatus(StatusError):
    """A status word outside docs/protocol.md §6 (kept as a raw integer)."""

    def __init__(self, raw: int) -> None:
        self.raw = raw
        super().__init__(f"unexpected status word {raw:04X}", sw=raw,
                         message=f"{raw:04X} unexpected status word")


def error_for_sw(sw: int, context: str = "") -> StatusError:
    """Return the typed error for a status word other than 9000."""
    cls = _BY_SW.get(sw)
    if cls is None:
        return UnexpectedStatus(sw)
    return cls(context or None)


class StoreError(KeyloadError):
    """A store cannot be read or written (missing, damaged, wrong passphrase)."""


class WrongPassphrase(StoreError):
    """The passphrase or key-encryption key does not open this store."""


class DamagedStore(StoreError):
    """The file is truncated, corrupted or not a keyload store."""


class TransportError(KeyloadError):
    """Bytes could not be carried (reader gone, card removed, connection lost)."""


class KcvMismatch(KeyloadError):
    """The KCV answered by the unit differs from the authority's."""


def one_line(e: BaseException) -> str:
    """``e`` told in one line: an OS error's reason and file, else its text (its class when
    it has none)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return " ".join((str(e) or e.__class__.__name__).split())


def error_code(e: BaseException) -> str:
    """A short name of ``e`` that stays: the status word it carries (4 hex digits), else
    its class's name."""
    sw = getattr(e, "sw", None)
    return f"{sw:04X}" if isinstance(sw, int) else e.__class__.__name__
