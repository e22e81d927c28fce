"""Calls to every drive of an erasure set, one per datanode: a small object's commit
(WRITE_SMALL) and the metadata reads of every GET and HEAD (READ_METAS).

A datanode holds several drives of a set (2 of 12 on the dev cluster): one call carries all of
them, so a small PUT or a GET costs a call per node, not per drive; each drive still answers
for itself (its error fails that drive only).

Stragglers (`until_decided`, also for the commits and shard sends of staged writes, a GET's
shard reads, and, per drive over gRPC (`each_drive`), listings, deletes, aborts and tag/ACL
changes; a failed commit's undo, decided from the start, waits only the grace): once the
answers in hand decide the call as a down node would leave it decided (a commit or a block of
shards on its write quorum of drives; metas from all drives but at most the parity count), the
nodes still out get STRAGGLER_GRACE_S (or STRAGGLER_FACTOR x the time taken so far, whichever is
longer; the wait ends as soon as they have all answered) and are then left behind, counted as
unavailable, their calls left to end on their own (a shard send's is cancelled: its bytes are a
staging slot the write gives back); so once a call on a quorum is lost (the nodes still out, a
suspect's aside, cannot make up the successes it lacks: a commit that misses its write quorum
without a silent node fails after the grace, not at that node's deadline). A node left
behind is suspect (services.gateway.suspects) until it answers a call again or its probe,
and gets no grace meanwhile: a silent node costs the first operation through its sets the
grace, not every one.
A datanode that drops packets silently (a partition, found by the fault suite on the tcp data
plane) would otherwise hold every GET and PUT of its sets for the data-plane deadline (30 s),
past S3 clients' read timeouts, while the other drives answered in milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import prometheus_client

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import placement
from services.gateway import suspects as suspects_mod

log = logging.getLogger(__name__)

Answer = datanode_pb2.ShardMeta | errors.KVTierError
T = TypeVar("T")

#: The least a straggling node is waited for once the call is decided without it.
STRAGGLER_GRACE_S = 2.0
#: ... or this many times the time the call took until then, when that is longer.
STRAGGLER_FACTOR = 3.0
#: until_decided's op for a GET's shard reads: they have a suspicion of their own
#: (services.gateway.suspects, `reads`), which a node's other answers do not clear.
READ_SHARD_OP = "read_shard"
STRAGGLERS = prometheus_client.Counter(
    "kvtier_gateway_straggler_calls_total",
    "Datanode calls left behind once a metadata read, a commit or a block of a staged write's "
    "shards was decided without them (after the grace, or at once for a suspect node)",
    ["op"],
)


async def until_decided(
    op: str,
    calls: Sequence[tuple[str, Coroutine[Any, Any, None]]],
    decided: Callable[[], bool],
    suspects: suspects_mod.Suspects,
    *,
    cancel_left_behind: bool = False,
    lacking: Callable[[], int] | None = None,
    weights: Sequence[int] | None = None,
) -> list[int]:
    """Run calls (node id, a call that records its own outcome) until all have ended, or until
    decided() holds and the nodes still out have had their grace: the positions (in calls) of
    those still running then, left behind (suspect from now on). Suspect nodes get no grace:
    once decided, their calls are left behind at once; the others are waited for up to the
    grace, which ends early when they have all answered.

    lacking (a call decided on a quorum of successes: how many it still lacks; weights[p]: how
    many call p can add, 1 each by default): once the calls still out of nodes not suspect
    cannot make up what is lacking even if all succeed (a suspect's count for nothing: it gets
    no grace), the call is lost as surely as decided, and ends the same way: the nodes still out
    get the grace, a suspect none. So a commit that misses its quorum without a silent node
    fails after the grace at most, not at that node's deadline (30 s).

    op READ_SHARD_OP (shard reads): a node whose shard reads are suspect gets no grace either,
    and a read left behind while its node was not suspect makes its shard reads suspect
    (suspects.Suspects, `reads`: a node answering metadata reads but hanging on data).

    Left-behind calls run on to their own end (counted in suspects), or with
    cancel_left_behind are cancelled and waited for (their buffers are the caller's again:
    a transport never touches a cancelled call's buffers once it has ended)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reads = op == READ_SHARD_OP
    wait = _Wait(loop, decided, [n for n, _ in calls], suspects, reads=reads)
    if lacking is not None:
        wait.count_hope(lacking, weights or [1] * len(calls))
    tasks = []
    for position, (_, call) in enumerate(calls):
        task = asyncio.ensure_future(call)
        task.add_done_callback(functools.partial(wait.ended, position))
        tasks.append(task)
    try:
        await wait.until_woken()
        if wait.out and wait.grace_for():
            elapsed = loop.time() - started
            await wait.until_woken(max(STRAGGLER_GRACE_S, STRAGGLER_FACTOR * elapsed))
    except BaseException:  # our caller is gone: so are its calls
        for task in tasks:
            task.cancel()
        raise
    behind = sorted(p for p in wait.out if not tasks[p].done())  # (a callback may be due)
    for position in behind:
        STRAGGLERS.labels(op).inc()
        node_id, task = calls[position][0], tasks[position]
        if cancel_left_behind:
            task.cancel()
        if reads and not suspects.suspect(node_id) and suspects.suspect(node_id, reads=True):
            continue  # no grace for its shard reads, its other calls answer: nothing new
        shard_read = reads and not suspects.suspect(node_id)  # (it had the grace)
        suspects.left_behind(node_id, None if cancel_left_behind else task, reads=shard_read)
    if cancel_left_behind and behind:
        await asyncio.wait([tasks[p] for p in behind])
    for position, task in enumerate(tasks):  # a call's own bug is never a silent answer
        ended = position not in behind and task.done() and not task.cancelled()
        if ended and (exc := task.exception()) is not None:
            raise exc
    return behind


class _Wait:
    """until_decided's state: the calls still out, counted by done-callbacks that wake its one
    waiter when what it waits for has happened (decided, or every call answered; then every
    call of a node that is not suspect answered, or the call is lost: `count_hope`), so a call
    costs about what a gather did."""

    __slots__ = (
        "_decided", "_graced", "_hope", "_lacking", "_loop", "_nodes", "_reads", "_suspects",
        "_waiter", "_weights", "out",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        decided: Callable[[], bool],
        nodes: list[str],
        suspects: suspects_mod.Suspects,
        *,
        reads: bool = False,
    ) -> None:
        self._loop = loop
        self._decided = decided
        self._nodes = nodes
        self._suspects = suspects
        #: Shard reads: a node whose shard reads are suspect counts as suspect.
        self._reads = reads
        self.out = set(range(len(nodes)))
        #: In the grace: the calls still waited for (None: not in the grace yet).
        self._graced: set[int] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._lacking: Callable[[], int] | None = None
        #: Per call: the successes it can add (0 for a suspect node's: no grace, no hope).
        self._weights: list[int] = []
        #: What the calls still out can add.
        self._hope = 0

    def count_hope(self, lacking: Callable[[], int], weights: Sequence[int]) -> None:
        """Also end once the calls still out cannot make up what lacking() says is lacking."""
        self._lacking = lacking
        self._weights = [
            0 if self._suspects.suspect(n, reads=self._reads) else w
            for n, w in zip(self._nodes, weights, strict=True)
        ]
        self._hope = sum(self._weights)

    def grace_for(self) -> bool:
        """Enter the grace: whether any call still out is of a node that is not suspect."""
        self._graced = {
            p for p in self.out if not self._suspects.suspect(self._nodes[p], reads=self._reads)
        }
        return bool(self._graced)

    def _satisfied(self) -> bool:
        if self._graced is None:
            if not self.out or self._decided():
                return True
            return self._lacking is not None and self._hope < self._lacking()
        return not self._graced

    async def until_woken(self, timeout_s: float | None = None) -> None:
        """Wait until what is waited for has happened (or timeout_s has passed)."""
        if self._satisfied():
            return
        waiter = self._waiter = self._loop.create_future()
        timer = None if timeout_s is None else self._loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def ended(self, position: int, _: asyncio.Future[None]) -> None:
        """A call ended (its outcome is recorded): wake the waiter when it is done waiting."""
        self.out.discard(position)
        if self._lacking is not None:
            self._hope -= self._weights[position]
        if self._graced is not None:
            self._graced.discard(position)
        if self._waiter is not None and self._satisfied():
            _wake(self._waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
    #: Drives that refused a conditional commit: their current version did not meet it.
    refused: int = 0

    def add(self, other: Committed) -> None:
        """Take in another part of the same commit."""
        self.drives += other.drives
        self.refused += other.refused
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
                elif result.error_kind == errors.PreconditionFailed.__name__:
                    done.refused += 1
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
        nodes.suspects,
        lacking=lambda: where.write_quorum - total.drives,
        weights=[len(i) for i in groups.values()],
    )
    ended[0] = True
    return total


async def read_metas(
    nodes: datanodes_mod.Datanodes,
    where: placement.Placement,
    bucket: str,
    key: str,
    version_id: str = "",
    *,
    data: bool = True,
) -> list[Answer]:
    """The object's meta on every drive of where (by shard index): the meta or that drive's
    error (NotFound when it has none; a node that fails fails each of its drives);
    version_id: that S3 version's. A small object's inline shards (up to 128 KiB: a datanode
    sends no larger one) come from the data shards' drives only (what a read needs; a degraded
    one asks the others for their blocks), from none with data False (Datanodes.read_metas)."""
    answers: list[Answer] = [errors.Unavailable("not asked")] * len(where.slots)
    answered = [0]

    async def node_call(node_id: str, indices: list[int]) -> None:
        drive_ids = [where.slots[i].drive_id for i in indices]
        try:
            wanted = [where.slots[i].drive_id for i in indices if i < where.data_shards]
            got: Sequence[Answer] = await nodes.read_metas(
                node_id, drive_ids, bucket, key, version_id, data=wanted if data else False
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
        nodes.suspects,
    )
    return list(answers)  # (a straggler's late answer lands in the old list)


async def each_drive(
    op: str,
    nodes: datanodes_mod.Datanodes,
    slots: Sequence[common_pb2.DriveSlot],
    call: Callable[[common_pb2.DriveSlot], Awaitable[T]],
    needed: int,
) -> list[T | errors.KVTierError]:
    """call (a gRPC call to one drive) on every drive of slots until `needed` of them answered
    with a reply and the rest had their straggler grace (until_decided; a suspect node's at
    once): per slot, the reply or the error (Unavailable for a call left behind, which runs on
    to its own deadline). For listings (needed: the set's read quorum) and deletes (its write
    quorum), which would otherwise wait for a silent node's gRPC deadline (30 s). A reply or a
    service's own error clears the node's suspicion (services.gateway.suspects)."""
    answers: list[T | errors.KVTierError] = [
        errors.Unavailable(f"{s.node_id} did not answer in time") for s in slots
    ]
    replied = [0]

    async def one(position: int, slot: common_pb2.DriveSlot) -> None:
        try:
            answer: T | errors.KVTierError = await call(slot)
        except errors.KVTierError as exc:
            answer = exc
            if not suspects_mod.is_silence(exc):
                nodes.suspects.heard(slot.node_id)
        else:
            replied[0] += 1
            nodes.suspects.heard(slot.node_id)
        answers[position] = answer

    await until_decided(
        op,
        [(slot.node_id, one(p, slot)) for p, slot in enumerate(slots)],
        lambda: replied[0] >= needed,
        nodes.suspects,
        lacking=lambda: needed - replied[0],
    )
    return list(answers)  # (a straggler's late answer lands in the old list)
