"""Committing a version on the drives of its set, stamped by the gateway's hybrid logical clock.

A drive keeps the version of a key with the newest (stamp, data_id) and refuses an older one
(superseded), so versions are ordered by stamp. Stamps come from `kvtier.hlc.HybridClock`, and
the clock learns what the drives hold without a round trip of its own:
- a staged write's first WRITE_SHARD call names the key, and each drive's reply carries the
  stamp of its current version (objectwrites.ObjectWrites._send_shards observes it): the commit is
  then stamped above every version a drive held when the write began;
- every superseded commit answers with the newer version's stamp. A write that can be sent
  again (a small one: WRITE_SMALL carries its shards; a compose: multipart Complete links the
  parts again) is then stamped above every answer and committed again on every live drive,
  once, with the same data_id, so the drives end with one (stamp, data_id).

A commit that misses the write quorum fails (ClockSkew when drives refused the stamp as too
far ahead, StorageFull, Unavailable), and the drives that took it must not keep it: a version
left on some drives could be read or listed after its PUT was answered with an error, and one
stamped far ahead would supersede every later write on them. It is removed again (`_undo`) with
a conditional delete that names its data_id (and its S3 version id in a versioned bucket), so
a newer write of the key that landed meanwhile is never touched; a commit that reached its
write quorum is never undone. In an unversioned bucket the undo also asks for the version the
commit replaced back (restore_previous: a drive keeps it a while after each overwrite,
services/datanode/supersede.py): otherwise a failed overwrite that more drives took than
parity can lose would leave the acknowledged version on too few drives to read. A drive the
undo cannot reach keeps the version until a retry in the background gets there (bounded, with
backoff: `_retry_undo`, `kvtier_gateway_commit_undo_retries_total`), and the object is queued
for healing ("undo of a failed commit could not reach drive X"): once the undo got there, the
heal gives that drive the version the others hold.

Either way a write begun after another was acknowledged is ordered after it whatever the
gateways' clocks say: the earlier write is on a write quorum of drives, the later one reaches a
write quorum, and two write quorums of a set share a drive. What is still superseded after that
was written concurrently (committed after this write began), where either order is right.
A staged write's commit that is superseded anyway (a concurrent write landed between its first
call and its commit) cannot be sent again: its staged shards are gone. It counts as done, as
before; the clock still learns the stamp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import prometheus_client

from kvtier import errors, features, hlc, names, objversions
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2
from services.gateway import conditional, fanout, healqueue, placement, suspects
from services.gateway import datanodes as datanodes_mod

log = logging.getLogger(__name__)

RESTAMPS = prometheus_client.Counter(
    "kvtier_gateway_version_restamps_total",
    "Writes stamped again and committed again because the drives held a version stamped above "
    "this gateway's clock (a sign of clock skew between gateways)",
)
UNDONE = prometheus_client.Counter(
    "kvtier_gateway_commits_undone_total",
    "Drives from which a commit that missed the write quorum was removed again",
)
UNDO_RETRIED = prometheus_client.Counter(
    "kvtier_gateway_commit_undo_retries_total",
    "Undos of failed commits that could not reach a drive at first and were retried in the "
    "background, by outcome (removed, absent: the drive did not hold it, given_up)",
    ["outcome"],
)
#: An undo that cannot reach a drive is tried again this many times in the background...
UNDO_RETRIES = 10
#: ... first after this long, then twice as long each time, at most UNDO_RETRY_MAX_S.
UNDO_RETRY_FIRST_S = 1.0
UNDO_RETRY_MAX_S = 60.0
#: At most one warning about a lagging clock per this many seconds.
_WARN_EVERY_S = 60.0
_warned_at = -_WARN_EVERY_S


async def commit_version(
    nodes: datanodes_mod.Datanodes,
    clock: hlc.HybridClock,
    where: placement.Placement,
    meta: datanode_pb2.ShardMeta,
    write_id: str,
    live: Sequence[int],
    sources: Sequence[Sequence[shards_pb2.PartSource]] = (),
    small: Sequence[bytes] | None = None,
    *,
    stamp: bool = True,
    restamp: bool = True,
    heal_queue: healqueue.HealQueue | None = None,
) -> int:
    """Commit meta on the drives `live` of where (module docstring) and return on how many it
    is (or a newer version is). meta.mtime_unix_ns is set from the clock first (stamp=False:
    meta's own stamp is tried first) and holds the committed stamp on return. restamp=False:
    never stamped again above a newer version (a pool drain's copy loses to every write).
    heal_queue: where an object goes whose undo could not reach a drive.

    Raises ClockSkew when drives refused the stamp as too far ahead and the rest miss the write
    quorum, StorageFull or Unavailable for any other shortfall; the drives that took the
    version then no longer hold it (_undo)."""
    if stamp:
        meta.mtime_unix_ns = clock.now()
    done = await _round(nodes, where, meta, write_id, live, sources, small)
    clock.observe(done.newer_ns)
    if restamp and done.newer_ns > meta.mtime_unix_ns and (small is not None or sources):
        _lagging(meta, done.newer_ns)
        meta.mtime_unix_ns = clock.now()
        RESTAMPS.inc()
        done = await _round(nodes, where, meta, write_id, live, sources, small)
        clock.observe(done.newer_ns)
    if done.drives < where.write_quorum:
        problem = (
            f"PUT {meta.bucket}/{meta.key}: committed on {done.drives} drives, "
            f"the write quorum is {where.write_quorum}"
        )
        await _undo(nodes, where, meta, live, heal_queue)
        if done.refused and conditional.conditional(meta):
            raise conditional.refusal(meta, done.drives, done.refused)
        if done.skew:
            raise errors.ClockSkew(f"{problem}; drives refused the stamp: {done.skew}")
        if done.full:
            raise errors.StorageFull(f"{problem}; {done.full}")
        raise errors.Unavailable(problem)
    return done.drives


async def _round(
    nodes: datanodes_mod.Datanodes,
    where: placement.Placement,
    meta: datanode_pb2.ShardMeta,
    write_id: str,
    live: Sequence[int],
    sources: Sequence[Sequence[shards_pb2.PartSource]],
    small: Sequence[bytes] | None,
) -> fanout.Committed:
    """One commit of meta on every live drive."""
    if small is not None:
        return await fanout.write_small(nodes, where, meta, live, small)

    async def commit(index: int) -> fanout.Committed:
        slot = where.slots[index]
        mine = datanode_pb2.ShardMeta()
        mine.CopyFrom(meta)
        mine.shard_index = index
        request = shards_pb2.CommitWriteRequest(
            drive_id=slot.drive_id, write_id=write_id, meta=mine,
            part_sources=sources[index] if sources else (),
        )  # fmt: skip
        try:
            reply = await nodes.shards(slot.node_id).commit(request)
        except errors.PreconditionFailed as exc:  # a conditional commit: refused there
            log.info("commit of %s/%s on %s refused: %s", meta.bucket, meta.key, slot.drive_id, exc)
            nodes.suspects.heard(slot.node_id)
            return fanout.Committed(refused=1)
        except errors.KVTierError as exc:
            log.warning(
                "commit of %s/%s on %s failed: %s", meta.bucket, meta.key, slot.drive_id, exc
            )
            if not suspects.is_silence(exc):
                nodes.suspects.heard(slot.node_id)
            return fanout.Committed(
                skew=str(exc) if isinstance(exc, errors.ClockSkew) else "",
                full=str(exc) if isinstance(exc, errors.StorageFull) else "",
            )
        nodes.suspects.heard(slot.node_id)
        return fanout.Committed(drives=1, newer_ns=reply.current_mtime_unix_ns)

    total = fanout.Committed()
    ended = [False]

    async def counted(index: int) -> None:
        part = await commit(index)
        if not ended[0]:  # a straggler's late answer changes nothing the caller was told
            total.add(part)

    await fanout.until_decided(
        "commit",
        [(where.slots[i].node_id, counted(i)) for i in live],
        lambda: total.drives >= where.write_quorum,
        nodes.suspects,
        lacking=lambda: where.write_quorum - total.drives,  # (lost: no wait for a silent node)
    )
    ended[0] = True
    return total


async def _undo(
    nodes: datanodes_mod.Datanodes,
    where: placement.Placement,
    meta: datanode_pb2.ShardMeta,
    live: Sequence[int],
    heal_queue: healqueue.HealQueue | None,
) -> None:
    """Remove meta's version (a commit that missed the write quorum) from the drives of live
    that hold it: only that version (data_id; its version id where versions are kept), so a
    newer write of the key is never removed. A drive that fails is tried again in the
    background (`_retry_undo`; the delete is conditional, so trying again is safe) and the
    object is queued for healing (heal_queue, unless None), which brings the drive back to
    the version the others hold once the undo got there. So is a drive whose node is silent:
    there is no quorum to wait for, so each node gets the straggler grace (a suspect one none)
    and a call still out then is cancelled and handed to the retry (fanout.until_decided),
    not waited for up to its deadline (30 s)."""
    if not meta.data_id:  # nothing to name it by (the gateway always sets one)
        return
    results: list[bool | None] = [None] * len(live)

    async def undo_on(position: int, index: int) -> None:
        results[position] = await _undo_on(nodes, where.slots[index], meta)

    await fanout.until_decided(
        "undo",
        [(where.slots[i].node_id, undo_on(p, i)) for p, i in enumerate(live)],
        lambda: True,  # decided from the start: only the grace is waited
        nodes.suspects,
        cancel_left_behind=True,  # (None: unreached, retried below)
    )
    removed = sum(1 for r in results if r is True)
    if removed:
        UNDONE.inc(removed)
        log.info(
            "%s/%s: the failed commit of version %s removed again from %d drives",
            meta.bucket, meta.key, meta.data_id, removed,
        )  # fmt: skip
    unreached = [where.slots[i] for i, r in zip(live, results, strict=True) if r is None]
    if not unreached:
        return
    if heal_queue is not None and meta.bucket != names.MULTIPART_BUCKET:
        drives = ", ".join(s.drive_id for s in unreached)
        why = f"undo of a failed commit could not reach drive {drives}"
        heal_queue.add((meta.bucket, meta.key), why, objversions.version_id(meta))
    for slot in unreached:
        nodes.in_background(_retry_undo(nodes, slot, meta))


async def _undo_on(
    nodes: datanodes_mod.Datanodes, slot: common_pb2.DriveSlot, meta: datanode_pb2.ShardMeta
) -> bool | None:
    """The undo of meta's version on one drive: whether it was removed there; None when the
    drive could not be reached (or failed: worth trying again)."""
    version = objversions.version_id(meta) if meta.keep_versions else ""
    if not nodes.supports(slot.node_id, features.DATANODE_CONDITIONAL_UNDO):
        # An older datanode (a rolling upgrade) drops if_data_id, version_id and
        # restore_previous and removes the key outright: a newer acknowledged write that landed
        # there meanwhile too. It never kept the version this one replaced, so no undo can
        # bring that back there; left alone, the drive holds the failed version (the others
        # restore theirs, so it is not on a write quorum). Counted as unreached: the object is
        # queued for healing and the undo tried again later, when the node may run a build
        # that takes it (a conditional removal; the heal then rebuilds the version there).
        log.info("undo of %s/%s: %s is an older datanode, not yet", meta.bucket, meta.key,
                 slot.node_id)  # fmt: skip
        return None
    try:
        removed = await nodes.shards(slot.node_id).delete_shard(
            slot.drive_id, meta.bucket, meta.key, version, if_data_id=meta.data_id,
            restore_previous=not version,
        )  # fmt: skip
    except errors.NotFound:
        nodes.suspects.heard(slot.node_id)
        return False
    except errors.KVTierError as exc:
        log.warning(
            "undo of the failed commit of %s/%s on %s failed: %s",
            meta.bucket, meta.key, slot.drive_id, exc,
        )  # fmt: skip
        if not suspects.is_silence(exc):
            nodes.suspects.heard(slot.node_id)
        return None
    nodes.suspects.heard(slot.node_id)
    return removed


async def _retry_undo(
    nodes: datanodes_mod.Datanodes, slot: common_pb2.DriveSlot, meta: datanode_pb2.ShardMeta
) -> None:
    """Try an undo that could not reach its drive again, UNDO_RETRIES times at most, backing
    off from UNDO_RETRY_FIRST_S (doubled each time, at most UNDO_RETRY_MAX_S)."""
    delay = UNDO_RETRY_FIRST_S
    for _ in range(UNDO_RETRIES):
        await asyncio.sleep(delay)
        removed = await _undo_on(nodes, slot, meta)
        if removed is not None:
            UNDO_RETRIED.labels("removed" if removed else "absent").inc()
            if removed:
                UNDONE.inc()
                log.info(
                    "%s/%s: the failed commit of version %s removed again from %s (retried)",
                    meta.bucket, meta.key, meta.data_id, slot.drive_id,
                )  # fmt: skip
            return
        delay = min(2 * delay, UNDO_RETRY_MAX_S)
    UNDO_RETRIED.labels("given_up").inc()
    log.error(
        "%s/%s: the undo of the failed commit of version %s never reached %s (%d tries): that "
        "drive keeps it (the heal queue has the object)",
        meta.bucket, meta.key, meta.data_id, slot.drive_id, UNDO_RETRIES + 1,
    )  # fmt: skip


def _lagging(meta: datanode_pb2.ShardMeta, newer_ns: int) -> None:
    """Say (once a minute at most) that the drives hold a version stamped above this clock."""
    global _warned_at
    gap_s = (newer_ns - meta.mtime_unix_ns) / 1e9
    now = time.monotonic()
    if gap_s < 1.0 or now - _warned_at < _WARN_EVERY_S:
        log.debug("%s/%s: stamped again, %.3f s above", meta.bucket, meta.key, gap_s)
        return
    _warned_at = now
    log.warning(
        "%s/%s: the drives hold a version stamped %.1f s ahead of this gateway's clock; the "
        "write was stamped above it and committed again (is this host's clock behind?)",
        meta.bucket, meta.key, gap_s,
    )  # fmt: skip
