"""The console's login throttle (`kvtier.console.throttle`) on a fake clock: lockout after the
threshold, doubling lockouts, reset on success, per-key limits across addresses, IPv6 by /64,
bounded memory."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.console import throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(**limits: Any) -> tuple[throttle.LoginThrottle, Clock]:
    clock = Clock()
    return throttle.LoginThrottle(throttle.ThrottleLimits(**limits), clock), clock


def test_locked_out_after_max_failures_then_doubling() -> None:
    limiter, clock = _throttle(max_failures=5, lockout_s=15, max_lockout_s=40)
    for _ in range(4):
        limiter.failed("10.0.0.1", "AKIA1")
        assert limiter.retry_after_s("10.0.0.1", "AKIA1") == 0
    limiter.failed("10.0.0.1", "AKIA1")
    assert limiter.retry_after_s("10.0.0.1", "AKIA1") == 15
    assert limiter.retry_after_s("10.0.0.1", "AKIA-other") == 15  # the address, any key
    assert limiter.retry_after_s("10.0.0.2", "AKIA1") == 0  # the key is below its own limit
    clock.now += 15
    assert limiter.retry_after_s("10.0.0.1", "AKIA1") == 0
    for _ in range(5):
        limiter.failed("10.0.0.1", "AKIA1")
    assert limiter.retry_after_s("10.0.0.1", "AKIA1") == 30  # doubled
    clock.now += 30
    for _ in range(5):
        limiter.failed("10.0.0.1", "AKIA1")
    assert limiter.retry_after_s("10.0.0.1", "AKIA1") == 40  # capped


def test_failures_outside_the_window_do_not_add_up() -> None:
    limiter, clock = _throttle(max_failures=3, window_s=60)
    for _ in range(2):
        limiter.failed("10.0.0.1", "k")
    clock.now += 61
    for _ in range(2):
        limiter.failed("10.0.0.1", "k")
    assert limiter.retry_after_s("10.0.0.1", "k") == 0


def test_success_resets_address_and_key() -> None:
    limiter, _ = _throttle(max_failures=3)
    for _ in range(2):
        limiter.failed("10.0.0.1", "k")
    limiter.succeeded("10.0.0.1", "k")
    for _ in range(2):
        limiter.failed("10.0.0.1", "k")
    assert limiter.retry_after_s("10.0.0.1", "k") == 0
    assert limiter.remembered() == (1, 1)


def test_key_locked_across_addresses() -> None:
    limiter, _ = _throttle(max_failures=5, key_max_failures=8, lockout_s=15)
    for i in range(8):
        limiter.failed(f"10.0.1.{i}", "AKIA-target")
    assert limiter.retry_after_s("10.9.9.9", "AKIA-target") == 15
    assert limiter.retry_after_s("10.9.9.9", "AKIA-someone-else") == 0


def test_ipv6_counted_by_64_and_mapped_v4_as_v4() -> None:
    assert throttle.client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert throttle.client_key("::ffff:10.0.0.1") == "10.0.0.1"
    limiter, _ = _throttle(max_failures=2)
    limiter.failed("2001:db8:1:2::1", "a")
    limiter.failed("2001:db8:1:2::ffff", "b")
    assert limiter.retry_after_s("2001:db8:1:2::77", "c") > 0
    assert limiter.retry_after_s("2001:db8:1:3::1", "c") == 0


def test_memory_bounded() -> None:
    limiter, _ = _throttle(max_entries=100)
    for i in range(5000):
        limiter.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", f"key-{i}")
    assert limiter.remembered() == (100, 100)
    limiter.failed("10.0.0.1", "x" * 10_000)  # long keys are stored truncated
    assert limiter.remembered() == (100, 100)


def test_bad_limits_refused() -> None:
    with pytest.raises(ValueError, match="lockout_s"):
        throttle.ThrottleLimits(lockout_s=0)
    with pytest.raises(ValueError, match="max_failures"):
        throttle.ThrottleLimits(max_failures=0)
