"""The sync KVClient's short path (`kvtier.kv_now`) against kvcache nodes in this process.

The nodes run on the test's event loop; the sync client runs in a worker thread
(`asyncio.to_thread`), as an engine's thread would. Each test checks that the short path served
the operations (its counter moved) and that what it returns is what the full path returns:
bytes compared, tenants apart, corrupt blocks never delivered, a dead node's keys as misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest

import kvtier
from kvtier import errors, etcdserver, membership
from services.kvcache import store as kvcache_store
from tests.component import harness
from tests.component import test_kv_integrity as integrity_tests
from tests.component import test_kvcache as kv_tests

KIB = 1024
BLOCK = 64 * KIB


def _short(op: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "kvtier_kv_client_short_path_total", {"op": op}
    )
    return value or 0.0


def _block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8)


def _digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def _connect(nodes: list[harness.Running], **kwargs: Any) -> kvtier.KVClient:
    kwargs.setdefault("namespace", "short")
    return kvtier.KVClient.connect(nodes=[n.address for n in nodes], transports=["tcp"], **kwargs)


async def test_sync_short_path_gets_probes_and_lookups_match_what_was_put(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [b"chain-%d" % i for i in range(64)]
    blocks = [_block(i) for i in range(64)]

    def body(nodes: list[harness.Running]) -> None:
        with _connect(nodes) as client:
            assert client.put_batch(keys, blocks) == [kvtier.PutStatus.STORED] * 64
            assert len({client.owners(k)[0] for k in keys}) == 2  # the chain spans both nodes
            client.get_batch(keys[:2], [bytearray(BLOCK), bytearray(BLOCK)])  # opens both sessions
            before = {op: _short(op) for op in ("get", "exists", "lookup")}
            for key, block in zip(keys, blocks, strict=True):
                out = np.zeros(BLOCK + 5, np.uint8)
                assert client.get(key, out) == BLOCK
                assert _digest(out[:BLOCK]) == _digest(block)
            outs = [bytearray(BLOCK) for _ in keys]
            assert client.get_batch([*keys, b"absent"], [*outs, bytearray(8)]) == [BLOCK] * 64 + [
                None
            ]
            assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]
            assert client.exists_batch([keys[3], b"absent", keys[60]]) == [True, False, True]
            assert client.lookup(keys) == 64
            assert client.lookup([*keys[:20], b"absent", *keys[20:]]) == 20
            assert client.lookup([b"absent", *keys]) == 0
            assert client.lookup([]) == 0
            assert _short("get") - before["get"] == 65
            assert _short("exists") - before["exists"] == 1
            assert _short("lookup") - before["lookup"] == 4

    async with kv_tests._nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        await asyncio.to_thread(body, nodes)


async def test_sync_short_path_keeps_tenants_apart(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [b"mine-%d" % i for i in range(8)]

    def body(nodes: list[harness.Running]) -> None:
        with _connect(nodes, tenant="alice") as alice, _connect(nodes, tenant="bob") as bob:
            alice.put_batch(keys, [_block(i) for i in range(8)])
            bob.exists_batch(keys[:1])  # opens bob's sessions (the full path)
            bob.get_batch(keys, [bytearray(BLOCK) for _ in keys])
            before = {op: _short(op) for op in ("get", "exists", "lookup")}
            out = bytearray(BLOCK)
            assert bob.get_batch(keys, [out] * 8) == [None] * 8
            assert out == bytearray(BLOCK)  # no byte of alice's reached bob's buffer
            assert bob.exists_batch(keys) == [False] * 8
            assert bob.lookup(keys) == 0
            assert alice.lookup(keys) == 8
            assert _short("get") - before["get"] == 1
            assert _short("exists") - before["exists"] == 1
            assert _short("lookup") - before["lookup"] == 2

    async with kv_tests._nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        await asyncio.to_thread(body, nodes)


async def test_sync_short_path_never_delivers_a_corrupt_block(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    block = _block(7)
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await asyncio.to_thread(_connect, nodes)
        try:
            out = bytearray(BLOCK)
            await asyncio.to_thread(client.put, b"k", block)
            assert await asyncio.to_thread(client.get, b"k", out) == BLOCK
            integrity_tests._flip_in_arena(nodes[0], block)
            corrupt, short = integrity_tests._client_corrupt(), _short("get")
            out = bytearray(BLOCK)
            assert await asyncio.to_thread(client.get, b"k", out) is None
            assert integrity_tests._client_corrupt() == corrupt + 1
            assert client.corrupt_blocks == 1
            assert _short("get") == short + 1
            # The bad block was dropped where it was found.
            assert await asyncio.to_thread(client.exists_batch, [b"k"]) == [False]
        finally:
            await asyncio.to_thread(client.close)


async def test_sync_short_path_reads_a_dead_nodes_keys_as_misses(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [b"k%d" % i for i in range(32)]
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path / "a")
        )
        second = kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path / "b")
        doomed = await second.__aenter__()
        client = await asyncio.to_thread(_connect, first + doomed, timeout_s=2.0)
        try:
            await asyncio.to_thread(client.put_batch, keys, [_block(i) for i in range(32)])
            lost = {k for k in keys if client.owners(k)[0] == doomed[0].spec.node_id}
            assert 0 < len(lost) < len(keys)
            outs = [bytearray(BLOCK) for _ in keys]
            assert await asyncio.to_thread(client.get_batch, keys, outs) == [BLOCK] * 32
            await second.__aexit__(None, None, None)
            started = time.monotonic()
            got = await asyncio.to_thread(client.get_batch, keys, outs)
            assert time.monotonic() - started < 10
            assert [k for k, size in zip(keys, got, strict=True) if size is None] == [
                k for k in keys if k in lost
            ]
            first_lost = next(i for i, k in enumerate(keys) if k in lost)
            assert await asyncio.to_thread(client.lookup, keys) == first_lost
        finally:
            await asyncio.to_thread(client.close)


async def test_sync_short_path_over_a_tls_data_plane(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [b"t%d" % i for i in range(16)]
    blocks = [_block(50 + i) for i in range(16)]

    def body(nodes: list[harness.Running]) -> None:
        with _connect(nodes) as client:
            client.put_batch(keys, blocks)
            client.exists_batch(keys[:1])  # opens the session (the full path)
            before = _short("get")
            for _ in range(3):  # several replies on the same TLS connection
                outs = [bytearray(BLOCK) for _ in keys]
                assert client.get_batch(keys, outs) == [BLOCK] * 16
                assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]
            assert client.lookup(keys) == 16
            assert _short("get") == before + 3

    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path, dataplane_tls=True) as nodes:
        tcp = [e for e in nodes[0].info.dataplane.endpoints if e.name == "tcp"]
        assert tcp[0].address.startswith("tls://")
        await asyncio.to_thread(body, nodes)


async def test_sync_short_path_raises_a_nodes_error_and_stays_usable(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    keys = [b"e%d" % i for i in range(16)]
    too_long = b"x" * (kvcache_store.MAX_KEY_BYTES + 1)

    def body(nodes: list[harness.Running]) -> None:
        with _connect(nodes) as client:
            client.put_batch(keys, [_block(i) for i in range(16)])
            outs = [bytearray(BLOCK) for _ in keys]
            client.get_batch(keys, outs)  # opens both sessions
            others = [k for k in keys if client.owners(k)[0] != client.owners(too_long)[0]]
            assert others  # the batch below spans both nodes: one fails, one answers
            before = _short("get")
            with pytest.raises(errors.InvalidArgument):
                client.get_batch([too_long, *keys], [bytearray(BLOCK), *outs])
            # Every call of the failed batch ended: the next ones take the short path again.
            for _ in range(2):
                assert client.get_batch(keys, outs) == [BLOCK] * 16
            assert _short("get") == before + 2

    async with kv_tests._nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        await asyncio.to_thread(body, nodes)
