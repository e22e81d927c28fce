"""The KV-cache tier end to end in one process: kvcache nodes + the SDK over real transports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import blocksums, config, errors, etcdserver, kv, membership
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import store as kvcache_store
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests.component import harness

KIB, MIB = 1024, 1024 * 1024


def _block(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


@contextlib.asynccontextmanager
async def _nodes(
    count: int,
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    tmp: Path,
    **settings: Any,
) -> AsyncIterator[list[harness.Running]]:
    """count kvcache nodes in this process."""
    async with contextlib.AsyncExitStack() as stack:
        running = []
        for i in range(count):
            node = await stack.enter_async_context(
                harness.run(
                    kvcache_config.KVCacheConfig,
                    "kvcache",
                    kvcache_main.build,
                    store,
                    etcd_endpoints=(etcd.endpoint,),
                    etcd_prefix=prefix,
                    data_dir=str(tmp / f"kv{i}"),
                    **settings,
                )
            )
            running.append(node)
        yield running


async def _client(nodes: Sequence[harness.Running], **kwargs: Any) -> kv.AsyncKVClient:
    kwargs.setdefault("namespace", "model-a")
    return await kv.AsyncKVClient.connect(nodes=[n.address for n in nodes], **kwargs)


@pytest.mark.parametrize(
    ("transport", "use_calls"), [("tcp", True), ("shm", True), ("tcp", False), ("shm", False)]
)
async def test_batch_put_get_round_trips_every_buffer_kind(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    transport: str,
    use_calls: bool,
) -> None:
    sizes = [1, 4 * KIB, 64 * KIB + 1, 256 * KIB, 2 * MIB]
    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        client = await _client(nodes, transports=[transport], use_calls=use_calls)
        async with client:
            keys = [f"k{i}".encode() for i in range(len(sizes))]
            blocks: list[Any] = [_block(i, n) for i, n in enumerate(sizes)]
            blocks[1] = bytearray(blocks[1].tobytes())
            blocks[2] = memoryview(blocks[2].tobytes())
            statuses = await client.put_batch(keys, blocks)
            assert statuses == [kv.PutStatus.STORED] * len(keys)
            outs: list[Any] = [np.zeros(n + 7, dtype=np.uint8) for n in sizes]
            outs[1] = bytearray(sizes[1])
            got = await client.get_batch(keys, outs)
            assert got == sizes
            for block, out, size in zip(blocks, outs, sizes, strict=True):
                assert _digest(memoryview(out)[:size]) == _digest(block)
            assert await client.get_batch([b"absent"], [bytearray(8)]) == [None]


async def test_put_if_absent_races_between_clients_leave_one_winner(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        clients = [await _client(nodes, transports=["tcp"]) for _ in range(4)]
        try:
            keys = [f"race-{i}".encode() for i in range(64)]
            payloads = [[_block(c * 1000 + i, 128 * KIB) for i in range(64)] for c in range(4)]
            results = await asyncio.gather(
                *(c.put_batch(keys, payloads[i]) for i, c in enumerate(clients))
            )
            for index, key in enumerate(keys):
                statuses = [r[index] for r in results]
                winners = [c for c, s in enumerate(statuses) if s is kv.PutStatus.STORED]
                assert len(winners) == 1, (key, statuses)
                assert set(statuses) <= {
                    kv.PutStatus.STORED,
                    kv.PutStatus.EXISTS,
                    kv.PutStatus.BUSY,
                }
                out = np.zeros(128 * KIB, dtype=np.uint8)
                assert await clients[0].get(key, out) == 128 * KIB
                assert _digest(out) == _digest(payloads[winners[0]][index])
            # Overwrite replaces; put-if-absent leaves it.
            new = _block(99, 128 * KIB)
            assert await clients[1].put(keys[0], new, overwrite=True) is True
            assert await clients[2].put(keys[0], _block(98, 128 * KIB)) is False
            out = np.zeros(128 * KIB, dtype=np.uint8)
            await clients[3].get(keys[0], out)
            assert _digest(out) == _digest(new)
        finally:
            for c in clients:
                await c.close()


async def test_compare_and_swap_puts_go_only_to_nodes_that_advertise_them(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """put_batch(if_checksums=...): a node replaces a block only while it is the one named
    (match: STORED; another block or none: MISMATCH, nothing stored). A node that does not
    advertise kvcache.compare-and-swap (an older build would drop the condition and overwrite)
    is never sent one: INVALID, and `compare_and_swap` says so first."""
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes,
        await _client(nodes, transports=["tcp"]) as client,
    ):
        old, new = b"version one", b"version two"
        assert await client.put_batch([b"k"], [old]) == [kv.PutStatus.STORED]
        assert await client.compare_and_swap([b"k", b"absent"])
        named = blocksums.checksum(old)
        swapped = await client.put_batch([b"k"], [new], if_checksums=[named])
        assert swapped == [kv.PutStatus.STORED]
        for key in (b"k", b"absent"):  # "one" is gone, and "absent" never was
            late = await client.put_batch([key], [b"late"], if_checksums=[named])
            assert late == [kv.PutStatus.MISMATCH]
        out = bytearray(32)
        assert await client.get_batch([b"k", b"absent"], [out, bytearray(8)]) == [11, None]
        assert bytes(out[:11]) == new
        for node in client._set.nodes():  # as an older node's NodeInfo says: nothing
            node.features = frozenset()
        assert not await client.compare_and_swap([b"k"])
        (result,) = await client.put_batch_results(
            [b"k"], [b"unchecked"], if_checksums=[blocksums.checksum(new)]
        )
        assert result.status is kv.PutStatus.INVALID
        assert "compare-and-swap" in result.reason
        assert await client.get_batch([b"k"], [out]) == [11]
        assert bytes(out[:11]) == new


async def test_prefix_lookup_across_nodes_matches_a_model(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    rng = random.Random(int(os.environ.get("KVTIER_TEST_SEED", "1")))
    async with (
        _nodes(3, etcd, etcd_prefix, store, tmp_path) as nodes,
        await _client(nodes, transports=["tcp"]) as client,
    ):
        present: set[bytes] = set()
        for prompt in range(20):
            chain = [hashlib.sha256(f"p{prompt}-{i}".encode()).digest() for i in range(40)]
            stored = rng.randrange(0, 41)
            keys = chain[:stored]
            if stored > 3 and rng.random() < 0.5:  # a hole in the middle of the chain
                keys = keys[: stored // 2] + keys[stored // 2 + 1 :]
            if keys:
                await client.put_batch(keys, [np.full(4 * KIB, 7, np.uint8)] * len(keys))
            present.update(keys)
            expected = next((i for i, k in enumerate(chain) if k not in present), len(chain))
            assert await client.lookup(chain) == expected
            assert await client.exists_batch(chain) == [k in present for k in chain]
        owners = {client.owners(k)[0] for k in present}
        assert len(owners) == 3  # the chains really span every node


async def test_pinned_and_leased_blocks_survive_eviction_pressure(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(
        1, etcd, etcd_prefix, store, tmp_path, arena_bytes=8 * MIB, page_bytes=1 * MIB
    ) as nodes:
        writer = await _client(nodes, transports=["tcp"])
        reader = await _client(nodes, transports=["shm"])
        try:
            pinned = {f"pin-{i}".encode(): _block(i, 64 * KIB) for i in range(8)}
            await writer.put_batch(list(pinned), list(pinned.values()))
            assert await writer.pin(list(pinned), pin_s=600) == len(pinned)
            hot = _block(4242, 256 * KIB)
            await writer.put(b"hot", hot)
            stop = asyncio.Event()
            reads = {"hit": 0, "miss": 0}

            async def read_loop() -> None:
                out = np.zeros(256 * KIB, dtype=np.uint8)
                while not stop.is_set():
                    size = await reader.get(b"hot", out)
                    if size is None:
                        reads["miss"] += 1
                        await writer.put(b"hot", hot)  # put it back; the race goes on
                    else:
                        assert _digest(out[:size]) == _digest(hot)
                        reads["hit"] += 1
                    for key, block in pinned.items():
                        got = np.zeros(64 * KIB, dtype=np.uint8)
                        assert await reader.get(key, got) == 64 * KIB
                        assert _digest(got) == _digest(block)

            task = asyncio.create_task(read_loop())
            evictions = 0
            round_ = 0
            while evictions < 1000:
                keys = [f"flood-{round_}-{i}".encode() for i in range(32)]
                await writer.put_batch(keys, [_block(round_ * 32 + i, 64 * KIB) for i in range(32)])
                round_ += 1
                stats = await writer.stats()
                evictions = sum(s.evictions["capacity"] for s in stats.values())
                await asyncio.sleep(0)
            stop.set()
            await task
            assert reads["hit"] > 0
            node_stats = await kvcache_client.KVCacheClient(nodes[0].address).stats()
            assert node_stats.fill <= 1.0
        finally:
            await writer.close()
            await reader.close()


async def test_ttl_expires_blocks(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path, expire_interval_s=0.05) as nodes,
        await _client(nodes) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.put_batch([b"short", b"long"], [b"x" * 4096, b"y" * 4096], ttl_s=0.4)
        assert await client.exists_batch([b"short"]) == [True]
        await client.put(b"forever", b"z" * 4096)
        async with kvcache_client.KVCacheClient(nodes[0].address) as admin:
            await admin.set_namespace_ttl("", "model-a", 0.3)
        await client.put(b"ns-default", b"w" * 4096)
        while (await client.exists_batch([b"short", b"ns-default"])) != [False, False]:
            assert loop.time() - started < 10
            await asyncio.sleep(0.05)
        assert loop.time() - started >= 0.3
        assert await client.exists_batch([b"forever"]) == [True]
        stats = await client.stats()
        assert sum(s.evictions["ttl"] for s in stats.values()) >= 2


async def test_tenant_quota_rejects_puts_over_it(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(
        1, etcd, etcd_prefix, store, tmp_path, tenant_quotas="small=1048576"
    ) as nodes:
        small = await _client(nodes, tenant="small")
        other = await _client(nodes, tenant="big")
        try:
            keys = [f"q{i}".encode() for i in range(8)]
            statuses = await small.put_batch(keys, [_block(i, 256 * KIB) for i in range(8)])
            assert statuses[:4] == [kv.PutStatus.STORED] * 4
            assert statuses[4:] == [kv.PutStatus.QUOTA_EXCEEDED] * 4
            with pytest.raises(errors.QuotaExceeded):
                await small.put(b"one-more", _block(9, 4 * KIB))
            assert (
                await other.put_batch(keys, [_block(i, 256 * KIB) for i in range(8)])
                == [kv.PutStatus.STORED] * 8
            )
            (stats,) = (await small.stats()).values()
            assert stats.quota_rejections == 5
            async with kvcache_client.KVCacheClient(nodes[0].address) as admin:
                await admin.set_quota("small", 0)  # lifted
            assert await small.put(b"one-more", _block(9, 4 * KIB)) is True
        finally:
            await small.close()
            await other.close()


@pytest.mark.parametrize("pin_s", [float("inf"), 1e12, 61.0])
async def test_endless_or_overlong_pins_are_refused_over_calls_and_grpc(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    pin_s: float,
) -> None:
    """Regression (issue 13): pin_s=inf was accepted, so a tenant could pin blocks forever."""
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path, max_pin_s=60.0) as nodes,
        await _client(nodes, tenant="t1", transports=["tcp"]) as client,
        kvcache_client.KVCacheClient(nodes[0].address) as grpc_client,
    ):
        await client.put(b"k", _block(1, 4 * KIB))
        with pytest.raises(errors.InvalidArgument, match="pin_s"):
            await client.pin([b"k"], pin_s=pin_s)
        request = pb.PinRequest(
            namespace=pb.Namespace(tenant="t1", name="model-a"), keys=[b"k"], pin_s=pin_s
        )
        with pytest.raises(errors.InvalidArgument, match="pin_s"):
            await grpc_client.pin(request)
        assert await client.pin([b"k"], pin_s=60.0) == 1  # max_pin_s itself is fine


async def test_a_tenant_pins_at_most_its_share_of_the_arena(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _nodes(
            1, etcd, etcd_prefix, store, tmp_path,
            arena_bytes=8 * MIB, page_bytes=1 * MIB, max_pinned_fraction=0.25,
        ) as nodes,
        await _client(nodes, tenant="greedy", transports=["tcp"]) as greedy,
        await _client(nodes, tenant="other", transports=["tcp"]) as other,
    ):  # fmt: skip
        keys = [f"p{i}".encode() for i in range(16)]
        blocks = [_block(i, 256 * KIB) for i in range(16)]
        assert await greedy.put_batch(keys, blocks) == [kv.PutStatus.STORED] * 16
        pinned = await greedy.pin(keys, pin_s=600)
        assert 0 < pinned <= 8  # a quarter of 8 MiB: at most 8 blocks of 256 KiB
        assert await greedy.pin(keys, pin_s=600) == pinned  # asking again pins nothing more
        # The other tenant's puts evict the unpinned blocks, never the pinned ones.
        for round_ in range(4):
            flood = [f"f{round_}-{i}".encode() for i in range(16)]
            await other.put_batch(flood, [_block(100 + i, 256 * KIB) for i in range(16)])
        present = await greedy.exists_batch(keys)
        assert present[:pinned] == [True] * pinned
        assert not all(present)
        outs = [np.zeros(256 * KIB, np.uint8) for _ in range(pinned)]
        assert await greedy.get_batch(keys[:pinned], outs) == [256 * KIB] * pinned
        assert [_digest(o) for o in outs] == [_digest(b) for b in blocks[:pinned]]


async def test_a_default_quota_applies_to_every_new_tenant(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _nodes(
            1, etcd, etcd_prefix, store, tmp_path,
            default_tenant_quota_bytes=1 * MIB, tenant_quotas="big=4194304",
        ) as nodes,
        await _client(nodes, tenant="fresh", transports=["tcp"]) as fresh,
        await _client(nodes, tenant="big", transports=["tcp"]) as big,
    ):  # fmt: skip
        keys = [f"q{i}".encode() for i in range(8)]
        blocks = [_block(i, 256 * KIB) for i in range(8)]
        statuses = await fresh.put_batch(keys, blocks)
        assert statuses == [kv.PutStatus.STORED] * 4 + [kv.PutStatus.QUOTA_EXCEEDED] * 4
        assert await big.put_batch(keys, blocks) == [kv.PutStatus.STORED] * 8  # its own quota
        async with kvcache_client.KVCacheClient(nodes[0].address) as admin:
            await admin.set_quota("fresh", 2 * MIB)
        assert await fresh.put_batch(keys, blocks) == (
            [kv.PutStatus.EXISTS] * 4 + [kv.PutStatus.STORED] * 4
        )
        outs = [np.zeros(256 * KIB, np.uint8) for _ in keys]
        assert await fresh.get_batch(keys, outs) == [256 * KIB] * 8
        assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]


async def test_tenants_are_isolated_with_the_same_keys(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        alice = await _client(nodes, tenant="alice", namespace="shared")
        bob = await _client(nodes, tenant="bob", namespace="shared")
        try:
            keys = [f"same-{i}".encode() for i in range(16)]
            a_blocks = [_block(i, 8 * KIB) for i in range(16)]
            b_blocks = [_block(100 + i, 8 * KIB) for i in range(16)]
            await alice.put_batch(keys, a_blocks)
            assert await bob.exists_batch(keys) == [False] * 16
            assert await bob.lookup(keys) == 0
            assert await bob.delete(keys) == 0
            assert await bob.pin(keys, 60) == 0
            await bob.put_batch(keys, b_blocks)
            for client, blocks in ((alice, a_blocks), (bob, b_blocks)):
                outs = [np.zeros(8 * KIB, np.uint8) for _ in keys]
                assert await client.get_batch(keys, outs) == [8 * KIB] * 16
                assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]
            assert await alice.delete(keys[:8]) == 8
            assert await bob.exists_batch(keys[:8]) == [True] * 8
            # A session cannot name another tenant, whatever it sends.
            session = await alice._set.session(alice._set.nodes()[0])
            request = pb.BatchExistsRequest(
                namespace=pb.Namespace(tenant="bob", name="shared"), keys=keys
            )
            with pytest.raises(errors.PermissionDenied):
                await session.transport.call(
                    pb.CALL_METHOD_BATCH_EXISTS, request.SerializeToString()
                )
        finally:
            await alice.close()
            await bob.close()


async def test_bad_requests_get_typed_errors_and_store_nothing(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes,
        await _client(nodes) as client,
    ):
        assert await client.put_batch([b""], [b"x"]) == [kv.PutStatus.INVALID]
        too_long = b"k" * (kvcache_store.MAX_KEY_BYTES + 1)
        assert await client.put_batch([too_long], [b"x"]) == [kv.PutStatus.INVALID]
        assert await client.put_batch([b"big"], [bytearray(64 * MIB + 1)]) == [kv.PutStatus.INVALID]
        with pytest.raises(errors.InvalidArgument):
            await client.put_batch([b"a", b"b"], [b"x"])
        await client.put(b"sized", b"x" * 8192)
        with pytest.raises(errors.InvalidArgument, match="8192"):
            await client.get(b"sized", bytearray(100))
        with pytest.raises(errors.InvalidArgument):
            await client.get(b"sized", b"read-only buffer")
        session = await client._set.session(client._set.nodes()[0])
        with pytest.raises(errors.InvalidArgument):
            await session.transport.call(pb.CALL_METHOD_BATCH_GET, b"\xff\xff garbage")
        with pytest.raises(errors.InvalidArgument):
            await session.transport.call(999, b"")
        stats = await client.stats()
        assert sum(s.blocks for s in stats.values()) == 1
        assert sum(s.pending_puts for s in stats.values()) == 0


async def test_grpc_api_grants_descriptors_bound_to_the_session(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _nodes(1, etcd, etcd_prefix, store, tmp_path) as nodes,
        await _client(nodes, tenant="t1", transports=["tcp"]) as client,
    ):
        session = await client._set.session(client._set.nodes()[0])
        other = await _client(nodes, tenant="t1", transports=["tcp"])
        other_session = await other._set.session(other._set.nodes()[0])
        grpc_client = kvcache_client.KVCacheClient(nodes[0].address)
        ns = pb.Namespace(tenant="t1", name="model-a")
        try:
            with pytest.raises(errors.PermissionDenied):  # a session of another tenant
                await grpc_client.batch_put(
                    pb.BatchPutRequest(
                        namespace=pb.Namespace(tenant="t2", name="model-a"),
                        keys=[b"k"],
                        sizes=[4],
                        principal=session.principal,
                    )
                )
            reply = await grpc_client.batch_put(
                pb.BatchPutRequest(
                    namespace=ns, keys=[b"k"], sizes=[4], principal=session.principal
                )
            )
            desc = base.Descriptor.from_proto(reply.items[0].descriptor)
            with pytest.raises(base.DescriptorRejected):  # bound to the first session
                await other_session.transport.write(desc, b"evil")
            assert await client.exists_batch([b"k"]) == [False]  # not visible before commit
            await session.transport.write(desc, b"good")
            done = await grpc_client.commit_puts(
                pb.CommitPutsRequest(namespace=ns, put_ids=[reply.items[0].put_id])
            )
            assert list(done.statuses) == [pb.ITEM_STATUS_OK]
            out = bytearray(4)
            assert await client.get(b"k", out) == 4
            assert out == b"good"
        finally:
            await grpc_client.close()
            await other.close()


async def test_a_newer_epoch_in_a_reply_makes_the_client_refresh_its_map(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    base_settings = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": etcd_prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **base_settings
        ) as meta,
        _nodes(1, etcd, etcd_prefix, store, tmp_path) as first,
    ):
        await harness.wait_map(store, lambda m: len(m.nodes) == 2)
        client = await kv.AsyncKVClient.connect(
            metadata=meta.address, namespace="m", transports=["tcp"], refresh_s=3600
        )
        try:
            assert client.node_ids == [first[0].spec.node_id]
            keys = [f"k{i}".encode() for i in range(200)]
            await client.put_batch(keys, [b"v" * 4096] * len(keys))
            async with _nodes(1, etcd, etcd_prefix, store, tmp_path / "second") as second:
                await harness.wait_map(store, lambda m: len(m.nodes) == 3)
                await first[0].ctx.map_view.wait_for(lambda m: len(m.nodes) == 3, timeout_s=10)
                # The reply of the node that has seen the new map carries its epoch ...
                assert await client.exists_batch(keys) == [True] * len(keys)
                # ... so the next operation reloads the map and places keys on both nodes.
                present = await client.exists_batch(keys)
                assert sorted(client.node_ids) == sorted(
                    [first[0].spec.node_id, second[0].spec.node_id]
                )
                moved = [k for k in keys if client.owners(k)[0] == second[0].spec.node_id]
                assert 40 < len(moved) < 160  # about half moved to the new node: misses there
                assert [not p for k, p in zip(keys, present, strict=True) if k in moved] == [
                    True
                ] * len(moved)
        finally:
            await client.close()


async def test_replicas_serve_reads_when_an_owner_is_gone(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with _nodes(2, etcd, etcd_prefix, store, tmp_path) as nodes:
        third_cm = harness.run(
            kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
            etcd_endpoints=(etcd.endpoint,), etcd_prefix=etcd_prefix,
            data_dir=str(tmp_path / "third"),
        )  # fmt: skip
        third = await third_cm.__aenter__()
        stopped = False
        client = await _client([*nodes, third], replicas=2, transports=["tcp"], timeout_s=1.0)
        try:
            keys = [f"r{i}".encode() for i in range(90)]
            blocks = [_block(i, 16 * KIB) for i in range(len(keys))]
            assert await client.put_batch(keys, blocks) == [kv.PutStatus.STORED] * len(keys)
            stats = await client.stats()
            assert sum(s.blocks for s in stats.values()) == 2 * len(keys)  # two copies each
            on_third = [k for k in keys if third.spec.node_id in client.owners(k)]
            assert on_third
            await third_cm.__aexit__(None, None, None)
            stopped = True
            outs = [np.zeros(16 * KIB, np.uint8) for _ in keys]
            assert await client.get_batch(keys, outs) == [16 * KIB] * len(keys)
            assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]
            assert await client.lookup(keys) == len(keys)
        finally:
            await client.close()
            if not stopped:
                await third_cm.__aexit__(None, None, None)


@pytest.mark.parametrize("use_calls", [True, False])
async def test_list_keys_merges_nodes_and_pages_in_byte_order(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    use_calls: bool,
) -> None:
    async with (
        _nodes(3, etcd, etcd_prefix, store, tmp_path) as nodes,
        await _client(nodes, transports=["tcp"], replicas=2, use_calls=use_calls) as client,
        await _client(nodes, transports=["tcp"], namespace="other") as other,
    ):
        keys = [f"obj/{i:03d}".encode() for i in range(120)] + [b"zzz", b"a\xff"]
        sizes = {k: 100 + i for i, k in enumerate(keys)}
        for key in keys:
            await client.put_batch([key], [np.full(sizes[key], 1, np.uint8)])
        await other.put_batch([b"obj/999"], [np.zeros(10, np.uint8)])
        got, after = [], b""
        while True:
            page, more = await client.list_keys(prefix=b"obj/", start_after=after, limit=25)
            got.extend(page)
            if not more:
                break
            after = page[-1][0]
        expected = sorted(k for k in keys if k.startswith(b"obj/"))
        assert [k for k, _ in got] == expected  # replicas once, other namespaces never
        assert all(size == sizes[k] for k, size in got)
        whole, more = await client.list_keys()
        assert [k for k, _ in whole] == sorted(keys)
        assert not more
        with pytest.raises(errors.InvalidArgument):
            await client.list_keys(limit=20_000)


def test_node_settings_bound_pins_and_default_quota() -> None:
    cfg = kvcache_config.KVCacheConfig(insecure=True)
    assert (cfg.max_pin_s, cfg.max_pinned_fraction, cfg.default_tenant_quota_bytes) == (
        3600.0,
        0.5,
        0,
    )
    for bad in (
        {"max_pin_s": float("inf")},
        {"max_pin_s": 0.0},
        {"max_pinned_fraction": 0.0},
        {"max_pinned_fraction": 1.01},
        {"default_tenant_quota_bytes": -1},
    ):
        with pytest.raises(config.ConfigError, match=next(iter(bad))):
            kvcache_config.KVCacheConfig(insecure=True, **bad)
