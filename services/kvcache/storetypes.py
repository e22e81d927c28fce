"""The records, limits and argument checks of the block store (see `store`).

What `store.BlockStore` hands out (`PutTicket`, `ReadLease`, `StoreStats`), the callbacks it is
built with (spill sink and admission, reuse guard, clock) and tells (`BlockListener`), and the
per-block and per-tenant state its modules share (`Block`, `TenantState`). Other modules import
the public names through `services.kvcache.store`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from kvtier import errors
from services.kvcache import slab

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

#: The index key: (tenant, namespace, key).
Ident = tuple[str, str, bytes]


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
    #: Compare-and-swap: the xxh3-64 the key's present block must have at commit (None: no
    #: condition; `BlockTable.commit` refuses the put otherwise).
    if_checksum: int | None = None
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
class Block:
    """A block of the index, or an unlinked one waiting for its leases (internal to the store)."""

    ident: Ident
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
class TenantState:
    """One tenant's quota, pins, usage and counters (internal to the store)."""

    quota_bytes: int | None = None
    # Blocks with a pin (block id -> block) and their slot bytes: what max_pinned_fraction
    # bounds. Each has an entry in pin_expiries (until_s, block id), re-queued when the pin was
    # extended and dropped (with the block) once the pin has ended.
    pins: dict[int, Block] = dataclasses.field(default_factory=dict)
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


#: The counters of `TenantState` that `StoreStats` sums.
COUNTERS = (
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


def check_names(tenant: str, namespace: str) -> None:
    """InvalidArgument for an empty tenant or a namespace longer than MAX_NAMESPACE_BYTES."""
    if not isinstance(tenant, str) or not tenant:
        raise errors.InvalidArgument("tenant must be a non-empty string")
    if not isinstance(namespace, str) or len(namespace.encode()) > MAX_NAMESPACE_BYTES:
        raise errors.InvalidArgument(f"namespace must be a string of <= {MAX_NAMESPACE_BYTES} B")


def ident_of(tenant: str, namespace: str, key: bytes) -> Ident:
    """The index key; InvalidArgument for a bad tenant, namespace or key."""
    check_names(tenant, namespace)
    if not isinstance(key, bytes):
        raise errors.InvalidArgument(f"key must be bytes, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise errors.InvalidArgument(
            f"key of {len(key)} bytes: keys must be 1..{MAX_KEY_BYTES} bytes"
        )
    return (tenant, namespace, key)


def check_keys(tenant: str, namespace: str, keys: Sequence[bytes]) -> None:
    """`ident_of`'s checks of every key (the same InvalidArgument, for the first bad key), the
    names checked once: a probe of a long chain pays ~0.1 µs per key instead of ~0.5."""
    if not keys:
        return
    check_names(tenant, namespace)
    for key in keys:
        if type(key) is not bytes or not 1 <= len(key) <= MAX_KEY_BYTES:
            ident_of(tenant, namespace, key)  # raises its error (or accepts a bytes subclass)


def check_duration(name: str, value_s: float | None, *, optional: bool) -> None:
    """InvalidArgument unless value_s is > 0 seconds (or None, where optional)."""
    if value_s is None and optional:
        return
    if value_s is None or not value_s > 0:
        raise errors.InvalidArgument(f"{name} must be > 0 seconds, got {value_s}")
