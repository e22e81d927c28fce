"""KV spill and read-through: kvcache nodes over the durable tier, all in one process.

metadata + 6 datanodes (EC 8+4) + a gateway (the object tier's component cluster) and 1-2
kvcache nodes with 8 MiB arenas, so a few MiB of puts already evict.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import kvtier
from kvtier import errors, etcdserver, kv, kv_stats, membership, principal
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import objects_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import __main__ as kvcache_main
from services.kvcache import config as kvcache_config
from services.kvcache import durable
from tests.component import harness, objects_cluster, tenants

KIB, MIB = 1024, 1024 * 1024
BLOCK = 128 * KIB
ARENA = {"arena_bytes": 8 * MIB, "page_bytes": 1 * MIB, "spill_buffer_bytes": 8 * MIB}


def _block(seed: int, size: int = BLOCK) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


@contextlib.asynccontextmanager
async def _kvcache(
    etcd: etcdserver.EtcdServer,
    prefix: str,
    store: membership.EtcdMembership,
    data_dir: Path,
    **settings: Any,
) -> AsyncIterator[harness.Running]:
    """One kvcache node that has seen a gateway in its map."""
    async with harness.run(
        kvcache_config.KVCacheConfig, "kvcache", kvcache_main.build, store,
        etcd_endpoints=(etcd.endpoint,), etcd_prefix=prefix, data_dir=str(data_dir),
        **{**ARENA, **settings},
    ) as node:  # fmt: skip
        await node.ctx.map_view.wait_for(_has_gateway, timeout_s=10)
        yield node


def _has_gateway(cmap: common_pb2.ClusterMap) -> bool:
    return any(n.role == common_pb2.NODE_ROLE_GATEWAY for n in cmap.nodes)


@pytest.fixture
async def objects_tier(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> AsyncIterator[objects_cluster.Cluster]:
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as c:
        yield c


async def _put_all(
    client: kv.AsyncKVClient, keys: Sequence[bytes], blocks: Sequence[Any], batch: int = 16
) -> int:
    """Put every block, backing off while a node answers NO_SPACE (its spill buffer is full:
    the durable tier's backpressure); returns how many NO_SPACE answers there were."""
    refused = 0
    todo = list(range(len(keys)))
    while todo:
        chunk, todo = todo[:batch], todo[batch:]
        statuses = await client.put_batch([keys[i] for i in chunk], [blocks[i] for i in chunk])
        again = [i for i, s in zip(chunk, statuses, strict=True) if s is kv.PutStatus.NO_SPACE]
        assert all(s in (kv.PutStatus.STORED, kv.PutStatus.NO_SPACE) for s in statuses), statuses
        if again:
            refused += len(again)
            todo = again + todo
            await asyncio.sleep(0.02)  # back off: the uploads free the buffer
    return refused


async def _read_all(
    client: kv.AsyncKVClient, keys: Sequence[bytes], size: int = BLOCK, batch: int = 8
) -> list[str | None]:
    """The digest of every key's block (None: a miss), a batch smaller than the arena at a time."""
    digests: list[str | None] = []
    for at in range(0, len(keys), batch):
        chunk = keys[at : at + batch]
        outs = [np.zeros(size, np.uint8) for _ in chunk]
        sizes = await client.get_batch(chunk, outs)
        digests += [
            _digest(o[:n]) if n is not None else None for o, n in zip(outs, sizes, strict=True)
        ]
    return digests


async def _drained(
    client: kv.AsyncKVClient, timeout_s: float = 30.0
) -> dict[str, kv_stats.KVStats]:
    """Wait until no node has spill bytes queued; the nodes' stats then."""
    async with asyncio.timeout(timeout_s):
        while True:
            stats = await client.stats()
            if all(s.spill_queue_bytes == 0 for s in stats.values()):
                return stats
            await asyncio.sleep(0.05)


async def test_write_back_fill_three_arenas_reads_back_every_block(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv0") as node,
        await kv.AsyncKVClient.connect(nodes=[node.address], namespace="wb") as client,
        await kv.AsyncKVClient.connect(nodes=[node.address], namespace="plain") as plain,
    ):
        assert await client.set_durability("write_back") == 1
        keys = [hashlib.sha256(b"wb-%d" % i).digest() for i in range(3 * 8 * MIB // BLOCK)]
        blocks = [_block(i) for i in range(len(keys))]
        await _put_all(client, keys, blocks)
        stats = await _drained(client)
        (s,) = stats.values()
        assert s.evictions["capacity"] > len(keys) // 2  # most of it left DRAM
        assert s.spilled == s.evictions["capacity"]
        assert s.spill_failures == 0
        assert s.durable_available
        assert await client.lookup(keys) == len(keys)  # in either tier
        assert await client.exists_batch(keys) == [True] * len(keys)

        # The newest blocks first (still in DRAM), then all of them (mostly read through).
        assert await _read_all(client, keys[-8:]) == [_digest(b) for b in blocks[-8:]]
        got = await _read_all(client, keys[:-8])
        assert got == [_digest(b) for b in blocks[:-8]]
        (after,) = (await client.stats()).values()
        assert after.misses == 0
        assert after.hits > 0  # the blocks still in DRAM
        assert after.durable_hits > 0  # the others read through
        assert after.hits + after.durable_hits == len(keys)
        assert after.hit_rate == 1.0
        assert 0 < after.dram_hit_rate < 1

        # A namespace without a policy: evicted blocks are gone, as before.
        plain_keys = [b"plain-%d" % i for i in range(len(keys))]
        await _put_all(plain, plain_keys, blocks)
        early = await _read_all(plain, plain_keys[:8])
        assert early == [None] * 8
        (p,) = (await plain.stats()).values()
        assert p.durable_hits == after.durable_hits  # the tenant's: no new durable hits


async def test_write_through_survives_a_node_restart_and_fails_without_a_durable_tier(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    policy = {"durable_namespaces": "team-a/wt=write_through,team-a/wb=write_back"}
    keys = [b"wt-%d" % i for i in range(24)]
    blocks = [_block(100 + i, 64 * KIB + i) for i in range(len(keys))]
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="wt", tenant="team-a"
        ) as client,
    ):
        assert await client.put_batch(keys, blocks) == [kv.PutStatus.STORED] * len(keys)
        # Acknowledged means durable: every copy is in the bucket already (no drain first).
        names = [durable.object_key("team-a", "wt", k) for k in keys]
        assert set(names) <= set(await objects_tier.stored_keys(durable.BUCKET))
        link = _kv_node(node).tier.queue.objects
        meta = await link.head(names[-1])
        assert meta is not None
        last = bytearray(blocks[-1].nbytes)
        await link.get_into(names[-1], memoryview(last), meta.etag)
        assert _digest(last) == _digest(blocks[-1])
        (s,) = (await _drained(client)).values()
        assert s.spilled == len(keys)
        assert s.evictions["capacity"] == 0
    # A fresh process with the same state dir: DRAM is empty, the durable tier is not.
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="wt", tenant="team-a"
        ) as client,
    ):
        assert await client.exists_batch(keys) == [True] * len(keys)
        outs = [np.zeros(64 * KIB + 64, np.uint8) for _ in keys]
        sizes = await client.get_batch(keys, outs)
        assert sizes == [b.nbytes for b in blocks]
        assert [_digest(o[: b.nbytes]) for o, b in zip(outs, blocks, strict=True)] == [
            _digest(b) for b in blocks
        ]
        (s,) = (await client.stats()).values()
        assert (s.hits, s.durable_hits, s.misses) == (0, len(keys), 0)
        # Repopulated: the second read is a DRAM hit, and nothing is spilled again.
        assert await _read_all(client, keys[:4], 64 * KIB + 64) == [_digest(b) for b in blocks[:4]]
        (s,) = (await client.stats()).values()
        assert s.hits == 4
        await _without_a_durable_tier(objects_tier, node, client)


async def _without_a_durable_tier(
    objects_tier: objects_cluster.Cluster, node: harness.Running, wt: kv.AsyncKVClient
) -> None:
    """The gateway stops: a write-through put fails, typed (both SDKs), and keeps nothing; a
    write-back put is acknowledged from DRAM as before (it waits for no upload)."""
    objects_tier.gateway.stop.set()
    await objects_tier.gateway.task
    with pytest.raises(errors.Unavailable, match="write-through"):
        await wt.put(b"after", _block(2))
    (result,) = await wt.put_batch_results([b"after"], [_block(2)])
    assert result.status is kv.PutStatus.UNAVAILABLE
    assert "write-through" in result.reason
    assert await _in_dram(wt, [b"after"]) == [False]

    def sync_put() -> None:
        with (
            kvtier.KVClient.connect(nodes=[node.address], namespace="wt", tenant="team-a") as sync,
            pytest.raises(errors.Unavailable, match="write-through"),
        ):
            sync.put(b"after", _block(2))

    await asyncio.to_thread(sync_put)
    async with await kv.AsyncKVClient.connect(
        nodes=[node.address], namespace="wb", tenant="team-a"
    ) as wb:
        keys = [b"wb-%d" % i for i in range(4)]
        statuses = await wb.put_batch(keys, [_block(10 + i) for i in range(4)])
        assert statuses == [kv.PutStatus.STORED] * len(keys)


async def test_tenants_and_deletes_hold_in_the_durable_tier(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    policy = {"durable_namespaces": "alice/shared=write_back,bob/shared=write_back"}
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="shared", tenant="alice"
        ) as alice,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="shared", tenant="bob"
        ) as bob,
    ):
        keys = [b"same-%d" % i for i in range(2 * 8 * MIB // BLOCK)]
        blocks = [_block(i) for i in range(len(keys))]
        await _put_all(alice, keys, blocks)
        await _drained(alice)
        spilled = [k for k, p in zip(keys, await _in_dram(alice, keys), strict=True) if not p]
        assert len(spilled) > 8
        # Bob asks for the same keys in the same namespace name: nothing of Alice's.
        assert await bob.exists_batch(spilled) == [False] * len(spilled)
        assert await _read_all(bob, spilled[:8]) == [None] * 8
        assert await bob.lookup(spilled) == 0
        # Alice deletes two spilled blocks: gone from both tiers at once, and after the drain.
        assert await alice.delete(spilled[:2]) == 0  # not in DRAM: the durable copies go
        assert await alice.exists_batch(spilled[:3]) == [False, False, True]
        await _drained(alice)
        assert await _read_all(alice, spilled[:3]) == [
            None,
            None,
            _digest(blocks[keys.index(spilled[2])]),
        ]
        names = await objects_tier.stored_keys(durable.BUCKET)  # internal: the gateway's view
        assert names
        assert all(n.startswith("alice/") for n in names)
        assert durable.object_key("alice", "shared", spilled[0]) not in names


async def test_the_durable_bucket_is_internal_and_its_old_name_is_just_a_user_bucket(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    """The `kvtier-kv` takeover (issue 13): a tenant's user can neither create, list, read,
    write nor delete the durable KV bucket, and a user bucket named `kvtier-kv` (the durable
    bucket's name before) holding forged blocks changes nothing for spill or read-through."""
    front, bucket = objects_tier.front, durable.BUCKET
    assert bucket == ".kvtier-kv"
    mallory = principal.user("AKMALLORY", "team-m", is_admin=False, shm_trusted=False)
    policy = {"durable_namespaces": "alice/shared=write_back"}
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(
            nodes=[node.address], namespace="shared", tenant="alice"
        ) as alice,
    ):
        keys = [b"blk-%d" % i for i in range(2 * 8 * MIB // BLOCK)]
        blocks = [_block(100 + i) for i in range(len(keys))]
        await _put_all(alice, keys, blocks)
        await _drained(alice)
        spilled = [k for k, p in zip(keys, await _in_dram(alice, keys), strict=True) if not p]
        assert len(spilled) > 8
        wanted = {durable.object_key("alice", "shared", k): k for k in spilled}
        assert set(wanted) <= set(await objects_tier.stored_keys(bucket))
        victim = next(iter(wanted))
        with tenants.acting(mallory):
            with pytest.raises(errors.InvalidArgument):
                await front.create_bucket(bucket)
            refused = [
                front.head_bucket(bucket),
                front.delete_bucket(bucket),
                front.list_objects(objects_pb2.ListObjectsRequest(bucket=bucket)),
                front.head_object(bucket, victim),
                tenants.get(front, bucket, victim),
                tenants.put(front, bucket, victim, b"forged"),
                front.delete_object(bucket, victim),
                front.create_multipart(
                    objects_pb2.CreateMultipartUploadRequest(bucket=bucket, key=victim)
                ),
            ]
            for call in refused:
                with pytest.raises(
                    errors.PermissionDenied, check=lambda e: e.reason == "AccessDenied"
                ):
                    await call
            assert bucket not in [b.name for b in await front.list_buckets()]
            # The old name is an ordinary bucket of Mallory's, unrelated to the KV tier.
            await front.create_bucket("kvtier-kv")
            for key in wanted:
                await tenants.put(front, "kvtier-kv", key, b"forged block " * 64)
        read = objects_pb2.ReadRangeRequest(bucket=bucket, key=victim).SerializeToString()
        with pytest.raises(errors.PermissionDenied):
            await front.handle_call(
                tenants.session(mallory), objects_pb2.OBJECT_CALL_METHOD_READ_RANGE, read, [],
                [MIB],
            )  # fmt: skip
        # Read-through serves Alice's own bytes; more spill still lands in the internal bucket.
        first = spilled[:8]
        assert await _read_all(alice, first) == [_digest(blocks[keys.index(k)]) for k in first]
        more = [b"more-%d" % i for i in range(8 * MIB // BLOCK)]
        await _put_all(alice, more, [_block(500 + i) for i in range(len(more))])
        await _drained(alice)
        internal = set(await objects_tier.stored_keys(bucket))
        assert any(durable.object_key("alice", "shared", k) in internal for k in more)
        with tenants.acting(mallory):
            page = await front.list_objects(
                objects_pb2.ListObjectsRequest(bucket="kvtier-kv", max_keys=1000)
            )
        assert {o.key for o in page.objects} == set(wanted)  # only Mallory's forgeries


async def _in_dram(
    client: kv.AsyncKVClient, keys: Sequence[bytes], node_id: str = ""
) -> list[bool]:
    """Whether each key is in the DRAM of one node (the client's only one by default)."""
    (node,) = [n for n in client._set.nodes() if n.node_id == node_id or not node_id]
    request = pb.BatchExistsRequest(
        namespace=pb.Namespace(tenant=client.tenant, name=client.namespace), keys=keys
    )
    reply = await node.grpc.batch_exists(request)
    return list(reply.in_dram)


async def test_without_a_gateway_durable_namespaces_stay_dram_only(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    async with (
        harness.run(
            kvcache_config.KVCacheConfig,
            "kvcache",
            kvcache_main.build,
            store,
            etcd_endpoints=(etcd.endpoint,),
            etcd_prefix=etcd_prefix,
            data_dir=str(tmp_path),
            durable_namespaces="default/wb=write_back",
            **ARENA,
        ) as node,  # fmt: skip
        await kv.AsyncKVClient.connect(nodes=[node.address], namespace="wb") as client,
    ):
        keys = [b"k%d" % i for i in range(3 * 8 * MIB // BLOCK)]
        blocks = [_block(i) for i in range(len(keys))]
        assert await _put_all(client, keys, blocks) == 0  # no backpressure: nothing to wait for
        (s,) = (await client.stats()).values()
        assert not s.durable_available
        assert s.spilled == 0
        assert await _read_all(client, keys[:8]) == [None] * 8


async def test_a_stopped_nodes_spilled_blocks_are_read_through_by_its_successor(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    policy = {"durable_namespaces": "default/moving=write_back"}
    async with _kvcache(etcd, etcd_prefix, store, tmp_path / "kv0", **policy) as first:
        second_cm = _kvcache(etcd, etcd_prefix, store, tmp_path / "kv1", **policy)
        second = await second_cm.__aenter__()
        try:
            cmap = await harness.wait_map(store, lambda m: _count(m, KVCACHE) == 2)
            (meta,) = [n.grpc_address for n in cmap.nodes if n.role == METADATA]
            client = await kv.AsyncKVClient.connect(
                # Above the node's read-through deadline: a read-through on a loaded CI host
                # outlasted a 2 s call once (the node answers a miss at its own deadline).
                metadata=meta,
                namespace="moving",
                refresh_s=0.2,
                timeout_s=5.0,
            )
            keys = [b"m%d" % i for i in range(2 * 2 * 8 * MIB // BLOCK)]
            blocks = [_block(1000 + i) for i in range(len(keys))]
            await _put_all(client, keys, blocks)
            await _drained(client)
            on_second = [i for i, k in enumerate(keys) if client.owners(k) == [second.spec.node_id]]
            in_dram = await _in_dram(client, [keys[i] for i in on_second], second.spec.node_id)
            spilled = [i for i, hit in zip(on_second, in_dram, strict=True) if not hit]
            assert len(spilled) > 16
        finally:
            await second_cm.__aexit__(None, None, None)
        async with client:
            async with asyncio.timeout(15):  # the metadata service's map follows etcd's
                while client.node_ids != [first.spec.node_id]:
                    await asyncio.sleep(0.05)
                    await client.refresh()
            chosen = spilled[:16]
            got = await _read_all(client, [keys[i] for i in chosen])
            assert got == [_digest(blocks[i]) for i in chosen]
            (s,) = (await client.stats()).values()
            assert s.durable_hits >= len(chosen)


KVCACHE, METADATA = common_pb2.NODE_ROLE_KVCACHE, common_pb2.NODE_ROLE_METADATA


def _count(cmap: common_pb2.ClusterMap, role: int) -> int:
    return sum(n.role == role for n in cmap.nodes)


def _kv_node(node: harness.Running) -> Any:
    """The running kvcache node's internals (its tier and block API): the service's loops are
    methods of it."""
    return node.spec.loops[0].__self__  # type: ignore[attr-defined]


async def test_durable_copies_carry_the_checksum_and_read_through_verifies_it(
    objects_tier: objects_cluster.Cluster,
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
) -> None:
    policy = {"durable_namespaces": "team-a/sum=write_through"}
    keys = [b"sum-0", b"sum-1", b"sum-2"]
    blocks = [_block(300 + i, 64 * KIB) for i in range(len(keys))]
    names = [durable.object_key("team-a", "sum", k) for k in keys]
    connect = {"namespace": "sum", "tenant": "team-a"}
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(nodes=[node.address], **connect) as client,
    ):
        assert await client.put_batch(keys, blocks) == [kv.PutStatus.STORED] * len(keys)
        await _drained(client)
        link = _kv_node(node).tier.queue.objects  # the node's own way to the durable tier
        metas = [await link.head(n) for n in names]
        sums = [xxhash.xxh3_64_intdigest(b.tobytes()) for b in blocks]
        assert [m.checksum for m in metas] == sums
        rotten = bytearray(blocks[0].tobytes())
        rotten[5] ^= 1  # rot under the block's checksum
        await link.put(names[0], memoryview(rotten), 0, metas[0].checksum)
        await link.put(names[1], memoryview(blocks[1].tobytes()), 0, None)  # an older copy
    async with (
        _kvcache(etcd, etcd_prefix, store, tmp_path / "kv", **policy) as node,
        await kv.AsyncKVClient.connect(nodes=[node.address], **connect) as client,
    ):
        outs = [np.zeros(64 * KIB, np.uint8) for _ in keys]
        assert await client.get_batch(keys, outs) == [None, 64 * KIB, 64 * KIB]
        assert [_digest(o) for o in outs[1:]] == [_digest(b) for b in blocks[1:]]
        (s,) = (await client.stats()).values()
        assert (s.durable_hits, s.misses, s.corrupt_blocks) == (2, 1, 1)
        assert client.corrupt_blocks == 0  # caught by the node: no bad byte left it
        kv_node = _kv_node(node)
        # The older copy got its checksum on the way into DRAM; the rotten one is deleted.
        checksum = kv_node.blocks.store.checksum_of("team-a", "sum", keys[1])
        assert checksum == xxhash.xxh3_64_intdigest(blocks[1].tobytes())
        # The delete is queued (no bytes: _drained cannot see it): wait for it, with a deadline.
        async with asyncio.timeout(30):
            while True:
                if await kv_node.tier.queue.objects.head(names[0]) is None:
                    break
                await asyncio.sleep(0.05)
        assert await client.get_batch(keys, outs) == [None, 64 * KIB, 64 * KIB]
