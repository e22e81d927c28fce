"""Eviction policies for the kvcache block index: LRU and S3-FIFO over opaque keys with byte sizes.

A policy only orders keys; it never owns block memory. The store asks `victims()` for enough bytes
before an insert, frees the returned blocks, then calls `insert()`. Keys the store may not free
(pinned, or leased by a reader) are reported through `can_evict` and are skipped in place: they keep
their queue position and are reconsidered on the next call, so a pin does not reset recency.

This module never imports grpc: it is pure logic, unit-tested in tests/unit/test_eviction.py and
measured against a prefix-workload trace by bench/eviction_trace.py.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)

# S3-FIFO constants (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).
SMALL_QUEUE_FRACTION = 0.1
MAX_FREQUENCY = 3


class EvictionPolicy(Protocol[K]):
    """What the block store needs from an eviction policy.

    Every method is O(1) amortized, except that `victims()` also walks past the keys it must skip.
    """

    @property
    def capacity_bytes(self) -> int:
        """The byte budget the store keeps `used_bytes` under."""
        ...

    @property
    def used_bytes(self) -> int:
        """The sum of the sizes of the resident keys."""
        ...

    def __len__(self) -> int:
        """The number of resident keys."""
        ...

    def __contains__(self, key: object) -> bool:
        """Whether key is resident."""
        ...

    def insert(self, key: K, size: int) -> None:
        """Track a new resident key of size bytes. Raises ValueError if present or size < 0."""
        ...

    def hit(self, key: K) -> None:
        """Record an access to a resident key. Raises KeyError if key is not resident."""
        ...

    def remove(self, key: K) -> None:
        """Forget a resident key (delete, TTL expiry). Raises KeyError if key is not resident."""
        ...

    def victims(self, need_bytes: int, can_evict: Callable[[K], bool]) -> list[K]:
        """Choose and forget resident keys whose sizes sum to at least need_bytes.

        Keys for which can_evict is False are skipped and keep their position. Returns fewer
        bytes than asked (possibly nothing) when not enough keys are evictable; the caller then
        refuses the insert. The returned keys are no longer resident: the caller frees them.
        """
        ...


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")


class LRUPolicy(Generic[K]):
    """Least-recently-used eviction: the baseline the issue asks to beat on scan-heavy traces."""

    def __init__(self, capacity_bytes: int) -> None:
        """A policy for a store of capacity_bytes. Raises ValueError if capacity_bytes <= 0."""
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self._capacity_bytes = capacity_bytes
        self._sizes: collections.OrderedDict[K, int] = collections.OrderedDict()
        self._used_bytes = 0

    @property
    def capacity_bytes(self) -> int:
        """The byte budget the store keeps `used_bytes` under."""
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        """The sum of the sizes of the resident keys."""
        return self._used_bytes

    def __len__(self) -> int:
        """The number of resident keys."""
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        """Whether key is resident."""
        return key in self._sizes

    def insert(self, key: K, size: int) -> None:
        """Track key as the most recently used. Raises ValueError if present or size < 0."""
        _check_size(size)
        if key in self._sizes:
            raise ValueError(f"key already resident: {key!r}")
        self._sizes[key] = size
        self._used_bytes += size

    def hit(self, key: K) -> None:
        """Make key the most recently used. Raises KeyError if key is not resident."""
        self._sizes.move_to_end(key)

    def remove(self, key: K) -> None:
        """Forget key. Raises KeyError if key is not resident."""
        self._used_bytes -= self._sizes.pop(key)

    def victims(self, need_bytes: int, can_evict: Callable[[K], bool]) -> list[K]:
        """The least recently used evictable keys covering need_bytes (see EvictionPolicy)."""
        chosen: list[K] = []
        freed = 0
        for key, size in self._sizes.items():
            if freed >= need_bytes:
                break
            if can_evict(key):
                chosen.append(key)
                freed += size
        for key in chosen:
            self.remove(key)
        return chosen


class S3FIFOPolicy(Generic[K]):
    """S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO.

    New keys enter the small queue (~10% of capacity bytes). Evicting from small promotes keys
    accessed while there to main and sends the rest to the ghost queue (keys only), so one-off
    scans leave quickly without displacing the reused working set. A key inserted while in the
    ghost queue goes straight to main. Main is a CLOCK-like FIFO: a key at its head with
    frequency > 0 is reinserted at the tail with frequency - 1; frequencies are capped at 3.
    The ghost queue holds at most as many keys as main (or small, while main is still filling).
    """

    def __init__(self, capacity_bytes: int, small_fraction: float = SMALL_QUEUE_FRACTION) -> None:
        """A policy for a store of capacity_bytes, small_fraction of it for the small queue.

        Raises ValueError if capacity_bytes <= 0 or small_fraction is not in (0, 1).
        """
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self._capacity_bytes = capacity_bytes
        self._small_target_bytes = int(capacity_bytes * small_fraction)
        # OrderedDicts as FIFOs: head (first) is the oldest, values are unused.
        self._small: collections.OrderedDict[K, None] = collections.OrderedDict()
        self._main: collections.OrderedDict[K, None] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[K, None] = collections.OrderedDict()
        self._sizes: dict[K, int] = {}
        self._freq: dict[K, int] = {}
        self._small_bytes = 0
        self._main_bytes = 0

    @property
    def capacity_bytes(self) -> int:
        """The byte budget the store keeps `used_bytes` under."""
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        """The sum of the sizes of the resident keys."""
        return self._small_bytes + self._main_bytes

    def __len__(self) -> int:
        """The number of resident keys."""
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        """Whether key is resident."""
        return key in self._sizes

    def in_main(self, key: K) -> bool:
        """Whether key is resident in the main queue (for tests and metrics)."""
        return key in self._main

    def in_ghost(self, key: K) -> bool:
        """Whether key is remembered in the ghost queue (for tests and metrics)."""
        return key in self._ghost

    def insert(self, key: K, size: int) -> None:
        """Track key in small, or in main if it was recently evicted from small (a ghost hit).

        Raises ValueError if key is resident or size < 0.
        """
        _check_size(size)
        if key in self._sizes:
            raise ValueError(f"key already resident: {key!r}")
        self._sizes[key] = size
        self._freq[key] = 0
        if self._ghost.pop(key, _MISSING) is not _MISSING:
            self._main[key] = None
            self._main_bytes += size
        else:
            self._small[key] = None
            self._small_bytes += size

    def hit(self, key: K) -> None:
        """Count an access (saturating at 3). Raises KeyError if key is not resident."""
        self._freq[key] = min(self._freq[key] + 1, MAX_FREQUENCY)

    def remove(self, key: K) -> None:
        """Forget key without remembering it as a ghost. Raises KeyError if not resident."""
        size = self._sizes.pop(key)
        del self._freq[key]
        if self._small.pop(key, _MISSING) is not _MISSING:
            self._small_bytes -= size
        else:
            del self._main[key]
            self._main_bytes -= size

    def victims(self, need_bytes: int, can_evict: Callable[[K], bool]) -> list[K]:
        """Keys evicted by S3-FIFO covering need_bytes (see EvictionPolicy).

        Each queue's skipped keys are set aside during the call and put back at its head, in
        their original order, before returning.
        """
        chosen: list[K] = []
        skipped_small: list[K] = []
        skipped_main: list[K] = []
        freed = 0
        while freed < need_bytes:
            # Paper's rule: evict from small while it holds more than its share of the bytes.
            prefer_small = self._small_bytes > self._small_target_bytes or not self._main
            if self._small and (prefer_small or not self._main):
                key = self._step_small(can_evict, skipped_small)
            elif self._main:
                key = self._step_main(can_evict, skipped_main)
            else:
                break
            if key is not None:
                chosen.append(key)
                freed += self._forget(key)
        _restore_head(self._small, skipped_small)
        _restore_head(self._main, skipped_main)
        return chosen

    def _step_small(self, can_evict: Callable[[K], bool], skipped: list[K]) -> K | None:
        """Look at small's head: promote it, set it aside, or return it as the victim."""
        key, _ = self._small.popitem(last=False)
        size = self._sizes[key]
        if self._freq[key] > 0:
            self._small_bytes -= size
            self._freq[key] = 0
            self._main[key] = None
            self._main_bytes += size
            return None
        if not can_evict(key):
            skipped.append(key)
            return None
        self._small_bytes -= size
        self._remember_ghost(key)
        return key

    def _step_main(self, can_evict: Callable[[K], bool], skipped: list[K]) -> K | None:
        """Look at main's head: reinsert it with one less frequency, set it aside, or evict it."""
        key, _ = self._main.popitem(last=False)
        freq = self._freq[key]
        if freq > 0:
            self._freq[key] = freq - 1
            self._main[key] = None
            return None
        if not can_evict(key):
            skipped.append(key)
            return None
        self._main_bytes -= self._sizes[key]
        return key

    def _forget(self, key: K) -> int:
        """Drop an evicted key's bookkeeping (queues already updated); return its size."""
        del self._freq[key]
        return self._sizes.pop(key)

    def _remember_ghost(self, key: K) -> None:
        self._ghost[key] = None
        limit = max(len(self._main), len(self._small), 1)
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)


_MISSING = object()


def _restore_head(queue: collections.OrderedDict[K, None], keys: list[K]) -> None:
    """Put keys popped from queue's head back there, in their original order."""
    for key in reversed(keys):
        queue[key] = None
        queue.move_to_end(key, last=False)
