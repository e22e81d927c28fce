"""Device-independent pieces of the data plane: grants, tokens, leases, budgets, negotiation."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

RW = base.Rights.READ | base.Rights.WRITE


@pytest.fixture
def regions() -> base.RegionTable:
    table = base.RegionTable()
    table.create(1 << 20)
    return table


def _check(issuer: base.Issuer, regions: base.RegionTable, d: base.Descriptor, who: str) -> None:
    issuer.check(
        regions, who, base.Rights.READ, d.region_id, d.offset, d.length, d.rights,
        d.expires_at_ms, d.mac,
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
    token, expires = issuer.issue_token("client-7")
    assert expires > base.now_ms()
    assert issuer.check_token(token) == "client-7"
    for bad in (
        token[:-1] + bytes([token[-1] ^ 1]),
        b"short",
        base.Issuer("n1").issue_token("x")[0],
    ):
        with pytest.raises(errors.PermissionDenied):
            issuer.check_token(bad)
    with pytest.raises(errors.PermissionDenied):
        issuer.check_token(issuer.issue_token("late", ttl_s=-1)[0])


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


def test_region_is_shared_memory_and_closes() -> None:
    region = base.Region(9, 8192)
    region.view[:5] = b"hello"
    with open(f"/proc/self/fd/{region.fd}", "rb") as other:
        assert other.read(5) == b"hello"
    region.close()
    region.close()
