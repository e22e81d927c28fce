"""gRPC surface of a kvcache node (thin: decode, call `blocks.BlockService`, encode)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

from kvtier import rpc
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.proto.kvcache.v1 import kvcache_pb2_grpc as pb_grpc
from kvtier.transport import dataplane as transport_dataplane
from services.kvcache import blocks

T = TypeVar("T")


async def _resolved(reply: T | Awaitable[T]) -> T:
    """The block API answers at once, or with an awaitable when the durable tier is asked."""
    if inspect.isawaitable(reply):
        return await reply
    return reply


def _tenant(ns: pb.Namespace) -> str:
    return transport_dataplane.check_tenant(ns.tenant or transport_dataplane.DEFAULT_TENANT)


class KVCacheServicer(pb_grpc.KVCacheServiceServicer):
    """kvtier.kvcache.v1.KVCacheService over one node's BlockService."""

    def __init__(self, service: blocks.BlockService) -> None:
        self._svc = service

    async def BatchPut(
        self, request: pb.BatchPutRequest, context: rpc.ServicerContext
    ) -> pb.BatchPutResponse:
        return self._svc.grant_puts(request)

    async def CommitPuts(
        self, request: pb.CommitPutsRequest, context: rpc.ServicerContext
    ) -> pb.CommitPutsResponse:
        return self._svc.commit_puts(request)

    async def BatchGet(
        self, request: pb.BatchGetRequest, context: rpc.ServicerContext
    ) -> pb.BatchGetResponse:
        return await _resolved(self._svc.grant_reads(request))

    async def ReleaseReads(
        self, request: pb.ReleaseReadsRequest, context: rpc.ServicerContext
    ) -> pb.ReleaseReadsResponse:
        return self._svc.release_reads(request)

    async def BatchExists(
        self, request: pb.BatchExistsRequest, context: rpc.ServicerContext
    ) -> pb.BatchExistsResponse:
        return await _resolved(self._svc.exists(_tenant(request.namespace), request))

    async def Lookup(
        self, request: pb.LookupRequest, context: rpc.ServicerContext
    ) -> pb.LookupResponse:
        return await _resolved(self._svc.lookup(_tenant(request.namespace), request))

    async def Delete(
        self, request: pb.DeleteRequest, context: rpc.ServicerContext
    ) -> pb.DeleteResponse:
        return self._svc.delete(_tenant(request.namespace), request)

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: rpc.ServicerContext
    ) -> pb.ListKeysResponse:
        return self._svc.list_keys(_tenant(request.namespace), request)

    async def Pin(self, request: pb.PinRequest, context: rpc.ServicerContext) -> pb.PinResponse:
        return self._svc.pin(_tenant(request.namespace), request)

    async def Unpin(
        self, request: pb.UnpinRequest, context: rpc.ServicerContext
    ) -> pb.UnpinResponse:
        return self._svc.unpin(_tenant(request.namespace), request)

    async def Touch(
        self, request: pb.TouchRequest, context: rpc.ServicerContext
    ) -> pb.TouchResponse:
        return self._svc.touch(_tenant(request.namespace), request)

    async def Stats(
        self, request: pb.StatsRequest, context: rpc.ServicerContext
    ) -> pb.StatsResponse:
        tenant = transport_dataplane.check_tenant(request.tenant) if request.tenant else None
        return self._svc.stats(tenant)

    async def SetQuota(
        self, request: pb.SetQuotaRequest, context: rpc.ServicerContext
    ) -> pb.SetQuotaResponse:
        return self._svc.set_quota(request)

    async def SetNamespaceTTL(
        self, request: pb.SetNamespaceTTLRequest, context: rpc.ServicerContext
    ) -> pb.SetNamespaceTTLResponse:
        return self._svc.set_namespace_ttl(request)

    async def SetNamespacePolicy(
        self, request: pb.SetNamespacePolicyRequest, context: rpc.ServicerContext
    ) -> pb.SetNamespacePolicyResponse:
        return self._svc.set_namespace_policy(request)
