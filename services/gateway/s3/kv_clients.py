"""The gateway's KV clients of KV buckets: one per bucket incarnation (its namespace and tenant),
opened on first use, acting for the bucket's tenant over the gateway's mutual TLS; and those of
`Score` over HTTP (`kv_score`): one per (tenant, namespace) scored, the last
`MAX_SCORING_CLIENTS` kept open."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvtier import kv, names
from kvtier import security as security_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2


def namespace(info: metadata_pb2.BucketInfo) -> str:
    """The KV namespace of a KV bucket's incarnation."""
    return f"s3:{names.storage_name(info.name, info.storage_id)}"


#: Score clients kept open (least recently used closed first, once no request holds them).
MAX_SCORING_CLIENTS = 64


class KVBuckets:
    """One KV client per KV bucket (its namespace and tenant), opened on first use; and the
    clients that score chains (`scoring`)."""

    def __init__(
        self,
        metadata_address: object = "",
        security: security_mod.ClientSecurity | None = None,
        *,
        cluster_map: Callable[[], common_pb2.ClusterMap] | None = None,
    ) -> None:
        """cluster_map: the map the gateway watches itself; when given, the clients place keys
        by it (no metadata call: KV buckets work through a metadata outage), else they read
        it from metadata_address (an address, or a function returning one)."""
        self._address = metadata_address
        self._cluster_map = cluster_map
        #: Mutual TLS as this gateway, acting explicitly for each bucket's tenant.
        self._security = security
        self._clients: dict[str, kv.AsyncKVClient] = {}
        self._lock = asyncio.Lock()
        #: (tenant, namespace) -> its scoring client, least recently used first.
        self._scoring: collections.OrderedDict[tuple[str, str], kv.AsyncKVClient] = (
            collections.OrderedDict()
        )
        #: Requests using each scoring client (an evicted one is closed when none does).
        self._users: collections.Counter[kv.AsyncKVClient] = collections.Counter()
        self._evicted: set[kv.AsyncKVClient] = set()

    def _current(self, info: metadata_pb2.BucketInfo) -> kv.AsyncKVClient | None:
        found = self._clients.get(info.name)
        if found is None or found.tenant != info.tenant or found.namespace != namespace(info):
            return None
        return found

    async def client(self, info: metadata_pb2.BucketInfo) -> kv.AsyncKVClient:
        """The client of a KV bucket (a new one when the bucket was created again)."""
        found = self._current(info)
        if found is not None:
            return found
        async with self._lock:
            found = self._current(info)
            if found is None:
                found = await kv.AsyncKVClient.connect(
                    namespace=namespace(info), tenant=info.tenant, replicas=1, timeout_s=10.0,
                    security=self._security, **self._map(),
                )  # fmt: skip
                stale = self._clients.get(info.name)
                self._clients[info.name] = found
                if stale is not None:
                    await stale.close()
        return found

    @contextlib.asynccontextmanager
    async def scoring(self, tenant: str, namespace: str) -> AsyncIterator[kv.AsyncKVClient]:
        """A client acting for tenant in namespace, held open while the block runs. The caller
        has checked that its user may act for tenant."""
        client = await self._scoring_client(tenant, namespace)
        self._users[client] += 1
        try:
            yield client
        finally:
            self._users[client] -= 1
            if not self._users[client]:
                del self._users[client]
                if client in self._evicted:
                    self._evicted.discard(client)
                    await client.close()

    async def _scoring_client(self, tenant: str, namespace: str) -> kv.AsyncKVClient:
        found = self._scoring.get((tenant, namespace))
        if found is not None:
            self._scoring.move_to_end((tenant, namespace))
            return found
        async with self._lock:
            found = self._scoring.get((tenant, namespace))
            if found is None:
                found = await kv.AsyncKVClient.connect(
                    namespace=namespace, tenant=tenant, replicas=1, timeout_s=2.0,
                    security=self._security, **self._map(),
                )  # fmt: skip
                self._scoring[(tenant, namespace)] = found
                while len(self._scoring) > MAX_SCORING_CLIENTS:
                    _, oldest = self._scoring.popitem(last=False)
                    if self._users[oldest]:
                        self._evicted.add(oldest)  # closed by its last user
                    else:
                        del self._users[oldest]
                        await oldest.close()
        return found

    def _map(self) -> dict[str, Any]:
        """Where a new client finds the kvcache nodes (its connect arguments)."""
        if self._cluster_map is not None:
            return {"map_source": self._cluster_map}
        return {"metadata": self._address() if callable(self._address) else str(self._address)}

    async def close(self) -> None:
        """Close every client."""
        clients, self._clients = list(self._clients.values()), {}
        clients += [*self._scoring.values(), *self._evicted]
        self._scoring.clear()
        self._evicted.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
