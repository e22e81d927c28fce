"""A non-current version's lost part file is healed (over the in-process object tier, EC 8+4):
by `kvtier admin heal` (AdminService.Heal walks every version of a versioned bucket) and by the
queue after a GET of that version (?versionId), which rebuilds the missing blocks from parity.
The rebuilt shard stays non-current: the current version is untouched on every drive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import etcdserver, membership, objects, objversions, principal
from kvtier.clients import datanode as datanode_client
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import reads
from tests.component import objects_cluster
from tests.component import test_healing as healing_test

MIB = objects_cluster.MIB
Cluster = objects_cluster.Cluster
BUCKET = "oldpart"
SIZE = 4 * MIB + 5  # 8 data shards of 512 KiB + 1: in part files, not inline in the meta


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


def _current_files(cluster: Cluster, key: str) -> dict[Path, bytes]:
    """Every drive's current meta of key and the current version's part file."""
    files = {}
    for drive in cluster.drive_paths():
        meta = healing_test._object_dir(drive, BUCKET, key) / "meta"
        files[meta] = meta.read_bytes()
        part = healing_test._part(drive, BUCKET, key)
        files[part] = part.read_bytes()
    return files


async def _verified_version(
    cluster: Cluster, drive: Path, key: str, meta: datanode_pb2.ShardMeta
) -> bool:
    """Whether the datanode holds that version whole on the drive, and not as the current one."""
    address = cluster.datanodes[healing_test._node_of(cluster, drive)].address
    drive_id, version = cluster.drive_id(drive), objversions.version_id(meta)
    async with datanode_client.ShardClient(address) as client:
        reply = await client.verify_shard(drive_id, cluster.stored(BUCKET), key, version)
        current = await client.read_meta(drive_id, cluster.stored(BUCKET), key)
    return not reply.missing and not reply.bad_blocks and current.data_id != meta.data_id


async def _read_version(cluster: Cluster, key: str, version: str) -> bytes:
    """A GET ?versionId=version as the gateway serves it."""
    found = await cluster.engine.resolve(cluster.stored(BUCKET), key, version_id=version)
    buf = bytearray(found.meta.size)
    await cluster.engine.read_into(found, 0, memoryview(buf))
    return bytes(buf)


def _lose_old_part(cluster: Cluster, key: str, shard: int, old: str) -> tuple[Path, bytes, Path]:
    """Unlink the non-current version's part file of one drive: (that file, its bytes, drive)."""
    drive = healing_test._drives_by_shard(cluster, BUCKET, key)[shard]
    part = healing_test._object_dir(drive, BUCKET, key) / old / "part.1"
    original = part.read_bytes()
    part.unlink()  # the part file only: the version's meta and data directory stay
    return part, original, drive


async def test_a_noncurrent_versions_lost_part_is_healed_as_noncurrent(cluster: Cluster) -> None:
    keys = ("admin", "read")
    data = {
        (k, v): objects_cluster.data(10 * i + v, SIZE) for i, k in enumerate(keys) for v in (1, 2)
    }
    old: dict[str, datanode_pb2.ShardMeta] = {}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket(BUCKET)
        enabled = metadata_pb2.BucketVersioning(status=metadata_pb2.VERSIONING_STATUS_ENABLED)
        bound = principal.bind(principal.INSECURE)
        try:
            await cluster.front.set_bucket_config(
                BUCKET, metadata_pb2.SetBucketConfigRequest(versioning=enabled)
            )
        finally:
            principal.unbind(bound)
        for key in keys:
            await client.put_object(BUCKET, key, data[(key, 1)])
            old[key] = healing_test._meta(cluster.drive_paths()[0], BUCKET, key)
            await client.put_object(BUCKET, key, data[(key, 2)])
        assert not reads.is_inline(old["admin"])
        v1 = objversions.version_id(old["admin"])
        part, original, drive = _lose_old_part(cluster, "admin", 3, old["admin"].data_id)
        current = _current_files(cluster, "admin")

        # Two keys, each current and one non-current version: v1 of "admin" is rebuilt.
        progress, lost = await healing_test._heal(cluster, BUCKET)
        assert (progress.scanned, progress.healed, progress.shards_healed) == (4, 1, 1)
        assert not lost
        assert part.read_bytes() == original
        assert await _verified_version(cluster, drive, "admin", old["admin"])
        assert _current_files(cluster, "admin") == current  # v2 current and untouched
        assert await client.get_object(BUCKET, "admin") == data[("admin", 2)]
        # Read v1 from the rebuilt shard: 4 (m) other drives' v1 part files gone as well.
        for index in (0, 1, 8, 9):
            _lose_old_part(cluster, "admin", index, old["admin"].data_id)
        assert await _read_version(cluster, "admin", v1) == data[("admin", 1)]

        # A GET of v1 rebuilds the missing blocks from parity and queues it: the queue heals it.
        part, original, drive = _lose_old_part(cluster, "read", 5, old["read"].data_id)
        current = _current_files(cluster, "read")
        version = objversions.version_id(old["read"])
        assert await _read_version(cluster, "read", version) == data[("read", 1)]

        async def healed() -> bool:
            return await _verified_version(cluster, drive, "read", old["read"]) and (
                cluster.healer.queued(cluster.stored(BUCKET), "read") is None
            )

        # The scanner is off and no admin heal runs: only the queue can have rebuilt it.
        await healing_test._until(healed, timeout_s=10)
        assert part.read_bytes() == original
        assert _current_files(cluster, "read") == current
        assert await client.get_object(BUCKET, "read") == data[("read", 2)]
