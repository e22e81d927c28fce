"""Read leases and pins of the block store.

`LeasesAndPins` leases blocks to readers (`begin_get`, `end_get`; a leased extent is never
evicted or reused), counts read outcomes (`record_reads`) and pins blocks against capacity
eviction within each tenant's pinned share (`pin`, `unpin`, `pinned_bytes`). Part of
`store.BlockStore`; see the `store` module docstring.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from kvtier import errors
from services.kvcache import storebase, storetypes


class LeasesAndPins(storebase.StoreBase):
    """Read leases and pins of `store.BlockStore` (see the module docstring)."""

    # Reads.

    def begin_get(
        self, tenant: str, namespace: str, key: bytes, lease_s: float = 5.0, *, count: bool = True
    ) -> storetypes.ReadLease | None:
        """Lease key's extent for `lease_s` seconds, or None on a miss (TTL-expired included).

        A leased block is never evicted or reused; call `end_get` when the read is done.
        `count=False` leaves the tenant's hit and miss counters alone (the caller reports the
        outcome with `record_reads`, e.g. after trying the durable tier). Raises InvalidArgument.
        """
        ident = storetypes.ident_of(tenant, namespace, key)
        storetypes.check_duration("lease_s", lease_s, optional=False)
        now = self._clock()
        state = self._tenant(tenant)
        block = self._find(ident, now)
        if block is None:
            state.misses += count
            return None
        lease = storetypes.ReadLease(
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

    def end_get(self, lease: storetypes.ReadLease) -> None:
        """End a read lease. Idempotent: an unknown, ended or expired lease is ignored."""
        entry = self._leases.get(lease.lease_id)
        if entry is None or entry[0] != lease:
            return
        del self._leases[lease.lease_id]
        block = entry[1]
        del block.leases[lease.lease_id]
        if not block.linked:
            self._free_if_unleased(block, self._clock())

    # Pins.

    def pin(self, tenant: str, namespace: str, keys: Sequence[bytes], pin_s: float) -> int:
        """Protect the present keys from capacity eviction for `pin_s` seconds from now.

        `pin_s` must be finite, > 0 and at most `max_pin_s`. A pin only extends an existing
        one; TTL expiry and delete still apply. The tenant's pinned blocks may hold at most
        `max_pinned_fraction` of the arena: a key whose block would pass that share is left
        unpinned (the keys are taken in order; a key already pinned is still extended).
        Returns how many keys were pinned. Raises InvalidArgument.
        """
        storetypes.check_duration("pin_s", pin_s, optional=False)
        if not math.isfinite(pin_s) or pin_s > self._max_pin_s:
            # An endless pin would hold its share of the arena for good.
            raise errors.InvalidArgument(f"pin_s must be at most {self._max_pin_s} s, got {pin_s}")
        now = self._clock()
        until_s = now + pin_s
        state = self._tenants.get(tenant)
        if state is not None:
            self._expire_pins(state, now)
        pinned = 0

        def pin_one(block: storetypes.Block, _now: float) -> None:
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

        def unpin_one(block: storetypes.Block, _now: float) -> None:
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

    def _expire_pins(self, state: storetypes.TenantState, now: float) -> None:
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
