"""What every layer of the gateway's object engine shares (services.gateway.objects is the engine).

The engine's state (begun writes and their owners, codecs, the clock, the heal queue, the reader)
and resolution: a key's metadata is read from every drive of its set (one READ_METAS call per
datanode) and the version held by at least the read quorum (k) wins. The engine's layers build on
it in this order: objectpools (commits and deletes across pools), objectwrites (PUT, small PUT,
abort), objects.ObjectEngine (copy, GET).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier import clustermap, erasure, errors, hlc, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.transport import shm_copy, slots
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout, healqueue, objectmeta, placement, reads, versions

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(slots=True)
class Upload:
    """A begun write: its placement, progress, digests and owner."""

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


class EngineBase:
    """The object engine's state (begun writes, codecs, clock, heal queue) and how it resolves
    a key's version from its drives' metadata (see the module docstring)."""

    def __init__(
        self,
        view: clustermap.MapView,
        nodes: datanodes_mod.Datanodes,
        staging: slots.SlotPool,
        executor: concurrent.futures.Executor,
        *,
        upload_ttl_s: float = 3600.0,
        max_staged_writes_per_tenant: int = 64,
        small_write_max_bytes: int = 128 << 10,
        clock: hlc.HybridClock | None = None,
    ) -> None:
        self._view = view
        self._nodes = nodes
        self._staging = staging
        self._executor = executor
        self._upload_ttl_s = upload_ttl_s
        self._max_staged_per_tenant = max_staged_writes_per_tenant
        #: The largest shard of a small PUT where the datanodes take it (objectwrites).
        self._small_write_max = small_write_max_bytes
        self._uploads: dict[str, Upload] = {}
        self._staged: collections.Counter[str] = collections.Counter()  # owner -> writes
        self._codecs: dict[tuple[int, int], erasure.Codec] = {}
        #: Stamps new versions (services.gateway.commits: how it learns the drives' stamps).
        self.clock = clock or hlc.HybridClock()
        self.heal_queue = healqueue.HealQueue()
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

    # Resolution, HEAD.

    async def resolve(
        self,
        bucket: str,
        key: str,
        *,
        queue_heal: bool = True,
        follow: bool = True,
        version_id: str = "",
        markers: bool = False,
        data: bool = True,
    ) -> versions.Resolved:
        """The current version of bucket/key (version_id: that S3 version); NotFound, or
        Unavailable below read quorum; versions.DeleteMarker (a NotFound) when it is a delete
        marker, unless markers is True.

        When some drives lack that version the object is queued for healing, unless
        queue_heal is False (the healer's own look). follow=False: a pool record is returned
        as it is, not followed to its pool. data=False (a HEAD): the drives leave a small
        object's inline shards out of their replies (a read of it then asks for its blocks).
        bucket is a storage name.
        """
        names.check_stored(bucket, key)
        if version_id:
            objversions.check(version_id)
        cmap = self._view.current
        where = placement.locate(cmap, bucket, key, 0)
        found = await self.resolve_in(where, bucket, key, queue_heal, version_id, data=data)
        if found.meta.is_pointer and follow:
            found = await self._follow(found, queue_heal, version_id, data)
        if found.meta.delete_marker and not markers:
            raise versions.DeleteMarker(
                f"{bucket}/{key}: a delete marker",
                version_id=objversions.version_id(found.meta), by_id=bool(version_id),
            )  # fmt: skip
        return found

    async def _follow(
        self, record: versions.Resolved, queue_heal: bool, version_id: str, data: bool = True
    ) -> versions.Resolved:
        """The version a pool record names, in its pool. NotFound there may mean a pool drain
        moved the object meanwhile (record switched, old copy deleted): the entry in pool 0 is
        read again, once, and a new one followed."""
        bucket, key = record.meta.bucket, record.meta.key
        cmap = self._view.current
        target = placement.locate(cmap, bucket, key, record.meta.pool_pointer)
        try:
            return await self.resolve_in(target, bucket, key, queue_heal, version_id, data=data)
        except errors.NotFound:
            again = await self.resolve_in(record.where, bucket, key, queue_heal, version_id)
            if again.meta.data_id == record.meta.data_id:
                raise
        if not again.meta.is_pointer:
            return again
        target = placement.locate(cmap, bucket, key, again.meta.pool_pointer)
        return await self.resolve_in(target, bucket, key, queue_heal, version_id, data=data)

    async def resolve_in(
        self,
        where: placement.Placement,
        bucket: str,
        key: str,
        queue_heal: bool = True,
        version_id: str = "",
        *,
        data: bool = True,
    ) -> versions.Resolved:
        answers = await fanout.read_metas(self._nodes, where, bucket, key, version_id, data=data)
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
                why = f"read found the version on {len(held[best])} of {len(where.slots)} drives"
                self.heal_queue.add((bucket, key), why, objversions.version_id(metas[best]))
            shards = {i: answers[i] for i in held[best]}
            # Each drive's own meta says whether it holds its shard inline (a small write's
            # shard over 128 KiB that healing rewrote is in files on that drive), and whether
            # it came (a parity drive's is left out: fanout.read_metas).
            inline = {
                i: a.inline_data
                for i, a in shards.items()
                if isinstance(a, datanode_pb2.ShardMeta) and reads.has_inline(a)
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
        return versions.info((await self.resolve(bucket, key, data=False)).meta)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in the codec pool. If the caller is cancelled, the job still finishes first: it
        uses a staging slot that is handed to another call as soon as we return."""
        job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        await shm_copy.uncancellable(job)
        return job.result()
