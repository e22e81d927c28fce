"""Draining and removing a pool (`AdminService.DrainPool`, `RemovePool`; `kvtier admin pool`).

A drain empties pool P while every object stays readable and no client write is lost
(ARCHITECTURE.md, "Draining a pool"):

1. The metadata service marks P DRAINING (compare-and-swap on the map). Gateways never place a
   new object or multipart upload in a pool that is not ACTIVE; the drain waits until every
   gateway of the map says (GetNodeInfo) it has seen that map.
2. Passes: each lists P's objects (every bucket, the durable KV bucket) and the multipart parts
   in P (uploads begun before the drain), then moves the objects, a few at a time:
   a. read the key's entry in pool 0 (its pool record R: stamp t, data_id d) and the version M
      it names in P;
   b. copy M's bytes to an active pool T chosen as a PUT chooses: when T is not pool 0, at M's
      stamp with a new id, then check T's current version is that copy, then switch: a new
      pool record naming T, at stamp t with id `d.<random>`; when T is pool 0, the copy itself
      is the switch (written over R at stamp t, id `d.<random>`);
   c. read the entry again: the switch won, or a client's write did. When the switch won but
      M is gone from P, a client's DELETE (data first, then the entry) ran meanwhile: the
      switch is deleted again (if_data_id), so a deleted key never comes back. When M's tags or
      ACL were changed in place meanwhile (PutObjectTagging, PutObjectAcl), they are carried
      over to the copy (a change landing on M after this check is lost: a gap of one round trip).
   Datanodes keep the version with the largest (stamp, data_id), and `d.<random>` sorts right
   after d: the switch supersedes R and nothing newer. A client PUT of the key begun after R
   was written is stamped above t (the drives told its gateway t), so it wins over the switch
   whichever lands first; copies and switches are never stamped again (restamp=False).
   d. grace_s later the old copy M is deleted from P, only on drives where it is still the
      current version (`if_data_id`; drives of older datanodes, which would read the condition
      as a plain delete, are skipped and keep it: `_delete_if`): a GET that read R just
      before the switch still reads M, one that finds M gone reads the entry again
      (objectbase.EngineBase._follow). When the switch lost, the copy in T is deleted the same
      way (nothing names it).
   A copy in P that pool 0's entry does not name (its key was overwritten elsewhere or deleted,
   or a PUT died between its data and its record) is deleted once older than orphan_age_s
   (younger: a PUT may be about to write its record; left for a later pass). Its age is the
   one its drive reports (`ShardMeta.stored_age_ms`: when the datanode stored it, by the
   datanode's own clock at both ends), never a gateway's clock against the writer's stamp:
   gateways skewed ±10 min must not make an in-flight PUT's copy look old (a copy whose
   datanode reports no age, an older release, is left alone). A record naming
   P whose object P lacks is deleted (the key was unreadable; a DELETE may be half-way).
3. A pass that finds P empty (no object, no multipart part) marks it DRAINED. After three
   passes in a row that move nothing while objects are left (errors, writes in flight), or
   _MAX_PASSES in all, the drain ends with P still DRAINING: run it again (idempotent; every
   step is checked against what the drives hold).

Removing a DRAINED pool lists it again (a PUT begun before the drain and committed after its
last pass may have landed there) and asks the metadata service to retire it.

A multipart object is copied part by part (_copy_parts), so its parts stay as they were.

Known gaps: objects of deleted buckets in P (unreachable garbage: nothing lists them) stay on
P's drives until the drives are wiped; a drain killed while copying a multipart object leaves
that copy's parts (`.multipart/m/<id>/...`) as garbage in the target pool; a PUT staged through
a gateway before the drain began and committed after RemovePool's check lands in a retired
pool (reads then fail with Unavailable).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from kvtier import clustermap, errors, features, names
from kvtier.clients import metadata as metadata_client
from kvtier.clients import node as node_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import front as front_mod
from services.gateway import placement, versions

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 0.25
_MAX_PASSES = 8
#: Passes in a row that move nothing (errors, writes in flight) before the drain gives up, and
#: the pause between them (a PUT's record follows its data within a round trip).
_STALLED_PASSES = 3
_STALLED_PAUSE_S = 1.0
#: A copy no pool-0 entry names is deleted only when older than this (by its datanode's clock):
#: a PUT writes its record right after its data, so one younger may be about to.
_ORPHAN_AGE_S = 60.0
_MAX_DATA_ID = 118


@dataclasses.dataclass(frozen=True, slots=True)
class _Doomed:
    """A copy to delete at `due` (monotonic), from drives whose current version is data_id."""

    due: float
    bucket: str
    key: str
    pool: int
    data_id: str


class Drainer:
    """Drains and removes pools through this gateway's engine (see the module docstring)."""

    def __init__(
        self,
        view: clustermap.MapView,
        front: front_mod.ObjectFront,
        *,
        grace_s: float = 5.0,
        parallel: int = 4,
        gateway_wait_s: float = 15.0,
        orphan_age_s: float = _ORPHAN_AGE_S,
    ) -> None:
        self._view = view
        self._front = front
        self._engine = front.engine
        self._grace_s = grace_s
        self._parallel = parallel
        self._gateway_wait_s = gateway_wait_s
        self._orphan_age_s = orphan_age_s
        self._doomed: collections.deque[_Doomed] = collections.deque()
        #: One copy's bytes at a time: a copy holds a staging slot and its reads take another,
        #: so copies side by side could hold every slot and wait for one another.
        self._copying = asyncio.Semaphore(1)
        #: What the last conditional delete skipped on older datanodes ("": nothing), for the
        #: drain's progress (`last_error`).
        self.kept_note = ""

    # Drain.

    async def drain(self, index: int) -> AsyncIterator[admin_pb2.DrainProgress]:
        """Move every object of pool index to the active pools; progress now and then and a
        last message with done set (drained: the pool is now DRAINED). NotFound for no such
        pool, PreconditionFailed for pool 0, the last active pool or a retired pool."""
        cmap = await self._set_state(index, common_pb2.POOL_STATE_DRAINING)
        await self._wait_seen(cmap.epoch)
        progress = admin_pb2.DrainProgress()
        seen: set[tuple[str, str]] = set()
        entries: list[tuple[str, str, int]] = []
        stalled = 0
        while progress.passes < _MAX_PASSES:
            progress.passes += 1
            entries, progress.uploads_pending = await self.inventory(index)
            for bucket, key, size in entries:
                if (bucket, key) not in seen:
                    seen.add((bucket, key))
                    progress.objects_total += 1
                    progress.bytes_total += size
            yield _copy(progress)
            if not entries:
                break
            before = (progress.objects_moved, progress.objects_dropped)
            async for message in self._move_all(index, entries, progress):
                yield message
            await self._reap(force=True)
            self._note_kept(progress)
            if (progress.objects_moved, progress.objects_dropped) == before:
                stalled += 1  # nothing could be moved: errors, or writes in flight
                if stalled >= _STALLED_PASSES:
                    break
                await asyncio.sleep(_STALLED_PAUSE_S)
        if not entries and not progress.uploads_pending:
            await self._set_state(index, common_pb2.POOL_STATE_DRAINED)
            progress.drained = True
        progress.done = True
        log.info(
            "drain of pool %d: %d moved, %d dropped, %d errors, %s",
            index, progress.objects_moved, progress.objects_dropped, progress.errors,
            "drained" if progress.drained else "not drained",
        )  # fmt: skip
        yield progress

    async def inventory(self, index: int) -> tuple[list[tuple[str, str, int]], int]:
        """(bucket, key, size) of every object in pool index, and how many multipart uploads
        have parts there. Unavailable when a set of the pool cannot be listed."""
        found: list[tuple[str, str, int]] = []
        for bucket in await self._front.storage_buckets():
            async for entry in self._front.lister.scan(bucket, "", pool_index=index):
                found.append((bucket, entry.key, entry.size))
        uploads = set()
        async for entry in self._front.lister.scan(names.MULTIPART_BUCKET, "p/", pool_index=index):
            uploads.add(entry.key.split("/")[1])
        return found, len(uploads)

    async def _move_all(
        self, index: int, entries: Sequence[tuple[str, str, int]], progress: admin_pb2.DrainProgress
    ) -> AsyncIterator[admin_pb2.DrainProgress]:
        """Move entries, `parallel` at a time; progress every _PROGRESS_EVERY_S."""
        todo = iter(entries)

        async def worker() -> None:
            for bucket, key, size in todo:
                progress.current_key = f"{names.user_bucket(bucket)}/{key}"
                try:
                    moved = await self._move(index, bucket, key)
                except errors.KVTierError as exc:
                    progress.errors += 1
                    progress.last_error = f"{progress.current_key}: {type(exc).__name__}: {exc}"
                    log.warning("drain of pool %d: %s", index, progress.last_error)
                    continue
                if moved is None:
                    continue  # gone meanwhile
                if moved:
                    progress.objects_moved += 1
                    progress.bytes_moved += size
                else:
                    progress.objects_dropped += 1

        tasks = [asyncio.create_task(worker()) for _ in range(self._parallel)]
        try:
            while any(not t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=_PROGRESS_EVERY_S)
                await self._reap(force=False)
                self._note_kept(progress)
                yield _copy(progress)
            for task in tasks:
                task.result()  # what is not a KVTierError is a bug: it ends the drain
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _move(self, index: int, bucket: str, key: str) -> bool | None:
        """Move one object out of pool index: True when moved, False when its copy there was
        dropped (nothing names it), None when there was nothing to do. KVTierError when it
        cannot be done now (the next run tries again)."""
        cmap = self._view.current
        entry = await self._resolve(placement.locate(cmap, bucket, key, 0), bucket, key)
        found = await self._resolve(placement.locate(cmap, bucket, key, index), bucket, key)
        named = entry is not None and entry.meta.is_pointer and entry.meta.pool_pointer == index
        if not named:
            if found is None:
                return None
            age_s = found.meta.stored_age_ms / 1e3  # its datanode's clock, no gateway's
            if not age_s or age_s < self._orphan_age_s:
                raise errors.Unavailable(f"a write of {age_s:.0f} s ago has no record yet")
            await self._delete_if(bucket, key, index, found.meta.data_id)
            return False
        assert entry is not None
        if found is None:  # the record names nothing: the key was unreadable
            await self._delete_if(bucket, key, 0, entry.meta.data_id)
            return False
        switched = await self._copy_and_switch(cmap, entry, found)
        self._doom(bucket, key, index, found.meta.data_id)
        return switched

    async def _resolve(
        self, where: placement.Placement, bucket: str, key: str
    ) -> versions.Resolved | None:
        try:
            return await self._engine.resolve_in(where, bucket, key, queue_heal=False)
        except errors.NotFound:
            return None

    async def _copy_and_switch(
        self, cmap: common_pb2.ClusterMap, entry: versions.Resolved, found: versions.Resolved
    ) -> bool:
        """Steps b and c of the module docstring; whether the switch won."""
        bucket, key, src = entry.meta.bucket, entry.meta.key, found.meta
        target = self._engine.choose_pool(cmap)
        where = placement.locate(cmap, bucket, key, target)
        switch_id, switch_ns = _after(entry.meta)
        to_first = target == placement.FIRST_POOL
        copy = _moved_meta(src, switch_id if to_first else uuid.uuid4().hex)
        copy.mtime_unix_ns = switch_ns if to_first else src.mtime_unix_ns
        async with self._copying:
            if len(src.parts) > 1:
                await self._copy_parts(where, found, copy)
            else:
                begun = self._engine.begin_write(
                    pb.BeginPutRequest(bucket=bucket, key=key, size=src.size), where
                )
                await self._engine.fill(begun.upload_id, found, 0, src.size)
                await self._engine.commit_moved(begun.upload_id, copy)
        if not to_first:
            held = await self._resolve(where, bucket, key)
            if held is None or held.meta.data_id != copy.data_id:
                raise errors.Unavailable(f"pool {target} holds another version of the key")
            first, record = self._engine.pool_record(copy, target)
            record.data_id, record.mtime_unix_ns = switch_id, switch_ns
            await self._engine.commit_shards(
                first, record, record.data_id, set(), small=[b""] * len(first.slots),
                stamp=False, restamp=False,
            )  # fmt: skip
        now = await self._resolve(entry.where, bucket, key)
        switched = now is not None and now.meta.data_id == switch_id
        still = await self._resolve(found.where, bucket, key) if switched else None
        if switched and still is None:
            # M went before the switch landed: a DELETE (data first, then the entry) ran
            # meanwhile, and the switch must not bring the key back.
            await self._delete_if(bucket, key, 0, switch_id)
            switched = False
        elif still is not None and still.meta.meta_changed_unix_ns != src.meta_changed_unix_ns:
            # Tags or the ACL were changed in place on M while it was copied: carry them over.
            await self._engine.meta_updater.update(
                bucket, key, tags=dict(still.meta.tags), acl=still.meta.acl
            )
        if not switched and not to_first:
            self._doom(bucket, key, target, copy.data_id)
        return switched

    async def _copy_parts(
        self, where: placement.Placement, found: versions.Resolved, copy: datanode_pb2.ShardMeta
    ) -> None:
        """Copy a multipart object part by part, as its upload was (each part encoded on its
        own, so `partNumber` reads and the parts count stay as they were): every part is
        written as an internal object on the copy's drives, then the copy is committed from
        them (each drive links the part files, as CompleteMultipartUpload does; at copy's
        stamp, never stamped again), then the parts are deleted."""
        src, bucket, key = found.meta, found.meta.bucket, found.meta.key
        move_id, offset = uuid.uuid4().hex, 0
        parts: list[datanode_pb2.ShardMeta] = []
        try:
            for number, part in enumerate(src.parts, 1):
                request = pb.BeginPutRequest(
                    bucket=names.MULTIPART_BUCKET, key=f"m/{move_id}/{number:05d}", size=part.size
                )
                begun = self._engine.begin_write(request, where)
                parts.append(request_meta := datanode_pb2.ShardMeta(key=request.key))
                await self._engine.fill(begun.upload_id, found, offset, part.size)
                request_meta.CopyFrom(await self._engine.commit_meta(begun.upload_id))
                offset += part.size
            del copy.parts[:]
            for part, stored in zip(src.parts, parts, strict=True):
                copy.parts.add(number=part.number, size=part.size, etag=part.etag,
                               shard_bytes=stored.parts[0].shard_bytes)  # fmt: skip
            copy.data_shards, copy.parity_shards = where.data_shards, where.parity_shards
            copy.distribution[:] = list(where.positions)
            sources = [
                [
                    shards_pb2.PartSource(bucket=p.bucket, key=p.key, data_id=p.data_id)
                    for p in parts
                ]
                for _ in where.slots
            ]
            await self._engine.commit_shards(
                where, copy, copy.data_id, set(), sources, stamp=False, restamp=False
            )
        finally:
            for stored in parts:
                with contextlib.suppress(errors.KVTierError):  # an orphan part: space only
                    await self._engine.delete_in(
                        stored.bucket or names.MULTIPART_BUCKET, stored.key, where.pool_index,
                        at=(bucket, key),
                    )  # fmt: skip

    async def _delete_if(self, bucket: str, key: str, pool: int, data_id: str) -> None:
        """Delete bucket/key from pool's drives whose current version is data_id. Drives of
        older datanodes (no datanode.conditional-undo: they would read it as a plain delete,
        a newer write included) are skipped and keep the copy: said in the log and the
        progress (below every quorum there, so never read or listed; space until the node
        runs a newer build and a later drain or the heal gets there)."""
        older = await self._engine.delete_in(bucket, key, pool, if_data_id=data_id)
        if older:
            self.kept_note = (
                f"{names.user_bucket(bucket)}/{key} in pool {pool}: drives {', '.join(older)} "
                f"are on older datanodes (no {features.DATANODE_CONDITIONAL_UNDO}): the "
                "conditional delete skipped them, they keep the copy"
            )
            log.warning("drain: %s", self.kept_note)

    # Deletes of old copies, grace_s after their switch.

    def _doom(self, bucket: str, key: str, pool: int, data_id: str) -> None:
        due = time.monotonic() + self._grace_s
        self._doomed.append(_Doomed(due, bucket, key, pool, data_id))

    async def _reap(self, *, force: bool) -> None:
        """Delete the doomed copies that are due (force: all of them, waiting as needed)."""
        while self._doomed:
            item = self._doomed[0]
            wait_s = item.due - time.monotonic()
            if wait_s > 0:
                if not force:
                    return
                await asyncio.sleep(wait_s)
            self._doomed.popleft()
            try:
                await self._delete_if(item.bucket, item.key, item.pool, item.data_id)
            except errors.KVTierError as exc:  # the next pass finds the copy again
                log.warning("drain: delete of %s/%s in pool %d failed: %s",
                            item.bucket, item.key, item.pool, exc)  # fmt: skip

    def _note_kept(self, progress: admin_pb2.DrainProgress) -> None:
        """Put what a conditional delete skipped (kept_note) into progress.last_error."""
        if self.kept_note:
            progress.last_error, self.kept_note = self.kept_note, ""

    # Remove.

    async def remove(self, index: int) -> int:
        """Retire a DRAINED pool that still holds nothing; the epoch of the map saying so.
        NotFound for no such pool, PreconditionFailed when it is not drained or not empty."""
        pool = next((p for p in self._view.current.pools if p.index == index), None)
        if pool is None:
            raise errors.NotFound(f"no pool {index}")
        if pool.state == common_pb2.POOL_STATE_RETIRED:
            return self._view.current.epoch
        if pool.state != common_pb2.POOL_STATE_DRAINED:
            state = common_pb2.PoolState.Name(pool.state)
            raise errors.PreconditionFailed(
                f"pool {index} is {state}: drain it first (kvtier admin pool drain {index})"
            )
        entries, uploads = await self.inventory(index)
        if entries or uploads:
            raise errors.PreconditionFailed(
                f"pool {index} holds {len(entries)} objects and parts of {uploads} uploads "
                f"again: drain it again (kvtier admin pool drain {index})"
            )
        cmap = await self._set_state(index, common_pb2.POOL_STATE_RETIRED)
        return cmap.epoch

    # The map.

    async def _set_state(
        self, index: int, state: common_pb2.PoolState.ValueType
    ) -> common_pb2.ClusterMap:
        """Ask the metadata service to move the pool to state; wait until this gateway's map
        shows it."""
        address = self._front.metadata_address()
        async with metadata_client.MetadataClient(address, security=self._front.security) as meta:
            cmap = await meta.set_pool_state(index, state)
        await self._view.wait_for(lambda m: m.epoch >= cmap.epoch, timeout_s=10.0)
        return cmap

    async def _wait_seen(self, epoch: int) -> None:
        """Wait until every gateway of the map has seen epoch (so none places anything new in
        a pool that epoch drains); Unavailable after gateway_wait_s."""
        deadline = time.monotonic() + self._gateway_wait_s
        gateways = [n for n in self._view.current.nodes if n.role == common_pb2.NODE_ROLE_GATEWAY]
        for node in gateways:
            async with node_client.NodeClient(
                node.grpc_address, security=self._front.security
            ) as client:
                while True:
                    try:
                        if (await client.get_node_info()).map_epoch >= epoch:
                            break
                    except errors.KVTierError as exc:
                        log.info("drain: gateway %s: %s", node.node_id, exc)
                    if time.monotonic() > deadline:
                        raise errors.Unavailable(
                            f"gateway {node.node_id} has not seen map epoch {epoch}: "
                            "run the drain again"
                        )
                    await asyncio.sleep(0.1)


def _after(record: datanode_pb2.ShardMeta) -> tuple[str, int]:
    """(data_id, stamp) of a version ordered right after record's: the same stamp and an id
    that sorts after its id and before every id of a larger stamp."""
    if len(record.data_id) <= _MAX_DATA_ID:
        return f"{record.data_id}.{uuid.uuid4().hex[:8]}", record.mtime_unix_ns
    return uuid.uuid4().hex, record.mtime_unix_ns + 1  # ids grown long by many moves


def _moved_meta(src: datanode_pb2.ShardMeta, data_id: str) -> datanode_pb2.ShardMeta:
    """src's object metadata for a copy of its bytes (layout and parts set at the commit)."""
    meta = datanode_pb2.ShardMeta()
    meta.CopyFrom(src)
    meta.data_id = data_id
    meta.inline_data = b""
    meta.is_pointer, meta.pool_pointer = False, 0
    meta.shard_index = meta.block_bytes = 0
    return meta


def _copy(progress: admin_pb2.DrainProgress) -> admin_pb2.DrainProgress:
    copy = admin_pb2.DrainProgress()
    copy.CopyFrom(progress)
    return copy
