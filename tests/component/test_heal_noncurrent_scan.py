"""Non-current versions of a versioned bucket are healed by the background scanner, and delete
markers by `kvtier admin heal` and the scanner (the in-process object tier, EC 8+4).

The scanner is off in these clusters (scan_interval_s 0): each test runs its passes itself
(`Healer.scan_slice`, what every cycle of `run_scanner` runs), 2 versions a pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from kvtier import etcdserver, membership, objects, objversions, principal
from kvtier.clients import datanode as datanode_client
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from tests.component import objects_cluster
from tests.component import test_heal_noncurrent as noncurrent_test
from tests.component import test_healing as healing_test

MIB = objects_cluster.MIB
Cluster = objects_cluster.Cluster
BUCKET = noncurrent_test.BUCKET
SIZE = noncurrent_test.SIZE
PER_PASS = 2


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    settings: dict[str, Any] = {"scan_interval_s": 0.0, "scan_objects_per_cycle": PER_PASS}
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path, **settings) as c:
        yield c


async def _versioned_bucket(cluster: Cluster, client: objects.AsyncObjectClient) -> None:
    await client.create_bucket(BUCKET)
    enabled = metadata_pb2.BucketVersioning(status=metadata_pb2.VERSIONING_STATUS_ENABLED)
    bound = principal.bind(principal.INSECURE)
    try:
        await cluster.front.set_bucket_config(
            BUCKET, metadata_pb2.SetBucketConfigRequest(versioning=enabled)
        )
    finally:
        principal.unbind(bound)


def _healed_count() -> float:
    labels = {"outcome": "healed"}
    value = prometheus_client.REGISTRY.get_sample_value("kvtier_gateway_heal_objects_total", labels)
    return value or 0.0


async def _held(cluster: Cluster, drive: Path, key: str, version: str) -> datanode_pb2.ShardMeta:
    """The drive's meta of key's version (empty: its current one), as its datanode serves it."""
    address = cluster.datanodes[healing_test._node_of(cluster, drive)].address
    async with datanode_client.ShardClient(address) as client:
        return await client.read_meta(cluster.drive_id(drive), cluster.stored(BUCKET), key, version)


async def _drop(cluster: Cluster, drive: Path, key: str, version: str) -> None:
    """Remove one version of key from a drive (as if the drive had missed its write)."""
    address = cluster.datanodes[healing_test._node_of(cluster, drive)].address
    async with datanode_client.ShardClient(address) as client:
        stored = cluster.stored(BUCKET)
        assert await client.delete_shard(cluster.drive_id(drive), stored, key, version)


async def test_the_scanner_heals_a_noncurrent_versions_lost_part(cluster: Cluster) -> None:
    data = {v: objects_cluster.data(v, SIZE) for v in (1, 2, 3)}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await _versioned_bucket(cluster, client)
        await client.put_object(BUCKET, "a", data[1])
        old = healing_test._meta(cluster.drive_paths()[0], BUCKET, "a")
        await client.put_object(BUCKET, "a", data[2])
        await client.put_object(BUCKET, "b", data[3])
        part, original, drive = noncurrent_test._lose_old_part(cluster, "a", 3, old.data_id)
        current = noncurrent_test._current_files(cluster, "a")

        # Versions in listing order: a (current), a's v1, b. A pass looks at 2 of them.
        before = _healed_count()
        assert await cluster.healer.scan_slice() == PER_PASS
        assert part.read_bytes() == original
        assert await noncurrent_test._verified_version(cluster, drive, "a", old)
        assert noncurrent_test._current_files(cluster, "a") == current  # v2 untouched
        assert _healed_count() == before + 1  # the non-current version counts as healed
        assert await cluster.healer.scan_slice() == 1  # b, then the end: it starts over
        assert await cluster.healer.scan_slice() == PER_PASS
        assert _healed_count() == before + 1
        assert await client.get_object(BUCKET, "a") == data[2]
        found = await cluster.engine.resolve(
            cluster.stored(BUCKET), "a", version_id=objversions.version_id(old)
        )
        buf = bytearray(SIZE)
        await cluster.engine.read_into(found, 0, memoryview(buf))
        assert bytes(buf) == data[1]


async def test_a_noncurrent_delete_marker_missing_on_drives_is_healed(cluster: Cluster) -> None:
    v1_data, v2_data = objects_cluster.data(1, 777), objects_cluster.data(2, 888)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await _versioned_bucket(cluster, client)
        await client.put_object(BUCKET, "k", v1_data)
        bound = principal.bind(principal.INSECURE)
        try:
            marker = (await cluster.front.delete_object(BUCKET, "k")).version_id
        finally:
            principal.unbind(bound)
        await client.put_object(BUCKET, "k", v2_data)  # the marker is now non-current
        drives = cluster.drive_paths()
        v2 = objversions.version_id(await _held(cluster, drives[0], "k", ""))

        async def marker_on(lacking: list[Path]) -> None:
            for drive in lacking:
                held = await _held(cluster, drive, "k", marker)
                assert held.delete_marker
                assert objversions.version_id(await _held(cluster, drive, "k", "")) == v2

        # Missing on 3 drives: 9 list it (the read quorum is 8), so it is listed and healed.
        lacking = drives[:3]
        for drive in lacking:
            await _drop(cluster, drive, "k", marker)
        progress, lost = await healing_test._heal(cluster, BUCKET)
        # v2 (current), the marker and v1: the marker rebuilt on the 3 drives.
        assert (progress.scanned, progress.healed, progress.shards_healed) == (3, 1, 3)
        assert not lost
        await marker_on(lacking)

        # The scanner too: the first pass looks at v2 and the marker.
        lacking = drives[5:7]
        for drive in lacking:
            await _drop(cluster, drive, "k", marker)
        assert await cluster.healer.scan_slice() == PER_PASS
        await marker_on(lacking)
        assert await client.get_object(BUCKET, "k") == v2_data
        listed = await cluster.front.version_lister.list_versions(cluster.stored(BUCKET))
        shown = [(e.version_id, e.delete_marker) for e in listed.versions]
        assert shown[:2] == [(v2, False), (marker, True)]
        assert [m for _, m in shown[2:]] == [False]  # v1
