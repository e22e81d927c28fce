"""Multipart uploads on the in-process object cluster (6 datanodes, EC 8+4), through the SDK."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import random
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, names, objects
from kvtier.proto.gateway.v1 import objects_pb2
from services.datanode import config as datanode_config
from services.gateway import __main__ as gateway_main
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


def _drives(cluster: Cluster) -> list[Path]:
    drives: list[Path] = []
    for node in cluster.datanodes:
        cfg = node.ctx.cfg
        assert isinstance(cfg, datanode_config.DatanodeConfig)
        drives.extend(cfg.drive_paths())
    return drives


def _internal_metas(drives: list[Path]) -> list[Path]:
    return [m for d in drives for m in d.glob(f"objects/{names.MULTIPART_BUCKET}/*/*/meta")]


async def test_parts_in_any_order_replaced_and_subset_make_a_byte_exact_object(
    cluster: Cluster,
) -> None:
    rng = random.Random(int(os.environ.get("KVTIER_TEST_SEED", "3")))
    p1 = objects_cluster.data(1, 5 * MIB + 3)
    p2_old = objects_cluster.data(2, 5 * MIB)
    p2 = objects_cluster.data(22, 6 * MIB + 17)
    p3 = objects_cluster.data(3, 9 * MIB)
    p4 = objects_cluster.data(4, 1000)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("mpu")
        upload = await client.create_multipart_upload(
            "mpu", "model/weights.bin", content_type="application/x-weights", metadata={"a": "1"}
        )
        infos = {}
        infos[4] = await client.upload_part("mpu", "model/weights.bin", upload, 4, p4)
        infos[2] = await client.upload_part("mpu", "model/weights.bin", upload, 2, p2_old)
        infos[3] = await client.upload_part("mpu", "model/weights.bin", upload, 3, p3)
        infos[1] = await client.upload_part("mpu", "model/weights.bin", upload, 1, p1)
        infos[2] = await client.upload_part("mpu", "model/weights.bin", upload, 2, p2)  # again
        assert infos[2].etag == hashlib.md5(p2).hexdigest()
        listed = await client.list_parts("mpu", "model/weights.bin", upload)
        assert [(p.part_number, p.size, p.etag) for p in listed] == [
            (n, infos[n].size, infos[n].etag) for n in (1, 2, 3, 4)
        ]
        uploads = await client.list_multipart_uploads("mpu")
        assert [(u.key, u.upload_id) for u in uploads] == [("model/weights.bin", upload)]
        # The record and 4 parts, each on all 12 drives.
        assert len(_internal_metas(_drives(cluster))) == 5 * 12

        # Complete with a subset: part 3 is left out (and deleted with the upload).
        info = await client.complete_multipart_upload(
            "mpu", "model/weights.bin", upload, [infos[1], infos[2], infos[4]]
        )
        whole = p1 + p2 + p4
        md5s = b"".join(hashlib.md5(p).digest() for p in (p1, p2, p4))
        assert info.etag == f"{hashlib.md5(md5s).hexdigest()}-3"
        assert info.size == len(whole)
        head = await client.head_object("mpu", "model/weights.bin")
        assert (head.etag, head.parts, head.headers.content_type) == (
            info.etag, 3, "application/x-weights",
        )  # fmt: skip
        assert dict(head.headers.user_metadata) == {"a": "1"}
        assert await client.get_object("mpu", "model/weights.bin") == whole
        boundaries = [len(p1), len(p1) + len(p2)]
        for at in [*boundaries, *(rng.randrange(len(whole)) for _ in range(6))]:
            start = max(0, at - rng.randrange(1, 3 * MIB))
            length = min(len(whole) - start, rng.randrange(1, 6 * MIB))
            got = await client.get_object("mpu", "model/weights.bin", offset=start, length=length)
            assert got == whole[start : start + length], (start, length)

        # Nothing of the upload is left: no record, no parts, and listings show the object only.
        assert await client.list_multipart_uploads("mpu") == []
        with pytest.raises(errors.NotFound):
            await client.list_parts("mpu", "model/weights.bin", upload)
        assert _internal_metas(_drives(cluster)) == []
        keys = [o.key for o in (await client.list_objects("mpu")).objects]
        assert keys == ["model/weights.bin"]

        # A server-side copy of the multipart object reads across its parts.
        copied = await client.copy_object("mpu", "model/weights.bin", "mpu", "copy.bin")
        assert copied.etag == hashlib.md5(whole).hexdigest()
        assert await client.get_object("mpu", "copy.bin") == whole


async def test_complete_checks_parts_and_abort_drops_everything(cluster: Cluster) -> None:
    big = objects_cluster.data(5, 5 * MIB)
    small = objects_cluster.data(6, 100 * KIB)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("checks")
        upload = await client.create_multipart_upload("checks", "k")
        one = await client.upload_part("checks", "k", upload, 1, small)
        two = await client.upload_part("checks", "k", upload, 2, big)
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.complete_multipart_upload("checks", "k", upload, [one, two])
        assert caught.value.reason == "EntityTooSmall"  # typed, over gRPC too
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.complete_multipart_upload("checks", "k", upload, [two, one])
        assert caught.value.reason == "InvalidPartOrder"  # typed, over gRPC too
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.complete_multipart_upload("checks", "k", upload, [(1, "0" * 32)])
        assert caught.value.reason == "InvalidPart"  # typed, over gRPC too
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.complete_multipart_upload("checks", "k", upload, [(3, one.etag)])
        assert caught.value.reason == "InvalidPart"  # typed, over gRPC too
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.upload_part("checks", "k", upload, 3, big, content_md5="0" * 32)
        assert caught.value.reason == "BadDigest"  # typed, over gRPC too
        with pytest.raises(errors.NotFound) as missing:
            await client.upload_part("checks", "other-key", upload, 1, small)
        assert missing.value.reason == "NoSuchUpload"  # typed, over gRPC too
        with pytest.raises(errors.NotFound) as missing:
            await client.complete_multipart_upload("checks", "k", "f" * 32, [one])
        assert missing.value.reason == "NoSuchUpload"  # typed, over gRPC too
        with pytest.raises(errors.InvalidArgument):
            await client.upload_part("checks", "k", upload, 10_001, small)
        with pytest.raises(errors.NotFound):
            await client.head_object("checks", "k")  # nothing visible before complete
        await client.abort_multipart_upload("checks", "k", upload)
        with pytest.raises(errors.NotFound):
            await client.list_parts("checks", "k", upload)
        with pytest.raises(errors.NotFound):
            await client.abort_multipart_upload("checks", "k", upload)
        assert _internal_metas(_drives(cluster)) == []
        assert (await client.list_objects("checks")).objects == []


async def test_uploads_are_listed_by_key_then_time_with_markers(cluster: Cluster) -> None:
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("many")
        ids: dict[str, list[str]] = {}
        for key in ["b", "a/2", "a/1", "b", "c"]:
            ids.setdefault(key, []).append(await client.create_multipart_upload("many", key))
        got = await client.list_multipart_uploads("many")
        assert [(u.key, u.upload_id) for u in got] == [
            ("a/1", ids["a/1"][0]), ("a/2", ids["a/2"][0]),
            ("b", ids["b"][0]), ("b", ids["b"][1]), ("c", ids["c"][0]),
        ]  # fmt: skip
        assert [u.key for u in await client.list_multipart_uploads("many", prefix="a/")] == [
            "a/1", "a/2",
        ]  # fmt: skip
        rpc = client._rpc
        page = await rpc.list_multipart_uploads(
            objects_pb2.ListMultipartUploadsRequest(bucket="many", delimiter="/", max_uploads=2)
        )
        assert list(page.common_prefixes) == ["a/"]
        assert [u.key for u in page.uploads] == ["b"]
        assert page.is_truncated
        rest = await rpc.list_multipart_uploads(
            objects_pb2.ListMultipartUploadsRequest(
                bucket="many", delimiter="/", key_marker=page.next_key_marker,
                upload_id_marker=page.next_upload_id_marker,
            )
        )  # fmt: skip
        assert [(u.key, u.upload_id) for u in rest.uploads] == [
            ("b", ids["b"][1]), ("c", ids["c"][0]),
        ]  # fmt: skip
        for key, uploads in ids.items():
            for upload in uploads:
                await client.abort_multipart_upload("many", key, upload)
        assert await client.list_multipart_uploads("many") == []


async def test_checksums_copy_parts_and_degraded_reads(cluster: Cluster) -> None:
    src = objects_cluster.data(8, 12 * MIB + 5)
    tail = objects_cluster.data(9, 3 * KIB)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("sums")
        await client.put_object("sums", "src", src)
        upload = await client.create_multipart_upload("sums", "dst", checksum_algorithm="CRC32")
        first = await client.upload_part_copy(
            "sums", "dst", upload, 1, "sums", "src", byte_range=(MIB, 7 * MIB - 1)
        )
        second = await client.upload_part("sums", "dst", upload, 2, tail)
        crcs = [zlib.crc32(src[MIB : 7 * MIB]), zlib.crc32(tail)]
        assert first.checksums["CRC32"] == base64.b64encode(crcs[0].to_bytes(4, "big")).decode()
        info = await client.complete_multipart_upload("sums", "dst", upload, [first, second])
        joined = b"".join(c.to_bytes(4, "big") for c in crcs)
        expected = base64.b64encode(zlib.crc32(joined).to_bytes(4, "big")).decode() + "-2"
        assert info.checksums["CRC32"] == expected
        whole = src[MIB : 7 * MIB] + tail
        # Flip bytes in one drive's part files: reads are still exact.
        files = sorted(f for d in _drives(cluster) for f in d.glob("objects/sums@*/*/*/*/part.*"))
        assert files
        for path in files[:3]:
            raw = bytearray(path.read_bytes())
            raw[50:60] = b"\x00" * 10
            await asyncio.to_thread(path.write_bytes, bytes(raw))
        assert await client.get_object("sums", "dst") == whole


async def test_the_upload_sweep_outlives_unreachable_drives(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's periodic sweep of stale uploads (`gateway_main.sweep_once`) with every
    datanode down: the pass is skipped and logged, not raised (a raised error ended the sweep
    loop and with it the whole gateway: tests/fault/test_power_loss.py, every datanode's power
    cut); once the drives are back a pass runs clean and leaves a live upload alone."""
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("swept")
        upload = await client.create_multipart_upload("swept", "k")
        part = await client.upload_part("swept", "k", upload, 1, objects_cluster.data(8, 1000))
    for i in range(len(cluster.datanodes)):
        await cluster.stop_datanode(i)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: not any(n.drives for n in m.nodes), timeout_s=15
    )
    with caplog.at_level(logging.WARNING, logger=gateway_main.__name__):
        await gateway_main.sweep_once(cluster.front)  # raises nothing
    assert "multipart sweep skipped: listing" in caplog.text
    for i in range(len(cluster.datanodes)):
        await cluster.start_datanode(i)
    await cluster.gateway.ctx.map_view.wait_for(
        lambda m: sum(len(n.drives) for n in m.nodes) == objects_cluster.DATANODES * 2,
        timeout_s=15,
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=gateway_main.__name__):
        await gateway_main.sweep_once(cluster.front)
    assert "sweep" not in caplog.text
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        info = await client.complete_multipart_upload("swept", "k", upload, [part])
        assert info.size == 1000
