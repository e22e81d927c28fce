"""The kvcache node's link to the durable tier: `spillqueue.ObjectStore` over a gateway.

The gateway is found in the cluster map (role GATEWAY), as the SDK finds kvcache nodes; with
several, each kvcache node prefers its own rendezvous choice, and one that fails is passed
over for a while. The bucket (`durable.BUCKET`, `.kvtier-kv`) is internal: gateways serve it to
kvcache nodes without it being created or recorded anywhere.
Bytes move with `kvtier.objects.AsyncObjectClient`: uploads straight from the spill buffer,
read-throughs straight into the node's arena.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvtier import clustermap, errors, objects, rendezvous
from kvtier import security as security_mod
from kvtier.proto.common.v1 import common_pb2
from services.kvcache import durable, spillqueue

log = logging.getLogger(__name__)

EXPIRES_META = "kvtier-expires-unix-ms"
#: The block's xxh3-64, 16 hex digits (`integrity`): checked on read-through.
CHECKSUM_META = "kvtier-xxh3-64"
_DOWN_S = 2.0
#: Seconds before an operation is repeated on another gateway (`GatewayObjects._on_gateway`).
_RETRY_S = 0.1

T = TypeVar("T")


class GatewayObjects:
    """The durable tier through the gateways of `map_view`'s cluster map."""

    def __init__(
        self,
        map_view: clustermap.MapView,
        node_id: str,
        *,
        timeout_s: float = 10.0,
        transports: tuple[str, ...] = (),
        security: security_mod.ClientSecurity | None = None,
    ) -> None:
        self._view = map_view
        #: Mutual TLS as this kvcache node (the internal durable bucket is theirs alone).
        self._security = security
        self._node_id = node_id
        self._timeout_s = timeout_s
        self._transports = transports
        self._client: objects.AsyncObjectClient | None = None
        self._address = ""
        self._down_until: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._seen_epoch = -1
        self._has_gateway = False

    def _gateways(self) -> list[str]:
        """Gateway addresses, this node's preference first, those marked down last."""
        nodes = clustermap.nodes_with_role(self._view.current, common_pb2.NODE_ROLE_GATEWAY)
        by_id = {n.node_id: n.grpc_address for n in nodes}
        ranked = rendezvous.owners(list(by_id), self._node_id.encode(), len(by_id))
        now = time.monotonic()
        return sorted((by_id[n] for n in ranked), key=lambda a: self._down_until.get(a, 0) > now)

    def available(self) -> bool:
        """Whether the map holds a gateway (asked on every durable put: cached per epoch)."""
        epoch = self._view.epoch()
        if epoch != self._seen_epoch:
            nodes = clustermap.nodes_with_role(self._view.current, common_pb2.NODE_ROLE_GATEWAY)
            self._seen_epoch, self._has_gateway = epoch, bool(nodes)
        return self._has_gateway

    async def _connected(self) -> objects.AsyncObjectClient:
        gateways = self._gateways()
        if not gateways:
            raise errors.Unavailable("no gateway in the cluster map")
        if self._client is not None and self._address == gateways[0]:
            return self._client
        async with self._lock:
            if self._client is not None and self._address == gateways[0]:
                return self._client
            await self._drop()
            address = gateways[0]
            client = await objects.AsyncObjectClient.connect(
                address, transports=self._transports, timeout_s=self._timeout_s,
                security=self._security,
            )  # fmt: skip
            self._client, self._address = client, address
            log.info("durable tier: gateway %s", address)
            return client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(errors.KVTierError, OSError):
                await client.close()

    def _failed(self, exc: BaseException) -> None:
        """A transport or availability failure: prefer another gateway for a while (the
        client itself reconnects a broken session on its next call)."""
        if isinstance(exc, errors.Unavailable | errors.DeadlineExceeded | OSError):
            self._down_until[self._address] = time.monotonic() + _DOWN_S

    async def _on_gateway(self, op: Callable[[objects.AsyncObjectClient], Awaitable[T]]) -> T:
        """op on the preferred gateway. A gateway that is going away (Unavailable: draining,
        restarting; a broken connection) is passed over and op repeated once, after
        `_RETRY_S`, on the next one (the same one when it is alone). Every operation here is
        safe to repeat: a PUT writes the same bytes and metadata under the same key (the newest
        version wins), HEAD and GET read, a DELETE of an absent key succeeds. A deadline
        (DeadlineExceeded) is not repeated: the caller's own retries (spill_retries) decide."""
        for tries_left in (1, 0):
            client = await self._connected()
            try:
                return await op(client)
            except (errors.Unavailable, OSError) as exc:
                self._failed(exc)
                if not tries_left:
                    raise
                log.info("durable tier: gateway %s unavailable (%s); trying again", self._address,
                         exc)  # fmt: skip
                await asyncio.sleep(_RETRY_S)
            except errors.KVTierError as exc:
                self._failed(exc)
                raise
        raise AssertionError("unreachable")

    async def put(
        self, key: str, data: memoryview, expires_unix_ms: int, checksum: int | None
    ) -> None:
        """Upload data as key (the newest version wins), its expiry and checksum as metadata."""
        metadata = {EXPIRES_META: str(expires_unix_ms)} if expires_unix_ms else {}
        if checksum is not None:
            metadata[CHECKSUM_META] = f"{checksum:016x}"
        await self._on_gateway(
            lambda c: c.put_object(durable.BUCKET, key, data, metadata=metadata or None)
        )

    async def head(self, key: str) -> spillqueue.ObjectMeta | None:
        """The object's size, ETag and expiry, or None when absent."""

        async def head(client: objects.AsyncObjectClient) -> objects.ObjectInfo | None:
            try:
                return await client.head_object(durable.BUCKET, key)
            except errors.NotFound:
                return None

        info = await self._on_gateway(head)
        if info is None:
            return None
        meta = info.headers.user_metadata
        expires = meta.get(EXPIRES_META, "0")
        return spillqueue.ObjectMeta(
            size=info.size,
            etag=info.etag,
            expires_unix_ms=int(expires) if expires.isdigit() else 0,
            checksum=_checksum(meta.get(CHECKSUM_META, "")),
        )

    async def get_into(self, key: str, into: memoryview, etag: str) -> None:
        """Read the whole object, version etag, into `into` (exactly its size)."""
        info = await self._on_gateway(
            lambda c: c.get_object_into(durable.BUCKET, key, into, if_match=etag)
        )
        if info.size != into.nbytes:
            raise errors.PreconditionFailed(f"{key}: {info.size} B stored, {into.nbytes} B asked")

    async def delete(self, key: str) -> None:
        """Delete key (absent: fine)."""
        await self._on_gateway(lambda c: c.delete_object(durable.BUCKET, key))

    async def close(self) -> None:
        """Close the gateway connection; idempotent."""
        await self._drop()


def _checksum(text: str) -> int | None:
    """A checksum kept as metadata (16 hex digits); None when absent or malformed (the
    read-through then computes one, as for blocks uploaded before checksums were kept)."""
    if len(text) != 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None
