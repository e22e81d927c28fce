"""Unit tests of services.kvcache.slab: size classes, no overlap, page reuse, errors, stats."""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import random

import pytest

from services.kvcache import slab
from tests import seeds

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
SIZES = slab.class_sizes()


def max_waste_bytes(capacity: int) -> int:
    """The stated bound: waste < 4 KiB up to 16 KiB, else < 20 % of capacity (< 25 % of request)."""
    return max(slab.BLOCK_ALIGN_BYTES, capacity // 5)


def check_stats(alloc: slab.SlabAllocator) -> slab.SlabStats:
    """Stats invariants that hold after any sequence of operations."""
    stats = alloc.stats()
    assert stats.used_bytes + stats.free_bytes == stats.arena_bytes
    assert stats.free_page_bytes + stats.stranded_bytes + stats.tail_bytes == stats.free_bytes, (
        stats
    )
    assert sum(stats.pages_per_class.values()) * stats.page_bytes + stats.free_page_bytes == (
        stats.arena_bytes
    )
    assert 0 <= stats.requested_bytes <= stats.used_bytes <= stats.arena_bytes
    assert 0.0 <= stats.internal_fragmentation <= 1.0
    assert 0.0 <= stats.external_fragmentation <= 1.0
    return stats


class IntervalSet:
    """Disjoint half-open intervals, to check that live extents never overlap."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: dict[int, int] = {}

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        assert i == len(self.starts) or end <= self.starts[i], (start, end, self.starts[i])
        assert i == 0 or self.ends[self.starts[i - 1]] <= start, (start, end)
        self.starts.insert(i, start)
        self.ends[start] = end

    def remove(self, start: int) -> None:
        self.starts.remove(start)
        del self.ends[start]


def test_class_table() -> None:
    assert len(SIZES) == 52
    assert SIZES[0] == 4 * KIB
    assert SIZES[-1] == 64 * MIB
    assert all(size % slab.BLOCK_ALIGN_BYTES == 0 for size in SIZES)
    assert list(SIZES) == sorted(set(SIZES))
    assert SIZES[:8] == tuple(k * KIB for k in (4, 8, 12, 16, 20, 24, 28, 32))
    assert SIZES[8:12] == tuple(k * KIB for k in (40, 48, 56, 64))


def sizes_to_check() -> list[int]:
    """All sizes up to 256 KiB, each class boundary +-1, and a log-uniform sample to 64 MiB."""
    rng = random.Random(7)
    sizes = set(range(1, 256 * KIB + 1))
    for size in SIZES:
        sizes.update({size - 1, size, size + 1})
    sizes.update(int(math.exp(rng.uniform(0, math.log(64 * MIB)))) for _ in range(20_000))
    return sorted(s for s in sizes if 1 <= s <= 64 * MIB)


def test_every_size_maps_to_the_smallest_class_with_bounded_waste() -> None:
    alloc = slab.SlabAllocator(64 * MIB)
    worst = 0.0
    for nbytes in sizes_to_check():
        cls = alloc.size_class(nbytes)
        capacity = SIZES[cls]
        assert capacity >= nbytes, nbytes
        assert cls == 0 or SIZES[cls - 1] < nbytes, nbytes  # the smallest class that fits
        assert capacity - nbytes < max_waste_bytes(capacity), nbytes
        if nbytes > 16 * KIB:
            worst = max(worst, (capacity - nbytes) / capacity)
            assert capacity < 1.25 * nbytes, nbytes
    assert 0.19 < worst < 0.2


@pytest.mark.parametrize("nbytes", [0, -1, 64 * MIB + 1])
def test_invalid_sizes_raise(nbytes: int) -> None:
    alloc = slab.SlabAllocator(64 * MIB)
    with pytest.raises(ValueError, match="block size"):
        alloc.alloc(nbytes)
    with pytest.raises(ValueError, match="block size"):
        alloc.would_fit(nbytes)


@pytest.mark.parametrize(
    ("arena_bytes", "page_bytes"),
    [(64 * MIB, 0), (64 * MIB, 6000), (100 * MIB, 64 * MIB), (32 * MIB, 64 * MIB)],
)
def test_invalid_geometry_raises(arena_bytes: int, page_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be a positive multiple"):
        slab.SlabAllocator(arena_bytes, page_bytes=page_bytes)


def test_small_pages_cap_the_block_size() -> None:
    alloc = slab.SlabAllocator(1000 * KIB, page_bytes=100 * KIB)
    assert alloc.max_block_bytes == 96 * KIB
    assert alloc.alloc(96 * KIB) is not None
    with pytest.raises(ValueError, match="block size"):
        alloc.alloc(96 * KIB + 1)


@pytest.mark.parametrize("seed", [0, 1, 2, seeds.RUN_SEED])
def test_random_alloc_free_never_overlaps(seed: int) -> None:
    log.info("test_random_alloc_free_never_overlaps seed=%d", seed)
    rng = random.Random(seed)
    page_bytes = rng.choice([64 * KIB, 256 * KIB, 1 * MIB])
    alloc = slab.SlabAllocator(16 * page_bytes, page_bytes=page_bytes)
    live: list[slab.Extent] = []
    intervals = IntervalSet()
    for step in range(4000):
        if live and (rng.random() < 0.45 or not alloc.would_fit(1)):
            extent = live.pop(rng.randrange(len(live)))
            alloc.free(extent)
            intervals.remove(extent.offset)
        else:
            nbytes = int(math.exp(rng.uniform(0, math.log(alloc.max_block_bytes))))
            fits = alloc.would_fit(nbytes)
            got = alloc.alloc(nbytes)
            assert (got is not None) == fits, (seed, step)
            if got is None:
                continue
            assert got.requested == nbytes <= got.capacity, (seed, got)
            assert got.offset % slab.BLOCK_ALIGN_BYTES == 0, (seed, got)
            start, end = got.offset, got.offset + got.capacity
            assert 0 <= start < end <= alloc.arena_bytes, (seed, got)
            assert start // page_bytes == (end - 1) // page_bytes, (seed, got)  # within a page
            intervals.add(start, end)
            live.append(got)
        if step % 50 == 0:
            stats = check_stats(alloc)
            assert stats.live_extents == len(live), seed
            assert stats.requested_bytes == sum(e.requested for e in live), seed
            assert stats.used_bytes == sum(e.capacity for e in live), seed
    for extent in live:
        alloc.free(extent)
    stats = check_stats(alloc)
    assert stats.free_page_bytes == alloc.arena_bytes, seed
    assert stats.pages_per_class == {}, seed


def test_empty_page_returns_to_the_pool_and_serves_another_class() -> None:
    alloc = slab.SlabAllocator(2 * MIB, page_bytes=1 * MIB)
    small = [alloc.alloc(4 * KIB) for _ in range(256)]  # exactly fills page 0
    assert all(e is not None and e.offset < MIB for e in small)
    assert alloc.stats().pages_per_class == {4 * KIB: 1}
    for extent in small:
        assert extent is not None
        alloc.free(extent)
    stats = check_stats(alloc)
    assert stats.pages_per_class == {}
    assert stats.free_page_bytes == 2 * MIB
    big = alloc.alloc(MIB)
    assert big == slab.Extent(offset=0, capacity=MIB, size_class=SIZES.index(MIB), requested=MIB)
    assert check_stats(alloc).pages_per_class == {MIB: 1}


def test_full_arena_returns_none_then_free_makes_room() -> None:
    alloc = slab.SlabAllocator(4 * MIB, page_bytes=1 * MIB)
    blocks = [alloc.alloc(700 * KIB) for _ in range(4)]  # 768 KiB class: one per page
    assert all(b is not None for b in blocks)
    assert not alloc.would_fit(4 * KIB)
    assert alloc.alloc(4 * KIB) is None
    assert alloc.alloc(700 * KIB) is None
    stats = check_stats(alloc)
    assert stats.tail_bytes == 4 * 256 * KIB
    assert stats.external_fragmentation == 1.0
    assert blocks[2] is not None
    alloc.free(blocks[2])
    assert alloc.would_fit(4 * KIB)
    again = alloc.alloc(4 * KIB)
    assert again is not None
    assert again.offset == 2 * MIB


def test_stranded_slots_are_external_fragmentation() -> None:
    alloc = slab.SlabAllocator(2 * MIB, page_bytes=1 * MIB)
    small = alloc.alloc(4 * KIB)
    big = alloc.alloc(MIB)
    assert small is not None
    assert big is not None
    # One free page-worth of 4 KiB slots exists, but only the 4 KiB class can use it.
    assert alloc.alloc(MIB) is None
    assert alloc.would_fit(4 * KIB)
    stats = check_stats(alloc)
    assert stats.stranded_bytes == MIB - 4 * KIB
    assert stats.external_fragmentation == 1.0
    assert stats.internal_fragmentation == 0.0


def test_double_free_raises() -> None:
    alloc = slab.SlabAllocator(2 * MIB, page_bytes=1 * MIB)
    first = alloc.alloc(4 * KIB)
    keep = alloc.alloc(4 * KIB)  # keeps the page assigned after `first` is freed
    assert first is not None
    assert keep is not None
    alloc.free(first)
    with pytest.raises(ValueError, match="already free"):
        alloc.free(first)
    alloc.free(keep)
    with pytest.raises(ValueError, match="not a block"):  # its page went back to the pool
        alloc.free(keep)
    assert check_stats(alloc).used_bytes == 0


def test_foreign_extents_raise() -> None:
    alloc = slab.SlabAllocator(2 * MIB, page_bytes=1 * MIB)
    extent = alloc.alloc(5000)
    assert extent is not None
    forged = [
        dataclasses.replace(extent, offset=2 * MIB),  # past the arena
        dataclasses.replace(extent, offset=-8 * KIB),
        dataclasses.replace(extent, offset=extent.offset + 4 * KIB),  # not a slot start
        dataclasses.replace(extent, offset=extent.offset + 8 * KIB),  # a slot never handed out
        dataclasses.replace(extent, size_class=extent.size_class + 1),  # other class
        dataclasses.replace(extent, size_class=len(SIZES)),
        dataclasses.replace(extent, capacity=extent.capacity * 2),
        dataclasses.replace(extent, requested=4 * KIB),  # not what was asked for
        dataclasses.replace(extent, offset=MIB),  # a page in the pool
    ]
    for bad in forged:
        with pytest.raises(ValueError, match="cannot free"):
            alloc.free(bad)
    alloc.free(extent)  # the real one is still intact
    assert check_stats(alloc).free_page_bytes == 2 * MIB


def test_64mib_blocks_in_64mib_pages() -> None:
    alloc = slab.SlabAllocator(128 * MIB)
    first = alloc.alloc(64 * MIB)
    second = alloc.alloc(64 * MIB - 1)
    assert first == slab.Extent(0, 64 * MIB, len(SIZES) - 1, 64 * MIB)
    assert second is not None
    assert second.offset == 64 * MIB
    assert alloc.alloc(64 * MIB) is None
    stats = check_stats(alloc)
    assert stats.used_bytes == stats.arena_bytes
    assert stats.free_bytes == 0
    assert stats.external_fragmentation == 0.0
    assert stats.internal_fragmentation == pytest.approx(1 / (128 * MIB))
    alloc.free(first)
    third = alloc.alloc(32 * MIB)
    assert third is not None
    assert third.offset == 0
    assert check_stats(alloc).pages_per_class == {32 * MIB: 1, 64 * MIB: 1}


def test_fills_a_page_of_4kib_slots_and_reuses_freed_slots() -> None:
    alloc = slab.SlabAllocator(64 * MIB)
    extents = [alloc.alloc(1) for _ in range(16 * KIB)]
    offsets = {e.offset for e in extents if e is not None}
    assert len(offsets) == 16 * KIB
    assert alloc.alloc(1) is None
    assert check_stats(alloc).internal_fragmentation == pytest.approx(1 - 1 / 4096)
    freed = extents[1234]
    assert freed is not None
    alloc.free(freed)
    reused = alloc.alloc(4096)
    assert reused is not None
    assert reused.offset == freed.offset
