"""Descriptors never outlive the memory they grant: the block API revokes grants when their put or
read ends, and the store quarantines an extent the data plane still uses instead of reusing it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blocks
from services.kvcache import store as block_store

MIB = 1024 * 1024
ALICE = "alice/engine-1/abcd"
NS = pb.Namespace(tenant="alice", name="m")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(
    clock: Callable[[], float] | None = None,
) -> tuple[blocks.BlockService, base.Issuer, base.RegionTable]:
    """A block service wired as a kvcache node wires it: grants from an issuer, revoked through
    it, and the store's reuse guard asking the issuer's live grants."""
    regions = base.RegionTable()
    region = regions.create(4 * MIB)
    issuer = base.Issuer("n1")
    store = block_store.BlockStore(
        4 * MIB,
        page_bytes=1 * MIB,
        clock=clock or _Clock(),
        reuse_guard=lambda offset, length: issuer.in_use(region.region_id, offset, length),
    )
    service = blocks.BlockService(store, region, issuer.grant, revoke=issuer.revoke)
    return service, issuer, regions


def _check(
    issuer: base.Issuer, regions: base.RegionTable, desc: common_pb2.Descriptor, need: int
) -> None:
    d = base.Descriptor.from_proto(desc)
    issuer.check(
        regions, ALICE, base.Rights(need), d.region_id, d.offset, d.length, d.rights,
        d.expires_at_ms, d.mac, d.grant_id,
    )  # fmt: skip


def _grant_put(service: blocks.BlockService, key: bytes) -> pb.PutGrant:
    reply = service.grant_puts(
        pb.BatchPutRequest(namespace=NS, keys=[key], sizes=[4096], principal=ALICE)
    )
    assert reply.items[0].status == pb.ITEM_STATUS_OK
    return reply.items[0]


@pytest.mark.parametrize("abort", [False, True])
def test_commit_or_abort_revokes_the_write_grant(abort: bool) -> None:
    service, issuer, regions = _service()
    item = _grant_put(service, b"k")
    _check(issuer, regions, item.descriptor, base.Rights.WRITE)
    service.commit_puts(pb.CommitPutsRequest(namespace=NS, put_ids=[item.put_id], abort=abort))
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        _check(issuer, regions, item.descriptor, base.Rights.WRITE)
    assert len(issuer.grants) == 0


def test_release_revokes_the_read_grant() -> None:
    service, issuer, regions = _service()
    item = _grant_put(service, b"k")
    service.commit_puts(pb.CommitPutsRequest(namespace=NS, put_ids=[item.put_id]))
    got = service.grant_reads(pb.BatchGetRequest(namespace=NS, keys=[b"k"], principal=ALICE))
    assert isinstance(got, pb.BatchGetResponse)
    _check(issuer, regions, got.items[0].descriptor, base.Rights.READ)
    service.release_reads(pb.ReleaseReadsRequest(namespace=NS, lease_ids=[got.items[0].lease_id]))
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        _check(issuer, regions, got.items[0].descriptor, base.Rights.READ)


def test_the_sweep_revokes_grants_of_expired_puts_and_reads() -> None:
    clock = _Clock()
    service, issuer, _ = _service(clock)
    stuck = _grant_put(service, b"stuck")
    done = _grant_put(service, b"k")
    service.commit_puts(pb.CommitPutsRequest(namespace=NS, put_ids=[done.put_id]))
    service.grant_reads(pb.BatchGetRequest(namespace=NS, keys=[b"k"], principal=ALICE))
    assert len(issuer.grants) == 2  # the stuck put's and the read's
    clock.now += service.store.put_timeout_s + 1  # past the put's deadline and the read lease
    service.sweep()
    assert len(issuer.grants) == 0
    assert not issuer.revoke(stuck.descriptor.grant_id)


def test_a_freed_extent_still_named_by_a_live_grant_is_quarantined() -> None:
    service, issuer, _ = _service()
    store = service.store
    item = _grant_put(service, b"k")
    kept = base.Descriptor.from_proto(item.descriptor)
    # A pool that frees the extent without the block API (so nothing revoked the grant):
    ticket = service._puts[item.put_id]
    store.abort(ticket)
    stats = store.stats()
    assert stats.quarantined_bytes == ticket.extent.capacity
    assert stats.used_bytes == ticket.extent.capacity  # still charged while quarantined
    other = store.begin_put("bob", "m", b"b", 4096)
    assert other is not None
    assert other.extent.offset != kept.offset  # never handed out while the grant lives
    issuer.revoke(kept.grant_id)
    store.expire()  # the sweep returns it
    assert store.stats().quarantined_bytes == 0
    assert store.stats().used_bytes == other.extent.capacity


def test_an_allocation_retries_quarantined_extents_before_giving_up() -> None:
    busy: set[int] = set()
    store = block_store.BlockStore(
        1 * MIB, page_bytes=1 * MIB, reuse_guard=lambda offset, _n: offset in busy
    )
    tickets: list[block_store.PutTicket] = []
    while True:
        try:
            ticket = store.begin_put("a", "m", str(len(tickets)).encode(), 256 * 1024)
        except errors.Overloaded:
            break
        assert ticket is not None
        tickets.append(ticket)
    assert len(tickets) == 4
    for ticket in tickets:
        busy.add(ticket.extent.offset)  # a transport still moves bytes in every extent
        store.abort(ticket)
    assert store.stats().quarantined_bytes == 1 * MIB
    with pytest.raises(errors.Overloaded):  # nothing may be reused yet
        store.begin_put("b", "m", b"x", 256 * 1024)
    busy.discard(tickets[2].extent.offset)
    again = store.begin_put("b", "m", b"x", 256 * 1024)  # found without waiting for a sweep
    assert again is not None
    assert again.extent.offset == tickets[2].extent.offset
    assert store.stats("a").quarantined_bytes == 768 * 1024
    assert store.stats("b").quarantined_bytes == 0
