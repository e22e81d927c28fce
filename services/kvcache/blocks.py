"""The block API of a kvcache node, shared by its gRPC servicer and its data-plane calls.

`BlockService` turns `kvtier.kvcache.v1` requests into `BlockStore` operations on the node's
arena and answers with the response messages. Two ways in:

- **Data-plane calls** (`handle_call`, the node's `CallHandler`): the SDK's hot path. A batch
  put's bytes land straight in freshly allocated extents and are committed when the last one is
  in; a batch get's bytes leave straight from leased extents, and the leases end once they are
  out. One round trip each, no descriptors.
- **gRPC** (`grant_puts`/`commit_puts`, `grant_reads`/`release_reads`, ...): for orchestrators
  and transports without calls (rdma): puts and gets hand out descriptors bound to the caller's
  data-plane principal; the caller moves the bytes, then commits or releases.

The tenant of a data-plane call is its session's (from the principal the node minted), so no
request can reach another tenant's blocks; a session that acts for no tenant (`@role/...`)
reaches none (PermissionDenied). Over gRPC the servicer puts the caller's acting tenant
(`kvtier.principal`: a user's own, or the one a privileged caller names) into the request
before it gets here, and puts, commits, gets and releases also check that the data-plane
principal, put ids and lease ids belong to that tenant.

Checksums (`integrity`): a put's bytes are checked against the xxh3-64 its writer sent, or
checksummed, when it is committed (a mismatch: ITEM_STATUS_CORRUPT, nothing stored); the
checksum is kept with the block and sent with every hit; a delete checks what it removes.

Durable namespaces (`durable.DurableTier`): a get that misses DRAM, an exists or a lookup that
finds keys absent from DRAM return an awaitable (plan or reply) that asks the durable tier;
everything else, and every hit, stays synchronous (no task, no extra loop turn).

Never imports grpc; runs on the event loop (the store is not thread-safe).
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kvtier import blocksums, errors, kvsettings, tracing
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base, calls
from kvtier.transport import dataplane as transport_dataplane
from services.kvcache import durable, events, integrity, metrics, slab
from services.kvcache import store as block_store

log = logging.getLogger(__name__)

#: Grants a descriptor: (region, offset, length, rights, principal, ttl_s) -> Descriptor.
Grant = Callable[[base.Region, int, int, base.Rights, str, float], base.Descriptor]
#: Revokes a grant by its id (`base.Issuer.revoke`): its descriptor is refused from then on.
Revoke = Callable[[int], object]

_PUT_ERRORS: tuple[tuple[type[errors.KVTierError], pb.ItemStatus.ValueType], ...] = (
    (errors.AlreadyExists, pb.ITEM_STATUS_BUSY),
    (errors.QuotaExceeded, pb.ITEM_STATUS_QUOTA_EXCEEDED),
    (errors.Overloaded, pb.ITEM_STATUS_NO_SPACE),
    (errors.InvalidArgument, pb.ITEM_STATUS_INVALID),
)
_STATUS_NAMES = {
    value: name.removeprefix("ITEM_STATUS_").lower() for name, value in pb.ItemStatus.items()
}
_MAX_CACHED_LABELS = 4096
#: Most keys in one request.
MAX_BATCH_KEYS = 16384


class BlockService:
    """The node's block API over one arena (see the module docstring)."""

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

    # Data-plane calls.

    def handle_call(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        """The node's `kvtier.transport.base.CallHandler`."""
        tracing.name_call("kvcache", pb.CallMethod, method)
        tenant = _session_tenant(principal)
        if method == pb.CALL_METHOD_BATCH_PUT:
            return self._call_put(
                tenant, calls.parse_request(pb.BatchPutRequest, request), segments
            )
        if segments:
            raise errors.InvalidArgument("only BatchPut calls carry payload segments")
        if method == pb.CALL_METHOD_BATCH_GET:
            return self._call_get(
                tenant, calls.parse_request(pb.BatchGetRequest, request), capacities
            )
        simple = _SIMPLE_CALLS.get(method)
        if simple is None:
            raise errors.InvalidArgument(f"unknown kvcache call method {method}")
        message_type, handler = simple
        reply = handler(self, tenant, calls.parse_request(message_type, request))
        if inspect.isawaitable(reply):
            return _plan_of(reply)
        return base.CallPlan(reply=reply.SerializeToString())

    def _call_put(
        self, tenant: str, req: pb.BatchPutRequest, segments: Sequence[int]
    ) -> base.CallPlan:
        namespace = _namespace(tenant, req.namespace, trusted=True)
        if len(segments) != len(req.keys):
            raise errors.InvalidArgument(f"{len(req.keys)} keys but {len(segments)} segments")
        sizes = list(req.sizes) or list(segments)
        if list(segments) != sizes:
            raise errors.InvalidArgument("each segment must be as long as its key's size")
        items, tickets, error = self._begin_puts(tenant, namespace, req, sizes)
        sent = list(req.checksums)
        # A local writer (shm) copied its bytes into the arena itself, after checksumming them:
        # nothing crossed a network, so its checksums are kept as sent (readers verify them);
        # bytes that came over a network are checksummed again here.
        trusted = bool(sent) and base.LOCAL_WRITER.get()
        sinks = [
            base.Span(self._arena, t.extent.offset, t.extent.requested) if t else None
            for t in tickets
        ]
        pending = {i: t for i, t in enumerate(tickets) if t is not None}

        def commit(received: Sequence[int]) -> bytes:
            nonlocal error
            for (index, ticket), found in zip(list(pending.items()), received, strict=True):
                items[index].status = self._commit(ticket, sent[index] if sent else None, found)
                if items[index].status == pb.ITEM_STATUS_CORRUPT:
                    items[index].reason = CORRUPT_REASON
                    error = error or _corrupt_error(ticket.key)
                del pending[index]
            reply = pb.BatchPutResponse(items=items, error=error, epoch=self._epoch())
            return reply.SerializeToString()

        def on_received() -> bytes | Awaitable[bytes]:
            if trusted:
                return commit([sent[index] for index in pending])
            extents = [self._bytes(t.extent) for t in pending.values()]
            if not blocksums.parallel(extents):
                return commit([integrity.checksum(e) for e in extents])

            async def later() -> bytes:  # a large batch: hashed on a few threads
                return commit(await blocksums.checksums(extents))

            return later()

        def on_done(ok: bool) -> None:
            for ticket in pending.values():  # never received in full, or the call failed
                self.store.abort(ticket)
            pending.clear()

        return base.CallPlan(sinks=sinks, on_received=on_received, on_done=on_done)

    def _call_get(
        self, tenant: str, req: pb.BatchGetRequest, capacities: Sequence[int]
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        namespace = _namespace(tenant, req.namespace, trusted=True)
        if len(capacities) != len(req.keys):
            raise errors.InvalidArgument(f"{len(req.keys)} keys but {len(capacities)} buffers")
        through = self._through(tenant, namespace)
        items, leases = self._begin_gets(
            tenant, namespace, req.keys, capacities, self._read_lease_s, through=through
        )
        if through and _any_miss(items):

            async def later() -> base.CallPlan:
                await self._read_through(
                    tenant, namespace, req.keys, capacities, items, leases, self._read_lease_s
                )
                return self._get_plan(items, leases)

            return later()
        return self._get_plan(items, leases)

    def _get_plan(
        self, items: list[pb.GetItem], leases: list[block_store.ReadLease | None]
    ) -> base.CallPlan:
        sources = [
            base.Span(self._arena, lease.extent.offset, lease.extent.requested) if lease else None
            for lease in leases
        ]

        def on_done(ok: bool) -> None:
            for lease in leases:
                if lease is not None:
                    self.store.end_get(lease)

        reply = pb.BatchGetResponse(items=items, epoch=self._epoch()).SerializeToString()
        return base.CallPlan(reply=reply, sources=sources, on_done=on_done)

    # gRPC: puts and gets with descriptors.

    def grant_puts(self, req: pb.BatchPutRequest) -> pb.BatchPutResponse:
        """BatchPut over gRPC: reserve room and grant write descriptors to req.principal."""
        tenant, namespace = self._grpc_scope(req.namespace, req.principal)
        if len(req.sizes) != len(req.keys):
            raise errors.InvalidArgument(f"{len(req.keys)} keys but {len(req.sizes)} sizes")
        items, tickets, error = self._begin_puts(tenant, namespace, req, list(req.sizes))
        ttl_s = self.store.put_timeout_s * 0.9  # the grant must die before the ticket does
        for index, (item, ticket) in enumerate(zip(items, tickets, strict=True)):
            if ticket is None:
                continue
            if req.checksums:
                self._sent_checksums[ticket.ticket_id] = req.checksums[index]
            desc = self._grant(
                self._arena, ticket.extent.offset, ticket.extent.requested,
                base.Rights.WRITE, req.principal, ttl_s,
            )  # fmt: skip
            item.descriptor.CopyFrom(desc.to_proto())
            item.put_id = ticket.ticket_id
            self._puts[ticket.ticket_id] = ticket
            self._grant_ids[ticket.ticket_id] = desc.grant_id
        return pb.BatchPutResponse(items=items, error=error, epoch=self._epoch())

    def commit_puts(self, req: pb.CommitPutsRequest) -> pb.CommitPutsResponse:
        """CommitPuts: make written blocks visible (or abort them)."""
        tenant = _tenant(req.namespace.tenant)
        statuses: list[pb.ItemStatus.ValueType] = []
        for put_id in req.put_ids:
            ticket = self._puts.get(put_id)
            if ticket is None or ticket.tenant != tenant:
                statuses.append(pb.ITEM_STATUS_EXPIRED)
                continue
            del self._puts[put_id]
            sent = self._sent_checksums.pop(put_id, None)
            self._end_grant(put_id)  # before the extent can be freed: no write lands later
            if req.abort:
                self.store.abort(ticket)
                statuses.append(pb.ITEM_STATUS_OK)
            else:
                statuses.append(self._commit(ticket, sent))
        return pb.CommitPutsResponse(statuses=statuses)

    def grant_reads(
        self, req: pb.BatchGetRequest
    ) -> pb.BatchGetResponse | Awaitable[pb.BatchGetResponse]:
        """BatchGet over gRPC: lease present blocks, grant read descriptors to req.principal
        (an awaitable when DRAM misses of a durable namespace are read through first)."""
        tenant, namespace = self._grpc_scope(req.namespace, req.principal)
        lease_s = min(req.lease_s or 5.0, self._read_lease_s)
        if lease_s <= 0:
            raise errors.InvalidArgument("lease_s must be > 0")
        unlimited = [1 << 62] * len(req.keys)  # the caller sizes its buffers from the reply
        through = self._through(tenant, namespace)
        items, leases = self._begin_gets(
            tenant, namespace, req.keys, unlimited, lease_s, through=through
        )
        if through and _any_miss(items):

            async def later() -> pb.BatchGetResponse:
                await self._read_through(
                    tenant, namespace, req.keys, unlimited, items, leases, lease_s
                )
                return self._grant_leases(req.principal, lease_s, items, leases)

            return later()
        return self._grant_leases(req.principal, lease_s, items, leases)

    def _grant_leases(
        self,
        principal: str,
        lease_s: float,
        items: list[pb.GetItem],
        leases: list[block_store.ReadLease | None],
    ) -> pb.BatchGetResponse:
        for item, lease in zip(items, leases, strict=True):
            if lease is None:
                continue
            desc = self._grant(
                self._arena, lease.extent.offset, lease.extent.requested, base.Rights.READ,
                principal, lease_s * 0.9,
            )  # fmt: skip
            item.descriptor.CopyFrom(desc.to_proto())
            item.lease_id = lease.lease_id
            self._reads[lease.lease_id] = lease
            self._grant_ids[lease.lease_id] = desc.grant_id
        return pb.BatchGetResponse(items=items, epoch=self._epoch())

    def release_reads(self, req: pb.ReleaseReadsRequest) -> pb.ReleaseReadsResponse:
        """ReleaseReads: end read leases handed out by grant_reads."""
        tenant = _tenant(req.namespace.tenant)
        for lease_id in req.lease_ids:
            lease = self._reads.get(lease_id)
            if lease is not None and lease.tenant == tenant:
                del self._reads[lease_id]
                self._end_grant(lease_id)
                self.store.end_get(lease)
        return pb.ReleaseReadsResponse()

    # Probes, lifetime and stats (gRPC and calls alike).

    def exists(
        self, tenant: str, req: pb.BatchExistsRequest
    ) -> pb.BatchExistsResponse | Awaitable[pb.BatchExistsResponse]:
        """Whether each key is present, in either tier (an awaitable when keys absent from DRAM
        must be looked for in the durable tier)."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        in_dram = self.store.exists(tenant, namespace, req.keys)
        if self.tier is None or all(in_dram) or not self._through(tenant, namespace):
            return pb.BatchExistsResponse(present=in_dram, in_dram=in_dram, epoch=self._epoch())
        tier = self.tier

        async def later() -> pb.BatchExistsResponse:
            missing = [k for k, hit in zip(req.keys, in_dram, strict=True) if not hit]
            durable_found = iter(await tier.present(tenant, namespace, missing))
            present = [hit or next(durable_found) for hit in in_dram]
            return pb.BatchExistsResponse(present=present, in_dram=in_dram, epoch=self._epoch())

        return later()

    def lookup(
        self, tenant: str, req: pb.LookupRequest
    ) -> pb.LookupResponse | Awaitable[pb.LookupResponse]:
        """How many leading keys of the chain are present, in either tier (an awaitable when
        the chain goes on past DRAM in a durable namespace)."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        in_dram = self.store.lookup(tenant, namespace, req.keys)
        if self.tier is None or in_dram == len(req.keys) or not self._through(tenant, namespace):
            return pb.LookupResponse(count=in_dram, dram_count=in_dram, epoch=self._epoch())
        tier = self.tier

        async def later() -> pb.LookupResponse:
            rest = await tier.leading(tenant, namespace, req.keys[in_dram:])
            return pb.LookupResponse(count=in_dram + rest, dram_count=in_dram, epoch=self._epoch())

        return later()

    def score(
        self, tenant: str, req: pb.ScoreRequest
    ) -> pb.ScoreResponse | Awaitable[pb.ScoreResponse]:
        """For routers: lookup's answer per tier (the leading run in DRAM, then how many keys
        the durable tier carries it on)."""
        found = self.lookup(tenant, pb.LookupRequest(namespace=req.namespace, keys=req.keys))
        if not inspect.isawaitable(found):
            return _score_of(found)

        async def later() -> pb.ScoreResponse:
            return _score_of(await found)

        return later()

    def delete(self, tenant: str, req: pb.DeleteRequest) -> pb.DeleteResponse:
        """Unlink the present keys (and delete durable copies: queued, invisible at once)."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        integrity.scrub(self.store, self._arena.view, tenant, namespace, req.keys)
        deleted = self.store.delete(tenant, namespace, req.keys)
        if self.tier is not None:
            self.tier.deleted(tenant, namespace, req.keys)
        return pb.DeleteResponse(deleted=deleted)

    def list_keys(self, tenant: str, req: pb.ListKeysRequest) -> pb.ListKeysResponse:
        """The namespace's keys in DRAM, sorted (see the store's list_keys)."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        limit = req.limit or 1000
        if not 1 <= limit <= 10_000:
            raise errors.InvalidArgument(f"limit {limit}: 1..10000")
        found, truncated = self.store.list_keys(
            tenant, namespace, req.prefix, req.start_after, limit
        )
        return pb.ListKeysResponse(
            entries=[pb.KeyEntry(key=k, size=n) for k, n in found],
            truncated=truncated,
            epoch=self._epoch(),
        )

    def pin(self, tenant: str, req: pb.PinRequest) -> pb.PinResponse:
        """Protect present keys from capacity eviction for req.pin_s seconds."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        return pb.PinResponse(pinned=self.store.pin(tenant, namespace, req.keys, req.pin_s))

    def unpin(self, tenant: str, req: pb.UnpinRequest) -> pb.UnpinResponse:
        """Drop pins."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        return pb.UnpinResponse(unpinned=self.store.unpin(tenant, namespace, req.keys))

    def touch(self, tenant: str, req: pb.TouchRequest) -> pb.TouchResponse:
        """Count an access and restart TTLs."""
        namespace = _namespace(tenant, req.namespace, trusted=True)
        _check_batch(req.keys)
        return pb.TouchResponse(touched=self.store.touch(tenant, namespace, req.keys))

    def stats(self, tenant: str | None) -> pb.StatsResponse:
        """Usage and counters of one tenant, or of the node (tenant None)."""
        s = self.store.stats(tenant)
        reads = s.hits + s.durable_hits + s.misses
        reply = pb.StatsResponse(
            tenant=tenant or "", arena_bytes=s.arena_bytes, fill=s.fill, blocks=s.blocks,
            pending_puts=s.pending_puts, used_bytes=s.used_bytes,
            requested_bytes=s.requested_bytes, hits=s.hits, misses=s.misses,
            hit_rate=(s.hits + s.durable_hits) / reads if reads else 0.0,
            dram_hit_rate=s.hits / reads if reads else 0.0, durable_hits=s.durable_hits,
            puts=s.puts,
            put_conflicts=s.put_conflicts, pending_conflicts=s.pending_conflicts,
            quota_rejections=s.quota_rejections, lease_waits=s.lease_waits,
            overloads=s.overloads, evictions=s.evictions, tenant_bytes=s.tenant_bytes,
            corrupt_blocks=s.corrupt_blocks,
            internal_fragmentation=s.internal_fragmentation,
            external_fragmentation=s.external_fragmentation,
            max_block_bytes=self.store.max_block_bytes,
        )  # fmt: skip
        if self.tier is not None:
            for name, value in self.tier.stats(tenant).items():
                setattr(reply, name, value)
            reply.spill_queue_bytes = self.tier.queue.queue_bytes
            reply.durable_available = self.tier.queue.objects.available()
        return reply

    def set_quota(self, req: pb.SetQuotaRequest) -> pb.SetQuotaResponse:
        """A tenant's byte quota on this node (0: none)."""
        self.store.set_quota(_tenant(req.tenant), req.quota_bytes or None)
        return pb.SetQuotaResponse()

    def set_namespace_ttl(self, req: pb.SetNamespaceTTLRequest) -> pb.SetNamespaceTTLResponse:
        """A namespace's default TTL for later puts (0: none)."""
        tenant = _tenant(req.namespace.tenant)
        if req.ttl_s < 0:
            raise errors.InvalidArgument("ttl_s must be >= 0")
        self.store.set_namespace_ttl(tenant, req.namespace.name, req.ttl_s or None)
        return pb.SetNamespaceTTLResponse()

    def set_namespace_policy(
        self, req: pb.SetNamespacePolicyRequest
    ) -> pb.SetNamespacePolicyResponse:
        """A namespace's durability on this node (NONE: DRAM only)."""
        tenant = _tenant(req.namespace.tenant)
        namespace = _namespace(tenant, req.namespace, trusted=False)
        try:
            durability = durable.Durability(req.durability)
        except ValueError:
            raise errors.InvalidArgument(f"unknown durability {req.durability}") from None
        if self.tier is None:
            if durability is not durable.Durability.NONE:
                raise errors.InvalidArgument("this node has no durable tier")
        else:
            self.tier.set_policy(tenant, namespace, durability)
        return pb.SetNamespacePolicyResponse()

    def check_setting(self, req: kvsettings.Setting) -> None:
        """Raise what applying req would (InvalidArgument), changing nothing: what the servicer
        checks before it stores a setting in etcd."""
        if isinstance(req, pb.SetQuotaRequest):
            _tenant(req.tenant)
            return
        tenant = _tenant(req.namespace.tenant)
        _namespace(tenant, req.namespace, trusted=False)
        if isinstance(req, pb.SetNamespaceTTLRequest):
            if not math.isfinite(req.ttl_s) or req.ttl_s < 0:
                raise errors.InvalidArgument("ttl_s must be a finite number >= 0")
            return
        try:
            durability = durable.Durability(req.durability)
        except ValueError:
            raise errors.InvalidArgument(f"unknown durability {req.durability}") from None
        if self.tier is None and durability is not durable.Durability.NONE:
            raise errors.InvalidArgument("this node has no durable tier")

    def apply_setting(self, req: kvsettings.Setting) -> None:
        """Apply a quota, namespace TTL or durability setting on this node."""
        if isinstance(req, pb.SetQuotaRequest):
            self.set_quota(req)
        elif isinstance(req, pb.SetNamespaceTTLRequest):
            self.set_namespace_ttl(req)
        else:
            self.set_namespace_policy(req)

    # Housekeeping.

    def sweep(self) -> int:
        """Expire TTLs, stale leases and stuck puts; drop gRPC grants that ended; update the
        gauges. Returns the blocks expired by TTL."""
        expired = self.store.expire()
        if self.tier is not None:
            self.tier.sweep()
        self._puts = {k: t for k, t in self._puts.items() if self.store.is_pending(t)}
        self._sent_checksums = {k: c for k, c in self._sent_checksums.items() if k in self._puts}
        self._reads = {k: r for k, r in self._reads.items() if self.store.is_leased(r)}
        for ended in [k for k in self._grant_ids if k not in self._puts and k not in self._reads]:
            self._end_grant(ended)  # its ticket or lease expired (its grant had, too, by design)
        self.export_gauges()
        return expired

    def export_gauges(self) -> None:
        """Copy the store's counters into the Prometheus gauges."""
        node = self.store.stats()
        metrics.FILL.set(node.fill)
        metrics.FRAGMENTATION.labels("internal").set(node.internal_fragmentation)
        metrics.FRAGMENTATION.labels("external").set(node.external_fragmentation)
        # Tenants past the label cap share one series: sum them rather than let the last win.
        by_label: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for tenant, held in node.tenant_bytes.items():
            s = self.store.stats(tenant)
            sums = by_label[metrics.LABELS.tenant(tenant)]
            sums.update(held=held, quota_rejections=s.quota_rejections, lease_waits=s.lease_waits)
            sums.update({f"evictions.{cause}": count for cause, count in s.evictions.items()})
        for label, sums in by_label.items():
            metrics.TENANT_BYTES.labels(label).set(sums["held"])
            counters = metrics.STORE_COUNTERS
            counters.set("quota_rejections", (label,), sums["quota_rejections"])
            counters.set("lease_waits", (label,), sums["lease_waits"])
            for cause in block_store.EvictionCause:
                counters.set("evictions", (label, cause.value), sums[f"evictions.{cause.value}"])

    # Internals.

    def _grpc_scope(self, ns: pb.Namespace, principal: str) -> tuple[str, str]:
        tenant = _tenant(ns.tenant)
        if not principal:
            raise errors.InvalidArgument("principal (the caller's data-plane session) is required")
        if transport_dataplane.tenant_of(principal) != tenant:
            raise errors.PermissionDenied("the data-plane session belongs to another tenant")
        return tenant, _namespace(tenant, ns, trusted=False)

    def _end_grant(self, store_id: int) -> None:
        """Revoke the descriptor granted for a ticket or lease (if any)."""
        grant_id = self._grant_ids.pop(store_id, None)
        if grant_id is not None and self._revoke is not None:
            self._revoke(grant_id)

    def _begin_puts(
        self, tenant: str, namespace: str, req: pb.BatchPutRequest, sizes: Sequence[int]
    ) -> tuple[list[pb.PutGrant], list[block_store.PutTicket | None], str]:
        _check_batch(req.keys)
        if req.ttl_s < 0:
            raise errors.InvalidArgument("ttl_s must be >= 0")
        if req.checksums and len(req.checksums) != len(req.keys):
            raise errors.InvalidArgument(
                f"{len(req.keys)} keys but {len(req.checksums)} checksums (give one per key)"
            )
        tags = events.engine_tags(req) or [None] * len(req.keys)  # raises InvalidArgument
        items: list[pb.PutGrant] = []
        tickets: list[block_store.PutTicket | None] = []
        error = ""
        for key, size, tag in zip(req.keys, sizes, tags, strict=True):
            ticket: block_store.PutTicket | None = None
            reason = ""
            try:
                ticket = self.store.begin_put(
                    tenant, namespace, key, size, overwrite=req.overwrite,
                    ttl_s=req.ttl_s or None, tag=tag,
                )  # fmt: skip
                status = pb.ITEM_STATUS_OK if ticket else pb.ITEM_STATUS_EXISTS
            except errors.KVTierError as exc:
                found = [s for cls, s in _PUT_ERRORS if isinstance(exc, cls)]
                if not found:
                    raise
                status = found[0]
                reason = exc.message
                error = error or f"key {bytes(key)[:32].hex()}: {exc}"
            items.append(pb.PutGrant(status=status, reason=reason))
            tickets.append(ticket)
            if status != pb.ITEM_STATUS_OK:
                labels = metrics.LABELS.namespace(tenant, namespace)
                metrics.PUT_OUTCOMES.labels(*labels, _STATUS_NAMES[status]).inc()
        return items, tickets, error

    def _read_counters(self, tenant: str, namespace: str) -> tuple[Any, Any, Any]:
        """The hits, bytes-out and misses counters of a namespace (labels() costs ~3 us: cached)."""
        found = self._counters.get((tenant, namespace))
        if found is None:
            if len(self._counters) > _MAX_CACHED_LABELS:
                self._counters.clear()
            labels = metrics.LABELS.namespace(tenant, namespace)
            found = (
                metrics.HITS.labels(*labels),
                metrics.BYTES_OUT.labels(*labels),
                metrics.MISSES.labels(*labels),
            )
            self._counters[(tenant, namespace)] = found
        return found

    def _commit(
        self, ticket: block_store.PutTicket, sent: int | None, received: int | None = None
    ) -> pb.ItemStatus.ValueType:
        """Commit a put whose bytes are in: the checksum of what was received (computed here
        unless given) is checked against the one its writer sent (a mismatch: CORRUPT, nothing
        stored) and kept with the block."""
        labels = metrics.LABELS.namespace(ticket.tenant, ticket.namespace)
        if not self.store.is_pending(ticket):  # expired: its extent may hold others' bytes
            received = None
        elif received is None:
            received = integrity.checksum(self._bytes(ticket.extent))
        if received is not None and sent is not None and received != sent:
            self.store.abort(ticket)
            self.store.record_corrupt(ticket.tenant)
            integrity.corrupt(
                "put", ticket.tenant, ticket.namespace, ticket.key,
                f"received {received:016x}, the writer sent {sent:016x}",
            )  # fmt: skip
            status = pb.ITEM_STATUS_CORRUPT
        elif received is None:
            status = pb.ITEM_STATUS_EXPIRED
        else:
            self.store.commit(ticket, checksum=received)
            status = pb.ITEM_STATUS_OK
            metrics.BYTES_IN.labels(*labels).inc(ticket.extent.requested)
            if self.tier is not None:
                self.tier.committed(ticket)
        metrics.PUT_OUTCOMES.labels(*labels, _STATUS_NAMES[status]).inc()
        return status

    def _begin_gets(
        self,
        tenant: str,
        namespace: str,
        keys: Sequence[bytes],
        capacities: Sequence[int],
        lease_s: float,
        *,
        through: bool = False,
    ) -> tuple[list[pb.GetItem], list[block_store.ReadLease | None]]:
        """Lease the DRAM hits. With through (misses go on to the durable tier) the misses are
        left for `_read_through` to count."""
        _check_batch(keys)
        items: list[pb.GetItem] = []
        leases: list[block_store.ReadLease | None] = []
        hits = hit_bytes = 0
        for key, capacity in zip(keys, capacities, strict=True):
            lease = self.store.begin_get(tenant, namespace, key, lease_s, count=not through)
            if lease is None:
                items.append(pb.GetItem(status=pb.ITEM_STATUS_MISS))
            elif lease.extent.requested > capacity:
                size = lease.extent.requested
                self.store.end_get(lease)
                lease = None
                items.append(pb.GetItem(status=pb.ITEM_STATUS_BUFFER_TOO_SMALL, size=size))
            else:
                hits += 1
                hit_bytes += lease.extent.requested
                ok = pb.GetItem(
                    status=pb.ITEM_STATUS_OK, size=lease.extent.requested, checksum=lease.checksum
                )
                items.append(ok)
            leases.append(lease)
        if hits:
            counters = self._read_counters(tenant, namespace)
            counters[0].inc(hits)
            counters[1].inc(hit_bytes)
        if through:
            self.store.record_reads(tenant, hits=hits)
        elif len(keys) - hits:
            self._read_counters(tenant, namespace)[2].inc(len(keys) - hits)
        return items, leases

    def _bytes(self, extent: slab.Extent) -> memoryview:
        return self._arena.view[extent.offset : extent.offset + extent.requested]

    def _through(self, tenant: str, namespace: str) -> bool:
        return self.tier is not None and self.tier.reads_through(tenant, namespace)

    async def _read_through(
        self,
        tenant: str,
        namespace: str,
        keys: Sequence[bytes],
        capacities: Sequence[int],
        items: list[pb.GetItem],
        leases: list[block_store.ReadLease | None],
        lease_s: float,
    ) -> None:
        """Fill the misses of items/leases from the durable tier; count every miss's outcome.
        If cancelled (the caller is gone), every lease of the batch is ended."""
        assert self.tier is not None
        missing = [i for i, item in enumerate(items) if item.status == pb.ITEM_STATUS_MISS]
        try:
            fetched = await self.tier.read_through(
                tenant, namespace, [keys[i] for i in missing], lease_s
            )
        except BaseException:
            for lease in leases:
                if lease is not None:
                    self.store.end_get(lease)
            raise
        found = found_bytes = 0
        for index, lease in zip(missing, fetched, strict=True):
            if lease is None:
                continue
            found += 1
            size = lease.extent.requested
            if size > capacities[index]:
                self.store.end_get(lease)
                items[index] = pb.GetItem(status=pb.ITEM_STATUS_BUFFER_TOO_SMALL, size=size)
                continue
            found_bytes += size
            items[index] = pb.GetItem(status=pb.ITEM_STATUS_OK, size=size, checksum=lease.checksum)
            leases[index] = lease
        self.store.record_reads(tenant, durable_hits=found, misses=len(missing) - found)
        if found:
            metrics.DURABLE_HITS.labels(*metrics.LABELS.namespace(tenant, namespace)).inc(found)
            self._read_counters(tenant, namespace)[1].inc(found_bytes)
        if len(missing) - found:
            self._read_counters(tenant, namespace)[2].inc(len(missing) - found)


_SIMPLE_CALLS: dict[int, tuple[type[Any], Callable[[BlockService, str, Any], Any]]] = {
    pb.CALL_METHOD_BATCH_EXISTS: (pb.BatchExistsRequest, BlockService.exists),
    pb.CALL_METHOD_LOOKUP: (pb.LookupRequest, BlockService.lookup),
    pb.CALL_METHOD_SCORE: (pb.ScoreRequest, BlockService.score),
    pb.CALL_METHOD_DELETE: (pb.DeleteRequest, BlockService.delete),
    pb.CALL_METHOD_PIN: (pb.PinRequest, BlockService.pin),
    pb.CALL_METHOD_UNPIN: (pb.UnpinRequest, BlockService.unpin),
    pb.CALL_METHOD_TOUCH: (pb.TouchRequest, BlockService.touch),
    pb.CALL_METHOD_STATS: (pb.StatsRequest, lambda svc, tenant, _req: svc.stats(tenant)),
    pb.CALL_METHOD_LIST_KEYS: (pb.ListKeysRequest, BlockService.list_keys),
}


async def _plan_of(reply: Awaitable[Any]) -> base.CallPlan:
    return base.CallPlan(reply=(await reply).SerializeToString())


#: PutGrant.reason of a CORRUPT put.
CORRUPT_REASON = "the bytes received do not match the checksum sent with them (nothing stored)"


def _corrupt_error(key: bytes) -> str:
    return f"key {key[:32].hex()}: {CORRUPT_REASON}"


def _score_of(found: pb.LookupResponse) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        dram_count=found.dram_count,
        durable_count=found.count - found.dram_count,
        epoch=found.epoch,
    )


def _any_miss(items: Sequence[pb.GetItem]) -> bool:
    return any(item.status == pb.ITEM_STATUS_MISS for item in items)


def _tenant(tenant: str) -> str:
    return transport_dataplane.check_tenant(tenant or transport_dataplane.DEFAULT_TENANT)


def _session_tenant(principal: str) -> str:
    """The tenant of a data-plane session's principal. PermissionDenied for a session that acts
    for no tenant (`@gateway/...`): it may not reach, or create, any tenant's blocks."""
    tenant = transport_dataplane.tenant_of(principal)
    if not tenant or tenant.startswith(transport_dataplane.NO_TENANT_MARK):
        raise errors.PermissionDenied(
            f"the data-plane session {tenant or '?'} acts for no tenant: it has no blocks here"
        )
    return tenant


def _namespace(tenant: str, ns: pb.Namespace, *, trusted: bool) -> str:
    """The namespace name; over a call (trusted tenant) the request may not name another."""
    if trusted and ns.tenant and ns.tenant != tenant:
        raise errors.PermissionDenied("a session may only address its own tenant's namespaces")
    if len(ns.name.encode()) > block_store.MAX_NAMESPACE_BYTES:
        raise errors.InvalidArgument(
            f"namespace name longer than {block_store.MAX_NAMESPACE_BYTES} bytes"
        )
    return ns.name


def _check_batch(keys: Sequence[bytes]) -> None:
    if len(keys) > MAX_BATCH_KEYS:
        raise errors.InvalidArgument(f"at most {MAX_BATCH_KEYS} keys per request")
