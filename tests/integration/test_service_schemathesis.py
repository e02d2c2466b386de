"""The real service against the OpenAPI document it serves, with every schemathesis check.

The server runs on loopback with real mutual TLS (:func:`.test_service.start_service`);
schemathesis loads ``/openapi.json`` from it and sends requests generated from it, valid
(positive) and invalid (negative), in its coverage, examples and fuzzing phases. Every
built-in check of schemathesis runs on every answer: no 5xx, every status, content type,
header and body as documented, schema-valid data accepted and invalid data refused (with
the statuses below, per operation), 405 with ``Allow`` for undocumented methods. Two
ways, the same configuration (:data:`CONFIG`):

- :func:`test_service_conforms_to_its_openapi_document`, schemathesis' pytest
  integration, with one check more: the client certificate is enforced on the secured
  operations (``ignored_auth`` knows API keys and HTTP auth, not ``mutualTLS``);
- :func:`test_schemathesis_cli_all_checks_against_the_served_document`, the
  ``schemathesis run --checks all`` command line of an outside tester, in a subprocess.

Both also run the two checks this module registers (the command line loads it as its
hooks module): EXPORTKEY's 400 is only ever for octets that are no KLP1 EXPORTKEY (the
one allowance of :data:`CONFIG` that the document cannot make exact), and a problem
names its request (``instance`` and ``X-Request-Id``).

Stateful testing is off: the one link (an export to its receipt) needs a receipt that
only a unit can compute, so a stateful run would only repeat the fuzzing phase.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import Case, CheckContext, Response

from keyload.core.errors import StatusError
from keyload.core.identity import Certificate
from keyload.core.messages3 import decode_export_request

from .test_service import ROOT, Running, build_world, policy_doc, start_service

MAX_EXAMPLES = 25  # per operation and phase: the run stays well under a minute

# The configuration of both runs (a schemathesis.toml). Which statuses count as
# accepting valid data and refusing invalid data depends on the operation: schemathesis
# applies an [[operations]] entry to the operation with that operationId in the document.
CONFIG = f"""
[generation]
mode = "all"
max-examples = {MAX_EXAMPLES}
database = "none"

[phases.examples]
enabled = true
[phases.coverage]
enabled = true
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = false

# Data the document calls valid may still be refused; each status here is the service's
# documented answer to a well-formed request whose content it cannot serve:
#   200  a real export (never with random sets, but it is the answer the form is for);
#   400  only the octet-stream form (a check below holds it to that): the document can
#        bound its length (37..99 octets) but not its TLV grammar (tags C1 C2 C3 C4 C6 C7
#        in order, shortest-form lengths), so most schema-valid octets are no EXPORTKEY
#        and are refused with 400 and SW 6A80; a valid JSON request is never 400;
#   403  the authority's export policy (SW 6986) for a key that exists;
#   404  the set or REF1 is unknown to the authority (SW 6A82 / 6A88): the generated
#        ones are random;
#   409  the same (SN, R) generated twice is a replay;
#   422  a suite the authority does not offer (SW 6A81).
# Not 429: the test's policy sets limits that this run never reaches.
[[operations]]
include-operation-id = "exportKey"
checks.positive_data_acceptance.expected-statuses = ["200", "400", "403", "404", "409", "422"]
# Invalid data: 400 (malformed), 413 (an overlong body past the policy's max_body, 1024
# bytes here), 415 (a media type other than the two documented).
checks.negative_data_rejection.expected-statuses = ["400", "413", "415"]

# A valid receipt: 404 for a random (SN, R) (nothing was exported to this client for it);
# 409 "not-exported" when this run's EXPORTKEY presented the same (SN, R) (the coverage
# phase draws the same edge values for both operations) and the authority refused it, or
# "receipt-recorded"; 422 for REF2 / KCV / RCT that do not match a real export; 201 and
# 200 (a retry) for a real one. Not 400 (the JSON schema is exact) nor 429 (see above).
[[operations]]
include-operation-id = "postReceipt"
checks.positive_data_acceptance.expected-statuses = ["200", "201", "404", "409", "422"]
checks.negative_data_rejection.expected-statuses = ["400", "413", "415"]

# Without a body or parameters, a request to these succeeds: 503 would be a failure (the
# state and authority are up) and 429 too (the per-address limit is lifted below).
[[operations]]
include-operation-id = ["health", "metrics", "openapi"]
checks.positive_data_acceptance.expected-statuses = ["200"]
"""

SECURED = {"exportKey", "postReceipt", "metrics"}  # need a client certificate


def _tls(run: Running) -> tuple[str, tuple[str, str]]:
    cert, key = run.world.client_paths("other")
    return str(run.world.pki / "ca.pem"), (str(cert), str(key))


def _unlimited_public_routes() -> dict[str, Any]:
    """The limits per address — requests without an authorized certificate (the public
    routes count too) and new connections — are lifted: this run sends hundreds of
    requests a second from one address, on new connections too, and checks that each
    answer is documented, not the limits (test_service_hostile.py does)."""
    from keyload.service.guard import ConnectionLimits
    from keyload.service.policy import Rate

    return {"limits": ConnectionLimits(anonymous_rate=Rate(1_000_000, 1.0),
                                       connect_rate=Rate(1_000_000, 1.0),
                                       anonymous_connect_rate=Rate(1_000_000, 1.0))}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(Path(tmp_path_factory.mktemp("service-api")), units=1)
    doc = policy_doc(w, per_sn={"limit": 1000, "window_s": 1})
    doc["clients"]["other"]["metrics"] = True  # "other": any set, any REF1, and metrics
    run = start_service(w, doc, **_unlimited_public_routes())
    try:
        ca, _ = _tls(run)
        served = requests.get(f"{run.url}/openapi.json", verify=ca, timeout=10)  # no cert
        assert served.status_code == 200, served.status_code
        assert served.json() == json.loads(COMMITTED.read_text()), "served != committed"
        yield run
    finally:
        run.stop()


# The committed document, which the fixture finds equal to the one the server serves
# (schemathesis' lazy loader, from a fixture, does not run on pytest 9).
COMMITTED = ROOT / "docs" / "openapi.json"
schema = schemathesis.openapi.from_path(str(COMMITTED),
                                        config=schemathesis.Config.from_str(CONFIG))


def _problem(response: Response) -> dict[str, Any] | None:
    ctype = response.headers.get("content-type", [""])[0]
    if ctype.split(";")[0].strip() != "application/problem+json":
        return None
    doc = json.loads(response.content)
    assert isinstance(doc, dict), doc
    return doc


@schemathesis.check
def problem_names_its_request(ctx: CheckContext, response: Response,
                              case: Case[Any]) -> bool | None:
    """An answer of the app names its request, in the problem too (the audit record's id)."""
    rid = response.headers.get("x-request-id", [None])[0]
    doc = _problem(response)
    if doc is not None and rid is not None:
        assert doc.get("instance") == f"urn:keyload:request:{rid}", (doc, rid)
    return None


@schemathesis.check
def exportkey_400_only_for_bad_klp1(ctx: CheckContext, response: Response,
                                    case: Case[Any]) -> bool | None:
    """The one 400 that valid data may get (see CONFIG): KLP1 data that the service's own
    decoder refuses, with SW 6A80 — octets, or in JSON the certificate ``c_u`` (suite
    0x03), or a JSON request giving some but not all of ``e_u``, ``c_u`` and ``sig_u``
    (its TLV form would lack one). A valid JSON request otherwise, or octets that decode,
    is never refused as malformed."""
    if case.operation.path != "/v1/exportkey" or response.status_code != 400 or \
            case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    doc = _problem(response)
    assert doc is not None, response.content
    body = response.request.body
    if case.media_type == "application/json" and isinstance(case.body, dict):
        given = {"e_u", "c_u", "sig_u"} & set(case.body)
        if given and len(given) < 3:  # suite 0x03's three go together: a TLV is missing
            assert doc.get("sw") == "6A80", doc
            return None
    klp1: bytes | None = None
    if case.media_type == "application/octet-stream" and isinstance(body, bytes):
        klp1, decode = body, decode_export_request
    elif case.media_type == "application/json" and isinstance(case.body, dict) and \
            "c_u" in case.body:
        klp1, decode = bytes.fromhex(case.body["c_u"]), Certificate.decode
    if klp1 is not None:
        try:
            decode(klp1)
        except StatusError:
            assert doc.get("sw") == "6A80", doc
            return None
        raise AssertionError(f"KLP1 data refused as malformed: {klp1.hex()} {doc}")
    raise AssertionError(f"a schema-valid {case.media_type} EXPORTKEY refused: {doc}")


@pytest.mark.slow  # fuzzing: generated requests for every operation
@schema.parametrize()
def test_service_conforms_to_its_openapi_document(case: Case[Any], svc: Running) -> None:
    ca, cert = _tls(svc)

    def certificate_enforced(ctx: CheckContext, response: Response,
                             case: Case[Any]) -> bool | None:
        """What ``ignored_auth`` does for API keys, for the client certificate: the same
        request without one is refused with 401 (problem+json) on a secured operation."""
        if case.operation.definition.raw.get("operationId") not in SECURED:
            return None
        bare = case.call(base_url=svc.url, verify=ca, cert=None, timeout=10)
        if response.status_code in (405, 431):  # the request head is refused first
            assert bare.status_code == response.status_code, bare.status_code
            return None
        doc = _problem(bare)
        assert bare.status_code == 401 and doc is not None and \
            doc["type"] == "urn:keyload:problem:unauthenticated", (bare.status_code, doc)
        return None

    case.call_and_validate(
        base_url=svc.url, verify=ca, cert=cert, timeout=10,
        additional_checks=[certificate_enforced])  # and every registered check


def _schemathesis_cli() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    found = str(exe) if exe.exists() else shutil.which("schemathesis")
    if found is None:
        pytest.skip("the schemathesis command is not installed")
    return found


@pytest.mark.slow
def test_schemathesis_cli_all_checks_against_the_served_document(
        svc: Running, tmp_path: Path) -> None:
    """``schemathesis run --checks all`` against ``/openapi.json`` of the running server,
    the client certificate given by the TLS options: it must end with no failure."""
    ca, (cert, key) = _tls(svc)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [_schemathesis_cli(), "--config-file", str(config), "run", "--no-color",
           f"{svc.url}/openapi.json", "--checks", "all", "--mode", "all",
           "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
           "--tls-verify", ca, "--request-cert", cert, "--request-cert-key", key,
           "--request-timeout", "10"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": __name__, "PYTHONPATH": path}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-5000:]
    assert "5 selected / 5 total" in r.stdout, r.stdout  # every operation was tested
