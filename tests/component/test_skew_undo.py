"""Writes that fail store nothing, and pool drains age orphans by the datanodes' clocks
(issue 16, clock skew).

1. A gateway 40 min ahead writes a version: drives whose clocks are 20 min ahead take its stamp
   (within their 30 min bound), the others refuse it (ClockSkew). The write misses its quorum
   and fails typed; before, the drives that took it kept it, and its far-future stamp
   superseded every later write there. Per-drive clocks are played in this one process by
   shifting the stamp a drive checks (`shardmeta.stamp`) by its clock's offset, as a host
   whose clock is that far ahead would see it.
2. A pool drain deletes a copy no record names only once its datanode says it is old: a writer
   10 min behind (or a drain gateway 10 min ahead) made an in-flight PUT's copy look 10 min old
   by the gateway-clock arithmetic it used before.
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, hlc, membership, objects
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shardmeta, shards, supersede
from services.gateway import commits, placement, pooldrain
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
MINUTE_NS = 60 * 10**9
Cluster = objects_cluster.Cluster


def clock(offset_min: float) -> hlc.HybridClock:
    """A gateway's clock offset_min minutes off real time."""
    offset_ns = int(offset_min * MINUTE_NS)
    return hlc.HybridClock(lambda: time.time_ns() + offset_ns)


@pytest.fixture
async def one_pool(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


@pytest.fixture
async def two_pools(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path, pools=2) as c:
        yield c


@pytest.fixture
def drives_ahead(monkeypatch: pytest.MonkeyPatch) -> Callable[[set[int], int], None]:
    """drives_ahead(shard_indices, minutes): the drives holding those shards of a write
    check its stamp with a clock that many minutes ahead."""
    real = shardmeta.stamp

    def set_ahead(indices: set[int], minutes: int) -> None:
        offset_ns = minutes * MINUTE_NS

        def stamp(stored: datanode_pb2.ShardMeta, where: str) -> None:
            if stored.shard_index not in indices or not stored.mtime_unix_ns:
                return real(stored, where)
            stored.mtime_unix_ns -= offset_ns  # as a clock offset_ns ahead sees it
            try:
                real(stored, where)
            finally:
                stored.mtime_unix_ns += offset_ns

        monkeypatch.setattr(shardmeta, "stamp", stamp)

    return set_ahead


@pytest.fixture
def drives_full(monkeypatch: pytest.MonkeyPatch) -> Callable[[set[int]], None]:
    """drives_full(shard_indices): the drives holding those shards of a write are full (their
    commit fails with StorageFull, as ENOSPC makes it)."""
    real = shardmeta.stamp

    def set_full(indices: set[int]) -> None:
        def stamp(stored: datanode_pb2.ShardMeta, where: str) -> None:
            if stored.shard_index in indices:
                raise errors.StorageFull(f"drive full: {where} (test)")
            real(stored, where)

        monkeypatch.setattr(shardmeta, "stamp", stamp)

    return set_full


def key_metas(cluster: Cluster, bucket: str, key: str) -> list[datanode_pb2.ShardMeta]:
    """Every meta of bucket/key on every drive (current and kept versions)."""
    stored = cluster.stored(bucket)
    found = []
    for drive in cluster.drive_paths():
        for path in drive.glob(f"objects/{stored}/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            if meta.key == key:
                found.append(meta)
        for path in drive.glob(f"objects/{stored}/*/*/versions/*.meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            if meta.key == key:
                found.append(meta)
    return found


def undone() -> float:
    return float(commits.UNDONE._value.get())


async def test_a_write_refused_for_skew_is_undone_on_the_drives_that_took_it(
    one_pool: Cluster, drives_ahead: Callable[[set[int], int], None]
) -> None:
    """Small (WRITE_SMALL) and staged writes: the PUT fails with ClockSkew, no drive holds
    the refused version, GET and LIST show the version before it, and a later PUT through a
    gateway with a good clock is what reads see."""
    engine = one_pool.engine
    sizes = {"small": 4 * KIB, "staged": 4 * MIB + 3}  # (staged: shards over 512 KiB)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("undo")
        for n, (key, size) in enumerate(sizes.items()):
            await client.put_object("undo", key, objects_cluster.data(n, size))
        kept = {key: {m.data_id for m in key_metas(one_pool, "undo", key)} for key in sizes}
        assert all(len(ids) == 1 for ids in kept.values())
        drives_ahead({0, 1, 2}, 20)  # 3 of 12 drives take a stamp 40 min ahead; quorum is 8
        before = undone()
        engine.clock = clock(+40)
        for n, (key, size) in enumerate(sizes.items()):
            with pytest.raises(errors.ClockSkew, match="ahead of this datanode's clock"):
                await asyncio.wait_for(
                    client.put_object("undo", key, objects_cluster.data(n + 10, size)), 60
                )
            ids = {m.data_id for m in key_metas(one_pool, "undo", key)}
            assert ids == kept[key], key  # only the version before it, on 9 drives
        assert undone() == before + 3 * len(sizes)
        engine.clock = clock(0)
        listed = {o.key: o.size for o in (await client.list_objects("undo")).objects}
        assert listed == sizes
        for n, (key, size) in enumerate(sizes.items()):
            assert await client.get_object("undo", key) == objects_cluster.data(n, size), key
            newer = objects_cluster.data(n + 20, size)
            await client.put_object("undo", key, newer)
            assert await client.get_object("undo", key) == newer, key
            head = await client.head_object("undo", key)
            assert abs(head.mtime_unix_ms - time.time() * 1000) < 60_000, key


async def test_a_write_that_misses_its_quorum_otherwise_is_undone_too(
    one_pool: Cluster, drives_full: Callable[[set[int]], None]
) -> None:
    """8 of 12 drives full: the PUT fails (StorageFull, 503), and the 4 that took it no longer
    hold it; the version before it is what GET and LIST show."""
    sizes = {"small": 4 * KIB, "staged": 4 * MIB + 3}  # (staged: shards over 512 KiB)
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("full")
        for n, (key, size) in enumerate(sizes.items()):
            await client.put_object("full", key, objects_cluster.data(n, size))
        kept = {key: {m.data_id for m in key_metas(one_pool, "full", key)} for key in sizes}
        drives_full(set(range(4, 12)))
        before = undone()
        for n, (key, size) in enumerate(sizes.items()):
            with pytest.raises(errors.StorageFull):
                await client.put_object("full", key, objects_cluster.data(n + 10, size))
            assert {m.data_id for m in key_metas(one_pool, "full", key)} == kept[key], key
        assert undone() == before + 4 * len(sizes)
        listed = {o.key: o.size for o in (await client.list_objects("full")).objects}
        assert listed == sizes
        for n, (key, size) in enumerate(sizes.items()):
            assert await client.get_object("full", key) == objects_cluster.data(n, size), key


async def test_an_orphan_copy_is_aged_by_its_datanode_not_by_a_gateway_clock(
    two_pools: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy in the draining pool that no record names and its datanode stored just now (in
    flight) stays, whether its writer was 10 min behind or the drain gateway is 10 min ahead;
    one older than the drain's orphan age is deleted, though its writer was 10 min ahead."""
    engine = two_pools.engine
    drainer = getattr(two_pools.gateway.spec.loops[0], "__self__").drainer  # noqa: B009
    assert isinstance(drainer, pooldrain.Drainer)
    monkeypatch.setattr(engine, "choose_pool", lambda cmap: 1)
    stored = two_pools.stored
    async with await objects.AsyncObjectClient.connect(two_pools.gateway.address) as client:
        await client.create_bucket("orphans")
        blobs = {  # a small write (WRITE_SMALL) and a staged one
            "inflight": objects_cluster.data(1, 60 * KIB),
            "old": objects_cluster.data(2, 4400 * KIB),  # shards over 512 KiB
            "drain-ahead": objects_cluster.data(3, 4 * KIB),
        }
        for key, offset in (("inflight", -10), ("old", +10), ("drain-ahead", 0)):
            engine.clock = clock(offset)
            await client.put_object("orphans", key, blobs[key])
            # The PUT's record in pool 0 is not there (yet): its copy in pool 1 is an orphan.
            await engine.delete_in(stored("orphans"), key, 0)
        engine.clock = clock(0)
        bucket = stored("orphans")

        async def in_pool_1(key: str) -> bytes | None:
            where = placement.locate(engine.view.current, bucket, key, 1)
            try:
                found = await engine.resolve_in(where, bucket, key, queue_heal=False)
            except errors.NotFound:
                return None
            into = bytearray(found.meta.size)
            await engine.read_into(found, 0, memoryview(into))
            return bytes(into)

        with pytest.raises(errors.Unavailable, match="no record yet"):
            await drainer._move(1, bucket, "inflight")
        assert await in_pool_1("inflight") == blobs["inflight"]
        # The drain gateway 10 min ahead: its wall clock (what the drain read before) and its
        # hybrid clock; this process's datanodes keep theirs.
        ahead = types.SimpleNamespace(
            time_ns=lambda: time.time_ns() + 10 * MINUTE_NS, monotonic=time.monotonic
        )
        with monkeypatch.context() as skewed:
            skewed.setattr(pooldrain, "time", ahead)
            engine.clock = clock(+10)
            with pytest.raises(errors.Unavailable, match="no record yet"):
                await drainer._move(1, bucket, "drain-ahead")
            engine.clock = clock(0)
        assert await in_pool_1("drain-ahead") == blobs["drain-ahead"]
        monkeypatch.setattr(drainer, "_orphan_age_s", 0.5)
        await asyncio.sleep(0.6)
        assert await drainer._move(1, bucket, "old") is False
        assert await in_pool_1("old") is None


async def test_a_failed_overwrite_leaves_the_version_before_it_readable(
    one_pool: Cluster, drives_full: Callable[[set[int]], None]
) -> None:
    """6 of 12 drives take an overwrite: more than the 4 parity shards can lose, fewer than the
    write quorum of 8. The PUT fails and is undone; before, those 6 drives had replaced the
    acknowledged version and the undo removed the key there, leaving it on 6 drives, fewer than
    its 8 data shards: GET failed. Now they bring it back (services/datanode/supersede.py), and
    the copies every overwrite keeps are gone after the datanodes' reclaim."""
    sizes = {"small": 4 * KIB, "staged": 4 * MIB + 3}  # (staged: shards over 512 KiB)
    stored = one_pool.stored
    async with await objects.AsyncObjectClient.connect(one_pool.gateway.address) as client:
        await client.create_bucket("over")
        for n, (key, size) in enumerate(sizes.items()):
            await client.put_object("over", key, objects_cluster.data(n, size))
            await client.put_object("over", key, objects_cluster.data(n + 10, size))  # acked
        kept = {key: {m.data_id for m in key_metas(one_pool, "over", key)} for key in sizes}
        assert all(len(ids) == 1 for ids in kept.values())
        drives_full(set(range(6, 12)))
        for n, (key, size) in enumerate(sizes.items()):
            with pytest.raises(errors.StorageFull):
                await client.put_object("over", key, objects_cluster.data(n + 20, size))
            assert {m.data_id for m in key_metas(one_pool, "over", key)} == kept[key], key
        drives_full(set())
        listed = {o.key: o.size for o in (await client.list_objects("over")).objects}
        assert listed == sizes
        for n, (key, size) in enumerate(sizes.items()):
            assert await client.get_object("over", key) == objects_cluster.data(n + 10, size), key

        def superseded() -> list[Path]:
            prev = f"objects/{stored('over')}/*/*/{supersede.PREV_FILE}"
            drives = one_pool.drive_paths()
            return [
                *(p for d in drives for p in d.glob(prev)),
                *(p for d in drives for p in d.glob(".kvtier/superseded/*")),
            ]

        assert superseded()  # the first versions, kept by the acknowledged overwrites
        for node in one_pool.datanodes:
            for shard_store in getattr(node.spec.loops[0], "__self__").stores.values():  # noqa: B009
                shard_store.reclaim_superseded(0)
        assert superseded() == []
        data_dirs = {
            p.name
            for d in one_pool.drive_paths()
            for p in d.glob(f"objects/{stored('over')}/*/*/*")
            if p.is_dir()
        }
        assert data_dirs == kept["staged"]
        for n, (key, size) in enumerate(sizes.items()):
            assert await client.get_object("over", key) == objects_cluster.data(n + 10, size), key
