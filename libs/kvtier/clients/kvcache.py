"""Client of kvtier.kvcache.v1.KVCacheService (gRPC, one node).

The SDK (`kvtier.kv`) moves blocks with data-plane calls; this client serves the control
operations, transports without calls (rdma: descriptors over gRPC), and operators.
"""

from __future__ import annotations

from typing import Any

from kvtier.clients import base
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.proto.kvcache.v1 import kvcache_pb2_grpc as pb_grpc


class KVCacheClient(base.BaseClient):
    """One kvcache node's block API over gRPC."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = pb_grpc.KVCacheServiceStub(self.channel)

    async def batch_put(self, request: pb.BatchPutRequest) -> pb.BatchPutResponse:
        """Reserve room; returns write descriptors for the request's principal."""
        return await self._unary(self._stub.BatchPut, request)

    async def commit_puts(self, request: pb.CommitPutsRequest) -> pb.CommitPutsResponse:
        """Make written blocks visible, or abort them."""
        return await self._unary(self._stub.CommitPuts, request)

    async def batch_get(self, request: pb.BatchGetRequest) -> pb.BatchGetResponse:
        """Lease present blocks; returns read descriptors for the request's principal."""
        return await self._unary(self._stub.BatchGet, request)

    async def release_reads(self, request: pb.ReleaseReadsRequest) -> None:
        """End read leases."""
        await self._unary(self._stub.ReleaseReads, request)

    async def batch_exists(self, request: pb.BatchExistsRequest) -> pb.BatchExistsResponse:
        """Whether each key is present."""
        return await self._unary(self._stub.BatchExists, request)

    async def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        """How many leading keys of a chain are present on this node."""
        return await self._unary(self._stub.Lookup, request)

    async def score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        """How much of a chain this node serves, per tier (DRAM, then the durable tier)."""
        return await self._unary(self._stub.Score, request)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        """Unlink present keys."""
        return await self._unary(self._stub.Delete, request)

    async def pin(self, request: pb.PinRequest) -> pb.PinResponse:
        """Protect present keys from eviction for a while."""
        return await self._unary(self._stub.Pin, request)

    async def unpin(self, request: pb.UnpinRequest) -> pb.UnpinResponse:
        """Drop pins."""
        return await self._unary(self._stub.Unpin, request)

    async def touch(self, request: pb.TouchRequest) -> pb.TouchResponse:
        """Count an access, restart TTLs."""
        return await self._unary(self._stub.Touch, request)

    async def stats(self, tenant: str = "") -> pb.StatsResponse:
        """The node's (or one tenant's) usage and counters."""
        return await self._unary(self._stub.Stats, pb.StatsRequest(tenant=tenant))

    async def list_keys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        """A page of a namespace's keys on this node."""
        return await self._unary(self._stub.ListKeys, request)

    async def stats_of(self, request: pb.StatsRequest) -> pb.StatsResponse:
        """Stats, with the request built by the caller."""
        return await self._unary(self._stub.Stats, request)

    async def set_quota(self, tenant: str, quota_bytes: int) -> None:
        """A tenant's byte quota on this node (0: none)."""
        await self._unary(
            self._stub.SetQuota, pb.SetQuotaRequest(tenant=tenant, quota_bytes=quota_bytes)
        )

    async def set_namespace_ttl(self, tenant: str, namespace: str, ttl_s: float) -> None:
        """A namespace's default block TTL on this node (0: none)."""
        request = pb.SetNamespaceTTLRequest(
            namespace=pb.Namespace(tenant=tenant, name=namespace), ttl_s=ttl_s
        )
        await self._unary(self._stub.SetNamespaceTTL, request)

    async def set_namespace_policy(
        self, tenant: str, namespace: str, durability: pb.Durability.ValueType
    ) -> None:
        """A namespace's durability on this node (DURABILITY_NONE: DRAM only)."""
        request = pb.SetNamespacePolicyRequest(
            namespace=pb.Namespace(tenant=tenant, name=namespace), durability=durability
        )
        await self._unary(self._stub.SetNamespacePolicy, request)

    async def list_settings(self) -> pb.ListSettingsResponse:
        """The quota, TTL and durability settings the cluster keeps (admins)."""
        reply: pb.ListSettingsResponse = await self._unary(
            self._stub.ListSettings, pb.ListSettingsRequest()
        )
        return reply

    async def authorize_events_subscriber(
        self, client_public_key: str
    ) -> pb.AuthorizeEventsSubscriberResponse:
        """Admit a CURVE public key (Z85) on the node's KV-event sockets for a while (admins)."""
        reply: pb.AuthorizeEventsSubscriberResponse = await self._unary(
            self._stub.AuthorizeEventsSubscriber,
            pb.AuthorizeEventsSubscriberRequest(client_public_key=client_public_key),
        )
        return reply
