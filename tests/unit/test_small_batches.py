"""Batched small writes (issue 14): `ShardStore.write_smalls` (several objects' shards of one drive
in one journal sync, each answering alone) and the gateway's `smallbatch.SmallWrites` (concurrent
WRITE_SMALL calls to a datanode coalesced while one is in flight)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.datanode import shardbase, shards
from services.gateway import smallbatch
from tests.unit import test_small_writes
from tests.unit.test_small_writes import read_back, small_meta

store = test_small_writes.store
drive_dir = test_small_writes.drive_dir


def test_a_batch_shares_one_sync_and_each_item_answers_alone(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    now = time.time_ns()
    old = os.urandom(100)
    store.write_small(small_meta("old", old, now), old)
    body = {k: os.urandom(1000 + i) for i, k in enumerate(["a", "b", "c", "twice"])}
    bad_shard = os.urandom(10)
    bad = small_meta("bad", bad_shard)
    bad.parts[0].shard_bytes = 11  # not the shard's length: refused
    newer = os.urandom(500)
    items = [
        (small_meta("a", body["a"]), body["a"]),
        (bad, bad_shard),
        (small_meta("old", b"x", now - 1), b"x"),  # below what the drive holds
        (small_meta("b", body["b"]), body["b"]),
        (small_meta("twice", body["twice"], now + 1), body["twice"]),
        (small_meta("twice", newer, now + 2), newer),  # newer than the batch's first: wins
        (small_meta("twice", b"y", now), b"y"),  # older than the batch's first: superseded
        (small_meta("c", body["c"]), body["c"]),
    ]
    syncs = store._journal.syncs
    out = store.write_smalls(items)
    assert store._journal.syncs == syncs + 1
    assert [type(o).__name__ for o in out] == [
        "ShardMeta", "InvalidArgument", "Superseded", "ShardMeta", "ShardMeta", "ShardMeta",
        "Superseded", "ShardMeta",
    ]  # fmt: skip
    assert isinstance(out[2], shards.Superseded)
    assert out[2].current_mtime_unix_ns == now
    assert isinstance(out[6], shards.Superseded)
    assert out[6].current_mtime_unix_ns == now + 2
    for key in ("a", "b", "c"):
        assert read_back(store, key) == body[key]
    assert read_back(store, "twice") == newer
    assert read_back(store, "old") == old
    with pytest.raises(errors.NotFound):
        store.read_meta(test_small_writes.BUCKET, "bad")
    listed = [e.key for e in store.list(test_small_writes.BUCKET)]
    assert listed == ["a", "b", "c", "old", "twice"]
    # Durable by the journal alone: a crash that lost the meta files replays them.
    for meta_file in drive_dir.glob("objects/*/*/*/meta"):
        meta_file.write_bytes(b"")
    reopened = test_small_writes.open_store(drive_dir)
    try:
        for key in ("a", "b", "c"):
            assert read_back(reopened, key) == body[key]
        assert read_back(reopened, "twice") == newer
        assert read_back(reopened, "old") == old
    finally:
        reopened.close()


def test_a_failed_sync_fails_every_item_it_carried(
    store: shards.ShardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    shard = os.urandom(64)
    out = store.write_smalls([(small_meta(k, shard), shard) for k in ("a", "b")])
    assert [type(o) for o in out] == [errors.Unavailable, errors.Unavailable]
    for key in ("a", "b"):
        with pytest.raises(errors.NotFound):
            store.read_meta(test_small_writes.BUCKET, key)


def test_index_entries_wait_for_a_batch_and_survive_a_checkpoint_and_a_crash(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    """A batch's index entries are written later (with other batches'), yet listed at once; a
    checkpoint writes them before it empties the journal, and a crash loses none."""
    body = {f"k{i}": os.urandom(100) for i in range(4)}
    store.write_smalls([(small_meta(k, body[k]), body[k]) for k in ("k0", "k1", "k2")])
    assert [row[1] for row in store._index._later] == [b"k0", b"k1", b"k2"]  # not written yet
    assert [e.key for e in store.list(test_small_writes.BUCKET)] == ["k0", "k1", "k2"]
    store.write_smalls([(small_meta("k3", body["k3"]), body["k3"])])
    store.checkpoint()  # the journal that covered k3's entry is emptied: the entry is written
    assert store._journal.bytes == 0
    assert store._index._later == []
    store.write_smalls([(small_meta("k4", b"x"), b"x")])  # journaled, entry deferred
    # A crash: the store abandoned as it is, a new one opened on the drive.
    reopened = test_small_writes.open_store(drive_dir)
    try:
        listed = [e.key for e in reopened.list(test_small_writes.BUCKET)]
        assert listed == ["k0", "k1", "k2", "k3", "k4"]
    finally:
        reopened.close()


def test_flush_index_writes_the_deferred_entries_to_the_index_file(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    """What the datanode's index loop runs once writes stop: the file then holds every entry."""
    store.write_smalls([(small_meta(k, b"v"), b"v") for k in ("a", "b")])
    assert store.index_deferred == 2

    def on_file() -> list[bytes]:
        db = sqlite3.connect(f"file:{drive_dir / shardbase.INDEX_FILE}?mode=ro", uri=True)
        try:
            return sorted(bytes(r[0]) for r in db.execute("SELECT key FROM objects"))
        finally:
            db.close()

    assert on_file() == []
    assert store.flush_index() is True
    assert store.index_deferred == 0
    assert on_file() == [b"a", b"b"]
    assert store.flush_index() is False  # nothing waited


def test_a_small_writes_staged_meta_left_by_a_crash_is_reused(
    store: shards.ShardStore, drive_dir: Path
) -> None:
    """The meta is staged in the key's directory (`meta.new`); a crash's torn leftover there is
    truncated and renamed by the key's next small write, and no data_id may take the name."""
    first = os.urandom(200)
    store.write_smalls([(small_meta("k", first), first)])
    object_dir = next(drive_dir.glob(f"objects/{test_small_writes.BUCKET}/*/*"))
    (object_dir / "meta.new").write_bytes(b"torn" * 1000)
    second = os.urandom(100)
    store.write_smalls([(small_meta("k", second), second)])
    assert read_back(store, "k") == second
    assert sorted(p.name for p in object_dir.iterdir()) == ["meta", "meta.prev"]
    named = small_meta("j", second)
    named.data_id = "meta.new"
    assert isinstance(store.write_smalls([(named, second)])[0], errors.InvalidArgument)


def test_a_new_keys_directory_left_by_a_failed_commit_is_no_object(
    store: shards.ShardStore, drive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new key's directory is made before its journal commit (no meta to look for then); a
    commit that fails leaves it empty: not read, not listed, and the key's next write works."""
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    shard = os.urandom(64)
    (out,) = store.write_smalls([(small_meta("k", shard), shard)])
    assert isinstance(out, errors.Unavailable)
    (object_dir,) = drive_dir.glob(f"objects/{test_small_writes.BUCKET}/*/*")
    assert list(object_dir.iterdir()) == []  # made first, left empty
    with pytest.raises(errors.NotFound):
        store.read_meta(test_small_writes.BUCKET, "k")
    assert store.list(test_small_writes.BUCKET) == []
    monkeypatch.setattr(os, "fdatasync", real)
    reopened = test_small_writes.open_store(drive_dir)  # (the failed journal stays broken)
    try:
        (out,) = reopened.write_smalls([(small_meta("k", shard), shard)])
        assert isinstance(out, datanode_pb2.ShardMeta)
        assert read_back(reopened, "k") == shard
        assert [e.key for e in reopened.list(test_small_writes.BUCKET)] == ["k"]
    finally:
        reopened.close()


class Node:
    """A datanode's WRITE_SMALL calls as SmallWrites sees them: recorded, answered when the
    test lets them (a result per shard naming its drive), or failed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def send(self, entries: Sequence[smallbatch.Entry]) -> smallbatch.Results:
        self.calls.append([drive for drive, _, _ in entries])
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [shards_pb2.ShardResult(error=drive) for drive, _, _ in entries]


def entries(name: str, count: int = 2) -> list[smallbatch.Entry]:
    return [(f"{name}.{i}", datanode_pb2.ShardMeta(), b"s" * 10) for i in range(count)]


async def test_an_idle_node_gets_a_write_at_once_and_busy_ones_batch() -> None:
    node = Node()
    writes = smallbatch.SmallWrites(node.send, max_bytes=1 << 20)
    got = await writes.write(entries("solo"))
    assert [r.error for r in got] == ["solo.0", "solo.1"]
    assert node.calls == [["solo.0", "solo.1"]]
    node.calls.clear()
    node.gate.clear()  # the first call stays in flight while the others arrive
    tasks = [asyncio.ensure_future(writes.write(entries(f"w{i}"))) for i in range(10)]
    await asyncio.sleep(0.01)
    assert len(node.calls) == 1
    node.gate.set()
    results = await asyncio.gather(*tasks)
    for i, got in enumerate(results):
        assert [r.error for r in got] == [f"w{i}.0", f"w{i}.1"]
    assert node.calls[1] == [f"w{i}.{j}" for i in range(1, 10) for j in range(2)]
    assert len(node.calls) == 2
    assert (writes.calls, writes.writes) == (3, 11)


async def test_a_batch_keeps_to_the_shard_and_byte_limits() -> None:
    node = Node()
    writes = smallbatch.SmallWrites(node.send, max_bytes=100)  # 10 bytes a shard
    node.gate.clear()
    tasks = [asyncio.ensure_future(writes.write(entries(f"w{i}", 4))) for i in range(8)]
    await asyncio.sleep(0.01)
    node.gate.set()
    await asyncio.gather(*tasks)
    assert [len(c) for c in node.calls] == [4, 8, 8, 8, 4]
    node.calls.clear()
    writes = smallbatch.SmallWrites(node.send, max_bytes=1 << 20)
    node.gate.clear()
    tasks = [asyncio.ensure_future(writes.write(entries(f"w{i}", 30))) for i in range(5)]
    await asyncio.sleep(0.01)
    node.gate.set()
    await asyncio.gather(*tasks)
    assert [len(c) for c in node.calls] == [30, 60, 60]
    assert max(len(c) for c in node.calls) <= smallbatch.MAX_SHARDS


async def test_a_failed_call_fails_the_writes_it_carried_only() -> None:
    node = Node()
    writes = smallbatch.SmallWrites(node.send, max_bytes=1 << 20)
    node.gate.clear()
    first = asyncio.ensure_future(writes.write(entries("first")))
    await asyncio.sleep(0)
    batch = [asyncio.ensure_future(writes.write(entries(f"b{i}"))) for i in range(3)]
    await asyncio.sleep(0.01)
    node.fail = errors.Unavailable("datanode gone")
    node.gate.set()
    for task in (first, *batch):
        with pytest.raises(errors.Unavailable, match="datanode gone"):
            await task
    node.fail = None
    assert [r.error for r in await writes.write(entries("after"))] == ["after.0", "after.1"]


async def test_a_cancelled_writer_is_left_out_and_a_stuck_call_holds_no_batch_long() -> None:
    node = Node()
    writes = smallbatch.SmallWrites(node.send, max_bytes=1 << 20, stall_s=0.05)
    node.gate.clear()
    stuck = asyncio.ensure_future(writes.write(entries("stuck")))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(writes.write(entries("gone")))
    kept = asyncio.ensure_future(writes.write(entries("kept")))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0.2)  # past stall_s: the batch left while "stuck" is still in flight
    assert node.calls == [["stuck.0", "stuck.1"], ["kept.0", "kept.1"]]
    node.gate.set()
    assert [r.error for r in await kept] == ["kept.0", "kept.1"]
    await stuck
    await writes.close()
