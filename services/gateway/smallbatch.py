"""Concurrent small writes to one datanode coalesced into WRITE_SMALL calls (issue 14).

A small PUT sends each datanode of its set the object's shards and their commit in one
WRITE_SMALL call. Under concurrency those calls are many, and what a call costs besides its
shards (a data-plane message each way, the datanode's task, pool job and journal sync, the
reply, on both sides) is most of a small PUT's CPU. So, per datanode and Nagle-style: a write
that finds no call of its node in flight goes at once, alone (no added wait when idle); one
that arrives while a call is in flight waits for it to end and leaves with every write that
arrived meanwhile, in one call of at most MAX_SHARDS shards (the datanode's limit) and
`max_bytes`. Each write gets its own shards' results back, and a datanode answers every shard
alone (shardserver: its error, superseded, or done), so one object of a batch failing on a
drive fails that object there only. A call that fails as a whole (its connection, the node)
fails every write it carried, on that node, as it would have failed each of them alone.

A batch waits at most STALL_S behind a call in flight, then leaves anyway: a stuck node would
otherwise hold each later batch for a whole call deadline, one after another.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

import prometheus_client

from kvtier.proto.datanode.v1 import datanode_pb2, shards_pb2

log = logging.getLogger(__name__)

#: (drive_id, meta, shard bytes) of one shard.
Entry = tuple[str, datanode_pb2.ShardMeta, bytes]
Results = list[shards_pb2.ShardResult]
#: Sends one WRITE_SMALL call: the results of its entries, in order.
Send = Callable[[Sequence[Entry]], Awaitable[Results]]

BATCHED = prometheus_client.Histogram(
    "kvtier_gateway_small_write_batch_objects",
    "Objects whose shards one WRITE_SMALL call to a datanode carried",
    buckets=(1, 2, 4, 8, 16, 32),
)
#: The most shards of one WRITE_SMALL call (services.datanode.shardserver's limit).
MAX_SHARDS = 64
#: Calls of one node in flight before new writes wait to go together.
MAX_INFLIGHT = 1
#: The longest a batch waits behind calls in flight before it leaves anyway.
STALL_S = 0.25


@dataclasses.dataclass(slots=True)
class _Batch:
    """Writes waiting to leave together."""

    entries: list[Entry] = dataclasses.field(default_factory=list)
    #: Each write's (first entry, entry count, future of its results).
    writes: list[tuple[int, int, asyncio.Future[Results]]] = dataclasses.field(default_factory=list)
    bytes: int = 0
    timer: asyncio.TimerHandle | None = None


class SmallWrites:
    """The WRITE_SMALL calls of one datanode, batched (module docstring)."""

    def __init__(
        self,
        send: Send,
        *,
        max_bytes: int,
        max_inflight: int = MAX_INFLIGHT,
        stall_s: float = STALL_S,
    ) -> None:
        self._send = send
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._stall_s = stall_s
        self._inflight = 0
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls made and writes they carried (for tests and metrics).
        self.calls = 0
        self.writes = 0

    async def write(self, entries: Sequence[Entry]) -> Results:
        """Stage and commit one object's shards on drives of the node: each shard's result,
        in order (as `Datanodes.write_small`); what the call raises when it fails whole."""
        if self._inflight < self._max_inflight and not self._waiting:
            self._inflight += 1
            self.calls += 1
            self.writes += 1
            BATCHED.observe(1)
            try:
                return await self._send(entries)
            finally:
                self._ended()
        done: asyncio.Future[Results] = asyncio.get_running_loop().create_future()
        self._join(entries, done)
        return await done

    def _join(self, entries: Sequence[Entry], done: asyncio.Future[Results]) -> None:
        size = sum(len(shard) for _, _, shard in entries)
        batch = self._waiting[-1] if self._waiting else None
        if batch is None or (
            len(batch.entries) + len(entries) > MAX_SHARDS or batch.bytes + size > self._max_bytes
        ):
            batch = _Batch()
            batch.timer = asyncio.get_running_loop().call_later(self._stall_s, self._stalled, batch)
            self._waiting.append(batch)
        batch.writes.append((len(batch.entries), len(entries), done))
        batch.entries.extend(entries)
        batch.bytes += size

    def _ended(self) -> None:
        """A call ended: the oldest waiting batch leaves."""
        self._inflight -= 1
        if self._waiting and self._inflight < self._max_inflight:
            self._launch(self._waiting.popleft())

    def _stalled(self, batch: _Batch) -> None:
        if batch in self._waiting:
            log.debug("small writes waited %.3f s behind a call in flight: sent", self._stall_s)
            self._waiting.remove(batch)
            self._launch(batch)

    def _launch(self, batch: _Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        self._inflight += 1
        task = asyncio.ensure_future(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: _Batch) -> None:
        """Send a batch's writes (those whose writer still waits) in one call."""
        try:
            writes = [w for w in batch.writes if not w[2].done()]
            entries: list[Entry] = []
            for start, count, _ in writes:
                entries.extend(batch.entries[start : start + count])
            if not entries:
                return
            self.calls += 1
            self.writes += len(writes)
            BATCHED.observe(len(writes))
            try:
                results = await self._send(entries)
            except asyncio.CancelledError:
                for _, _, done in writes:
                    done.cancel()
                raise
            except Exception as exc:  # each writer hears it, as from a call of its own
                for _, _, done in writes:
                    if not done.done():
                        done.set_exception(exc)
                return
            at = 0
            for _, count, done in writes:
                if not done.done():
                    done.set_result(results[at : at + count])
                at += count
        finally:
            self._ended()

    async def close(self) -> None:
        """Cancel the calls in flight (their writers hear CancelledError)."""
        while self._waiting:
            batch = self._waiting.popleft()
            if batch.timer is not None:
                batch.timer.cancel()
            for _, _, done in batch.writes:
                done.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
