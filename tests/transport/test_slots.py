"""Staging slots: preallocated, exclusive, waited for when all are taken."""

from __future__ import annotations

import asyncio

import pytest

from kvtier import errors
from kvtier.transport import base, slots


async def test_slots_are_exclusive_and_waited_for() -> None:
    region = base.Region(1, 10 * 4096)
    pool = slots.SlotPool(region, 3 * 4096)
    assert pool.slots == 3
    spans = [pool.try_acquire() for _ in range(3)]
    assert all(s is not None for s in spans)
    assert sorted(s.offset for s in spans if s) == [0, 3 * 4096, 6 * 4096]
    assert pool.try_acquire() is None
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    assert spans[1] is not None
    pool.release(spans[1])
    got = await asyncio.wait_for(waiting, 1)
    assert got.offset == spans[1].offset
    pool.release(spans[1])  # stale: its slot was handed out again, so this is ignored
    assert pool.free == 0
    with pytest.raises(errors.Overloaded):
        await pool.acquire(timeout_s=0.05)
    pool.release(got)
    pool.release(got)  # idempotent
    assert pool.free == 1
    region.close()


def test_bad_slot_sizes_are_refused() -> None:
    region = base.Region(1, 4096)
    with pytest.raises(errors.InvalidArgument):
        slots.SlotPool(region, 0)
    with pytest.raises(errors.InvalidArgument):
        slots.SlotPool(region, 8192)
    region.close()
