"""Every block verified end to end: kvcache nodes in this process and the SDK over real
transports. A block is corrupted where it lives, in the node's arena (a memfd region, as a bad
extent or a reuse bug would leave it), and the SDK must never deliver its bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest
import xxhash

from kvtier import etcdserver, kv, membership
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from tests.component import harness
from tests.component import test_kvcache as kv_tests

KIB = 1024
BLOCK = 64 * KIB


def _block(seed: int, size: int = BLOCK) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def _client_corrupt() -> float:
    value = prometheus_client.REGISTRY.get_sample_value("kvtier_kv_client_corrupt_blocks_total")
    return value or 0.0


def _flip_in_arena(node: harness.Running, block: np.ndarray) -> None:
    """Flip one byte of block's copy in the node's memory (its arena region)."""
    needle = block[:256].tobytes()
    assert node.ctx.dataplane is not None
    for region in node.ctx.dataplane.regions.all():
        at = bytes(region.view).find(needle)
        if at >= 0:
            region.view[at + 1000] ^= 0xFF
            return
    raise AssertionError("the block is not in the node's arena")


async def _raw_get(client: kv.AsyncKVClient, keys: list[bytes]) -> list[pb.GetItem]:
    """A BatchGet call of the client's session (the reply items, checksums included)."""
    session = await client._set.session(client._set.nodes()[0])
    request = pb.BatchGetRequest(
        namespace=pb.Namespace(tenant=client.tenant, name=client.namespace), keys=keys
    )
    result = await session.transport.call(
        pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), intos=[bytearray(BLOCK)] * len(keys)
    )
    return list(pb.BatchGetResponse.FromString(result.reply).items)


@pytest.mark.parametrize(
    ("transport", "use_calls"), [("tcp", True), ("shm", True), ("tcp", False), ("shm", False)]
)
async def test_gets_return_the_puts_checksum_and_verify(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    transport: str,
    use_calls: bool,
) -> None:
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=[transport], use_calls=use_calls)
        async with client:
            keys = [b"k%d" % i for i in range(4)]
            blocks = [_block(i, BLOCK - i) for i in range(4)]
            assert await client.put_batch(keys, blocks) == [kv.PutStatus.STORED] * 4
            items = await _raw_get(client, keys)
            assert [i.checksum for i in items] == [
                xxhash.xxh3_64_intdigest(b.tobytes()) for b in blocks
            ]
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            assert await client.get_batch(keys, outs) == [b.nbytes for b in blocks]
            assert [_digest(o[: b.nbytes]) for o, b in zip(outs, blocks, strict=True)] == [
                _digest(b) for b in blocks
            ]
            assert client.corrupt_blocks == 0


@pytest.mark.parametrize(("transport", "use_calls"), [("tcp", True), ("shm", True), ("tcp", False)])
async def test_a_block_corrupted_in_the_arena_is_a_miss_and_is_dropped(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    transport: str,
    use_calls: bool,
) -> None:
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=[transport], use_calls=use_calls)
        async with client:
            bad, good = _block(1), _block(2)
            await client.put_batch([b"bad", b"good"], [bad, good])
            _flip_in_arena(nodes[0], bad)
            before = _client_corrupt()
            outs = [np.zeros(BLOCK, np.uint8), np.zeros(BLOCK, np.uint8)]
            assert await client.get_batch([b"bad", b"good"], outs) == [None, BLOCK]
            assert _digest(outs[1]) == _digest(good)
            assert client.corrupt_blocks == 1
            assert _client_corrupt() == before + 1
            # Dropped where it was found, and the node counted its own copy as bad.
            assert await client.exists_batch([b"bad", b"good"]) == [False, True]
            (stats,) = (await client.stats()).values()
            assert (stats.corrupt_blocks, stats.blocks) == (1, 1)
            assert await client.get(b"bad", outs[0]) is None
            assert client.corrupt_blocks == 1  # a plain miss now


async def test_with_two_replicas_the_good_copy_is_served(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kv_tests._nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=["tcp"], replicas=2)
        async with client:
            block = _block(7)
            assert await client.put(b"k", block)
            first = next(n for n in nodes if n.spec.node_id == client.owners(b"k")[0])
            _flip_in_arena(first, block)
            out = np.zeros(BLOCK, np.uint8)
            assert await client.get(b"k", out) == BLOCK
            assert _digest(out) == _digest(block)
            assert client.corrupt_blocks == 1
            stats = await client.stats()
            assert stats[first.spec.node_id].blocks == 0  # the bad copy is gone
            assert stats[first.spec.node_id].corrupt_blocks == 1
            other = next(n for n in nodes if n is not first)
            assert stats[other.spec.node_id].blocks == 1
            assert stats[other.spec.node_id].corrupt_blocks == 0


async def test_a_put_whose_bytes_do_not_match_their_checksum_stores_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=["tcp"])
        async with client:
            session = await client._set.session(client._set.nodes()[0])
            block = _block(3)
            request = pb.BatchPutRequest(
                namespace=pb.Namespace(name=client.namespace),
                keys=[b"torn"],
                checksums=[xxhash.xxh3_64_intdigest(block.tobytes()) ^ 1],  # not what is sent
            )
            result = await session.transport.call(
                pb.CALL_METHOD_BATCH_PUT,
                request.SerializeToString(),
                segments=[memoryview(block.tobytes())],
            )
            reply = pb.BatchPutResponse.FromString(result.reply)
            assert [i.status for i in reply.items] == [pb.ITEM_STATUS_CORRUPT]
            assert "do not match the checksum" in reply.error
            assert await client.exists_batch([b"torn"]) == [False]
            (stats,) = (await client.stats()).values()
            assert (stats.blocks, stats.pending_puts, stats.corrupt_blocks) == (0, 0, 1)
            # The SDK's own puts carry the right checksums.
            assert await client.put(b"torn", block)


async def test_a_local_writers_checksum_is_kept_and_the_reader_catches_a_wrong_one(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """Over shm the writer fills the arena itself: the node keeps its checksum without reading
    the bytes again, so a wrong one is caught where the bytes are consumed (a miss, dropped)."""
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=["shm"])
        async with client:
            session = await client._set.session(client._set.nodes()[0])
            block = _block(4)
            wrong = xxhash.xxh3_64_intdigest(block.tobytes()) ^ 1
            request = pb.BatchPutRequest(
                namespace=pb.Namespace(name=client.namespace), keys=[b"local"], checksums=[wrong]
            )
            result = await session.transport.call(
                pb.CALL_METHOD_BATCH_PUT,
                request.SerializeToString(),
                segments=[memoryview(block.tobytes())],
            )
            reply = pb.BatchPutResponse.FromString(result.reply)
            assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK]
            (item,) = await _raw_get(client, [b"local"])
            assert item.checksum == wrong  # kept as sent, not recomputed
            out = bytearray(len(block.tobytes()))
            assert await client.get(b"local", out) is None  # never delivered
            assert client.corrupt_blocks == 1
            assert await client.exists_batch([b"local"]) == [False]  # dropped


async def test_without_verification_the_bytes_are_delivered_unchecked(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await kv_tests._client(nodes, transports=["shm"], verify_checksums=False)
        async with client:
            block = _block(5)
            assert await client.put(b"k", block)
            # Sent without a checksum: the node computed it from what it received.
            (item,) = await _raw_get(client, [b"k"])
            assert item.checksum == xxhash.xxh3_64_intdigest(block.tobytes())
            _flip_in_arena(nodes[0], block)
            out = np.zeros(BLOCK, np.uint8)
            assert await client.get(b"k", out) == BLOCK
            assert _digest(out) != _digest(block)  # delivered as it is, unchecked
            assert client.corrupt_blocks == 0
            assert await client.exists_batch([b"k"]) == [True]


async def test_dropping_a_corrupt_block_touches_only_the_readers_tenant(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with kv_tests._nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes:
        alice = await kv_tests._client(nodes, tenant="alice", transports=["tcp"])
        bob = await kv_tests._client(nodes, tenant="bob", transports=["tcp"])
        async with alice, bob:
            mine, theirs = _block(11), _block(12)
            assert await alice.put(b"same", mine)
            assert await bob.put(b"same", theirs)
            _flip_in_arena(nodes[0], mine)
            out = np.zeros(BLOCK, np.uint8)
            assert await alice.get(b"same", out) is None
            assert alice.corrupt_blocks == 1
            assert await alice.exists_batch([b"same"]) == [False]
            assert await bob.get(b"same", out) == BLOCK  # bob's block with the same key stays
            assert _digest(out) == _digest(theirs)
            (alice_stats,) = (await alice.stats()).values()
            (bob_stats,) = (await bob.stats()).values()
            assert (alice_stats.corrupt_blocks, bob_stats.corrupt_blocks) == (1, 0)
            assert (alice_stats.blocks, bob_stats.blocks) == (0, 1)
