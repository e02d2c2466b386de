"""The policy file as ``keyload serve --policy`` and ``--check-policy`` read it, and the
connection-limit flags of ``keyload serve`` as the service defines them."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyload.core.errors import StoreError
from keyload.service.guard import LIMIT_FLAGS, ConnectionLimits
from keyload.service.runtime import read_policy


def test_a_valid_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"clients": {"t1": {"sets": "any", "ref1": ["PIN"]}}, "limits": {}}')
    policy = read_policy(path)
    assert sorted(policy.clients) == ["t1"] and policy.sha256 is not None


def test_a_missing_file_is_a_store_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"policy file not found: .*nothing\.json"):
        read_policy(tmp_path / "nothing.json")


def test_a_wrong_policy_names_the_file_and_the_fault(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"clients": {"t1": {"sets": "any"}}}')
    with pytest.raises(ValueError, match=r"p\.json: policy\.clients\.t1: needs 'sets'"):
        read_policy(path)


def test_the_serve_limit_flags_default_to_the_limits_defaults() -> None:
    """``keyload serve`` without limit flags serves with :class:`ConnectionLimits`'
    defaults: each flag's default, and the "(default)" its help ends with, agree."""
    defaults = {name: default for name, _, default, _, _ in LIMIT_FLAGS}
    assert ConnectionLimits.from_flags(**defaults) == ConnectionLimits()
    assert len(defaults) == len(LIMIT_FLAGS) == 10
    for _, kind, default, _, help_ in LIMIT_FLAGS:
        assert isinstance(default, kind)
        assert help_.endswith(f"({default:g})" if kind is float else f"({default})")
