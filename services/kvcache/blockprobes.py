"""Probes and lifetime calls of the block API (gRPC and data-plane calls alike).

Exists, lookup, score, list_keys, delete, pin, unpin and touch. In a durable namespace, exists
and lookup ask the durable tier about keys absent from DRAM (an awaitable); everything else stays
synchronous. Part of `blocks.BlockService`; see the `blocks` module docstring. Never imports grpc.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from services.kvcache import blockbase, integrity

R = TypeVar("R")


class ProbeCalls(blockbase.BlockServiceBase):
    """Probes and lifetime calls of `blocks.BlockService` (see the module docstring)."""

    # Probes and lifetime.

    def exists(
        self, tenant: str, req: pb.BatchExistsRequest
    ) -> pb.BatchExistsResponse | Awaitable[pb.BatchExistsResponse]:
        """Whether each key is present, in either tier (an awaitable when keys absent from DRAM
        must be looked for in the durable tier)."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        blockbase.check_batch(req.keys)
        in_dram = self.store.exists(tenant, namespace, req.keys)
        if self.tier is None or all(in_dram) or not self._through(tenant, namespace):
            return pb.BatchExistsResponse(present=in_dram, in_dram=in_dram, epoch=self._epoch())
        tier = self.tier

        async def later() -> pb.BatchExistsResponse:
            missing = [k for k, hit in zip(req.keys, in_dram, strict=True) if not hit]
            durable_found = iter(await tier.present(tenant, namespace, missing))
            present = [hit or next(durable_found) for hit in in_dram]
            return pb.BatchExistsResponse(present=present, in_dram=in_dram, epoch=self._epoch())

        return later()

    def lookup(
        self, tenant: str, req: pb.LookupRequest
    ) -> pb.LookupResponse | Awaitable[pb.LookupResponse]:
        """How many leading keys of the chain are present, in either tier (an awaitable when
        the chain goes on past DRAM in a durable namespace)."""
        return self._leading(tenant, req.namespace, req.keys, _lookup_reply)

    def score(
        self, tenant: str, req: pb.ScoreRequest
    ) -> pb.ScoreResponse | Awaitable[pb.ScoreResponse]:
        """For routers: lookup's answer per tier (the leading run in DRAM, then how many keys
        the durable tier carries it on)."""
        return self._leading(tenant, req.namespace, req.keys, _score_reply)

    def _leading(
        self,
        tenant: str,
        ns: pb.Namespace,
        keys: Sequence[bytes],
        reply: Callable[[int, int, int], R],
    ) -> R | Awaitable[R]:
        """reply(the chain's leading run in DRAM, its run in either tier, the epoch): the durable
        tier is asked (an awaitable) only when the run goes on past DRAM in a durable namespace.
        Lookup and score share it: no request is copied from one type into the other."""
        namespace = blockbase.namespace_name(tenant, ns, trusted=True)
        blockbase.check_batch(keys)
        keys = list(keys)  # out of the message once: the store and the durable tier read them
        in_dram = self.store.lookup(tenant, namespace, keys)
        if self.tier is None or in_dram == len(keys) or not self._through(tenant, namespace):
            return reply(in_dram, in_dram, self._epoch())
        tier = self.tier

        async def later() -> R:
            rest = await tier.leading(tenant, namespace, keys[in_dram:])
            return reply(in_dram, in_dram + rest, self._epoch())

        return later()

    def delete(self, tenant: str, req: pb.DeleteRequest) -> pb.DeleteResponse:
        """Unlink the present keys (and delete durable copies: queued, invisible at once)."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        blockbase.check_batch(req.keys)
        integrity.scrub(self.store, self._arena.view, tenant, namespace, req.keys)
        deleted = self.store.delete(tenant, namespace, req.keys)
        if self.tier is not None:
            self.tier.deleted(tenant, namespace, req.keys)
        return pb.DeleteResponse(deleted=deleted)

    def list_keys(self, tenant: str, req: pb.ListKeysRequest) -> pb.ListKeysResponse:
        """The namespace's keys in DRAM, sorted (see the store's list_keys)."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        limit = req.limit or 1000
        if not 1 <= limit <= 10_000:
            raise errors.InvalidArgument(f"limit {limit}: 1..10000")
        found, truncated = self.store.list_keys(
            tenant, namespace, req.prefix, req.start_after, limit
        )
        return pb.ListKeysResponse(
            entries=[pb.KeyEntry(key=k, size=n) for k, n in found],
            truncated=truncated,
            epoch=self._epoch(),
        )

    def pin(self, tenant: str, req: pb.PinRequest) -> pb.PinResponse:
        """Protect present keys from capacity eviction for req.pin_s seconds."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        blockbase.check_batch(req.keys)
        return pb.PinResponse(pinned=self.store.pin(tenant, namespace, req.keys, req.pin_s))

    def unpin(self, tenant: str, req: pb.UnpinRequest) -> pb.UnpinResponse:
        """Drop pins."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        blockbase.check_batch(req.keys)
        return pb.UnpinResponse(unpinned=self.store.unpin(tenant, namespace, req.keys))

    def touch(self, tenant: str, req: pb.TouchRequest) -> pb.TouchResponse:
        """Count an access and restart TTLs."""
        namespace = blockbase.namespace_name(tenant, req.namespace, trusted=True)
        blockbase.check_batch(req.keys)
        return pb.TouchResponse(touched=self.store.touch(tenant, namespace, req.keys))


def _lookup_reply(dram: int, total: int, epoch: int) -> pb.LookupResponse:
    return pb.LookupResponse(count=total, dram_count=dram, epoch=epoch)


def _score_reply(dram: int, total: int, epoch: int) -> pb.ScoreResponse:
    return pb.ScoreResponse(dram_count=dram, durable_count=total - dram, epoch=epoch)
