"""Finishing a DELETE on the drives it missed.

A DELETE (of an object, of one S3 version, a pool drain's conditional one, a multipart upload's
clean-up) is answered once its write quorum of drives took it (objectpools.delete_in over
fanout.each_drive): a drive whose datanode was silent (left behind after the straggler grace),
down or failing keeps the deleted copy. That copy is on fewer drives than any read or listing
needs (n - write quorum < k), so it is never seen again, but nothing else ever reclaims it: the
heal of a key the quorum no longer holds ends as "gone", and the scanner lists by quorum.

So the gateway records such a partial delete (`PartialDelete`) and finishes it in the
background (`finish_later`, one task per delete, run by `Datanodes.in_background`): every
RETRY_FIRST_S (doubled each round, at most RETRY_MAX_S), for RETRY_FOR_S at most, it asks each
missed drive whose node is not suspect (a suspect's round is skipped: it would be left behind
anyway) what it holds of the key (one READ_METAS per node). A drive that holds nothing is done.
A copy it holds is removed only when it is stale (`stale`): stamped no later than the delete
began, not held by any drive that took the delete (those hold nothing, or a newer write of the
key), and, for a conditional delete, the version that delete named. The removal itself is
conditional on that copy's data_id (DeleteShard's if_data_id), so a write that lands on the
drive between the look and the removal is never touched; a newer PUT of the key written since
the delete is kept wherever it landed.

Limits, said plainly: a drive still unreachable after RETRY_FOR_S keeps its copy (as before:
space only; counted as given_up and logged); pending retries live in this gateway's memory, so a
gateway restart drops them; at most MAX_PENDING deletes are retried at once (beyond that they
are counted as dropped); a copy stamped above the delete's start by a gateway whose clock runs
ahead of this one's is taken for a newer write and kept. A newer write stamped below the
delete by a gateway whose clock runs behind, whose commit reached the missed drive but none of
the others at the very moment of the look, could lose that one drive's copy (its other drives
keep it: still readable; the scanner heals it); with the clocks in step that write is stamped
above the delete and kept.

Never imports grpc.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

import prometheus_client

from kvtier import errors, features
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout, placement

log = logging.getLogger(__name__)

RETRIED = prometheus_client.Counter(
    "kvtier_gateway_delete_retries_total",
    "Drives a DELETE missed (silent, down or failing datanode) that the gateway went back to, by "
    "outcome (removed: the stale copy; absent: nothing there; kept: what is there is newer or "
    "live; given_up: never reached; dropped: too many deletes pending)",
    ["outcome"],
)

#: A missed drive is asked again this long after the delete, then twice as long each round...
RETRY_FIRST_S = 1.0
#: ... at most this long between two rounds...
RETRY_MAX_S = 60.0
#: ... for this long in all (then the drive keeps the copy).
RETRY_FOR_S = 600.0
#: At most this many partial deletes are retried at once (one task each).
MAX_PENDING = 10_000
_pending = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PartialDelete:
    """A DELETE that reached its write quorum but missed some drives of the set."""

    where: placement.Placement
    bucket: str
    key: str
    #: The S3 version deleted ("": the key and every version of it).
    version_id: str
    #: The delete's condition (only this data_id), or "".
    if_data_id: str
    #: The gateway's clock when the delete began: a copy stamped later is newer than it.
    began_ns: int
    #: Indices (in where.slots) of the drives that did not take the delete.
    missed: tuple[int, ...]


def record(nodes: datanodes_mod.Datanodes, partial: PartialDelete) -> None:
    """Finish partial in the background (`finish_later`), unless MAX_PENDING are already."""
    if _pending >= MAX_PENDING:
        RETRIED.labels("dropped").inc(len(partial.missed))
        log.warning(
            "%s/%s: %d deletes already retried, the drives this one missed keep the copy",
            partial.bucket, partial.key, _pending,
        )  # fmt: skip
        return
    nodes.in_background(finish_later(nodes, partial))


async def finish_later(nodes: datanodes_mod.Datanodes, partial: PartialDelete) -> None:
    """Go back to the drives partial missed until each is done or RETRY_FOR_S has passed."""
    global _pending
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + RETRY_FOR_S
    left, delay = set(partial.missed), RETRY_FIRST_S
    _pending += 1  # (here: a task cancelled before it starts never runs a finally)
    try:
        while left and loop.time() < give_up_at:
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)
            left -= await finish_once(nodes, partial, left)
    finally:
        _pending -= 1
    if left:
        RETRIED.labels("given_up").inc(len(left))
        log.error(
            "%s/%s: the delete never reached drives %s: they keep the copy (space only, below "
            "every quorum)", partial.bucket, partial.key,
            ", ".join(partial.where.slots[i].drive_id for i in sorted(left)),
        )  # fmt: skip


async def finish_once(
    nodes: datanodes_mod.Datanodes, partial: PartialDelete, indices: set[int]
) -> set[int]:
    """One round over the missed drives at indices whose node is not suspect: those now done
    (their stale copy removed, nothing there, or a copy kept as newer or live)."""
    where, done = partial.where, set[int]()
    ready = [i for i in sorted(indices) if not nodes.suspects.suspect(where.slots[i].node_id)]
    found = await _look(nodes, partial, ready)
    others: Sequence[fanout.Answer] = ()
    if any(isinstance(a, datanode_pb2.ShardMeta) for a in found.values()):
        # What the drives that took the delete hold now (nothing, or a newer write).
        others = await fanout.read_metas(
            nodes, where, partial.bucket, partial.key, partial.version_id
        )
        if not _enough(partial, others):
            others = ()
    for index, answer in found.items():
        if answer is None:
            RETRIED.labels("absent").inc()
            done.add(index)
        elif isinstance(answer, datanode_pb2.ShardMeta) and others:
            if not nodes.supports(where.slots[index].node_id, features.DATANODE_CONDITIONAL_UNDO):
                # An older datanode reads a conditional delete as a plain one, which would
                # remove a newer write there too: it keeps the copy.
                log.info("%s/%s: %s is an older datanode, it keeps the copy the delete missed",
                         partial.bucket, partial.key, where.slots[index].node_id)  # fmt: skip
                RETRIED.labels("kept").inc()
                done.add(index)
            elif not stale(partial, index, answer, others):
                RETRIED.labels("kept").inc()
                done.add(index)
            elif await _remove(nodes, partial, where.slots[index], answer.data_id):
                done.add(index)
    return done


def stale(
    partial: PartialDelete,
    index: int,
    meta: datanode_pb2.ShardMeta,
    others: Sequence[fanout.Answer],
) -> bool:
    """Whether meta, the copy missed drive index holds, is what the delete removed elsewhere:
    stamped no later than the delete began, the delete's condition met, and held by no drive
    that took the delete (others: each drive's answer now; one of those holding it means a
    newer write of the key, or one going on, has it)."""
    if meta.mtime_unix_ns > partial.began_ns:
        return False
    if partial.if_data_id and meta.data_id != partial.if_data_id:
        return False
    return not any(
        isinstance(answer, datanode_pb2.ShardMeta) and answer.data_id == meta.data_id
        for i, answer in enumerate(others)
        if i != index and i not in partial.missed
    )


def _enough(partial: PartialDelete, others: Sequence[fanout.Answer]) -> bool:
    """Whether enough drives that took the delete answered to see a newer write: one
    acknowledged is on a write quorum of drives, at most n - write quorum of them among the
    missed ones, so any n - write quorum + 1 answers of the others include a drive holding it."""
    where = partial.where
    answered = sum(
        1
        for i, answer in enumerate(others)
        if i not in partial.missed
        and (isinstance(answer, errors.NotFound) or not isinstance(answer, errors.KVTierError))
    )
    return answered > len(where.slots) - where.write_quorum


async def _look(
    nodes: datanodes_mod.Datanodes, partial: PartialDelete, indices: Sequence[int]
) -> dict[int, datanode_pb2.ShardMeta | errors.KVTierError | None]:
    """What each drive at indices holds of the key (None: nothing; an error: no answer), one
    READ_METAS call per node, all at once."""
    slots = partial.where.slots
    found: dict[int, datanode_pb2.ShardMeta | errors.KVTierError | None] = {}

    async def node_call(node_id: str, group: list[int]) -> None:
        drive_ids = [slots[i].drive_id for i in group]
        try:
            got: Sequence[fanout.Answer] = await nodes.read_metas(
                node_id, drive_ids, partial.bucket, partial.key, partial.version_id
            )
        except errors.KVTierError as exc:
            got = [exc] * len(group)
        for index, answer in zip(group, got, strict=True):
            found[index] = None if isinstance(answer, errors.NotFound) else answer

    groups = fanout.by_node(partial.where, indices)
    # A silent node fails its call at the data plane's deadline; it is no longer suspect only
    # because it answered lately, and this runs in the background: no grace needed.
    await asyncio.gather(*(node_call(n, g) for n, g in groups.items()))
    return found


async def _remove(
    nodes: datanodes_mod.Datanodes, partial: PartialDelete, slot: common_pb2.DriveSlot, data_id: str
) -> bool:
    """Remove the stale copy (data_id) from one drive, only while it is still that copy: whether
    the drive is done (removed, or something else there now); False to try again."""
    try:
        removed = await nodes.shards(slot.node_id).delete_shard(
            slot.drive_id, partial.bucket, partial.key, partial.version_id, if_data_id=data_id
        )
    except errors.NotFound:
        removed = False
    except errors.KVTierError as exc:
        log.warning("finishing the delete of %s/%s on %s failed: %s",
                    partial.bucket, partial.key, slot.drive_id, exc)  # fmt: skip
        return False
    RETRIED.labels("removed" if removed else "kept").inc()
    if removed:
        log.info("%s/%s: the delete finished on %s (its copy %s removed)",
                 partial.bucket, partial.key, slot.drive_id, data_id)  # fmt: skip
    return True
