"""Fixed-size slots of a registered region: staging memory for calls whose payloads a service
must hold for a moment (a datanode's shard blocks on their way to or from disk, a gateway's
stripes while they are encoded). Preallocated once, so the hot path allocates nothing; when every
slot is taken, `acquire` waits: that wait is the service's backpressure.
"""

from __future__ import annotations

import asyncio
import collections

from kvtier import errors
from kvtier.transport import base


class SlotPool:
    """`region` cut into slots of `slot_bytes` (the remainder is unused)."""

    def __init__(self, region: base.Region, slot_bytes: int) -> None:
        if slot_bytes <= 0 or slot_bytes > region.size:
            raise errors.InvalidArgument(
                f"slot_bytes must be 1..{region.size} (the region's size), got {slot_bytes}"
            )
        self.region = region
        self.slot_bytes = slot_bytes
        self.slots = region.size // slot_bytes
        self._free: collections.deque[int] = collections.deque(range(self.slots))
        self._taken: dict[int, base.Span] = {}  # slot -> the span handed out for it
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        """Slots not taken."""
        return len(self._free)

    def try_acquire(self) -> base.Span | None:
        """A free slot, or None when every slot is taken."""
        if not self._free:
            return None
        index = self._free.popleft()
        span = base.Span(self.region, index * self.slot_bytes, self.slot_bytes)
        self._taken[index] = span
        return span

    async def acquire(self, timeout_s: float | None = None) -> base.Span:
        """A slot, waiting for one to be released; Overloaded after timeout_s."""
        while True:
            span = self.try_acquire()
            if span is not None:
                return span
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout_s):
                    await waiter
            except TimeoutError:
                raise errors.Overloaded(
                    f"no staging slot free within {timeout_s}s ({self.slots} in all)"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self, span: base.Span) -> None:
        """Give a slot back: the very span acquire returned. Idempotent; a stale span (its slot
        released and handed out again since) is ignored."""
        index = span.offset // self.slot_bytes
        if self._taken.get(index) is not span:
            return
        del self._taken[index]
        self._free.append(index)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
