"""Property-based API testing of the real service against its OpenAPI document.

schemathesis generates requests (valid and invalid) from ``docs/openapi.json`` and sends
them over real mutual TLS; no response may be a 5xx, and every answer must be what the
document says (status codes, content types, schemas).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_service import ROOT, Running, build_world, policy_doc, start_service

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

schema = schemathesis.openapi.from_path(str(ROOT / "docs" / "openapi.json"))
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(Path(tmp_path_factory.mktemp("service-api")), units=1)
    run = start_service(w, policy_doc(w, per_sn={"limit": 1000, "window_s": 1}))
    yield run
    run.stop()


@pytest.fixture(scope="module")
def session(svc: Running) -> Iterator[requests.Session]:
    s = requests.Session()
    s.verify = str(svc.world.pki / "ca.pem")
    cert, key = svc.world.client_paths("other")
    s.cert = (str(cert), str(key))
    yield s
    s.close()


@schema.parametrize()
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_service_openapi_property_no_5xx(case: object, svc: Running,
                                         session: requests.Session) -> None:
    response = case.call(base_url=svc.url, session=session, timeout=10,  # type: ignore[attr-defined]
                         verify=session.verify, cert=session.cert)
    case.validate_response(response, checks=[not_a_server_error])  # type: ignore[attr-defined]
    assert response.status_code < 500
