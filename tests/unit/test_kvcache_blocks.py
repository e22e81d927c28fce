"""The kvcache block API (services/kvcache/blocks.py) driven directly, without a network."""

from __future__ import annotations

import pytest

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks
from services.kvcache import store as block_store

MIB = 1024 * 1024
ALICE = "alice/engine-1/abcd"
BOB = "bob/engine-2/ef01"


def _now(plan: object) -> base.CallPlan:
    """A plan the block API made at once (no durable tier is asked here)."""
    assert isinstance(plan, base.CallPlan)
    return plan


@pytest.fixture
def service() -> blocks.BlockService:
    region = base.Region(1, 4 * MIB)
    issuer = base.Issuer("n1")
    store = block_store.BlockStore(4 * MIB, page_bytes=1 * MIB)
    return blocks.BlockService(store, region, issuer.grant, epoch=lambda: 7)


def _put(
    svc: blocks.BlockService, principal: str, keys: list[bytes], datas: list[bytes]
) -> pb.BatchPutResponse:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=keys)
    plan = _now(
        svc.handle_call(
            principal,
            pb.CALL_METHOD_BATCH_PUT,
            request.SerializeToString(),
            [len(d) for d in datas],
            [],
        )
    )
    for sink, data in zip(plan.sinks, datas, strict=True):
        if sink is not None:
            sink.view()[:] = data
    assert plan.on_received is not None
    assert plan.on_done is not None
    received = plan.on_received()
    assert isinstance(received, bytes)  # the kvcache completes puts synchronously
    reply = pb.BatchPutResponse.FromString(received)
    plan.on_done(True)
    return reply


def _get(
    svc: blocks.BlockService, principal: str, keys: list[bytes], cap: int
) -> tuple[pb.BatchGetResponse, list[bytes | None]]:
    request = pb.BatchGetRequest(namespace=pb.Namespace(name="m"), keys=keys)
    plan = _now(
        svc.handle_call(
            principal, pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), [], [cap] * len(keys)
        )
    )
    datas = [bytes(s.view()) if s is not None else None for s in plan.sources]
    assert plan.on_done is not None
    plan.on_done(True)
    return pb.BatchGetResponse.FromString(plan.reply), datas


def test_a_call_put_is_visible_only_after_its_bytes_are_in(service: blocks.BlockService) -> None:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"k"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), [5], [])
    )
    assert service.store.exists("alice", "m", [b"k"]) == [False]
    assert plan.sinks[0] is not None
    plan.sinks[0].view()[:] = b"hello"
    assert plan.on_received is not None
    received = plan.on_received()
    assert isinstance(received, bytes)  # the kvcache completes puts synchronously
    reply = pb.BatchPutResponse.FromString(received)
    assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK]
    assert reply.epoch == 7
    got, datas = _get(service, ALICE, [b"k", b"nope"], 16)
    assert [i.status for i in got.items] == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_MISS]
    assert datas == [b"hello", None]


def test_a_put_whose_connection_died_is_aborted(service: blocks.BlockService) -> None:
    request = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"k"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), [5], [])
    )
    assert plan.on_done is not None
    plan.on_done(False)
    stats = service.stats("alice")
    assert stats.pending_puts == 0
    assert stats.blocks == 0
    assert stats.requested_bytes == 0
    assert _put(service, ALICE, [b"k"], [b"again"]).items[0].status == pb.ITEM_STATUS_OK


def test_the_session_tenant_scopes_every_call(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"alice"])
    reply, datas = _get(service, BOB, [b"k"], 16)
    assert reply.items[0].status == pb.ITEM_STATUS_MISS
    assert datas == [None]
    spoof = pb.BatchGetRequest(namespace=pb.Namespace(tenant="alice", name="m"), keys=[b"k"])
    with pytest.raises(errors.PermissionDenied):
        service.handle_call(BOB, pb.CALL_METHOD_BATCH_GET, spoof.SerializeToString(), [], [16])


def test_a_small_buffer_is_reported_with_the_block_size(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"k"], [b"x" * 100])
    reply, datas = _get(service, ALICE, [b"k"], 10)
    assert reply.items[0].status == pb.ITEM_STATUS_BUFFER_TOO_SMALL
    assert reply.items[0].size == 100
    assert datas == [None]
    assert service.stats("alice").hits == 1  # the lease was taken and ended


def test_malformed_calls_are_invalid(service: blocks.BlockService) -> None:
    good = pb.BatchPutRequest(
        namespace=pb.Namespace(name="m"), keys=[b"a", b"b"]
    ).SerializeToString()
    with pytest.raises(errors.InvalidArgument, match="segments"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, good, [1], [])
    sized = pb.BatchPutRequest(namespace=pb.Namespace(name="m"), keys=[b"a"], sizes=[3])
    with pytest.raises(errors.InvalidArgument, match="as long"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_PUT, sized.SerializeToString(), [4], [])
    with pytest.raises(errors.InvalidArgument, match="malformed"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_GET, b"\xff\xff", [], [])
    with pytest.raises(errors.InvalidArgument, match="unknown"):
        service.handle_call(ALICE, 77, b"", [], [])
    with pytest.raises(errors.InvalidArgument, match="segments"):
        service.handle_call(ALICE, pb.CALL_METHOD_BATCH_EXISTS, b"", [3], [])
    assert service.stats(None).pending_puts == 0


def test_grpc_grants_commit_and_release(service: blocks.BlockService) -> None:
    ns = pb.Namespace(tenant="alice", name="m")
    with pytest.raises(errors.PermissionDenied):
        service.grant_puts(pb.BatchPutRequest(namespace=ns, keys=[b"k"], sizes=[4], principal=BOB))
    reply = service.grant_puts(
        pb.BatchPutRequest(namespace=ns, keys=[b"k"], sizes=[4], principal=ALICE)
    )
    item = reply.items[0]
    assert item.status == pb.ITEM_STATUS_OK
    assert item.descriptor.length == 4
    assert item.descriptor.rights == int(base.Rights.WRITE)
    done = service.commit_puts(pb.CommitPutsRequest(namespace=ns, put_ids=[item.put_id, 999]))
    assert list(done.statuses) == [pb.ITEM_STATUS_OK, pb.ITEM_STATUS_EXPIRED]
    got = service.grant_reads(pb.BatchGetRequest(namespace=ns, keys=[b"k"], principal=ALICE))
    assert isinstance(got, pb.BatchGetResponse)
    assert got.items[0].status == pb.ITEM_STATUS_OK
    assert got.items[0].lease_id
    assert service.store.stats().blocks == 1
    service.delete("alice", pb.DeleteRequest(namespace=ns, keys=[b"k"]))
    # Deleted but still leased: the extent is held until the read is released.
    assert service.store.stats().used_bytes > 0
    service.release_reads(pb.ReleaseReadsRequest(namespace=ns, lease_ids=[got.items[0].lease_id]))
    assert service.store.stats().used_bytes == 0


def test_simple_calls_and_stats(service: blocks.BlockService) -> None:
    _put(service, ALICE, [b"a", b"b", b"c"], [b"1", b"2", b"3"])
    ns = pb.Namespace(name="m")
    lookup = pb.LookupRequest(namespace=ns, keys=[b"a", b"b", b"x", b"c"])
    plan = _now(
        service.handle_call(ALICE, pb.CALL_METHOD_LOOKUP, lookup.SerializeToString(), [], [])
    )
    assert pb.LookupResponse.FromString(plan.reply).count == 2
    pin = pb.PinRequest(namespace=ns, keys=[b"a", b"x"], pin_s=10)
    plan = _now(service.handle_call(ALICE, pb.CALL_METHOD_PIN, pin.SerializeToString(), [], []))
    assert pb.PinResponse.FromString(plan.reply).pinned == 1
    plan = _now(service.handle_call(ALICE, pb.CALL_METHOD_STATS, b"", [], []))
    stats = pb.StatsResponse.FromString(plan.reply)
    assert stats.tenant == "alice"
    assert stats.blocks == 3
    assert stats.puts == 3
    service.sweep()
