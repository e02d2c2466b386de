"""The OpenAPI 3.1 document of the service (served at ``/openapi.json``; a copy is
committed as ``docs/openapi.json`` and a test keeps the two equal).

Regenerate the committed copy with ``python -m keyload.service.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from .. import __version__

_HEXB = "^([0-9a-fA-F]{2})"


def _hex(n_min: int, n_max: int, what: str) -> dict[str, Any]:
    rep = f"{{{n_min}}}" if n_min == n_max else f"{{{n_min},{n_max}}}"
    return {"type": "string", "pattern": f"{_HEXB}{rep}$", "description": what}


def _problem(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}


_REFUSALS = {
    "400": _problem("malformed request (SW 6A80 when the KLP1 data is at fault)"),
    "401": _problem("no client certificate"),
    "403": _problem("client, set or REF1 not authorized; or the authority's export policy"),
    "413": _problem("body too large"),
    "415": _problem("unsupported media type"),
    "429": _problem("rate limit (per client or per SN); see Retry-After"),
    "431": _problem("request line and headers over 16 KiB"),
    "503": _problem("the service cannot record the request: nothing was done"),
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keyload remote download service",
            "version": __version__,
            "description": (
                "KLP1 EXPORTKEY over HTTPS for units in the field (PROTOCOL.md §5, §8). "
                "Every request is made over TLS with a client certificate issued by the "
                "service's CA; the authorization policy names clients by certificate CN. "
                "Each (SN, R) is served once. Every refusal is application/problem+json "
                "(RFC 9457); refusals by the authority carry the status word in `sw`."),
        },
        "servers": [{"url": "https://localhost:8443"}],
        "security": [{"mtls": []}],
        "paths": {
            "/v1/exportkey": {"post": {
                "operationId": "exportKey",
                "summary": "EXPORTKEY: the IMPORTKEY data for one unit's challenge",
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "EXPORTKEY command data, TLV C1 C2 C3 C4 C6 C7"},
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ExportRequest"}},
                }},
                "responses": {
                    "200": {"description": "the IMPORTKEY data, in the request's form",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"},
                                    "description": "EXPORTKEY response data, E0{…} CD"},
                                "application/json": {"schema": {
                                    "$ref": "#/components/schemas/ExportResponse"}}}},
                    **_REFUSALS,
                    "404": _problem("set or REF1 unknown to the authority (SW 6A82 / 6A88)"),
                    "409": _problem("replay: this (SN, R) was already presented"),
                    "422": _problem("refused by the authority (suite, SW in `sw`)"),
                },
            }},
            "/v1/receipts": {"post": {
                "operationId": "postReceipt",
                "summary": "the unit's receipt (RCT): verified, then recorded in the ledger",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Receipt"}}}},
                "responses": {
                    "201": {"description": "verified and recorded", "content": {
                        "application/json": {"schema": {
                            "$ref": "#/components/schemas/ReceiptRecorded"}}}},
                    "200": {"description": "this very receipt was already recorded (a retry)",
                            "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/ReceiptRecorded"}}}},
                    **_REFUSALS,
                    "404": _problem("no export to this client for this (SN, R)"),
                    "409": _problem("another receipt already recorded, or nothing exported"),
                    "422": _problem("receipt or KCV does not verify (SW 6982)"),
                },
            }},
            "/v1/health": {"get": {
                "operationId": "health", "security": [],
                "summary": "readiness: the state can be read and the authority answers",
                "responses": {"200": {"description": "up", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Health"}}}},
                    "431": _problem("request line and headers over 16 KiB"),
                    "503": _problem("the state or the authority is not available")},
            }},
            "/v1/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this instance",
                "responses": {
                    "200": {"description": "metrics", "content": {
                        "text/plain": {"schema": {"type": "string"}}}},
                    "401": _problem("no client certificate"),
                    "403": _problem("client not authorized for metrics"),
                    "431": _problem("request line and headers over 16 KiB"),
                },
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "security": [],
                "summary": "this document",
                "responses": {"200": {"description": "OpenAPI document", "content": {
                    "application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {"mtls": {
                "type": "mutualTLS",
                "description": "a client certificate issued by the service's CA"}},
            "schemas": {
                "ExportRequest": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sn", "r", "set_id", "suite", "ref1", "ref2"],
                    "properties": {
                        "sn": _hex(1, 32, "the unit's serial number"),
                        "r": _hex(16, 16, "the unit's challenge R"),
                        "set_id": _hex(5, 5, "set id = KCV(T)"),
                        "suite": {"type": "integer", "minimum": 0, "maximum": 255},
                        "ref1": _hex(1, 32, "REF1: the application key at the authority"),
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                    }},
                "ExportResponse": {
                    "type": "object",
                    "required": ["import_data", "kcv", "header", "ref2", "suite",
                                 "key_version"],
                    "properties": {
                        "import_data": {"type": "string",
                                        "description": "IMPORTKEY data, C7 C8 C9 CA CB (hex)"},
                        "kcv": _hex(5, 5, "KCV of the key loaded"),
                        "header": _hex(12, 12, "key header H"),
                        "ref2": {"type": "integer"}, "suite": {"type": "integer"},
                        "key_version": {"type": "integer"},
                    }},
                "Receipt": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sn", "r", "ref2", "kcv", "rct"],
                    "properties": {
                        "sn": _hex(1, 32, "the unit's serial number"),
                        "r": _hex(16, 16, "the challenge of the download"),
                        "ref2": {"type": "integer", "minimum": 1, "maximum": 254},
                        "kcv": _hex(5, 5, "the unit's KCV (IMPORTKEY response CD)"),
                        "rct": _hex(16, 16, "the unit's receipt (IMPORTKEY response CF)"),
                    }},
                "ReceiptRecorded": {
                    "type": "object",
                    "required": ["status", "sn", "set_id", "ref1", "ref2", "key_version",
                                 "kcv"],
                    "properties": {
                        "status": {"const": "recorded"}, "sn": {"type": "string"},
                        "set_id": {"type": "string"}, "ref1": {"type": "string"},
                        "ref2": {"type": "integer"}, "key_version": {"type": "integer"},
                        "kcv": {"type": "string"}}},
                "Health": {"type": "object", "required": ["status"], "properties": {
                    "status": {"const": "ok"}, "instance": {"type": "string"},
                    "checks": {"type": "object", "additionalProperties": {
                        "enum": ["ok", "unavailable"]}}}},
                "Problem": {
                    "type": "object", "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"}, "title": {"type": "string"},
                        "status": {"type": "integer"}, "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "sw": {"type": "string", "pattern": "^[0-9A-F]{4}$",
                               "description": "the authority's status word, if it refused"},
                    }},
            },
        },
    }


def render() -> str:
    return json.dumps(openapi_document(), indent=1) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
