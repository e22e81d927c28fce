"""Graceful drain and client retries (issue 16, docs/upgrades.md), in one process.

A kvcache node that stops leaves the map first: the KV SDK puts the keys it owned on the node
that owns them now (put-if-absent is safe to repeat) instead of reporting them unavailable.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from kvtier import etcdserver, kv, membership
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness

KIB = 1024


def _block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, 16 * KIB, dtype=np.uint8)


async def test_puts_move_to_the_node_that_stays_when_one_drains(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """The client's map still names the stopped node (no refresh for an hour): its first
    attempt fails, a refreshed map places the keys on the remaining node, where they are
    stored; every key STORED and read back byte-exact (before: about half UNAVAILABLE)."""
    common = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}

    def kvcache_node(name: str) -> contextlib.AbstractAsyncContextManager[harness.Running]:
        return harness.run(
            kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
            data_dir=str(tmp_path / name), **common,
        )  # fmt: skip

    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **common
        ) as meta,
        kvcache_node("stays") as stays,
    ):
        leaving_cm = kvcache_node("leaves")
        leaving = await leaving_cm.__aenter__()
        stopped = False
        try:
            await harness.wait_map(store, lambda m: len(m.nodes) == 3)
            client = await kv.AsyncKVClient.connect(
                metadata=meta.address, namespace="drain", transports=["tcp"], refresh_s=3600
            )
            try:
                warm = [f"w{i}".encode() for i in range(20)]  # sessions to both nodes
                assert await client.put_batch(warm, [_block(i) for i in range(20)]) == [
                    kv.PutStatus.STORED
                ] * len(warm)
                await leaving_cm.__aexit__(None, None, None)  # SIGTERM's path: the drain
                stopped = True
                keys = [f"k{i}".encode() for i in range(60)]
                assert any(leaving.spec.node_id in client.owners(k) for k in keys)
                blocks = [_block(100 + i) for i in range(len(keys))]
                statuses = await client.put_batch(keys, blocks)
                assert statuses == [kv.PutStatus.STORED] * len(keys)
                assert client.node_ids == [stays.spec.node_id]
                outs = [np.zeros(16 * KIB, np.uint8) for _ in keys]
                assert await client.get_batch(keys, outs) == [16 * KIB] * len(keys)
                assert [hashlib.sha256(o.tobytes()).digest() for o in outs] == [
                    hashlib.sha256(b.tobytes()).digest() for b in blocks
                ]
            finally:
                await client.close()
        finally:
            if not stopped:
                await leaving_cm.__aexit__(None, None, None)
