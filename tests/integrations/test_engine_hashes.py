"""Engine hashes from the SGLang and LMCache plugins (issue 18): what a kvcache node publishes in
its KV events for their puts names blocks by the engine's own hash, not by kvtier's key.

- SGLang HiCache: each page's chained SHA-256 (the hex page key HiCache hands the backend, as
  its 32 bytes), the parent being the previous page of the batch or the last of
  `extra_info.prefix_keys`; every block of a zero-copy page carries its page's hash.
- LMCache: `CacheEngineKey.chunk_hash` as 8 bytes big-endian (LMCache gives a connector no
  parent).

The plugins run as in test_sglang.py / test_lmcache.py (their stand-ins of the engines), against
a real kvcache node with KV events on; an authorized SUB socket (`kvtier.kv_events`, as the
operator) decodes the batches (msgspec, vLLM's shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvtier import etcdserver, kv_events, kv_routing, membership
from services.kvcache import events
from tests.component import harness
from tests.integrations import test_lmcache, test_sglang
from tests.integrations.conftest import kvcache_nodes
from tests.integrations.test_lmcache import engines, lmcache_loop  # noqa: F401  (fixtures)


@dataclasses.dataclass
class ExtraInfo:
    """SGLang's `HiCacheStorageExtraInfo` (what `_page_backup` passes with each batch)."""

    prefix_keys: list[str] | None = None
    extra_info: dict[str, Any] | None = None


@pytest.fixture
def lmcache_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LMCache plugin's classes made against test_lmcache's stand-in bases."""
    plugin, classes = test_lmcache.plugin, vars(test_lmcache.plugin)  # (no LMCache import)
    connector = plugin.connector_class(test_lmcache.RemoteConnector)
    monkeypatch.setitem(classes, "KVTierConnector", connector)
    adapter = plugin.adapter_class(test_lmcache.ConnectorAdapter)
    monkeypatch.setitem(classes, "KVTierConnectorAdapter", adapter)


@contextlib.asynccontextmanager
async def _publishing(
    etcd: etcdserver.EtcdServer, prefix: str, store: membership.EtcdMembership, tmp: Path
) -> AsyncIterator[tuple[harness.Running, zmq.asyncio.Socket]]:
    """One kvcache node with KV events on, and a SUB socket on them (everything)."""
    async with kvcache_nodes(1, etcd, prefix, store, tmp, kv_events=True) as (node,):
        info = node.info
        where = kv_routing.EventEndpoints(
            info.node_id, info.kv_events_endpoint, info.kv_events_replay_endpoint,
            server_key=info.kv_events_server_key, address=node.address,
        )  # fmt: skip
        ctx = zmq.asyncio.Context()
        subscription = await kv_events.subscribe(where, ctx=ctx)
        try:
            await _stored(subscription.sub, 1.0)  # joined: AllBlocksCleared went before
            yield node, subscription.sub
        finally:
            await subscription.close()
            ctx.term()


async def _stored(sub: zmq.asyncio.Socket, wait_s: float = 0.5) -> list[events.BlockStored]:
    """The DRAM BlockStored events that arrive within wait_s (then until 0.2 s of silence)."""
    decoder = msgspec.msgpack.Decoder(type=events.EventBatch)
    got: list[events.BlockStored] = []
    while await sub.poll(wait_s * 1000):
        _, _, payload = await sub.recv_multipart()
        batch = decoder.decode(payload)
        got += [e for e in batch.events if isinstance(e, events.BlockStored) and e.medium == "CPU"]
        wait_s = 0.2
    return got


def _pairs(stored: list[events.BlockStored]) -> set[tuple[Any, Any]]:
    return {(h, e.parent_block_hash) for e in stored for h in e.block_hashes}


@pytest.mark.parametrize("v1", [True, False], ids=["zero_copy", "generic"])
async def test_sglang_pages_are_published_by_sglangs_page_hash_and_parent(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    v1: bool,
) -> None:
    hashes = test_sglang.page_hashes(6, seed=7)
    raw = [bytes.fromhex(h) for h in hashes]
    async with _publishing(etcd, etcd_prefix, store, tmp_path) as (node, sub):
        pool = test_sglang.HostPool(layout="page_first", mla=False, seed=1)
        backend = test_sglang.make_backend(
            pool, test_sglang._settings([node], interface_v1=int(v1))
        )
        try:
            if v1:  # as _page_backup: a first batch, then one with the pages before it
                first = await asyncio.to_thread(
                    backend.batch_set_v1, hashes[:3], test_sglang.slots(0, 3), ExtraInfo()
                )
                later = await asyncio.to_thread(
                    backend.batch_set_v1,
                    hashes[3:],
                    test_sglang.slots(3, 3),
                    ExtraInfo(prefix_keys=hashes[:3]),
                )
                assert all(first)
                assert all(later)
            else:
                assert await asyncio.to_thread(test_sglang.backup, backend, pool, hashes, 0, False)
            stored = await _stored(sub)
        finally:
            await test_sglang.close(backend)
    expected = {(raw[0], None)} | {(raw[i], raw[i - 1]) for i in range(1, 6)}
    assert _pairs(stored) == expected
    # Zero-copy: K and V of each page are two blocks, both named by the page.
    assert len(stored) == len(hashes) * (2 if v1 else 1)


def test_sglang_page_hashes_fall_back_to_the_key_bytes_and_repeat_per_block() -> None:
    sglang = importlib.import_module(test_sglang.MODULE)
    hashes, parents = sglang.page_hashes(["ab01", "not-hex"], ExtraInfo(["ff"]), 2)
    assert hashes == [b"\xab\x01", b"\xab\x01", b"not-hex", b"not-hex"]
    assert parents == [b"\xff", b"\xff", b"\xab\x01", b"\xab\x01"]
    assert sglang.page_hashes([], None, 2) == ([], [])


async def test_lmcache_chunks_are_published_by_lmcaches_chunk_hash(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    engines: list[test_lmcache.Engine],  # noqa: F811
    lmcache_loop: asyncio.AbstractEventLoop,  # noqa: F811
    lmcache_bases: None,
) -> None:
    keys = [test_lmcache.key(i) for i in range(4)]
    async with _publishing(etcd, etcd_prefix, store, tmp_path) as (node, sub):
        engine = test_lmcache.make_engine(engines, lmcache_loop, [node.address])
        objs = [test_lmcache.chunk(engine, i) for i in range(4)]
        await engine.run(engine.connector.batched_put(keys, objs))
        stored = await _stored(sub)
        got = await engine.run(engine.connector.batched_get(keys))
        assert [test_lmcache.digest(g) for g in got] == [test_lmcache.digest(o) for o in objs]
    assert _pairs(stored) == {(k.chunk_hash.to_bytes(8, "big"), None) for k in keys}


def test_lmcache_hashes_of_signed_and_long_chunk_hashes() -> None:
    lmcache = test_lmcache.plugin

    @dataclasses.dataclass
    class Key:
        chunk_hash: Any

    assert lmcache.engine_hashes([Key(1), Key(-1)]) == [
        b"\x00" * 7 + b"\x01",
        b"\xff" * 8,
    ]
    long = 1 << 255
    assert lmcache.engine_hashes([Key(long)]) == [long.to_bytes(32, "big")]
    assert lmcache.engine_hashes([Key("12ab")]) is None
