"""Write-through puts through the block API (services/kvcache/blockputs.py over durable.py): a
data-plane call or a gRPC commit into a write-through namespace answers only once the batch's
durable copies are committed (uploaded together), and UNAVAILABLE with nothing stored when they
cannot be; other namespaces still answer inline. Over the fake object store of test_kv_durable.
"""

from __future__ import annotations

import asyncio

from kvtier import errors, kv
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks, durable
from tests.unit import test_kv_durable as fake

NS = fake.NS
DEFAULT = "default"  # the tenant of fake.PRINCIPAL's session


def _begin_call_put(
    svc: blocks.BlockService, keys: list[bytes], datas: list[bytes], namespace: str = NS
) -> base.CallPlan:
    """A BatchPut call whose bytes are in (on_received not run yet)."""
    request = pb.BatchPutRequest(namespace=pb.Namespace(name=namespace), keys=keys)
    plan = svc.handle_call(
        fake.PRINCIPAL, pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(),
        [len(d) for d in datas], [],
    )  # fmt: skip
    assert isinstance(plan, base.CallPlan)
    for sink, data in zip(plan.sinks, datas, strict=True):
        assert sink is not None
        sink.view()[:] = data
    return plan


async def _reply(plan: base.CallPlan) -> pb.BatchPutResponse:
    assert plan.on_received is not None
    assert plan.on_done is not None
    received = plan.on_received()
    if not isinstance(received, bytes):
        received = await received
    plan.on_done(True)
    return pb.BatchPutResponse.FromString(received)


def _stored(node: fake.Node, key: bytes) -> bytes | None:
    found = node.objects.data.get(durable.object_key(DEFAULT, NS, key))
    return found[0] if found else None


async def test_a_write_through_call_put_answers_once_the_batch_is_durable() -> None:
    node = fake.Node(buffer_bytes=16 * fake.PAGE, through_s=0.5)
    node.tier.set_policy(DEFAULT, NS, durable.Durability.WRITE_THROUGH)
    svc = fake._service(node)
    node.objects.gate.clear()  # the durable tier holds the uploads back
    worker = asyncio.create_task(node.queue.run())
    try:
        keys, datas = [b"a", b"b"], [fake._data(1), fake._data(2)]
        plan = _begin_call_put(svc, keys, datas)
        assert plan.on_received is not None
        pending = plan.on_received()
        assert not isinstance(pending, bytes)  # a deferred reply
        answer = asyncio.ensure_future(pending)
        await fake._until(lambda: node.queue.inflight == 2)  # the batch's uploads together
        assert not answer.done()
        assert node.store.exists(DEFAULT, NS, keys) == [False, False]  # not acknowledged yet
        node.objects.gate.set()
        reply = pb.BatchPutResponse.FromString(await answer)
        assert plan.on_done is not None
        plan.on_done(True)
        assert [i.status for i in reply.items] == [pb.ITEM_STATUS_OK] * 2
        assert [_stored(node, k) for k in keys] == datas  # durable before the reply
        assert node.store.exists(DEFAULT, NS, keys) == [True, True]

        node.objects.up = False  # no gateway: refused, typed, with the reason; nothing kept
        reply = await _reply(_begin_call_put(svc, [b"c"], [fake._data(3)]))
        (item,) = reply.items
        assert item.status == pb.ITEM_STATUS_UNAVAILABLE
        assert item.reason == durable.NO_GATEWAY
        assert durable.NO_GATEWAY in reply.error
        assert node.store.exists(DEFAULT, NS, [b"c"]) == [False]
        sdk = kv._put_result(item)  # what the SDK makes of it: put() raises Unavailable
        assert (sdk.status, sdk.reason) == (kv.PutStatus.UNAVAILABLE, durable.NO_GATEWAY)
        assert kv._PUT_ERRORS[sdk.status] is errors.Unavailable
        node.objects.up = True

        # gRPC (descriptors, then CommitPuts): the commit waits for the upload too.
        grant = svc.grant_puts(
            pb.BatchPutRequest(
                namespace=pb.Namespace(name=NS),
                keys=[b"g"],
                sizes=[32 * fake.KIB],
                principal=fake.PRINCIPAL,
            )
        )
        desc = grant.items[0].descriptor
        node.arena[desc.offset : desc.offset + desc.length] = fake._data(4)
        done = svc.commit_puts(
            pb.CommitPutsRequest(namespace=pb.Namespace(name=NS), put_ids=[grant.items[0].put_id])
        )
        assert not isinstance(done, pb.CommitPutsResponse)
        assert list((await done).statuses) == [pb.ITEM_STATUS_OK]
        assert _stored(node, b"g") == fake._data(4)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_write_back_and_plain_puts_still_answer_inline() -> None:
    node = fake.Node()
    node.tier.set_policy(DEFAULT, "wb", durable.Durability.WRITE_BACK)
    svc = fake._service(node)
    node.objects.gate.clear()  # a stuck durable tier changes nothing for them
    for namespace in ("wb", "plain"):
        plan = _begin_call_put(svc, [b"k"], [fake._data(1)], namespace)
        assert plan.on_received is not None
        received = plan.on_received()
        assert isinstance(received, bytes)  # no wait, no task
        (item,) = pb.BatchPutResponse.FromString(received).items
        assert item.status == pb.ITEM_STATUS_OK
    assert node.queue.pending() == 0
