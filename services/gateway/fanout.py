"""Calls to every drive of an erasure set, one per datanode: a small object's commit
(WRITE_SMALL) and the metadata reads of every GET and HEAD (READ_METAS).

A datanode holds several drives of a set (2 of 12 on the dev cluster): one call carries all of
them, so a small PUT or a GET costs a call per node, not per drive; each drive still answers
for itself (its error fails that drive only).

Stragglers (`until_decided`, also for the commits of staged writes): once the answers in hand
decide the call as a down node would leave it decided (a commit on its write quorum of drives;
metas from all drives but at most the parity count), the
nodes still out get STRAGGLER_GRACE_S (or STRAGGLER_FACTOR x the time taken so far, whichever is
longer) and are then left behind, counted as unavailable, their calls left to end on their own.
A datanode that drops packets silently (a partition, found by the fault suite on the tcp data
plane) would otherwise hold every GET and small PUT of its sets for the data-plane deadline (30
s), past S3 clients' read timeouts, while the other drives answered in milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import prometheus_client

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import placement

log = logging.getLogger(__name__)

Answer = datanode_pb2.ShardMeta | errors.KVTierError

#: The least a straggling node is waited for once the call is decided without it.
STRAGGLER_GRACE_S = 2.0
#: ... or this many times the time the call took until then, when that is longer.
STRAGGLER_FACTOR = 3.0
STRAGGLERS = prometheus_client.Counter(
    "kvtier_gateway_straggler_calls_total",
    "Datanode calls left behind once a commit or metadata read was decided without them",
    ["op"],
)


async def until_decided(
    op: str,
    calls: Sequence[tuple[str, Coroutine[Any, Any, None]]],
    decided: Callable[[], bool],
    straggling: dict[str, int],
) -> None:
    """Run calls (node id, a call that records its own outcome) until all have ended, or until
    decided() holds and the grace after it has passed: those still running are left to end on
    their own, counted in straggling (by node). Nodes that still have calls left behind get no
    grace: a silent node costs each request the grace once, not every request."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    node_of = {asyncio.ensure_future(call): node_id for node_id, call in calls}
    pending = set(node_of)
    try:
        while pending:
            if decided():
                if any(not straggling.get(node_of[t]) for t in pending):
                    grace = max(STRAGGLER_GRACE_S, STRAGGLER_FACTOR * (loop.time() - started))
                    _, pending = await asyncio.wait(pending, timeout=grace)
                break
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # our caller is gone: so are its calls
        for task in pending:
            task.cancel()
        raise
    for task in pending:
        node_id = node_of[task]
        STRAGGLERS.labels(op).inc()
        straggling[node_id] = straggling.get(node_id, 0) + 1
        task.add_done_callback(functools.partial(_forget, straggling, node_id))


def _forget(straggling: dict[str, int], node_id: str, task: asyncio.Task[None]) -> None:
    """A left-behind call ended: uncount it, retrieve its outcome (its errors were logged
    where raised)."""
    left = straggling.get(node_id, 1) - 1
    if left > 0:
        straggling[node_id] = left
    else:
        straggling.pop(node_id, None)
    if not task.cancelled():
        task.exception()


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
    ended = [False]

    async def counted(node_id: str, indices: list[int]) -> None:
        part = await node_call(node_id, indices)
        if not ended[0]:  # a straggler's late answer changes nothing the caller was told
            total.add(part)

    await until_decided(
        "write_small",
        [(n, counted(n, i)) for n, i in groups.items()],
        lambda: total.drives >= where.write_quorum,
        nodes.straggling,
    )
    ended[0] = True
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
    answered = [0]

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
        answered[0] += len(indices)

    groups = by_node(where, range(len(where.slots)))
    for node_id, indices in groups.items():
        for index in indices:
            answers[index] = errors.Unavailable(f"{node_id} did not answer in time")
    await until_decided(
        "read_metas",
        [(n, node_call(n, i)) for n, i in groups.items()],
        lambda: answered[0] >= len(where.slots) - where.parity_shards,
        nodes.straggling,
    )
    return list(answers)  # (a straggler's late answer lands in the old list)
