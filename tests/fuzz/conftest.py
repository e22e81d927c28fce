"""The fuzz tests' hypothesis profile: "ci" unless KVTIER_FUZZ_EXAMPLES asks for a long run,
which also lifts the per-test timeout to fit its examples."""

from __future__ import annotations

import pathlib

import pytest

from tests.fuzz import _support

_support.register_profiles()
_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    timeout_s = _support.long_timeout_s()
    if timeout_s is None:
        return
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.timeout(timeout_s))
