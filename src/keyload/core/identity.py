"""Identity sets of suite 0x03: set ids, certificates, enrolment (docs/protocol.md §10.1–§10.2).

A certificate is the template ``E1 { C0 C5 C3 C1 D0 D2 }``; D2 is the set CA's ECDSA signature
of ``"KLP1-CRT" || C0 C5 C3 C1 D0`` (the encoded TLVs). Decoding is strict and only judges
the structure: the tags in order, each once, C0 1 byte, C5 1, C3 5, C1 1–32, D0 65, D2 64;
anything else is :class:`MalformedData` (6A80). Whether a well-formed certificate is *valid*
(version 01, the expected role and set id, D0 a point on the curve, D2 under Q_CA, and for a
unit the SN of the message) is :func:`verify_certificate`, which raises
:class:`IntegrityError` (6982): the word at the authority and at PUT CERTIFICATE; the unit
turns it into 6988 for C_A (§10.5 step 4).

>>> identity_set_id(bytes(65)).hex()
'1991ee97da'
"""

from __future__ import annotations

from typing import NamedTuple

from . import tlv
from .ecc import POINT_LEN, SIGNATURE_LEN, EcdsaSigner, check_point, ecdsa_verify
from .errors import AuthenticityError, IntegrityError, MalformedData
from .primitives import ct_equal, sha256

CERT_VERSION = 0x01
ROLE_AUTHORITY = 0x01
ROLE_UNIT = 0x02

T_VERSION, T_SET, T_SUBJECT = 0xC0, 0xC3, 0xC1
T_ROLE, T_PUBLIC, T_CERT_SIG = 0xC5, 0xD0, 0xD2
T_E_U, T_E_A, T_SIG_U, T_CA_PUBLIC = 0xD3, 0xD4, 0xD5, 0xD6
T_CERT = 0xE1

LABEL_SET = b"KLP1-SET"
LABEL_CRT = b"KLP1-CRT"

_CERT_TAGS = (T_VERSION, T_ROLE, T_SET, T_SUBJECT, T_PUBLIC, T_CERT_SIG)


def identity_set_id(q_ca: bytes) -> bytes:
    """set id = SHA-256("KLP1-SET" || Q_CA)[0:5] (docs/protocol.md §10.1)."""
    return sha256(LABEL_SET + q_ca)[:5]


def fixed(v: bytes, n: int, what: str) -> bytes:
    """``v`` when it is ``n`` bytes long, else MalformedData (6A80)."""
    if len(v) != n:
        raise MalformedData(f"{what} must be {n} bytes")
    return v


def bounded(v: bytes, what: str) -> bytes:
    """``v`` when it is 1 to 32 bytes long (SN, REF1, a subject), else MalformedData."""
    if not 1 <= len(v) <= 32:
        raise MalformedData(f"{what} must be 1 to 32 bytes")
    return v


class Certificate(NamedTuple):
    """A KLP1 certificate, as decoded: structure checked, validity not (see the module)."""

    version: int
    role: int
    set_id: bytes
    subject: bytes
    public_key: bytes
    signature: bytes

    def signed_part(self) -> bytes:
        """``C0 C5 C3 C1 D0`` as encoded TLVs: what D2 signs, after "KLP1-CRT"."""
        return tbs(self.role, self.set_id, self.subject, self.public_key, self.version)

    def encode(self) -> bytes:
        """The whole template ``E1 { … }``."""
        return tlv.tlv(T_CERT, self.signed_part() + tlv.tlv(T_CERT_SIG, self.signature))

    @classmethod
    def decode_value(cls, value: bytes) -> Certificate:
        """The certificate from the content of E1; MalformedData on any structural fault."""
        v, role, set_id, subject, public, sig = tlv.decode(value, _CERT_TAGS)
        return cls(fixed(v, 1, "certificate version")[0], fixed(role, 1, "role")[0],
                   fixed(set_id, 5, "set id"), bounded(subject, "subject"),
                   fixed(public, POINT_LEN, "public key"),
                   fixed(sig, SIGNATURE_LEN, "certificate signature"))

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """The certificate from its whole encoding ``E1 …`` (nothing may follow)."""
        (value,) = tlv.decode(data, (T_CERT,))
        return cls.decode_value(value)


def tbs(role: int, set_id: bytes, subject: bytes, public_key: bytes,
        version: int = CERT_VERSION) -> bytes:
    return tlv.encode([(T_VERSION, bytes((version,))), (T_ROLE, bytes((role,))),
                       (T_SET, set_id), (T_SUBJECT, subject), (T_PUBLIC, public_key)])


def issue_certificate(ca: EcdsaSigner, *, role: int, set_id: bytes, subject: bytes,
                      public_key: bytes) -> Certificate:
    """A certificate signed by the set CA ``ca`` (its ``sign(message)`` gives ``r || s``).

    Checks the caller's values (ValueError): role 01 or 02, set id 5 bytes, subject 1–32
    bytes, and a public key that is an uncompressed point on the curve.
    """
    if role not in (ROLE_AUTHORITY, ROLE_UNIT):
        raise ValueError("role must be 01 (authority) or 02 (unit)")
    if len(set_id) != 5 or not 1 <= len(subject) <= 32:
        raise ValueError("set id must be 5 bytes and the subject 1 to 32 bytes")
    try:
        check_point(public_key)
    except IntegrityError:
        raise ValueError("the public key is not an uncompressed P-256 point") from None
    signature = ca.sign(LABEL_CRT + tbs(role, set_id, subject, public_key))
    return Certificate(CERT_VERSION, role, set_id, subject, public_key, signature)


def verify_certificate(cert: Certificate, *, q_ca: bytes, role: int, set_id: bytes,
                       subject: bytes | None = None) -> None:
    """Return None when ``cert`` is valid (docs/protocol.md §10.1), else raise IntegrityError.

    Valid: version 01, ``role`` and ``set_id`` as expected, ``subject`` when given (a unit's
    certificate must name the SN of the message; an authority's may name anything), D0 an
    uncompressed point on the curve, D2 verifying under ``q_ca``. The reason is not told.
    """
    if (cert.version != CERT_VERSION or cert.role != role
            or not ct_equal(cert.set_id, set_id)
            or (subject is not None and not ct_equal(cert.subject, subject))):
        raise IntegrityError()
    check_point(cert.public_key)
    try:
        ecdsa_verify(q_ca, cert.signature, LABEL_CRT + cert.signed_part())
    except AuthenticityError:
        raise IntegrityError() from None


class PutCertificate(NamedTuple):
    """PUT CERTIFICATE command data: ``E1 D6`` (C_U, Q_CA)."""

    certificate: Certificate
    q_ca: bytes

    def encode(self) -> bytes:
        return self.certificate.encode() + tlv.tlv(T_CA_PUBLIC, self.q_ca)

    @classmethod
    def decode(cls, data: bytes) -> PutCertificate:
        cert, q_ca = tlv.decode(data, (T_CERT, T_CA_PUBLIC))
        return cls(Certificate.decode_value(cert), fixed(q_ca, POINT_LEN, "Q_CA"))


def check_enrolment(put: PutCertificate, *, sn: bytes, q_u: bytes) -> bytes:
    """The unit's check of PUT CERTIFICATE after its structure (docs/protocol.md §10.2).

    D6 on the curve, and C_U valid under D6: version 01, role 02, C3 = the set id of D6,
    C1 = ``sn``, D0 = ``q_u`` (the unit's own key), else IntegrityError (6982). Returns the
    unit's set id. The unit's state (a key generated, no certificate yet: 6985) is the
    caller's to check first, and so is the atomic store.
    """
    check_point(put.q_ca)
    set_id = identity_set_id(put.q_ca)
    verify_certificate(put.certificate, q_ca=put.q_ca, role=ROLE_UNIT, set_id=set_id,
                       subject=sn)
    if not ct_equal(put.certificate.public_key, q_u):
        raise IntegrityError()
    return set_id
