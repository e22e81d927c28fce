"""Two pools: new objects spread over both by free space, reads follow pool records, listings
show every object once, overwrites and deletes leave nothing behind in the other pool."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.clients import gateway as gateway_client
from kvtier.proto.common.v1 import common_pb2
from services.datanode import shards
from services.gateway import conditional
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path, pools=2) as c:
        yield c


async def test_objects_spread_over_pools_and_read_through_records(cluster: Cluster) -> None:
    cmap = cluster.gateway.ctx.map_view.current
    assert [p.index for p in cmap.pools] == [0, 1]
    blobs = {f"k{i:02d}": objects_cluster.data(i, 200 * KIB + i) for i in range(24)}
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("spread")
        for key, data in blobs.items():
            await client.put_object("spread", key, data)
        pools: collections.Counter[int | None] = collections.Counter()
        for key in blobs:
            pool = await engine._pool_of(cluster.stored("spread"), key)
            pools[pool] += 1
        assert pools[0] > 0, pools  # equal free space: both pools get objects
        assert pools[1] > 0, pools
        for key, data in blobs.items():
            assert await client.get_object("spread", key) == data
            assert (await client.head_object("spread", key)).etag == hashlib.md5(data).hexdigest()
        page = await client.list_objects("spread")
        assert [(o.key, o.size, o.etag) for o in page.objects] == [
            (k, len(d), hashlib.md5(d).hexdigest()) for k, d in sorted(blobs.items())
        ]
        # Overwrites land wherever the draw says; the old copy never survives elsewhere.
        for key in list(blobs)[:8]:
            blobs[key] = objects_cluster.data(99, 150 * KIB)
            await client.put_object("spread", key, blobs[key])
        for key, data in blobs.items():
            assert await client.get_object("spread", key) == data
        for key in list(blobs)[8:16]:
            await client.delete_object("spread", key)
            with pytest.raises(errors.NotFound):
                await client.get_object("spread", key)
        left = sorted(list(blobs)[:8] + list(blobs)[16:])
        assert [o.key for o in (await client.list_objects("spread")).objects] == left
        # Each remaining object is in exactly one pool: its data on 6 drives, and, when that
        # is pool 1, a pool record on pool 0's 6 drives.
        versions: collections.Counter[tuple[str, bool]] = collections.Counter()
        for drive in cluster.drive_paths():
            for path in drive.glob("objects/spread@*/*/*/meta"):
                meta = shards.decode_meta(path.read_bytes(), str(path))
                versions[(meta.key, meta.is_pointer)] += 1
        for key in left:
            data_copies = versions[(key, False)]
            records = versions[(key, True)]
            assert (data_copies, records) in ((6, 0), (6, 6)), (key, data_copies, records)
        assert {k for k, _ in versions} == set(left)


async def test_multipart_upload_into_either_pool(cluster: Cluster) -> None:
    part = objects_cluster.data(5, 5 * MIB)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("mp2")
        for i in range(6):
            key = f"m{i}"
            upload = await client.create_multipart_upload("mp2", key)
            one = await client.upload_part("mp2", key, upload, 1, part)
            two = await client.upload_part("mp2", key, upload, 2, b"tail")
            done = await client.complete_multipart_upload("mp2", key, upload, [one, two])
            assert await client.get_object("mp2", key) == part + b"tail"
            # Complete sent again finds the object through pool 0's record, in either pool.
            again = await client.complete_multipart_upload("mp2", key, upload, [one, two])
            assert (again.etag, again.size) == (done.etag, done.size)
        assert [o.key for o in (await client.list_objects("mp2")).objects] == [
            f"m{i}" for i in range(6)
        ]


def _versions(cluster: Cluster, bucket: str) -> collections.Counter[tuple[str, bool]]:
    versions: collections.Counter[tuple[str, bool]] = collections.Counter()
    for drive in cluster.drive_paths():
        for path in drive.glob(f"objects/{bucket}@*/*/*/meta"):
            meta = shards.decode_meta(path.read_bytes(), str(path))
            versions[(meta.key, meta.is_pointer)] += 1
    return versions


def _all_online(cmap: common_pb2.ClusterMap) -> bool:
    slots = [s for p in cmap.pools for es in p.sets for s in es.slots]
    return bool(slots) and all(s.state == common_pb2.DRIVE_STATE_ONLINE for s in slots)


async def test_heal_rebuilds_pool_records_and_objects(cluster: Cluster) -> None:
    blobs = {f"h{i:02d}": objects_cluster.data(i, 300 * KIB + i) for i in range(16)}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("healme")
        for key, data in blobs.items():
            await client.put_object("healme", key, data)
        before = _versions(cluster, "healme")
        assert any(pointer for _, pointer in before)  # some objects live in pool 1
        # Datanode 0 loses both its drives (one in each pool).
        await cluster.stop_datanode(0)
        for drive in cluster.drive_paths(0):
            shutil.rmtree(drive / "objects", ignore_errors=True)
            for index_file in (drive / ".kvtier").glob("index*.sqlite*"):
                index_file.unlink()
        await cluster.start_datanode(0)
        await cluster.gateway.ctx.map_view.wait_for(_all_online, timeout_s=15)
        assert _versions(cluster, "healme") != before
        async with gateway_client.AdminServiceClient(cluster.gateway.address) as admin:
            progress = [p async for p in admin.heal("healme", "")]
        last = progress[-1]
        assert (last.scanned, last.healed, last.unrecoverable) == (len(blobs), len(blobs), 0)
        assert _versions(cluster, "healme") == before
        for key, data in blobs.items():
            assert await client.get_object("healme", key) == data


async def test_conditional_writes_are_held_in_pool_0(cluster: Cluster) -> None:
    """A conditional PUT goes to pool 0, whose set holds every key's entry (the object or its
    pool record), and its drives check the condition there (services/gateway/conditional.py):
    a key that lives in pool 1 is present for If-None-Match, its record's ETag is what
    If-Match compares, and the write replaces the pool-1 copy; racing writers: one wins."""
    atomic = conditional.CONDITIONAL.labels("atomic")
    before = atomic._value.get()
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("cond2")
        blobs = {f"c{i:02d}": objects_cluster.data(i, 20 * KIB + i) for i in range(12)}
        for key, data in blobs.items():
            await client.put_object("cond2", key, data)
        stored = cluster.stored("cond2")
        in_one = [k for k in blobs if await engine._pool_of(stored, k) == 1]
        assert in_one  # equal free space: some land in pool 1
        key = in_one[0]
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("cond2", key, b"new", if_none_match=True)
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("cond2", key, b"new", if_match='"0123"')
        etag = hashlib.md5(blobs[key]).hexdigest()
        await client.put_object("cond2", key, b"replaced", if_match=etag)
        assert await engine._pool_of(stored, key) == 0
        assert await client.get_object("cond2", key) == b"replaced"
        assert _versions(cluster, "cond2")[(key, True)] == 0  # no record, no pool-1 copy left
        # Racing If-None-Match writers of a new key: at most one stands.
        results = await asyncio.gather(
            *(client.put_object("cond2", "race", bytes([i]) * 100, if_none_match=True)
              for i in range(6)),
            return_exceptions=True,
        )  # fmt: skip
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) <= 1, results
        assert all(isinstance(r, errors.PreconditionFailed) for r in results if r not in won)
    assert atomic._value.get() > before
