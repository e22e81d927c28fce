"""Calls to every drive of an erasure set, one per datanode: a small object's commit
(WRITE_SMALL) and the metadata reads of every GET and HEAD (READ_METAS).

A datanode holds several drives of a set (2 of 12 on the dev cluster): one call carries all of
them, so a small PUT or a GET costs a call per node, not per drive; each drive still answers
for itself (its error fails that drive only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import placement

log = logging.getLogger(__name__)

Answer = datanode_pb2.ShardMeta | errors.KVTierError


@dataclasses.dataclass(slots=True)
class Committed:
    """How a commit went on drives of a set."""

    #: Drives that took the version, or hold a newer one (superseded: the write happened and
    #: was overwritten at once, as by any later write).
    drives: int = 0
    #: The largest stamp of a newer version that superseded the commit on a drive (0: none).
    newer_ns: int = 0
    #: A drive's ClockSkew refusal (the stamp was beyond its bound), or "".
    skew: str = ""
    #: A drive's StorageFull refusal (no space left), or "".
    full: str = ""

    def add(self, other: Committed) -> None:
        """Take in another part of the same commit."""
        self.drives += other.drives
        self.newer_ns = max(self.newer_ns, other.newer_ns)
        self.skew = self.skew or other.skew
        self.full = self.full or other.full


def by_node(where: placement.Placement, indices: Sequence[int]) -> dict[str, list[int]]:
    """The shard indices of where's slots grouped by the datanode holding them, in order."""
    groups: dict[str, list[int]] = {}
    for index in indices:
        groups.setdefault(where.slots[index].node_id, []).append(index)
    return groups


async def write_small(
    nodes: datanodes_mod.Datanodes,
    where: placement.Placement,
    meta: datanode_pb2.ShardMeta,
    live: Sequence[int],
    shards: Sequence[bytes],
) -> Committed:
    """Commit meta (shard_index set per drive) with shards[i] inline on each drive i of live;
    how it went (a superseded commit counts: a newer PUT got there first)."""

    async def node_call(node_id: str, indices: list[int]) -> Committed:
        entries = []
        for index in indices:
            mine = datanode_pb2.ShardMeta()
            mine.CopyFrom(meta)
            mine.shard_index = index
            entries.append((where.slots[index].drive_id, mine, shards[index]))
        try:
            results = await nodes.write_small(node_id, entries)
        except errors.KVTierError as exc:
            log.warning("write of %s/%s on %s failed: %s", meta.bucket, meta.key, node_id, exc)
            return Committed()
        done = Committed()
        for (drive_id, _, _), result in zip(entries, results, strict=True):
            if result.error_kind:
                log.warning(
                    "write of %s/%s on %s failed: %s: %s", meta.bucket, meta.key, drive_id,
                    result.error_kind, result.error,
                )  # fmt: skip
                if result.error_kind == errors.ClockSkew.__name__:
                    done.skew = result.error
                elif result.error_kind == errors.StorageFull.__name__:
                    done.full = f"{drive_id}: {result.error}"
            else:
                done.drives += 1
                done.newer_ns = max(done.newer_ns, result.current_mtime_unix_ns)
        return done

    groups = by_node(where, live)
    total = Committed()
    for part in await asyncio.gather(*(node_call(n, i) for n, i in groups.items())):
        total.add(part)
    return total


async def read_metas(
    nodes: datanodes_mod.Datanodes,
    where: placement.Placement,
    bucket: str,
    key: str,
    version_id: str = "",
) -> list[Answer]:
    """The object's meta on every drive of where (by shard index): the meta or that drive's
    error (NotFound when it has none; a node that fails fails each of its drives);
    version_id: that S3 version's."""
    answers: list[Answer] = [errors.Unavailable("not asked")] * len(where.slots)

    async def node_call(node_id: str, indices: list[int]) -> None:
        drive_ids = [where.slots[i].drive_id for i in indices]
        try:
            got: Sequence[Answer] = await nodes.read_metas(
                node_id, drive_ids, bucket, key, version_id
            )
        except errors.KVTierError as exc:
            got = [exc] * len(indices)
        for index, answer in zip(indices, got, strict=True):
            answers[index] = answer

    groups = by_node(where, range(len(where.slots)))
    await asyncio.gather(*(node_call(n, i) for n, i in groups.items()))
    return answers
