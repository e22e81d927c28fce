"""What the block API's modules share: the service's state, request checks and types.

`BlockServiceBase` holds what `blocks.BlockService` keeps between calls (the store, the arena,
the descriptors granted over gRPC and the puts and reads they belong to); the functions check a
request's tenant, namespace and batch size. See the `blocks` module docstring. Never imports
grpc.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from kvtier.transport import dataplane as transport_dataplane
from services.kvcache import durable, metrics
from services.kvcache import store as block_store

#: Grants a descriptor: (region, offset, length, rights, principal, ttl_s) -> Descriptor.
Grant = Callable[[base.Region, int, int, base.Rights, str, float], base.Descriptor]
#: Revokes a grant by its id (`base.Issuer.revoke`): its descriptor is refused from then on.
Revoke = Callable[[int], object]

#: ItemStatus value -> its name in metric labels (`ok`, `exists`, `no_space`, ...).
STATUS_NAMES = {
    value: name.removeprefix("ITEM_STATUS_").lower() for name, value in pb.ItemStatus.items()
}
#: Most keys in one request.
MAX_BATCH_KEYS = 16384


class BlockServiceBase:
    """The state and shared internals of `blocks.BlockService` (see the module docstring)."""

    def __init__(
        self,
        store: block_store.BlockStore,
        arena: base.Region,
        grant: Grant,
        *,
        read_lease_s: float = 10.0,
        epoch: Callable[[], int] = lambda: 0,
        tier: durable.DurableTier | None = None,
        revoke: Revoke | None = None,
    ) -> None:
        """grant hands out the descriptors of gRPC puts and gets; revoke ends one when its
        put is committed, aborted or expired and when its read is released or expires."""
        if arena.size < store.arena_bytes:
            raise ValueError("the arena region is smaller than the store's arena")
        self.store = store
        self._arena = arena
        self._grant = grant
        self._read_lease_s = read_lease_s
        self._epoch = epoch  # the node's cluster-map epoch, sent back with every batch reply
        self.tier = tier
        self._puts: dict[int, block_store.PutTicket] = {}  # gRPC puts awaiting CommitPuts
        self._sent_checksums: dict[int, int] = {}  # their checksums, as the writers sent them
        self._reads: dict[int, block_store.ReadLease] = {}  # gRPC reads awaiting ReleaseReads
        self._revoke = revoke
        # Ticket or lease id (one id space in the store) -> the grant of its descriptor.
        self._grant_ids: dict[int, int] = {}
        self._counters: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        metrics.ARENA.set(store.arena_bytes)

    # Internals shared by the method families.

    def _grpc_scope(self, ns: pb.Namespace, principal: str) -> tuple[str, str]:
        tenant = checked_tenant(ns.tenant)
        if not principal:
            raise errors.InvalidArgument("principal (the caller's data-plane session) is required")
        if transport_dataplane.tenant_of(principal) != tenant:
            raise errors.PermissionDenied("the data-plane session belongs to another tenant")
        return tenant, namespace_name(tenant, ns, trusted=False)

    def _end_grant(self, store_id: int) -> None:
        """Revoke the descriptor granted for a ticket or lease (if any)."""
        grant_id = self._grant_ids.pop(store_id, None)
        if grant_id is not None and self._revoke is not None:
            self._revoke(grant_id)

    def _through(self, tenant: str, namespace: str) -> bool:
        return self.tier is not None and self.tier.reads_through(tenant, namespace)


def checked_tenant(tenant: str) -> str:
    """The request's tenant (the default tenant when it names none); InvalidArgument for an
    invalid name."""
    return transport_dataplane.check_tenant(tenant or transport_dataplane.DEFAULT_TENANT)


def namespace_name(tenant: str, ns: pb.Namespace, *, trusted: bool) -> str:
    """The namespace name; over a call (trusted tenant) the request may not name another."""
    if trusted and ns.tenant and ns.tenant != tenant:
        raise errors.PermissionDenied("a session may only address its own tenant's namespaces")
    if len(ns.name.encode()) > block_store.MAX_NAMESPACE_BYTES:
        raise errors.InvalidArgument(
            f"namespace name longer than {block_store.MAX_NAMESPACE_BYTES} bytes"
        )
    return ns.name


def check_batch(keys: Sequence[bytes]) -> None:
    """InvalidArgument for a request of more than MAX_BATCH_KEYS keys."""
    if len(keys) > MAX_BATCH_KEYS:
        raise errors.InvalidArgument(f"at most {MAX_BATCH_KEYS} keys per request")
