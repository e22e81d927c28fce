"""The gateway's object engine: erasure-coded PUT, GET of byte ranges, HEAD and DELETE.

PUT: BeginPut picks the placement; each WRITE_STRIPES call lands the next bytes of the object in a
staging slot, the stripes are hashed and encoded (ISA-L, off the event loop), and every shard's
blocks go to its drive, all drives at once (in WRITE_SHARD calls that fit a datanode's staging slot:
`Datanodes.write_shard`). A drive that fails is dropped from the write; once fewer than the write
quorum are left the PUT fails. CommitPut checks the digests and commits the staged shards on every
drive (meta replaced by rename there): the new version is visible once the write quorum has
committed; the previous one stays intact until then. Memory: one call's stripes at a time, never the
whole object. A small object (every shard at most SMALL_SHARD_BYTES, or 512 KiB on datanodes that
take it: objectwrites, the whole object in one call) sends nothing before the commit: each drive
gets its shard and its meta in one WRITE_SMALL call per datanode (stored inline in the meta, made
durable by the drive's group-committed journal).

GET: the metadata of the object's set is read from every drive (one READ_METAS call per
datanode); the version held by at least the read quorum (k) wins. A small object's shards come
inline in those replies: its GET reads nothing more. Data blocks of the requested range are read
straight into their place in a staging slot (one READ_SHARD per block, every drive at once); a
block that is missing, corrupt or on a dead drive is rebuilt from any k others of its stripe. The
range then leaves the slot straight into the caller's buffer.

Buckets here are storage names (`kvtier.names.storage_name`): the front maps user-facing names
and checks who may use them. Every begun write has an owner, the tenant it was begun for ("" for
callers acting for no tenant: services, operators, insecure clusters); the front lets only that
tenant (or a privileged caller) continue it, and a tenant has at most
`max_staged_writes_per_tenant` writes in flight here (Overloaded beyond).

The engine is built in layers: objectbase (state, resolution, HEAD), objectpools (commits and
deletes across pools), objectwrites (PUT, small PUT, abort, sweep), ObjectEngine here (copy, GET).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base
from services.gateway import commits, objectbase, objectwrites, reads, versions

BLOCK_BYTES = objectbase.BLOCK_BYTES
SMALL_SHARD_BYTES = objectwrites.SMALL_SHARD_BYTES


class ObjectEngine(objectwrites.ObjectWrites):
    """PUT/GET/HEAD/DELETE of erasure-coded objects (see the module docstring)."""

    # Copy.

    async def copy(
        self,
        req: pb.CopyObjectRequest,
        *,
        owner: str = "",
        check: Callable[[datanode_pb2.ShardMeta], None] | None = None,
    ) -> pb.ObjectInfo:
        """Server-side copy (storage names; the write is owner's): the source's stripes are
        read into a slot and written from there, one call's worth at a time (the
        destination's layout may differ). check: raises unless the caller may read the
        source version found (its ACL), before anything is written."""
        found = await self.resolve(req.src_bucket, req.src_key, version_id=req.src_version_id)
        src = found.meta
        if check is not None:
            check(src)
        headers = req.headers if req.replace_headers else versions.info(src).headers
        if not req.replace_headers:  # a copy's ACL is the request's, never the source's
            headers.acl.CopyFrom(req.headers.acl)
            headers.keep_versions = req.headers.keep_versions  # the destination's versioning
            headers.null_version = req.headers.null_version
        begun = self.begin_put(
            pb.BeginPutRequest(
                bucket=req.dst_bucket, key=req.dst_key, size=src.size, headers=headers
            ),
            owner=owner,
        )
        return versions.info(await self.copy_into(begun.upload_id, found, 0, src.size))

    async def copy_into(
        self, upload_id: str, found: versions.Resolved, offset: int, size: int
    ) -> datanode_pb2.ShardMeta:
        """Fill a begun write with bytes [offset, offset + size) of a version, then commit it;
        the stored metadata. One call's stripes at a time."""
        await self.fill(upload_id, found, offset, size)
        return await self.commit_meta(upload_id)

    async def fill(self, upload_id: str, found: versions.Resolved, offset: int, size: int) -> None:
        """Fill a begun write with bytes [offset, offset + size) of a version, one call's
        stripes at a time (not committed); the write is aborted when this raises."""
        up = self._upload(upload_id)
        chunk = up.max_call_bytes - up.max_call_bytes % up.stripe_bytes  # whole stripes
        try:
            while up.written < size:
                length = min(chunk, size - up.written)
                data = await self._staging.acquire(30.0)
                try:
                    view = data.region.view[data.offset : data.offset + length]
                    await self.read_into(found, offset + up.written, view)
                    async with up.lock:
                        await self._store_stripes(up, data, length)
                finally:
                    self._staging.release(data)
        except BaseException:
            self._forget(up.upload_id)
            await self._abort(up)
            raise

    async def commit_moved(self, upload_id: str, meta: datanode_pb2.ShardMeta) -> int:
        """Commit a filled write (fill) as meta says, at meta's own stamp and data_id, never
        stamped again: any newer version of the key supersedes it (services.gateway.pooldrain:
        a moved copy must never hide a client's write). meta's layout and parts are set from
        the write. The drives it is on (or a newer version is); the write is gone either way."""
        up = self._upload(upload_id)
        try:
            async with up.lock:
                if up.size == 0:
                    up.small = [b""] * len(up.where.slots)
                meta.data_shards, meta.parity_shards = up.where.data_shards, up.where.parity_shards
                meta.distribution[:] = list(up.where.positions)
                del meta.parts[:]
                meta.parts.add(number=1, size=up.size, etag=meta.etag, shard_bytes=up.shard_written)
                live = [i for i in range(len(up.where.slots)) if i not in up.failed]
                committed = await commits.commit_version(
                    self._nodes, self.clock, up.where, meta, up.upload_id, live,
                    small=up.small, stamp=False, restamp=False, heal_queue=self.heal_queue,
                )  # fmt: skip
                if committed < len(up.where.slots):
                    why = f"write committed on {committed} of {len(up.where.slots)} drives"
                    self.heal_queue.add((meta.bucket, meta.key), why, objversions.version_id(meta))
                return committed
        except BaseException:
            await self._abort(up)
            raise
        finally:
            self._forget(up.upload_id)

    async def read_into(self, found: versions.Resolved, offset: int, dest: memoryview) -> None:
        """Bytes of a version at offset into dest (reads.Reader.read_into)."""
        await self.reads.read_into(found, offset, dest)

    async def stream(
        self,
        found: versions.Resolved,
        offset: int,
        length: int,
        sink: Callable[[memoryview], Awaitable[None]],
        ready: Callable[[], Awaitable[None]] | None = None,
        buffer: Callable[[int], memoryview] | None = None,
    ) -> None:
        """Bytes of a version to sink, a slot (or buffer's memory) at a time, each once ready
        returns (reads.Reader.stream)."""
        await self.reads.stream(found, offset, length, sink, ready, buffer)

    # GET.

    def max_read_bytes(self, k: int, m: int) -> int:
        """The most object bytes one READ_RANGE call returns for a k+m layout."""
        return self.reads.max_read_bytes(k, m)

    async def read_plan(self, req: pb.ReadRangeRequest, capacities: Sequence[int]) -> base.CallPlan:
        """The plan of a READ_RANGE call: blocks of the range into a slot, then out."""
        if len(capacities) != 1:
            raise errors.InvalidArgument("READ_RANGE takes one receive buffer")
        found = await self.resolve(req.bucket, req.key)
        meta = found.meta
        if req.if_match and req.if_match.strip('"') != meta.etag:
            raise errors.PreconditionFailed(f"{req.bucket}/{req.key}: ETag is {meta.etag}")
        k, m = meta.data_shards, meta.parity_shards
        if req.offset > meta.size or (req.offset == meta.size and meta.size):
            raise errors.InvalidArgument(
                f"offset {req.offset} of {meta.size}", reason="InvalidRange"
            )
        part, start = versions.part_at(meta, req.offset)
        # One call reads within one part; the client asks again for the rest.
        limit = min(capacities[0], self.reads.max_read_bytes(k, m), start + part.size - req.offset)
        length = min(req.length, limit) if req.length else limit
        reply = pb.ReadRangeResponse(object=versions.info(meta), length=length)
        if length == 0:
            return base.CallPlan(reply=reply.SerializeToString())
        slot = await self._staging.acquire(30.0)
        try:
            first = await self.reads.gather_range(found, part, req.offset - start, length, slot)
        except BaseException:
            self._staging.release(slot)
            raise
        reads.BYTES.labels("get").inc(length)
        source = base.Span(slot.region, slot.offset + first, length)
        return base.CallPlan(
            reply=reply.SerializeToString(),
            sources=[source],
            on_done=lambda ok: self._staging.release(slot),
        )
