"""The shard API of a datanode, over its drives' `ShardStore`s (no grpc here).

Bytes travel as data-plane calls (`handle_call`): WRITE_SHARD lands a write's shard bytes in a
staging slot of the node's region, then appends them to the staged write on disk; READ_SHARD
reads verified blocks from disk into a staging slot and sends them from there; WRITE_SMALL stages
and commits small shards of one object on any of the node's drives in one call
(`shards.ShardStore.write_small`: inline in the meta, durable by the drive's journal; the
shards come in the call's segments, landed in a staging slot, or in the request itself, the
gateway's choice for a call of a few KiB: no slot, and one round trip on shm), and
READ_METAS reads the object's meta on several of its drives in one call (a small object's GET).
Control requests (commit, abort, metadata, delete, listing, verify) come over gRPC through the
servicer. Disk work runs in a bounded thread pool, never on the event loop; a full set of
staging slots makes new calls wait (backpressure) up to `slot_wait_s`, then Overloaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import prometheus_client

from kvtier import errors, tracing
from kvtier.proto.datanode.v1 import datanode_pb2 as pb_meta
from kvtier.proto.datanode.v1 import shards_pb2 as pb
from kvtier.transport import base, calls, shm_copy, slots
from services.datanode import drivemetrics, index, metaupdate, shardmeta, shards

log = logging.getLogger(__name__)

T = TypeVar("T")

SHARD_BYTES = prometheus_client.Counter(
    "kvtier_datanode_shard_bytes_total", "Shard bytes moved", ["op"]
)
#: The most drives one WRITE_SMALL or READ_METAS call may name (a node's drives of one set).
_MAX_DRIVES_PER_CALL = 64

CORRUPT = prometheus_client.Counter(
    "kvtier_datanode_corrupt_blocks_total", "Shard reads that found a bad block"
)
FULL = prometheus_client.Counter(
    "kvtier_datanode_drive_full_total", "Writes a drive refused for want of space"
)
#: What a full drive (or a user over its disk quota) answers a write with.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def storage_full(exc: BaseException) -> errors.StorageFull | None:
    """The typed error for an error that says the drive is full: an OSError (ENOSPC, EDQUOT)
    or the drive's SQLite listing index refusing to grow (SQLITE_FULL); None: another error."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        FULL.inc()
        return errors.StorageFull(f"drive full: its listing index cannot grow ({exc})")
    if not isinstance(exc, OSError) or exc.errno not in _FULL_ERRNOS:
        return None
    FULL.inc()
    where = f" ({exc.filename})" if exc.filename else ""
    return errors.StorageFull(f"drive full: {exc.strerror}{where}")


class ShardNode:
    """The shard API of one datanode (see the module docstring)."""

    def __init__(
        self,
        stores: Mapping[str, shards.ShardStore],
        staging: slots.SlotPool,
        executor: concurrent.futures.Executor,
        *,
        slot_wait_s: float = 10.0,
        write_ttl_s: float = 900.0,
    ) -> None:
        self._stores = dict(stores)
        self._staging = staging
        self._executor = executor
        self._slot_wait_s = slot_wait_s
        self._write_ttl_s = write_ttl_s
        self._writes: dict[tuple[str, str], tuple[shards.StagedWrite, float]] = {}
        self._opening: dict[tuple[str, str], asyncio.Future[shards.StagedWrite]] = {}

    @property
    def max_call_bytes(self) -> int:
        """The most bytes one WRITE_SHARD or READ_SHARD call may move."""
        return self._staging.slot_bytes

    # Data-plane calls.

    def handle_call(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        """The node's `kvtier.transport.base.CallHandler` (asynchronous but for WRITE_SMALL
        with its shards inline)."""
        tracing.name_call("datanode", pb.ShardCallMethod, method)
        if method == pb.SHARD_CALL_METHOD_WRITE_SHARD:
            write = calls.parse_request(pb.WriteShardRequest, request)
            return self._write_plan(write, segments)
        if method == pb.SHARD_CALL_METHOD_READ_SHARD:
            read = calls.parse_request(pb.ReadShardRequest, request)
            if segments or len(capacities) != 1:
                raise errors.InvalidArgument("READ_SHARD takes no segments and one buffer")
            return self._read_plan(read, capacities[0])
        if method == pb.SHARD_CALL_METHOD_WRITE_SMALL:
            small = calls.parse_request(pb.WriteSmallRequest, request)
            if capacities:
                raise errors.InvalidArgument("WRITE_SMALL takes no buffers")
            return self._small_plan(small, segments)
        if method == pb.SHARD_CALL_METHOD_READ_METAS:
            metas = calls.parse_request(pb.ReadMetasRequest, request)
            if segments or capacities:
                raise errors.InvalidArgument("READ_METAS takes no segments nor buffers")
            return self._metas_plan(metas)
        if method == pb.SHARD_CALL_METHOD_READ_META:
            meta = calls.parse_request(pb.ReadMetaRequest, request)
            if segments or capacities:
                raise errors.InvalidArgument("READ_META takes no segments nor buffers")
            return self._meta_plan(meta)
        raise errors.InvalidArgument(f"unknown datanode call method {method}")

    async def _meta_plan(self, req: pb.ReadMetaRequest) -> base.CallPlan:
        return base.CallPlan(reply=(await self.read_meta(req)).SerializeToString())

    async def _write_plan(
        self, req: pb.WriteShardRequest, segments: Sequence[int]
    ) -> base.CallPlan:
        total = sum(segments)
        if total > self._staging.slot_bytes:
            raise errors.InvalidArgument(
                f"{total} bytes in one WRITE_SHARD call; at most {self._staging.slot_bytes}"
            )
        staged = await self._staged(req.drive_id, req.write_id)
        slot = await self._staging.acquire(self._slot_wait_s)
        sinks = []
        at = slot.offset
        for length in segments:
            sinks.append(base.Span(slot.region, at, length))
            at += length
        view = slot.region.view[slot.offset : slot.offset + total]

        async def on_received() -> bytes:
            await self._run(staged.write_part, req.part, req.offset, view)
            SHARD_BYTES.labels("write").inc(total)
            reply = pb.WriteShardResponse(written=total)
            if req.bucket:  # a write's first call: the stamp its commit must exceed
                store = self._store(req.drive_id)
                reply.current_mtime_unix_ns = await self._run(
                    store.current_stamp, req.bucket, req.key
                )
            return reply.SerializeToString()

        def on_done(ok: bool) -> None:
            self._staging.release(slot)

        return base.CallPlan(sinks=sinks, on_received=on_received, on_done=on_done)

    def _small_plan(
        self, req: pb.WriteSmallRequest, segments: Sequence[int]
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        """WRITE_SMALL's plan: shards inline in the request (no segments: no staging slot, and
        one round trip on shm) or in the segments (landed in a staging slot)."""
        sizes = [e.meta.parts[0].shard_bytes if len(e.meta.parts) == 1 else -1 for e in req.shards]
        held = [len(e.data) for e in req.shards]
        inline = not segments
        total = sum(sizes) if inline else sum(segments)
        if (
            not 1 <= len(sizes) <= _MAX_DRIVES_PER_CALL
            or min(sizes) < 0
            or sum(sizes) != total
            or held != (sizes if inline else [0] * len(sizes))
        ):
            raise errors.InvalidArgument(
                "WRITE_SMALL: 1-64 shards, each of one part, whose shard_bytes add up to the "
                "segments' bytes, or each in its data when the call has no segments"
            )
        if max(sizes) > shards.SMALL_WRITE_MAX_BYTES or total > self._staging.slot_bytes:
            raise errors.InvalidArgument(
                f"WRITE_SMALL: a shard is over {shards.SMALL_WRITE_MAX_BYTES} or the call's "
                f"{total} bytes over {self._staging.slot_bytes}"
            )
        if inline:  # the request holds the bytes (bounded by the transport's message limit)
            pieces = [e.data for e in req.shards]
            return base.CallPlan(on_received=lambda: self._small_reply(req.shards, pieces, total))
        return self._small_slot_plan(req, sizes, segments, total)

    async def _small_reply(
        self, entries: Sequence[pb.SmallShard], pieces: Sequence[bytes], total: int
    ) -> bytes:
        results = await self._write_smalls(entries, pieces)
        SHARD_BYTES.labels("write").inc(total)
        return pb.WriteSmallResponse(results=results).SerializeToString()

    async def _small_slot_plan(
        self,
        req: pb.WriteSmallRequest,
        sizes: Sequence[int],
        segments: Sequence[int],
        total: int,
    ) -> base.CallPlan:
        slot = await self._staging.acquire(self._slot_wait_s)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._staging.release(slot)

        sinks = []
        at = slot.offset
        for length in segments:
            sinks.append(base.Span(slot.region, at, length))
            at += length

        async def on_received() -> bytes:
            # The shards are copied out at once: the slot is not held through the journals' syncs.
            view, pieces, at = slot.region.view[slot.offset :], [], 0
            for size in sizes:
                pieces.append(bytes(view[at : at + size]))
                at += size
            release()
            return await self._small_reply(req.shards, pieces, total)

        return base.CallPlan(sinks=sinks, on_received=on_received, on_done=lambda ok: release())

    async def _write_smalls(
        self, entries: Sequence[pb.SmallShard], pieces: Sequence[bytes]
    ) -> list[pb.ShardResult]:
        """Each shard's small write, its error in its result (the call's other shards go on).
        A call may carry several objects' shards (the gateway batches concurrent small PUTs):
        a drive's shards then share one journal sync (ShardStore.write_smalls), the drives in
        parallel. One object's shards (one per drive) go in one pool job: a hop to the pool
        costs about what a drive's write does, and concurrent calls keep the pool busy."""
        drives: dict[str, list[int]] = {}
        for at, entry in enumerate(entries):
            drives.setdefault(entry.drive_id, []).append(at)
        results: dict[int, pb.ShardResult] = {}

        def write_smalls(groups: Sequence[tuple[str, list[int]]]) -> None:
            for drive_id, ats in groups:
                items = [(entries[at].meta, pieces[at]) for at in ats]
                results.update(zip(ats, self._drive_smalls(drive_id, items), strict=True))

        groups = list(drives.items())
        if len(groups) == len(entries):
            await self._run(write_smalls, groups)
        else:
            await asyncio.gather(*(self._run(write_smalls, [group]) for group in groups))
        return [results[at] for at in range(len(entries))]

    def _drive_smalls(
        self, drive_id: str, items: Sequence[tuple[pb_meta.ShardMeta, bytes]]
    ) -> list[pb.ShardResult]:
        """The small writes of one drive, a result each (blocking: in the pool)."""
        try:
            got: Sequence[pb_meta.ShardMeta | Exception] = self._store(drive_id).write_smalls(items)
        except errors.KVTierError as exc:  # no such drive here
            got = [exc] * len(items)
        return [_small_result(one) for one in got]

    async def _metas_plan(self, req: pb.ReadMetasRequest) -> base.CallPlan:
        if not 1 <= len(req.drive_ids) <= _MAX_DRIVES_PER_CALL:
            raise errors.InvalidArgument("READ_METAS: 1-64 drives")
        metas = await self._run(self._read_metas, req)
        return base.CallPlan(reply=pb.ReadMetasResponse(metas=metas).SerializeToString())

    def _read_metas(self, req: pb.ReadMetasRequest) -> list[pb.DriveMeta]:
        """The object's meta on each drive, or that drive's error (blocking: in the pool)."""
        out = []
        for drive_id in req.drive_ids:
            try:
                meta = self._store(drive_id).read_meta_aged(req.bucket, req.key, req.version_id)
            except errors.KVTierError as exc:
                result = pb.ShardResult(error_kind=type(exc).__name__, error=str(exc))
                out.append(pb.DriveMeta(result=result))
            else:
                if (
                    req.without_data and drive_id not in req.data_drive_ids
                ) or not shardmeta.fits_inline(meta):
                    # Not needed (a HEAD, a GET's parity drives), or a small write's shard over
                    # 128 KiB: READ_SHARD moves that through staging memory, for less CPU than
                    # a reply of that size (a 2 MiB GET: 10-13 against 12-15 ms of cluster CPU,
                    # docs/benchmarks.md).
                    meta.inline_data = b""
                out.append(pb.DriveMeta(meta=meta))
        return out

    async def _read_plan(self, req: pb.ReadShardRequest, capacity: int) -> base.CallPlan:
        store = self._store(req.drive_id)
        slot = await self._staging.acquire(self._slot_wait_s)
        room = min(capacity, slot.length)
        view = slot.region.view[slot.offset : slot.offset + room]
        try:
            length = await self._run(
                store.read_shard, req.bucket, req.key, req.part, req.block_offset,
                req.block_count, view, data_id=req.data_id,
            )  # fmt: skip
        except errors.Corrupt:
            CORRUPT.inc()
            self._staging.release(slot)
            raise
        except BaseException:
            self._staging.release(slot)
            raise
        SHARD_BYTES.labels("read").inc(length)
        reply = pb.ReadShardResponse(length=length).SerializeToString()
        return base.CallPlan(
            reply=reply,
            sources=[base.Span(slot.region, slot.offset, length)],
            on_done=lambda ok: self._staging.release(slot),
        )

    # gRPC.

    async def commit_write(self, req: pb.CommitWriteRequest) -> pb.CommitWriteResponse:
        """Make a staged write the object's version on the drive (or, with part_sources,
        compose the version from objects already on the drive)."""
        if req.part_sources:
            store = self._store(req.drive_id)
            sources = [(s.bucket, s.key, s.data_id) for s in req.part_sources]
            try:
                await self._run(store.compose, req.write_id, req.meta, sources)
            except shards.Superseded as exc:
                return _superseded(exc)
            return pb.CommitWriteResponse()
        entry = self._writes.pop((req.drive_id, req.write_id), None)
        if entry is None:
            raise errors.NotFound(f"no staged write {req.write_id} on drive {req.drive_id}")
        staged = entry[0]
        staged.only_if_newer = True  # concurrent PUTs of a key converge on the newest
        staged.noncurrent = req.noncurrent
        try:
            await self._run(staged.commit, req.meta)
        except shards.Superseded as exc:
            await self._run(staged.abort)
            return _superseded(exc)
        except BaseException:
            await self._run(staged.abort)
            raise
        return pb.CommitWriteResponse()

    async def abort_write(self, req: pb.AbortWriteRequest) -> pb.AbortWriteResponse:
        """Drop a staged write (unknown ids are ignored)."""
        entry = self._writes.pop((req.drive_id, req.write_id), None)
        if entry is not None:
            await self._run(entry[0].abort)
        return pb.AbortWriteResponse()

    async def read_meta(self, req: pb.ReadMetaRequest) -> pb.ReadMetaResponse:
        """The object's metadata on the drive."""
        store = self._store(req.drive_id)
        meta = await self._run(store.read_meta, req.bucket, req.key, req.version_id)
        return pb.ReadMetaResponse(meta=meta)

    async def update_meta(self, req: pb.UpdateMetaRequest) -> pb.UpdateMetaResponse:
        """Replace the tags or the ACL of a version on the drive, in place (metaupdate)."""
        store = self._store(req.drive_id)
        return pb.UpdateMetaResponse(meta=await self._run(metaupdate.update_meta, store, req))

    async def delete_shard(self, req: pb.DeleteShardRequest) -> pb.DeleteShardResponse:
        """Remove the object's shard from the drive."""
        store = self._store(req.drive_id)
        deleted = await self._run(
            store.delete, req.bucket, req.key, req.version_id, req.if_data_id,
            restore_previous=req.restore_previous,
        )  # fmt: skip
        return pb.DeleteShardResponse(deleted=deleted)

    async def list_shards(self, req: pb.ListShardsRequest) -> pb.ListShardsResponse:
        """Sorted entries of the drive's index."""
        store = self._store(req.drive_id)
        if req.versions:
            versions = await self._run(
                store.list_versions, req.bucket, req.prefix, req.start_after,
                req.start_after_version, req.limit or 1000,
            )  # fmt: skip
            return pb.ListShardsResponse(entries=[_version_entry(v) for v in versions])
        entries = await self._run(
            store.list, req.bucket, req.prefix, req.start_after, req.limit or 1000
        )
        return pb.ListShardsResponse(
            entries=[
                pb.ShardEntry(
                    key=e.key,
                    size=e.size,
                    etag=e.etag,
                    mtime_unix_ns=e.mtime_ns,
                    is_pointer=e.is_pointer,
                    delete_marker=e.delete_marker,
                    owner=e.owner,
                    initiator=e.initiator,
                )
                for e in entries
            ]
        )

    async def verify_shard(self, req: pb.VerifyShardRequest) -> pb.VerifyShardResponse:
        """The object's (version_id: that version's) bad blocks on the drive (or missing)."""
        store = self._store(req.drive_id)
        try:
            bad = await self._run(store.verify, req.bucket, req.key, req.version_id)
        except errors.NotFound:
            return pb.VerifyShardResponse(missing=True)
        return pb.VerifyShardResponse(bad_blocks=[f"{p}:{b}" for p, b in bad])

    # Housekeeping.

    async def sweep(self) -> int:
        """Abort staged writes idle longer than write_ttl_s (a writer that vanished)."""
        now = time.monotonic()
        stale = [k for k, (_, at) in self._writes.items() if now - at > self._write_ttl_s]
        for key in stale:
            staged, _ = self._writes.pop(key)
            log.warning("aborting staged write %s on %s: idle too long", key[1], key[0])
            await self._run(staged.abort)
        return len(stale)

    def _store(self, drive_id: str) -> shards.ShardStore:
        store = self._stores.get(drive_id)
        if store is None:
            raise errors.NotFound(f"no drive {drive_id} on this node")
        return store

    async def _staged(self, drive_id: str, write_id: str) -> shards.StagedWrite:
        """The staged write of write_id on the drive, begun by its first WRITE_SHARD call."""
        key = (drive_id, write_id)
        entry = self._writes.get(key)
        if entry is None:
            opening = self._opening.get(key)
            if opening is None:  # the first call opens it; concurrent ones wait for it
                store = self._store(drive_id)
                opening = asyncio.ensure_future(self._run(store.begin_write, write_id))
                self._opening[key] = opening
                opening.add_done_callback(lambda _: self._opening.pop(key, None))
            staged = await asyncio.shield(opening)
            entry = self._writes.setdefault(key, (staged, time.monotonic()))
        self._writes[key] = (entry[0], time.monotonic())
        return entry[0]

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn in the I/O pool. If the caller is cancelled, the job still finishes first: it may
        be using a staging slot that is handed to another call as soon as we return."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        op = getattr(fn, "__name__", "other")
        with tracing.child_span(f"datanode.disk {op}"):  # inside a sampled trace only
            job = loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
            try:
                await shm_copy.uncancellable(job)
            except (OSError, sqlite3.OperationalError) as exc:  # a full drive: a typed refusal
                full = storage_full(exc)
                if full is None:
                    raise
                raise full from exc
        drivemetrics.IO_SECONDS.labels(op).observe(time.perf_counter() - started)
        return job.result()


def _version_entry(v: index.VersionEntry) -> pb.ShardEntry:
    return pb.ShardEntry(
        key=v.key, size=v.size, etag=v.etag, mtime_unix_ns=v.mtime_ns, version_id=v.version_id,
        is_latest=v.is_latest, delete_marker=v.delete_marker, data_id=v.data_id, owner=v.owner,
    )  # fmt: skip


def _small_result(got: pb_meta.ShardMeta | Exception) -> pb.ShardResult:
    """A small write's result: done, superseded, or its typed error."""
    if isinstance(got, shards.Superseded):
        return pb.ShardResult(superseded=True, current_mtime_unix_ns=got.current_mtime_unix_ns)
    if isinstance(got, (OSError, sqlite3.Error)):
        got = storage_full(got) or errors.Internal(f"drive I/O failed: {got}")
    if isinstance(got, Exception):
        return pb.ShardResult(error_kind=type(got).__name__, error=str(got))
    return pb.ShardResult()


def _superseded(exc: shards.Superseded) -> pb.CommitWriteResponse:
    """A commit's reply when the drive holds a newer version: that version's stamp with it."""
    return pb.CommitWriteResponse(superseded=True, current_mtime_unix_ns=exc.current_mtime_unix_ns)
