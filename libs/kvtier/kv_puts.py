"""The KV SDK's puts (`kvtier.kv.AsyncKVClient.put_batch`, `put_batch_results`, `put`, and
`put_filled`, whose bytes the caller writes straight into the node's memory).

A put checksums its blocks (unless `verify_checksums` is off), stores each block on every owner
node (one data-plane call per node and replica rank, or grants, one-sided writes and a commit
over gRPC on a transport without calls) and, for put-if-absent, puts again the keys no owner
answered for once a refreshed map places them elsewhere (`_put_moved`). See `kvtier.kv`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from kvtier import blocksums, errors, features, kv_base, kv_results, kv_routing, kvnodes, tracing
from kvtier.clients import dataplane as dataplane_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from kvtier.transport import base

#: Backoff (s) of the rounds that put again keys whose owners did not answer, once the map
#: moved them (`KVPuts._put_moved`).
_MOVED_RETRY_S = (0.05, 0.25)
#: `KVPuts.put_filled`'s answer where the node's transport cannot take bytes in place.
_NOT_FILLED = object()
#: A compare-and-swap put's outcome on an owner that does not advertise it (nothing sent).
_NO_SWAP = kv_results.PutResult(
    kv_results.PutStatus.INVALID,
    f"the node does not advertise {features.KVCACHE_COMPARE_AND_SWAP} (an older build)",
)


class _FillFailed(Exception):
    """A put_filled's fill raised (carried past the node's error handling as what it is)."""


class KVPuts(kv_base.KVClientBase):
    """The put operations of `kvtier.kv.AsyncKVClient`."""

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
        if_checksums: Sequence[int] | None = None,
    ) -> list[kv_results.PutStatus]:
        """Store blocks under keys (put-if-absent unless overwrite); a status per key.

        engine_hashes / parent_hashes (optional, one per key): the engine's own hash of each
        block and of its parent, published in the nodes' KV events (docs/routing.md).

        if_checksums (optional, one per key: compare-and-swap; overwrite is not consulted):
        each key's block is replaced only while the present one's xxh3-64
        (`blocksums.checksum` of the bytes read) is that one, atomically on its node;
        MISMATCH when it is another block or none (nothing stored). Sent only to nodes that
        advertise it (`compare_and_swap`; to another owner: INVALID, nothing sent); never
        repeated by the SDK.

        Each block is stored on every owner node (`replicas`); the status is that of the
        best-ranked owner that answered. A block becomes readable once all of its bytes are
        in; in a write-through namespace it is STORED only once its durable copy is committed
        (else UNAVAILABLE, nothing stored in DRAM). Raises InvalidArgument for mismatched lists
        or unusable buffers. Why a key was refused: `put_batch_results`.
        """
        results = await self.put_batch_results(
            keys, blocks, overwrite=overwrite, ttl_s=ttl_s, timeout_s=timeout_s,
            engine_hashes=engine_hashes, parent_hashes=parent_hashes, if_checksums=if_checksums,
        )  # fmt: skip
        return [r.status for r in results]

    async def compare_and_swap(self, keys: Sequence[bytes]) -> bool:
        """Whether a put_batch with if_checksums can hold for keys: every owner node of each
        (all replicas) advertises `kvcache.compare-and-swap` (an older node would drop the
        condition and overwrite). False during a rolling upgrade until they all do."""
        await self._set.fresh()
        return all(
            self._set.advertises(node_id, features.KVCACHE_COMPARE_AND_SWAP)
            for key in keys
            for node_id in self._set.owners(key)
        )

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
        if_checksums: Sequence[int] | None = None,
    ) -> list[kv_results.PutResult]:
        """`put_batch`, with each refused key's reason (`kv_results.PutResult`)."""
        hashes = kv_routing.engine_hashes(keys, engine_hashes, parent_hashes)
        traced = tracing.op_span("kvtier.kv put_batch", attributes={"kvtier.kv.keys": len(keys)})
        with kvnodes.deadline(timeout_s), hashes, traced:
            if len(keys) != len(blocks):
                raise errors.InvalidArgument(f"{len(keys)} keys but {len(blocks)} blocks")
            if if_checksums is not None and len(if_checksums) != len(keys):
                raise errors.InvalidArgument(f"{len(keys)} keys but {len(if_checksums)} checksums")
            # A compare-and-swap put goes with overwrite False: a node that (against
            # `compare_and_swap`) dropped the condition would then refuse a present block.
            swaps = list(if_checksums) if if_checksums is not None else None
            overwrite = overwrite and swaps is None
            views = [base.as_buffer(b, writable=False) for b in blocks]
            if ttl_s is not None and ttl_s <= 0:
                raise errors.InvalidArgument("ttl_s must be > 0")
            started = time.perf_counter()
            sums = await blocksums.checksums(views) if self.verify_checksums else []
            await self._set.fresh()
            results: list[list[kv_results.PutResult | None]] = [
                [None] * len(keys) for _ in range(self.replicas)
            ]
            jobs = [
                self._put_on(
                    plan, rank, keys, views, sums, overwrite, ttl_s or 0.0, results[rank], swaps
                )
                for rank in range(self.replicas)
                for plan in self._set.plans(keys, rank)
            ]
            await kv_base.run_all(jobs)
            if not overwrite and swaps is None:  # put-if-absent is safe to repeat (_put_moved)
                await self._put_moved(keys, views, sums, ttl_s or 0.0, results)
            kv_base.OPS_PUT.observe(time.perf_counter() - started)
            return [kv_results.first([r[i] for r in results]) for i in range(len(keys))]

    async def _put_moved(
        self,
        keys: Sequence[bytes],
        views: Sequence[memoryview],
        sums: Sequence[int],
        ttl_s: float,
        results: list[list[kv_results.PutResult | None]],
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
            again: list[list[kv_results.PutResult | None]] = [[None] * len(moved) for _ in results]
            sub_keys, sub_views = [keys[i] for i in moved], [views[i] for i in moved]
            sub_sums = [sums[i] for i in moved] if sums else []
            await kv_base.run_all([
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
        out: list[kv_results.PutResult | None],
        swaps: Sequence[int] | None = None,
    ) -> None:
        if swaps is not None and not self._set.advertises(
            plan.node.node_id, features.KVCACHE_COMPARE_AND_SWAP
        ):  # it would drop the condition: never sent
            for index in plan.indices:
                out[index] = _NO_SWAP
            return
        sub_keys = [keys[i] for i in plan.indices]
        sub_views = [views[i] for i in plan.indices]
        request = pb.BatchPutRequest(
            namespace=self._ns,
            keys=sub_keys,
            sizes=[v.nbytes for v in sub_views],
            overwrite=overwrite,
            ttl_s=ttl_s,
            checksums=[sums[i] for i in plan.indices] if sums else (),
            if_checksums=[swaps[i] for i in plan.indices] if swaps is not None else (),
        )
        kv_routing.add_engine_hashes(request, sub_keys)

        async def attempt(session: dataplane_client.DataPlaneSession) -> list[kv_results.PutResult]:
            if self._use_calls and session.transport.supports_calls:
                result = await session.transport.call(
                    pb.CALL_METHOD_BATCH_PUT, request.SerializeToString(), segments=sub_views
                )
                reply = pb.BatchPutResponse.FromString(result.reply)
                self._set.saw_epoch(reply.epoch)
                return [kv_results.put_result(item) for item in reply.items]
            return await self._put_with_descriptors(plan.node, session, request, sub_views)

        # A compare-and-swap repeated after it landed would answer MISMATCH: never repeated.
        once = overwrite or swaps is not None
        statuses = await self._set.run(plan.node, "put", attempt, idempotent=not once)
        if statuses is not None:
            for index, status in zip(plan.indices, statuses, strict=True):
                out[index] = status

    async def _put_with_descriptors(
        self,
        node: kvnodes.Node,
        session: dataplane_client.DataPlaneSession,
        request: pb.BatchPutRequest,
        views: Sequence[memoryview],
    ) -> list[kv_results.PutResult]:
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
        results = [kv_results.put_result(item) for item in reply.items]
        for index, status in zip(granted, done.statuses, strict=True):
            results[index] = kv_results.put_result(pb.PutGrant(status=status))
        return results

    async def put_filled(
        self,
        key: bytes,
        size: int,
        fill: base.SinkFill,
        *,
        overwrite: bool = False,
        ttl_s: float | None = None,
    ) -> kv_results.PutResult | None:
        """Store one block of size bytes that fill writes itself, straight into the owner
        node's memory (a transport that `base.FillsSinks`: shm), with no buffer of the
        caller's and no copy; None, before fill is called, where that cannot be done (another
        transport, no calls, replicas > 1): the caller then puts a buffer. fill gets one
        writable view of size bytes and is not called when the node refuses the key (the
        result says why). When fill raises, nothing is stored (the node aborts the put) and
        its error propagates. The node checksums the bytes itself (the SDK never sees them).
        Not repeated (the bytes are gone once written): a lost node is UNAVAILABLE."""
        if ttl_s is not None and ttl_s <= 0:
            raise errors.InvalidArgument("ttl_s must be > 0")
        if self.replicas != 1 or not self._use_calls:
            return None
        await self._set.fresh()
        plans = self._set.plans([key], 0)
        if not plans:
            return kv_results.NO_OWNER
        request = pb.BatchPutRequest(
            namespace=self._ns, keys=[key], sizes=[size], overwrite=overwrite, ttl_s=ttl_s or 0.0
        )
        kv_routing.add_engine_hashes(request, [key])
        message = request.SerializeToString()
        failed: list[BaseException] = []

        async def guarded(views: Sequence[memoryview | None]) -> None:
            try:
                await fill(views)
            except Exception as exc:  # not a node's failure: never marks the node down
                failed.append(exc)
                raise _FillFailed from exc

        async def attempt(session: dataplane_client.DataPlaneSession) -> Any:
            transport = session.transport
            if not isinstance(transport, base.FillsSinks):
                return _NOT_FILLED
            result = await transport.call_filled(pb.CALL_METHOD_BATCH_PUT, message, [size], guarded)
            reply = pb.BatchPutResponse.FromString(result.reply)
            self._set.saw_epoch(reply.epoch)
            return kv_results.put_result(reply.items[0])

        started = time.perf_counter()
        traced = tracing.op_span("kvtier.kv put_filled", attributes={"kvtier.kv.keys": 1})
        with traced:
            try:
                outcome = await self._set.run(plans[0].node, "put", attempt, idempotent=False)
            except _FillFailed:
                raise failed[0] from None
        if outcome is _NOT_FILLED:
            return None
        kv_base.OPS_PUT.observe(time.perf_counter() - started)
        return outcome if isinstance(outcome, kv_results.PutResult) else kv_results.NO_OWNER

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
        if status in (kv_results.PutStatus.STORED, kv_results.PutStatus.EXISTS):
            return status is kv_results.PutStatus.STORED
        raise kv_results.PUT_ERRORS[status](f"put of one block: {status.value}: {result.reason}")

    # Gets and probes.
