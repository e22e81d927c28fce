"""KV settings (tenant quotas, namespace TTLs and durability) are kept in etcd: set through one
kvcache node, every node applies them, a restarted node gets them back, and a refused setting
stores nothing (issue 16: before, they lived in one node's memory and a restart dropped them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from kvtier import errors, etcdserver, kv, kvsettings, membership
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from tests.component.test_kvcache import KIB, MIB, _block, _client, _nodes


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.1)


async def _stored(store: membership.EtcdMembership) -> list[kvsettings.Setting]:
    return await kvsettings.KVSettingsStore(store).load()


async def test_a_quota_set_on_one_node_holds_on_every_node_and_after_a_restart(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [f"q{i}".encode() for i in range(8)]
    blocks = [_block(i, 256 * KIB) for i in range(8)]

    async def capped_on(node_address: str, attempt: int) -> bool:
        """Whether the node refuses a 5th 256 KiB block of tenant capped (quota 1 MiB)."""
        async with await kv.AsyncKVClient.connect(
            nodes=[node_address], tenant="capped", namespace=f"try-{attempt}", transports=["tcp"]
        ) as client:
            got = await client.put_batch(keys, blocks)
            await client.delete(keys)
            return got == [kv.PutStatus.STORED] * 4 + [kv.PutStatus.QUOTA_EXCEEDED] * 4

    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        async with kvcache_client.KVCacheClient(nodes[0].address) as admin:
            await admin.set_quota("capped", 1 * MIB)
        assert await _stored(store) == [pb.SetQuotaRequest(tenant="capped", quota_bytes=MIB)]
        attempts = iter(range(1000))

        def check(address: str) -> Callable[[], Awaitable[bool]]:
            return lambda: capped_on(address, next(attempts))

        for node in nodes:  # the other node applies it from its watch
            await _until(check(node.address))
    async with _nodes(1, etcd, etcd_prefix, store, tmp_path) as again:  # a restart
        await _until(check(again[0].address))


async def test_a_namespace_ttl_survives_a_restart_and_bad_settings_store_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        admin = kvcache_client.KVCacheClient(nodes[0].address)
        async with admin:
            for bad in (-1.0, float("inf"), float("nan")):
                with pytest.raises(errors.InvalidArgument):
                    await admin.set_namespace_ttl("team-a", "short", bad)
            with pytest.raises(errors.InvalidArgument):
                await admin.set_namespace_ttl("no tenant!", "short", 1.0)
            assert await _stored(store) == []  # refused: nothing stored
            await admin.set_namespace_ttl("team-a", "short", 1.0)
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path) as again,
        await _client(again, tenant="team-a", namespace="short", transports=["tcp"]) as client,
    ):

        async def expires() -> bool:
            block = _block(7, 64 * KIB)
            await client.put_batch([b"k"], [block], overwrite=True)
            out = np.zeros(64 * KIB, np.uint8)
            if await client.get_batch([b"k"], [out]) != [64 * KIB]:
                return False
            await asyncio.sleep(1.5)
            return await client.get_batch([b"k"], [out]) == [None]

        await _until(expires, timeout_s=20)  # the restarted node applies the stored TTL


async def test_a_wrong_metadata_address_is_named_as_such(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """Issue 17: `KVClient.connect(metadata=<another service>)` said `Internal: Method not
    found!`; it now says the address serves no such API (`metadata` may list several
    endpoints, metadata nodes or gateways: kvtier.kv_mapsource names each that failed)."""
    async with _nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        with pytest.raises(errors.Unavailable) as caught:
            await kv.AsyncKVClient.connect(metadata=nodes[0].address, tenant="t", namespace="n")
        assert (
            f"{nodes[0].address}: serves neither the metadata nor the gateway API"
            in caught.value.message
        )


async def test_list_settings_returns_what_the_cluster_keeps(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """ListSettings (the console's KV settings page) reads the store, so a node that never
    served the SetX calls lists them too."""
    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        async with kvcache_client.KVCacheClient(nodes[0].address) as first:
            assert (await first.list_settings()).quotas == []
            await first.set_quota("team-a", 8 * MIB)
            await first.set_namespace_ttl("team-a", "ns\x00bin", 30.0)
            await first.set_namespace_policy("team-b", "m", pb.DURABILITY_NONE)
        async with kvcache_client.KVCacheClient(nodes[1].address) as other:
            listed = await other.list_settings()
    assert listed.persisted
    assert list(listed.quotas) == [pb.SetQuotaRequest(tenant="team-a", quota_bytes=8 * MIB)]
    ns = pb.Namespace(tenant="team-a", name="ns\x00bin")
    assert list(listed.ttls) == [pb.SetNamespaceTTLRequest(namespace=ns, ttl_s=30.0)]
    (policy,) = listed.policies
    assert (policy.namespace.tenant, policy.namespace.name) == ("team-b", "m")
