"""Unit tests of services.kvcache.store: two-phase puts, leases, TTL, quotas, isolation, eviction.

The store never touches bytes, so the tests play the data plane: a `ShadowArena` bytearray into
which puts write content at their extent, and from which reads check it by hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import random
from typing import Any

import pytest

from kvtier import errors
from services.kvcache import slab, store
from tests import seeds

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
ARENA_BYTES = 1 * MIB
PAGE_BYTES = 64 * KIB
T1, T2 = "tenant-a", "tenant-b"
NS = "llama-3-8b"


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class ShadowArena:
    """The arena's bytes as the data plane would see them."""

    def __init__(self, nbytes: int) -> None:
        self.mem = bytearray(nbytes)

    def write(self, extent: slab.Extent, data: bytes) -> None:
        assert len(data) == extent.requested <= extent.capacity
        self.mem[extent.offset : extent.offset + len(data)] = data

    def digest(self, extent: slab.Extent) -> str:
        return hashlib.sha256(
            self.mem[extent.offset : extent.offset + extent.requested]
        ).hexdigest()


def content(tag: str, size: int) -> bytes:
    """Deterministic bytes that differ for every tag."""
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclasses.dataclass
class Env:
    clock: FakeClock
    shadow: ShadowArena
    spilled: list[tuple[str, str, bytes, slab.Extent]]
    kv: store.BlockStore

    def put(
        self, tenant: str, key: bytes, size: int, tag: str = "", **kwargs: object
    ) -> store.PutTicket:
        """begin_put, write the content, commit; the ticket must be granted."""
        ticket = self.kv.begin_put(tenant, NS, key, size, **kwargs)  # type: ignore[arg-type]
        assert ticket is not None
        self.shadow.write(ticket.extent, content(tag or f"{tenant}/{key!r}", size))
        self.kv.commit(ticket)
        return ticket

    def read(self, tenant: str, key: bytes) -> str | None:
        """begin_get + digest + end_get; None on a miss."""
        lease = self.kv.begin_get(tenant, NS, key)
        if lease is None:
            return None
        try:
            return self.shadow.digest(lease.extent)
        finally:
            self.kv.end_get(lease)


def digest_of(tag: str, size: int) -> str:
    return hashlib.sha256(content(tag, size)).hexdigest()


def make_env(arena_bytes: int = ARENA_BYTES, **kwargs: object) -> Env:
    clock = FakeClock()
    spilled: list[tuple[str, str, bytes, slab.Extent]] = []

    def sink(tenant: str, namespace: str, key: bytes, extent: slab.Extent) -> None:
        spilled.append((tenant, namespace, key, extent))

    kv = store.BlockStore(
        arena_bytes,
        page_bytes=PAGE_BYTES,
        clock=clock,
        spill_sink=sink,
        **kwargs,  # type: ignore[arg-type]
    )
    return Env(clock, ShadowArena(arena_bytes), spilled, kv)


@pytest.fixture
def env() -> Env:
    return make_env()


def assert_disjoint(extents: list[slab.Extent], arena_bytes: int, context: str = "") -> None:
    """Extents lie inside the arena and do not overlap."""
    ordered = sorted(extents, key=lambda e: e.offset)
    for extent in ordered:
        assert extent.offset >= 0, context
        assert extent.offset + extent.capacity <= arena_bytes, context
    for a, b in itertools.pairwise(ordered):
        assert a.offset + a.capacity <= b.offset, (a, b, context)


def test_put_commit_get_round_trip() -> None:
    env = make_env(arena_bytes=4 * MIB)
    tickets = [env.put(T1, f"k{i}".encode(), (i + 1) * 3000) for i in range(20)]
    assert_disjoint([t.extent for t in tickets], 4 * MIB)
    assert env.spilled == []
    for i, ticket in enumerate(tickets):
        lease = env.kv.begin_get(T1, NS, f"k{i}".encode())
        assert lease is not None
        assert lease.extent == ticket.extent
        assert lease.extent.requested == (i + 1) * 3000
        assert env.shadow.digest(lease.extent) == digest_of(f"{T1}/{b'k%d' % i!r}", (i + 1) * 3000)
        env.kv.end_get(lease)
        env.kv.end_get(lease)  # idempotent
    stats = env.kv.stats()
    assert (stats.blocks, stats.puts, stats.hits, stats.misses) == (20, 20, 20, 0)
    assert stats.requested_bytes == sum(t.extent.requested for t in tickets)
    assert stats.used_bytes == sum(t.extent.capacity for t in tickets)
    assert env.kv.begin_get(T1, NS, b"absent") is None
    assert env.kv.stats().misses == 1


def test_put_if_absent_and_pending_conflict(env: Env) -> None:
    env.put(T1, b"k", 4096, tag="first")
    assert env.kv.begin_put(T1, NS, b"k", 4096) is None
    assert env.kv.stats(T1).put_conflicts == 1
    pending = env.kv.begin_put(T1, NS, b"p", 4096)
    assert pending is not None
    for overwrite in (False, True):
        with pytest.raises(errors.AlreadyExists):
            env.kv.begin_put(T1, NS, b"p", 4096, overwrite=overwrite)
    assert env.kv.stats(T1).pending_conflicts == 2
    env.kv.abort(pending)
    assert env.kv.begin_put(T1, NS, b"p", 4096) is not None
    assert env.read(T1, b"k") == digest_of("first", 4096)


def test_pending_put_is_invisible_until_commit(env: Env) -> None:
    ticket = env.kv.begin_put(T1, NS, b"k", 8192)
    assert ticket is not None
    assert env.kv.begin_get(T1, NS, b"k") is None
    assert env.kv.exists(T1, NS, [b"k"]) == [False]
    assert env.kv.lookup(T1, NS, [b"k"]) == 0
    assert env.kv.delete(T1, NS, [b"k"]) == 0
    assert env.kv.stats(T1).pending_puts == 1
    env.shadow.write(ticket.extent, content("v", 8192))
    env.kv.commit(ticket)
    assert env.kv.exists(T1, NS, [b"k"]) == [True]
    assert env.read(T1, b"k") == digest_of("v", 8192)
    with pytest.raises(errors.NotFound):
        env.kv.commit(ticket)


def test_abort_frees_and_is_idempotent(env: Env) -> None:
    ticket = env.kv.begin_put(T1, NS, b"k", 20000)
    assert ticket is not None
    assert env.kv.stats().used_bytes == ticket.extent.capacity
    env.kv.abort(ticket)
    env.kv.abort(ticket)
    stats = env.kv.stats()
    assert (stats.used_bytes, stats.requested_bytes, stats.pending_puts, stats.fill) == (0, 0, 0, 0)
    assert stats.tenant_bytes[T1] == 0
    with pytest.raises(errors.NotFound):
        env.kv.commit(ticket)
    assert env.kv.begin_get(T1, NS, b"k") is None


def test_stale_put_ticket_is_aborted_by_expire() -> None:
    env = make_env(put_timeout_s=10.0)
    ticket = env.kv.begin_put(T1, NS, b"k", 4096)
    assert ticket is not None
    env.clock.advance(10.0)
    env.kv.expire()
    assert env.kv.stats().used_bytes == 0
    with pytest.raises(errors.NotFound):
        env.kv.commit(ticket)
    assert env.kv.begin_put(T1, NS, b"k", 4096) is not None


def test_overwrite_keeps_old_readable_until_commit_and_leased_until_read(env: Env) -> None:
    old = env.put(T1, b"k", 4096, tag="old")
    new = env.kv.begin_put(T1, NS, b"k", 12288, overwrite=True)
    assert new is not None
    assert_disjoint([old.extent, new.extent], ARENA_BYTES)
    env.shadow.write(new.extent, content("new", 12288))
    assert env.read(T1, b"k") == digest_of("old", 4096)
    reader = env.kv.begin_get(T1, NS, b"k")
    assert reader is not None
    env.kv.commit(new)
    assert env.read(T1, b"k") == digest_of("new", 12288)
    # The old extent is unlinked but still held by the reader: not reusable yet.
    assert env.shadow.digest(reader.extent) == digest_of("old", 4096)
    assert env.kv.stats().used_bytes == old.extent.capacity + new.extent.capacity
    assert env.kv.stats().blocks == 1
    env.kv.end_get(reader)
    assert env.kv.stats().used_bytes == new.extent.capacity
    assert env.kv.stats().requested_bytes == 12288


def test_lookup_counts_leading_keys_of_a_chain(env: Env) -> None:
    chain = [hashlib.sha256(b"%d" % i).digest() for i in range(6)]
    for key in chain[:2] + chain[3:]:
        env.put(T1, key, 4096)
    assert env.kv.lookup(T1, NS, chain) == 2
    assert env.kv.exists(T1, NS, chain) == [True, True, False, True, True, True]
    env.put(T1, chain[2], 4096)
    assert env.kv.lookup(T1, NS, chain) == 6
    assert env.kv.lookup(T1, NS, []) == 0
    assert env.kv.lookup(T1, "other-model", chain) == 0
    env.kv.delete(T1, NS, [chain[0]])
    assert env.kv.lookup(T1, NS, chain) == 0


def test_lookup_ends_at_an_expired_block_and_checks_every_key(env: Env) -> None:
    """The run ends at a block whose TTL passed (unlinked on the way: a TTL eviction); a bad key
    or name is InvalidArgument wherever it is in the chain, past the run's end too."""
    chain = [b"c0", b"c1", b"c2"]
    env.put(T1, chain[0], 4096)
    env.put(T1, chain[1], 4096, ttl_s=5.0)
    env.put(T1, chain[2], 4096)
    assert env.kv.lookup(T1, NS, chain) == 3
    env.clock.advance(6.0)
    assert env.kv.lookup(T1, NS, chain) == 1
    assert env.kv.stats(T1).evictions["ttl"] == 1
    assert env.kv.exists(T1, NS, chain) == [True, False, True]
    # Keys of the present run are not checked one by one (they were when stored): a view or
    # an unhashable buffer equal to a present key is still refused.
    views = [memoryview(chain[0])], [chain[0], bytearray(chain[1])]
    for bad in ([b"absent", b""], [chain[0], b"x" * 2000], [chain[0], "text"], *views):
        with pytest.raises(errors.InvalidArgument):
            env.kv.lookup(T1, NS, bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        env.kv.lookup("", NS, chain)
    with pytest.raises(errors.InvalidArgument):
        env.kv.lookup(T1, "n" * 2000, chain)


def test_block_ttl_expires_and_touch_refreshes(env: Env) -> None:
    env.put(T1, b"short", 4096, ttl_s=10.0)
    env.put(T1, b"touched", 4096, ttl_s=10.0)
    env.put(T1, b"forever", 4096)
    env.clock.advance(6.0)
    assert env.kv.touch(T1, NS, [b"touched", b"absent"]) == 1
    env.clock.advance(4.0)
    assert env.kv.begin_get(T1, NS, b"short") is None  # expired on read and reclaimed
    assert env.kv.stats().used_bytes == 2 * 4096
    assert env.kv.expire() == 0
    env.clock.advance(6.0)
    assert env.kv.expire() == 1
    assert env.kv.exists(T1, NS, [b"short", b"touched", b"forever"]) == [False, False, True]
    assert env.kv.stats().evictions == {"capacity": 0, "ttl": 2, "delete": 0}
    assert env.kv.begin_put(T1, NS, b"short", 4096) is not None  # absent again


def test_namespace_ttl_is_the_default(env: Env) -> None:
    env.kv.set_namespace_ttl(T1, NS, 5.0)
    env.put(T1, b"default", 4096)
    env.put(T1, b"own", 4096, ttl_s=50.0)
    env.put(T2, b"default", 4096)  # another tenant's namespace of the same name
    env.clock.advance(5.0)
    assert env.kv.expire() == 1
    assert env.kv.exists(T1, NS, [b"default", b"own"]) == [False, True]
    assert env.kv.exists(T2, NS, [b"default"]) == [True]
    env.kv.set_namespace_ttl(T1, NS, None)
    env.put(T1, b"later", 4096)
    env.clock.advance(1000.0)
    env.kv.expire()
    assert env.kv.exists(T1, NS, [b"later", b"own"]) == [True, False]


def test_expired_leased_block_is_freed_when_read_ends(env: Env) -> None:
    env.put(T1, b"k", 4096, ttl_s=1.0, tag="v")
    lease = env.kv.begin_get(T1, NS, b"k", lease_s=30.0)
    assert lease is not None
    env.clock.advance(2.0)
    assert env.kv.expire() == 1
    assert env.kv.begin_get(T1, NS, b"k") is None
    assert env.shadow.digest(lease.extent) == digest_of("v", 4096)
    assert env.kv.stats().used_bytes == 4096
    env.kv.end_get(lease)
    assert env.kv.stats().used_bytes == 0


def test_quota_counts_pending_and_committed_bytes(env: Env) -> None:
    env.kv.set_quota(T1, 40000)
    env.put(T1, b"a", 20000)
    pending = env.kv.begin_put(T1, NS, b"b", 15000)
    assert pending is not None
    before = env.kv.stats()
    with pytest.raises(errors.QuotaExceeded):
        env.kv.begin_put(T1, NS, b"c", 5001)
    after = env.kv.stats()
    assert (after.used_bytes, after.pending_puts, after.quota_rejections) == (
        before.used_bytes,
        1,
        1,
    )
    assert env.kv.begin_get(T1, NS, b"c") is None
    env.put(T2, b"c", 60000)  # other tenants are not charged
    env.kv.abort(pending)
    env.put(T1, b"c", 20000)  # the aborted bytes came back
    with pytest.raises(errors.QuotaExceeded):
        env.kv.begin_put(T1, NS, b"d", 1)
    assert env.kv.delete(T1, NS, [b"a"]) == 1
    env.put(T1, b"d", 20000)  # the deleted bytes came back
    assert env.kv.stats(T1).tenant_bytes == {T1: 40000}
    env.kv.set_quota(T1, None)
    env.put(T1, b"e", 60000)
    with pytest.raises(errors.InvalidArgument):
        env.kv.set_quota(T1, -1)


def test_tenants_are_isolated(env: Env) -> None:
    keys = [b"k0", b"k1", b"k2"]
    a = [env.put(T1, k, 4096, tag=f"a{k!r}") for k in keys]
    b = [env.put(T2, k, 8192, tag=f"b{k!r}") for k in keys]
    assert_disjoint([t.extent for t in a + b], ARENA_BYTES)
    for k in keys:
        assert env.read(T1, k) == digest_of(f"a{k!r}", 4096)
        assert env.read(T2, k) == digest_of(f"b{k!r}", 8192)
    env.put(T1, b"only-a", 4096)
    assert env.kv.exists(T2, NS, [b"only-a"]) == [False]
    assert env.kv.lookup(T2, NS, [*keys, b"only-a"]) == 3
    assert env.kv.begin_get(T2, NS, b"only-a") is None
    assert env.kv.pin(T2, NS, [b"only-a"], 60.0) == 0
    assert env.kv.touch(T2, NS, [b"only-a"]) == 0
    assert env.kv.delete(T2, NS, [b"only-a"]) == 0
    assert env.kv.begin_put(T2, NS, b"only-a", 4096) is not None  # absent for T2
    # Deleting T1's keys leaves T2's.
    assert env.kv.delete(T1, NS, keys) == 3
    assert env.kv.exists(T1, NS, keys) == [False] * 3
    assert env.kv.exists(T2, NS, keys) == [True] * 3
    assert env.read(T2, b"k1") == digest_of("bb'k1'", 8192)
    # A forged lease naming another tenant is ignored.
    lease = env.kv.begin_get(T2, NS, b"k0")
    assert lease is not None
    env.kv.end_get(dataclasses.replace(lease, tenant=T1))
    assert env.kv.stats(T2).blocks == 3
    stats_a, stats_b = env.kv.stats(T1), env.kv.stats(T2)
    assert (stats_a.blocks, stats_a.evictions["delete"]) == (1, 3)
    assert (stats_b.blocks, stats_b.evictions["delete"]) == (0 + 3, 0)


def test_pin_of_one_tenant_does_not_protect_another() -> None:
    env = make_env(arena_bytes=4 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9)
    keys = [b"k%d" % i for i in range(4)]
    for k in keys:
        env.put(T1, k, PAGE_BYTES // 2)
        env.put(T2, k, PAGE_BYTES // 2)
    assert env.kv.pin(T1, NS, keys, 60.0) == 4
    for i in range(4):
        env.put(T1 if i % 2 else T2, b"new%d" % i, PAGE_BYTES // 2)
    assert env.kv.exists(T1, NS, keys) == [True] * 4
    assert env.kv.exists(T2, NS, keys) == [False] * 4
    assert {(t, k) for t, _, k, _ in env.spilled} == {(T2, k) for k in keys}


def test_all_pinned_is_overloaded_until_unpinned() -> None:
    env = make_env(
        arena_bytes=4 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9, max_pinned_fraction=1.0
    )
    keys = [b"k%d" % i for i in range(4)]
    for k in keys:
        env.put(T1, k, PAGE_BYTES)
    assert env.kv.pin(T1, NS, keys, 60.0) == 4
    with pytest.raises(errors.Overloaded):
        env.kv.begin_put(T2, NS, b"x", 4096)
    assert env.kv.stats(T2).overloads == 1
    assert env.spilled == []
    assert env.kv.unpin(T1, NS, keys[:1]) == 1
    env.put(T2, b"x", 4096)
    assert [k for _, _, k, _ in env.spilled] == [b"k0"]
    env.clock.advance(60.0)  # the other pins expired
    env.put(T2, b"y", PAGE_BYTES)
    assert len(env.spilled) == 2


@pytest.mark.parametrize("pin_s", [float("inf"), 1e12, float("nan"), 3600.5, 0.0, -1.0])
def test_endless_or_overlong_pins_are_refused(pin_s: float, env: Env) -> None:
    """Regression (issue 13): pin_s=inf was accepted, so one tenant could pin blocks forever."""
    env.put(T1, b"k", 4096)
    with pytest.raises(errors.InvalidArgument, match="pin_s"):
        env.kv.pin(T1, NS, [b"k"], pin_s)
    assert env.kv.pinned_bytes(T1) == 0
    assert env.kv.pin(T1, NS, [b"k"], 3600.0) == 1  # max_pin_s (the default) itself is fine


def test_max_pin_s_is_configurable() -> None:
    env = make_env(max_pin_s=10.0)
    env.put(T1, b"k", 4096)
    with pytest.raises(errors.InvalidArgument, match=r"at most 10\.0 s"):
        env.kv.pin(T1, NS, [b"k"], 10.5)
    assert env.kv.pin(T1, NS, [b"k"], 10.0) == 1


def test_a_tenant_cannot_pin_more_than_its_share_of_the_arena() -> None:
    env = make_env(arena_bytes=8 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9)
    keys = [b"k%d" % i for i in range(6)]
    for k in keys:
        env.put(T1, k, PAGE_BYTES)
        if k < b"k2":
            env.put(T2, k, PAGE_BYTES)
    # Half of the arena: four of the six pages; the keys past it stay unpinned.
    assert env.kv.pin(T1, NS, keys, 60.0) == 4
    assert env.kv.pinned_bytes(T1) == 4 * PAGE_BYTES
    assert env.kv.pin(T1, NS, keys, 60.0) == 4  # extending is free, the rest still refused
    assert env.kv.pin(T2, NS, keys, 60.0) == 2  # another tenant has a share of its own
    # The unpinned keys are evictable: a flood of T2 puts takes k4 and k5, never k0..k3.
    for i in range(2):
        env.put(T2, b"new%d" % i, PAGE_BYTES)
    assert env.kv.exists(T1, NS, keys) == [True] * 4 + [False] * 2
    # Unpinning or deleting gives the share back.
    assert env.kv.unpin(T1, NS, keys[:1]) == 1
    assert env.kv.delete(T1, NS, keys[1:2]) == 1
    assert env.kv.pinned_bytes(T1) == 2 * PAGE_BYTES
    env.put(T1, b"more", PAGE_BYTES // 2)
    assert env.kv.pin(T1, NS, [b"k0", b"more"], 60.0) == 2
    assert env.kv.pinned_bytes(T1) == 3 * PAGE_BYTES + PAGE_BYTES // 2


def test_expired_pins_stop_protecting_blocks_and_free_the_share() -> None:
    env = make_env(arena_bytes=4 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9)
    for k in (b"a", b"b"):
        env.put(T1, k, PAGE_BYTES)
    assert env.kv.pin(T1, NS, [b"a", b"b"], 10.0) == 2
    env.put(T1, b"c", PAGE_BYTES)
    assert env.kv.pin(T1, NS, [b"c"], 3600.0) == 0  # the share is taken
    env.clock.advance(5.0)
    assert env.kv.pin(T1, NS, [b"a"], 10.0) == 1  # extended to t+15
    env.clock.advance(5.0)  # b's pin ended, a's goes on
    assert env.kv.pinned_bytes(T1) == PAGE_BYTES
    assert env.kv.pin(T1, NS, [b"c"], 60.0) == 1
    env.put(T2, b"x", PAGE_BYTES)
    env.put(T2, b"y", PAGE_BYTES)  # the arena is full: b, unpinned since its pin ended, goes
    assert env.kv.exists(T1, NS, [b"a", b"b", b"c"]) == [True, False, True]
    env.clock.advance(5.0)  # a's extended pin ended too
    env.put(T2, b"z", PAGE_BYTES)
    assert env.kv.exists(T1, NS, [b"a", b"c"]) == [False, True]
    assert [k for t, _, k, _ in env.spilled if t == T1] == [b"b", b"a"]


def test_pin_bookkeeping_stays_bounded_under_repeated_pins(env: Env) -> None:
    env.put(T1, b"k", 4096)
    for _ in range(1000):
        assert env.kv.pin(T1, NS, [b"k"], 60.0) == 1
        assert env.kv.unpin(T1, NS, [b"k"]) == 1
    env.kv.pin(T1, NS, [b"k"], 60.0)
    state = env.kv._tenants[T1]
    assert len(state.pin_expiries) <= 2 * len(state.pins) + 65
    assert env.kv.pinned_bytes(T1) == 4096


def test_default_quota_applies_to_every_tenant_without_one() -> None:
    env = make_env(default_quota_bytes=40000)
    env.kv.set_quota(T1, 100000)  # an explicit quota overrides the default
    env.put("new-tenant", b"a", 40000)
    with pytest.raises(errors.QuotaExceeded, match="40000"):
        env.kv.begin_put("new-tenant", NS, b"b", 1)
    env.put(T1, b"a", 60000)
    env.put(T1, b"b", 30000)  # past the default, within its own quota
    with pytest.raises(errors.QuotaExceeded):
        env.kv.begin_put(T2, NS, b"a", 40001)
    assert env.kv.stats("new-tenant").quota_rejections == 1
    env.kv.set_quota("new-tenant", None)  # explicitly none: the default no longer applies
    env.put("new-tenant", b"b", 60000)


def test_leases_block_eviction_until_they_expire() -> None:
    env = make_env(arena_bytes=2 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9)
    env.put(T1, b"a", PAGE_BYTES, tag="a")
    env.put(T1, b"b", PAGE_BYTES, tag="b")
    leases = [env.kv.begin_get(T1, NS, k, lease_s=5.0) for k in (b"a", b"b")]
    with pytest.raises(errors.Overloaded):
        env.kv.begin_put(T1, NS, b"c", 4096)
    assert env.kv.stats().lease_waits == 1
    env.clock.advance(5.0)  # a crashed reader's leases lapse
    env.put(T1, b"c", 4096)
    assert len(env.spilled) == 1
    for lease in leases:
        assert lease is not None
        env.kv.end_get(lease)  # late and harmless


def test_delete_of_leased_block_frees_after_last_lease(env: Env) -> None:
    env.put(T1, b"k", 4096, tag="v")
    first, second = env.kv.begin_get(T1, NS, b"k"), env.kv.begin_get(T1, NS, b"k")
    assert first is not None
    assert second is not None
    assert env.kv.delete(T1, NS, [b"k"]) == 1
    assert env.kv.begin_get(T1, NS, b"k") is None
    env.put(T1, b"k", 4096, tag="w")  # a fresh block under the same key, elsewhere
    assert env.read(T1, b"k") == digest_of("w", 4096)
    env.kv.end_get(first)
    assert env.shadow.digest(second.extent) == digest_of("v", 4096)
    assert env.kv.stats().used_bytes == 2 * 4096
    env.kv.end_get(second)
    assert env.kv.stats().used_bytes == 4096


def test_watermarks_evict_to_low_and_spill_victims() -> None:
    env = make_env(arena_bytes=16 * PAGE_BYTES, high_watermark=0.75, low_watermark=0.5)
    tickets = {b"k%d" % i: env.put(T1, b"k%d" % i, PAGE_BYTES) for i in range(13)}
    stats = env.kv.stats()
    assert stats.fill <= 0.75
    assert stats.evictions["capacity"] == len(env.spilled) > 0
    assert stats.lease_waits == 0  # watermark eviction, not allocation failure
    for tenant, namespace, key, extent in env.spilled:
        assert (tenant, namespace) == (T1, NS)
        assert extent == tickets[key].extent
        assert not env.kv.exists(T1, NS, [key])[0]
    assert stats.blocks == 13 - len(env.spilled)
    assert stats.used_bytes == stats.blocks * PAGE_BYTES


def test_failing_spill_sink_drops_the_block() -> None:
    def sink(tenant: str, namespace: str, key: bytes, extent: slab.Extent) -> None:
        raise RuntimeError("durable tier down")

    kv = store.BlockStore(
        2 * PAGE_BYTES,
        page_bytes=PAGE_BYTES,
        spill_sink=sink,
        high_watermark=1.0,
        low_watermark=0.9,
    )
    for key in (b"a", b"b", b"c"):
        ticket = kv.begin_put(T1, NS, key, PAGE_BYTES)
        assert ticket is not None
        kv.commit(ticket)
    assert kv.stats().evictions["capacity"] == 1
    assert kv.stats().blocks == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda kv: kv.begin_put(T1, NS, b"", 4096), "key"),
        (lambda kv: kv.begin_put(T1, NS, b"x" * (store.MAX_KEY_BYTES + 1), 4096), "key"),
        (lambda kv: kv.begin_put(T1, NS, b"k", 0), "size"),
        (lambda kv: kv.begin_put(T1, NS, b"k", PAGE_BYTES + 1), "size"),
        (lambda kv: kv.begin_put(T1, NS, b"k", 1, ttl_s=0), "ttl_s"),
        (lambda kv: kv.begin_put("", NS, b"k", 1), "tenant"),
        (lambda kv: kv.begin_get(T1, NS, b"k", lease_s=0), "lease_s"),
        (lambda kv: kv.exists(T1, NS, [b"ok", b""]), "key"),
        (lambda kv: kv.pin(T1, NS, [b"k"], -1.0), "pin_s"),
        (lambda kv: kv.set_namespace_ttl(T1, "n" * 1025, 1.0), "namespace"),
    ],
)
def test_invalid_arguments(call: object, match: str, env: Env) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        call(env.kv)  # type: ignore[operator]
    assert env.kv.stats().used_bytes == 0


def test_max_key_length_is_accepted(env: Env) -> None:
    env.put(T1, b"x" * store.MAX_KEY_BYTES, 4096)
    assert env.kv.exists(T1, NS, [b"x" * store.MAX_KEY_BYTES]) == [True]


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="policy"):
        store.BlockStore(PAGE_BYTES, page_bytes=PAGE_BYTES, policy="fifo")
    with pytest.raises(ValueError, match="watermark"):
        store.BlockStore(PAGE_BYTES, page_bytes=PAGE_BYTES, high_watermark=0.5, low_watermark=0.6)
    bad: dict[str, Any]
    for bad in (
        {"max_pin_s": float("inf")},
        {"max_pin_s": 0.0},
        {"max_pinned_fraction": 0.0},
        {"max_pinned_fraction": 1.5},
        {"default_quota_bytes": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            store.BlockStore(PAGE_BYTES, page_bytes=PAGE_BYTES, **bad)


SEEDS = [1, 2, seeds.RUN_SEED]


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
@pytest.mark.parametrize("seed", SEEDS)
def test_leased_and_pinned_blocks_survive_1000_evicting_puts(seed: int, policy: str) -> None:
    """A reader holds leases on random blocks while 1000 puts force evictions.

    A model tracks every live extent (committed minus spilled, plus pending): a new extent must
    never overlap one, a leased or pinned block must never be spilled, and every read returns
    the bytes its put wrote.
    """
    log.info("seed=%d policy=%s (rerun with KVTIER_TEST_SEED=%d)", seed, policy, seed)
    rng = random.Random(seed)
    ctx = f"seed={seed} policy={policy}"
    arena_bytes = 32 * PAGE_BYTES
    env = make_env(arena_bytes=arena_bytes, policy=policy)
    live: dict[bytes, tuple[slab.Extent, str]] = {}  # committed, not yet spilled
    pending: dict[bytes, store.PutTicket] = {}
    leases: dict[int, tuple[store.ReadLease, str]] = {}
    pinned: set[bytes] = set()
    spilled_total = 0
    overloaded = 0

    def check_spills() -> None:
        nonlocal spilled_total
        leased_keys = {lease.key for lease, _ in leases.values()}
        for _, _, key, extent in env.spilled:
            assert key not in leased_keys, (key, ctx)
            assert key not in pinned, (key, ctx)
            assert live.pop(key)[0] == extent, ctx
        spilled_total += len(env.spilled)
        env.spilled.clear()

    for step in range(1000):
        env.clock.advance(0.001)
        key = b"blk-%d" % step
        size = rng.choice([4096, 5000, 16384, 40000, PAGE_BYTES // 2, PAGE_BYTES])
        try:
            ticket = env.kv.begin_put(T1, NS, key, size)
        except errors.Overloaded:
            overloaded += 1
            ticket = None
        check_spills()
        if ticket is not None:
            others = [e for e, _ in live.values()] + [t.extent for t in pending.values()]
            assert_disjoint([*others, ticket.extent], arena_bytes, ctx)
            env.shadow.write(ticket.extent, content(f"{step}", size))
            pending[key] = ticket
        # Finish some pending puts (a few stay in flight for a while).
        for pkey in [k for k in pending if rng.random() < 0.6]:
            done = pending.pop(pkey)
            if rng.random() < 0.1:
                env.kv.abort(done)
            else:
                env.kv.commit(done)
                live[pkey] = (done.extent, digest_of(pkey.decode()[4:], done.extent.requested))
        # The reader: take leases on random live blocks, check and end some.
        if live and len(leases) < 6 and rng.random() < 0.5:
            rkey = rng.choice(list(live))
            lease = env.kv.begin_get(T1, NS, rkey, lease_s=3600.0)
            assert lease is not None, ctx
            assert lease.extent == live[rkey][0], ctx
            leases[lease.lease_id] = (lease, live[rkey][1])
        for lease_id in [i for i in leases if rng.random() < 0.15]:
            lease, expected = leases.pop(lease_id)
            assert env.shadow.digest(lease.extent) == expected, (lease.key, ctx)
            env.kv.end_get(lease)
        if live and len(pinned) < 3 and rng.random() < 0.05:
            pkey = rng.choice(list(live))
            assert env.kv.pin(T1, NS, [pkey], 3600.0) == 1
            pinned.add(pkey)
        if pinned and rng.random() < 0.03:
            ukey = pinned.pop()
            env.kv.unpin(T1, NS, [ukey])
        stats = env.kv.stats()
        assert stats.blocks == len(live), ctx
        assert stats.pending_puts == len(pending), ctx
        assert stats.used_bytes == sum(e.capacity for e, _ in live.values()) + sum(
            t.extent.capacity for t in pending.values()
        ), ctx
    for lease, expected in leases.values():
        assert env.shadow.digest(lease.extent) == expected, (lease.key, ctx)
        env.kv.end_get(lease)
    assert all(env.kv.exists(T1, NS, list(pinned))), ctx
    for key, (_, expected) in live.items():
        assert env.read(T1, key) == expected, (key, ctx)
    stats = env.kv.stats()
    log.info("%s: %d spilled, %d overloaded, %s", ctx, spilled_total, overloaded, stats)
    assert spilled_total > 500, ctx  # the puts really did force evictions
    assert overloaded < 50, ctx
    assert stats.evictions["capacity"] == spilled_total, ctx
    assert 0.0 <= stats.internal_fragmentation <= 1.0
    assert 0.0 <= stats.external_fragmentation <= 1.0


def test_crashed_reader_of_a_deleted_block_does_not_hold_memory_forever() -> None:
    env = make_env(arena_bytes=2 * PAGE_BYTES, high_watermark=1.0, low_watermark=0.9)
    env.put(T1, b"a", PAGE_BYTES)
    env.put(T1, b"b", PAGE_BYTES)
    lease = env.kv.begin_get(T1, NS, b"a", lease_s=5.0)
    assert lease is not None
    assert env.kv.pin(T1, NS, [b"b"], 60.0) == 1
    assert env.kv.delete(T1, NS, [b"a"]) == 1
    with pytest.raises(errors.Overloaded):
        env.kv.begin_put(T1, NS, b"c", PAGE_BYTES)
    env.clock.advance(5.0)  # the reader never calls end_get
    env.put(T1, b"c", PAGE_BYTES)  # the put reclaims the lapsed lease's block itself
    assert env.spilled == []
    env.kv.end_get(lease)
    assert env.kv.stats().used_bytes == 2 * PAGE_BYTES
