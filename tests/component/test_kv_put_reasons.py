"""SDK errors that name their cause (issue 17): a refused put says why, on every path (data-plane
call, gRPC with descriptors, the sync client), and nothing is stored for a refused key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, kv, kv_sync, membership
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import store as kvcache_store
from tests.component import harness

LONG_KEY = b"k" * (kvcache_store.MAX_KEY_BYTES + 1)
KEY_REASON = f"key of {len(LONG_KEY)} bytes: keys must be 1..{kvcache_store.MAX_KEY_BYTES} bytes"


@contextlib.asynccontextmanager
async def _node(
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[harness.Running]:
    async with harness.run(
        kvcache_config.KVCacheConfig,
        "kvcache",
        kvcache_main.build,
        store,
        etcd_endpoints=(etcd.endpoint,),
        etcd_prefix=prefix,
        data_dir=str(tmp / "kv"),
        **settings,
    ) as node:
        yield node


@pytest.mark.parametrize("use_calls", [True, False], ids=["call", "grpc"])
async def test_refused_keys_name_their_cause_and_store_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    use_calls: bool,
) -> None:
    async with (
        _node(etcd, etcd_prefix, store, tmp_path) as node,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="reasons", transports=["tcp"], use_calls=use_calls
        ) as client,
    ):
        (before,) = (await client.stats()).values()
        limit = before.max_block_bytes
        too_big = bytearray(limit + 1)
        results = await client.put_batch_results(
            [b"ok-1", LONG_KEY, b"big", b"", b"ok-2"], [b"a", b"x", too_big, b"x", b"b"]
        )
        assert results == [
            kv.PutResult(kv.PutStatus.STORED),
            kv.PutResult(kv.PutStatus.INVALID, KEY_REASON),
            kv.PutResult(
                kv.PutStatus.INVALID,
                f"block of {limit + 1} bytes: block size must be 1..{limit} bytes",
            ),
            kv.PutResult(
                kv.PutStatus.INVALID,
                f"key of 0 bytes: keys must be 1..{kvcache_store.MAX_KEY_BYTES} bytes",
            ),
            kv.PutResult(kv.PutStatus.STORED),
        ]
        # put_batch keeps returning bare statuses (callers compare them with the enum).
        assert await client.put_batch([LONG_KEY], [b"x"]) == [kv.PutStatus.INVALID]
        with pytest.raises(errors.InvalidArgument) as raised:
            await client.put(LONG_KEY, b"x")
        assert raised.value.message == f"put of one block: invalid: {KEY_REASON}"
        with pytest.raises(errors.InvalidArgument) as raised:
            await client.put(b"big", too_big)
        assert raised.value.message == (
            f"put of one block: invalid: block of {limit + 1} bytes: "
            f"block size must be 1..{limit} bytes"
        )
        assert await client.exists_batch([b"ok-1", b"big", b"ok-2"]) == [True, False, True]
        (after,) = (await client.stats()).values()
        assert (after.blocks, after.pending_puts) == (2, 0)


async def test_quota_refusal_names_the_quota(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _node(etcd, etcd_prefix, store, tmp_path, default_tenant_quota_bytes=10_000) as node,
        await kv.AsyncKVClient.connect(nodes=[node.address], namespace="quota") as client,
    ):
        assert await client.put(b"first", bytes(6_000)) is True
        (result,) = await client.put_batch_results([b"second"], [bytes(6_000)])
        assert result == kv.PutResult(
            kv.PutStatus.QUOTA_EXCEEDED, "tenant quota 10000 B: 6000 B held, 6000 B asked"
        )
        with pytest.raises(errors.QuotaExceeded, match=r"^put of one block: quota_exceeded: "):
            await client.put(b"second", bytes(6_000))
        assert await client.exists_batch([b"second"]) == [False]


async def test_sync_client_gives_the_same_reasons(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _node(etcd, etcd_prefix, store, tmp_path) as node:

        def use() -> None:
            with kv_sync.KVClient.connect(nodes=[node.address], namespace="sync") as client:
                assert client.put_batch_results([LONG_KEY, b"fine"], [b"x", b"y"]) == [
                    kv.PutResult(kv.PutStatus.INVALID, KEY_REASON),
                    kv.PutResult(kv.PutStatus.STORED),
                ]
                with pytest.raises(errors.InvalidArgument, match=KEY_REASON):
                    client.put(LONG_KEY, b"x")
                (stats,) = client.stats().values()
                assert stats.blocks == 1

        await asyncio.to_thread(use)
