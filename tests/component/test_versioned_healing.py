"""Healing keeps a versioned bucket's current version whole (the in-process object tier: metadata,
6 datanodes x 2 drives = EC 8+4, gateway): a version or a delete marker written while a datanode
was down reaches its drives when it returns, and the version that was current there stays as a
non-current version. Every read compares bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects, objversions, principal
from kvtier.clients import datanode as datanode_client
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.datanode import shards
from tests.component import objects_cluster

MIB = objects_cluster.MIB
Cluster = objects_cluster.Cluster
BUCKET, KEY = "vheal", "k"


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


def _meta(cluster: Cluster, drive: Path) -> datanode_pb2.ShardMeta:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = drive / "objects" / cluster.stored(BUCKET) / digest[:2] / digest / "meta"
    return shards.decode_meta(path.read_bytes(), str(path))


async def _holds(cluster: Cluster, drive: Path, version: str, *, current: bool) -> bool:
    """Whether the datanode serves that version of KEY from the drive (as the current one)."""
    node = next(i for i in range(len(cluster.datanodes)) if drive in cluster.drive_paths(i))
    async with datanode_client.ShardClient(cluster.datanodes[node].address) as client:
        try:
            meta = await client.read_meta(
                cluster.drive_id(drive), cluster.stored(BUCKET), KEY, "" if current else version
            )
        except errors.NotFound:
            return False
    return objversions.version_id(meta) == version


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


async def _read(cluster: Cluster, version: str, size: int) -> bytes:
    found = await cluster.engine.resolve(cluster.stored(BUCKET), KEY, version_id=version)
    buf = bytearray(size)
    await cluster.engine.read_into(found, 0, memoryview(buf))
    return bytes(buf)


async def _down(cluster: Cluster, node: int) -> None:
    await cluster.stop_datanode(node)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: sum(len(n.drives) for n in m.nodes) == 10, timeout_s=15
    )


async def test_the_current_version_and_delete_markers_are_healed(cluster: Cluster) -> None:
    v1_data, v2_data = objects_cluster.data(1, 3 * MIB + 5), objects_cluster.data(2, 777)
    bound = principal.bind(principal.INSECURE)
    try:
        async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
            await client.create_bucket(BUCKET)
            enabled = metadata_pb2.BucketVersioning(status=metadata_pb2.VERSIONING_STATUS_ENABLED)
            await cluster.front.set_bucket_config(
                BUCKET, metadata_pb2.SetBucketConfigRequest(versioning=enabled)
            )
            await client.put_object(BUCKET, KEY, v1_data)
            v1 = objversions.version_id(_meta(cluster, cluster.drive_paths(0)[0]))
            down = cluster.drive_paths(5)
            await _down(cluster, 5)
            await client.put_object(BUCKET, KEY, v2_data)  # on 10 drives: queued for healing
            v2 = objversions.version_id(_meta(cluster, cluster.drive_paths(0)[0]))
            assert v1 != v2
            await cluster.start_datanode(5)

            async def healed_v2() -> bool:
                return all([await _holds(cluster, d, v2, current=True) for d in down])

            await _until(healed_v2)
            for drive in down:  # v1, current there before, is kept as a non-current version
                assert await _holds(cluster, drive, v1, current=False)
            for i in (0, 1):  # the healed drives now carry v2; v1 is on 10 drives
                await cluster.stop_datanode(i)
            assert await _read(cluster, v2, len(v2_data)) == v2_data
            assert await _read(cluster, v1, len(v1_data)) == v1_data
            assert await client.get_object(BUCKET, KEY) == v2_data
            for i in (0, 1):
                await cluster.start_datanode(i)

            await _down(cluster, 5)
            marker = await cluster.front.delete_object(BUCKET, KEY)  # a marker on 10 drives
            assert marker.delete_marker
            await cluster.start_datanode(5)

            async def healed_marker() -> bool:
                return all(
                    [await _holds(cluster, d, marker.version_id, current=True) for d in down]
                )

            await _until(healed_marker)
            for drive in down:
                assert _meta(cluster, drive).delete_marker
                assert await _holds(cluster, drive, v2, current=False)
            with pytest.raises(errors.NotFound):
                await client.get_object(BUCKET, KEY)
            assert await _read(cluster, v2, len(v2_data)) == v2_data
    finally:
        principal.unbind(bound)
