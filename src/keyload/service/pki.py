"""A small test PKI for the service: a CA, a server certificate and client certificates.

``keyload pki init --dir DIR`` writes::

    DIR/ca.pem  ca.key            the CA (keep ca.key offline in real life)
    DIR/server.pem  server.key    the service's certificate (SAN: the given DNS names / IPs)
    DIR/clients/NAME.pem  NAME.key   one per client; the certificate's CN is NAME

Keys are ECDSA P-256, written with mode 0600 (directories 0700). Client certificates
carry ``extendedKeyUsage = clientAuth`` and server certificates ``serverAuth``; the
service's authorization policy names clients by CN (and may pin the certificate's
SHA-256 fingerprint). This is a *test* CA: a deployment uses its own PKI.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..core.errors import StoreError
from ..units.storage import atomic_write, ensure_private_dir

DAYS = 825


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its key were written, and the certificate's fingerprint."""

    name: str
    cert: Path
    key: Path
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "cert": str(self.cert), "key": str(self.key),
                "sha256": self.sha256}


def fingerprint(cert_pem_or_der: bytes) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    if cert_pem_or_der.lstrip().startswith(b"-----"):
        der = x509.load_pem_x509_certificate(cert_pem_or_der).public_bytes(
            serialization.Encoding.DER)
    else:
        der = cert_pem_or_der
    return hashlib.sha256(der).hexdigest()


def read_input_file(path: Path, what: str) -> bytes:
    """A file named on the command line (``what``: "CA", "policy"…); a
    :class:`StoreError` that names it when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{what} file not found: {path}") from None
    except OSError as e:
        raise StoreError(f"{what} file {path}: {e.strerror or e.__class__.__name__}") from None


def check_tls_files(*, ca: Path, cert: Path | None = None, key: Path | None = None) -> None:
    """The files a TLS context is made of, read before OpenSSL reads them so that a mistake
    is named: a file that cannot be read (:class:`StoreError`); a CA or certificate file
    without a PEM certificate, a key file without an unencrypted PEM private key, or a
    certificate and key that do not match (ValueError). ``key`` None: the key is in the
    certificate's file."""
    try:
        x509.load_pem_x509_certificates(read_input_file(ca, "CA"))
    except ValueError:
        raise ValueError(f"CA file {ca} holds no PEM certificate") from None
    if cert is None:
        return
    try:
        leaf = x509.load_pem_x509_certificate(read_input_file(cert, "certificate"))
    except ValueError:
        raise ValueError(f"certificate file {cert} holds no PEM certificate") from None
    key = key or cert
    try:
        private = serialization.load_pem_private_key(read_input_file(key, "key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"key file {key} holds no unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ValueError(f"certificate {cert} and key {key} do not match")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyload test PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name) \
            or name.startswith("."):
        raise ValueError(f"certificate name {name!r}: use 1-64 letters, digits, '-', '_', '.'")
    return name


def create_ca(directory: Path, *, name: str = "keyload test CA") -> Issued:
    ensure_private_dir(directory)
    if (directory / "ca.key").exists():
        raise ValueError(f"{directory} already holds a CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(directory / "ca.key", key)
    _write_cert(directory / "ca.pem", cert)
    return Issued(name, directory / "ca.pem", directory / "ca.key",
                  fingerprint(cert.public_bytes(serialization.Encoding.DER)))


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError:
        raise ValueError(f"no CA in {directory} (run `keyload pki init` first)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: not an EC key")
    return cert, key


def issue(directory: Path, name: str, *, server: bool, hosts: tuple[str, ...] = (),
          out: Path | None = None) -> Issued:
    """Issue a server (``serverAuth``, SANs ``hosts``) or client (``clientAuth``) cert."""
    _check_name(name)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    b = (x509.CertificateBuilder()
         .subject_name(_name(name)).issuer_name(ca_cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=DAYS))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=True, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(
             [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
             critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             ca_key.public_key()), critical=False))
    if server:
        sans: list[x509.GeneralName] = []
        for h in hosts or ("localhost", "127.0.0.1", "::1"):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    where = out or (directory if server else ensure_private_dir(directory / "clients"))
    ensure_private_dir(where)
    stem = "server" if server and out is None else name
    _write_key(where / f"{stem}.key", key)
    _write_cert(where / f"{stem}.pem", cert)
    return Issued(name, where / f"{stem}.pem", where / f"{stem}.key",
                  fingerprint(cert.public_bytes(serialization.Encoding.DER)))


def init_pki(directory: Path, *, clients: tuple[str, ...] = ("client",),
             hosts: tuple[str, ...] = ()) -> list[Issued]:
    """CA, server certificate and one certificate per client name."""
    out = [create_ca(directory)]
    out.append(issue(directory, "keyload-service", server=True, hosts=hosts))
    out += [issue(directory, c, server=False) for c in clients]
    return out
