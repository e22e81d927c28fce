"""Versions ordered by the gateways' hybrid logical clocks, not their wall clocks (issue 16).

Two gateways, one 10 min ahead and one 10 min behind, are played by one gateway's engine
whose clock is swapped: each HybridClock keeps its own state, as two gateways would (the fault
suite runs two real gateway processes, tests/fault/test_clock_skew.py). Before the hybrid
clock, a write through the lagging gateway answered 200 and never became visible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtier import errors, etcdserver, hlc, membership, objects
from services.gateway import commits
from tests.component import objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
MINUTE_NS = 60 * 10**9
Cluster = objects_cluster.Cluster


def clock(offset_min: float) -> hlc.HybridClock:
    """A gateway's clock offset_min minutes off real time."""
    offset_ns = int(offset_min * MINUTE_NS)
    return hlc.HybridClock(lambda: time.time_ns() + offset_ns)


@pytest.fixture(params=[1, 2], ids=["one-pool", "two-pools"])
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, pools=request.param
    ) as c:
        yield c


def restamps() -> float:
    """kvtier_gateway_version_restamps_total, as Prometheus would scrape it."""
    return float(commits.RESTAMPS._value.get())


async def test_writes_through_a_lagging_gateway_are_ordered_after_acknowledged_ones(
    cluster: Cluster,
) -> None:
    """Every kind of write (small, empty, staged, copy, multipart Complete) and DELETE through
    the gateway 10 min behind, after a write through the one 10 min ahead, is what reads see."""
    ahead, behind = clock(+10), clock(-10)
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("skew")
        sizes = {"small": 4 * KIB, "empty": 0, "staged": 5 * MIB + 5}
        for n, (name, size) in enumerate(sizes.items()):
            first, second = objects_cluster.data(n, size), objects_cluster.data(n + 100, size)
            engine.clock = ahead
            older = await client.put_object("skew", name, first)
            engine.clock = behind
            newer = await client.put_object("skew", name, second)
            assert await client.get_object("skew", name) == second, name
            assert newer.mtime_unix_ms >= older.mtime_unix_ms, name
            head = await client.head_object("skew", name)
            assert head.etag == newer.etag, name

        # A server-side copy and a multipart Complete through the lagging gateway.
        engine.clock = ahead
        await client.put_object("skew", "copied", b"old copy")
        engine.clock = behind
        await client.copy_object("skew", "small", "skew", "copied")
        assert await client.get_object("skew", "copied") == objects_cluster.data(100, 4 * KIB)
        part1, part2 = objects_cluster.data(7, 5 * MIB), objects_cluster.data(8, 3 * KIB)
        engine.clock = ahead
        await client.put_object("skew", "mpu", b"old mpu")
        engine.clock = behind
        upload = await client.create_multipart_upload("skew", "mpu")
        infos = [
            await client.upload_part("skew", "mpu", upload, i, p)
            for i, p in enumerate((part1, part2), 1)
        ]
        await client.complete_multipart_upload("skew", "mpu", upload, infos)
        assert await client.get_object("skew", "mpu") == part1 + part2

        # DELETE through the lagging gateway removes what the other wrote; writes go on.
        engine.clock = ahead
        await client.put_object("skew", "deleted", b"written ahead")
        engine.clock = behind
        await client.delete_object("skew", "deleted")
        with pytest.raises(errors.NotFound):
            await client.get_object("skew", "deleted")
        await client.put_object("skew", "deleted", b"written behind")
        engine.clock = ahead
        await client.put_object("skew", "deleted", b"ahead again")
        engine.clock = behind
        await client.put_object("skew", "deleted", b"behind again")
        assert await client.get_object("skew", "deleted") == b"behind again"
        listed = {o.key: o.size for o in (await client.list_objects("skew")).objects}
        assert listed["deleted"] == len(b"behind again")
        assert listed["staged"] == sizes["staged"]


async def test_a_staged_write_learns_the_stamp_before_its_commit(cluster: Cluster) -> None:
    """No extra round trip on the large-PUT path: its first WRITE_SHARD reply carries the
    drives' stamp, so the commit is stamped above it at once (a small write, which has one call,
    is stamped again once). A fresh lagging clock each time: nothing learned before."""
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("learn")
        engine.clock = clock(+10)
        await client.put_object("learn", "big", objects_cluster.data(1, 5 * MIB))
        await client.put_object("learn", "tiny", b"ahead")
        before = restamps()
        engine.clock = clock(-10)
        await client.put_object("learn", "big", objects_cluster.data(2, 5 * MIB))
        assert restamps() == before
        assert await client.get_object("learn", "big") == objects_cluster.data(2, 5 * MIB)
        engine.clock = clock(-10)
        await client.put_object("learn", "tiny", b"behind")
        # With several pools a PUT first looks up pool 0's current version: learned there.
        assert restamps() == before + (1 if len(engine.view.current.pools) == 1 else 0)
        assert await client.get_object("learn", "tiny") == b"behind"


async def test_a_stamp_beyond_the_datanodes_bound_is_refused_typed(cluster: Cluster) -> None:
    """A gateway 40 min ahead (past the datanodes' 30 min bound): every write fails with
    ClockSkew (503 to S3 clients), and nothing is stored in place of the current version."""
    engine = cluster.engine
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("bound")
        await client.put_object("bound", "small", b"kept")
        await client.put_object("bound", "large", objects_cluster.data(3, 2 * MIB))
        engine.clock = clock(+40)
        for key, body in (("small", b"refused"), ("large", objects_cluster.data(4, 2 * MIB))):
            with pytest.raises(errors.ClockSkew, match="ahead of this datanode's clock"):
                await asyncio.wait_for(client.put_object("bound", key, body), 60)
        engine.clock = clock(0)
        assert await client.get_object("bound", "small") == b"kept"
        assert await client.get_object("bound", "large") == objects_cluster.data(3, 2 * MIB)
