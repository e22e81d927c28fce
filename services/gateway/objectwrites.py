"""PUT of erasure-coded objects: the engine's layer above objectpools (services.gateway.objects).

A begun write is staged call by call (stripes encoded and hashed off the event loop, every shard's
blocks sent to its drive), then committed on every drive once its digests check; a small object
(every shard at most SMALL_SHARD_BYTES, or LARGE_SMALL_SHARD_BYTES on datanodes that take them)
is sent whole at its commit. Abandoned writes are swept.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from kvtier import erasure, errors, features, names
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import base, shm_copy
from services.gateway import fanout, objectbase, objectpools, placement, reads, versions

log = logging.getLogger(__name__)

#: Shards up to this size go in one WRITE_SMALL call (the datanodes' inline limit,
#: services.datanode.shards.INLINE_MAX_BYTES).
SMALL_SHARD_BYTES = 128 << 10
#: ... and up to this size (the gateway's small_write_max_bytes, at most this) when every datanode
#: of the set advertises features.DATANODE_SMALL_WRITES_512K (services.datanode.shardmeta.
#: SMALL_WRITE_MAX_BYTES): a 2 MiB object (256 KiB shards on RS 8+4) then skips its 12 staged
#: commits (~33 ms of fsyncs each). The gateway holds such an object's encoded shards until the
#: commit: at most (k + m) x 512 KiB.
LARGE_SMALL_SHARD_BYTES = 512 << 10
#: Calls of at most this many bytes are hashed and encoded on the event loop (_store_stripes).
INLINE_WORK_BYTES = 16 << 10


class ObjectWrites(objectpools.PooledObjects):
    """Begun writes: staging, commit, abort and the sweep of abandoned ones."""

    # PUT.

    def begin_put(self, req: pb.BeginPutRequest, *, owner: str = "") -> pb.BeginPutResponse:
        """Plan a PUT of req.bucket (a storage name: the bucket's existence and access are the
        caller's checks) for owner (see the module docstring)."""
        names.check_stored(req.bucket, req.key)
        cmap = self._view.current
        # Every version of a key of a versioned bucket lives in pool 0 (no pool records); so
        # does a conditional write's: pool 0's set holds every key's entry (the object or its
        # pool record), so its drives can check the condition (services.gateway.conditional).
        first = req.headers.keep_versions or req.if_none_match or bool(req.if_match)
        pool = placement.FIRST_POOL if first else self.choose_pool(cmap)
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
        upload = objectbase.Upload(
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

    def _upload(self, upload_id: str) -> objectbase.Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise errors.NotFound(f"no upload {upload_id} (finished, aborted or expired)")
        return upload

    def _forget(self, upload_id: str) -> objectbase.Upload | None:
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

    async def _store_stripes(self, up: objectbase.Upload, slot: base.Span, total: int) -> None:
        """Encode the call's stripes and send every shard's blocks, while another codec thread
        hashes the call's bytes (MD5 and checksums: one core at ~0.8 GB/s, the slowest stage)
        alongside. The hashes finish before this returns, so calls hash in order. A call of at
        most INLINE_WORK_BYTES is hashed and encoded here, on the event loop: two hops to the
        codec pool would cost more CPU than the work (a 4 KiB PUT's hashing and encoding take
        tens of microseconds)."""
        k, m = up.where.data_shards, up.where.parity_shards
        region, start = slot.region, slot.offset
        data = region.view[start : start + total]
        hashing: asyncio.Future[None] | None = None
        if total <= INLINE_WORK_BYTES:
            _hash(up, data)
        else:
            hashing = asyncio.get_running_loop().run_in_executor(self._executor, _hash, up, data)
        try:
            nstripes = -(-total // up.stripe_bytes)
            parity_at = start + up.max_call_bytes
            pad_at = parity_at + nstripes * m * objectbase.BLOCK_BYTES
            blocks: list[list[memoryview]] = [[] for _ in range(k + m)]
            for s in range(nstripes):
                stripe = data[s * up.stripe_bytes : (s + 1) * up.stripe_bytes]
                block = (
                    objectbase.BLOCK_BYTES
                    if len(stripe) == up.stripe_bytes
                    else -(-len(stripe) // k)
                )
                pad = region.view[pad_at : pad_at + k * block]
                views = erasure.split(stripe, k, block, scratch=pad)
                par = [
                    region.view[parity_at + (s * m + j) * objectbase.BLOCK_BYTES :][:block]
                    for j in range(m)
                ]
                for i, v in enumerate([*views, *par]):
                    blocks[i].append(v)  # a short last stripe's views point into the pad area
                if hashing is None:
                    up.codec.encode(views, par)
                else:
                    await self._run(up.codec.encode, views, par)
            shard_bytes = sum(len(b) for b in blocks[0])
            if up.written == 0 and total == up.size and self._goes_small(up, shard_bytes):
                up.small = [b"".join(bytes(v) for v in shard) for shard in blocks]
            else:
                await self._send_shards(up, blocks, up.shard_written)
        finally:
            # The slot is released when we return: the hashing must be done with it.
            if hashing is not None:
                await shm_copy.uncancellable(hashing)
        if hashing is not None:
            hashing.result()
        up.shard_written += shard_bytes
        up.written += total
        reads.BYTES.labels("put").inc(total)

    def _goes_small(self, up: objectbase.Upload, shard_bytes: int) -> bool:
        """Whether a whole object of shard_bytes per drive goes in WRITE_SMALL calls: up to
        SMALL_SHARD_BYTES, or small_write_max_bytes (at most LARGE_SMALL_SHARD_BYTES) where every
        node of its set takes them (an older datanode refuses a shard over 128 KiB: such a set
        stages and commits it)."""
        if shard_bytes <= SMALL_SHARD_BYTES:
            return True
        most = min(self._small_write_max, LARGE_SMALL_SHARD_BYTES)
        return shard_bytes <= most and all(
            self._nodes.supports(node_id, features.DATANODE_SMALL_WRITES_512K)
            for node_id in {slot.node_id for slot in up.where.slots}
        )

    async def _send_shards(
        self, up: objectbase.Upload, blocks: list[list[memoryview]], offset: int
    ) -> None:
        """Send every live drive its blocks of this call (at offset in its shard). Once the
        write quorum of them took theirs, the drives still out get the straggler grace
        (services.gateway.fanout.until_decided), then their sends are cancelled (the blocks
        are a staging slot given back when this returns) and they join up.failed: skipped for
        the rest of the write and left out of its commit (healed from the others later). So
        when the quorum is lost without a suspect node's drives (fanout.until_decided's
        lacking: a suspect is probed, and cleared once it answers, services.gateway.suspects):
        the write fails (Unavailable) after the grace, not at the silent node's deadline."""
        up.sent = True
        sent = [0]
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
            else:
                sent[0] += 1

        live = [i for i in range(len(up.where.slots)) if i not in up.failed]
        behind = await fanout.until_decided(
            "write_shard",
            [(up.where.slots[i].node_id, send(i)) for i in live],
            lambda: sent[0] >= up.where.write_quorum,
            self._nodes.suspects,
            cancel_left_behind=True,
            lacking=lambda: up.where.write_quorum - sent[0],  # (lost: no wait for a suspect)
        )
        for position in behind:
            index = live[position]
            log.warning(
                "PUT %s/%s: shard %d on %s left behind (no answer in time); the write goes on "
                "without it", up.bucket, up.key, index, up.where.slots[index].drive_id,
            )  # fmt: skip
            up.failed.add(index)
        self._check_write_quorum(up)

    def _check_write_quorum(self, up: objectbase.Upload) -> None:
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

    async def _commit(self, up: objectbase.Upload) -> datanode_pb2.ShardMeta:
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
            if problem is not None:
                await self._abort(up)
                raise problem
            meta = self._meta(up, etag, checksums)
            try:
                await self.condition(
                    up.where, meta, absent=up.request.if_none_match, if_match=up.request.if_match
                )
            except errors.KVTierError:
                await self._abort(up)
                raise
            await self.publish(up.where, meta, up.upload_id, up.failed, small=up.small)
        return meta

    @staticmethod
    def _digest_problem(
        up: objectbase.Upload, etag: str, checksums: dict[str, str]
    ) -> errors.DigestMismatch | None:
        if up.request.expected_md5 and up.request.expected_md5.lower() != etag:
            problem = f"content MD5 is {etag}, not {up.request.expected_md5}"
            return errors.DigestMismatch(problem, algorithm="MD5")
        for name, value in up.request.expected_checksums.items():
            if checksums.get(name.upper()) != value:
                problem = f"{name.upper()} is {checksums.get(name.upper())}, not {value}"
                return errors.DigestMismatch(problem, algorithm=name.upper())
        return None

    def _meta(
        self, up: objectbase.Upload, etag: str, checksums: dict[str, str]
    ) -> datanode_pb2.ShardMeta:
        meta = versions.new_meta(
            up.bucket, up.key, up.where, up.request.headers, data_id=up.upload_id
        )
        meta.size, meta.etag = up.size, etag
        meta.checksums.update(checksums)
        meta.parts.add(number=1, size=up.size, etag=etag, shard_bytes=up.shard_written)
        return meta

    async def abort_put(self, req: pb.AbortPutRequest) -> None:
        """Drop an upload and its staged shards (unknown ids are ignored)."""
        up = self._forget(req.upload_id)
        if up is not None:
            async with up.lock:
                await self._abort(up)

    async def _abort(self, up: objectbase.Upload) -> None:
        """Drop the upload's staged shards from its drives: decided on the write quorum, as a
        commit is (a silent node is left behind after the straggler grace); a drive that
        failed or was left behind keeps its staged write until the datanode's sweep drops it
        (services/datanode: `sweep_tmp`)."""
        if not up.sent:
            return  # nothing staged on any drive (a small write sends at its commit)

        async def abort(slot: common_pb2.DriveSlot) -> None:
            await self._nodes.shards(slot.node_id).abort_write(slot.drive_id, up.upload_id)

        slots = up.where.slots
        answers = await fanout.each_drive(
            "abort_write", self._nodes, slots, abort, up.where.write_quorum
        )
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, errors.KVTierError):  # the datanode's sweep drops it later
                log.info("abort of %s on %s failed: %s", up.upload_id, slot.drive_id, answer)

    async def sweep(self) -> None:
        """Abort uploads their client abandoned."""
        now = time.monotonic()
        for up in [u for u in self._uploads.values() if now - u.started > self._upload_ttl_s]:
            self._forget(up.upload_id)
            await self._abort(up)


def _hash(up: objectbase.Upload, data: memoryview) -> None:
    """Feed the upload's MD5 and checksums (in a codec thread)."""
    up.md5.update(data)
    for hasher in up.hashers.values():
        hasher.update(data)
