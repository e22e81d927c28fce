"""Regression (issue 13): the descriptor reuse attack on a kvcache node, over real tcp.

Tenant A obtains a descriptor through the gRPC block API (BatchPut or BatchGet), ends its put
(abort) or read (ReleaseReads) and waits until its extent holds tenant B's block; then it reads
or writes that extent with the descriptor it kept. Before grants were revocable this read B's
bytes or overwrote them. Now the node revokes the grant when the put or read ends, so the
transport refuses the descriptor (DescriptorRejected) and B's bytes are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvtier import etcdserver, membership
from kvtier.clients import dataplane as dataplane_client
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from tests.component import harness

BLOCK = 64 * 1024


def _digest(data: object) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()  # type: ignore[arg-type]


@dataclass
class _Tenant:
    """One tenant's view of the node: its gRPC block API and its tcp data-plane session."""

    ns: pb.Namespace
    grpc: kvcache_client.KVCacheClient
    session: dataplane_client.DataPlaneSession

    async def grant_put(self, key: bytes) -> tuple[int, base.Descriptor]:
        reply = await self.grpc.batch_put(
            pb.BatchPutRequest(
                namespace=self.ns, keys=[key], sizes=[BLOCK], principal=self.session.principal
            )
        )
        assert reply.items[0].status == pb.ITEM_STATUS_OK, reply
        return reply.items[0].put_id, base.Descriptor.from_proto(reply.items[0].descriptor)

    async def put(self, key: bytes, data: bytes) -> base.Descriptor:
        put_id, desc = await self.grant_put(key)
        await self.session.transport.write(desc, data)
        done = await self.grpc.commit_puts(
            pb.CommitPutsRequest(namespace=self.ns, put_ids=[put_id])
        )
        assert list(done.statuses) == [pb.ITEM_STATUS_OK]
        return desc

    async def grant_read(self, key: bytes) -> tuple[int, base.Descriptor]:
        reply = await self.grpc.batch_get(
            pb.BatchGetRequest(namespace=self.ns, keys=[key], principal=self.session.principal)
        )
        assert reply.items[0].status == pb.ITEM_STATUS_OK, reply
        return reply.items[0].lease_id, base.Descriptor.from_proto(reply.items[0].descriptor)

    async def read(self, key: bytes) -> bytes:
        lease_id, desc = await self.grant_read(key)
        out = bytearray(desc.length)
        await self.session.transport.read(desc, out)
        await self.grpc.release_reads(
            pb.ReleaseReadsRequest(namespace=self.ns, lease_ids=[lease_id])
        )
        return bytes(out)


@contextlib.asynccontextmanager
async def _node_and_tenants(
    etcd: etcdserver.EtcdServer, prefix: str, store: membership.EtcdMembership, tmp: Path
) -> AsyncIterator[tuple[_Tenant, _Tenant]]:
    async with (
        harness.run(
            kvcache_config.KVCacheConfig,
            "kvcache",
            kvcache_main.build,
            store,
            etcd_endpoints=(etcd.endpoint,),
            etcd_prefix=prefix,
            data_dir=str(tmp / "kv"),
            arena_bytes=64 * 1024 * 1024,
            dataplane_transports=("tcp",),
        ) as node,  # fmt: skip
        kvcache_client.KVCacheClient(node.address) as grpc_client,
        dataplane_client.DataPlaneClient(node.address) as planes,
    ):
        tenants = []
        for name in ("tenant-a", "tenant-b"):
            session = await planes.open(f"{name}-client", ["tcp"], tenant=name)
            tenants.append(_Tenant(pb.Namespace(tenant=name, name="m"), grpc_client, session))
        try:
            yield tenants[0], tenants[1]
        finally:
            for tenant in tenants:
                await tenant.session.close()


async def test_a_write_descriptor_of_an_aborted_put_cannot_reach_the_next_block(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with _node_and_tenants(etcd, etcd_prefix, store, tmp_path) as (a, b):
        put_id, kept = await a.grant_put(b"a-key")
        aborted = await a.grpc.commit_puts(
            pb.CommitPutsRequest(namespace=a.ns, put_ids=[put_id], abort=True)
        )
        assert list(aborted.statuses) == [pb.ITEM_STATUS_OK]
        victim = np.random.default_rng(1).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
        placed = await b.put(b"b-key", victim)
        assert (placed.region_id, placed.offset) == (kept.region_id, kept.offset)  # reused
        with pytest.raises(base.DescriptorRejected, match="revoked"):
            await a.session.transport.write(kept, b"\xee" * BLOCK)
        assert _digest(await b.read(b"b-key")) == _digest(victim)


async def test_a_read_descriptor_of_a_released_read_cannot_reach_the_next_block(
    etcd: etcdserver.EtcdServer, etcd_prefix: str, store: membership.EtcdMembership, tmp_path: Path
) -> None:
    async with _node_and_tenants(etcd, etcd_prefix, store, tmp_path) as (a, b):
        await a.put(b"a-key", b"\x01" * BLOCK)
        lease_id, kept = await a.grant_read(b"a-key")
        await a.grpc.release_reads(pb.ReleaseReadsRequest(namespace=a.ns, lease_ids=[lease_id]))
        deleted = await a.grpc.delete(pb.DeleteRequest(namespace=a.ns, keys=[b"a-key"]))
        assert deleted.deleted == 1
        secret = np.random.default_rng(2).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
        placed = await b.put(b"b-key", secret)
        assert (placed.region_id, placed.offset) == (kept.region_id, kept.offset)  # reused
        stolen = bytearray(BLOCK)
        with pytest.raises(base.DescriptorRejected, match="revoked"):
            await a.session.transport.read(kept, stolen)
        assert stolen == bytes(BLOCK)
        assert _digest(await b.read(b"b-key")) == _digest(secret)
