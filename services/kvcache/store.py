"""The block store of a kvcache node: (tenant, namespace, key) -> an extent of the node's arena.

Pure in-memory bookkeeping. The arena is a `kvtier.transport.base.Region` owned by the caller,
which moves the bytes over the data plane; this module only decides which offsets hold which
block, and when they may be reused. It never imports grpc itself and is not thread-safe: the
node owns one store and calls it from its event loop.

Lifecycle of a block:

- pending: `begin_put` allocates an extent and returns a `PutTicket`; the block is invisible.
- linked: `commit` makes it visible under its key and hands it to the eviction policy.
- unlinked: delete, TTL expiry, eviction or an overwrite's commit removes it from the index.
- freed: its extent returns to the allocator once no live read lease holds it.

Tenants are isolated by construction: every index key starts with the tenant, so no request of
one tenant can name, probe, lease, pin or delete another tenant's block. Capacity eviction is
the one shared effect; per-tenant quotas bound it.

The durable tier plugs in at two points: `spill_admit` says whether a capacity victim may go
now (a durable namespace's block may not while the spill buffer is full: it is skipped in place,
like a leased block), and `spill_sink` receives each victim before its extent is freed. A block
whose durable copy is known to be current (`commit(durable=True)`, `mark_durable`) is evicted
without either.

Contract with the data plane: a write grant for a ticket must expire before `put_timeout_s`, and
a read grant for a lease before the lease does, and the caller revokes a grant when its ticket or
lease ends. As a second line, `reuse_guard(offset, length)` says whether a transport still moves
bytes in a range or a live grant still names it: an extent freed while it says so is
*quarantined* (still charged as used, `StoreStats.quarantined_bytes`) and only returned to the
allocator once it says no (retried by `expire` and when an allocation finds no room), so a
descriptor that outlives its ticket or lease never reaches another block's bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kvtier import errors
from services.kvcache import eviction, slab

log = logging.getLogger(__name__)

#: The longest key accepted (chained prefix hashes are far shorter): 1024 bytes, plus room for
#: the short prefixes S3 KV buckets put before an S3 key (up to 1024 bytes) in their block keys.
MAX_KEY_BYTES = 1024 + 16
#: The longest namespace name accepted.
MAX_NAMESPACE_BYTES = 1024

#: Called with (tenant, namespace, key, extent) for each capacity victim before it is freed.
SpillSink = Callable[[str, str, bytes, slab.Extent], None]
#: Called with (tenant, namespace, key, requested bytes) for a capacity-eviction candidate that
#: would go to the spill sink; False keeps it (skipped in place). True promises the sink call.
SpillAdmit = Callable[[str, str, bytes, int], bool]
Clock = Callable[[], float]
#: Called with (offset, length) of an extent about to be freed: True while the data plane still
#: uses the range (a transport lease or a live grant), so it must not be reused yet.
ReuseGuard = Callable[[int, int], bool]

_Ident = tuple[str, str, bytes]


class BlockListener(Protocol):
    """Told synchronously of every block that becomes visible and every one that leaves the
    index (KV events). Must be cheap and must not raise: it runs on the data path."""

    def linked(self, tenant: str, namespace: str, key: bytes, tag: object) -> None: ...

    def unlinked(
        self, tenant: str, namespace: str, key: bytes, tag: object, cause: EvictionCause | None
    ) -> None:
        """cause None: replaced by an overwrite (linked is called for the new block next)."""


class EvictionCause(enum.StrEnum):
    """Why a block left the index (the label of the evictions counters)."""

    CAPACITY = "capacity"
    TTL = "ttl"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True, slots=True)
class PutTicket:
    """A pending put: write `extent.requested` bytes at `extent.offset`, then commit or abort.

    `ttl_s` is the block's effective TTL (the namespace default when the put named none);
    `deadline_s` is when `expire` aborts the ticket if it is still pending (store clock).
    """

    ticket_id: int
    tenant: str
    namespace: str
    key: bytes
    extent: slab.Extent
    ttl_s: float | None
    deadline_s: float
    #: The put replaces a present block (rather than put-if-absent).
    overwrite: bool = False
    #: Opaque to the store, kept with the block and handed to the listener (KV events: the
    #: engine's block hashes).
    tag: object = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReadLease:
    """A read of `extent`: the store will not reuse it before `end_get` or `expires_at_s`."""

    lease_id: int
    tenant: str
    namespace: str
    key: bytes
    extent: slab.Extent
    expires_at_s: float
    #: The block's xxh3-64 as committed (None: committed without one).
    checksum: int | None = None


@dataclasses.dataclass(eq=False, slots=True)
class _Block:
    ident: _Ident
    block_id: int
    extent: slab.Extent
    ttl_s: float | None
    expires_at_s: float | None
    pinned_until_s: float = 0.0
    leases: dict[int, float] = dataclasses.field(default_factory=dict)  # lease id -> deadline
    linked: bool = True
    # The durable tier holds this very version: eviction drops it without spilling.
    durable: bool = False
    checksum: int | None = None  # xxh3-64 of its bytes, as committed
    tag: object = None  # the put's PutTicket.tag


@dataclasses.dataclass(slots=True)
class _Tenant:
    quota_bytes: int | None = None
    # Blocks with a pin (block id -> block) and their slot bytes: what max_pinned_fraction
    # bounds. Each has an entry in pin_expiries (until_s, block id), re-queued when the pin was
    # extended and dropped (with the block) once the pin has ended.
    pins: dict[int, _Block] = dataclasses.field(default_factory=dict)
    pinned_bytes: int = 0
    pin_expiries: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    # Requested and capacity bytes of every extent the tenant holds: pending, linked, and
    # unlinked-but-leased. Quota counts requested bytes, so it is independent of slab classes.
    held_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0
    pending_puts: int = 0
    hits: int = 0
    misses: int = 0
    durable_hits: int = 0
    puts: int = 0
    put_conflicts: int = 0
    pending_conflicts: int = 0
    quota_rejections: int = 0
    lease_waits: int = 0
    overloads: int = 0
    corrupt_blocks: int = 0
    evictions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


_COUNTERS = (
    "hits misses durable_hits puts put_conflicts pending_conflicts quota_rejections lease_waits"
    " overloads corrupt_blocks"
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StoreStats:
    """A snapshot of the store, for one tenant or (tenant None) for the whole node.

    Block, byte and counter fields cover the tenant asked for; `arena_bytes`, `fill` and the
    fragmentation numbers always describe the whole arena. `used_bytes` counts slot capacity,
    `requested_bytes` what callers asked for; both include pending puts and unlinked blocks
    still held by a lease. Capacity evictions are charged to the victim's tenant.
    """

    tenant: str | None
    blocks: int
    pending_puts: int
    used_bytes: int
    requested_bytes: int
    arena_bytes: int
    #: used / arena bytes over the whole arena.
    fill: float
    #: Reads served from DRAM.
    hits: int
    #: Reads that found the key in neither tier.
    misses: int
    #: DRAM misses served from the durable tier (read-through, `record_reads`).
    durable_hits: int
    #: Committed puts.
    puts: int
    #: begin_put found the key present and did not overwrite (put-if-absent).
    put_conflicts: int
    #: begin_put raced another pending put of the same key (AlreadyExists).
    pending_conflicts: int
    quota_rejections: int
    #: begin_put calls that had to evict before their allocation fit.
    lease_waits: int
    #: begin_put calls refused with Overloaded.
    overloads: int
    #: Blocks unlinked by cause (capacity, ttl, delete); every cause is present.
    evictions: dict[str, int]
    #: Tenant -> requested bytes held (the quota measure).
    tenant_bytes: dict[str, int]
    internal_fragmentation: float
    external_fragmentation: float
    #: Slot bytes freed but held back while the data plane still used them (`reuse_guard`);
    #: included in used_bytes.
    quarantined_bytes: int = 0
    #: Blocks dropped because their bytes did not match their checksum (`record_corrupt`).
    corrupt_blocks: int = 0


def _make_policy(name: str, capacity_bytes: int) -> eviction.EvictionPolicy[_Ident]:
    if name == "s3fifo":
        return eviction.S3FIFOPolicy[_Ident](capacity_bytes)
    if name == "lru":
        return eviction.LRUPolicy[_Ident](capacity_bytes)
    raise ValueError(f"policy must be 's3fifo' or 'lru', got {name!r}")


def _check_names(tenant: str, namespace: str) -> None:
    """InvalidArgument for an empty tenant or a namespace longer than MAX_NAMESPACE_BYTES."""
    if not isinstance(tenant, str) or not tenant:
        raise errors.InvalidArgument("tenant must be a non-empty string")
    if not isinstance(namespace, str) or len(namespace.encode()) > MAX_NAMESPACE_BYTES:
        raise errors.InvalidArgument(f"namespace must be a string of <= {MAX_NAMESPACE_BYTES} B")


def _ident(tenant: str, namespace: str, key: bytes) -> _Ident:
    """The index key; InvalidArgument for a bad tenant, namespace or key."""
    _check_names(tenant, namespace)
    if not isinstance(key, bytes):
        raise errors.InvalidArgument(f"key must be bytes, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise errors.InvalidArgument(
            f"key of {len(key)} bytes: keys must be 1..{MAX_KEY_BYTES} bytes"
        )
    return (tenant, namespace, key)


def _check_duration(name: str, value_s: float | None, *, optional: bool) -> None:
    if value_s is None and optional:
        return
    if value_s is None or not value_s > 0:
        raise errors.InvalidArgument(f"{name} must be > 0 seconds, got {value_s}")


def _drop(tenant: str, namespace: str, key: bytes, extent: slab.Extent) -> None:
    """The default spill sink: evicted blocks are dropped."""


def _admit_all(tenant: str, namespace: str, key: bytes, nbytes: int) -> bool:
    """The default spill admission: every victim may go."""
    return True


class BlockStore:
    """The index, allocator and eviction of one kvcache node's arena (see the module docstring).

    Bounds on what one tenant can hold: a pin lasts at most `max_pin_s`, a tenant's pinned
    blocks hold at most `max_pinned_fraction` of the arena (slot bytes), and a tenant with no
    quota of its own (`set_quota`) gets `default_quota_bytes` (None: no quota).

    Raises ValueError for an invalid geometry (see `slab.SlabAllocator`), an unknown policy,
    watermarks outside 0 < low < high <= 1, or invalid bounds. Request errors are `kvtier.errors`.
    """

    def __init__(
        self,
        arena_bytes: int,
        *,
        page_bytes: int = slab.DEFAULT_PAGE_BYTES,
        policy: str = "s3fifo",
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        clock: Clock = time.monotonic,
        spill_sink: SpillSink = _drop,
        spill_admit: SpillAdmit = _admit_all,
        put_timeout_s: float = 30.0,
        max_pin_s: float = 3600.0,
        max_pinned_fraction: float = 0.5,
        default_quota_bytes: int | None = None,
        reuse_guard: ReuseGuard | None = None,
    ) -> None:
        if not 0.0 < low_watermark < high_watermark <= 1.0:
            raise ValueError(
                f"need 0 < low_watermark < high_watermark <= 1, got {low_watermark}, "
                f"{high_watermark}"
            )
        if not put_timeout_s > 0:
            raise ValueError(f"put_timeout_s must be > 0, got {put_timeout_s}")
        if not (math.isfinite(max_pin_s) and max_pin_s > 0):
            raise ValueError(f"max_pin_s must be finite and > 0, got {max_pin_s}")
        if not 0.0 < max_pinned_fraction <= 1.0:
            raise ValueError(f"max_pinned_fraction must be in (0, 1], got {max_pinned_fraction}")
        if default_quota_bytes is not None and default_quota_bytes < 0:
            raise ValueError(f"default_quota_bytes must be >= 0, got {default_quota_bytes}")
        self._alloc = slab.SlabAllocator(arena_bytes, page_bytes=page_bytes)
        self._policy = _make_policy(policy, arena_bytes)
        self._high_bytes = int(arena_bytes * high_watermark)
        self._low_bytes = int(arena_bytes * low_watermark)
        self._clock = clock
        self._spill_sink = spill_sink
        self._spill_admit = spill_admit
        self._put_timeout_s = put_timeout_s
        self._max_pin_s = max_pin_s
        self._max_pinned_bytes = int(arena_bytes * max_pinned_fraction)
        self._default_quota_bytes = default_quota_bytes
        self._reuse_guard = reuse_guard
        # Extents freed while reuse_guard said they were in use, with their tenant: still
        # charged, returned to the allocator by _free_quarantined.
        self._quarantine: list[tuple[str, slab.Extent]] = []
        self._index: dict[_Ident, _Block] = {}
        self._unlinked: dict[int, _Block] = {}  # block id -> block waiting for its leases
        self._pending: dict[int, PutTicket] = {}
        self._pending_keys: set[_Ident] = set()
        self._leases: dict[int, tuple[ReadLease, _Block]] = {}
        # (expires_at_s, ident); an entry is stale when the block's expiry moved or it is gone.
        self._expiries: list[tuple[float, _Ident]] = []
        self._namespace_ttl: dict[tuple[str, str], float] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._used_bytes = 0
        self._ids = itertools.count(1)
        #: Told of blocks linked and unlinked (KV events); None: nobody listens.
        self.listener: BlockListener | None = None

    @property
    def arena_bytes(self) -> int:
        """The size of the arena whose offsets this store hands out."""
        return self._alloc.arena_bytes

    @property
    def max_block_bytes(self) -> int:
        """The largest block `begin_put` accepts."""
        return self._alloc.max_block_bytes

    @property
    def put_timeout_s(self) -> float:
        """How long a put may stay pending before `expire` aborts it."""
        return self._put_timeout_s

    def is_pending(self, ticket: PutTicket) -> bool:
        """Whether the ticket is still pending (not committed, aborted or expired)."""
        return self._pending.get(ticket.ticket_id) == ticket

    def is_leased(self, lease: ReadLease) -> bool:
        """Whether the read lease is still held (not ended or swept)."""
        entry = self._leases.get(lease.lease_id)
        return entry is not None and entry[0] == lease

    # Writes.

    def begin_put(
        self,
        tenant: str,
        namespace: str,
        key: bytes,
        size: int,
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
        tag: object = None,
    ) -> PutTicket | None:
        """Reserve `size` bytes for key; the block is invisible until `commit(ticket)`.

        Returns None when key is present and overwrite is False (put-if-absent). With
        overwrite, the present block stays readable until the commit. Raises InvalidArgument,
        AlreadyExists (another put of key is pending), QuotaExceeded (the tenant's pending plus
        committed bytes would pass its quota) or Overloaded (no room even after evicting every
        evictable block).
        """
        ident = _ident(tenant, namespace, key)
        if not isinstance(size, int) or not 1 <= size <= self._alloc.max_block_bytes:
            raise errors.InvalidArgument(
                f"block of {size} bytes: block size must be 1..{self._alloc.max_block_bytes} bytes"
            )
        _check_duration("ttl_s", ttl_s, optional=True)
        now = self._clock()
        state = self._tenant(tenant)
        if ident in self._pending_keys:
            state.pending_conflicts += 1
            raise errors.AlreadyExists("a put of this key is already in progress")
        if not overwrite and self._find(ident, now) is not None:
            state.put_conflicts += 1
            return None
        if state.quota_bytes is not None and state.held_bytes + size > state.quota_bytes:
            state.quota_rejections += 1
            raise errors.QuotaExceeded(
                f"tenant quota {state.quota_bytes} B: {state.held_bytes} B held, {size} B asked"
            )
        extent = self._allocate(size, state, now)
        ticket = PutTicket(
            ticket_id=next(self._ids),
            tenant=tenant,
            namespace=namespace,
            key=key,
            extent=extent,
            ttl_s=ttl_s if ttl_s is not None else self._namespace_ttl.get((tenant, namespace)),
            deadline_s=now + self._put_timeout_s,
            overwrite=overwrite,
            tag=tag,
        )
        self._pending[ticket.ticket_id] = ticket
        self._pending_keys.add(ident)
        state.pending_puts += 1
        if self._used_bytes > self._high_bytes:
            self._evict(self._used_bytes - self._low_bytes, now)
        return ticket

    def commit(
        self, ticket: PutTicket, *, durable: bool = False, checksum: int | None = None
    ) -> None:
        """Make the ticket's block visible, replacing (and later freeing) any present block.

        `durable`: the durable tier already holds these very bytes (a read-through), so the
        block is never spilled. `checksum`: the xxh3-64 of its bytes, kept with the block and
        handed to every read lease. Raises NotFound when the ticket is not pending (committed,
        aborted or expired).
        """
        self._take_ticket(ticket)
        now = self._clock()
        ident = (ticket.tenant, ticket.namespace, ticket.key)
        old = self._index.get(ident)
        if old is not None:
            self._unlink(old, now, cause=None)
        expires_at_s = now + ticket.ttl_s if ticket.ttl_s is not None else None
        block = _Block(ident, ticket.ticket_id, ticket.extent, ticket.ttl_s, expires_at_s)
        block.durable = durable
        block.checksum = checksum
        block.tag = ticket.tag
        self._index[ident] = block
        if self.listener is not None:
            self.listener.linked(ticket.tenant, ticket.namespace, ticket.key, ticket.tag)
        self._policy.insert(ident, ticket.extent.capacity)
        if expires_at_s is not None:
            heapq.heappush(self._expiries, (expires_at_s, ident))
        state = self._tenant(ticket.tenant)
        state.blocks += 1
        state.puts += 1

    def mark_durable(self, tenant: str, namespace: str, key: bytes, block_id: int) -> bool:
        """Note that the durable tier now holds the block committed by ticket `block_id` (its
        upload finished): eviction will drop it without spilling. False when that version is
        no longer the visible one (overwritten, deleted, evicted)."""
        block = self._index.get((tenant, namespace, key))
        if block is None or block.block_id != block_id:
            return False
        block.durable = True
        return True

    def checksum_of(self, tenant: str, namespace: str, key: bytes) -> int | None:
        """The checksum of key's visible block (None: no such block, or none was kept)."""
        block = self._index.get((tenant, namespace, key))
        return block.checksum if block is not None else None

    def tag_of(self, tenant: str, namespace: str, key: bytes) -> object:
        """The tag key's visible block was put with (None: no such block, or none)."""
        block = self._index.get((tenant, namespace, key))
        return block.tag if block is not None else None

    def checksummed(
        self, tenant: str, namespace: str, keys: Sequence[bytes]
    ) -> list[tuple[bytes, slab.Extent, int]]:
        """(key, extent, checksum) of each present key whose block has a checksum. Raises
        InvalidArgument."""
        found: list[tuple[bytes, slab.Extent, int]] = []

        def note(block: _Block, _now: float) -> None:
            if block.checksum is not None:
                found.append((block.ident[2], block.extent, block.checksum))

        self._each(tenant, namespace, keys, note)
        return found

    def record_corrupt(self, tenant: str, count: int = 1) -> None:
        """Count blocks of tenant dropped because their bytes did not match their checksum."""
        self._tenant(tenant).corrupt_blocks += count

    def expires_in_s(self, tenant: str, namespace: str, key: bytes) -> float | None:
        """Seconds until the visible block of key expires (None: no TTL or no such block)."""
        block = self._index.get((tenant, namespace, key))
        if block is None or block.expires_at_s is None:
            return None
        return max(block.expires_at_s - self._clock(), 0.0)

    def abort(self, ticket: PutTicket) -> None:
        """Free a pending put's extent. Idempotent: an unknown or finished ticket is ignored."""
        if self._pending.get(ticket.ticket_id) != ticket:
            return
        self._take_ticket(ticket)
        self._release(ticket.tenant, ticket.extent)

    # Reads and probes.

    def begin_get(
        self, tenant: str, namespace: str, key: bytes, lease_s: float = 5.0, *, count: bool = True
    ) -> ReadLease | None:
        """Lease key's extent for `lease_s` seconds, or None on a miss (TTL-expired included).

        A leased block is never evicted or reused; call `end_get` when the read is done.
        `count=False` leaves the tenant's hit and miss counters alone (the caller reports the
        outcome with `record_reads`, e.g. after trying the durable tier). Raises InvalidArgument.
        """
        ident = _ident(tenant, namespace, key)
        _check_duration("lease_s", lease_s, optional=False)
        now = self._clock()
        state = self._tenant(tenant)
        block = self._find(ident, now)
        if block is None:
            state.misses += count
            return None
        lease = ReadLease(
            next(self._ids), tenant, namespace, key, block.extent, now + lease_s, block.checksum
        )
        block.leases[lease.lease_id] = lease.expires_at_s
        self._leases[lease.lease_id] = (lease, block)
        self._policy.hit(ident)
        state.hits += count
        return lease

    def record_reads(
        self, tenant: str, *, hits: int = 0, durable_hits: int = 0, misses: int = 0
    ) -> None:
        """Count reads whose outcome the caller decided (see `begin_get(count=False)`)."""
        state = self._tenant(tenant)
        state.hits += hits
        state.durable_hits += durable_hits
        state.misses += misses

    def end_get(self, lease: ReadLease) -> None:
        """End a read lease. Idempotent: an unknown, ended or expired lease is ignored."""
        entry = self._leases.get(lease.lease_id)
        if entry is None or entry[0] != lease:
            return
        del self._leases[lease.lease_id]
        block = entry[1]
        del block.leases[lease.lease_id]
        if not block.linked:
            self._free_if_unleased(block, self._clock())

    def exists(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is present (committed and not expired). Raises InvalidArgument."""
        idents = [_ident(tenant, namespace, key) for key in keys]
        now = self._clock()
        return [self._find(ident, now) is not None for ident in idents]

    def lookup(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """The number of leading keys of a prefix chain that are present."""
        idents = [_ident(tenant, namespace, key) for key in keys]
        now = self._clock()
        for count, ident in enumerate(idents):
            if self._find(ident, now) is None:
                return count
        return len(idents)

    def list_keys(
        self, tenant: str, namespace: str, prefix: bytes, start_after: bytes, limit: int
    ) -> tuple[list[tuple[bytes, int]], bool]:
        """Up to limit (key, size) of the namespace's present keys starting with prefix and
        sorting after start_after, by bytes; and whether more follow. A scan of the index."""
        _check_names(tenant, namespace)
        now = self._clock()
        found = sorted(
            (key, block.extent.requested)
            for (t, ns, key), block in self._index.items()
            if t == tenant and ns == namespace and key.startswith(prefix) and key > start_after
            and not self._expired(block, now)
        )  # fmt: skip
        return found[:limit], len(found) > limit

    # Lifetime.

    def delete(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """Unlink the present keys; return how many. A leased block is freed when its last
        lease ends. Pending puts of these keys are not affected. Raises InvalidArgument."""
        return self._each(tenant, namespace, keys, self._delete_one)

    def pin(self, tenant: str, namespace: str, keys: Sequence[bytes], pin_s: float) -> int:
        """Protect the present keys from capacity eviction for `pin_s` seconds from now.

        `pin_s` must be finite, > 0 and at most `max_pin_s`. A pin only extends an existing
        one; TTL expiry and delete still apply. The tenant's pinned blocks may hold at most
        `max_pinned_fraction` of the arena: a key whose block would pass that share is left
        unpinned (the keys are taken in order; a key already pinned is still extended).
        Returns how many keys were pinned. Raises InvalidArgument.
        """
        _check_duration("pin_s", pin_s, optional=False)
        if not math.isfinite(pin_s) or pin_s > self._max_pin_s:
            # An endless pin would hold its share of the arena for good.
            raise errors.InvalidArgument(f"pin_s must be at most {self._max_pin_s} s, got {pin_s}")
        now = self._clock()
        until_s = now + pin_s
        state = self._tenants.get(tenant)
        if state is not None:
            self._expire_pins(state, now)
        pinned = 0

        def pin_one(block: _Block, _now: float) -> None:
            nonlocal pinned
            owner = self._tenant(block.ident[0])
            if block.block_id not in owner.pins:
                if owner.pinned_bytes + block.extent.capacity > self._max_pinned_bytes:
                    return
                owner.pins[block.block_id] = block
                owner.pinned_bytes += block.extent.capacity
                heapq.heappush(owner.pin_expiries, (until_s, block.block_id))
            block.pinned_until_s = max(block.pinned_until_s, until_s)
            pinned += 1

        self._each(tenant, namespace, keys, pin_one)
        return pinned

    def unpin(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """Drop the pins of the present keys; return how many keys were present."""

        def unpin_one(block: _Block, _now: float) -> None:
            block.pinned_until_s = 0.0
            self._forget_pin(self._tenant(block.ident[0]), block)

        return self._each(tenant, namespace, keys, unpin_one)

    def pinned_bytes(self, tenant: str) -> int:
        """Slot bytes of the tenant's blocks whose pin has not ended (what `max_pinned_fraction`
        bounds)."""
        state = self._tenants.get(tenant)
        if state is None:
            return 0
        self._expire_pins(state, self._clock())
        return state.pinned_bytes

    def touch(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """Count an access to the present keys (for the policy) and restart their TTLs.

        Returns how many keys were present. Raises InvalidArgument.
        """
        return self._each(tenant, namespace, keys, self._touch_one)

    def set_quota(self, tenant: str, quota_bytes: int | None) -> None:
        """Cap the tenant's held bytes (None: no cap, not even the default quota). Blocks
        already held stay; new puts over the cap are refused. Raises InvalidArgument for a
        negative quota."""
        _check_names(tenant, "")
        if quota_bytes is not None and quota_bytes < 0:
            raise errors.InvalidArgument(f"quota_bytes must be >= 0, got {quota_bytes}")
        self._tenant(tenant).quota_bytes = quota_bytes

    def set_namespace_ttl(self, tenant: str, namespace: str, ttl_s: float | None) -> None:
        """Set the default TTL of puts begun later in the namespace (None: no default)."""
        _check_names(tenant, namespace)
        _check_duration("ttl_s", ttl_s, optional=True)
        if ttl_s is None:
            self._namespace_ttl.pop((tenant, namespace), None)
        else:
            self._namespace_ttl[(tenant, namespace)] = ttl_s

    def expire(self) -> int:
        """Sweep: unlink TTL-expired blocks, drop stale leases (freeing unlinked blocks they
        held) and abort puts past their deadline. Returns the number of blocks expired by TTL.
        Call it periodically; reads also reclaim expired blocks they meet."""
        now = self._clock()
        expired = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, ident = heapq.heappop(self._expiries)
            block = self._index.get(ident)
            if block is not None and self._expired(block, now):
                self._unlink(block, now, cause=EvictionCause.TTL)
                expired += 1
        for lease_id, (lease, block) in list(self._leases.items()):
            if lease.expires_at_s <= now:
                del self._leases[lease_id]
                del block.leases[lease_id]
        for block in list(self._unlinked.values()):
            self._free_if_unleased(block, now)
        for ticket in [t for t in self._pending.values() if t.deadline_s <= now]:
            log.warning(
                "aborting put %d of tenant %s: past its deadline", ticket.ticket_id, ticket.tenant
            )
            self.abort(ticket)
        self._free_quarantined()
        return expired

    def stats(self, tenant: str | None = None) -> StoreStats:
        """Counters and usage of one tenant, or of the whole node when tenant is None."""
        if tenant is None:
            states = list(self._tenants.values())
        else:  # an unknown tenant reads as empty, and is not remembered
            states = [self._tenants.get(tenant, _Tenant())]
        evictions = {
            cause.value: sum(s.evictions[cause] for s in states) for cause in EvictionCause
        }
        counters = {name: sum(getattr(s, name) for s in states) for name in _COUNTERS.split()}
        if tenant is None:
            tenant_bytes = {name: s.held_bytes for name, s in self._tenants.items()}
        else:
            tenant_bytes = {tenant: states[0].held_bytes}
        slab_stats = self._alloc.stats()
        return StoreStats(
            tenant=tenant,
            blocks=sum(s.blocks for s in states),
            pending_puts=sum(s.pending_puts for s in states),
            used_bytes=sum(s.used_bytes for s in states),
            requested_bytes=sum(s.held_bytes for s in states),
            arena_bytes=self._alloc.arena_bytes,
            fill=self._used_bytes / self._alloc.arena_bytes,
            evictions=evictions,
            tenant_bytes=tenant_bytes,
            internal_fragmentation=slab_stats.internal_fragmentation,
            external_fragmentation=slab_stats.external_fragmentation,
            quarantined_bytes=sum(
                e.capacity for t, e in self._quarantine if tenant is None or t == tenant
            ),
            **counters,
        )

    # Internals.

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(quota_bytes=self._default_quota_bytes)
        return state

    def _expire_pins(self, state: _Tenant, now: float) -> None:
        """Stop counting the tenant's pins that have ended."""
        heap = state.pin_expiries
        while heap and heap[0][0] <= now:
            _, block_id = heapq.heappop(heap)
            block = state.pins.get(block_id)
            if block is None:
                continue  # unpinned or unlinked since
            if block.pinned_until_s > now:  # extended: look again when the new pin ends
                heapq.heappush(heap, (block.pinned_until_s, block_id))
            else:
                self._forget_pin(state, block)
        if len(heap) > 2 * len(state.pins) + 64:  # entries of pins dropped early pile up
            state.pin_expiries = [(b.pinned_until_s, i) for i, b in state.pins.items()]
            heapq.heapify(state.pin_expiries)

    def _forget_pin(self, state: _Tenant, block: _Block) -> None:
        """The block no longer counts against the tenant's pinned share."""
        if state.pins.pop(block.block_id, None) is not None:
            state.pinned_bytes -= block.extent.capacity

    def _expired(self, block: _Block, now: float) -> bool:
        return block.expires_at_s is not None and block.expires_at_s <= now

    def _find(self, ident: _Ident, now: float) -> _Block | None:
        """The visible block of ident; an expired one is unlinked on the way (a miss)."""
        block = self._index.get(ident)
        if block is not None and self._expired(block, now):
            self._unlink(block, now, cause=EvictionCause.TTL)
            return None
        return block

    def _each(
        self,
        tenant: str,
        namespace: str,
        keys: Sequence[bytes],
        action: Callable[[_Block, float], None],
    ) -> int:
        """Apply action to each present key (all keys validated first); return how many."""
        idents = [_ident(tenant, namespace, key) for key in keys]
        now = self._clock()
        count = 0
        for ident in idents:
            block = self._find(ident, now)
            if block is not None:
                action(block, now)
                count += 1
        return count

    def _delete_one(self, block: _Block, now: float) -> None:
        self._unlink(block, now, cause=EvictionCause.DELETE)

    def _touch_one(self, block: _Block, now: float) -> None:
        self._policy.hit(block.ident)
        if block.ttl_s is not None:
            block.expires_at_s = now + block.ttl_s
            heapq.heappush(self._expiries, (block.expires_at_s, block.ident))

    def _take_ticket(self, ticket: PutTicket) -> None:
        """Forget a pending ticket (its extent stays charged); NotFound if it is not pending."""
        if self._pending.get(ticket.ticket_id) != ticket:
            raise errors.NotFound("put ticket is not pending (committed, aborted or expired)")
        del self._pending[ticket.ticket_id]
        self._pending_keys.discard((ticket.tenant, ticket.namespace, ticket.key))
        self._tenant(ticket.tenant).pending_puts -= 1

    def _allocate(self, size: int, state: _Tenant, now: float) -> slab.Extent:
        """An extent of size bytes charged to state, evicting as needed; Overloaded if none."""
        extent = self._alloc.alloc(size)
        if extent is None:
            for block in list(self._unlinked.values()):  # stale leases may hold memory
                self._free_if_unleased(block, now)
            self._free_quarantined()
            extent = self._alloc.alloc(size)
        if extent is None:
            state.lease_waits += 1
            # A slot of this class or a whole free page is needed; victims of other classes
            # may free neither, so evict a class-sized batch at a time until one appears.
            batch_bytes = self._alloc.class_sizes[self._alloc.size_class(size)]
            while extent is None:
                if not self._evict(batch_bytes, now):
                    state.overloads += 1
                    raise errors.Overloaded(
                        "kvcache arena full of pinned, leased or pending blocks "
                        "(or of blocks waiting for room in the spill buffer)"
                    )
                extent = self._alloc.alloc(size)
        self._used_bytes += extent.capacity
        state.used_bytes += extent.capacity
        state.held_bytes += extent.requested
        return extent

    def _release(self, tenant: str, extent: slab.Extent) -> None:
        """Return an extent to the allocator and the tenant's quota, or quarantine it while the
        data plane still uses it (see the module docstring)."""
        if self._reuse_guard is not None and self._reuse_guard(extent.offset, extent.capacity):
            self._quarantine.append((tenant, extent))
            return
        self._free_extent(tenant, extent)

    def _free_quarantined(self) -> int:
        """Free the quarantined extents the data plane no longer uses; returns how many."""
        if not self._quarantine:
            return 0
        guard = self._reuse_guard
        held, freed = [], 0
        for tenant, extent in self._quarantine:
            if guard is not None and guard(extent.offset, extent.capacity):
                held.append((tenant, extent))
            else:
                self._free_extent(tenant, extent)
                freed += 1
        self._quarantine = held
        return freed

    def _free_extent(self, tenant: str, extent: slab.Extent) -> None:
        self._alloc.free(extent)
        self._used_bytes -= extent.capacity
        state = self._tenant(tenant)
        state.used_bytes -= extent.capacity
        state.held_bytes -= extent.requested

    def _evictable(self, ident: _Ident, now: float) -> bool:
        block = self._index[ident]
        if block.pinned_until_s > now:
            return False
        if any(deadline > now for deadline in block.leases.values()):
            return False
        if block.durable or self._expired(block, now):
            return True  # neither goes to the spill sink
        # Last: a True answer reserves room in the spill buffer, and the policies choose
        # every candidate this returns True for.
        return self._spill_admit(*ident, block.extent.requested)

    def _evict(self, need_bytes: int, now: float) -> int:
        """Evict policy victims covering need_bytes; return how many blocks were unlinked.

        Expired victims go as TTL expiries; blocks with a current durable copy are dropped;
        the others go to the spill sink first.
        """
        victims = self._policy.victims(need_bytes, lambda ident: self._evictable(ident, now))
        for ident in victims:
            block = self._index[ident]
            if self._expired(block, now):
                self._unlink(block, now, cause=EvictionCause.TTL, in_policy=False)
                continue
            if block.durable:
                self._unlink(block, now, cause=EvictionCause.CAPACITY, in_policy=False)
                continue
            try:
                self._spill_sink(*ident, block.extent)
            except Exception:  # a plug-in boundary: a failed spill is a drop, not a failed put
                log.exception("spill sink failed for a block of tenant %s; dropped", ident[0])
            self._unlink(block, now, cause=EvictionCause.CAPACITY, in_policy=False)
        return len(victims)

    def _unlink(
        self, block: _Block, now: float, *, cause: EvictionCause | None, in_policy: bool = True
    ) -> None:
        """Remove a visible block from the index (and policy); free it unless leased."""
        del self._index[block.ident]
        if in_policy:
            self._policy.remove(block.ident)
        block.linked = False
        state = self._tenant(block.ident[0])
        state.blocks -= 1
        self._forget_pin(state, block)
        if cause is not None:
            state.evictions[cause] += 1
        if self.listener is not None:
            self.listener.unlinked(*block.ident, block.tag, cause)
        self._unlinked[block.block_id] = block
        self._free_if_unleased(block, now)

    def _free_if_unleased(self, block: _Block, now: float) -> None:
        """Free an unlinked block once no live lease holds it; forget its stale leases."""
        if any(deadline > now for deadline in block.leases.values()):
            return
        for lease_id in block.leases:
            self._leases.pop(lease_id, None)
        block.leases.clear()
        del self._unlinked[block.block_id]
        self._release(block.ident[0], block.extent)
