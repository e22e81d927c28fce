"""Device-independent pieces of the data plane: grants, tokens, leases, budgets, negotiation."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, grants, registry

RW = base.Rights.READ | base.Rights.WRITE


@pytest.fixture
def regions() -> base.RegionTable:
    table = base.RegionTable()
    table.create(1 << 20)
    return table


def _check(issuer: base.Issuer, regions: base.RegionTable, d: base.Descriptor, who: str) -> None:
    issuer.check(
        regions, who, base.Rights.READ, d.region_id, d.offset, d.length, d.rights,
        d.expires_at_ms, d.mac, d.grant_id,
    )  # fmt: skip


def test_grant_and_check_round_trip_through_the_wire_form(regions: base.RegionTable) -> None:
    issuer = base.Issuer("n1")
    region = regions.get(1)
    desc = issuer.grant(region, 4096, 100, RW, "alice")
    again = base.Descriptor.from_proto(desc.to_proto())
    assert again == desc
    _check(issuer, regions, again, "alice")


@pytest.mark.parametrize(
    "change",
    [
        {"offset": 0},
        {"length": 101},
        {"region_id": 2},
        {"expires_at_ms": 1},
        {"mac": bytes(16)},
        {"grant_id": 2},
    ],
)
def test_any_altered_field_is_rejected(regions: base.RegionTable, change: dict[str, int]) -> None:
    issuer = base.Issuer("n1")
    desc = replace(issuer.grant(regions.get(1), 4096, 100, RW, "alice"), **change)  # type: ignore[arg-type]
    with pytest.raises(base.DescriptorRejected):
        _check(issuer, regions, desc, "alice")


def test_principal_expiry_and_other_issuers(regions: base.RegionTable) -> None:
    issuer = base.Issuer("n1")
    desc = issuer.grant(regions.get(1), 0, 10, RW, "alice")
    with pytest.raises(base.DescriptorRejected):
        _check(issuer, regions, desc, "bob")
    with pytest.raises(base.DescriptorRejected):
        _check(base.Issuer("n1"), regions, desc, "alice")  # another key (a restarted node)
    with pytest.raises(base.DescriptorExpired):
        _check(issuer, regions, issuer.grant(regions.get(1), 0, 10, RW, "alice", -1), "alice")
    with pytest.raises(errors.InvalidArgument):
        issuer.grant(regions.get(1), (1 << 20) - 5, 10, RW, "alice")


def test_tokens() -> None:
    issuer = base.Issuer("n1")
    token, expires = issuer.issue_token("client-7", transport="tcp")
    assert expires > base.now_ms()
    assert issuer.check_token(token, "tcp") == "client-7"
    for bad in (
        token[:-1] + bytes([token[-1] ^ 1]),
        b"short",
        base.Issuer("n1").issue_token("x", transport="tcp")[0],
    ):
        with pytest.raises(errors.PermissionDenied):
            issuer.check_token(bad, "tcp")
    with pytest.raises(errors.PermissionDenied):
        issuer.check_token(issuer.issue_token("late", ttl_s=-1, transport="tcp")[0], "tcp")


@pytest.mark.parametrize(("issued", "presented"), [("tcp", "shm"), ("shm", "tcp"), ("tcp", "rdma")])
def test_a_token_is_only_good_for_its_transport(issued: str, presented: str) -> None:
    issuer = base.Issuer("n1")
    token, _ = issuer.issue_token("client-7", transport=issued)
    with pytest.raises(errors.PermissionDenied, match=f"issued for {issued}, not {presented}"):
        issuer.check_token(token, presented)


def test_revoked_grants_are_refused_and_forgotten(regions: base.RegionTable) -> None:
    issuer = base.Issuer("n1")
    region = regions.get(1)
    first = issuer.grant(region, 0, 4096, RW, "alice")
    second = issuer.grant(region, 0, 4096, RW, "alice")
    assert first.grant_id != second.grant_id
    assert issuer.in_use(1, 4095, 1)
    assert not issuer.in_use(1, 4096, 100)
    assert issuer.revoke(first.grant_id)
    assert not issuer.revoke(first.grant_id)  # idempotent
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        _check(issuer, regions, first, "alice")
    _check(issuer, regions, second, "alice")  # another grant of the same range is untouched
    assert issuer.in_use(1, 0, 10)
    issuer.revoke(second.grant_id)
    assert not issuer.in_use(1, 0, 4096)
    assert len(issuer.grants) == 0


def test_grant_table_drops_expired_grants_and_finds_overlaps() -> None:
    mib = 1 << 20
    table = grants.GrantTable()
    table.add(1, 1, 1000, 100, until_ms=50, now=0)
    table.add(2, 1, mib // 2, 3 * mib, until_ms=500, now=0)  # spans four 1 MiB buckets
    table.add(3, 2, 0, 10, until_ms=500, now=0)
    assert table.overlaps(1, 1099, 1, now=10)
    assert not table.overlaps(1, 1100, 1, now=10)
    assert table.overlaps(1, 3 * mib + mib // 2 - 1, 5, now=10)  # the far end of grant 2
    assert not table.overlaps(1, 3 * mib + mib // 2, 5, now=10)
    assert not table.overlaps(2, 10, mib, now=10)  # another region's range ends before
    assert not table.overlaps(1, 1000, 100, now=60)  # expired, though still listed
    table.add(4, 1, 0, 1, until_ms=500, now=100)  # adding drops the expired grant 1
    assert len(table) == 3
    assert not table.is_live(1, now=0)
    assert table.revoke(2)
    assert not table.overlaps(1, mib, mib, now=100)
    assert table.expire(now=1000) == 2
    assert len(table) == 0


def test_grant_table_costs_stay_flat_with_many_grants() -> None:
    """A batch of 16384 grants (BatchGet's most keys) is added, looked up and revoked quickly."""
    table = grants.GrantTable()
    started = time.perf_counter()
    for i in range(16384):
        table.add(i, 1, ((i * 7919) % 16384) * 65536, 65536, until_ms=10**12, now=0)
    for i in range(16384):
        assert table.overlaps(1, i * 65536, 65536, now=0)
    for i in range(16384):
        table.revoke(i)
    assert time.perf_counter() - started < 2.0  # ~0.2 s on the 2-vCPU VM
    assert len(table) == 0


def test_connections_are_counted_per_identity() -> None:
    counts = grants.ConnectionCounts()
    assert grants.identity_of("acme/AKID/1f2e") == "acme/AKID"
    who = [counts.admit(f"acme/AKID/{i}", limit=2) for i in range(2)]
    with pytest.raises(errors.Overloaded):
        counts.admit("acme/AKID/new", limit=2)
    counts.admit("acme/OTHER/1", limit=2)  # another identity has its own count
    counts.release(who[0])
    counts.admit("acme/AKID/again", limit=2)
    assert counts.count("acme/AKID/x") == 2


def test_lease_table() -> None:
    leases = base.LeaseTable()
    owner_a, owner_b = object(), object()
    far = base.now_ms() + 60_000
    first = leases.acquire(1, 100, 50, owner_a, far)
    leases.acquire(1, 1000, 10, owner_b, far)
    leases.acquire(2, 0, 10, owner_a, base.now_ms() - 1)  # already over
    assert leases.overlaps(1, 149, 10)
    assert not leases.overlaps(1, 150, 10)
    assert not leases.overlaps(2, 0, 10)
    assert leases.expire() == 1
    leases.release(first)
    leases.release(first)
    assert not leases.overlaps(1, 100, 50)
    assert leases.release_owner(owner_b) == 1
    assert len(leases) == 0


async def test_byte_budget_bounds_bytes_in_flight() -> None:
    budget = base.ByteBudget(100)
    peak = 0

    async def op(n: int) -> None:
        nonlocal peak
        await budget.acquire(n)
        peak = max(peak, budget.used_bytes)
        await asyncio.sleep(0.001)
        await budget.release(n)

    await asyncio.gather(*(op(n) for n in [60, 30, 30, 250, 10, 90]))
    assert peak == 250  # the oversized request ran alone
    assert budget.used_bytes == 0
    budget2 = base.ByteBudget(100)
    peaks: list[int] = []

    async def small() -> None:
        await budget2.acquire(40)
        peaks.append(budget2.used_bytes)
        await asyncio.sleep(0.001)
        await budget2.release(40)

    await asyncio.gather(*(small() for _ in range(10)))
    assert max(peaks) <= 100


def test_as_buffer_accepts_buffer_protocol_objects_without_copy() -> None:
    arr = np.arange(10, dtype=np.int64)
    view = base.as_buffer(arr, writable=True)
    assert view.nbytes == 80
    assert view.format == "B"
    view[0] = 7
    assert arr[0] == 7  # same memory
    with pytest.raises(errors.InvalidArgument):
        base.as_buffer(b"readonly", writable=True)
    with pytest.raises(errors.InvalidArgument):
        base.as_buffer(np.zeros((4, 4))[:, 1], writable=False)
    with pytest.raises(errors.InvalidArgument):
        base.as_buffer(object(), writable=False)


def _caps(host: str, *names: str) -> common_pb2.DataPlaneCapabilities:
    return common_pb2.DataPlaneCapabilities(
        host_id=host, endpoints=[common_pb2.TransportEndpoint(name=n, address=n) for n in names]
    )


def test_choose_prefers_rdma_then_shm_then_tcp() -> None:
    server = _caps("h1", "tcp", "shm", "rdma")
    assert registry.choose(server, _caps("h1", "tcp", "shm", "rdma")).name == "rdma"
    assert registry.choose(server, _caps("h1", "tcp", "shm")).name == "shm"
    assert registry.choose(server, _caps("h2", "tcp", "shm")).name == "tcp"  # shm: same host only
    assert registry.choose(server, _caps("h1", "tcp", "shm"), ["tcp"]).name == "tcp"
    with pytest.raises(errors.Unavailable):
        registry.choose(_caps("h1", "shm"), _caps("h2", "shm", "tcp"))
    with pytest.raises(errors.InvalidArgument):
        registry.load("carrier-pigeon")


def test_choose_gives_shm_and_rdma_only_to_trusted_callers() -> None:
    server = _caps("h1", "tcp", "shm", "rdma")
    everything = _caps("h1", "tcp", "shm", "rdma")
    assert registry.choose(server, everything, trusted=False).name == "tcp"
    with pytest.raises(errors.PermissionDenied, match="shm hand out a node's whole memory"):
        registry.choose(server, everything, ["shm"], trusted=False)
    with pytest.raises(errors.PermissionDenied, match="rdma and shm"):
        registry.choose(server, _caps("h1", "shm", "rdma"), trusted=False)
    with pytest.raises(errors.Unavailable):  # nothing common at all: not a trust question
        registry.choose(_caps("h1", "tcp"), _caps("h1", "shm"), trusted=False)


def test_region_is_shared_memory_and_closes() -> None:
    region = base.Region(9, 8192)
    region.view[:5] = b"hello"
    with open(f"/proc/self/fd/{region.fd}", "rb") as other:
        assert other.read(5) == b"hello"
    region.close()
    region.close()
