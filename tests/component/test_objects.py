"""The durable object tier in one process: metadata, 6 datanodes (EC 8+4), a gateway, the SDK."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from kvtier import errors, etcdserver, membership, objects
from services.datanode import config as datanode_config
from services.datanode import shards
from services.gateway.s3 import response_body
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
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


SIZES = [0, 1, 4 * KIB, 128 * KIB - 1, 128 * KIB, 128 * KIB + 1, MIB, 8 * MIB + 5, 41 * MIB + 3]


async def test_round_trips_are_byte_exact_with_random_ranges(cluster: Cluster) -> None:
    rng = random.Random(int(os.environ.get("KVTIER_TEST_SEED", "1")))
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("models")
        for i, size in enumerate(SIZES):
            data = objects_cluster.data(i, size)
            info = await client.put_object(
                "models", f"obj/{size}", data, content_type="application/x-test",
                metadata={"run": "1"}, checksums=["SHA256", "CRC32"],
            )  # fmt: skip
            assert info.size == size
            assert info.etag == hashlib.md5(data).hexdigest()
            head = await client.head_object("models", f"obj/{size}")
            assert head.etag == info.etag
            assert head.headers.content_type == "application/x-test"
            assert dict(head.headers.user_metadata) == {"run": "1"}
            assert await client.get_object("models", f"obj/{size}") == data
            for _ in range(3 if size else 0):
                start = rng.randrange(size)
                length = rng.randrange(1, size - start + 1)
                got = await client.get_object("models", f"obj/{size}", offset=start, length=length)
                assert got == data[start : start + length], (size, start, length)


async def test_listing_deletes_and_bucket_rules(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("listing")
        keys = sorted(f"dir{d}/file-{i:03d}" for d in range(3) for i in range(40))
        for key in keys:
            await client.put_object("listing", key, key.encode())
        page = await client.list_objects("listing", max_keys=50)
        assert [o.key for o in page.objects] == keys[:50]
        assert page.is_truncated
        rest = await client.list_objects(
            "listing", continuation_token=page.next_continuation_token, max_keys=1000
        )
        assert [o.key for o in rest.objects] == keys[50:]
        folded = await client.list_objects("listing", delimiter="/")
        assert list(folded.common_prefixes) == ["dir0/", "dir1/", "dir2/"]
        assert [o.key for o in (await client.list_objects("listing", prefix="dir1/")).objects] == [
            k for k in keys if k.startswith("dir1/")
        ]
        with pytest.raises(errors.PreconditionFailed):
            await client.delete_bucket("listing")
        for key in keys:
            await client.delete_object("listing", key)
        with pytest.raises(errors.NotFound):
            await client.head_object("listing", keys[0])
        await client.delete_object("listing", keys[0])  # absent: fine
        await client.delete_bucket("listing")
        with pytest.raises(errors.NotFound):
            await client.put_object("listing", "k", b"x")
        with pytest.raises(errors.InvalidArgument):
            await client.create_bucket("Bad_Name")
        await client.create_bucket("rules")
        for bad_key in ("", "x" * 1025, "nul\x00key"):
            with pytest.raises(errors.InvalidArgument):
                await client.put_object("rules", bad_key, b"x")


async def test_put_if_absent_and_digests(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("cond")
        await client.put_object("cond", "k", b"first", if_none_match=True)
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("cond", "k", b"second", if_none_match=True)
        assert await client.get_object("cond", "k") == b"first"
        first = (await client.head_object("cond", "k")).etag
        with pytest.raises(errors.NotFound):
            await client.put_object("cond", "absent", b"x", if_match=first)
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("cond", "k", b"stale", if_match='"0123"')
        replaced = await client.put_object("cond", "k", b"replaced", if_match=first)
        with pytest.raises(errors.PreconditionFailed):  # first is gone: a late writer loses
            await client.put_object("cond", "k", b"late", if_match=first)
        assert await client.get_object("cond", "k") == b"replaced"
        await client.put_object("cond", "k", b"first", if_match=replaced.etag)
        copied = await client.copy_object("cond", "k", "cond", "k2")
        assert copied.etag == hashlib.md5(b"first").hexdigest()
        assert await client.get_object("cond", "k2") == b"first"


async def test_corrupt_and_missing_shards_are_rebuilt_on_read(cluster: Cluster) -> None:
    data = objects_cluster.data(7, 20 * MIB + 11)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("degraded")
        await client.put_object("degraded", "weights.bin", data)
        # Flip bytes in the shard files of two drives, delete the shard of a third.
        drives = []
        for node in cluster.datanodes:
            cfg = node.ctx.cfg
            assert isinstance(cfg, datanode_config.DatanodeConfig)
            drives.extend(cfg.drive_paths())
        await asyncio.to_thread(_damage, drives, "degraded")
        # The S3 door's way: pieces gathered (and rebuilt) straight into its writer's buffers.
        found = await cluster.engine.resolve(cluster.stored("degraded"), "weights.bin")
        out = bytearray()
        writer = response_body.BodyWriter(cast(web.StreamResponse, _Sink(out)))
        start = 9 * MIB + 5
        for first, n in ((0, len(data)), (start, 3 * MIB)):
            await cluster.engine.stream(found, first, n, writer.sink, writer.ready, writer.buffer)
            await writer.finish()
            assert out == data[first : first + n]
            out.clear()
        assert await client.get_object("degraded", "weights.bin") == data
        assert (
            await client.get_object("degraded", "weights.bin", offset=start, length=MIB)
            == (data[start : start + MIB])
        )


class _Sink:
    """A response that keeps what is written (copied: a transport's send)."""

    def __init__(self, out: bytearray) -> None:
        self.out = out

    async def write(self, data: memoryview) -> None:
        self.out += data


def _damage(drives: list[Path], bucket: str) -> None:
    files = [f for d in drives for f in sorted(d.glob(f"objects/{bucket}@*/*/*/*/part.1"))]
    assert len(files) == 12
    for path in files[:2]:
        raw = bytearray(path.read_bytes())
        raw[100:110] = bytes(10)
        raw[-20:-10] = b"\xff" * 10
        path.write_bytes(bytes(raw))
    files[2].unlink()


async def test_reads_survive_m_lost_drives_and_fail_cleanly_beyond(cluster: Cluster) -> None:
    data = objects_cluster.data(11, 9 * MIB + 1)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("quorum")
        await client.put_object("quorum", "big", data)
        await client.put_object("quorum", "small", b"tiny object")
        for node in cluster.datanodes[:2]:  # 4 of 12 drives: m = 4
            node.stop.set()
            await node.task
        assert await client.get_object("quorum", "big") == data
        assert await client.get_object("quorum", "small") == b"tiny object"
        # With m drives down a PUT still reaches its write quorum (8 of 12).
        await client.put_object("quorum", "during", b"written while degraded")
        assert await client.get_object("quorum", "during") == b"written while degraded"
        cluster.datanodes[2].stop.set()
        await cluster.datanodes[2].task
        with pytest.raises(errors.Unavailable):
            await client.get_object("quorum", "big")
        with pytest.raises(errors.Unavailable):
            await client.put_object("quorum", "refused", b"x")


async def test_concurrent_puts_of_one_key_leave_one_whole_version(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("race")
        versions = [objects_cluster.data(100 + i, 3 * MIB + i) for i in range(8)]
        results = await asyncio.gather(
            *(client.put_object("race", "same", v) for v in versions), return_exceptions=True
        )
        assert all(not isinstance(r, BaseException) for r in results), results
        got = await client.get_object("race", "same")
        assert got in versions
        head = await client.head_object("race", "same")
        assert head.etag == hashlib.md5(got).hexdigest()
        # Every drive converged on that version: the object still reads with m drives gone.
        for node in cluster.datanodes[:2]:
            node.stop.set()
            await node.task
        assert await client.get_object("race", "same") == got


async def test_a_ranged_read_rebuilds_a_lost_block_from_the_whole_stripe(
    cluster: Cluster,
) -> None:
    """The range covers one data block; rebuilding it needs the stripe's other blocks read."""
    data = objects_cluster.data(13, 16 * MIB + 3)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("ranged")
        await client.put_object("ranged", "k", data)
        digest = hashlib.sha256(b"k").hexdigest()
        for drive in cluster.drive_paths():
            object_dir = drive / "objects" / cluster.stored("ranged") / digest[:2] / digest
            meta = shards.decode_meta((object_dir / "meta").read_bytes(), "meta")
            if meta.shard_index == 1:
                (object_dir / meta.data_id / "part.1").unlink()
        for start in (MIB + 5, 9 * MIB):  # block 1 of stripes 0 and 1
            got = await client.get_object("ranged", "k", offset=start, length=1000)
            assert got == data[start : start + 1000], start


async def test_a_range_past_the_end_is_cut_at_the_end(cluster: Cluster) -> None:
    data = objects_cluster.data(11, 3 * MIB + 7)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("tail")
        await client.put_object("tail", "k", data)
        start = len(data) - 100
        assert await client.get_object("tail", "k", offset=start, length=4096) == data[start:]
        assert await client.get_object("tail", "k", offset=0, length=len(data) + 5) == data
