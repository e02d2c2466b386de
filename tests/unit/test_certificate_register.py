"""The authority skips the CA signature check of a C_U only for the very certificate its
register holds for an active unit (docs/protocol.md §10.4 step 4): any other certificate,
that of a unit certified elsewhere, or that of a revoked unit, is verified as before."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.test_suite3_roles import EXPORT, GENKEY, PUTCERT, World, _slots, tx

from keyload.core import suite3
from keyload.core.ecc import ORDER, EcdsaKey, scalar_from
from keyload.core.identity import (
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    issue_certificate,
    verify_certificate,
)
from keyload.core.secret import Secret
from keyload.units.unit import MemoryUnitStore, Unit, UnitState


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The subjects of the certificates the authority verified, in order."""
    seen: list[bytes] = []
    verify = verify_certificate

    def counted(cert: Certificate, **kw: Any) -> None:
        seen.append(cert.subject)
        verify(cert, **kw)

    monkeypatch.setattr(suite3, "verify_certificate", counted)
    return seen


def test_the_registers_own_certificate_is_not_verified_again(checks: list[bytes]) -> None:
    w = World()
    unit = w.enrol(b"SN-R1")
    assert w.export(w.request(unit))[0] == 0x9000
    assert checks == []


def test_another_encoding_of_a_valid_certificate_is_verified(checks: list[bytes]) -> None:
    """(r, n - s) is a valid signature too, but not the register's certificate."""
    w = World()
    unit = w.enrol(b"SN-R2")
    req = w.request(unit)
    sig = req.c_u.signature
    s = int.from_bytes(sig[32:], "big")
    other = req.c_u._replace(signature=sig[:32] + (ORDER - s).to_bytes(32, "big"))
    assert tx(w.authority, EXPORT, req._replace(c_u=other).encode())[0] == 0x9000
    assert checks == [b"SN-R2"]


def test_a_unit_certified_elsewhere_is_verified(checks: list[bytes]) -> None:
    """A unit with a valid C_U that the register does not hold (the set CA certified it
    elsewhere) is accepted after the full check."""
    w = World()
    ca = scalar_from(lambda n: bytes(range(1, n + 1)))
    info = w.ks.add_identity_set(Secret(ca), Secret(scalar_from(lambda n: bytes(
        range(2, n + 2)))), "elsewhere", authority_id=b"AS-2")
    q_ca = w.ks.identity_set(info.set_id).q_ca
    unit = Unit(MemoryUnitStore(UnitState.new_identity(b"SN-R3", _slots())))
    sw, q_u = tx(unit, GENKEY)
    assert sw == 0x9000
    cert = issue_certificate(EcdsaKey(ca), role=ROLE_UNIT, set_id=info.set_id,
                             subject=b"SN-R3", public_key=q_u[2:])
    assert tx(unit, PUTCERT, PutCertificate(cert, q_ca).encode()) == (0x9000, b"")
    assert w.ks.unit_record(info.set_id, b"SN-R3") is None
    w.set_id = info.set_id
    assert w.export(w.request(unit))[0] == 0x9000
    assert checks == [b"SN-R3"]


def test_a_revoked_units_certificate_is_verified_and_refused(checks: list[bytes]) -> None:
    w = World()
    unit = w.enrol(b"SN-R4")
    w.ks.revoke_unit(w.set_id, b"SN-R4")
    assert w.export(w.request(unit)) == (0x6983, b"")
    assert checks == [b"SN-R4"]
