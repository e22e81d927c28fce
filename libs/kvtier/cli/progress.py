"""Progress of long CLI operations (heal; any walk over objects): how much is done in objects and
bytes, the rate and the time left, as short text for a terminal bar or a plain log line."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from typing import TextIO

from kvtier import kv_stats

#: Without a terminal, a progress line is printed at most this often.
PLAIN_EVERY_S = 5.0
#: Cells of a terminal bar.
BAR_CELLS = 24


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Totals:
    """What the whole operation covers, when known (e.g. from a listing)."""

    objects: int
    bytes: int


def duration_text(seconds: float) -> str:
    """'45s', '3m05s', '2h07m'."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def rate_text(bytes_per_s: float) -> str:
    """'0.5 B/s', '812.0 B/s', '2.0 MiB/s'."""
    if bytes_per_s < 1024:
        return f"{bytes_per_s:.1f} B/s"
    return f"{kv_stats.human_bytes(bytes_per_s)}/s"


class Meter:
    """Rate and time left, measured from construction (injectable clock for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()

    def fraction(self, objects: int, nbytes: int, totals: Totals | None) -> float | None:
        """How far along (0..1): by bytes when the total has any, else by objects."""
        if totals is None:
            return None
        if totals.bytes:
            return min(1.0, nbytes / totals.bytes)
        return min(1.0, objects / totals.objects) if totals.objects else 1.0

    def text(self, objects: int, nbytes: int, totals: Totals | None) -> str:
        """'1.2 MiB of 4.0 MiB, 2.0 MiB/s, ETA 1s' (what is known of it; '' before any data)."""
        elapsed = self._clock() - self._started
        parts = [f"{kv_stats.human_bytes(nbytes)}"]
        if totals is not None:
            parts[0] += f" of {kv_stats.human_bytes(totals.bytes)}"
        if elapsed <= 0 or (nbytes == 0 and objects == 0):
            return parts[0]
        if nbytes:
            rate = nbytes / elapsed
            parts.append(rate_text(rate))
            left = (totals.bytes - nbytes) / rate if totals is not None else None
        else:  # only empty objects so far: go by objects
            rate = objects / elapsed
            parts.append(f"{rate:.1f} objects/s")
            left = (totals.objects - objects) / rate if totals is not None else None
        if left is not None:
            parts.append(f"ETA {duration_text(max(0.0, left))}")
        return ", ".join(parts)


def bar_text(fraction: float) -> str:
    """'[############............]  50% ' (fraction 0..1)."""
    filled = round(fraction * BAR_CELLS)
    return f"[{'#' * filled}{'.' * (BAR_CELLS - filled)}] {fraction:4.0%} "


class Line:
    """One progress line on a stream: redrawn in place on a terminal, else printed now and
    then (every `every_s`), as `kvtier admin heal` and `kvtier admin pool drain` show theirs."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._every_s = every_s
        self._printed: float | None = None
        self._drawn = False

    def show(self, bar: Callable[[], str], plain: Callable[[], str]) -> None:
        """The terminal line bar() (cut to the width), or the log line plain() when due."""
        if self._tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._stream.write("\r" + bar()[:width].ljust(width))
            self._drawn = True
        elif self._printed is None or self._clock() - self._printed >= self._every_s:
            self._printed = self._clock()
            self._stream.write(plain() + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Remove the bar (before other output and at the end)."""
        if self._drawn:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._stream.write("\r" + " " * width + "\r")
            self._stream.flush()
            self._drawn = False
