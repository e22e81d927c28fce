"""The gateway's object engine: erasure-coded PUT, GET of byte ranges, HEAD and DELETE.

PUT: BeginPut picks the placement; each WRITE_STRIPES call lands the next bytes of the object in a
staging slot, the stripes are hashed and encoded (ISA-L, off the event loop), and every shard's
blocks go to its drive, all drives at once (in WRITE_SHARD calls that fit a datanode's staging slot:
`Datanodes.write_shard`). A drive that fails is dropped from the write; once fewer than the write
quorum are left the PUT fails. CommitPut checks the digests and commits the staged shards on every
drive (meta replaced by rename there): the new version is visible once the write quorum has
committed; the previous one stays intact until then. Memory: one call's stripes at a time, never the
whole object. A small object (every shard at most SMALL_SHARD_BYTES, the whole object in one call)
sends nothing before the commit: each drive gets its shard and its meta in one WRITE_SMALL call
per datanode (stored inline in the meta, made durable by the drive's group-committed journal).

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
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from kvtier import clustermap, erasure, errors, hlc, names, objversions
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base, shm_copy, slots
from services.gateway import commits, fanout, objectmeta, placement, reads, versions
from services.gateway import datanodes as datanodes_mod

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_BYTES = 1 << 20
#: Shards up to this size go in one WRITE_SMALL call (the datanodes' inline limit,
#: services.datanode.shards.INLINE_MAX_BYTES).
SMALL_SHARD_BYTES = 128 << 10


@dataclasses.dataclass(slots=True)
class _Upload:
    upload_id: str
    bucket: str
    key: str
    size: int
    request: pb.BeginPutRequest
    where: placement.Placement
    codec: erasure.Codec
    max_call_bytes: int
    #: The tenant the write was begun for ("" for callers acting for no tenant).
    owner: str = ""
    md5: Any = dataclasses.field(default_factory=hashlib.md5)
    hashers: dict[str, Any] = dataclasses.field(default_factory=dict)
    written: int = 0
    shard_written: int = 0
    failed: set[int] = dataclasses.field(default_factory=set)
    #: A small object's shards, kept for the commit (WRITE_SMALL); None: sent as they came.
    small: list[bytes] | None = None
    #: Whether any drive has staged bytes of this write (an abort has something to drop).
    sent: bool = False
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def stripe_bytes(self) -> int:
        return self.where.data_shards * BLOCK_BYTES


class ObjectEngine:
    """PUT/GET/HEAD/DELETE of erasure-coded objects (see the module docstring)."""

    def __init__(
        self,
        view: clustermap.MapView,
        nodes: datanodes_mod.Datanodes,
        staging: slots.SlotPool,
        executor: concurrent.futures.Executor,
        *,
        upload_ttl_s: float = 3600.0,
        max_staged_writes_per_tenant: int = 64,
        clock: hlc.HybridClock | None = None,
    ) -> None:
        self._view = view
        self._nodes = nodes
        self._staging = staging
        self._executor = executor
        self._upload_ttl_s = upload_ttl_s
        self._max_staged_per_tenant = max_staged_writes_per_tenant
        self._uploads: dict[str, _Upload] = {}
        self._staged: collections.Counter[str] = collections.Counter()  # owner -> writes
        self._codecs: dict[tuple[int, int], erasure.Codec] = {}
        #: Stamps new versions (services.gateway.commits: how it learns the drives' stamps).
        self.clock = clock or hlc.HybridClock()
        self.heal_queue: set[tuple[str, str]] = set()
        self.reads = reads.Reader(
            nodes, staging, self._codec, self._call_bytes, self._run, self.heal_queue
        )
        #: Tags and ACL of current versions, changed in place (objectmeta.MetaUpdater.update).
        self.meta_updater = objectmeta.MetaUpdater(nodes, self.resolve, self.heal_queue)

    @property
    def view(self) -> clustermap.MapView:
        """The cluster map this engine places by."""
        return self._view

    def _codec(self, k: int, m: int) -> erasure.Codec:
        codec = self._codecs.get((k, m))
        if codec is None:
            codec = self._codecs[(k, m)] = erasure.Codec(k, m)
        return codec

    def _call_bytes(self, k: int, m: int) -> int:
        """Object bytes one call may move: whole stripes whose data, parity and a padded last
        stripe fit one staging slot."""
        per_stripe = (k + m) * BLOCK_BYTES
        stripes = (self._staging.slot_bytes - k * BLOCK_BYTES) // per_stripe
        if stripes < 1:
            raise errors.Internal("gateway staging slots are too small for one stripe")
        return stripes * k * BLOCK_BYTES

    # PUT.

    def begin_put(self, req: pb.BeginPutRequest, *, owner: str = "") -> pb.BeginPutResponse:
        """Plan a PUT of req.bucket (a storage name: the bucket's existence and access are the
        caller's checks) for owner (see the module docstring)."""
        names.check_stored(req.bucket, req.key)
        cmap = self._view.current
        # Every version of a key of a versioned bucket lives in pool 0 (no pool records).
        pool = placement.FIRST_POOL if req.headers.keep_versions else self.choose_pool(cmap)
        where = placement.locate(cmap, req.bucket, req.key, pool)
        return self.begin_write(req, where, owner=owner)

    def choose_pool(self, cmap: common_pb2.ClusterMap) -> int:
        """The pool of a new object: weighted by free space (placement.choose_pool)."""
        if len(cmap.pools) <= 1:
            return cmap.pools[0].index if cmap.pools else 0
        free = {d.drive_id: d.free_bytes for n in cmap.nodes for d in n.drives}
        return placement.choose_pool(cmap, placement.pool_free_bytes(cmap, free))

    def begin_write(
        self, req: pb.BeginPutRequest, where: placement.Placement, *, owner: str = ""
    ) -> pb.BeginPutResponse:
        """Plan a write of req.bucket/req.key (an object, or an internal one such as a
        multipart part) onto the drives of `where`, for owner; Overloaded when owner (a
        tenant) already has max_staged_writes_per_tenant writes in flight here."""
        if owner and self._staged[owner] >= self._max_staged_per_tenant:
            raise errors.Overloaded(
                f"tenant {owner} has {self._staged[owner]} writes in flight on this "
                f"gateway (at most {self._max_staged_per_tenant})",
                reason="SlowDown",
            )
        k, m = where.data_shards, where.parity_shards
        upload = _Upload(
            upload_id=uuid.uuid4().hex, bucket=req.bucket, key=req.key, size=req.size,
            request=req, where=where, codec=self._codec(k, m),
            max_call_bytes=self._call_bytes(k, m), owner=owner,
        )  # fmt: skip
        for name in req.checksum_algorithms:
            upload.hashers[name.upper()] = versions.new_hasher(name.upper())
        for name in req.expected_checksums:
            upload.hashers.setdefault(name.upper(), versions.new_hasher(name.upper()))
        self._uploads[upload.upload_id] = upload
        self._staged[owner] += 1
        return pb.BeginPutResponse(
            upload_id=upload.upload_id,
            stripe_bytes=upload.stripe_bytes,
            max_call_bytes=upload.max_call_bytes,
        )

    def _upload(self, upload_id: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise errors.NotFound(f"no upload {upload_id} (finished, aborted or expired)")
        return upload

    def _forget(self, upload_id: str) -> _Upload | None:
        """Drop a begun write from the table (its staged shards are the caller's to abort)."""
        up = self._uploads.pop(upload_id, None)
        if up is not None:
            self._staged[up.owner] -= 1
            if self._staged[up.owner] <= 0:
                del self._staged[up.owner]
        return up

    def upload_owner(self, upload_id: str) -> str:
        """The owner of a begun write (NotFound when finished, aborted or expired)."""
        return self._upload(upload_id).owner

    def staged_writes(self, owner: str) -> int:
        """Writes of owner in flight here."""
        return self._staged[owner]

    async def write_plan(
        self, req: pb.WriteStripesRequest, segments: Sequence[int]
    ) -> base.CallPlan:
        """The plan of a WRITE_STRIPES call: bytes into a slot, then encode and send shards."""
        up = self._upload(req.upload_id)
        total = sum(segments)
        end = req.offset + total
        if total > up.max_call_bytes or end > up.size:
            raise errors.InvalidArgument(
                f"{total} bytes at {req.offset}: at most {up.max_call_bytes} per call, "
                f"{up.size} in all"
            )
        if total % up.stripe_bytes and end != up.size:
            raise errors.InvalidArgument(f"calls carry whole stripes of {up.stripe_bytes} bytes")
        slot = await self._staging.acquire(30.0)
        sinks, at = [], slot.offset
        for length in segments:
            sinks.append(base.Span(slot.region, at, length))
            at += length

        async def on_received() -> bytes:
            async with up.lock:
                if req.offset != up.written:
                    raise errors.InvalidArgument(
                        f"bytes at {req.offset}, expected the next at {up.written}"
                    )
                await self._store_stripes(up, slot, total)
            return pb.WriteStripesResponse(written=up.written).SerializeToString()

        def on_done(ok: bool) -> None:
            self._staging.release(slot)

        return base.CallPlan(sinks=sinks, on_received=on_received, on_done=on_done)

    async def write_call(
        self, upload_id: str, length: int, fill: Callable[[memoryview], Awaitable[int | None]]
    ) -> int:
        """Write the upload's next `length` bytes (whole stripes, or the rest of the object):
        `fill` puts them into the staging slot it is given (the S3 front's body reader). A fill
        that reports fewer bytes met the end of a body of unknown length (a write begun with
        its bound as size): the write ends with them, its size is what it holds. The bytes
        written."""
        up = self._upload(upload_id)
        if length > up.max_call_bytes or up.written + length > up.size:
            raise errors.InvalidArgument(f"{length} bytes at {up.written} of {up.size}")
        if length % up.stripe_bytes and up.written + length != up.size:
            raise errors.InvalidArgument(f"calls carry whole stripes of {up.stripe_bytes} bytes")
        slot = await self._staging.acquire(30.0)
        try:
            got = await fill(slot.region.view[slot.offset : slot.offset + length])
            async with up.lock:
                if got is not None and got < length:
                    up.size, length = up.written + got, got
                if length:
                    await self._store_stripes(up, slot, length)
        finally:
            self._staging.release(slot)
        return length

    def expect_checksum(self, upload_id: str, algorithm: str, value: str) -> None:
        """Add a checksum the content must have (one that arrived after the body: a trailer);
        checked at commit like those of BeginPut (BadDigest)."""
        up = self._upload(upload_id)
        name = algorithm.upper()
        if name not in up.hashers:
            raise errors.InvalidArgument(
                f"trailer {name} was not announced", reason="InvalidRequest"
            )
        up.request.expected_checksums[name] = value

    def upload_limits(self, upload_id: str) -> tuple[int, int]:
        """(stripe_bytes, max_call_bytes) of a begun write."""
        up = self._upload(upload_id)
        return up.stripe_bytes, up.max_call_bytes

    async def _store_stripes(self, up: _Upload, slot: base.Span, total: int) -> None:
        """Encode the call's stripes and send every shard's blocks, while another codec thread
        hashes the call's bytes (MD5 and checksums: one core at ~0.8 GB/s, the slowest stage)
        alongside. The hashes finish before this returns, so calls hash in order."""
        k, m = up.where.data_shards, up.where.parity_shards
        region, start = slot.region, slot.offset
        data = region.view[start : start + total]
        hashing = asyncio.get_running_loop().run_in_executor(self._executor, _hash, up, data)
        try:
            nstripes = -(-total // up.stripe_bytes)
            parity_at = start + up.max_call_bytes
            pad_at = parity_at + nstripes * m * BLOCK_BYTES
            blocks: list[list[memoryview]] = [[] for _ in range(k + m)]
            for s in range(nstripes):
                stripe = data[s * up.stripe_bytes : (s + 1) * up.stripe_bytes]
                block = BLOCK_BYTES if len(stripe) == up.stripe_bytes else -(-len(stripe) // k)
                pad = region.view[pad_at : pad_at + k * block]
                views = erasure.split(stripe, k, block, scratch=pad)
                par = [
                    region.view[parity_at + (s * m + j) * BLOCK_BYTES :][:block] for j in range(m)
                ]
                for i, v in enumerate([*views, *par]):
                    blocks[i].append(v)  # a short last stripe's views point into the pad area
                await self._run(up.codec.encode, views, par)
            shard_bytes = sum(len(b) for b in blocks[0])
            if up.written == 0 and total == up.size and shard_bytes <= SMALL_SHARD_BYTES:
                up.small = [b"".join(bytes(v) for v in shard) for shard in blocks]
            else:
                await self._send_shards(up, blocks, up.shard_written)
        finally:
            # The slot is released when we return: the hashing must be done with it.
            await shm_copy.uncancellable(hashing)
        hashing.result()
        up.shard_written += shard_bytes
        up.written += total
        reads.BYTES.labels("put").inc(total)

    async def _send_shards(self, up: _Upload, blocks: list[list[memoryview]], offset: int) -> None:
        up.sent = True

        first = offset == 0  # names the key: the reply says the drive's current stamp

        async def send(index: int) -> None:
            slot = up.where.slots[index]
            request = shards_pb2.WriteShardRequest(
                drive_id=slot.drive_id, write_id=up.upload_id, part=1, offset=offset,
                bucket=up.bucket if first else "", key=up.key if first else "",
            )  # fmt: skip
            try:
                self.clock.observe(
                    await self._nodes.write_shard(slot.node_id, request, blocks[index])
                )
            except errors.KVTierError as exc:
                log.warning(
                    "PUT %s/%s: shard %d on %s failed: %s", up.bucket, up.key, index,
                    slot.drive_id, exc,
                )  # fmt: skip
                up.failed.add(index)

        live = [i for i in range(len(up.where.slots)) if i not in up.failed]
        await asyncio.gather(*(send(i) for i in live))
        self._check_write_quorum(up)

    def _check_write_quorum(self, up: _Upload) -> None:
        if len(up.where.slots) - len(up.failed) < up.where.write_quorum:
            raise errors.Unavailable(
                f"PUT {up.bucket}/{up.key}: {len(up.failed)} of {len(up.where.slots)} drives "
                f"failed; the write quorum is {up.where.write_quorum}"
            )

    async def commit_put(self, req: pb.CommitPutRequest) -> pb.ObjectInfo:
        """Check the digests and commit every staged shard; the object's info."""
        return versions.info(await self.commit_meta(req.upload_id))

    async def commit_meta(self, upload_id: str) -> datanode_pb2.ShardMeta:
        """commit_put, returning the stored metadata."""
        up = self._upload(upload_id)
        try:
            return await self._commit(up)
        finally:
            self._forget(up.upload_id)

    async def _commit(self, up: _Upload) -> datanode_pb2.ShardMeta:
        async with up.lock:
            if up.written != up.size:
                await self._abort(up)
                raise errors.InvalidArgument(f"{up.written} of {up.size} bytes were written")
            if up.size == 0:
                up.small = [b""] * len(up.where.slots)
            etag = up.md5.hexdigest()
            checksums = {
                name: base64.b64encode(h.digest()).decode() for name, h in up.hashers.items()
            }
            problem = self._digest_problem(up, etag, checksums)
            if problem:
                await self._abort(up)
                raise errors.InvalidArgument(problem, reason="BadDigest")
            if up.request.if_none_match and await self.exists(up.bucket, up.key):
                await self._abort(up)
                raise errors.PreconditionFailed(f"{up.bucket}/{up.key} exists (If-None-Match)")
            meta = self._meta(up, etag, checksums)
            await self.publish(up.where, meta, up.upload_id, up.failed, small=up.small)
        return meta

    async def publish(
        self,
        where: placement.Placement,
        meta: datanode_pb2.ShardMeta,
        write_id: str,
        failed: set[int],
        sources: Sequence[Sequence[shards_pb2.PartSource]] = (),
        *,
        small: Sequence[bytes] | None = None,
    ) -> None:
        """Commit a version on its drives (small: every drive's whole shard, not staged yet);
        an object outside pool 0 also gets its pool record in pool 0, and a previous version
        in another pool is removed."""
        internal = meta.bucket == names.MULTIPART_BUCKET
        old_pool = None
        if not internal and len(self._view.current.pools) > 1:
            old_pool = await self._pool_of(meta.bucket, meta.key)
        await self.commit_shards(where, meta, write_id, failed, sources, small=small)
        if not internal and where.pool_index != placement.FIRST_POOL:
            await self._write_pool_record(meta, where.pool_index)
        if old_pool is not None and old_pool not in (where.pool_index, placement.FIRST_POOL):
            await self.delete_in(meta.bucket, meta.key, old_pool)

    async def _pool_of(self, bucket: str, key: str) -> int | None:
        """The pool the current version of bucket/key lives in (None: no version)."""
        where = placement.locate(self._view.current, bucket, key, placement.FIRST_POOL)
        try:
            found = await self.resolve_in(where, bucket, key, queue_heal=False)
        except errors.NotFound:
            return None
        self.clock.observe(found.meta.mtime_unix_ns)  # the new version's record goes above it
        return found.meta.pool_pointer if found.meta.is_pointer else placement.FIRST_POOL

    async def _write_pool_record(self, meta: datanode_pb2.ShardMeta, pool_index: int) -> None:
        """Point pool 0's set of the key at pool_index (what reads and listings look at)."""
        where = placement.locate(self._view.current, meta.bucket, meta.key, placement.FIRST_POOL)
        record = datanode_pb2.ShardMeta()
        record.CopyFrom(meta)
        del record.parts[:]
        record.parts.add(number=1, size=0, etag=meta.etag, shard_bytes=0)
        record.is_pointer, record.pool_pointer = True, pool_index
        record.data_id = uuid.uuid4().hex
        record.data_shards, record.parity_shards = where.data_shards, where.parity_shards
        record.distribution[:] = list(where.positions)
        # A small write (no bytes): it can be stamped again above a newer version in pool 0.
        empty = [b""] * len(where.slots)
        await self.commit_shards(where, record, record.data_id, set(), small=empty, stamp=False)

    @staticmethod
    def _digest_problem(up: _Upload, etag: str, checksums: dict[str, str]) -> str:
        if up.request.expected_md5 and up.request.expected_md5.lower() != etag:
            return f"content MD5 is {etag}, not {up.request.expected_md5}"
        for name, value in up.request.expected_checksums.items():
            if checksums.get(name.upper()) != value:
                return f"{name.upper()} is {checksums.get(name.upper())}, not {value}"
        return ""

    def _meta(self, up: _Upload, etag: str, checksums: dict[str, str]) -> datanode_pb2.ShardMeta:
        meta = versions.new_meta(
            up.bucket, up.key, up.where, up.request.headers, data_id=up.upload_id
        )
        meta.size, meta.etag = up.size, etag
        meta.checksums.update(checksums)
        meta.parts.add(number=1, size=up.size, etag=etag, shard_bytes=up.shard_written)
        return meta

    async def stage_empty(
        self, where: placement.Placement, bucket: str, key: str, write_id: str, failed: set[int]
    ) -> None:
        """Open an empty staged write on every drive of where (a shard with no bytes)."""

        async def send(index: int) -> None:
            slot = where.slots[index]
            request = shards_pb2.WriteShardRequest(
                drive_id=slot.drive_id, write_id=write_id, part=1, offset=0, bucket=bucket, key=key
            )
            try:
                self.clock.observe(await self._nodes.write_shard(slot.node_id, request, []))
            except errors.KVTierError as exc:
                log.warning("write of %s/%s on %s failed: %s", bucket, key, slot.drive_id, exc)
                failed.add(index)

        await asyncio.gather(*(send(i) for i in range(len(where.slots))))

    async def commit_shards(
        self,
        where: placement.Placement,
        meta: datanode_pb2.ShardMeta,
        write_id: str,
        failed: set[int],
        sources: Sequence[Sequence[shards_pb2.PartSource]] = (),
        *,
        small: Sequence[bytes] | None = None,
        stamp: bool = True,
    ) -> None:
        """Commit meta (shard_index set per drive) on every drive of where not in failed,
        stamped by this gateway's clock (stamp=False: meta's own stamp first) and stamped
        again above a newer version the drives hold when the write can be sent again
        (commits.commit_version); Unavailable (ClockSkew) below the write quorum.
        sources[i]: drive i's part sources (compose); small[i]: drive i's whole shard, staged
        and committed with the drive's meta in one WRITE_SMALL call per datanode."""
        live = [i for i in range(len(where.slots)) if i not in failed]
        committed = await commits.commit_version(
            self._nodes, self.clock, where, meta, write_id, live, sources, small, stamp=stamp
        )
        if committed < len(where.slots) and meta.bucket != names.MULTIPART_BUCKET:
            self.heal_queue.add((meta.bucket, meta.key))

    async def abort_put(self, req: pb.AbortPutRequest) -> None:
        """Drop an upload and its staged shards (unknown ids are ignored)."""
        up = self._forget(req.upload_id)
        if up is not None:
            async with up.lock:
                await self._abort(up)

    async def _abort(self, up: _Upload) -> None:
        if not up.sent:
            return  # nothing staged on any drive (a small write sends at its commit)

        async def abort(slot: Any) -> None:
            try:
                await self._nodes.shards(slot.node_id).abort_write(slot.drive_id, up.upload_id)
            except errors.KVTierError as exc:  # the datanode's sweep drops it later
                log.info("abort of %s on %s failed: %s", up.upload_id, slot.drive_id, exc)

        await asyncio.gather(*(abort(s) for s in up.where.slots))

    async def sweep(self) -> None:
        """Abort uploads their client abandoned."""
        now = time.monotonic()
        for up in [u for u in self._uploads.values() if now - u.started > self._upload_ttl_s]:
            self._forget(up.upload_id)
            await self._abort(up)

    # Resolution, HEAD, DELETE.

    async def resolve(
        self,
        bucket: str,
        key: str,
        *,
        queue_heal: bool = True,
        follow: bool = True,
        version_id: str = "",
        markers: bool = False,
    ) -> versions.Resolved:
        """The current version of bucket/key (version_id: that S3 version); NotFound, or
        Unavailable below read quorum; versions.DeleteMarker (a NotFound) when it is a delete
        marker, unless markers is True.

        When some drives lack that version the object is queued for healing, unless
        queue_heal is False (the healer's own look). follow=False: a pool record is returned
        as it is, not followed to its pool. bucket is a storage name.
        """
        names.check_stored(bucket, key)
        if version_id:
            objversions.check(version_id)
        cmap = self._view.current
        where = placement.locate(cmap, bucket, key, 0)
        found = await self.resolve_in(where, bucket, key, queue_heal, version_id)
        if found.meta.is_pointer and follow:
            target = placement.locate(cmap, bucket, key, found.meta.pool_pointer)
            found = await self.resolve_in(target, bucket, key, queue_heal, version_id)
        if found.meta.delete_marker and not markers:
            raise versions.DeleteMarker(
                f"{bucket}/{key}: a delete marker",
                version_id=objversions.version_id(found.meta), by_id=bool(version_id),
            )  # fmt: skip
        return found

    async def resolve_in(
        self,
        where: placement.Placement,
        bucket: str,
        key: str,
        queue_heal: bool = True,
        version_id: str = "",
    ) -> versions.Resolved:
        answers = await fanout.read_metas(self._nodes, where, bucket, key, version_id)
        held: dict[str, list[int]] = {}
        metas: dict[str, datanode_pb2.ShardMeta] = {}
        missing = 0
        for index, answer in enumerate(answers):
            if isinstance(answer, errors.NotFound):
                missing += 1
            elif isinstance(answer, datanode_pb2.ShardMeta):
                held.setdefault(answer.data_id, []).append(index)
                metas[answer.data_id] = answer
        quorum = where.read_quorum
        agreed = [d for d, holders in held.items() if len(holders) >= quorum]
        if agreed:
            best = max(agreed, key=lambda d: (metas[d].mtime_unix_ns, d))
            metas[best] = versions.prevailing(
                [a for a in answers if isinstance(a, datanode_pb2.ShardMeta) and a.data_id == best]
            )
            if queue_heal and not version_id and len(held[best]) < len(where.slots):
                self.heal_queue.add((bucket, key))
            shards = {i: answers[i] for i in held[best]}
            inline = {
                i: a.inline_data
                for i, a in shards.items()
                if isinstance(a, datanode_pb2.ShardMeta) and reads.is_inline(metas[best])
            }
            return versions.Resolved(metas[best], where, frozenset(held[best]), inline)
        if missing > len(where.slots) - quorum:
            raise errors.NotFound(f"{bucket}/{key}: no such object")
        raise errors.Unavailable(
            f"{bucket}/{key}: fewer than {quorum} drives agree on a version "
            f"({len(where.slots) - missing - sum(map(len, held.values()))} unreachable)"
        )

    async def exists(self, bucket: str, key: str) -> bool:
        try:
            await self.resolve(bucket, key)
        except errors.NotFound:
            return False
        return True

    async def head(self, bucket: str, key: str) -> pb.ObjectInfo:
        """The object's info."""
        return versions.info((await self.resolve(bucket, key)).meta)

    async def delete(self, bucket: str, key: str) -> None:
        """Remove the object from every drive of its set (absent objects are not an error);
        an object in a later pool goes first, then its pool record."""
        names.check_stored(bucket, key)
        if len(self._view.current.pools) > 1:
            pool = await self._pool_of(bucket, key)
            if pool not in (None, placement.FIRST_POOL):
                await self.delete_in(bucket, key, pool)
        await self.delete_in(bucket, key, placement.FIRST_POOL)

    async def delete_in(
        self,
        bucket: str,
        key: str,
        pool_index: int,
        at: tuple[str, str] | None = None,
        *,
        version_id: str = "",
    ) -> None:
        """Delete bucket/key (version_id: that S3 version only) from its set in a pool (placed
        by `at`, default bucket/key)."""
        where = placement.locate(self._view.current, *(at or (bucket, key)), pool_index)

        async def delete(slot: Any) -> bool:
            try:
                await self._nodes.shards(slot.node_id).delete_shard(
                    slot.drive_id, bucket, key, version_id
                )
            except errors.KVTierError as exc:
                log.warning("delete of %s/%s on %s failed: %s", bucket, key, slot.drive_id, exc)
                return False
            return True

        done = sum(await asyncio.gather(*(delete(s) for s in where.slots)))
        if done < where.write_quorum:
            raise errors.Unavailable(
                f"DELETE {bucket}/{key}: {done} drives answered, the quorum is {where.write_quorum}"
            )

    async def copy(self, req: pb.CopyObjectRequest, *, owner: str = "") -> pb.ObjectInfo:
        """Server-side copy (storage names; the write is owner's): the source's stripes are
        read into a slot and written from there, one call's worth at a time (the
        destination's layout may differ)."""
        found = await self.resolve(req.src_bucket, req.src_key, version_id=req.src_version_id)
        src = found.meta
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
        return await self.commit_meta(up.upload_id)

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
    ) -> None:
        """Bytes of a version to sink, a slot at a time, each once ready returns
        (reads.Reader.stream)."""
        await self.reads.stream(found, offset, length, sink, ready)

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

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in the codec pool. If the caller is cancelled, the job still finishes first: it
        uses a staging slot that is handed to another call as soon as we return."""
        job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        await shm_copy.uncancellable(job)
        return job.result()


def _hash(up: _Upload, data: memoryview) -> None:
    """Feed the upload's MD5 and checksums (in a codec thread)."""
    up.md5.update(data)
    for hasher in up.hashers.values():
        hasher.update(data)
