"""The OpenAPI 3.1 document of the service (served at ``/openapi.json``; a copy is
committed as ``docs/openapi.json`` and a test keeps the two equal).

It states every status each operation can answer, with its media type, schema and
headers: the app's own answers (:mod:`.app`, :mod:`.problems`) and the refusals of the
server around it (a malformed request, a request head that is too large or too slow, a
rate limit per peer address, the connection limit, a revoked certificate). Every
refusal is ``application/problem+json``; where the app alone gives a status, the
problem's ``type`` is one of the slugs listed for it and its ``status`` is the HTTP
status. ``tests/integration/test_service_schemathesis.py`` holds the server to it.

Regenerate the committed copy with ``python -m keyload.service.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from .policy import Limits

_HEXB = "^([0-9a-fA-F]{2})"
_PROBLEM = "urn:keyload:problem:"
MAX_BODY = Limits().max_body  # the policy's default; a deployment may set 256..1 MiB

# EXPORTKEY command data as KLP1 TLV (docs/protocol.md §5): C1 SN (1-32), C2 R (16), C3 set
# (5), C4 suite (1), C6 REF1 (1-32), C7 REF2 (1), each with a one-byte tag and a one-byte
# (shortest-form) length: 6 * 2 + 1 + 16 + 5 + 1 + 1 + 1 = 37 to 6 * 2 + 32 + 16 + 5 + 1
# + 32 + 1 = 99 bytes.
EXPORT_TLV_MIN = 37
EXPORT_TLV_MAX = 99
# Suite 0x03 (docs/protocol.md §10.2) adds D3 E_U (2 + 65), E1 C_U (3 + 149..180: C0 3, C5 3,
# C3 7, C1 3..34, D0 67, D2 66) and D5 sigU (2 + 64): 37 + 67 + 152 + 66 = 322 to
# 99 + 67 + 183 + 66 = 415 bytes.
EXPORT3_TLV_MIN = 322
EXPORT3_TLV_MAX = 415
CERT_MIN, CERT_MAX = 152, 183  # an encoded certificate E1 {…} (docs/protocol.md §10.1)


def _hex(n_min: int, n_max: int, what: str) -> dict[str, Any]:
    rep = f"{{{n_min}}}" if n_min == n_max else f"{{{n_min},{n_max}}}"
    return {"type": "string", "pattern": f"{_HEXB}{rep}$", "description": what}


_SUITE3 = ("e_u", "c_u", "sig_u")  # all three or none (suite 0x03)


_REQUEST_ID = {"description": "the request's id, also in the audit record and in the "
                              "problem's `instance`",
               "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}
_NO_STORE = {"description": "`no-store`: nothing the service answers may be cached",
             "schema": {"const": "no-store"}}
_RETRY_AFTER = {"description": "seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 1}}


def _headers(*, app_only: bool, retry: bool | None = None) -> dict[str, Any]:
    """The headers of a response. ``app_only``: only the app gives this status, so its
    X-Request-Id and Cache-Control are always there (the server's own refusals, before
    the app, need not carry them). ``retry``: Retry-After required (True) or possible."""
    h: dict[str, Any] = {"X-Request-Id": {**_REQUEST_ID, "required": app_only},
                         "Cache-Control": {**_NO_STORE, "required": app_only}}
    if retry is not None:
        h["Retry-After"] = {**_RETRY_AFTER, "required": retry}
    return h


def _ok(desc: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"description": desc, "headers": _headers(app_only=True), "content": content}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _problem(status: int, desc: str, slugs: tuple[str, ...] | None = None, *,
             retry: bool | None = None) -> dict[str, Any]:
    """A refusal: ``slugs`` are the problem types the app gives with this status (None
    when the server around the app may refuse with it too: any ``urn:keyload:problem:``
    type then)."""
    own: dict[str, Any] = {"status": {"const": status}}
    if slugs is not None:
        own["type"] = {"enum": [_PROBLEM + s for s in slugs]}
    return {"description": desc,
            "headers": _headers(app_only=slugs is not None, retry=retry),
            "content": {"application/problem+json": {"schema": {
                "allOf": [{"$ref": "#/components/schemas/Problem"}],
                "properties": own}}}}


# Every route, before and around the app: the HTTP layer, the limits, the state.
_EVERY_ROUTE = {
    "400": _problem(400, "malformed HTTP request (refused before the app)"),
    "408": _problem(408, "the request head did not arrive within the timeout"),
    "429": _problem(429, "rate limit (per client, per SN, or per peer address for requests "
                         "without a client certificate); see Retry-After", retry=True),
    "431": _problem(431, "request line and headers over 16 KiB"),
    "500": _problem(500, "an unexpected error (a bug): no detail, nothing done",
                    ("internal",)),
    "503": _problem(503, "the service cannot serve or record the request (state busy or "
                         "unavailable, audit record failed, connection limit): nothing was "
                         "done", retry=False),
}

# Routes that need a client certificate.
_CERTIFIED = {
    "401": _problem(401, "no client certificate", ("unauthenticated",)),
}
_FORBIDDEN_CLIENT = ("client-not-authorized", "client-revoked")

_BODY = {
    "413": _problem(413, f"body over the policy's max_body (default {MAX_BODY} bytes)",
                    ("too-large",)),
    "415": _problem(415, "unsupported media type", ("unsupported-media-type",)),
}


def openapi_document() -> dict[str, Any]:
    klp1_request = {
        "type": "string", "contentMediaType": "application/octet-stream",
        "minLength": EXPORT_TLV_MIN, "maxLength": EXPORT3_TLV_MAX,
        "description": (
            "EXPORTKEY command data, KLP1 BER-TLV with one-byte tags and shortest-form "
            "lengths, exactly these in this order: C1 SN (1-32 bytes), C2 R (16), C3 set id "
            "(5), C4 suite (1), C6 REF1 (1-32), C7 REF2 (1, 1..254); nothing else "
            f"({EXPORT_TLV_MIN} to {EXPORT_TLV_MAX} octets). For a unit of an identity set "
            "(suite 0x03, docs/protocol.md §10.2) these are followed by D3 E_U (65), E1 C_U "
            f"(the unit's certificate) and D5 sigU (64) ({EXPORT3_TLV_MIN} to "
            f"{EXPORT3_TLV_MAX} octets). Any other octets are refused with 400 (`sw` 6A80).")}
    klp1_response = {
        "type": "string", "contentMediaType": "application/octet-stream",
        "description": (
            "EXPORTKEY response data, KLP1 BER-TLV: E0 {C7 REF2, C8 H (12), C9 W, CA SAS, "
            "CB CAS (16)} (the IMPORTKEY command data) then CD KCV (5); for suite 0x03, "
            "E0 {C6 REF1, C7 REF2, C8 H, C9 W, D4 E_A (65), E1 C_A, CA SAS (64), CB CAS} "
            "then CD KCV.")}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keyload remote download service",
            "version": __version__,
            "description": (
                "KLP1 EXPORTKEY over HTTPS for units in the field (docs/protocol.md §5, §8). "
                "Requests are made over TLS; every route but /v1/health and /openapi.json "
                "needs a client certificate issued by the service's CA (401 without one); "
                "the authorization policy names clients by certificate CN. "
                "Each (SN, R) is served once. Every refusal is application/problem+json "
                "(RFC 9457); refusals by the authority carry the status word in `sw`. "
                "Every answer of the app has X-Request-Id and Cache-Control: no-store."),
        },
        "servers": [{"url": "https://localhost:8443"}],
        "security": [{"mtls": []}],
        "paths": {
            "/v1/exportkey": {"post": {
                "operationId": "exportKey",
                "summary": "EXPORTKEY: the IMPORTKEY data for one unit's challenge",
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": klp1_request},
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ExportRequest"}},
                }},
                "responses": {
                    "200": _ok("the IMPORTKEY data, in the request's form", {
                        "application/octet-stream": {"schema": klp1_response},
                        **_json("ExportResponse")}),
                    "400": _problem(400, "malformed request: bad JSON (no `sw`), bad fields "
                                         "or KLP1 data the service or the authority refuses "
                                         "(`sw` 6A80 or 6700), bad Content-Length; or "
                                         "malformed HTTP (refused before the app)"),
                    **_CERTIFIED,
                    "403": _problem(403, "client, set or REF1 not authorized by the policy; "
                                         "certificate revoked; the authority's export "
                                         "policy (`sw` 6986); or the unit is revoked in "
                                         "its identity set (`sw` 6983)",
                                    (*_FORBIDDEN_CLIENT, "set-not-authorized",
                                     "ref1-not-authorized", "export-policy",
                                     "unit-revoked")),
                    "404": _problem(404, "set or REF1 unknown to the authority (`sw` 6A82 "
                                         "/ 6A88)", ("unknown-set", "unknown-ref1")),
                    "409": _problem(409, "replay: this (SN, R) was already presented "
                                         "(suite 0x03: served before, `sw` 6985)",
                                    ("replay",)),
                    **_BODY,
                    "422": _problem(422, "refused by the authority: suite not offered or "
                                         "not the set's (6A81), integrity (6982; suite "
                                         "0x03: C_U, sigU or E_U), authenticity (6988) or "
                                         "another status word (in `sw`)",
                                    ("suite-unsupported", "integrity", "authenticity",
                                     "refused")),
                    **_EVERY_ROUTE,
                },
            }},
            "/v1/receipts": {"post": {
                "operationId": "postReceipt",
                "summary": "the unit's receipt (RCT): verified, then recorded in the ledger",
                "requestBody": {"required": True, "content": _json("Receipt")},
                "responses": {
                    "200": _ok("this very receipt was already recorded (a retry)",
                               _json("ReceiptRecorded")),
                    "201": _ok("verified and recorded", _json("ReceiptRecorded")),
                    "400": _problem(400, "malformed request: bad JSON (no `sw`) or fields "
                                         "(`sw` 6A80), bad Content-Length; or malformed HTTP "
                                         "(refused before the app)"),
                    **_CERTIFIED,
                    "403": _problem(403, "client not authorized or certificate revoked",
                                    _FORBIDDEN_CLIENT),
                    "404": _problem(404, "no export to this client for this (SN, R)",
                                    ("unknown-export",)),
                    "409": _problem(409, "another receipt already recorded, or nothing "
                                         "exported", ("receipt-recorded", "not-exported")),
                    **_BODY,
                    "422": _problem(422, "REF2 or KCV differ from the export, or the receipt "
                                         "does not verify (`sw` 6982)",
                                    ("mismatch", "kcv-mismatch", "receipt-invalid")),
                    **_EVERY_ROUTE,
                },
            }},
            "/v1/health": {"get": {
                "operationId": "health", "security": [],
                "summary": "readiness: the state can be read and the authority answers",
                "responses": {
                    "200": _ok("up", _json("Health")),
                    **_EVERY_ROUTE,
                    "503": _problem(503, "the state or the authority is not available (or "
                                         "the service cannot record the request)",
                                    retry=False),
                },
            }},
            "/v1/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this instance",
                "responses": {
                    "200": _ok("metrics (Prometheus text exposition format 0.0.4)", {
                        "text/plain": {"schema": {"type": "string"}}}),
                    **_CERTIFIED,
                    "403": _problem(403, "client not authorized for metrics, not authorized, "
                                         "or certificate revoked",
                                    ("forbidden", *_FORBIDDEN_CLIENT)),
                    **_EVERY_ROUTE,
                },
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "security": [],
                "summary": "this document",
                "responses": {
                    "200": _ok("OpenAPI document", {"application/json": {"schema": {
                        "type": "object", "required": ["openapi", "info", "paths"]}}}),
                    **_EVERY_ROUTE,
                },
            }},
        },
        "components": {
            "securitySchemes": {"mtls": {
                "type": "mutualTLS",
                "description": "a client certificate issued by the service's CA, named "
                               "(by CN, optionally pinned) in the authorization policy"}},
            "schemas": {
                "ExportRequest": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sn", "r", "set_id", "suite", "ref1", "ref2"],
                    "dependentRequired": {k: [o for o in _SUITE3 if o != k] for k in _SUITE3},
                    "properties": {
                        "sn": _hex(1, 32, "the unit's serial number"),
                        "r": _hex(16, 16, "the unit's challenge R"),
                        "set_id": _hex(5, 5, "set id = KCV(T), or that of the set CA's "
                                             "key for an identity set"),
                        "suite": {"type": "integer", "minimum": 0, "maximum": 255},
                        "ref1": _hex(1, 32, "REF1: the application key at the authority"),
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                        "e_u": _hex(65, 65, "suite 0x03: the unit's ephemeral key E_U (D3)"),
                        "c_u": _hex(CERT_MIN, CERT_MAX, "suite 0x03: the unit's certificate "
                                                        "C_U, encoded E1 {…}"),
                        "sig_u": _hex(64, 64, "suite 0x03: the unit's signature of its "
                                              "challenge (D5)"),
                    }},
                "ExportResponse": {
                    "type": "object", "additionalProperties": False,
                    "required": ["import_data", "kcv", "header", "ref2", "suite",
                                 "key_version"],
                    "properties": {
                        "import_data": {"type": "string", "pattern": f"{_HEXB}+$",
                                        "description": "IMPORTKEY data, C7 C8 C9 CA CB "
                                                       "(suite 0x03: C6 C7 C8 C9 D4 E1 CA "
                                                       "CB) (hex)"},
                        "kcv": _hex(5, 5, "KCV of the key loaded"),
                        "header": _hex(12, 12, "key header H"),
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                        "suite": {"type": "integer", "minimum": 0, "maximum": 255},
                        "key_version": {"type": "integer", "minimum": 0, "maximum": 65535},
                    }},
                "Receipt": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sn", "r", "ref2", "kcv", "rct"],
                    "properties": {
                        "sn": _hex(1, 32, "the unit's serial number"),
                        "r": _hex(16, 16, "the challenge of the download"),
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                        "kcv": _hex(5, 5, "the unit's KCV (IMPORTKEY response CD)"),
                        "rct": {"type": "string",
                                "pattern": "^(([0-9a-fA-F]{2}){16}|([0-9a-fA-F]{2}){64})$",
                                "description": "the unit's receipt (IMPORTKEY response CF): "
                                               "16 bytes, or 64 for suite 0x03 (the unit's "
                                               "ECDSA signature)"},
                    }},
                "ReceiptRecorded": {
                    "type": "object", "additionalProperties": False,
                    "required": ["status", "sn", "set_id", "ref1", "ref2", "key_version",
                                 "kcv"],
                    "properties": {
                        "status": {"const": "recorded"},
                        "sn": _hex(1, 32, "the unit's serial number"),
                        "set_id": _hex(5, 5, "set id"),
                        "ref1": {"type": "string", "minLength": 1,
                                 "description": "REF1 as text, or 0x and hex"},
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                        "key_version": {"type": "integer", "minimum": 0, "maximum": 65535},
                        "kcv": _hex(5, 5, "KCV of the key loaded")}},
                "Health": {
                    "type": "object", "additionalProperties": False,
                    "required": ["status", "instance", "checks"],
                    "properties": {
                        "status": {"const": "ok"}, "instance": {"type": "string"},
                        "checks": {"type": "object", "additionalProperties": False,
                                   "required": ["state", "authority"],
                                   "properties": {"state": {"const": "ok"},
                                                  "authority": {"const": "ok"}}}}},
                "Problem": {
                    "type": "object", "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string", "pattern": "^urn:keyload:problem:[a-z0-9-]+$"},
                        "title": {"type": "string"},
                        "status": {"type": "integer", "minimum": 400, "maximum": 599},
                        "detail": {"type": "string"},
                        "instance": {"type": "string",
                                     "pattern": "^urn:keyload:request:[0-9a-f]{16}$"},
                        "sw": {"type": "string", "pattern": "^[0-9A-F]{4}$",
                               "description": "the status word (docs/protocol.md §6) when the "
                                              "KLP1 data or the authority is at fault"},
                    }},
            },
        },
    }


def render() -> str:
    return json.dumps(openapi_document(), indent=1) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
