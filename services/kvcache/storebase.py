"""The state of the block store and the internals its operation modules share.

`StoreBase` holds the index, the allocator, the eviction policy and the per-tenant bookkeeping;
it finds blocks, allocates extents (evicting policy victims when the arena is full: into the
spill sink, with admission, or dropped when their durable copy is current), unlinks blocks and
frees or quarantines their extents. See the `store` module docstring for a block's lifecycle and
the contract with the data plane. The operations are `storetable.BlockTable` (puts, probes,
delete, touch), `storeleases.LeasesAndPins` (read leases, pins) and `store.BlockStore`
(settings, the sweep, stats).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence

from kvtier import errors
from services.kvcache import eviction, slab, storetypes

log = logging.getLogger(__name__)


def _make_policy(name: str, capacity_bytes: int) -> eviction.EvictionPolicy[storetypes.Ident]:
    if name == "s3fifo":
        return eviction.S3FIFOPolicy[storetypes.Ident](capacity_bytes)
    if name == "lru":
        return eviction.LRUPolicy[storetypes.Ident](capacity_bytes)
    raise ValueError(f"policy must be 's3fifo' or 'lru', got {name!r}")


def _drop(tenant: str, namespace: str, key: bytes, extent: slab.Extent) -> None:
    """The default spill sink: evicted blocks are dropped."""


def _admit_all(tenant: str, namespace: str, key: bytes, nbytes: int) -> bool:
    """The default spill admission: every victim may go."""
    return True


class StoreBase:
    """The state and shared internals of `store.BlockStore` (see the module docstring)."""

    def __init__(
        self,
        arena_bytes: int,
        *,
        page_bytes: int = slab.DEFAULT_PAGE_BYTES,
        policy: str = "s3fifo",
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        clock: storetypes.Clock = time.monotonic,
        spill_sink: storetypes.SpillSink = _drop,
        spill_admit: storetypes.SpillAdmit = _admit_all,
        put_timeout_s: float = 30.0,
        max_pin_s: float = 3600.0,
        max_pinned_fraction: float = 0.5,
        default_quota_bytes: int | None = None,
        reuse_guard: storetypes.ReuseGuard | None = None,
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
        self._index: dict[storetypes.Ident, storetypes.Block] = {}
        self._unlinked: dict[int, storetypes.Block] = {}  # block id -> block waiting for its leases
        self._pending: dict[int, storetypes.PutTicket] = {}
        self._pending_keys: set[storetypes.Ident] = set()
        self._leases: dict[int, tuple[storetypes.ReadLease, storetypes.Block]] = {}
        # (expires_at_s, ident); an entry is stale when the block's expiry moved or it is gone.
        self._expiries: list[tuple[float, storetypes.Ident]] = []
        self._namespace_ttl: dict[tuple[str, str], float] = {}
        self._tenants: dict[str, storetypes.TenantState] = {}
        self._used_bytes = 0
        self._ids = itertools.count(1)
        #: Told of blocks linked and unlinked (KV events); None: nobody listens.
        self.listener: storetypes.BlockListener | None = None

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

    def is_pending(self, ticket: storetypes.PutTicket) -> bool:
        """Whether the ticket is still pending (not committed, aborted or expired)."""
        return self._pending.get(ticket.ticket_id) == ticket

    def is_leased(self, lease: storetypes.ReadLease) -> bool:
        """Whether the read lease is still held (not ended or swept)."""
        entry = self._leases.get(lease.lease_id)
        return entry is not None and entry[0] == lease

    # Internals shared by the operations.

    def _tenant(self, tenant: str) -> storetypes.TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = storetypes.TenantState(
                quota_bytes=self._default_quota_bytes
            )
        return state

    def _forget_pin(self, state: storetypes.TenantState, block: storetypes.Block) -> None:
        """The block no longer counts against the tenant's pinned share."""
        if state.pins.pop(block.block_id, None) is not None:
            state.pinned_bytes -= block.extent.capacity

    def _expired(self, block: storetypes.Block, now: float) -> bool:
        return block.expires_at_s is not None and block.expires_at_s <= now

    def _find(self, ident: storetypes.Ident, now: float) -> storetypes.Block | None:
        """The visible block of ident; an expired one is unlinked on the way (a miss)."""
        block = self._index.get(ident)
        if block is not None and self._expired(block, now):
            self._unlink(block, now, cause=storetypes.EvictionCause.TTL)
            return None
        return block

    def _each(
        self,
        tenant: str,
        namespace: str,
        keys: Sequence[bytes],
        action: Callable[[storetypes.Block, float], None],
    ) -> int:
        """Apply action to each present key (all keys validated first); return how many."""
        idents = [storetypes.ident_of(tenant, namespace, key) for key in keys]
        now = self._clock()
        count = 0
        for ident in idents:
            block = self._find(ident, now)
            if block is not None:
                action(block, now)
                count += 1
        return count

    def _take_ticket(self, ticket: storetypes.PutTicket) -> None:
        """Forget a pending ticket (its extent stays charged); NotFound if it is not pending."""
        if self._pending.get(ticket.ticket_id) != ticket:
            raise errors.NotFound("put ticket is not pending (committed, aborted or expired)")
        del self._pending[ticket.ticket_id]
        self._pending_keys.discard((ticket.tenant, ticket.namespace, ticket.key))
        self._tenant(ticket.tenant).pending_puts -= 1

    def _allocate(self, size: int, state: storetypes.TenantState, now: float) -> slab.Extent:
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

    def _evictable(self, ident: storetypes.Ident, now: float) -> bool:
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
                self._unlink(block, now, cause=storetypes.EvictionCause.TTL, in_policy=False)
                continue
            if block.durable:
                self._unlink(block, now, cause=storetypes.EvictionCause.CAPACITY, in_policy=False)
                continue
            try:
                self._spill_sink(*ident, block.extent)
            except Exception:  # a plug-in boundary: a failed spill is a drop, not a failed put
                log.exception("spill sink failed for a block of tenant %s; dropped", ident[0])
            self._unlink(block, now, cause=storetypes.EvictionCause.CAPACITY, in_policy=False)
        return len(victims)

    def _unlink(
        self,
        block: storetypes.Block,
        now: float,
        *,
        cause: storetypes.EvictionCause | None,
        in_policy: bool = True,
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

    def _free_if_unleased(self, block: storetypes.Block, now: float) -> None:
        """Free an unlinked block once no live lease holds it; forget its stale leases."""
        if any(deadline > now for deadline in block.leases.values()):
            return
        for lease_id in block.leases:
            self._leases.pop(lease_id, None)
        block.leases.clear()
        del self._unlinked[block.block_id]
        self._release(block.ident[0], block.extent)
