"""A full drive (a real ENOSPC, on a tiny tmpfs) is a typed StorageFull refusal of the write on
that drive, through both write paths of the shard API (small writes in one call, staged
writes), never an Internal error with a traceback (found by the datanode clock-skew runs: a
drive that filled up answered the gateway "internal error")."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import shards_pb2 as pb
from kvtier.transport import base, slots
from services.datanode import shardserver
from tests.unit import test_shards, test_small_writes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def full_soon(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a few small writes fill it."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "kvtier-full", str(mount)], check=True)
    try:
        yield mount / "drive"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _node(store: object) -> shardserver.ShardNode:
    staging = slots.SlotPool(base.Region(1, 1 << 20), 1 << 20)
    executor = concurrent.futures.ThreadPoolExecutor(1)
    return shardserver.ShardNode({"d1": store}, staging, executor)  # type: ignore[dict-item]


def test_small_writes_on_a_full_drive_are_refused_typed(full_soon: Path) -> None:
    store = test_shards.open_store(full_soon)
    node = _node(store)
    before = shardserver.FULL._value.get()
    results: list[pb.ShardResult] = []
    for i in range(64):  # 64 x 96 KiB: far more than 2 MiB
        shard = os.urandom(96 << 10)
        meta = test_small_writes.small_meta(f"k{i}", shard)
        entry = pb.SmallShard(drive_id="d1", meta=meta)
        (result,) = asyncio.run(node._write_smalls([entry], [shard]))
        results.append(result)
        if result.error_kind:
            break
    assert results[0].error_kind == ""  # it took writes until it was full
    assert results[-1].error_kind == "StorageFull", results[-1]
    assert "drive full" in results[-1].error
    assert shardserver.FULL._value.get() > before
    # What it stored before it filled up reads back whole.
    assert test_small_writes.read_back(store, "k0")


def test_a_staged_write_on_a_full_drive_is_refused_typed(full_soon: Path) -> None:
    store = test_shards.open_store(full_soon)
    node = _node(store)

    async def fill() -> None:
        staged = await node._run(store.begin_write, "big")
        chunk = memoryview(os.urandom(256 << 10))
        for i in range(64):  # 16 MiB into a 2 MiB drive
            await node._run(staged.write_part, 1, i * len(chunk), chunk)

    with pytest.raises(errors.StorageFull, match="drive full"):
        asyncio.run(fill())
