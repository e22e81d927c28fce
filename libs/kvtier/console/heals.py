"""The heals run through this console: what the Heal page shows.

The gateway's `Heal` RPC streams progress to the caller only, and no RPC lists the gateway's
own heal queue (its length is the `kvtier_gateway_heal_queue_length` metric), so the console
keeps the last heals it ran itself: who ran which, and their latest progress, updated while
the heal runs (a second tab sees it move). Bounded; lost at restart. Never imports aiohttp.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from kvtier.proto.gateway.v1 import admin_pb2

#: Heals remembered (newest first).
MAX_RUNS = 20


@dataclasses.dataclass(slots=True)
class HealRun:
    """One heal: its target and options, and its progress so far."""

    target: str
    dry_run: bool
    by: str
    started_unix_ms: int
    progress: admin_pb2.HealProgress = dataclasses.field(default_factory=admin_pb2.HealProgress)
    #: Set when the console stopped following it: "" (running), "done", "gave up", "failed: ...".
    ended: str = ""
    _started: float = dataclasses.field(default_factory=time.monotonic, repr=False)
    _ended_at: float | None = dataclasses.field(default=None, repr=False)

    def update(self, progress: admin_pb2.HealProgress) -> None:
        """The latest progress message (totals so far)."""
        self.progress.CopyFrom(progress)

    def end(self, how: str) -> None:
        """The console stopped following it (done, gave up waiting, or failed)."""
        self.ended = how
        self._ended_at = time.monotonic()

    def seconds(self) -> float:
        """How long it ran (so far)."""
        return (self._ended_at or time.monotonic()) - self._started


class HealLog:
    """The last MAX_RUNS heals, newest first."""

    def __init__(self, max_runs: int = MAX_RUNS) -> None:
        self._runs: collections.deque[HealRun] = collections.deque(maxlen=max_runs)

    def start(self, target: str, *, dry_run: bool, by: str) -> HealRun:
        """Record a heal about to start."""
        run = HealRun(
            target=target, dry_run=dry_run, by=by, started_unix_ms=int(time.time() * 1000)
        )
        self._runs.appendleft(run)
        return run

    def runs(self) -> list[HealRun]:
        """Newest first."""
        return list(self._runs)
