"""Stats, settings and housekeeping of the block API.

Usage and counters (`stats`), a tenant's quota and a namespace's TTL and durability (checked
before the servicer stores them in etcd, applied by every node), and the periodic sweep that
expires TTLs, stale leases, stuck puts and ended grants and updates the gauges. Part of
`blocks.BlockService`; see the `blocks` module docstring. Never imports grpc.
"""

from __future__ import annotations

import collections
import math

from kvtier import errors, kvsettings
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import blockbase, durable, metrics
from services.kvcache import store as block_store


class AdminCalls(blockbase.BlockServiceBase):
    """Stats, settings and housekeeping of `blocks.BlockService` (see the module docstring)."""

    # Stats and settings.

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
        self.store.set_quota(blockbase.checked_tenant(req.tenant), req.quota_bytes or None)
        return pb.SetQuotaResponse()

    def set_namespace_ttl(self, req: pb.SetNamespaceTTLRequest) -> pb.SetNamespaceTTLResponse:
        """A namespace's default TTL for later puts (0: none)."""
        tenant = blockbase.checked_tenant(req.namespace.tenant)
        if req.ttl_s < 0:
            raise errors.InvalidArgument("ttl_s must be >= 0")
        self.store.set_namespace_ttl(tenant, req.namespace.name, req.ttl_s or None)
        return pb.SetNamespaceTTLResponse()

    def set_namespace_policy(
        self, req: pb.SetNamespacePolicyRequest
    ) -> pb.SetNamespacePolicyResponse:
        """A namespace's durability on this node (NONE: DRAM only)."""
        tenant = blockbase.checked_tenant(req.namespace.tenant)
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=False)
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
            blockbase.checked_tenant(req.tenant)
            return
        tenant = blockbase.checked_tenant(req.namespace.tenant)
        blockbase.namespace_name(tenant, req.namespace, trusted=False)
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
