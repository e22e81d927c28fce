"""Small objects on the erasure-coded tier (issue 14): one data-plane call per datanode (for all
its drives of the set) to PUT (WRITE_SMALL: the shards and their commit), one to GET or HEAD
(READ_METAS: the shards come inline), degraded reads from the inline shards, a drive's failure
confined to that drive, and WRITE_SMALL authorized like every shard call."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import gateway as gateway_client
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.datanode import __main__ as datanode_main
from services.datanode import config as datanode_config
from services.gateway import datanodes as datanodes_mod
from tests import pki as test_pki
from tests.component import harness, objects_cluster

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
M = shards_pb2.ShardCallMethod


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    # Shards up to 512 KiB go small (the default stays 128 KiB for one release: rollback).
    async with objects_cluster.object_cluster(
        etcd, etcd_prefix, store, tmp_path, small_write_max_bytes=512 * KIB
    ) as c:
        yield c


class Calls:
    """The data-plane calls and gRPC shard calls the gateway makes to datanodes (counted on
    the way out of the real `Datanodes`, which still makes them)."""

    def __init__(self, nodes: datanodes_mod.Datanodes, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: collections.Counter[str] = collections.Counter()
        real_call, real_shards = nodes.call, nodes.shards

        async def call(node_id: str, method: int, *args: Any, **kwargs: Any) -> Any:
            self.made[M.Name(shards_pb2.ShardCallMethod.ValueType(method))] += 1
            return await real_call(node_id, method, *args, **kwargs)

        def shards(node_id: str) -> Any:
            self.made["grpc"] += 1
            return real_shards(node_id)

        monkeypatch.setattr(nodes, "call", call)
        monkeypatch.setattr(nodes, "shards", shards)

    def take(self) -> dict[str, int]:
        made, self.made = dict(self.made), collections.Counter()
        return made


@pytest.fixture
def calls(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(cluster.engine._nodes, monkeypatch)


def metas(cluster: Cluster, bucket: str) -> list[Path]:
    return sorted(cluster.tmp.glob(f"dn*/drive*/objects/{cluster.stored(bucket)}/*/*/meta"))


async def test_a_small_put_is_one_call_per_drive_and_a_get_one_meta_read(
    cluster: Cluster, calls: Calls
) -> None:
    data = objects_cluster.data(1, 4 * KIB)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("small")
        calls.take()
        io = "kvtier_datanode_io_seconds_count"
        before = prometheus_client.REGISTRY.get_sample_value(io, {"op": "write_smalls"}) or 0
        info = await client.put_object("small", "k", data)
        assert info.etag == hashlib.md5(data).hexdigest()
        assert calls.take() == {"SHARD_CALL_METHOD_WRITE_SMALL": 6}
        # The datanodes' disk work is timed (one job per call: 6).
        after = prometheus_client.REGISTRY.get_sample_value(io, {"op": "write_smalls"})
        assert after == before + 6
        into = bytearray(len(data))  # get_object would HEAD first: a request of its own
        await client.get_object_into("small", "k", into)
        assert into == data
        assert calls.take() == {"SHARD_CALL_METHOD_READ_METAS": 6}
        head = await client.head_object("small", "k")
        assert head.etag == info.etag
        assert calls.take() == {"SHARD_CALL_METHOD_READ_METAS": 6}
        assert await client.get_object("small", "k", offset=1000, length=2000) == data[1000:3000]
        assert calls.take() == {"SHARD_CALL_METHOD_READ_METAS": 6}
        # Inline on every drive: a meta file, no data directory, no staging left behind.
        found = metas(cluster, "small")
        assert len(found) == 12
        assert all([p.name for p in f.parent.iterdir()] == ["meta"] for f in found)
        assert not any(cluster.tmp.glob("dn*/drive*/.kvtier/tmp/*"))
        # Overwrites, an empty object and the largest small one (512 KiB shards: the datanodes
        # advertise datanode.small-writes-512k); one past it is staged.
        for size in (0, 1, 8 * 512 * KIB):
            body = objects_cluster.data(size, size)
            await client.put_object("small", "k", body)
            assert calls.take() == {"SHARD_CALL_METHOD_WRITE_SMALL": 6}, size
            assert await client.get_object("small", "k") == body
            calls.take()
        body = objects_cluster.data(2, 8 * 512 * KIB + 1)
        await client.put_object("small", "big", body)
        staged = calls.take()
        assert "SHARD_CALL_METHOD_WRITE_SMALL" not in staged
        assert staged["SHARD_CALL_METHOD_WRITE_SHARD"] == 12
        assert await client.get_object("small", "big") == body
        await client.delete_object("small", "k")
        with pytest.raises(errors.NotFound):
            await client.head_object("small", "k")


async def test_a_2_mib_object_is_small_and_its_lost_shard_is_healed(
    cluster: Cluster, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 MiB object (256 KiB shards on 8+4) takes the small path: inline on every drive, read
    whole and by range (its blocks from the data drives), its HEAD without the shards; a set
    with an older datanode stages it; a drive that lost it gets it back from healing (in shard
    files there), and reads then use both kinds and parity blocks."""
    data = objects_cluster.data(7, 2 * MIB)
    nodes = cluster.engine._nodes
    asked: list[Any] = []
    real_read_metas = nodes.read_metas

    async def read_metas(*args: Any, data: Any = True) -> Any:
        asked.append(data)
        return await real_read_metas(*args, data=data)

    monkeypatch.setattr(nodes, "read_metas", read_metas)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("two")
        calls.take()
        await client.put_object("two", "k", data)
        assert calls.take() == {"SHARD_CALL_METHOD_WRITE_SMALL": 6}
        found = metas(cluster, "two")
        assert all([p.name for p in f.parent.iterdir()] == ["meta"] for f in found)
        assert min(f.stat().st_size for f in found) > 256 * KIB
        asked.clear()
        into = bytearray(len(data))
        await client.get_object_into("two", "k", into)
        assert into == data
        # Shards over 128 KiB are read as blocks (READ_SHARD: through staging memory), not in
        # the meta replies; those up to 128 KiB come from the data shards' drives only.
        assert calls.take() == {
            "SHARD_CALL_METHOD_READ_METAS": 6,
            "SHARD_CALL_METHOD_READ_SHARD": 8,
        }
        assert sum(len(d) for d in asked) == 8
        ranged = await client.get_object("two", "k", offset=MIB - 5, length=300 * KIB)
        assert ranged == data[MIB - 5 : MIB - 5 + 300 * KIB]
        asked.clear()
        calls.take()
        await client.head_object("two", "k")
        assert calls.take() == {"SHARD_CALL_METHOD_READ_METAS": 6}
        assert asked == [False] * 6  # the drives leave the shards out
        # A set with a datanode that does not advertise datanode.small-writes-512k (an older
        # build refuses shards over 128 KiB) stages a 2 MiB object; 1 MiB still goes small.
        older, real = cluster.datanodes[0].spec.node_id, nodes.supports
        monkeypatch.setattr(nodes, "supports", lambda n, f: n != older and real(n, f))
        calls.take()
        await client.put_object("two", "staged", data)
        staged = calls.take()
        assert "SHARD_CALL_METHOD_WRITE_SMALL" not in staged
        assert staged["SHARD_CALL_METHOD_WRITE_SHARD"] == 12
        await client.put_object("two", "one", data[:MIB])
        assert calls.take() == {"SHARD_CALL_METHOD_WRITE_SMALL": 6}
        assert await client.get_object("two", "staged") == data
        found[0].unlink()  # a drive lost its shard
        progress, lost = await _heal(cluster, "two")
        assert not lost
        assert progress.healed == 1
        healed = sorted(p.name for p in found[0].parent.iterdir())
        assert len(healed) == 2  # its shard in files there
        assert "meta" in healed
        for f in found[1:5]:  # 4 others lose theirs: a read needs the healed drive's shard
            f.unlink()
        assert await client.get_object("two", "k") == data


async def _heal(cluster: Cluster, bucket: str) -> tuple[admin_pb2.HealProgress, list[str]]:
    """The last progress message of a Heal of bucket, and every unrecoverable key reported."""
    async with gateway_client.AdminServiceClient(cluster.gateway.address) as client:
        messages = [p async for p in client.heal(bucket, "", dry_run=False)]
    return messages[-1], [k for m in messages for k in m.unrecoverable_keys]


async def test_a_small_get_survives_m_bad_drives(cluster: Cluster) -> None:
    data = objects_cluster.data(3, 10 * KIB + 3)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("degraded")
        await client.put_object("degraded", "k", data)
        found = metas(cluster, "degraded")
        # Two metas flipped (their checksum fails), two removed: 8 of 12 left, k = 8.
        for path in found[:2]:
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        for path in found[2:4]:
            path.unlink()
        assert await client.get_object("degraded", "k") == data
        assert await client.get_object("degraded", "k", offset=5, length=9000) == data[5:9005]
        found[4].unlink()
        with pytest.raises(errors.Unavailable):
            await client.get_object("degraded", "k")


async def test_concurrent_small_puts_of_one_key_converge(cluster: Cluster) -> None:
    bodies = [objects_cluster.data(10 + i, 4 * KIB) for i in range(8)]
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("race")
        await asyncio.gather(*(client.put_object("race", "k", b) for b in bodies))
        got = await client.get_object("race", "k")
        assert got in bodies
        versions = {
            datanode_pb2.ShardMeta.FromString(p.read_bytes()[:-8]).data_id
            for p in metas(cluster, "race")
        }
        assert len(versions) == 1  # every drive holds the same, newest version


async def test_write_small_is_for_gateways_only(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    """Like WRITE_SHARD: only a gateway (or an operator) opens a data-plane session to a
    datanode; other services are refused before any call. A gateway's forged version from the
    future is refused by its drive, and only there: the call's other drive commits."""
    async with harness.run(
        datanode_config.DatanodeConfig, "datanode", datanode_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "dn"),
    ) as dn:  # fmt: skip
        drives = [d.drive_id for d in dn.info.drives]
        assert len(drives) == 2
        shard = b"x" * 512
        request = shards_pb2.WriteSmallRequest()
        for drive, mtime in zip(drives, (time.time_ns() + 10**18, time.time_ns()), strict=True):
            meta = datanode_pb2.ShardMeta(
                bucket="victim", key="k", data_shards=1, data_id="d" * 32, mtime_unix_ns=mtime
            )
            meta.parts.add(number=1, size=512, shard_bytes=512)
            request.shards.add(drive_id=drive, meta=meta)
        payload = request.SerializeToString()
        session = test_pki.session()
        for role in ("kvcache", "metadata"):
            plane = dataplane_client.DataPlaneClient(dn.address, security=session.client(role))
            async with plane:
                with pytest.raises(errors.PermissionDenied):
                    await plane.open(f"probe-{role}")
        plane = dataplane_client.DataPlaneClient(dn.address, security=session.client("gateway"))
        async with plane:
            opened = await plane.open("gateway-test")
            try:
                result = await opened.transport.call(
                    M.SHARD_CALL_METHOD_WRITE_SMALL, payload, [shard, shard]
                )
                with pytest.raises(errors.InvalidArgument):
                    await opened.transport.call(M.SHARD_CALL_METHOD_WRITE_SMALL, payload, [shard])
            finally:
                await opened.close()
        forged, honest = shards_pb2.WriteSmallResponse.FromString(result.reply).results
        assert forged.error_kind == "ClockSkew"  # past the datanodes' 30 min bound
        assert "ahead of this datanode's clock" in forged.error
        assert not honest.error_kind
        written = await asyncio.to_thread(lambda: sorted(tmp_path.glob("dn/drive*/objects/*")))
        assert [p.parent.parent.name for p in written] == ["drive1"]
