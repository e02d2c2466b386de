"""NIST CAVP vectors and the SP 800-38B / RFC 4231 examples through keyload.core.primitives.

- nist/kbkdf_sp800_108_counter.json: only PRF CMAC_AES128/192/256 with the counter before
  the fixed data (what ``kbkdf_cmac_into`` implements), all counter widths.
- nist/cmac_aes_cavp.json: CMACGen (tag = leftmost Tlen bytes) and CMACVer.
- nist/aes_kw_kwp_sp800_38f.json: KW and KWP, wrap (AE files) and unwrap (AD files).
  The 3000 cases are grouped by source file and plaintext length; a failing group lists
  the tc_id of every failing case.
- nist/hmac_cavp.json: SHA-256 only (HMAC.rsp [L=32]).
- pyca_cryptography_vectors/CMAC/nist-800-38b-aes{128,192,256}.txt and
  HMAC/rfc-4231-sha256.txt.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyload.core.errors import AuthenticityError, IntegrityError
from keyload.core.primitives import (
    aes_cmac,
    aes_cmac_verify,
    aes_kw_unwrap,
    aes_kw_wrap,
    aes_kwp_unwrap,
    aes_kwp_wrap,
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    hmac_sha256,
    kbkdf_cmac_into,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
NIST = VECTORS / "nist"
PYCA = VECTORS / "pyca_cryptography_vectors"


def _nist(name: str) -> list[dict[str, Any]]:
    data = json.loads((NIST / name).read_text())
    tests: list[dict[str, Any]] = data["tests"]
    assert len(tests) == data["number_of_tests"]
    return tests


def _h(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr)


# --- KBKDF counter mode, PRF AES-CMAC, counter before the fixed data ----------------------

_KBKDF_PRFS = {"CMAC_AES128": 16, "CMAC_AES192": 24, "CMAC_AES256": 32}
_KBKDF = [
    t for t in _nist("kbkdf_sp800_108_counter.json")
    if t["prf"] in _KBKDF_PRFS and t["counter_location"] == "BEFORE_FIXED"
]


def test_kbkdf_selection_is_complete() -> None:
    # 3 PRFs x 4 counter widths x 20 cases (even positions of the source file)
    assert len(_KBKDF) == 240
    assert {t["r_bits"] for t in _KBKDF} == {8, 16, 24, 32}


@pytest.mark.parametrize("t", [pytest.param(t, id=t["tc_id"]) for t in _KBKDF])
def test_kbkdf_cmac_counter_before_fixed(t: dict[str, Any]) -> None:
    key = _h(t["key"])
    assert len(key) == _KBKDF_PRFS[t["prf"]]
    assert t["L_bits"] % 8 == 0, "keyload derives whole bytes only"
    assert t["r_bits"] % 8 == 0
    assert _h(t["debug_prf_input_1"]) == _h(t["debug_counter_1"]) + _h(t["input"])
    out = bytearray(t["L_bits"] // 8)
    kbkdf_cmac_into(key, out, fixed=_h(t["input"]), rlen=t["r_bits"] // 8)
    assert bytes(out) == _h(t["output"])


# --- CMAC CAVP --------------------------------------------------------------------------

_CMAC = _nist("cmac_aes_cavp.json")


@pytest.mark.parametrize("t", [pytest.param(t, id=t["tc_id"]) for t in _CMAC])
def test_cmac_cavp(t: dict[str, Any]) -> None:
    key, msg, tag = _h(t["key"]), _h(t["input"]), _h(t["output"])
    assert len(key) * 8 == t["key_bits"]
    assert len(msg) == t["msg_len_bytes"]
    assert len(tag) == t["tag_len_bytes"]
    if t["source_file"].startswith("CMACGen"):
        assert "expected_result" not in t
        assert aes_cmac(key, msg)[: t["tag_len_bytes"]] == tag
        aes_cmac_verify(key, msg, tag)
        return
    assert t["source_file"].startswith("CMACVer")
    if t["expected_result"] == "valid":
        aes_cmac_verify(key, msg, tag)
        assert aes_cmac(key, msg)[: len(tag)] == tag
    else:
        assert t["expected_result"] == "invalid"
        with pytest.raises(IntegrityError) as info:
            aes_cmac_verify(key, msg, tag)
        assert type(info.value) is IntegrityError


# --- AES-KW / AES-KWP (SP 800-38F) -------------------------------------------------------

_WRAP: dict[str, tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes], bytes]]] = {
    "AES-KW": (aes_kw_wrap, aes_kw_unwrap),
    "AES-KWP": (aes_kwp_wrap, aes_kwp_unwrap),
}


def _kw_groups() -> list[Any]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for t in _nist("aes_kw_kwp_sp800_38f.json"):
        groups[(t["source_file"], t["plaintext_len_bits"])].append(t)
    return [
        pytest.param(cases, id=f"{src}/PLAINTEXT_LENGTH={bits}")
        for (src, bits), cases in sorted(groups.items())
    ]


_KW_GROUPS = _kw_groups()


def test_kw_groups_cover_every_case() -> None:
    assert sum(len(p.values[0]) for p in _KW_GROUPS) == 3000


def _kw_case_failure(t: dict[str, Any]) -> str | None:
    """None when the case passes, else a short reason (no exception escapes)."""
    wrap, unwrap = _WRAP[t["algorithm"]]
    key, data = _h(t["key"]), _h(t["input"])
    if len(key) * 8 != t["key_bits"]:
        return "key length does not match key_bits"
    if t["direction"] == "wrap":
        if t["expected_result"] != "valid":
            return "unexpected wrap expectation"
        plain, wrapped = data, _h(t["output"])
        if len(plain) * 8 != t["plaintext_len_bits"]:
            return "plaintext length does not match"
        try:
            if wrap(key, plain) != wrapped:
                return "wrap gave other bytes"
            if unwrap(key, wrapped) != plain:
                return "unwrap of own wrap gave other bytes"
        except Exception as exc:
            return f"raised {type(exc).__name__}"
        return None
    if t["direction"] != "unwrap":
        return "unknown direction"
    if t["expected_result"] == "valid":
        try:
            got = unwrap(key, data)
        except Exception as exc:
            return f"raised {type(exc).__name__}"
        if got != _h(t["output"]):
            return "unwrap gave other bytes"
        if len(got) * 8 != t["plaintext_len_bits"]:
            return "plaintext length does not match"
        return None
    if t["expected_result"] != "invalid" or t["output"] is not None:
        return "unexpected unwrap expectation"
    try:
        unwrap(key, data)
    except IntegrityError as exc:
        if type(exc) is not IntegrityError:
            return f"raised subclass {type(exc).__name__}"
        return None
    except Exception as exc:
        return f"raised {type(exc).__name__} instead of IntegrityError"
    return "unwrap of a bad ciphertext succeeded"


@pytest.mark.parametrize("cases", _KW_GROUPS)
def test_aes_kw_kwp_sp800_38f(cases: list[dict[str, Any]]) -> None:
    failures = [f"{t['tc_id']}: {why}" for t in cases if (why := _kw_case_failure(t))]
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)


def test_kw_case_checker_detects_a_wrong_answer() -> None:
    """The grouped checker itself must report a case whose expected output is wrong."""
    t = next(t for p in _KW_GROUPS for t in p.values[0]
             if t["direction"] == "wrap" and t["algorithm"] == "AES-KWP")
    bad = dict(t, output=t["output"][:-2] + ("00" if t["output"][-2:] != "00" else "01"))
    assert _kw_case_failure(t) is None
    assert _kw_case_failure(bad) == "wrap gave other bytes"
    u = next(t for p in _KW_GROUPS for t in p.values[0]
             if t["direction"] == "unwrap" and t["expected_result"] == "invalid")
    assert _kw_case_failure(u) is None
    assert _kw_case_failure(dict(u, expected_result="valid", output="00")) is not None


# --- HMAC CAVP, SHA-256 only ---------------------------------------------------------------

_HMAC = [t for t in _nist("hmac_cavp.json") if t["hash"] == "SHA-256"]


def test_hmac_selection() -> None:
    assert len(_HMAC) == 120


@pytest.mark.parametrize("t", [pytest.param(t, id=t["tc_id"]) for t in _HMAC])
def test_hmac_sha256_cavp(t: dict[str, Any]) -> None:
    key, msg, tag = _h(t["key"]), _h(t["input"]), _h(t["output"])
    assert len(key) == t["key_len_bytes"]
    assert len(tag) == t["tag_len_bytes"]
    assert hmac_sha256(key, msg)[: t["tag_len_bytes"]] == tag


# --- pyca text files: SP 800-38B examples and RFC 4231 ------------------------------------


def _records(path: Path) -> list[dict[str, str]]:
    """Blank-line separated ``NAME = value`` records; ``#`` lines are comments."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            if current:
                records.append(current)
                current = {}
            continue
        name, _, value = line.partition("=")
        current[name.strip().upper()] = value.strip()
    if current:
        records.append(current)
    return records


def _sp800_38b() -> list[Any]:
    params = []
    for bits in (128, 192, 256):
        path = PYCA / "CMAC" / f"nist-800-38b-aes{bits}.txt"
        recs = _records(path)
        assert len(recs) == 4, path
        for r in recs:
            params.append(pytest.param(bits, r, id=f"aes{bits}:COUNT={r['COUNT']}"))
    return params


@pytest.mark.parametrize(("bits", "rec"), _sp800_38b())
def test_cmac_sp800_38b_examples(bits: int, rec: dict[str, str]) -> None:
    key, msg, out = _h(rec["KEY"]), _h(rec["MESSAGE"]), _h(rec["OUTPUT"])
    assert len(key) * 8 == bits
    assert len(out) == 16
    assert aes_cmac(key, msg) == out
    aes_cmac_verify(key, msg, out)
    with pytest.raises(IntegrityError):
        aes_cmac_verify(key, msg + b"\x00", out)


def _rfc4231() -> list[Any]:
    recs = _records(PYCA / "HMAC" / "rfc-4231-sha256.txt")
    assert len(recs) == 6
    return [pytest.param(r, id=f"rfc4231-sha256:{i}") for i, r in enumerate(recs)]


@pytest.mark.parametrize("rec", _rfc4231())
def test_hmac_rfc4231(rec: dict[str, str]) -> None:
    key, msg, md = _h(rec["KEY"]), _h(rec["MSG"]), _h(rec["MD"])
    assert int(rec["LEN"]) == 8 * len(msg)
    assert hmac_sha256(key, msg) == md


# --- Ed25519: verify returns None or raises, like aes_cmac_verify ------------------------


def test_ed25519_verify_returns_none_or_raises_authenticity_error() -> None:
    sk = bytes(range(32))
    pub = ed25519_public(sk)
    msg = b"keyload verify contract"
    sig = ed25519_sign(sk, msg)
    assert ed25519_verify(pub, sig, msg) is None  # type: ignore[func-returns-value]
    bad_sig = bytes([sig[0] ^ 1]) + sig[1:]
    for args in ((pub, bad_sig, msg), (pub, sig, msg + b"\x00"),
                 (ed25519_public(bytes(32)), sig, msg),  # another key
                 (pub[:31], sig, msg), (pub, sig[:63], msg)):  # malformed key / signature
        with pytest.raises(AuthenticityError) as info:
            ed25519_verify(*args)
        assert type(info.value) is AuthenticityError
        assert str(info.value) == "6988 AUTHENTICITY: authenticity check failed"
