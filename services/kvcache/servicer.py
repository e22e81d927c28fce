"""gRPC surface of a kvcache node (thin: decode, call `blocks.BlockService`, encode).

Every method acts for the caller's tenant (`kvtier.principal`): a user for its own (naming
another is PermissionDenied), a privileged caller (service, operator, admin) for the tenant it
names. The acting tenant replaces the request's before the block API sees it, so no request
names its way into another tenant's blocks. Which roles may call which RPC is the
authorization table's (the interceptor in `kvtier.rpc`); the operator settings also check
for an admin here.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

from kvtier import errors, kvsettings, principal, rpc
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.proto.kvcache.v1 import kvcache_pb2_grpc as pb_grpc
from services.kvcache import blocks, eventsauth
from services.kvcache import events as events_mod

T = TypeVar("T")

#: Most namespaces of one tenant with a stored TTL that non-admins may set (SetNamespaceTTL is a
#: tenant's RPC, and each namespace is an etcd key every kvcache node reads again at every
#: change): past it, only a namespace already set may be set again.
MAX_TENANT_NAMESPACE_TTLS = 1024


async def _resolved(reply: T | Awaitable[T]) -> T:
    """The block API answers at once, or with an awaitable when the durable tier is asked."""
    if inspect.isawaitable(reply):
        return await reply
    return reply


def _tenant(ns: pb.Namespace) -> str:
    """The caller's acting tenant for ns (written into ns for the block API). Raises
    PermissionDenied (a user naming another tenant), InvalidArgument, Unauthenticated."""
    ns.tenant = principal.current().acting_tenant(ns.tenant)
    return ns.tenant


def _require_admin() -> None:
    """Operator settings: admins only (the authorization table says so too)."""
    caller = principal.current()
    if not caller.is_admin:
        raise errors.PermissionDenied(f"{caller.describe()} may not change node settings")


class KVCacheServicer(pb_grpc.KVCacheServiceServicer):
    """kvtier.kvcache.v1.KVCacheService over one node's BlockService."""

    def __init__(
        self,
        service: blocks.BlockService,
        settings: kvsettings.KVSettingsStore | None = None,
        *,
        events: events_mod.EventPublisher | None = None,
    ) -> None:
        """settings: where quota, TTL and durability settings persist (every node watches it
        and applies them); None: this node only, until it restarts. events: the node's KV
        events (None: off)."""
        self._svc = service
        self._settings = settings
        self._events = events

    async def _set(self, request: kvsettings.Setting) -> None:
        """Check, persist (so every node gets it, a restarted one too), then apply here: a
        refused or unstored setting changes nothing."""
        self._svc.check_setting(request)
        if self._settings is not None:
            await self._settings.save(request)
        self._svc.apply_setting(request)

    async def BatchPut(
        self, request: pb.BatchPutRequest, context: rpc.ServicerContext
    ) -> pb.BatchPutResponse:
        _tenant(request.namespace)
        return self._svc.grant_puts(request)

    async def CommitPuts(
        self, request: pb.CommitPutsRequest, context: rpc.ServicerContext
    ) -> pb.CommitPutsResponse:
        _tenant(request.namespace)  # only the tenant that got the put ids commits them
        return await _resolved(self._svc.commit_puts(request))

    async def BatchGet(
        self, request: pb.BatchGetRequest, context: rpc.ServicerContext
    ) -> pb.BatchGetResponse:
        _tenant(request.namespace)
        return await _resolved(self._svc.grant_reads(request))

    async def ReleaseReads(
        self, request: pb.ReleaseReadsRequest, context: rpc.ServicerContext
    ) -> pb.ReleaseReadsResponse:
        _tenant(request.namespace)  # only the tenant that got the leases ends them
        return self._svc.release_reads(request)

    async def BatchExists(
        self, request: pb.BatchExistsRequest, context: rpc.ServicerContext
    ) -> pb.BatchExistsResponse:
        return await _resolved(self._svc.exists(_tenant(request.namespace), request))

    async def Lookup(
        self, request: pb.LookupRequest, context: rpc.ServicerContext
    ) -> pb.LookupResponse:
        return await _resolved(self._svc.lookup(_tenant(request.namespace), request))

    async def Score(
        self, request: pb.ScoreRequest, context: rpc.ServicerContext
    ) -> pb.ScoreResponse:
        return await _resolved(self._svc.score(_tenant(request.namespace), request))

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
        """A user gets its own tenant's stats; privileged callers the node's when they name no
        tenant."""
        caller = principal.current()
        if not request.tenant and caller.privileged:
            return self._svc.stats(None)
        return self._svc.stats(caller.acting_tenant(request.tenant))

    async def SetQuota(
        self, request: pb.SetQuotaRequest, context: rpc.ServicerContext
    ) -> pb.SetQuotaResponse:
        _require_admin()
        request.tenant = principal.current().acting_tenant(request.tenant)
        await self._set(request)
        return pb.SetQuotaResponse()

    async def SetNamespaceTTL(
        self, request: pb.SetNamespaceTTLRequest, context: rpc.ServicerContext
    ) -> pb.SetNamespaceTTLResponse:
        _tenant(request.namespace)
        if self._settings is not None and not principal.current().is_admin:
            held, known = await self._settings.siblings(request)
            if not known and held >= MAX_TENANT_NAMESPACE_TTLS:
                raise errors.QuotaExceeded(
                    f"tenant {request.namespace.tenant} has TTLs on {held} namespaces, the most "
                    f"a non-admin may set ({MAX_TENANT_NAMESPACE_TTLS})"
                )
        await self._set(request)
        return pb.SetNamespaceTTLResponse()

    async def SetNamespacePolicy(
        self, request: pb.SetNamespacePolicyRequest, context: rpc.ServicerContext
    ) -> pb.SetNamespacePolicyResponse:
        _require_admin()
        _tenant(request.namespace)
        await self._set(request)
        return pb.SetNamespacePolicyResponse()

    async def ListSettings(
        self, request: pb.ListSettingsRequest, context: rpc.ServicerContext
    ) -> pb.ListSettingsResponse:
        """What the settings store holds (admins; Unavailable when etcd is away)."""
        _require_admin()
        reply = pb.ListSettingsResponse(persisted=self._settings is not None)
        for setting in await self._settings.load() if self._settings is not None else []:
            if isinstance(setting, pb.SetQuotaRequest):
                reply.quotas.append(setting)
            elif isinstance(setting, pb.SetNamespaceTTLRequest):
                reply.ttls.append(setting)
            else:
                reply.policies.append(setting)
        return reply

    async def AuthorizeEventsSubscriber(
        self, request: pb.AuthorizeEventsSubscriberRequest, context: rpc.ServicerContext
    ) -> pb.AuthorizeEventsSubscriberResponse:
        """Admit a subscriber's CURVE public key on the KV-event sockets for a while (admins:
        every tenant's events share them). PreconditionFailed when events are off; an empty
        answer when they are unauthenticated (kv_events_auth = none, an insecure cluster)."""
        _require_admin()
        eventsauth.check_public_key(request.client_public_key)
        if self._events is None:
            raise errors.PreconditionFailed("KV events are off on this node (kv_events=false)")
        keys = self._events.keys
        if keys is None:
            return pb.AuthorizeEventsSubscriberResponse()
        expires_s = keys.authorize(request.client_public_key)
        return pb.AuthorizeEventsSubscriberResponse(
            server_public_key=keys.public_key, expires_s=expires_s
        )
