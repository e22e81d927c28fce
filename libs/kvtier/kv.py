"""The KV-cache SDK: `KVClient` (sync) and `AsyncKVClient` over every kvcache node of a cluster.

Placement: a key (within its namespace) is owned by the kvcache nodes that rank highest for it
under rendezvous hashing (`kvtier.rendezvous`) over the kvcache nodes of the cluster map;
`replicas` = R puts copies on the top R nodes. Only ~1/N of the keys move when a node joins or
leaves. Every batch operation groups its keys by node and talks to the nodes concurrently.

Bytes: over the data plane, with one *call* per node and batch (`kvtier.transport.base`): a put
sends the blocks straight from the caller's buffers into the node's arena, a get receives them
straight into the caller's buffers (numpy arrays, memoryviews, bytearrays, CPU torch tensors:
anything with the buffer protocol). On a transport without calls (rdma) the SDK asks for
descriptors over gRPC and moves the bytes one-sidedly.

Failures never stop the engine: a node that does not answer (dead, partitioned, past the
deadline) is marked down for a moment and its keys read as misses, its puts as UNAVAILABLE.
Idempotent operations (reads, probes, put-if-absent, delete, pin) are retried once on a fresh
connection when a connection turns out to be broken; overwriting puts are not retried. Every
reply carries the node's map epoch: a newer one makes the client refresh its map before the
next operation (it also refreshes every `refresh_s`).

Integrity: every block carries an xxh3-64 checksum, computed here before a put (the node
checks the bytes it received against it) and returned with every get; the bytes that land in
the caller's buffer are checked against it before the get returns. A block that does not match
is a miss (the next replica is tried), counted (`corrupt_blocks`, a Prometheus counter), logged,
and deleted on the node that served it. `verify_checksums=False` turns both sides off.

Modules: this one holds `AsyncKVClient` (its gets and probes, and the checks of the bytes read)
and re-exports the SDK's names; `kvtier.kv_base` its state, lifecycle and request plumbing (and
the SDK's metrics), `kvtier.kv_puts` its puts, `kvtier.kv_admin` its lifetime and admin
operations, `kvtier.kv_results` `PutStatus`, `PutResult` and `Durability`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from kvtier import (
    blocksums,
    errors,
    kv_admin,
    kv_base,
    kv_puts,
    kv_results,
    kv_routing,
    kvnodes,
    tracing,
)
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base

log = logging.getLogger(__name__)

# The SDK's names, importable from here as ever (`kvtier`, the plugins, the gateway, docs).
PutStatus = kv_results.PutStatus
PutResult = kv_results.PutResult
Durability = kv_results.Durability
OPS = kv_base.OPS
#: The span of a get (`kvtier.tracing.op_span`; the sync client's short path makes the same).
GET_SPAN = kv_base.GET_SPAN
CORRUPT_BLOCKS = kv_base.CORRUPT_BLOCKS
# Used by `kvtier.kv_now` (the sync client's short path) and the unit tests.
_OPS_GET, _OPS_EXISTS, _OPS_LOOKUP = kv_base.OPS_GET, kv_base.OPS_EXISTS, kv_base.OPS_LOOKUP
_PUT_ERRORS = kv_results.PUT_ERRORS
_put_result = kv_results.put_result


class AsyncKVClient(kv_puts.KVPuts, kv_admin.KVAdmin):
    """Batch put/get/exists/lookup of KV-cache blocks across the kvcache nodes (asyncio).

    Build with `await AsyncKVClient.connect(...)`; close with `await client.close()` or use
    `async with`. Not for use from several event loops. Arguments:

    - `namespace`: the name blocks live under (model, cache salt); `tenant`: who the client
      acts for (empty: "default"); a tenant never sees another's blocks.
    - `metadata`: where the cluster map is read (refreshed as it changes): a metadata node's
      address, or several (a sequence or a comma-separated string), metadata nodes and/or
      gateways, tried in order (`kvtier.kv_mapsource`: a client starts while the metadata
      service is down when a gateway is listed); or `nodes`: kvcache node addresses (a fixed
      set); or `map_source`: a function returning the map a service watches itself (the
      gateway's KV buckets).
    - `transports`: data-plane transports allowed, in preference order (empty: rdma, shm, tcp).
    - `replicas`: copies per block (R nodes); `timeout_s`: deadline per node and operation
      (a put into a write-through namespace waits for the node's upload to the durable tier,
      which the node bounds by its write_through_timeout_s, 3 s by default: keep timeout_s
      above that); `refresh_s`: how old the node list may get; `use_calls`: False forces the
      gRPC path with descriptors (what rdma uses).
    - `verify_checksums`: checksum each block on put and check the bytes of each get against
      the block's checksum (default True; see the module docstring). `corrupt_blocks` counts
      the blocks this client found corrupt.
    - `security`: TLS trust anchors and credentials (`kvtier.security.ClientSecurity`: a user's
      access key and secret, exchanged for session tokens at its `token_address` or the first
      `metadata` endpoint that answers; or a certificate); default: from KVTIER_* environment
      variables (`ClientSecurity.from_env`).

    `put_batch`, `get_batch`, `exists_batch` and `lookup` take `timeout_s`, a deadline for that
    call alone: an owner that has not answered by then counts as a miss (or UNAVAILABLE) without
    being marked down.
    """

    async def get_batch(
        self, keys: Sequence[bytes], buffers: Sequence[Any], *, timeout_s: float | None = None
    ) -> list[int | None]:
        """Read blocks into buffers: the size read for each key, None for a miss.

        A buffer may be larger than its block (the block fills its start). A dead or slow
        owner's keys are misses (or come from the next replica). Raises InvalidArgument for
        mismatched lists, unusable buffers, or a buffer too small for its block.
        """
        traced = tracing.op_span(GET_SPAN, attributes={"kvtier.kv.keys": len(keys)})
        with kvnodes.deadline(timeout_s), traced:
            if len(keys) != len(buffers):
                raise errors.InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
            views = [base.as_buffer(b, writable=True) for b in buffers]
            started = time.perf_counter()
            await self._set.fresh()
            sizes: list[int | None] = [None] * len(keys)
            todo = list(range(len(keys)))
            for rank in range(self.replicas):
                sub_keys = [keys[i] for i in todo]
                plans = self._set.plans(sub_keys, rank)
                for plan in plans:
                    plan.indices = [todo[i] for i in plan.indices]
                await kv_base.run_all([self._get_on(plan, keys, views, sizes) for plan in plans])
                todo = [i for i in todo if sizes[i] is None]
                if not todo:
                    break
            kv_base.OPS_GET.observe(time.perf_counter() - started)
            return sizes

    async def _get_on(
        self,
        plan: kvnodes.Plan,
        keys: Sequence[bytes],
        views: Sequence[memoryview],
        sizes: list[int | None],
    ) -> None:
        sub_keys = [keys[i] for i in plan.indices]
        sub_views = [views[i] for i in plan.indices]
        request = pb.BatchGetRequest(namespace=self._ns, keys=sub_keys)

        async def attempt(session: dataplane_client.DataPlaneSession) -> list[pb.GetItem]:
            if self._use_calls and session.transport.supports_calls:
                result = await session.transport.call(
                    pb.CALL_METHOD_BATCH_GET, request.SerializeToString(), intos=sub_views
                )
                reply = pb.BatchGetResponse.FromString(result.reply)
                self._set.saw_epoch(reply.epoch)
                return list(reply.items)
            return await self._get_with_descriptors(plan.node, session, request, sub_views)

        items = await self._set.run(plan.node, "get", attempt, idempotent=True)
        if items is None:
            return
        for index, view, item in zip(plan.indices, sub_views, items, strict=True):
            if item.status == pb.ITEM_STATUS_OK:
                sizes[index] = item.size
            elif item.status == pb.ITEM_STATUS_BUFFER_TOO_SMALL:
                raise errors.InvalidArgument(
                    f"buffer {index} holds {view.nbytes} bytes; its block has {item.size}"
                )
        if self.verify_checksums:
            await self._verify(plan, keys, sub_views, items, sizes)

    async def _verify(
        self,
        plan: kvnodes.Plan,
        keys: Sequence[bytes],
        views: Sequence[memoryview],
        items: Sequence[pb.GetItem],
        sizes: list[int | None],
    ) -> None:
        """Check the bytes read into views against their blocks' checksums (items the node
        sent none for pass); a block that fails becomes a miss, is counted, logged, and
        deleted on the node that served it."""
        checked = checksummed(plan, views, items)
        found = await blocksums.checksums([view for _, view, _ in checked])
        bad = self.mismatches(plan, keys, checked, found, sizes)
        if bad:
            await self._drop_corrupt(plan.node, bad)

    def mismatches(
        self,
        plan: kvnodes.Plan,
        keys: Sequence[bytes],
        checked: Sequence[tuple[int, memoryview, int]],
        found: Sequence[int],
        sizes: list[int | None],
    ) -> list[bytes]:
        """The keys whose bytes do not match their checksums: each becomes a miss, is counted
        and logged (the caller deletes them on the node with `_drop_corrupt`)."""
        bad: list[bytes] = []
        for (index, _, expected), got in zip(checked, found, strict=True):
            if got == expected:
                continue
            sizes[index] = None
            bad.append(keys[index])
            self.corrupt_blocks += 1
            CORRUPT_BLOCKS.inc()
            log.warning(
                "corrupt block from kvcache node %s: namespace %r key %s: read %016x, expected "
                "%016x; served as a miss and deleted there",
                plan.node.node_id, self.namespace[:64], keys[index][:16].hex(), got, expected,
            )  # fmt: skip
        return bad

    async def _drop_corrupt(self, node: kvnodes.Node, keys: list[bytes]) -> None:
        """Delete blocks found corrupt on the node that served them (with this client's own
        rights, as any delete); a failure is logged, never raised into the get."""
        request = pb.DeleteRequest(namespace=self._ns, keys=keys)
        try:
            reply = await self._simple(
                node, "delete", pb.CALL_METHOD_DELETE, request, pb.DeleteResponse,
                node.grpc.delete,
            )  # fmt: skip
        except (errors.KVTierError, OSError) as exc:
            reply, reason = None, str(exc)
        else:
            reason = "the node did not answer"
        if reply is None:
            log.warning("corrupt blocks left on %s (%d): %s", node.node_id, len(keys), reason)

    async def _get_with_descriptors(
        self,
        node: kvnodes.Node,
        session: dataplane_client.DataPlaneSession,
        request: pb.BatchGetRequest,
        views: Sequence[memoryview],
    ) -> list[pb.GetItem]:
        """The gRPC path: leases and grants, one-sided reads, release."""
        request.principal = session.principal
        reply = await node.grpc.batch_get(request)
        self._set.saw_epoch(reply.epoch)
        items = list(reply.items)
        hits = [i for i, item in enumerate(items) if item.status == pb.ITEM_STATUS_OK]
        try:
            for i in hits:
                if items[i].size > views[i].nbytes:
                    items[i] = pb.GetItem(
                        status=pb.ITEM_STATUS_BUFFER_TOO_SMALL, size=items[i].size
                    )
            hits = [i for i in hits if items[i].status == pb.ITEM_STATUS_OK]
            await session.transport.read_batch(
                [base.Descriptor.from_proto(items[i].descriptor) for i in hits],
                [views[i][: items[i].size] for i in hits],
            )
        finally:
            lease_ids = [item.lease_id for item in reply.items if item.lease_id]
            release = pb.ReleaseReadsRequest(namespace=self._ns, lease_ids=lease_ids)
            await node.grpc.release_reads(release)
        return items

    async def get(self, key: bytes, buffer: Any) -> int | None:
        """Read one block into buffer: its size, or None on a miss."""
        (size,) = await self.get_batch([key], [buffer])
        return size

    async def exists_batch(
        self, keys: Sequence[bytes], *, timeout_s: float | None = None
    ) -> list[bool]:
        """Whether each key is present on one of its owners (unreachable owners: False)."""
        with kvnodes.deadline(timeout_s):
            started = time.perf_counter()
            await self._set.fresh()
            present = [False] * len(keys)
            todo = list(range(len(keys)))
            for rank in range(self.replicas):
                plans = self._set.plans([keys[i] for i in todo], rank)
                for plan in plans:
                    plan.indices = [todo[i] for i in plan.indices]
                await kv_base.run_all([self._exists_on(plan, keys, present) for plan in plans])
                todo = [i for i in todo if not present[i]]
                if not todo:
                    break
            kv_base.OPS_EXISTS.observe(time.perf_counter() - started)
            return present

    async def _exists_on(
        self, plan: kvnodes.Plan, keys: Sequence[bytes], present: list[bool]
    ) -> None:
        request = pb.BatchExistsRequest(namespace=self._ns, keys=[keys[i] for i in plan.indices])
        reply = await self._simple(
            plan.node, "exists", pb.CALL_METHOD_BATCH_EXISTS, request, pb.BatchExistsResponse,
            plan.node.grpc.batch_exists,
        )  # fmt: skip
        if reply is None:
            return
        self._set.saw_epoch(reply.epoch)
        for index, flag in zip(plan.indices, reply.present, strict=True):
            present[index] = present[index] or flag

    async def lookup(self, chain: Sequence[bytes], *, timeout_s: float | None = None) -> int:
        """How many leading keys of a chain (e.g. a prompt's chained block hashes) are
        present: one round trip, each owner node asked concurrently for the leading run of
        the keys it owns (`kvnodes.ChainProbe`); further replicas only from where it stopped."""
        with kvnodes.deadline(timeout_s):
            started = time.perf_counter()
            await self._set.fresh()
            probe = kvnodes.ChainProbe(chain, self.replicas)
            while (plans := probe.next_plans(self._set)) is not None:
                counts = await asyncio.gather(*(self._lookup_on(plan, probe) for plan in plans))
                probe.answered(plans, counts)
            kv_base.OPS_LOOKUP.observe(time.perf_counter() - started)
            return probe.run

    async def score(
        self, chain: Sequence[bytes], *, timeout_s: float | None = None
    ) -> kv_routing.ChainScore:
        """For routers: the chain's leading run per tier (DRAM, then the durable tier), in one
        concurrent round trip to the primary owners of its keys (replicas are not asked: a
        key whose primary misses ends the run). Raises InvalidArgument."""
        with kvnodes.deadline(timeout_s):
            await self._set.fresh()
            plans = self._set.plans(chain, 0)
            replies = await asyncio.gather(*(self._score_on(plan, chain) for plan in plans))
            return kv_routing.leading_runs(len(chain), [p.indices for p in plans], replies)

    async def _score_on(
        self, plan: kvnodes.Plan, chain: Sequence[bytes]
    ) -> pb.ScoreResponse | None:
        request = pb.ScoreRequest(namespace=self._ns, keys=[chain[i] for i in plan.indices])
        reply = await self._simple(
            plan.node, "score", pb.CALL_METHOD_SCORE, request, pb.ScoreResponse,
            plan.node.grpc.score,
        )  # fmt: skip
        if reply is not None:
            self._set.saw_epoch(reply.epoch)
        return reply  # type: ignore[no-any-return]

    async def _lookup_on(self, plan: kvnodes.Plan, probe: kvnodes.ChainProbe) -> int | None:
        """The leading run of plan's keys present on its node (None: it did not answer)."""
        request = pb.LookupRequest(namespace=self._ns, keys=probe.keys_of(plan))
        reply = await self._simple(
            plan.node, "lookup", pb.CALL_METHOD_LOOKUP, request, pb.LookupResponse,
            plan.node.grpc.lookup,
        )  # fmt: skip
        if reply is None:
            return None
        self._set.saw_epoch(reply.epoch)
        return int(reply.count)


def checksummed(
    plan: kvnodes.Plan, views: Sequence[memoryview], items: Sequence[pb.GetItem]
) -> list[tuple[int, memoryview, int]]:
    """(position, bytes read, expected checksum) of the hits the node sent a checksum for."""
    return [
        (index, view[: item.size], item.checksum)
        for index, view, item in zip(plan.indices, views, items, strict=True)
        if item.status == pb.ITEM_STATUS_OK and item.HasField("checksum")
    ]
