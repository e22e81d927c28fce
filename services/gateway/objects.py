"""The gateway's object engine: erasure-coded PUT, GET of byte ranges, HEAD and DELETE.

PUT: BeginPut picks the placement; each WRITE_STRIPES call lands the next bytes of the object in
a staging slot, the stripes are hashed and encoded (ISA-L, off the event loop), and every shard's
blocks go to its drive as one WRITE_SHARD call, all drives at once. A drive that fails is
dropped from the write; once fewer than the write quorum are left the PUT fails. CommitPut checks
the digests and commits the staged shards on every drive (meta replaced by rename there): the
new version is visible once the write quorum has committed; the previous one stays intact until
then. Memory: one call's stripes at a time, never the whole object.

GET: the metadata of the object's set is read from every drive; the version held by at least the
read quorum (k) wins. Data blocks of the requested range are read straight into their place in a
staging slot (one READ_SHARD per block, every drive at once); a block that is missing, corrupt
or on a dead drive is rebuilt from any k others of its stripe. The range then leaves the slot
straight into the caller's buffer.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import prometheus_client

from kvtier import clustermap, erasure, errors, names
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base, shm_copy, slots
from services.gateway import datanodes as datanodes_mod
from services.gateway import placement

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_BYTES = 1 << 20
_CHECKSUMS = ("CRC32", "SHA1", "SHA256")

DEGRADED = prometheus_client.Counter(
    "kvtier_gateway_degraded_reads_total", "Blocks rebuilt from parity on read"
)
BYTES = prometheus_client.Counter("kvtier_gateway_object_bytes_total", "Object bytes", ["op"])


class _Crc32:
    """zlib.crc32 behind the hashlib interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _hasher(name: str) -> Any:
    if name == "CRC32":
        return _Crc32()
    if name in ("SHA1", "SHA256"):
        return hashlib.new(name.lower())
    raise errors.InvalidArgument(
        f"checksum {name!r} is not supported (use {', '.join(_CHECKSUMS)})"
    )


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
    md5: Any = dataclasses.field(default_factory=hashlib.md5)
    hashers: dict[str, Any] = dataclasses.field(default_factory=dict)
    written: int = 0
    shard_written: int = 0
    failed: set[int] = dataclasses.field(default_factory=set)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def stripe_bytes(self) -> int:
        return self.where.data_shards * BLOCK_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """An object's current version: its metadata (from one drive) and where its shards are."""

    meta: datanode_pb2.ShardMeta
    where: placement.Placement
    #: Shard index -> whether that drive holds this version.
    holders: frozenset[int]


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
    ) -> None:
        self._view = view
        self._nodes = nodes
        self._staging = staging
        self._executor = executor
        self._upload_ttl_s = upload_ttl_s
        self._uploads: dict[str, _Upload] = {}
        self._codecs: dict[tuple[int, int], erasure.Codec] = {}
        self.heal_queue: set[tuple[str, str]] = set()

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

    def begin_put(self, req: pb.BeginPutRequest) -> pb.BeginPutResponse:
        """Plan a PUT (the bucket's existence is the caller's check)."""
        names.check_bucket(req.bucket)
        names.check_key(req.key)
        cmap = self._view.current
        where = placement.locate(cmap, req.bucket, req.key, 0)
        k, m = where.data_shards, where.parity_shards
        upload = _Upload(
            upload_id=uuid.uuid4().hex, bucket=req.bucket, key=req.key, size=req.size,
            request=req, where=where, codec=self._codec(k, m),
            max_call_bytes=self._call_bytes(k, m),
        )  # fmt: skip
        for name in req.checksum_algorithms:
            upload.hashers[name.upper()] = _hasher(name.upper())
        for name in req.expected_checksums:
            upload.hashers.setdefault(name.upper(), _hasher(name.upper()))
        self._uploads[upload.upload_id] = upload
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

    async def _store_stripes(self, up: _Upload, slot: base.Span, total: int) -> None:
        k, m = up.where.data_shards, up.where.parity_shards
        region, start = slot.region, slot.offset
        data = region.view[start : start + total]
        nstripes = -(-total // up.stripe_bytes)
        parity_at = start + up.max_call_bytes
        pad_at = parity_at + nstripes * m * BLOCK_BYTES
        blocks: list[list[memoryview]] = [[] for _ in range(k + m)]
        for s in range(nstripes):
            stripe = data[s * up.stripe_bytes : (s + 1) * up.stripe_bytes]
            block = BLOCK_BYTES if len(stripe) == up.stripe_bytes else -(-len(stripe) // k)
            pad = region.view[pad_at : pad_at + k * block]
            views = erasure.split(stripe, k, block, scratch=pad)
            par = [region.view[parity_at + (s * m + j) * BLOCK_BYTES :][:block] for j in range(m)]
            for i, v in enumerate([*views, *par]):
                blocks[i].append(v)  # a short last stripe's views point into the pad area
            await self._run(self._encode_and_hash, up, stripe, views, par)
        shard_bytes = sum(len(b) for b in blocks[0])
        await self._send_shards(up, blocks, up.shard_written)
        up.shard_written += shard_bytes
        up.written += total
        BYTES.labels("put").inc(total)

    def _encode_and_hash(
        self, up: _Upload, stripe: memoryview, views: list[memoryview], parity: list[memoryview]
    ) -> None:
        up.codec.encode(views, parity)
        up.md5.update(stripe)
        for hasher in up.hashers.values():
            hasher.update(stripe)

    async def _send_shards(self, up: _Upload, blocks: list[list[memoryview]], offset: int) -> None:
        async def send(index: int) -> None:
            slot = up.where.slots[index]
            request = shards_pb2.WriteShardRequest(
                drive_id=slot.drive_id, write_id=up.upload_id, part=1, offset=offset
            )
            try:
                await self._nodes.write_shard(slot.node_id, request, blocks[index])
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
        up = self._upload(req.upload_id)
        try:
            return await self._commit(up)
        finally:
            self._uploads.pop(up.upload_id, None)

    async def _commit(self, up: _Upload) -> pb.ObjectInfo:
        async with up.lock:
            if up.written != up.size:
                await self._abort(up)
                raise errors.InvalidArgument(f"{up.written} of {up.size} bytes were written")
            if up.size == 0:
                empty: list[list[memoryview]] = [[] for _ in up.where.slots]
                await self._send_shards(up, empty, 0)
            etag = up.md5.hexdigest()
            checksums = {
                name: base64.b64encode(h.digest()).decode() for name, h in up.hashers.items()
            }
            problem = self._digest_problem(up, etag, checksums)
            if problem:
                await self._abort(up)
                raise errors.InvalidArgument(problem)
            if up.request.if_none_match and await self._exists(up.bucket, up.key):
                await self._abort(up)
                raise errors.PreconditionFailed(f"{up.bucket}/{up.key} exists (If-None-Match)")
            meta = self._meta(up, etag, checksums)
            await self._commit_shards(up, meta)
        return _info(meta)

    @staticmethod
    def _digest_problem(up: _Upload, etag: str, checksums: dict[str, str]) -> str:
        if up.request.expected_md5 and up.request.expected_md5.lower() != etag:
            return f"BadDigest: content MD5 is {etag}, not {up.request.expected_md5}"
        for name, value in up.request.expected_checksums.items():
            if checksums.get(name.upper()) != value:
                return f"BadDigest: {name.upper()} is {checksums.get(name.upper())}, not {value}"
        return ""

    def _meta(self, up: _Upload, etag: str, checksums: dict[str, str]) -> datanode_pb2.ShardMeta:
        h = up.request.headers
        meta = datanode_pb2.ShardMeta(
            bucket=up.bucket, key=up.key, size=up.size, etag=etag,
            content_type=h.content_type or "application/octet-stream",
            content_encoding=h.content_encoding, content_disposition=h.content_disposition,
            cache_control=h.cache_control, expires=h.expires,
            user_metadata=dict(h.user_metadata), checksums=checksums,
            mtime_unix_ns=time.time_ns(), data_shards=up.where.data_shards,
            parity_shards=up.where.parity_shards, distribution=list(up.where.positions),
            data_id=up.upload_id,
        )  # fmt: skip
        meta.parts.add(number=1, size=up.size, etag=etag, shard_bytes=up.shard_written)
        return meta

    async def _commit_shards(self, up: _Upload, meta: datanode_pb2.ShardMeta) -> None:
        async def commit(index: int) -> bool:
            slot = up.where.slots[index]
            mine = datanode_pb2.ShardMeta()
            mine.CopyFrom(meta)
            mine.shard_index = index
            request = shards_pb2.CommitWriteRequest(
                drive_id=slot.drive_id, write_id=up.upload_id, meta=mine
            )
            try:
                # A superseded commit (a newer PUT of the key got there first) counts: this
                # PUT happened, and was overwritten at once, as with any later PUT.
                await self._nodes.shards(slot.node_id).commit_write(request)
            except errors.KVTierError as exc:
                log.warning(
                    "commit of %s/%s on %s failed: %s", up.bucket, up.key, slot.drive_id, exc
                )
                return False
            return True

        live = [i for i in range(len(up.where.slots)) if i not in up.failed]
        done = await asyncio.gather(*(commit(i) for i in live))
        committed = sum(done)
        if committed < up.where.write_quorum:
            raise errors.Unavailable(
                f"PUT {up.bucket}/{up.key}: committed on {committed} drives, "
                f"the write quorum is {up.where.write_quorum}"
            )
        if committed < len(up.where.slots):
            self.heal_queue.add((up.bucket, up.key))

    async def abort_put(self, req: pb.AbortPutRequest) -> None:
        """Drop an upload and its staged shards (unknown ids are ignored)."""
        up = self._uploads.pop(req.upload_id, None)
        if up is not None:
            async with up.lock:
                await self._abort(up)

    async def _abort(self, up: _Upload) -> None:
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
            self._uploads.pop(up.upload_id, None)
            await self._abort(up)

    # Resolution, HEAD, DELETE.

    async def resolve(self, bucket: str, key: str, *, queue_heal: bool = True) -> Resolved:
        """The current version of bucket/key; NotFound, or Unavailable below read quorum.

        When some drives lack that version the object is queued for healing, unless
        queue_heal is False (the healer's own look).
        """
        names.check_bucket(bucket)
        names.check_key(key)
        cmap = self._view.current
        where = placement.locate(cmap, bucket, key, 0)
        found = await self._resolve_in(where, bucket, key, queue_heal)
        if found.meta.is_pointer:
            target = placement.locate(cmap, bucket, key, found.meta.pool_pointer)
            found = await self._resolve_in(target, bucket, key, queue_heal)
        return found

    async def _resolve_in(
        self, where: placement.Placement, bucket: str, key: str, queue_heal: bool = True
    ) -> Resolved:
        async def read(index: int) -> datanode_pb2.ShardMeta | BaseException:
            slot = where.slots[index]
            try:
                return await self._nodes.shards(slot.node_id).read_meta(slot.drive_id, bucket, key)
            except errors.KVTierError as exc:
                return exc

        answers = await asyncio.gather(*(read(i) for i in range(len(where.slots))))
        versions: dict[str, list[int]] = {}
        metas: dict[str, datanode_pb2.ShardMeta] = {}
        missing = 0
        for index, answer in enumerate(answers):
            if isinstance(answer, errors.NotFound):
                missing += 1
            elif isinstance(answer, datanode_pb2.ShardMeta):
                versions.setdefault(answer.data_id, []).append(index)
                metas[answer.data_id] = answer
        quorum = where.read_quorum
        agreed = [d for d, holders in versions.items() if len(holders) >= quorum]
        if agreed:
            best = max(agreed, key=lambda d: (metas[d].mtime_unix_ns, d))
            if queue_heal and len(versions[best]) < len(where.slots):
                self.heal_queue.add((bucket, key))
            return Resolved(metas[best], where, frozenset(versions[best]))
        if missing > len(where.slots) - quorum:
            raise errors.NotFound(f"{bucket}/{key}: no such object")
        raise errors.Unavailable(
            f"{bucket}/{key}: fewer than {quorum} drives agree on a version "
            f"({len(where.slots) - missing - sum(map(len, versions.values()))} unreachable)"
        )

    async def _exists(self, bucket: str, key: str) -> bool:
        try:
            await self.resolve(bucket, key)
        except errors.NotFound:
            return False
        return True

    async def head(self, bucket: str, key: str) -> pb.ObjectInfo:
        """The object's info."""
        return _info((await self.resolve(bucket, key)).meta)

    async def delete(self, bucket: str, key: str) -> None:
        """Remove the object from every drive of its set (absent objects are not an error)."""
        names.check_bucket(bucket)
        names.check_key(key)
        where = placement.locate(self._view.current, bucket, key, 0)

        async def delete(slot: Any) -> bool:
            try:
                await self._nodes.shards(slot.node_id).delete_shard(slot.drive_id, bucket, key)
            except errors.KVTierError as exc:
                log.warning("delete of %s/%s on %s failed: %s", bucket, key, slot.drive_id, exc)
                return False
            return True

        done = sum(await asyncio.gather(*(delete(s) for s in where.slots)))
        if done < where.write_quorum:
            raise errors.Unavailable(
                f"DELETE {bucket}/{key}: {done} drives answered, the quorum is {where.write_quorum}"
            )

    async def copy(self, req: pb.CopyObjectRequest) -> pb.ObjectInfo:
        """Server-side copy: the source's stripes are read into a slot and written from there,
        one call's worth at a time (the destination's layout may differ)."""
        found = await self.resolve(req.src_bucket, req.src_key)
        src = found.meta
        headers = req.headers if req.replace_headers else _info(src).headers
        begun = self.begin_put(
            pb.BeginPutRequest(
                bucket=req.dst_bucket, key=req.dst_key, size=src.size, headers=headers
            )
        )
        up = self._upload(begun.upload_id)
        chunk = min(up.max_call_bytes, self.max_read_bytes(src.data_shards, src.parity_shards))
        chunk -= chunk % up.stripe_bytes  # the destination takes whole stripes
        if chunk <= 0:
            raise errors.Internal("staging slots too small to copy between these layouts")
        try:
            while up.written < src.size:
                length = min(chunk, src.size - up.written)
                slot = await self._staging.acquire(30.0)
                try:
                    first = await self._gather_range(found, up.written, length, slot)
                    view = slot.region.view[slot.offset + first :][:length]
                    data = await self._staging.acquire(30.0)
                    try:
                        data.region.view[data.offset : data.offset + length] = view
                        async with up.lock:
                            await self._store_stripes(up, data, length)
                    finally:
                        self._staging.release(data)
                finally:
                    self._staging.release(slot)
        except BaseException:
            self._uploads.pop(up.upload_id, None)
            await self._abort(up)
            raise
        return await self.commit_put(pb.CommitPutRequest(upload_id=up.upload_id))

    # GET.

    def max_read_bytes(self, k: int, m: int) -> int:
        """The most object bytes one READ_RANGE call returns for a k+m layout."""
        return self._call_bytes(k, m) - k * BLOCK_BYTES

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
            raise errors.InvalidArgument(f"InvalidRange: offset {req.offset} of {meta.size}")
        limit = min(capacities[0], self.max_read_bytes(k, m), meta.size - req.offset)
        length = min(req.length, limit) if req.length else limit
        reply = pb.ReadRangeResponse(object=_info(meta), length=length)
        if length == 0:
            return base.CallPlan(reply=reply.SerializeToString())
        slot = await self._staging.acquire(30.0)
        try:
            first = await self._gather_range(found, req.offset, length, slot)
        except BaseException:
            self._staging.release(slot)
            raise
        BYTES.labels("get").inc(length)
        source = base.Span(slot.region, slot.offset + first, length)
        return base.CallPlan(
            reply=reply.SerializeToString(),
            sources=[source],
            on_done=lambda ok: self._staging.release(slot),
        )

    async def _gather_range(
        self, found: Resolved, offset: int, length: int, slot: base.Span
    ) -> int:
        """Fill the slot with the stripes covering the range; returns where the range starts
        in the slot."""
        meta = found.meta
        k, _m = meta.data_shards, meta.parity_shards
        stripe_bytes = k * BLOCK_BYTES
        s0, s1 = offset // stripe_bytes, (offset + length - 1) // stripe_bytes
        region, base_at = slot.region, slot.offset
        scratch_at = base_at + (s1 - s0 + 1) * stripe_bytes
        plan: list[tuple[int, int, memoryview]] = []  # (stripe, shard, destination)
        for s in range(s0, s1 + 1):
            rest = meta.size - s * stripe_bytes
            block = BLOCK_BYTES if rest >= stripe_bytes else -(-rest // k)
            at = base_at + (s - s0) * stripe_bytes
            lo, hi = offset - s * stripe_bytes, offset + length - s * stripe_bytes
            for i in range(k):
                if i * block < hi and (i + 1) * block > lo:
                    plan.append((s, i, region.view[at + i * block :][:block]))
        failed = await self._read_blocks(found, plan)
        read = {(s, i) for s, i, _ in plan} - failed
        for s in sorted({s for s, _ in failed}):
            await self._rebuild_stripe(found, s, s0, failed, region, base_at, scratch_at, read)
        return offset - s0 * stripe_bytes

    async def _read_blocks(
        self, found: Resolved, plan: Sequence[tuple[int, int, memoryview]]
    ) -> set[tuple[int, int]]:
        meta, where = found.meta, found.where

        async def read(s: int, i: int, dest: memoryview) -> tuple[int, int] | None:
            if i not in found.holders:
                return (s, i)
            slot = where.slots[i]
            request = shards_pb2.ReadShardRequest(
                drive_id=slot.drive_id, bucket=meta.bucket, key=meta.key, data_id=meta.data_id,
                part=1, block_offset=s, block_count=1,
            )  # fmt: skip
            try:
                got = await self._nodes.read_shard(slot.node_id, request, dest)
            except errors.KVTierError as exc:
                log.warning(
                    "read of %s/%s shard %d stripe %d: %s", meta.bucket, meta.key, i, s, exc
                )
                return (s, i)
            return None if got == len(dest) else (s, i)

        results = await asyncio.gather(*(read(s, i, d) for s, i, d in plan))
        failed = {r for r in results if r is not None}
        if failed:
            self.heal_queue.add((meta.bucket, meta.key))
        return failed

    async def _rebuild_stripe(
        self,
        found: Resolved,
        s: int,
        s0: int,
        failed: set[tuple[int, int]],
        region: base.Region,
        base_at: int,
        scratch_at: int,
        read: set[tuple[int, int]],
    ) -> None:
        """Rebuild the failed blocks of stripe s from any k readable shards of it (`read`: the
        blocks already in place; a ranged read leaves the stripe's other data blocks unread)."""
        meta = found.meta
        k, m = meta.data_shards, meta.parity_shards
        rest = meta.size - s * k * BLOCK_BYTES
        block = BLOCK_BYTES if rest >= k * BLOCK_BYTES else -(-rest // k)
        at = base_at + (s - s0) * k * BLOCK_BYTES

        def dest(i: int) -> memoryview:
            if i < k:
                return region.view[at + i * block :][:block]
            return region.view[scratch_at + (i - k) * BLOCK_BYTES :][:block]

        bad = {i for t, i in failed if t == s}
        present: dict[int, memoryview] = {}
        candidates = [i for i in range(k + m) if i not in bad]
        read_ok = {i for i in range(k) if (s, i) in read}
        # Data blocks already read for the range count; fetch others until k are present.
        todo = [i for i in candidates if i not in read_ok]
        for i in read_ok:
            present[i] = dest(i)
        plan = [(s, i, dest(i)) for i in todo]
        more_failed = await self._read_blocks(found, plan)
        for _, i, view in plan:
            if (s, i) not in more_failed:
                present[i] = view
        if len(present) < k:
            raise errors.Unavailable(
                f"{meta.bucket}/{meta.key} stripe {s}: {len(present)} of {k + m} shards "
                f"readable, {k} needed"
            )
        wanted = {i: dest(i) for i in range(k) if i not in present}
        chosen = dict(sorted(present.items())[:k])
        DEGRADED.inc(len(wanted))
        await self._run(self._codec(k, m).reconstruct, chosen, wanted)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in the codec pool. If the caller is cancelled, the job still finishes first: it
        uses a staging slot that is handed to another call as soon as we return."""
        job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        await shm_copy.uncancellable(job)
        return job.result()


def _info(meta: datanode_pb2.ShardMeta) -> pb.ObjectInfo:
    return pb.ObjectInfo(
        bucket=meta.bucket, key=meta.key, size=meta.size, etag=meta.etag,
        mtime_unix_ms=meta.mtime_unix_ns // 1_000_000,
        headers=pb.ObjectHeaders(
            content_type=meta.content_type, content_encoding=meta.content_encoding,
            content_disposition=meta.content_disposition, cache_control=meta.cache_control,
            expires=meta.expires, user_metadata=dict(meta.user_metadata),
        ),
        checksums=dict(meta.checksums), parts=len(meta.parts),
    )  # fmt: skip
