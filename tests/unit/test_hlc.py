"""kvtier.hlc: the hybrid logical clock that stamps object versions."""

from __future__ import annotations

import threading
import time

import pytest

from kvtier import hlc


class FakeWall:
    """A wall clock the test sets (ns)."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def test_stamps_follow_the_wall_clock_and_never_repeat() -> None:
    wall = FakeWall(1_000)
    clock = hlc.HybridClock(wall)
    assert clock.now() == 1_000
    assert clock.now() == 1_001  # the wall did not move: one more than the last
    wall.now_ns = 5_000
    assert clock.now() == 5_000


def test_a_wall_clock_that_steps_back_does_not_take_the_stamps_back() -> None:
    wall = FakeWall(10_000)
    clock = hlc.HybridClock(wall)
    first = clock.now()
    wall.now_ns = 2_000  # NTP stepped the clock back
    assert clock.now() == first + 1
    assert clock.ahead_ns() == first + 1 - 2_000


def test_a_stamp_after_observing_is_above_the_observed_one() -> None:
    """A gateway 10 min behind that saw a version stamped by one 10 min ahead stamps above it."""
    minute = 60 * 10**9
    behind = hlc.HybridClock(FakeWall(100 * minute - 10 * minute))
    ahead = hlc.HybridClock(FakeWall(100 * minute + 10 * minute))
    theirs = ahead.now()
    assert behind.now() < theirs
    behind.observe(theirs)
    assert behind.now() > theirs
    assert behind.last > theirs


def test_observing_an_older_stamp_changes_nothing() -> None:
    clock = hlc.HybridClock(FakeWall(50))
    stamp = clock.now()
    clock.observe(10)
    clock.observe(0)
    assert clock.last == stamp
    assert clock.now() == stamp + 1


def test_concurrent_callers_get_distinct_increasing_stamps() -> None:
    clock = hlc.HybridClock(FakeWall(7))  # a frozen wall: every stamp is a logical tick
    got: list[list[int]] = [[] for _ in range(8)]

    def take(out: list[int]) -> None:
        for _ in range(2_000):
            out.append(clock.now())
            clock.observe(out[-1] - 3)

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [s for out in got for s in out]
    assert len(set(everything)) == len(everything) == 16_000
    assert all(out == sorted(out) for out in got)
    assert max(everything) == 7 + 16_000 - 1


def test_the_default_wall_is_the_system_clock_read_at_each_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = hlc.HybridClock()
    assert abs(clock.now() - time.time_ns()) < 10**9
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 600 * 10**9)  # a skewed host
    assert clock.now() > real() + 599 * 10**9
