"""The block store of a kvcache node: (tenant, namespace, key) -> an extent of the node's arena.

Pure in-memory bookkeeping. The arena is a `kvtier.transport.base.Region` owned by the caller,
which moves the bytes over the data plane; the store only decides which offsets hold which
block, and when they may be reused. It never imports grpc itself and is not thread-safe: the
node owns one store and calls it from its event loop.

`BlockStore` is assembled from modules by concern: `storetypes` (its records, limits and
argument checks), `storebase` (the state; finding, allocating, evicting, unlinking and freeing
blocks), `storetable` (puts, probes, delete, touch), `storeleases` (read leases, pins) and this
module (settings, the sweep, stats, and the public names other modules import).

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

import heapq
import logging

from kvtier import errors
from services.kvcache import storeleases, storetable, storetypes

log = logging.getLogger(__name__)

# The store's public names, defined in `storetypes`: import them from here.
MAX_KEY_BYTES = storetypes.MAX_KEY_BYTES
MAX_NAMESPACE_BYTES = storetypes.MAX_NAMESPACE_BYTES
SpillSink = storetypes.SpillSink
SpillAdmit = storetypes.SpillAdmit
Clock = storetypes.Clock
ReuseGuard = storetypes.ReuseGuard
BlockListener = storetypes.BlockListener
EvictionCause = storetypes.EvictionCause
PutTicket = storetypes.PutTicket
ReadLease = storetypes.ReadLease
StoreStats = storetypes.StoreStats


class BlockStore(storetable.BlockTable, storeleases.LeasesAndPins):
    """The index, allocator and eviction of one kvcache node's arena (see the module docstring).

    Bounds on what one tenant can hold: a pin lasts at most `max_pin_s`, a tenant's pinned
    blocks hold at most `max_pinned_fraction` of the arena (slot bytes), and a tenant with no
    quota of its own (`set_quota`) gets `default_quota_bytes` (None: no quota).

    Raises ValueError for an invalid geometry (see `slab.SlabAllocator`), an unknown policy,
    watermarks outside 0 < low < high <= 1, or invalid bounds. Request errors are `kvtier.errors`.
    """

    # Settings, the sweep and stats (operations: `storetable`, `storeleases`).

    def set_quota(self, tenant: str, quota_bytes: int | None) -> None:
        """Cap the tenant's held bytes (None: no cap, not even the default quota). Blocks
        already held stay; new puts over the cap are refused. Raises InvalidArgument for a
        negative quota."""
        storetypes.check_names(tenant, "")
        if quota_bytes is not None and quota_bytes < 0:
            raise errors.InvalidArgument(f"quota_bytes must be >= 0, got {quota_bytes}")
        self._tenant(tenant).quota_bytes = quota_bytes

    def set_namespace_ttl(self, tenant: str, namespace: str, ttl_s: float | None) -> None:
        """Set the default TTL of puts begun later in the namespace (None: no default)."""
        storetypes.check_names(tenant, namespace)
        storetypes.check_duration("ttl_s", ttl_s, optional=True)
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
                self._unlink(block, now, cause=storetypes.EvictionCause.TTL)
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

    def stats(self, tenant: str | None = None) -> storetypes.StoreStats:
        """Counters and usage of one tenant, or of the whole node when tenant is None."""
        if tenant is None:
            states = list(self._tenants.values())
        else:  # an unknown tenant reads as empty, and is not remembered
            states = [self._tenants.get(tenant, storetypes.TenantState())]
        evictions = {
            cause.value: sum(s.evictions[cause] for s in states)
            for cause in storetypes.EvictionCause
        }
        counters = {
            name: sum(getattr(s, name) for s in states) for name in storetypes.COUNTERS.split()
        }
        if tenant is None:
            tenant_bytes = {name: s.held_bytes for name, s in self._tenants.items()}
        else:
            tenant_bytes = {tenant: states[0].held_bytes}
        slab_stats = self._alloc.stats()
        return storetypes.StoreStats(
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
