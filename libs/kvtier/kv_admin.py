"""The KV SDK's lifetime and admin operations (`kvtier.kv.AsyncKVClient`: delete, pin, unpin,
touch, stats, list_keys, set_durability): request-reply operations on every owner of keys or on
every node of the map, over data-plane calls or gRPC (`kvtier.kv_base.KVClientBase._simple`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvtier import errors, kv_base, kv_results, kv_stats
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb


class KVAdmin(kv_base.KVClientBase):
    """The lifetime, statistics, listing and durability operations of `kvtier.kv.AsyncKVClient`."""

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every owner; returns how many blocks were removed (all replicas)."""
        replies = await self._on_owners(
            keys, "delete", pb.CALL_METHOD_DELETE, pb.DeleteRequest, pb.DeleteResponse,
            lambda n: n.grpc.delete, {},
        )  # fmt: skip
        return sum(r.deleted for r in replies)

    async def pin(self, keys: Sequence[bytes], pin_s: float) -> int:
        """Protect present keys from capacity eviction for pin_s seconds (on every owner)."""
        if pin_s <= 0:
            raise errors.InvalidArgument("pin_s must be > 0")
        replies = await self._on_owners(
            keys, "pin", pb.CALL_METHOD_PIN, pb.PinRequest, pb.PinResponse,
            lambda n: n.grpc.pin, {"pin_s": pin_s},
        )  # fmt: skip
        return sum(r.pinned for r in replies)

    async def unpin(self, keys: Sequence[bytes]) -> int:
        """Drop the pins of keys (on every owner)."""
        replies = await self._on_owners(
            keys, "unpin", pb.CALL_METHOD_UNPIN, pb.UnpinRequest, pb.UnpinResponse,
            lambda n: n.grpc.unpin, {},
        )  # fmt: skip
        return sum(r.unpinned for r in replies)

    async def touch(self, keys: Sequence[bytes]) -> int:
        """Count an access and restart the TTLs of keys (on every owner)."""
        replies = await self._on_owners(
            keys, "touch", pb.CALL_METHOD_TOUCH, pb.TouchRequest, pb.TouchResponse,
            lambda n: n.grpc.touch, {},
        )  # fmt: skip
        return sum(r.touched for r in replies)

    async def stats(self) -> dict[str, kv_stats.KVStats]:
        """Each reachable node's statistics for this client's tenant, by node id
        (`kvtier.kv_stats.KVStats`: blocks, bytes, hit rates, evictions...; `kv_stats.render`
        prints them)."""
        await self._set.fresh()
        nodes = self._set.nodes()
        # A user's empty tenant means its own; certificate holders name one ("default").
        request = pb.StatsRequest(tenant=self._set.session_tenant())
        replies = await asyncio.gather(
            *(
                self._simple(
                    n, "stats", pb.CALL_METHOD_STATS, request, pb.StatsResponse, n.grpc.stats_of
                )
                for n in nodes
            )
        )
        return {
            n.node_id: kv_stats.KVStats.from_proto(r)
            for n, r in zip(nodes, replies, strict=True)
            if r is not None
        }

    async def list_keys(
        self, *, prefix: bytes = b"", start_after: bytes = b"", limit: int = 1000
    ) -> tuple[list[tuple[bytes, int]], bool]:
        """Up to limit (key, size) of the namespace's keys in DRAM, sorted by bytes, from every
        reachable node (replicas once); and whether more may follow. For listings (S3 KV
        buckets), not the hot path: each node scans its index."""
        await self._set.fresh()
        nodes = self._set.nodes()
        request = pb.ListKeysRequest(
            namespace=self._ns, prefix=prefix, start_after=start_after, limit=limit
        )
        replies = await asyncio.gather(
            *(
                self._simple(
                    n, "list_keys", pb.CALL_METHOD_LIST_KEYS, request, pb.ListKeysResponse,
                    n.grpc.list_keys,
                )
                for n in nodes
            )
        )  # fmt: skip
        merged: dict[bytes, int] = {}
        horizon: bytes | None = None
        for reply in replies:
            if reply is None:
                continue
            for entry in reply.entries:
                merged[entry.key] = entry.size
            if reply.truncated and reply.entries:
                last = reply.entries[-1].key
                horizon = last if horizon is None else min(horizon, last)
        keys = sorted(k for k in merged if horizon is None or k <= horizon)
        more = horizon is not None or len(keys) > limit
        return [(k, merged[k]) for k in keys[:limit]], more

    async def set_durability(self, durability: kv_results.Durability | str) -> int:
        """Operator setting: the durability of this client's namespace on every kvcache node
        of the map (kept in the nodes' memory; a restarted or new node needs it again, or its
        `durable_namespaces` setting). Returns how many nodes were set; raises the first
        node's error (Unavailable, InvalidArgument) if any failed."""
        value = kv_results.DURABILITY[kv_results.Durability(durability)]
        await self.refresh()
        nodes = self._set.nodes()
        results = await asyncio.gather(
            *(n.grpc.set_namespace_policy(self.tenant, self.namespace, value) for n in nodes),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(nodes)
