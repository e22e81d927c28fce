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
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import prometheus_client

from kvtier import blocksums, errors, kv_routing, kv_stats, kvnodes, tracing
from kvtier import security as security_mod
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base, registry

log = logging.getLogger(__name__)

OPS = prometheus_client.Histogram(
    "kvtier_kv_client_op_seconds",
    "KV SDK batch operations, end to end",
    ["op"],
    buckets=(50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5),
)

_OPS_PUT, _OPS_GET, _OPS_EXISTS, _OPS_LOOKUP = (
    OPS.labels(op) for op in ("put", "get", "exists", "lookup")
)
#: The span of a get (`kvtier.tracing.op_span`; the sync client's short path makes the same).
GET_SPAN = "kvtier.kv get_batch"
CORRUPT_BLOCKS = prometheus_client.Counter(
    "kvtier_kv_client_corrupt_blocks_total",
    "Blocks read whose bytes did not match their checksum (served as misses, then deleted)",
)


class PutStatus(enum.StrEnum):
    """The outcome of one key of a put."""

    STORED = "stored"
    EXISTS = "exists"  # put-if-absent: a block is already there
    BUSY = "busy"  # another put of the key is in progress
    QUOTA_EXCEEDED = "quota_exceeded"
    NO_SPACE = "no_space"  # the node has nothing left to evict
    INVALID = "invalid"
    EXPIRED = "expired"  # the put outlived the node's put timeout
    CORRUPT = "corrupt"  # the bytes the node received did not match their checksum
    # No owner node answered, or (write-through namespace) the node's durable tier did not
    # commit the block's copy in time: the put is not acknowledged (reason: which).
    UNAVAILABLE = "unavailable"


@dataclasses.dataclass(frozen=True, slots=True)
class PutResult:
    """The outcome of one key of a put (`AsyncKVClient.put_batch_results`): its status and,
    when the key was refused, why: one line from the node that refused it (e.g. "key of 1041
    bytes: keys must be 1..1040 bytes") or from the SDK ("no owner node answered"). The reason
    is empty for STORED and EXISTS."""

    status: PutStatus
    reason: str = ""


_NO_OWNER = PutResult(PutStatus.UNAVAILABLE, "no owner node answered")
#: Backoff (s) of the rounds that put again keys whose owners did not answer, once the map
#: moved them (`AsyncKVClient._put_moved`).
_MOVED_RETRY_S = (0.05, 0.25)


class Durability(enum.StrEnum):
    """Whether a namespace's blocks also live in the durable tier (`set_durability`)."""

    NONE = "none"  # DRAM only: an evicted block is gone
    WRITE_BACK = "write_back"  # evicted blocks are spilled; misses read through
    WRITE_THROUGH = "write_through"  # every put is uploaded too; misses read through


_DURABILITY = {
    Durability.NONE: pb.DURABILITY_NONE,
    Durability.WRITE_BACK: pb.DURABILITY_WRITE_BACK,
    Durability.WRITE_THROUGH: pb.DURABILITY_WRITE_THROUGH,
}

_PUT_STATUS = {
    pb.ITEM_STATUS_OK: PutStatus.STORED,
    pb.ITEM_STATUS_EXISTS: PutStatus.EXISTS,
    pb.ITEM_STATUS_BUSY: PutStatus.BUSY,
    pb.ITEM_STATUS_QUOTA_EXCEEDED: PutStatus.QUOTA_EXCEEDED,
    pb.ITEM_STATUS_NO_SPACE: PutStatus.NO_SPACE,
    pb.ITEM_STATUS_INVALID: PutStatus.INVALID,
    pb.ITEM_STATUS_EXPIRED: PutStatus.EXPIRED,
    pb.ITEM_STATUS_CORRUPT: PutStatus.CORRUPT,
    pb.ITEM_STATUS_UNAVAILABLE: PutStatus.UNAVAILABLE,
}
_PUT_ERRORS: dict[PutStatus, type[errors.KVTierError]] = {
    PutStatus.BUSY: errors.AlreadyExists,
    PutStatus.QUOTA_EXCEEDED: errors.QuotaExceeded,
    PutStatus.NO_SPACE: errors.Overloaded,
    PutStatus.INVALID: errors.InvalidArgument,
    PutStatus.EXPIRED: errors.DeadlineExceeded,
    PutStatus.CORRUPT: errors.Corrupt,
    PutStatus.UNAVAILABLE: errors.Unavailable,
}
#: The reason of a refused key whose node sent none (older nodes; gRPC commits).
_PUT_MEANINGS = {
    PutStatus.BUSY: "another put of this key is in progress",
    PutStatus.QUOTA_EXCEEDED: "the tenant's quota on the node is full",
    PutStatus.NO_SPACE: "the node has nothing left to evict",
    PutStatus.INVALID: "bad key or size (the node gave no reason)",
    PutStatus.EXPIRED: "the put outlived the node's put timeout; nothing stored",
    PutStatus.CORRUPT: "the bytes the node received do not match their checksum; nothing stored",
    PutStatus.UNAVAILABLE: "write-through: the durable tier did not commit the block's copy",
}


class AsyncKVClient:
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
        self._use_calls = use_calls
        self._set = kvnodes.NodeSet(
            namespace=namespace, tenant=tenant, metadata=metadata, nodes=nodes,
            transports=transports, replicas=replicas, timeout_s=timeout_s, refresh_s=refresh_s,
            client_id=client_id, settings=settings, security=security, map_source=map_source,
        )  # fmt: skip
        self.replicas = replicas

    @classmethod
    async def connect(cls, **kwargs: Any) -> AsyncKVClient:
        """A client with its node list loaded (arguments: see the class). Raises Unavailable
        when no kvcache node can be found."""
        client = cls(**kwargs)
        try:
            await client.refresh()
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> AsyncKVClient:
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

    # Puts.

    async def put_batch(
        self,
        keys: Sequence[bytes],
        blocks: Sequence[Any],
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        engine_hashes: Sequence[bytes] | None = None,
        parent_hashes: Sequence[bytes | None] | None = None,
    ) -> list[PutStatus]:
        """Store blocks under keys (put-if-absent unless overwrite); a status per key.

        engine_hashes / parent_hashes (optional, one per key): the engine's own hash of each
        block and of its parent, published in the nodes' KV events (docs/routing.md).

        Each block is stored on every owner node (`replicas`); the status is that of the
        best-ranked owner that answered. A block becomes readable once all of its bytes are
        in; in a write-through namespace it is STORED only once its durable copy is committed
        (else UNAVAILABLE, nothing stored in DRAM). Raises InvalidArgument for mismatched lists
        or unusable buffers. Why a key was refused: `put_batch_results`.
        """
        results = await self.put_batch_results(
            keys, blocks, overwrite=overwrite, ttl_s=ttl_s, timeout_s=timeout_s,
            engine_hashes=engine_hashes, parent_hashes=parent_hashes,
        )  # fmt: skip
        return [r.status for r in results]

    async def put_batch_results(
        self,
        keys: Sequence[bytes],
        blocks: Sequence[Any],
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        engine_hashes: Sequence[bytes] | None = None,
        parent_hashes: Sequence[bytes | None] | None = None,
    ) -> list[PutResult]:
        """`put_batch`, with each refused key's reason (`PutResult`)."""
        hashes = kv_routing.engine_hashes(keys, engine_hashes, parent_hashes)
        traced = tracing.op_span("kvtier.kv put_batch", attributes={"kvtier.kv.keys": len(keys)})
        with kvnodes.deadline(timeout_s), hashes, traced:
            if len(keys) != len(blocks):
                raise errors.InvalidArgument(f"{len(keys)} keys but {len(blocks)} blocks")
            views = [base.as_buffer(b, writable=False) for b in blocks]
            if ttl_s is not None and ttl_s <= 0:
                raise errors.InvalidArgument("ttl_s must be > 0")
            started = time.perf_counter()
            sums = await blocksums.checksums(views) if self.verify_checksums else []
            await self._set.fresh()
            results: list[list[PutResult | None]] = [
                [None] * len(keys) for _ in range(self.replicas)
            ]
            jobs = [
                self._put_on(plan, rank, keys, views, sums, overwrite, ttl_s or 0.0, results[rank])
                for rank in range(self.replicas)
                for plan in self._set.plans(keys, rank)
            ]
            await _all(jobs)
            if not overwrite:  # put-if-absent is safe to repeat (see _put_moved)
                await self._put_moved(keys, views, sums, ttl_s or 0.0, results)
            _OPS_PUT.observe(time.perf_counter() - started)
            return [_first([r[i] for r in results]) for i in range(len(keys))]

    async def _put_moved(
        self,
        keys: Sequence[bytes],
        views: Sequence[memoryview],
        sums: Sequence[int],
        ttl_s: float,
        results: list[list[PutResult | None]],
    ) -> None:
        """Put again the keys no owner answered for, once a refreshed map places them on
        other nodes (a node that drains leaves the map first: a rolling restart costs no
        put). Bounded: `_MOVED_RETRY_S` rounds, within the caller's deadline. Only
        put-if-absent is repeated: the key was free, so a repeat stores it or, if the first
        attempt did land, answers EXISTS; it never makes a second version."""
        for delay_s in _MOVED_RETRY_S:
            lost = [i for i in range(len(keys)) if all(r[i] is None for r in results)]
            deadline = kvnodes.call_deadline.get()
            loop = asyncio.get_running_loop()
            if not lost or (deadline is not None and loop.time() + delay_s >= deadline):
                return
            before = {i: self._set.owners(keys[i]) for i in lost}
            await asyncio.sleep(delay_s)
            try:
                await self._set.refresh()
            except errors.KVTierError:
                continue
            moved = [i for i in lost if self._set.owners(keys[i]) != before[i]]
            if not moved:
                continue
            again: list[list[PutResult | None]] = [[None] * len(moved) for _ in results]
            sub_keys, sub_views = [keys[i] for i in moved], [views[i] for i in moved]
            sub_sums = [sums[i] for i in moved] if sums else []
            await _all([
                self._put_on(plan, rank, sub_keys, sub_views, sub_sums, False, ttl_s, again[rank])
                for rank in range(self.replicas)
                for plan in self._set.plans(sub_keys, rank)
            ])  # fmt: skip
            for rank, row in enumerate(again):
                for j, i in enumerate(moved):
                    results[rank][i] = row[j] if row[j] is not None else results[rank][i]

    async def _put_on(
        self,
        plan: kvnodes.Plan,
        rank: int,
        keys: Sequence[bytes],
        views: Sequence[memoryview],
        sums: Sequence[int],
        overwrite: bool,
        ttl_s: float,
        out: list[PutResult | None],
    ) -> None:
        sub_keys = [keys[i] for i in plan.indices]
        sub_views = [views[i] for i in plan.indices]
        request = pb.BatchPutRequest(
            namespace=self._ns,
            keys=sub_keys,
            sizes=[v.nbytes for v in sub_views],
            overwrite=overwrite,
            ttl_s=ttl_s,
            checksums=[sums[i] for i in plan.indices] if sums else (),
        )
        kv_routing.add_engine_hashes(request, sub_keys)

        async def attempt(session: dataplane_client.DataPlaneSession) -> list[PutResult]:
            if self._use_calls and session.transport.supports_calls:
                result = await session.transport.call(
                    pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), segments=sub_views
                )
                reply = pb.BatchPutResponse.FromString(result.reply)
                self._set.saw_epoch(reply.epoch)
                return [_put_result(item) for item in reply.items]
            return await self._put_with_descriptors(plan.node, session, request, sub_views)

        statuses = await self._set.run(plan.node, "put", attempt, idempotent=not overwrite)
        if statuses is not None:
            for index, status in zip(plan.indices, statuses, strict=True):
                out[index] = status

    async def _put_with_descriptors(
        self,
        node: kvnodes.Node,
        session: dataplane_client.DataPlaneSession,
        request: pb.BatchPutRequest,
        views: Sequence[memoryview],
    ) -> list[PutResult]:
        """The gRPC path: grants, one-sided writes, commit (abort when a write fails)."""
        request.principal = session.principal
        reply = await node.grpc.batch_put(request)
        self._set.saw_epoch(reply.epoch)
        granted = [i for i, item in enumerate(reply.items) if item.status == pb.ITEM_STATUS_OK]
        put_ids = [reply.items[i].put_id for i in granted]
        try:
            await session.transport.write_batch(
                [base.Descriptor.from_proto(reply.items[i].descriptor) for i in granted],
                [views[i] for i in granted],
            )
        except BaseException:
            commit = pb.CommitPutsRequest(namespace=self._ns, put_ids=put_ids, abort=True)
            await node.grpc.commit_puts(commit)
            raise
        done = await node.grpc.commit_puts(
            pb.CommitPutsRequest(namespace=self._ns, put_ids=put_ids)
        )
        results = [_put_result(item) for item in reply.items]
        for index, status in zip(granted, done.statuses, strict=True):
            results[index] = _put_result(pb.PutGrant(status=status))
        return results

    async def put(
        self, key: bytes, block: Any, *, overwrite: bool = False, ttl_s: float | None = None
    ) -> bool:
        """Store one block: True when stored, False when present (put-if-absent). Raises
        QuotaExceeded, Overloaded (no room), AlreadyExists (a put of it is in progress),
        Unavailable (no owner answered, or in a write-through namespace the durable tier did
        not commit the copy: nothing stored in DRAM; safe to retry), InvalidArgument, Corrupt,
        DeadlineExceeded; the message names the cause (e.g. "put of one block: invalid: key of
        1041 bytes: keys must be 1..1040 bytes")."""
        (result,) = await self.put_batch_results([key], [block], overwrite=overwrite, ttl_s=ttl_s)
        status = result.status
        if status in (PutStatus.STORED, PutStatus.EXISTS):
            return status is PutStatus.STORED
        raise _PUT_ERRORS[status](f"put of one block: {status.value}: {result.reason}")

    # Gets and probes.

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
                await _all([self._get_on(plan, keys, views, sizes) for plan in plans])
                todo = [i for i in todo if sizes[i] is None]
                if not todo:
                    break
            _OPS_GET.observe(time.perf_counter() - started)
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
                await _all([self._exists_on(plan, keys, present) for plan in plans])
                todo = [i for i in todo if not present[i]]
                if not todo:
                    break
            _OPS_EXISTS.observe(time.perf_counter() - started)
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
            _OPS_LOOKUP.observe(time.perf_counter() - started)
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

        # Lifetime.

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

    async def set_durability(self, durability: Durability | str) -> int:
        """Operator setting: the durability of this client's namespace on every kvcache node
        of the map (kept in the nodes' memory; a restarted or new node needs it again, or its
        `durable_namespaces` setting). Returns how many nodes were set; raises the first
        node's error (Unavailable, InvalidArgument) if any failed."""
        value = _DURABILITY[Durability(durability)]
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


def checksummed(
    plan: kvnodes.Plan, views: Sequence[memoryview], items: Sequence[pb.GetItem]
) -> list[tuple[int, memoryview, int]]:
    """(position, bytes read, expected checksum) of the hits the node sent a checksum for."""
    return [
        (index, view[: item.size], item.checksum)
        for index, view, item in zip(plan.indices, views, items, strict=True)
        if item.status == pb.ITEM_STATUS_OK and item.HasField("checksum")
    ]


def _first(results: Sequence[PutResult | None]) -> PutResult:
    """The outcome on the best-ranked owner that answered."""
    return next((r for r in results if r is not None), _NO_OWNER)


def _put_result(item: pb.PutGrant) -> PutResult:
    """One key's outcome from a node's reply (a status this SDK does not know: INVALID)."""
    status = _PUT_STATUS.get(item.status)
    if status is None:
        return PutResult(PutStatus.INVALID, f"the node answered status {item.status}")
    return PutResult(status, item.reason or _PUT_MEANINGS.get(status, ""))


async def _all(jobs: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run jobs concurrently; one job runs inline (no task: the common single-node case)."""
    if len(jobs) == 1:
        await jobs[0]
    elif jobs:
        await asyncio.gather(*jobs)
