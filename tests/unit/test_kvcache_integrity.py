"""Block checksums on a kvcache node (services/kvcache/integrity.py and its callers), driven
directly: puts checked at commit, checksums kept and returned, deletes that find a bad block,
and the durable tier's checksum metadata (over the fake object store of test_kv_durable)."""

from __future__ import annotations

import prometheus_client
import pytest
import xxhash

from kvtier import blocksums, errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks, durable
from services.kvcache import store as block_store
from tests.unit import test_kv_durable as durable_tests
from tests.unit import test_kvcache_blocks as block_tests

MIB = 1024 * 1024
ALICE = block_tests.ALICE
NS = pb.Namespace(name="m")


def _xxh3(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _node_corrupt(where: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "kvtier_kvcache_corrupt_blocks_total", {"where": where}
    )
    return value or 0.0


@pytest.fixture
def service() -> blocks.BlockService:
    region = base.Region(1, 4 * MIB)
    store = block_store.BlockStore(4 * MIB, page_bytes=1 * MIB)
    return blocks.BlockService(store, region, base.Issuer("n1").grant, epoch=lambda: 7)


def _call_put(
    svc: blocks.BlockService, keys: list[bytes], datas: list[bytes], checksums: list[int]
) -> pb.BatchPutResponse:
    request = pb.BatchPutRequest(namespace=NS, keys=keys, checksums=checksums)
    plan = block_tests._now(
        svc.handle_call(
            ALICE,
            pb.CALL_METHOD_BATCH_PUT,
            request.SerializeToString(),
            [len(d) for d in datas],
            [],
        )
    )
    for sink, data in zip(plan.sinks, datas, strict=True):
        assert sink is not None
        sink.view()[:] = data
    assert plan.on_received is not None
    assert plan.on_done is not None
    received = plan.on_received()
    assert isinstance(received, bytes)  # the kvcache completes puts synchronously
    reply = pb.BatchPutResponse.FromString(received)
    plan.on_done(True)
    return reply


def test_a_call_put_keeps_the_writers_checksum_and_every_get_returns_it(
    service: blocks.BlockService,
) -> None:
    reply = _call_put(service, [b"a", b"b"], [b"alpha", b"beta"], [_xxh3(b"alpha"), _xxh3(b"beta")])
    assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK] * 2
    got, datas = block_tests._get(service, ALICE, [b"a", b"b", b"x"], 16)
    assert datas == [b"alpha", b"beta", None]
    assert [i.checksum for i in got.items[:2]] == [_xxh3(b"alpha"), _xxh3(b"beta")]
    assert not got.items[2].HasField("checksum")  # a miss carries none
    # A writer that sends no checksum: the node computes it from the bytes that arrived.
    block_tests._put(service, ALICE, [b"c"], [b"gamma"])
    got, _ = block_tests._get(service, ALICE, [b"c"], 16)
    assert got.items[0].checksum == _xxh3(b"gamma")


def test_a_call_put_whose_bytes_do_not_match_is_corrupt_and_stores_nothing(
    service: blocks.BlockService,
) -> None:
    before = _node_corrupt("put")
    reply = _call_put(service, [b"good", b"torn"], [b"fine", b"torn"], [_xxh3(b"fine"), 12345])
    assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_CORRUPT]
    assert "do not match the checksum" in reply.error
    assert service.store.exists("alice", "m", [b"good", b"torn"]) == [True, False]
    stats = service.stats("alice")
    assert (stats.blocks, stats.pending_puts, stats.corrupt_blocks) == (1, 0, 1)
    assert stats.requested_bytes == 4  # the torn put's extent is free again
    assert _node_corrupt("put") == before + 1
    with pytest.raises(errors.InvalidArgument, match="checksums"):
        _call_put(service, [b"x", b"y"], [b"1", b"2"], [_xxh3(b"1")])


def test_a_grpc_commit_checks_the_one_sided_writes(service: blocks.BlockService) -> None:
    ns = pb.Namespace(tenant="alice", name="m")
    reply = service.grant_puts(
        pb.BatchPutRequest(
            namespace=ns,
            keys=[b"ok", b"bad"],
            sizes=[4, 4],
            principal=ALICE,
            checksums=[_xxh3(b"good"), _xxh3(b"good")],
        )
    )
    arena = service._arena.view
    for item, data in zip(reply.items, [b"good", b"evil"], strict=True):
        arena[item.descriptor.offset : item.descriptor.offset + 4] = data
    done = service.commit_puts(
        pb.CommitPutsRequest(namespace=ns, put_ids=[i.put_id for i in reply.items])
    )
    assert isinstance(done, pb.CommitPutsResponse)  # not write-through: answered at once
    assert list(done.statuses) == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_CORRUPT]
    got = service.grant_reads(
        pb.BatchGetRequest(namespace=ns, keys=[b"ok", b"bad"], principal=ALICE)
    )
    assert isinstance(got, pb.BatchGetResponse)
    assert [i.status for i in got.items] == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_MISS]
    assert got.items[0].checksum == _xxh3(b"good")
    assert service.stats("alice").corrupt_blocks == 1


def test_a_delete_counts_the_blocks_whose_bytes_went_bad(service: blocks.BlockService) -> None:
    block_tests._put(service, ALICE, [b"k", b"fine"], [b"hello", b"world"])
    lease = service.store.begin_get("alice", "m", b"k")
    assert lease is not None
    service._arena.view[lease.extent.offset] ^= 0xFF  # a bad extent: one flipped byte
    service.store.end_get(lease)
    before = _node_corrupt("delete")
    reply = service.delete("alice", pb.DeleteRequest(namespace=NS, keys=[b"k", b"fine"]))
    assert reply.deleted == 2
    assert service.stats("alice").corrupt_blocks == 1  # only the one that went bad
    assert service.stats(None).corrupt_blocks == 1
    assert service.stats("bob").corrupt_blocks == 0
    assert _node_corrupt("delete") == before + 1


async def test_durable_copies_keep_the_checksum_and_a_bad_one_is_a_miss_and_deleted() -> None:
    node = durable_tests.Node(buffer_bytes=16 * durable_tests.PAGE)
    node.tier.set_policy("default", durable_tests.NS, durable.Durability.WRITE_BACK)
    svc = durable_tests._service(node)
    keys = [b"k%d" % i for i in range(40)]
    datas = {k: durable_tests._data(i) for i, k in enumerate(keys)}
    for key in keys:
        durable_tests._call_put(svc, [key], [datas[key]])
    await node.queue.drained(work=True)
    spilled = [k for k in keys if not node.store.exists("default", durable_tests.NS, [k])[0]]
    assert len(spilled) >= 2
    names = {k: durable.object_key("default", durable_tests.NS, k) for k in spilled}
    assert all(node.objects.checksums[names[k]] == _xxh3(datas[k]) for k in spilled)
    bad, legacy = spilled[:2]
    body = bytearray(datas[bad])
    body[100] ^= 1  # rot in the durable tier; its checksum metadata is the block's
    node.objects.data[names[bad]] = (bytes(body), 0)
    del node.objects.checksums[names[legacy]]  # spilled before checksums were kept
    before = _node_corrupt("durable")
    got = await durable_tests._call_get(svc, [bad, legacy], awaited=True)
    assert got == [None, datas[legacy]]
    assert svc.stats("default").corrupt_blocks == 1
    assert _node_corrupt("durable") == before + 1
    # The legacy copy got a checksum in DRAM (computed on the way in); the bad copy is deleted.
    assert node.store.checksum_of("default", durable_tests.NS, legacy) == _xxh3(datas[legacy])
    await node.queue.drained(work=True)
    assert names[bad] not in node.objects.data
    assert not node.store.exists("default", durable_tests.NS, [bad])[0]


async def test_a_large_batch_is_checked_on_threads_in_key_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blocksums, "WORKERS", 4)  # as on a host of 8 cores or more
    region = base.Region(1, 64 * MIB)
    store = block_store.BlockStore(64 * MIB, page_bytes=4 * MIB)
    svc = blocks.BlockService(store, region, base.Issuer("n1").grant)
    keys = [b"big-%d" % i for i in range(6)]
    datas = [bytes([i]) * (2 * MIB - i) for i in range(6)]
    sums = [_xxh3(d) for d in datas]
    sums[4] ^= 1  # one block's bytes do not match what its writer sent
    assert await blocksums.checksums([memoryview(d) for d in datas]) == [_xxh3(d) for d in datas]
    request = pb.BatchPutRequest(namespace=NS, keys=keys, checksums=sums)
    plan = block_tests._now(
        svc.handle_call(
            ALICE,
            pb.CALL_METHOD_BATCH_PUT,
            request.SerializeToString(),
            [len(d) for d in datas],
            [],
        )
    )
    for sink, data in zip(plan.sinks, datas, strict=True):
        assert sink is not None
        sink.view()[:] = data
    assert plan.on_received is not None
    assert plan.on_done is not None
    received = plan.on_received()
    assert not isinstance(received, bytes)  # 12 MiB: hashed off the event loop
    reply = pb.BatchPutResponse.FromString(await received)
    plan.on_done(True)
    expected = [pb.ITEM_STATUS_OK] * 6
    expected[4] = pb.ITEM_STATUS_CORRUPT
    assert [i.status for i in reply.items] == expected
    got, out = block_tests._get(svc, ALICE, keys, 2 * MIB)
    assert out[:4] + out[5:] == datas[:4] + datas[5:]
    assert out[4] is None
    assert [i.checksum for i in got.items if i.status == pb.ITEM_STATUS_OK] == [
        _xxh3(d) for i, d in enumerate(datas) if i != 4
    ]
