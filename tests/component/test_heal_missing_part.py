"""A drive that lost only a version's part file (its meta left in place) is healed: by the heal
`kvtier admin heal` runs (AdminService.Heal, not a dry run) and by the queue after a GET, which
rebuilds the missing blocks from parity (over the in-process object tier, EC 8+4)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import etcdserver, membership, objects
from kvtier.clients import gateway as gateway_client
from services.gateway import reads
from tests.component import objects_cluster
from tests.component import test_healing as healing_test

MIB = objects_cluster.MIB
Cluster = objects_cluster.Cluster
BUCKET = "lostpart"
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


async def _admin_heal(cluster: Cluster) -> tuple[int, int, int]:
    """(scanned, healed, shards healed) of a Heal of the bucket as the CLI runs it."""
    async with gateway_client.AdminServiceClient(cluster.gateway.address) as client:
        messages = [p async for p in client.heal(BUCKET, "", dry_run=False)]
    last = messages[-1]
    return last.scanned, last.healed, last.shards_healed


async def test_a_deleted_part_file_is_rebuilt_by_admin_heal_and_after_a_get(
    cluster: Cluster,
) -> None:
    data = {key: objects_cluster.data(seed, SIZE) for seed, key in enumerate(("admin", "read"))}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket(BUCKET)
        for key, body in data.items():
            await client.put_object(BUCKET, key, body)
        drives = healing_test._drives_by_shard(cluster, BUCKET, "admin")
        meta = healing_test._meta(drives[3], BUCKET, "admin")
        assert not reads.is_inline(meta)
        part = healing_test._part(drives[3], BUCKET, "admin")
        original = part.read_bytes()
        part.unlink()  # the part file only: the meta and the data directory stay

        assert await _admin_heal(cluster) == (2, 1, 1)
        assert part.read_bytes() == original
        assert await healing_test._verified(cluster, drives[3], BUCKET, "admin", meta.data_id)
        # Read from the rebuilt shard: 4 (m) other drives' part files gone as well.
        for index in (0, 1, 8, 9):
            healing_test._part(drives[index], BUCKET, "admin").unlink()
        assert await client.get_object(BUCKET, "admin") == data["admin"]

        # A GET rebuilds the missing blocks from parity and queues the object: the queue heals it.
        drive = healing_test._drives_by_shard(cluster, BUCKET, "read")[5]
        read_meta = healing_test._meta(drive, BUCKET, "read")
        part = healing_test._part(drive, BUCKET, "read")
        original = part.read_bytes()
        part.unlink()
        assert await client.get_object(BUCKET, "read") == data["read"]

        async def healed() -> bool:
            return await healing_test._verified(
                cluster, drive, BUCKET, "read", read_meta.data_id
            ) and (cluster.healer.queued(cluster.stored(BUCKET), "read") is None)

        # The scanner is off and no admin heal runs: only the queue can have rebuilt it.
        await healing_test._until(healed, timeout_s=10)
        assert part.read_bytes() == original
