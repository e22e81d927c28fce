"""The gateway's KV clients of KV buckets: one per bucket incarnation (its namespace and tenant),
opened on first use, acting for the bucket's tenant over the gateway's mutual TLS."""

from __future__ import annotations

import asyncio

from kvtier import kv, names
from kvtier import security as security_mod
from kvtier.proto.metadata.v1 import metadata_pb2


def namespace(info: metadata_pb2.BucketInfo) -> str:
    """The KV namespace of a KV bucket's incarnation."""
    return f"s3:{names.storage_name(info.name, info.storage_id)}"


class KVBuckets:
    """One KV client per KV bucket (its namespace and tenant), opened on first use."""

    def __init__(
        self, metadata_address: object, security: security_mod.ClientSecurity | None = None
    ) -> None:
        self._address = metadata_address
        #: Mutual TLS as this gateway, acting explicitly for each bucket's tenant.
        self._security = security
        self._clients: dict[str, kv.AsyncKVClient] = {}
        self._lock = asyncio.Lock()

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
                address = self._address() if callable(self._address) else str(self._address)
                found = await kv.AsyncKVClient.connect(
                    namespace=namespace(info), tenant=info.tenant, metadata=address,
                    replicas=1, timeout_s=10.0, security=self._security,
                )  # fmt: skip
                stale = self._clients.get(info.name)
                self._clients[info.name] = found
                if stale is not None:
                    await stale.close()
        return found

    async def close(self) -> None:
        """Close every client."""
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
