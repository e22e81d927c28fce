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

`BlockService` is assembled from modules by method family: `blockputs` (puts, commits),
`blockgets` (gets, read-throughs, releases), `blockprobes` (exists, lookup, score, list, delete,
pin, unpin, touch), `blockadmin` (stats, settings, the sweep) over `blockbase` (the state and
request checks they share); this module dispatches data-plane calls and holds the public names
other modules import.

Never imports grpc; runs on the event loop (the store is not thread-safe).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from google.protobuf import message as pb_message

from kvtier import errors, tracing
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base, calls
from kvtier.transport import dataplane as transport_dataplane
from services.kvcache import blockadmin, blockbase, blockgets, blockprobes, blockputs

log = logging.getLogger(__name__)

# The block API's public names, defined in its modules: import them from here.
Grant = blockbase.Grant
Revoke = blockbase.Revoke
MAX_BATCH_KEYS = blockbase.MAX_BATCH_KEYS
CORRUPT_REASON = blockputs.CORRUPT_REASON


class BlockService(
    blockputs.PutCalls, blockgets.GetCalls, blockprobes.ProbeCalls, blockadmin.AdminCalls
):
    """The node's block API over one arena (see the module docstring)."""

    # Data-plane calls: the dispatch (the method families are in their modules).

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
        tenant = _TENANTS.get(principal) or _session_tenant(principal)
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
        # A response message (every answer but a durable tier's) is told by a plain type check:
        # inspect.isawaitable asks the Awaitable ABC about the message class on every call.
        if isinstance(reply, pb_message.Message) or not inspect.isawaitable(reply):
            return base.CallPlan(reply=reply.SerializeToString())
        return _plan_of(reply)


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


#: The tenants of the session principals seen lately (a principal's tenant never changes).
_TENANTS: dict[str, str] = {}
_MAX_TENANTS = 4096


def _session_tenant(principal: str) -> str:
    """The tenant of a data-plane session's principal. PermissionDenied for a session that acts
    for no tenant (`@gateway/...`): it may not reach, or create, any tenant's blocks."""
    tenant = transport_dataplane.tenant_of(principal)
    if not tenant or tenant.startswith(transport_dataplane.NO_TENANT_MARK):
        raise errors.PermissionDenied(
            f"the data-plane session {tenant or '?'} acts for no tenant: it has no blocks here"
        )
    if len(_TENANTS) >= _MAX_TENANTS:
        _TENANTS.clear()
    _TENANTS[principal] = tenant
    return tenant
