"""WRITE_SMALL with its shards inline (issue 14): a call of a few KiB carries the shards in its
request (SmallShard.data) and no segments, so over shm it is one round trip instead of two (the
node hands out no staging slot); larger calls keep the segments. Both forms land the same bytes,
and a call that mixes them or whose data does not match its shard_bytes is refused whole."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, membership, objects
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.datanode import __main__ as datanode_main
from services.datanode import config as datanode_config
from services.datanode import framing
from services.gateway import datanodes as datanodes_mod
from tests import pki as test_pki
from tests.component import harness, objects_cluster

KIB = objects_cluster.KIB
M = shards_pb2.ShardCallMethod


def small_request(drives: Sequence[str], key: str, shard: bytes, *, inline: bool) -> bytes:
    request = shards_pb2.WriteSmallRequest()
    for index, drive in enumerate(drives):
        meta = datanode_pb2.ShardMeta(
            bucket="inline", key=key, size=len(shard) * 2, data_shards=2, parity_shards=0,
            shard_index=index, data_id=os.urandom(16).hex(), mtime_unix_ns=time.time_ns(),
        )  # fmt: skip
        meta.parts.add(number=1, size=len(shard) * 2, shard_bytes=len(shard))
        request.shards.add(drive_id=drive, meta=meta, data=shard if inline else b"")
    return request.SerializeToString()


def unframed(meta: datanode_pb2.ShardMeta) -> bytes:
    """A small meta's inline shard without its block checksums."""
    size, frames, out = meta.block_bytes, meta.inline_data, bytearray()
    at = 0
    while at < len(frames):
        block = frames[at : at + min(size, len(frames) - at - framing.HASH_BYTES)]
        out += block
        at += len(block) + framing.HASH_BYTES
    return bytes(out)


@pytest.mark.parametrize("transport_name", ["shm", "tcp"])
async def test_an_inline_write_small_is_one_round_trip_and_lands_exact(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    transport_name: str,
) -> None:
    async with harness.run(
        datanode_config.DatanodeConfig, "datanode", datanode_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "dn"),
    ) as dn:  # fmt: skip
        drives = [d.drive_id for d in dn.info.drives]
        session = test_pki.session()
        plane = dataplane_client.DataPlaneClient(dn.address, security=session.client("gateway"))
        async with plane:
            opened = await plane.open("gateway-test", allowed=[transport_name])
            transport: Any = opened.transport
            try:
                assert transport.name == transport_name
                sent = collections.Counter[str]()
                if transport_name == "shm":  # the transport where segments take two trips
                    real_send = transport._channel.send

                    def send(data: Any, fds: Sequence[int] = ()) -> None:
                        sent["messages"] += 1
                        real_send(data, fds)

                    transport._channel.send = send
                shard = os.urandom(3000)
                inline = small_request(drives, "a", shard, inline=True)
                result = await transport.call(M.SHARD_CALL_METHOD_WRITE_SMALL, inline)
                if transport_name == "shm":
                    assert sent["messages"] == 1  # CALL, then the reply: no CALL_DONE
                answer = shards_pb2.WriteSmallResponse.FromString(result.reply).results
                assert [r.error_kind for r in answer] == ["", ""]
                sent.clear()
                segmented = small_request(drives, "b", shard, inline=False)
                await transport.call(M.SHARD_CALL_METHOD_WRITE_SMALL, segmented, [shard, shard])
                if transport_name == "shm":
                    assert sent["messages"] == 2  # the segments' form: CALL, CALL_DONE
                short = shards_pb2.WriteSmallRequest.FromString(
                    small_request(drives, "c", shard, inline=True)
                )
                short.shards[1].data = shard[:-1]  # one byte short of its shard_bytes
                for bad, segments in (
                    (inline, [shard, shard]),  # data and segments both
                    (short.SerializeToString(), []),
                    (small_request(drives, "c", shard, inline=False), []),  # no bytes at all
                ):
                    with pytest.raises(errors.InvalidArgument):
                        await transport.call(M.SHARD_CALL_METHOD_WRITE_SMALL, bad, segments)
                for key in ("a", "b"):
                    read = shards_pb2.ReadMetasRequest(drive_ids=drives, bucket="inline", key=key)
                    got = await transport.call(
                        M.SHARD_CALL_METHOD_READ_METAS, read.SerializeToString()
                    )
                    metas = shards_pb2.ReadMetasResponse.FromString(got.reply).metas
                    assert [unframed(m.meta) for m in metas] == [shard, shard], key
                absent = shards_pb2.ReadMetasRequest(drive_ids=drives, bucket="inline", key="c")
                got = await transport.call(
                    M.SHARD_CALL_METHOD_READ_METAS, absent.SerializeToString()
                )
                metas = shards_pb2.ReadMetasResponse.FromString(got.reply).metas
                assert [m.result.error_kind for m in metas] == ["NotFound", "NotFound"]
            finally:
                await opened.close()


@pytest.fixture
async def cluster(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[objects_cluster.Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


async def test_small_puts_send_their_shards_inline_up_to_the_limit(
    cluster: objects_cluster.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = cluster.engine._nodes
    segments_sent: list[int] = []
    real_call = nodes.call

    async def call(node_id: str, method: int, request: Any, segments: Any = (), **kw: Any) -> Any:
        if method == M.SHARD_CALL_METHOD_WRITE_SMALL:
            segments_sent.append(len(segments))
        return await real_call(node_id, method, request, segments, **kw)

    monkeypatch.setattr(nodes, "call", call)
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("inline")
        # 8 data shards, 2 drives a node: a node's call carries size / 4 shard bytes.
        limit = datanodes_mod.INLINE_CALL_BYTES
        for size, inline in ((4 * KIB, True), (4 * limit, True), (4 * limit + 8, False)):
            body = objects_cluster.data(size, size)
            await client.put_object("inline", f"k{size}", body)
            assert len(segments_sent) == 6, size
            assert all((n == 0) == inline for n in segments_sent), (size, segments_sent)
            segments_sent.clear()
            assert await client.get_object("inline", f"k{size}") == body
