"""Committing and removing versions across pools: the engine's layer above objectbase.

A version outside pool 0 gets a pool record in pool 0 (what reads and listings look at); a new
version in another pool removes the previous one; a DELETE removes the object in its pool, then
its pool record.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from kvtier import errors, features, names, objversions
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.gateway import commits, conditional, deleteretry, fanout, objectbase, placement

log = logging.getLogger(__name__)


class PooledObjects(objectbase.EngineBase):
    """Commits and deletes of versions, pool records included."""

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
        try:
            await self.commit_shards(where, meta, write_id, failed, sources, small=small)
        finally:
            conditional.clear(meta)  # (never stored, nor copied into a pool record)
        if not internal and where.pool_index != placement.FIRST_POOL:
            await self._write_pool_record(meta, where.pool_index)
        if old_pool is not None and old_pool not in (where.pool_index, placement.FIRST_POOL):
            await self.delete_in(meta.bucket, meta.key, old_pool)

    async def condition(
        self,
        where: placement.Placement,
        meta: datanode_pb2.ShardMeta,
        *,
        absent: bool,
        if_match: str,
    ) -> None:
        """Check a conditional write of meta's key (absent: If-None-Match: *; if_match: an
        If-Match value) against its current version, PreconditionFailed or NotFound at once
        when it fails, and where the drives of where can, make meta's commit conditional on
        that version still being there (services.gateway.conditional)."""
        if not absent and not if_match:
            return
        try:  # the key's entry in pool 0: the object, or its pool record (which has its ETag)
            found = await self.resolve(meta.bucket, meta.key, queue_heal=False, follow=False)
            current: datanode_pb2.ShardMeta | None = found.meta
        except errors.NotFound:
            current = None
        conditional.check(meta.bucket, meta.key, current, absent=absent, if_match=if_match)
        if conditional.atomic(self._view.current, where):
            conditional.attach(meta, current, absent=absent, if_match=if_match)
        else:
            conditional.CONDITIONAL.labels("checked").inc()

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
        where, record = self.pool_record(meta, pool_index)
        # A small write (no bytes): it can be stamped again above a newer version in pool 0.
        empty = [b""] * len(where.slots)
        await self.commit_shards(where, record, record.data_id, set(), small=empty, stamp=False)

    def pool_record(
        self, meta: datanode_pb2.ShardMeta, pool_index: int
    ) -> tuple[placement.Placement, datanode_pb2.ShardMeta]:
        """The pool record of meta's version in pool_index (a new data_id, meta's stamp) and
        where it goes in pool 0."""
        where = placement.locate(self._view.current, meta.bucket, meta.key, placement.FIRST_POOL)
        record = datanode_pb2.ShardMeta()
        record.CopyFrom(meta)
        del record.parts[:]
        record.parts.add(number=1, size=0, etag=meta.etag, shard_bytes=0)
        record.is_pointer, record.pool_pointer = True, pool_index
        record.data_id = uuid.uuid4().hex
        record.data_shards, record.parity_shards = where.data_shards, where.parity_shards
        record.distribution[:] = list(where.positions)
        return where, record

    async def stage_empty(
        self, where: placement.Placement, bucket: str, key: str, write_id: str, failed: set[int]
    ) -> None:
        """Open an empty staged write on every drive of where (a shard with no bytes); the
        drives that fail, or are still out once the write quorum has theirs and the straggler
        grace passed (fanout.until_decided), go into failed."""
        opened = [0]

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
            else:
                opened[0] += 1

        behind = await fanout.until_decided(
            "write_shard",
            [(slot.node_id, send(i)) for i, slot in enumerate(where.slots)],
            lambda: opened[0] >= where.write_quorum,
            self._nodes.suspects,
            cancel_left_behind=True,
            lacking=lambda: where.write_quorum - opened[0],  # (lost: no wait for a suspect)
        )
        failed.update(behind)

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
        restamp: bool = True,
    ) -> None:
        """Commit meta (shard_index set per drive) on every drive of where not in failed,
        stamped by this gateway's clock (stamp=False: meta's own stamp first) and stamped
        again above a newer version the drives hold when the write can be sent again
        (commits.commit_version); Unavailable (ClockSkew) below the write quorum.
        sources[i]: drive i's part sources (compose); small[i]: drive i's whole shard, staged
        and committed with the drive's meta in one WRITE_SMALL call per datanode.
        restamp=False: never stamped again (superseded by any newer version)."""
        live = [i for i in range(len(where.slots)) if i not in failed]
        committed = await commits.commit_version(
            self._nodes, self.clock, where, meta, write_id, live, sources, small,
            stamp=stamp, restamp=restamp, heal_queue=self.heal_queue,
        )  # fmt: skip
        if committed < len(where.slots) and meta.bucket != names.MULTIPART_BUCKET:
            why = f"write committed on {committed} of {len(where.slots)} drives"
            self.heal_queue.add((meta.bucket, meta.key), why, objversions.version_id(meta))

    # DELETE.

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
        if_data_id: str = "",
    ) -> list[str]:
        """Delete bucket/key (version_id: that S3 version only; if_data_id: only from drives
        whose current version is that one) from its set in a pool (placed by `at`, default
        bucket/key); the drives skipped as older datanodes (below). Unavailable when fewer
        than the write quorum of drives took the delete.

        Decided on the write quorum, as a commit is (fanout.each_drive): a silent node is left
        behind after the straggler grace. A drive that missed a delete (down, silent) keeps
        the version it held: on at most n - write quorum < k drives, below every read's and
        listing's quorum, so it is never read or listed again (docs/reliability.md), and it is
        removed once the drive answers (services.gateway.deleteretry: only while stale).
        A conditional delete (if_data_id) skips the drives of datanodes that do not advertise
        datanode.conditional-undo (kvtier.features): an older build would drop the condition
        and remove whatever version is current there; those drives keep the version."""
        where = placement.locate(self._view.current, *(at or (bucket, key)), pool_index)
        slots, older = list(where.slots), list[common_pb2.DriveSlot]()
        if if_data_id:
            slots, older = conditional_split(self._view.current, where.slots)
            if older:
                log.warning(
                    "conditional delete of %s/%s: drives %s are on older datanodes (no %s): "
                    "skipped, they keep the version", bucket, key,
                    ", ".join(s.drive_id for s in older), features.DATANODE_CONDITIONAL_UNDO,
                )  # fmt: skip

        async def delete(slot: common_pb2.DriveSlot) -> bool:
            return await self._nodes.shards(slot.node_id).delete_shard(
                slot.drive_id, bucket, key, version_id, if_data_id
            )

        began_ns = self.clock.now()  # (a copy stamped later is newer than this delete)
        answers = await fanout.each_drive(
            "delete_shard", self._nodes, slots, delete, where.write_quorum
        )
        missed = set[str]()
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, errors.KVTierError):
                log.warning("delete of %s/%s on %s failed: %s", bucket, key, slot.drive_id,
                            answer)  # fmt: skip
                missed.add(slot.drive_id)
        done = len(slots) - len(missed)
        if done < where.write_quorum:
            raise errors.Unavailable(
                f"DELETE {bucket}/{key}: {done} drives answered, the quorum is {where.write_quorum}"
            )
        if missed:  # their copy would stay forever: finished once they answer (deleteretry)
            indices = tuple(i for i, s in enumerate(where.slots) if s.drive_id in missed)
            partial = deleteretry.PartialDelete(
                where, bucket, key, version_id, if_data_id, began_ns, indices
            )
            deleteretry.record(self._nodes, partial)
        return [s.drive_id for s in older]


def conditional_split(
    cmap: common_pb2.ClusterMap, slots: Sequence[common_pb2.DriveSlot]
) -> tuple[list[common_pb2.DriveSlot], list[common_pb2.DriveSlot]]:
    """(slots whose datanode honours a conditional DeleteShard, slots of older datanodes that
    would read it as a plain delete: kvtier.features.DATANODE_CONDITIONAL_UNDO)."""
    honours: list[common_pb2.DriveSlot] = []
    older: list[common_pb2.DriveSlot] = []
    for slot in slots:
        supported = features.advertised(cmap, slot.node_id, features.DATANODE_CONDITIONAL_UNDO)
        (honours if supported else older).append(slot)
    return honours, older
