"""KV events and Score across both tiers: a kvcache node over the durable object tier (the
object tier's component cluster in this process), its events decoded with vLLM's classes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import etcdserver, kv, membership
from kvtier.proto.common.v1 import common_pb2
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import events
from tests.component import harness, objects_cluster
from tests.component.test_kv_events import Subscriber, _vllm_events

pytestmark = pytest.mark.timeout(240)
KIB, MIB = 1024, 1024 * 1024
BLOCK = 128 * KIB
SETTINGS = {
    "arena_bytes": 8 * MIB,
    "page_bytes": 1 * MIB,
    "spill_buffer_bytes": 8 * MIB,
    "kv_events": True,
    "durable_namespaces": "team-a/wb=write_back",
}


@pytest.fixture
async def objects_tier(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[objects_cluster.Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


def _hash(key: bytes) -> bytes:
    return hashlib.sha256(b"engine:" + key).digest()


async def _put_chain(client: kv.AsyncKVClient, keys: list[bytes]) -> None:
    """Put keys with their engine hashes, backing off while the spill buffer is full."""
    todo = list(range(len(keys)))
    while todo:
        chunk, todo = todo[:16], todo[16:]
        names = [keys[i] for i in chunk]
        statuses = await client.put_batch(
            names, [np.full(BLOCK, i % 251, np.uint8) for i in chunk],
            engine_hashes=[_hash(k) for k in names],
        )  # fmt: skip
        again = [i for i, s in zip(chunk, statuses, strict=True) if s is kv.PutStatus.NO_SPACE]
        assert all(s in (kv.PutStatus.STORED, kv.PutStatus.NO_SPACE) for s in statuses)
        if again:
            todo = again + todo
            await asyncio.sleep(0.02)  # back off: the uploads free the buffer


async def _drained(client: kv.AsyncKVClient) -> None:
    for _ in range(600):
        if not any(s.spill_queue_bytes for s in (await client.stats()).values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("spills still queued after 30 s")


def _history(decoded: list[tuple[bytes, Any]], vllm: Any) -> dict[bytes, list[tuple[str, str]]]:
    """Block hash -> (kind, medium) of its events, in order."""
    found: dict[bytes, list[tuple[str, str]]] = {}
    for _, event in decoded:
        if isinstance(event, vllm.AllBlocksCleared):
            continue
        kind = "stored" if isinstance(event, vllm.BlockStored) else "removed"
        for block_hash in event.block_hashes:
            found.setdefault(block_hash, []).append((kind, event.medium))
    return found


async def test_spills_and_read_backs_are_announced_per_medium_and_scored_per_tier(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    vllm = _vllm_events()
    dram, durable = events.MEDIUM_DRAM, events.MEDIUM_DURABLE
    async with harness.run(
        kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix, data_dir=str(tmp_path / "kv"),
        **SETTINGS,
    ) as node:  # fmt: skip
        await node.ctx.map_view.wait_for(
            lambda m: any(n.role == common_pb2.NODE_ROLE_GATEWAY for n in m.nodes), timeout_s=10
        )
        sub = await Subscriber.open(node)
        client = await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="wb", tenant="team-a", transports=["tcp"]
        )
        try:
            keys = [b"wb-%d" % i for i in range(128)]  # twice the arena
            await _put_chain(client, keys)
            await _drained(client)
            score = await client.score(keys)
            outs = [np.zeros(BLOCK, np.uint8) for _ in range(2)]
            assert await client.get_batch([keys[0], keys[2]], outs) == [BLOCK] * 2  # read back
            assert await client.delete([keys[2]]) == 1
            history = _history(sub.decode(await sub.replay(0)), vllm)
        finally:
            await client.close()
            await sub.close()
    # The first blocks left DRAM first: the chain is served from the durable tier.
    assert (score.dram, score.durable) == (0, len(keys))
    spilled = [k for k in keys if ("stored", durable) in history[_hash(k)]]
    assert len(spilled) >= len(keys) // 2
    for key in spilled:
        if key in (keys[0], keys[2]):
            continue
        # Left DRAM (evicted) before its durable copy was announced; named by the engine hash.
        assert history[_hash(key)] == [("stored", dram), ("removed", dram), ("stored", durable)]
    assert keys[0] in spilled
    assert keys[2] in spilled
    left = [("stored", dram), ("removed", dram), ("stored", durable)]
    # Read back: in DRAM again, under its engine hash.
    assert history[_hash(keys[0])] == [*left, ("stored", dram)]
    # Read back, then deleted from both tiers.
    assert history[_hash(keys[2])] == [
        *left, ("stored", dram), ("removed", dram), ("removed", durable),
    ]  # fmt: skip
