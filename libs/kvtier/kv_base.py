"""The KV SDK client's state, lifecycle and request plumbing (`kvtier.kv.AsyncKVClient`).

`KVClientBase` holds what every operation of `AsyncKVClient` shares: the namespace, the node
set (`kvtier.kvnodes.NodeSet`: the map, placement, sessions, retries), connect/close, and the
one request-reply operation on a node (`_simple`) or on every owner of keys (`_on_owners`).
The operations themselves live in `kvtier.kv` (gets, probes), `kvtier.kv_puts` (puts) and
`kvtier.kv_admin` (lifetime, statistics, listings, durability). Also the SDK's metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Self

import prometheus_client

from kvtier import kvnodes
from kvtier import security as security_mod
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import registry

OPS = prometheus_client.Histogram(
    "kvtier_kv_client_op_seconds",
    "KV SDK batch operations, end to end",
    ["op"],
    buckets=(50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5),
)

OPS_PUT, OPS_GET, OPS_EXISTS, OPS_LOOKUP = (
    OPS.labels(op) for op in ("put", "get", "exists", "lookup")
)
#: The span of a get (`kvtier.tracing.op_span`; the sync client's short path makes the same).
GET_SPAN = "kvtier.kv get_batch"
CORRUPT_BLOCKS = prometheus_client.Counter(
    "kvtier_kv_client_corrupt_blocks_total",
    "Blocks read whose bytes did not match their checksum (served as misses, then deleted)",
)


class KVClientBase:
    """The shared state and plumbing of `kvtier.kv.AsyncKVClient` (arguments: see that class)."""

    def __init__(
        self,
        *,
        namespace: str,
        tenant: str = "",
        metadata: str | Sequence[str] = "",
        nodes: Sequence[str] = (),
        transports: Sequence[str] = (),
        replicas: int = 1,
        timeout_s: float = 5.0,
        refresh_s: float = 2.0,
        client_id: str = "",
        use_calls: bool = True,
        settings: registry.ClientSettings | None = None,
        security: security_mod.ClientSecurity | None = None,
        verify_checksums: bool = True,
        map_source: Callable[[], common_pb2.ClusterMap] | None = None,
    ) -> None:
        self.namespace = namespace
        self.verify_checksums = verify_checksums
        #: Blocks this client read whose bytes did not match their checksum (served as misses).
        self.corrupt_blocks = 0
        self.tenant = tenant
        self._ns = pb.Namespace(tenant=tenant, name=namespace)
        #: A probe request's `namespace = 1` field, serialized once (`NodeSet.probe_plans`).
        self._ns_head = pb.ScoreRequest(namespace=self._ns).SerializeToString()
        self._use_calls = use_calls
        self._set = kvnodes.NodeSet(
            namespace=namespace, tenant=tenant, metadata=metadata, nodes=nodes,
            transports=transports, replicas=replicas, timeout_s=timeout_s, refresh_s=refresh_s,
            client_id=client_id, settings=settings, security=security, map_source=map_source,
        )  # fmt: skip
        self.replicas = replicas

    @classmethod
    async def connect(cls, **kwargs: Any) -> Self:
        """A client with its node list loaded (arguments: see the class). Raises Unavailable
        when no kvcache node can be found."""
        client = cls(**kwargs)
        try:
            await client.refresh()
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection; idempotent."""
        await self._set.close()

    @property
    def node_ids(self) -> list[str]:
        """The kvcache nodes keys are placed on, as of the last map refresh."""
        return self._set.node_ids

    @property
    def epoch(self) -> int:
        """The cluster-map epoch of the node list."""
        return self._set.epoch

    def owners(self, key: bytes) -> list[str]:
        """The nodes that own key (best first; up to `replicas`)."""
        return list(self._set.owners(key))

    async def refresh(self) -> None:
        """Reload the kvcache node list now."""
        await self._set.refresh()

    async def _on_owners(
        self,
        keys: Sequence[bytes],
        op: str,
        method: int,
        request_type: type[Any],
        response_type: type[Any],
        rpc_of: Callable[[kvnodes.Node], Callable[[Any], Awaitable[Any]]],
        extra: dict[str, Any],
    ) -> list[Any]:
        await self._set.fresh()
        jobs = []
        for rank in range(self.replicas):
            for plan in self._set.plans(keys, rank):
                request = request_type(
                    namespace=self._ns, keys=[keys[i] for i in plan.indices], **extra
                )
                jobs.append(
                    self._simple(plan.node, op, method, request, response_type, rpc_of(plan.node))
                )
        return [r for r in await asyncio.gather(*jobs) if r is not None]

    async def _simple(
        self,
        node: kvnodes.Node,
        op: str,
        method: int,
        request: Any,
        response_type: type[Any],
        rpc: Callable[[Any], Awaitable[Any]],
    ) -> Any:
        """One request-reply operation on node: a data-plane call, or gRPC without calls."""

        async def attempt(session: dataplane_client.DataPlaneSession) -> Any:
            if self._use_calls and session.transport.supports_calls:
                result = await session.transport.call(method, request.SerializeToString())
                return response_type.FromString(result.reply)
            return await rpc(request)

        return await self._set.run(node, op, attempt, idempotent=True)


async def run_all(jobs: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run jobs concurrently; one job runs inline (no task: the common single-node case)."""
    if len(jobs) == 1:
        await jobs[0]
    elif jobs:
        await asyncio.gather(*jobs)
