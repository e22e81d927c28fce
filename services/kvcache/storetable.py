"""The block table of the block store: two-phase puts, probes, delete and touch.

`BlockTable` puts blocks (`begin_put`, then `commit` or `abort`), answers probes of the index
(`exists`, `lookup`, `list_keys`), unlinks (`delete`) and touches blocks, and answers the durable
tier's questions about the visible version of a key (`mark_durable`, `checksum_of`, `tag_of`,
`checksummed`, `expires_in_s`). Part of `store.BlockStore`; see the `store` module docstring.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvtier import errors
from services.kvcache import slab, storebase, storetypes


class BlockTable(storebase.StoreBase):
    """Puts, probes, delete and touch of `store.BlockStore` (see the module docstring)."""

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
        if_checksum: int | None = None,
    ) -> storetypes.PutTicket | None:
        """Reserve `size` bytes for key; the block is invisible until `commit(ticket)`.

        Returns None when key is present and overwrite is False (put-if-absent). With
        overwrite, the present block stays readable until the commit. With if_checksum
        (compare-and-swap; overwrite is then not consulted) the put replaces the present block
        only if its checksum is that one, checked here and again at the commit:
        PreconditionFailed when it is another block or none. Raises InvalidArgument,
        AlreadyExists (another put of key is pending), QuotaExceeded (the tenant's pending plus
        committed bytes would pass its quota) or Overloaded (no room even after evicting every
        evictable block).
        """
        ident = storetypes.ident_of(tenant, namespace, key)
        if not isinstance(size, int) or not 1 <= size <= self._alloc.max_block_bytes:
            raise errors.InvalidArgument(
                f"block of {size} bytes: block size must be 1..{self._alloc.max_block_bytes} bytes"
            )
        storetypes.check_duration("ttl_s", ttl_s, optional=True)
        now = self._clock()
        state = self._tenant(tenant)
        if ident in self._pending_keys:
            state.pending_conflicts += 1
            raise errors.AlreadyExists("a put of this key is already in progress")
        if if_checksum is not None:
            # Refused before any byte is written; pending puts of a key exclude each other, so
            # only a delete, the TTL or eviction can change the block before the commit.
            self._check_swap(ident, if_checksum, now)
            overwrite = True
        elif not overwrite and self._find(ident, now) is not None:
            state.put_conflicts += 1
            return None
        if state.quota_bytes is not None and state.held_bytes + size > state.quota_bytes:
            state.quota_rejections += 1
            raise errors.QuotaExceeded(
                f"tenant quota {state.quota_bytes} B: {state.held_bytes} B held, {size} B asked"
            )
        extent = self._allocate(size, state, now)
        ticket = storetypes.PutTicket(
            ticket_id=next(self._ids),
            tenant=tenant,
            namespace=namespace,
            key=key,
            extent=extent,
            ttl_s=ttl_s if ttl_s is not None else self._namespace_ttl.get((tenant, namespace)),
            deadline_s=now + self._put_timeout_s,
            overwrite=overwrite,
            tag=tag,
            if_checksum=if_checksum,
        )
        self._pending[ticket.ticket_id] = ticket
        self._pending_keys.add(ident)
        state.pending_puts += 1
        if self._used_bytes > self._high_bytes:
            self._evict(self._used_bytes - self._low_bytes, now)
        return ticket

    def commit(
        self, ticket: storetypes.PutTicket, *, durable: bool = False, checksum: int | None = None
    ) -> None:
        """Make the ticket's block visible, replacing (and later freeing) any present block.

        `durable`: the durable tier already holds these very bytes (a read-through), so the
        block is never spilled. `checksum`: the xxh3-64 of its bytes, kept with the block and
        handed to every read lease. Raises NotFound when the ticket is not pending (committed,
        aborted or expired), and PreconditionFailed (the put aborted) when a compare-and-swap
        put's block is no longer the one it expects.
        """
        if self.is_pending(ticket) and not self.swap_holds(ticket):
            self.abort(ticket)
            raise errors.PreconditionFailed("compare-and-swap: the key's block has changed")
        self._take_ticket(ticket)
        now = self._clock()
        ident = (ticket.tenant, ticket.namespace, ticket.key)
        old = self._index.get(ident)
        if old is not None:
            self._unlink(old, now, cause=None)
        expires_at_s = now + ticket.ttl_s if ticket.ttl_s is not None else None
        block = storetypes.Block(ident, ticket.ticket_id, ticket.extent, ticket.ttl_s, expires_at_s)
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

    def swap_holds(self, ticket: storetypes.PutTicket) -> bool:
        """Whether a put may replace key's block now: always, unless it is a compare-and-swap
        put and the visible block is no longer the one it expects (changed or gone)."""
        if ticket.if_checksum is None:
            return True
        ident = (ticket.tenant, ticket.namespace, ticket.key)
        present = self._find(ident, self._clock())
        return present is not None and present.checksum == ticket.if_checksum

    def _check_swap(self, ident: storetypes.Ident, if_checksum: int, now: float) -> None:
        """PreconditionFailed unless ident's visible block has checksum if_checksum."""
        present = self._find(ident, now)
        if present is None or present.checksum != if_checksum:
            raise errors.PreconditionFailed(
                "compare-and-swap: the key's block is not the one expected"
                if present is not None
                else "compare-and-swap: no block of the key is present"
            )

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

        def note(block: storetypes.Block, _now: float) -> None:
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

    def abort(self, ticket: storetypes.PutTicket) -> None:
        """Free a pending put's extent. Idempotent: an unknown or finished ticket is ignored."""
        if self._pending.get(ticket.ticket_id) != ticket:
            return
        self._take_ticket(ticket)
        self._release(ticket.tenant, ticket.extent)

    # Probes.

    def exists(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is present (committed and not expired). Raises InvalidArgument."""
        idents = [storetypes.ident_of(tenant, namespace, key) for key in keys]
        now = self._clock()
        return [self._find(ident, now) is not None for ident in idents]

    def lookup(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """The number of leading keys of a prefix chain that are present. Raises
        InvalidArgument for any bad key of the chain, also past the run's end."""
        now = self._clock()
        index = self._index
        try:
            for count, key in enumerate(keys):
                ident = (tenant, namespace, key)
                block = index.get(ident)
                # _find's answer; it is called only for a block with a TTL (it may have expired).
                if (
                    block is None
                    # equal to a stored key but not bytes (a view): refused below
                    or (type(key) is not bytes and not isinstance(key, bytes))
                    or (block.expires_at_s is not None and self._find(ident, now) is None)
                ):
                    # The run ends here. Names and keys of the run were checked when their
                    # blocks were stored; those from here on are checked now (a bad one is
                    # never in the index): a long present chain skips a pass over its keys.
                    storetypes.check_keys(tenant, namespace, keys[count:])
                    return count
        except TypeError:  # an unhashable key: InvalidArgument from the checks
            storetypes.check_keys(tenant, namespace, keys)
            raise
        return len(keys)

    def list_keys(
        self, tenant: str, namespace: str, prefix: bytes, start_after: bytes, limit: int
    ) -> tuple[list[tuple[bytes, int]], bool]:
        """Up to limit (key, size) of the namespace's present keys starting with prefix and
        sorting after start_after, by bytes; and whether more follow. A scan of the index."""
        storetypes.check_names(tenant, namespace)
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

    def touch(self, tenant: str, namespace: str, keys: Sequence[bytes]) -> int:
        """Count an access to the present keys (for the policy) and restart their TTLs.

        Returns how many keys were present. Raises InvalidArgument.
        """
        return self._each(tenant, namespace, keys, self._touch_one)

    def _delete_one(self, block: storetypes.Block, now: float) -> None:
        self._unlink(block, now, cause=storetypes.EvictionCause.DELETE)

    def _touch_one(self, block: storetypes.Block, now: float) -> None:
        self._policy.hit(block.ident)
        if block.ttl_s is not None:
            block.expires_at_s = now + block.ttl_s
            heapq.heappush(self._expiries, (block.expires_at_s, block.ident))
