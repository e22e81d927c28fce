"""A hybrid logical clock: the stamps that order object versions (ARCHITECTURE.md, "Version
stamps").

A stamp is an int of nanoseconds since the Unix epoch, as `time.time_ns()`: `now()` is the
larger of the wall clock and one more than the last stamp this clock gave or observed, and
`observe(stamp)` takes in a stamp seen elsewhere (a datanode's current version of a key). So
stamps of one clock strictly increase, and a stamp made after observing another is above it,
whatever the wall clocks of the hosts say. A stamp stays close to real time (it runs ahead by
at most the largest clock skew among the hosts whose stamps were observed), so it is also the
version's Last-Modified.

Pure and thread-safe; never imports grpc.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

WallClock = Callable[[], int]


def system_wall() -> int:
    """The system's wall clock in ns (looked up at each call: a test may replace time.time_ns)."""
    return time.time_ns()


class HybridClock:
    """Stamps that never go backwards and exceed every stamp observed (module docstring)."""

    def __init__(self, wall: WallClock = system_wall) -> None:
        self._wall = wall
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        """A new stamp: above every stamp given or observed before, and at least the wall clock."""
        wall = self._wall()
        with self._lock:
            self._last = max(wall, self._last + 1)
            return self._last

    def observe(self, stamp: int) -> None:
        """Take in a stamp seen elsewhere: every later `now()` is above it."""
        with self._lock:
            if stamp > self._last:
                self._last = stamp

    @property
    def last(self) -> int:
        """The last stamp given or observed (0 before the first)."""
        with self._lock:
            return self._last

    def ahead_ns(self) -> int:
        """How far the last stamp runs ahead of the wall clock (0 when it does not): the skew
        this clock has taken in."""
        return max(0, self.last - self._wall())
