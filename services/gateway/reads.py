"""The read path of the object engine: ranges of a version gathered into staging slots.

Data blocks of the range are read straight into their place in a slot (one READ_SHARD per
block, every drive at once); a block that is missing, corrupt or on a dead drive is rebuilt from
any k others of its stripe (ISA-L, off the event loop) and the object queued for healing. Parts
have their own stripes: one gather stays within one part. A small version's blocks are in the
metadata replies already (`versions.Resolved.inline`): taken from there, checksum checked, with
no call; a block whose checksum fails there is read like a missing one (rebuilt).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import prometheus_client
import xxhash

from kvtier import erasure, errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.transport import base, slots
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout, healqueue, versions

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_BYTES = 1 << 20
#: A datanode keeps a shard of at most this many bytes (all parts) inline in its meta
#: (services.datanode.shards.INLINE_MAX_BYTES), and a small write's of up to 512 KiB
#: (shardmeta.SMALL_WRITE_MAX_BYTES); each block framed with its xxh3-64.
INLINE_MAX_BYTES = 128 << 10
_HASH_BYTES = 8
#: Pieces from this size on are gathered into the consumer's memory when it offers some
#: (`Reader.stream`); a smaller one (a small object's) goes through a slot, copied out: its
#: gather area would be whole stripes and parity room, megabytes for a few bytes.
BUFFERED_MIN_BYTES = BLOCK_BYTES

DEGRADED = prometheus_client.Counter(
    "kvtier_gateway_degraded_reads_total", "Blocks rebuilt from parity on read"
)
BYTES = prometheus_client.Counter("kvtier_gateway_object_bytes_total", "Object bytes", ["op"])


def is_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a drive keeps the version's shard in this meta of its (small versions: by size,
    or inline_data present, as services.datanode.shardmeta.is_inline)."""
    return sum(p.shard_bytes for p in meta.parts) <= INLINE_MAX_BYTES or bool(meta.inline_data)


def has_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a drive's meta as it came (READ_METAS) carries its whole inline shard: a meta
    sent without its data (a HEAD's, a GET's parity drive) does not, whatever its size."""
    return bool(meta.inline_data) or not any(p.shard_bytes for p in meta.parts)


def inline_block(
    meta: datanode_pb2.ShardMeta, frames: bytes, part: int, block: int, dest: memoryview
) -> bool:
    """Copy block `block` of a part's shard from a drive's inline frames into dest (its exact
    length); False when it is absent, of another length or fails its checksum."""
    size, at = meta.block_bytes or BLOCK_BYTES, 0
    for p in meta.parts:
        if p.number == part:
            start = at + block * (size + _HASH_BYTES)
            length = min(size, p.shard_bytes - block * size)
            break
        at += p.shard_bytes + _HASH_BYTES * -(-p.shard_bytes // size)
    else:
        return False
    view = memoryview(frames)
    data = view[start : start + length]
    digest = view[start + length : start + length + _HASH_BYTES]
    if length != len(dest) or len(digest) != _HASH_BYTES:
        return False
    if xxhash.xxh3_64_intdigest(data).to_bytes(_HASH_BYTES, "little") != digest:
        return False
    dest[:] = data
    return True


def area_bytes(meta: datanode_pb2.ShardMeta, offset: int, length: int) -> int:
    """Memory a gather of length bytes at offset of a part needs (`Reader.gather_into`): its
    whole stripes, then room for the parity blocks a degraded read rebuilds from."""
    stripe_bytes = meta.data_shards * BLOCK_BYTES
    stripes = (offset + length - 1) // stripe_bytes - offset // stripe_bytes + 1
    return stripes * stripe_bytes + meta.parity_shards * BLOCK_BYTES


class Reader:
    """Reads of resolved versions (see the module docstring)."""

    def __init__(
        self,
        nodes: datanodes_mod.Datanodes,
        staging: slots.SlotPool,
        codec: Callable[[int, int], erasure.Codec],
        call_bytes: Callable[[int, int], int],
        run: Callable[..., Awaitable[Any]],
        heal_queue: healqueue.HealQueue,
    ) -> None:
        self._nodes = nodes
        self._staging = staging
        self._codec = codec
        self._call_bytes = call_bytes
        self._run = run
        self.heal_queue = heal_queue

    async def read_into(self, found: versions.Resolved, offset: int, dest: memoryview) -> None:
        """Read len(dest) bytes of the version at offset into dest (any size, across parts),
        through one staging slot."""
        meta = found.meta
        most = self.max_read_bytes(meta.data_shards, meta.parity_shards)
        slot = await self._staging.acquire(30.0)
        try:
            done = 0
            while done < len(dest):
                part, start = versions.part_at(meta, offset + done)
                length = min(most, len(dest) - done, start + part.size - offset - done)
                first = await self.gather_range(found, part, offset + done - start, length, slot)
                dest[done : done + length] = slot.region.view[slot.offset + first :][:length]
                done += length
        finally:
            self._staging.release(slot)

    async def stream(
        self,
        found: versions.Resolved,
        offset: int,
        length: int,
        sink: Callable[[memoryview], Awaitable[None]],
        ready: Callable[[], Awaitable[None]] | None = None,
        buffer: Callable[[int], memoryview] | None = None,
    ) -> None:
        """Hand bytes [offset, offset + length) of a version to sink, a piece at a time, each
        piece in a staging slot until sink returns (bounded memory whatever the length). The
        slot is taken for each piece once `ready` returns (a consumer that waits for a slow
        client there holds no slot), and given back after sink. With `buffer` (a consumer that
        keeps each piece until it is sent: response_body.BodyWriter), each piece is gathered
        straight into the memory buffer(nbytes) returns instead (no slot taken, `area_bytes`;
        from BUFFERED_MIN_BYTES on): the consumer then need not copy it out of a slot."""
        meta = found.meta
        most = self.max_read_bytes(meta.data_shards, meta.parity_shards)
        done = 0
        while done < length:
            if ready is not None:
                await ready()
            part, start = versions.part_at(meta, offset + done)
            n = min(most, length - done, start + part.size - offset - done)
            if buffer is not None and n >= BUFFERED_MIN_BYTES:
                area = buffer(area_bytes(meta, offset + done - start, n))
                first = await self.gather_into(found, part, offset + done - start, n, area)
                BYTES.labels("get").inc(n)
                await sink(area[first : first + n])
                done += n
                continue
            slot = await self._staging.acquire(30.0)
            try:
                first = await self.gather_range(found, part, offset + done - start, n, slot)
                BYTES.labels("get").inc(n)
                await sink(slot.region.view[slot.offset + first :][:n])
            finally:
                self._staging.release(slot)
            done += n

    def max_read_bytes(self, k: int, m: int) -> int:
        """The most object bytes one READ_RANGE call returns for a k+m layout."""
        return self._call_bytes(k, m) - k * BLOCK_BYTES

    async def gather_range(
        self,
        found: versions.Resolved,
        part: datanode_pb2.ShardMeta.Part,
        offset: int,
        length: int,
        slot: base.Span,
    ) -> int:
        """Fill the slot with the stripes covering a range of one part (offset within the
        part); returns where the range starts in the slot."""
        area = slot.region.view[slot.offset : slot.offset + slot.length]
        return await self.gather_into(found, part, offset, length, area)

    async def gather_into(
        self,
        found: versions.Resolved,
        part: datanode_pb2.ShardMeta.Part,
        offset: int,
        length: int,
        area: memoryview,
    ) -> int:
        """gather_range into area, any writable memory of a slot's size (the stripes, then
        room to rebuild parity in); returns where the range starts in area."""
        meta = found.meta
        k, _m = meta.data_shards, meta.parity_shards
        stripe_bytes = k * BLOCK_BYTES
        s0, s1 = offset // stripe_bytes, (offset + length - 1) // stripe_bytes
        base_at = 0
        scratch_at = base_at + (s1 - s0 + 1) * stripe_bytes
        plan: list[tuple[int, int, memoryview]] = []  # (stripe, shard, destination)
        for s in range(s0, s1 + 1):
            rest = part.size - s * stripe_bytes
            block = BLOCK_BYTES if rest >= stripe_bytes else -(-rest // k)
            at = base_at + (s - s0) * stripe_bytes
            lo, hi = offset - s * stripe_bytes, offset + length - s * stripe_bytes
            for i in range(k):
                if i * block < hi and (i + 1) * block > lo:
                    plan.append((s, i, area[at + i * block :][:block]))
        planned = collections.Counter(s for s, _, _ in plan)

        def rebuildable(ok: set[tuple[int, int]]) -> bool:
            # Each stripe's blocks still out (or failed) could be rebuilt from its parity.
            done = collections.Counter(s for s, _ in ok)
            return all(n - done[s] <= meta.parity_shards for s, n in planned.items())

        failed = await self._read_blocks(found, part.number, plan, rebuildable)
        read = {(s, i) for s, i, _ in plan} - failed
        for s in sorted({s for s, _ in failed}):
            await self._rebuild_stripe(
                found, part, s, s0, failed, (area, base_at, scratch_at), read
            )
        return offset - s0 * stripe_bytes

    async def _read_blocks(
        self,
        found: versions.Resolved,
        part: int,
        plan: Sequence[tuple[int, int, memoryview]],
        enough: Callable[[set[tuple[int, int]]], bool],
    ) -> set[tuple[int, int]]:
        """Read the planned blocks (stripe, shard, destination); the ones that failed. Once
        enough(the blocks read) holds, reads still out get the straggler grace (a suspect
        node's none: fanout.until_decided) and are then cancelled and count as failed: rebuilt
        from parity by the caller, instead of waiting out a silent node's deadline (30 s)."""
        meta, where = found.meta, found.where

        async def read(s: int, i: int, dest: memoryview) -> tuple[int, int] | None:
            if i not in found.holders:
                return (s, i)
            frames = found.inline.get(i)
            if frames is not None:
                if inline_block(meta, frames, part, s, dest):
                    return None
                log.warning("%s/%s shard %d: inline block %d is bad", meta.bucket, meta.key, i, s)
                return (s, i)
            slot = where.slots[i]
            request = shards_pb2.ReadShardRequest(
                drive_id=slot.drive_id, bucket=meta.bucket, key=meta.key, data_id=meta.data_id,
                part=part, block_offset=s, block_count=1,
            )  # fmt: skip
            try:
                got = await self._nodes.read_shard(slot.node_id, request, dest)
            except errors.KVTierError as exc:
                log.warning(
                    "read of %s/%s shard %d stripe %d: %s", meta.bucket, meta.key, i, s, exc
                )
                return (s, i)
            return None if got == len(dest) else (s, i)

        ok: set[tuple[int, int]] = set()
        failed: set[tuple[int, int]] = set()

        async def counted(s: int, i: int, dest: memoryview) -> None:
            bad = await read(s, i, dest)
            (ok if bad is None else failed).add((s, i))

        behind = await fanout.until_decided(
            "read_shard",
            [(where.slots[i].node_id, counted(s, i, d)) for s, i, d in plan],
            lambda: enough(ok),
            self._nodes.suspects,
            cancel_left_behind=True,
        )
        for position in behind:
            s, i, _ = plan[position]
            log.warning(
                "read of %s/%s shard %d stripe %d: %s did not answer in time, rebuilt from "
                "parity", meta.bucket, meta.key, i, s, where.slots[i].drive_id,
            )  # fmt: skip
            failed.add((s, i))
        if failed:
            why = f"read rebuilt {len(failed)} damaged or missing blocks"
            self.heal_queue.add((meta.bucket, meta.key), why, objversions.version_id(meta))
        return failed

    async def _rebuild_stripe(
        self,
        found: versions.Resolved,
        part: datanode_pb2.ShardMeta.Part,
        s: int,
        s0: int,
        failed: set[tuple[int, int]],
        layout: tuple[memoryview, int, int],
        read: set[tuple[int, int]],
    ) -> None:
        """Rebuild the failed blocks of stripe s from any k readable shards of it (`read`: the
        blocks already in place; a ranged read leaves the stripe's other data blocks unread)."""
        meta = found.meta
        area, base_at, scratch_at = layout
        k, m = meta.data_shards, meta.parity_shards
        rest = part.size - s * k * BLOCK_BYTES
        block = BLOCK_BYTES if rest >= k * BLOCK_BYTES else -(-rest // k)
        at = base_at + (s - s0) * k * BLOCK_BYTES

        def dest(i: int) -> memoryview:
            if i < k:
                return area[at + i * block :][:block]
            return area[scratch_at + (i - k) * BLOCK_BYTES :][:block]

        bad = {i for t, i in failed if t == s}
        present: dict[int, memoryview] = {}
        candidates = [i for i in range(k + m) if i not in bad]
        read_ok = {i for i in range(k) if (s, i) in read}
        # Data blocks already read for the range count; fetch others until k are present.
        todo = [i for i in candidates if i not in read_ok]
        for i in read_ok:
            present[i] = dest(i)
        plan = [(s, i, dest(i)) for i in todo]
        needed = k - len(read_ok)
        more_failed = await self._read_blocks(
            found, part.number, plan, lambda ok: len(ok) >= needed
        )
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
