"""Concurrent small PUTs share WRITE_SMALL calls (issue 14, services.gateway.smallbatch): every
object lands exact, and an object that fails inside a batch fails alone."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.proto.gateway.v1 import objects_pb2 as gateway_pb
from services.gateway import commits
from tests.component import objects_cluster
from tests.component.test_small_objects import Calls

KIB = objects_cluster.KIB
Cluster = objects_cluster.Cluster
WRITE_SMALL = "SHARD_CALL_METHOD_WRITE_SMALL"


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


@pytest.fixture
def calls(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(cluster.engine._nodes, monkeypatch)


async def test_concurrent_small_puts_share_calls_and_land_exact(
    cluster: Cluster, calls: Calls
) -> None:
    count = 24
    bodies = {f"k{i}": objects_cluster.data(i, 4 * KIB + i) for i in range(count)}
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("batched")
        calls.take()
        infos = await asyncio.gather(
            *(client.put_object("batched", k, body) for k, body in bodies.items())
        )
        made = calls.take()
        # One call per datanode per object without batching (6 x 24); the calls that found
        # their node busy went together.
        assert made.keys() == {WRITE_SMALL}
        assert made[WRITE_SMALL] < 6 * count
        for (key, body), info in zip(bodies.items(), infos, strict=True):
            assert info.etag == hashlib.md5(body).hexdigest()
            assert await client.get_object("batched", key) == body, key
        assert sorted(await cluster.stored_keys(cluster.stored("batched"))) == sorted(bodies)


async def test_an_object_failing_inside_a_batch_fails_alone(cluster: Cluster, calls: Calls) -> None:
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("isolated")
        await client.put_object("isolated", "seed", b"x")  # the storage name shows on disk
        stored = cluster.stored("isolated")
        bodies = {f"k{i}": objects_cluster.data(100 + i, 3 * KIB + i) for i in range(5)}
        uploads = {}
        for key, body in bodies.items():
            begun = engine.begin_put(
                gateway_pb.BeginPutRequest(bucket=stored, key=key, size=len(body))
            )

            async def fill(view: memoryview, body: bytes = body) -> int:
                view[:] = body
                return len(body)

            await engine.write_call(begun.upload_id, len(body), fill)
            uploads[key] = begun.upload_id
        # k2's version is stamped an hour ahead (a skewed clock): every drive refuses it,
        # inside the same WRITE_SMALL calls as the others.
        skewed = engine._upload(uploads["k2"])
        meta = engine._meta(skewed, skewed.md5.hexdigest(), {})
        meta.mtime_unix_ns = time.time_ns() + 3600 * 10**9
        live = list(range(len(skewed.where.slots)))
        calls.take()
        results = await asyncio.gather(
            *(engine.commit_meta(uploads[k]) for k in ("k0", "k1")),
            commits.commit_version(
                engine._nodes, engine.clock, skewed.where, meta, skewed.upload_id, live,
                small=skewed.small, stamp=False,
            ),
            *(engine.commit_meta(uploads[k]) for k in ("k3", "k4")),
            return_exceptions=True,
        )  # fmt: skip
        engine._forget(uploads["k2"])
        # Two calls per datanode: the first object alone, then the four others together.
        assert calls.take()[WRITE_SMALL] == 12
        assert isinstance(results[2], errors.ClockSkew), results[2]
        for i in (0, 1, 3, 4):
            assert not isinstance(results[i], BaseException), results[i]
        for key, body in bodies.items():
            if key == "k2":
                with pytest.raises(errors.NotFound):
                    await client.head_object("isolated", key)
            else:
                assert await client.get_object("isolated", key) == body, key
