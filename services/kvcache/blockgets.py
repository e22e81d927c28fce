"""Gets of the block API: the BatchGet call, and BatchGet/ReleaseReads over gRPC.

A call's bytes leave straight from leased extents, and the leases end once they are out; over
gRPC the caller gets read descriptors, reads, then releases. In a durable namespace DRAM misses
are read through from the durable tier first (an awaitable). Part of `blocks.BlockService`; see
the `blocks` module docstring. Never imports grpc.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base
from services.kvcache import blockbase, metrics
from services.kvcache import store as block_store

_MAX_CACHED_LABELS = 4096


class GetCalls(blockbase.BlockServiceBase):
    """Gets of `blocks.BlockService` (see the module docstring)."""

    # Data-plane calls.

    def _call_get(
        self, tenant: str, req: pb.BatchGetRequest, capacities: Sequence[int]
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
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

    # gRPC: gets with descriptors.

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
        tenant = blockbase.checked_tenant(req.namespace.tenant)
        for lease_id in req.lease_ids:
            lease = self._reads.get(lease_id)
            if lease is not None and lease.tenant == tenant:
                del self._reads[lease_id]
                self._end_grant(lease_id)
                self.store.end_get(lease)
        return pb.ReleaseReadsResponse()

    # Internals.

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
        blockbase.check_batch(keys)
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


def _any_miss(items: Sequence[pb.GetItem]) -> bool:
    return any(item.status == pb.ITEM_STATUS_MISS for item in items)
