"""What the drives of an object's set hold of its version, and rebuilding the shards they lack.

`Rebuilder.probe` asks every drive for its meta, one READ_METAS call per datanode (no copy /
another version / this version / an unreadable meta / this version without a change of its tags
or ACL that the others have: stale, `objectmeta`), then VerifyShard on the drives holding the
version (blocks that fail their checksum or are missing), except where the version's shard is
inline in the meta: the drive checked the meta's checksum, which covers it, to read the meta.

`Rebuilder.rebuild` rewrites whole shards of some drives (the targets), a batch of stripes at a
time: each stripe's intact blocks are read (one READ_SHARD per run of blocks of a drive; a run
that fails is read again block by block) from drives holding the version until k are present,
landing in one staging slot where every shard index has its place; the targets' blocks not
read are reconstructed there with ISA-L, off the event loop; one WRITE_SHARD per target sends
its blocks of the batch under a fresh write id. A CommitWrite per target with the version's
metadata (same data_id and mtime, the target's own shard index) then makes the drive hold the
same version as the others; a drive that already has the version's data directory gets its
part files replaced (`services/datanode/shards.py`). A target whose write fails is dropped and
its staged write aborted; the rest go on. Memory: one staging slot, held for one batch.

A non-current version (versioned buckets) goes the same way by its version id: probed with
READ_METAS and VerifyShard of that version, read by its data_id, and committed with
`noncurrent` (kept under the key's newer current version, never made current).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence

from kvtier import erasure, errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.transport import base, shm_copy, slots
from services.gateway import datanodes as datanodes_mod
from services.gateway import placement, reads, versions

log = logging.getLogger(__name__)

BLOCK_BYTES = reads.BLOCK_BYTES
#: The checksum after each block of a shard (services.datanode.framing).
HASH_BYTES = 8
_SLOT_WAIT_S = 30.0


class State(enum.Enum):
    """What one drive holds of an object's current version."""

    OK = "ok"  # the version, every block intact
    BAD = "bad"  # the version, some blocks corrupt or missing
    STALE = "stale"  # no copy, an older version or an unreadable meta
    AHEAD = "ahead"  # a newer version than the quorum's (a PUT committing now)
    UNREACHABLE = "unreachable"


@dataclasses.dataclass(frozen=True, slots=True)
class Drive:
    """One drive of the set, as probed."""

    index: int  # the shard index it holds
    slot: common_pb2.DriveSlot
    state: State
    bad_blocks: frozenset[tuple[int, int]] = frozenset()  # (part, block == stripe)


def worst_stripe(drives: Sequence[Drive]) -> int:
    """The fewest drives any stripe is intact on, among those holding the version."""
    holders = [d for d in drives if d.state in (State.OK, State.BAD)]
    bad = collections.Counter(b for d in holders for b in d.bad_blocks)
    return len(holders) - max(bad.values(), default=0)


def _block_len(part_size: int, stripe: int, k: int) -> int:
    """One shard's block of a stripe: full, or its share of the last, short stripe."""
    rest = part_size - stripe * k * BLOCK_BYTES
    return BLOCK_BYTES if rest >= k * BLOCK_BYTES else -(-rest // k)


def _runs(values: Sequence[int]) -> list[list[int]]:
    """Runs of consecutive integers in a sorted sequence."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][-1] + 1 == v:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


def _whole_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a drive's meta holds its version's whole shard inline: every block of every
    part framed in inline_data (a meta that holds less is left to VerifyShard)."""
    if not reads.is_inline(meta):
        return False
    size = meta.block_bytes or BLOCK_BYTES
    framed = sum(p.shard_bytes + HASH_BYTES * -(-p.shard_bytes // size) for p in meta.parts)
    return len(meta.inline_data) == framed


def _parse_block(text: str) -> tuple[int, int]:
    part, _, block = text.partition(":")
    return int(part), int(block)


class Rebuilder:
    """Probes and rebuilds objects' shards (see the module docstring)."""

    def __init__(
        self,
        nodes: datanodes_mod.Datanodes,
        staging: slots.SlotPool,
        executor: concurrent.futures.Executor,
    ) -> None:
        self.nodes = nodes
        self.staging = staging
        self._executor = executor
        self._codecs: dict[tuple[int, int], erasure.Codec] = {}

    async def probe(
        self, meta: datanode_pb2.ShardMeta, where: placement.Placement, version_id: str = ""
    ) -> list[Drive]:
        """What every drive of the set holds of meta's version, in shard order: the metas of a
        datanode's drives in one READ_METAS call (where a ReadMeta RPC per drive cost a scan
        of small objects several times more), then VerifyShard where the shard is in files.
        version_id: meta is that (non-current) S3 version, looked up by it on each drive."""
        found: dict[int, Drive] = {}
        nodes: dict[str, list[int]] = {}
        for index, slot in enumerate(where.slots):
            if slot.state != common_pb2.DRIVE_STATE_ONLINE:
                found[index] = Drive(index, slot, State.UNREACHABLE)
            else:
                nodes.setdefault(slot.node_id, []).append(index)

        async def node(node_id: str, indices: list[int]) -> None:
            drive_ids = [where.slots[i].drive_id for i in indices]
            try:
                metas = await self.nodes.read_metas(
                    node_id, drive_ids, meta.bucket, meta.key, version_id
                )
            except errors.KVTierError as exc:
                log.info("probe of %s/%s on %s: %s", meta.bucket, meta.key, node_id, exc)
                found.update((i, Drive(i, where.slots[i], State.UNREACHABLE)) for i in indices)
                return
            judged = await asyncio.gather(
                *(
                    self._judge(meta, where, i, held, version_id)
                    for i, held in zip(indices, metas, strict=True)
                )
            )
            found.update(zip(indices, judged, strict=True))

        await asyncio.gather(*(node(node_id, indices) for node_id, indices in nodes.items()))
        return [found[index] for index in range(len(where.slots))]

    async def _judge(
        self,
        meta: datanode_pb2.ShardMeta,
        where: placement.Placement,
        index: int,
        held: datanode_pb2.ShardMeta | errors.KVTierError,
        version_id: str,
    ) -> Drive:
        """What one drive holds of meta's version, from its meta (or the error reading it)."""
        slot = where.slots[index]
        try:
            if isinstance(held, errors.KVTierError):
                raise held
            if held.data_id != meta.data_id:
                newer = (held.mtime_unix_ns, held.data_id) > (meta.mtime_unix_ns, meta.data_id)
                return Drive(index, slot, State.AHEAD if newer else State.STALE)
            if not versions.same_changes(held, meta):  # it missed a change of tags or ACL
                return Drive(index, slot, State.STALE)
            if _whole_inline(held):
                # The drive read the meta whole and checked its checksum, which covers the
                # inline shard: VerifyShard would check the same bytes again.
                return Drive(index, slot, State.OK)
            client = self.nodes.shards(slot.node_id)
            reply = await client.verify_shard(slot.drive_id, meta.bucket, meta.key, version_id)
        except (errors.NotFound, errors.Corrupt):
            return Drive(index, slot, State.STALE)
        except errors.KVTierError as exc:
            log.info("probe of %s/%s on %s: %s", meta.bucket, meta.key, slot.drive_id, exc)
            return Drive(index, slot, State.UNREACHABLE)
        if reply.missing:
            return Drive(index, slot, State.STALE)
        bad = frozenset(_parse_block(b) for b in reply.bad_blocks)
        return Drive(index, slot, State.BAD if bad else State.OK, bad)

    def codec(self, k: int, m: int) -> erasure.Codec:
        """The (cached) codec of a k+m layout."""
        codec = self._codecs.get((k, m))
        if codec is None:
            codec = self._codecs[(k, m)] = erasure.Codec(k, m)
        return codec

    def batch_stripes(self, k: int, m: int) -> int:
        """Stripes per batch: as many as one PUT call carries (so every WRITE_SHARD fits the
        datanodes' slots as a PUT's do), and every shard's blocks of them fit one slot."""
        n, slot = k + m, self.staging.slot_bytes
        per_put = (slot - k * BLOCK_BYTES) // (n * BLOCK_BYTES)
        return max(1, min(per_put, slot // (n * BLOCK_BYTES)))

    async def run_in_pool(self, fn: Callable[[], None]) -> None:
        """fn in the codec pool; a cancelled caller still waits for it (it writes a slot)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        await shm_copy.uncancellable(future)
        future.result()

    async def rebuild(
        self,
        meta: datanode_pb2.ShardMeta,
        drives: Sequence[Drive],
        targets: Sequence[Drive],
        *,
        noncurrent: bool = False,
    ) -> tuple[int, list[Drive]]:
        """Rebuild and commit the targets' shards of meta's version from the drives holding
        it; (shards committed, targets that failed). noncurrent: meta is a non-current
        version, committed as one (CommitWriteRequest.noncurrent: a drive whose current
        version is not newer refuses it). Raises Unavailable when a stripe has fewer than k
        readable blocks (nothing is committed then)."""
        job = _Job(self, meta, uuid.uuid4().hex, list(targets))
        job.noncurrent = noncurrent
        # Intact drives first; those with bad blocks lend only their good ones.
        job.sources = sorted(
            (d for d in drives if d.state in (State.OK, State.BAD)),
            key=lambda d: (d.state is State.BAD, d.index),
        )
        batch = self.batch_stripes(meta.data_shards, meta.parity_shards)
        try:
            if not any(p.size for p in meta.parts):  # no bytes to send: just open the writes
                await job.send(meta.parts[0].number if meta.parts else 1, 0, lambda d: [])
            for part in meta.parts:
                stripes = -(-part.size // (meta.data_shards * BLOCK_BYTES))
                for s0 in range(0, stripes, batch):
                    await job.batch(part, s0, min(stripes, s0 + batch))
            written = await job.commit()
        except BaseException:
            await job.abort(targets)
            raise
        failed = [t for t in targets if t not in job.live]
        await job.abort(failed)
        return written, failed


class _Job:
    """Rebuilding one object's shards on some drives."""

    def __init__(
        self, owner: Rebuilder, meta: datanode_pb2.ShardMeta, write_id: str, targets: list[Drive]
    ) -> None:
        self.owner = owner
        self.meta = meta
        self.write_id = write_id
        self.live = targets  # targets whose writes have not failed
        self.sources: list[Drive] = []
        self.k = meta.data_shards
        self.codec = owner.codec(meta.data_shards, meta.parity_shards)
        self.noncurrent = False  # commit as a non-current version (Rebuilder.rebuild)
        self._slot: base.Span | None = None
        self._nb = 0

    def _at(self, index: int, j: int = 0) -> int:
        """Where shard index's block j of the batch sits in the slot."""
        assert self._slot is not None
        return self._slot.offset + (index * self._nb + j) * BLOCK_BYTES

    def _view(self, index: int, j: int, length: int) -> memoryview:
        assert self._slot is not None
        return self._slot.region.view[self._at(index, j) :][:length]

    async def batch(self, part: datanode_pb2.ShardMeta.Part, s0: int, s1: int) -> None:
        """Rebuild stripes [s0, s1) of a part and send them to every live target."""
        lengths = [_block_len(part.size, s, self.k) for s in range(s0, s1)]
        self._nb = len(lengths)
        self._slot = await self.owner.staging.acquire(_SLOT_WAIT_S)
        try:
            have = await self._read(part.number, s0, lengths)
            short = [s0 + j for j, got in enumerate(have) if len(got) < self.k]
            if short:
                raise errors.Unavailable(
                    f"{self.meta.bucket}/{self.meta.key}: fewer than {self.k} blocks of "
                    f"stripes {short} are readable"
                )
            await self.owner.run_in_pool(lambda: self._reconstruct(have, lengths))
            span = sum(lengths)  # only the last stripe may be short: the blocks are contiguous
            await self.send(part.number, s0 * BLOCK_BYTES, lambda d: [self._view(d.index, 0, span)])
        finally:
            self.owner.staging.release(self._slot)
            self._slot = None

    async def _read(self, part: int, s0: int, lengths: Sequence[int]) -> list[set[int]]:
        """Read the batch's blocks from sources until every stripe has k or the sources run
        out; per stripe, the shard indexes read."""
        have: list[set[int]] = [set() for _ in lengths]
        pending = list(self.sources)
        while pending:
            short = [j for j, got in enumerate(have) if len(got) < self.k]
            if not short:
                break
            need = max(self.k - len(have[j]) for j in short)
            chosen, pending = pending[:need], pending[need:]
            await asyncio.gather(
                *(self._read_drive(d, part, s0, short, lengths, have) for d in chosen)
            )
        return have

    async def _read_drive(
        self,
        drive: Drive,
        part: int,
        s0: int,
        wanted: Sequence[int],
        lengths: Sequence[int],
        have: list[set[int]],
    ) -> None:
        """A drive's intact blocks of the wanted stripes: one call per run of blocks; a run
        that fails is read again block by block."""
        js = [j for j in wanted if (part, s0 + j) not in drive.bad_blocks]
        for run in _runs(js):
            if await self._read_run(drive, part, s0, run, lengths):
                got = run
            elif len(run) > 1:
                got = [j for j in run if await self._read_run(drive, part, s0, [j], lengths)]
            else:
                got = []
            for j in got:
                have[j].add(drive.index)

    async def _read_run(
        self, drive: Drive, part: int, s0: int, run: Sequence[int], lengths: Sequence[int]
    ) -> bool:
        meta, slot = self.meta, drive.slot
        length = sum(lengths[j] for j in run)
        request = shards_pb2.ReadShardRequest(
            drive_id=slot.drive_id, bucket=meta.bucket, key=meta.key, data_id=meta.data_id,
            part=part, block_offset=s0 + run[0], block_count=len(run),
        )  # fmt: skip
        dest = self._view(drive.index, run[0], length)
        try:
            got = await self.owner.nodes.read_shard(slot.node_id, request, dest)
        except errors.KVTierError as exc:
            log.info("heal %s/%s: shard %d blocks %d+%d: %s", meta.bucket, meta.key,
                     drive.index, s0 + run[0], len(run), exc)  # fmt: skip
            return False
        return got == length

    def _reconstruct(self, have: Sequence[set[int]], lengths: Sequence[int]) -> None:
        """Per stripe, the live targets' blocks that were not read, from k that were."""
        for j, got in enumerate(have):
            out = {t.index: self._view(t.index, j, lengths[j]) for t in self.live}
            out = {i: view for i, view in out.items() if i not in got}
            if out:
                present = {i: self._view(i, j, lengths[j]) for i in sorted(got)[: self.k]}
                self.codec.reconstruct(present, out)

    async def send(
        self, part: int, offset: int, segments: Callable[[Drive], Sequence[memoryview]]
    ) -> None:
        """One WRITE_SHARD to every live target; a target that fails is dropped."""

        async def write(target: Drive) -> None:
            request = shards_pb2.WriteShardRequest(
                drive_id=target.slot.drive_id, write_id=self.write_id, part=part, offset=offset
            )
            try:
                await self.owner.nodes.write_shard(target.slot.node_id, request, segments(target))
            except errors.KVTierError as exc:
                log.warning("heal %s/%s: write to %s failed: %s", self.meta.bucket,
                            self.meta.key, target.slot.drive_id, exc)  # fmt: skip
                self.live = [t for t in self.live if t is not target]

        await asyncio.gather(*(write(t) for t in list(self.live)))
        if not self.live:
            raise errors.Unavailable(f"{self.meta.bucket}/{self.meta.key}: every write failed")

    async def commit(self) -> int:
        """Commit the version on every live target; how many now hold it."""

        async def commit(target: Drive) -> bool:
            mine = datanode_pb2.ShardMeta()
            mine.CopyFrom(self.meta)
            mine.shard_index = target.index
            mine.inline_data = b""  # the drive frames its own
            request = shards_pb2.CommitWriteRequest(
                drive_id=target.slot.drive_id, write_id=self.write_id, meta=mine,
                noncurrent=self.noncurrent,
            )  # fmt: skip
            try:
                # False: a newer version got there first (the next heal looks at that one).
                return await self.owner.nodes.shards(target.slot.node_id).commit_write(request)
            except errors.KVTierError as exc:
                log.warning("heal %s/%s: commit on %s failed: %s", self.meta.bucket,
                            self.meta.key, target.slot.drive_id, exc)  # fmt: skip
                self.live = [t for t in self.live if t is not target]
                return False

        return sum(await asyncio.gather(*(commit(t) for t in list(self.live))))

    async def abort(self, targets: Iterable[Drive]) -> None:
        """Drop the staged writes on targets (best effort: datanodes sweep what is left)."""

        async def abort(target: Drive) -> None:
            try:
                await self.owner.nodes.shards(target.slot.node_id).abort_write(
                    target.slot.drive_id, self.write_id
                )
            except errors.KVTierError as exc:
                log.info("heal: abort of %s on %s: %s", self.write_id, target.slot.drive_id, exc)

        await asyncio.gather(*(abort(t) for t in targets))
