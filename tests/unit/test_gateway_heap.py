"""The gateway's malloc thresholds (services/gateway/heap.py)."""

from __future__ import annotations

import ctypes

import pytest

from services.gateway import heap


def test_the_thresholds_are_set_on_glibc() -> None:
    assert heap.tune()


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # no mallopt there
    assert not heap.tune()
