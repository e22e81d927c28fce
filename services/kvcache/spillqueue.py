"""The way from a kvcache node's DRAM to the durable tier: a bounded spill buffer and its uploaders.

Blocks on their way out (capacity victims of write-back namespaces, committed puts of
write-through ones) are copied into the **spill buffer**, a staging arena of
`spill_buffer_bytes` cut by the same slab allocator as the DRAM arena, so a victim's extent can be
freed at once. Each copy becomes an upload op; a delete (of a block, or of an older version an
overwrite replaced) is an op without bytes. `concurrency` workers apply the ops through an
`ObjectStore` (the gateway), retrying transient errors with backoff; an op given up is counted
and logged, and its buffer freed. A write-back victim's upload is never given up while a gateway
is in the map (its buffered bytes are the acknowledged block's only copy): it is retried, backing
off, until the gateway answers, and a buffer full of such uploads holds further victims in DRAM
(backpressure: puts that need them evicted get NO_SPACE) rather than dropping any.

Ops of one object key stay in order: a newer op replaces a queued older one (its bytes are
freed), and waits behind one already in flight. The queue doubles as a read overlay: until an
op is applied, `latest(key)` says what the durable tier is about to hold, so a read or probe
right after a spill sees the block, and one right after a delete does not.

A write-through put waits for its upload (`Op.waiter`): the waiter learns "" once the upload is
applied, or why not (given up, or superseded by a newer op of its key before or while it ran).
Ops with a waiter start before the other queued ones (a client waits for them; spills can wait).

Pure asyncio; never imports grpc. Not thread-safe: the node's event loop owns it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from kvtier import errors
from services.kvcache import metrics, slab

log = logging.getLogger(__name__)


#: Deletes are refused (Overloaded) while this many ops wait (uploads: bounded by the buffer).
MAX_QUEUED_OPS = 1 << 16
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0
#: A write-through waiter's outcome when a newer op of its key came first.
SUPERSEDED = "write-through: a newer write or delete of the key came first"


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What the durable tier says about one stored block."""

    size: int
    etag: str
    #: Wall-clock expiry of the block's TTL in Unix milliseconds; 0: none.
    expires_unix_ms: int = 0
    #: The block's xxh3-64 as uploaded (None: uploaded before checksums were kept).
    checksum: int | None = None


class ObjectStore(Protocol):
    """The durable tier as the kvcache node sees it (one bucket; keys from `object_key`).

    Every method raises `kvtier.errors` (Unavailable, DeadlineExceeded, Overloaded: transient).
    """

    def available(self) -> bool:
        """Whether a durable tier is configured and known (a gateway is in the map)."""
        ...

    async def put(
        self, key: str, data: memoryview, expires_unix_ms: int, checksum: int | None
    ) -> None:
        """Store data under key (replacing any older version), with its checksum (xxh3-64)
        kept as object metadata when known."""
        ...

    async def head(self, key: str) -> ObjectMeta | None:
        """The stored block's metadata, or None when absent."""
        ...

    async def get_into(self, key: str, into: memoryview, etag: str) -> None:
        """Read the whole object (exactly len(into) bytes, version etag) into `into`.

        NotFound / PreconditionFailed when it is gone or changed meanwhile.
        """
        ...

    async def delete(self, key: str) -> None:
        """Delete key; an absent key is not an error."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...


class Cause(enum.StrEnum):
    """Why an op was queued (the label of the spilled counter)."""

    CAPACITY = "capacity"
    WRITE_THROUGH = "write_through"
    DELETE = "delete"


@dataclasses.dataclass(eq=False, slots=True)
class Op:
    """One upload (extent set: its bytes in the spill buffer) or delete (extent None)."""

    key: str
    tenant: str
    cause: Cause
    extent: slab.Extent | None
    expires_unix_ms: int = 0
    #: The block's xxh3-64 (None: not known), kept with the durable copy.
    checksum: int | None = None
    #: Called after a successful upload (e.g. to mark the DRAM copy durable); may be replaced.
    on_durable: Callable[[], object] | None = None
    #: A write-through put waiting for this upload: "" once applied, else why it was not
    #: (a result, never an exception: nobody may be left to retrieve it).
    waiter: asyncio.Future[str] | None = None

    @property
    def nbytes(self) -> int:
        return self.extent.requested if self.extent is not None else 0


class SpillQueue:
    """The spill buffer, its op queue and its workers (see the module docstring).

    The buffer (`buffer_bytes`, a multiple of `page_bytes`) is allocated on first use.
    `run()` is the workers' loop: run it in the node's task group; when it is cancelled it
    keeps applying queued ops for up to `drain_s` seconds (a clean stop loses nothing queued),
    then re-raises.
    """

    def __init__(
        self,
        objects: ObjectStore,
        *,
        buffer_bytes: int,
        page_bytes: int,
        concurrency: int = 8,
        retries: int = 3,
        timeout_s: float = 10.0,
        drain_s: float = 10.0,
    ) -> None:
        if buffer_bytes < page_bytes or buffer_bytes % page_bytes:
            raise ValueError("buffer_bytes must be a positive multiple of page_bytes")
        if concurrency < 1 or retries < 0 or timeout_s <= 0 or drain_s < 0:
            raise ValueError("need concurrency >= 1, retries >= 0, timeout_s > 0, drain_s >= 0")
        self.objects = objects
        self._buffer_bytes = buffer_bytes
        self._page_bytes = page_bytes
        self._concurrency = concurrency
        self._retries = retries
        self._timeout_s = timeout_s
        self._drain_s = drain_s
        self._alloc: slab.SlabAllocator | None = None
        self._buffer: memoryview | None = None
        self._queued: dict[str, Op] = {}  # ordered: the next op to start is the first
        self._inflight: dict[str, Op] = {}
        self._after: dict[str, Op] = {}  # the next op of a key whose op is in flight
        self._urgent: collections.deque[str] = collections.deque()  # keys of queued waited ops
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while no op is pending
        self._idle.set()
        self._room = asyncio.Event()  # set when buffer room is released (for `reserve_wait`)
        self.queue_bytes = 0
        #: Whether the last reservation failed (and nothing was released since).
        self.full = False
        self.spilled: collections.Counter[str] = collections.Counter()  # tenant -> uploads
        self.failures: collections.Counter[str] = collections.Counter()  # tenant -> given up

    # The buffer.

    def reserve(self, nbytes: int) -> slab.Extent | None:
        """Room for nbytes in the spill buffer, or None when it is full.

        Once a reservation failed, the buffer counts as full until some room is released:
        eviction asks for every candidate, and a full buffer must answer in O(1).
        """
        if self.full:
            return None
        if self._alloc is None:
            self._alloc = slab.SlabAllocator(self._buffer_bytes, page_bytes=self._page_bytes)
            self._buffer = memoryview(bytearray(self._buffer_bytes))
        extent = self._alloc.alloc(nbytes)
        if extent is None:
            self.full = True
        return extent

    async def reserve_wait(self, nbytes: int) -> slab.Extent:
        """Room for nbytes, waiting while the buffer is full (bound it with a timeout)."""
        while (extent := self.reserve(nbytes)) is None:
            self._room.clear()
            await self._room.wait()
        return extent

    def release(self, extent: slab.Extent) -> None:
        """Give back room that `reserve` returned and no op holds."""
        assert self._alloc is not None
        self._alloc.free(extent)
        self.full = False
        self._room.set()

    def view(self, extent: slab.Extent) -> memoryview:
        """The reserved bytes of extent (writable)."""
        assert self._buffer is not None
        return self._buffer[extent.offset : extent.offset + extent.requested]

    # Ops.

    def latest(self, key: str) -> Op | None:
        """The newest op of key not yet applied (in flight included), or None."""
        return self._after.get(key) or self._queued.get(key) or self._inflight.get(key)

    def enqueue(self, op: Op) -> None:
        """Queue op after every earlier op of its key, replacing one that has not started.

        Its extent (if any) now belongs to the queue. Raises Overloaded for a delete when
        MAX_QUEUED_OPS ops wait already (uploads are bounded by the buffer, never refused).
        """
        waiting = self._after if op.key in self._inflight else self._queued
        replaced = waiting.get(op.key)
        waiting_ops = len(self._queued) + len(self._after)
        if replaced is None and op.extent is None and waiting_ops >= MAX_QUEUED_OPS:
            raise errors.Overloaded(f"{MAX_QUEUED_OPS} durable-tier operations are waiting")
        waiting[op.key] = op  # a replaced op's place is kept
        if op.waiter is not None and waiting is self._queued:
            self._urgent.append(op.key)
        self.queue_bytes += op.nbytes - (replaced.nbytes if replaced is not None else 0)
        metrics.SPILL_QUEUE_BYTES.set(self.queue_bytes)
        self._drop(replaced)
        self._idle.clear()
        self._wake.set()

    def _drop(self, op: Op | None) -> None:
        if op is None:
            return
        if op.extent is not None:
            self.release(op.extent)
        _tell(op, SUPERSEDED)

    @property
    def inflight(self) -> int:
        """Ops being applied now."""
        return len(self._inflight)

    def pending(self) -> int:
        """Ops not yet applied (queued, waiting or in flight)."""
        return len(self._queued) + len(self._after) + len(self._inflight)

    # The workers.

    async def run(self) -> None:
        """Apply ops forever with `concurrency` workers; on cancellation drain for drain_s."""
        try:
            await self._work()
        except asyncio.CancelledError:
            if self.pending():
                log.info("draining %d durable-tier ops (%d B)", self.pending(), self.queue_bytes)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._drain_s):
                        await self.drained(work=True)
                if self.pending():
                    log.warning(
                        "stopping with %d durable-tier ops unapplied (%d B lost)",
                        self.pending(), self.queue_bytes,
                    )  # fmt: skip
            raise

    async def _work(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(self._concurrency):
                group.create_task(self._worker())

    async def drained(self, *, work: bool = False) -> None:
        """Wait until no op is pending (with work: run the workers meanwhile)."""
        runner = asyncio.ensure_future(self._work()) if work else None
        try:
            await self._idle.wait()
        finally:
            if runner is not None:
                runner.cancel()
                await asyncio.wait([runner])  # a cancel of this task still propagates
                if not runner.cancelled() and runner.exception() is not None:
                    log.error("durable-tier workers failed", exc_info=runner.exception())

    async def _worker(self) -> None:
        while True:
            op = await self._next()
            try:
                await self._apply(op)
            except asyncio.CancelledError:
                self._requeue(op)
                raise
            except Exception as exc:  # a boundary: one bad op must not stop the uploads
                log.exception("durable tier: %s failed unexpectedly", op.key[:80])
                self._failed(op, exc)
            self._finish(op)

    async def _next(self) -> Op:
        while not self._queued:
            self._wake.clear()
            await self._wake.wait()
        op = None
        while self._urgent and op is None:  # (a key whose waited op left the queue: skipped)
            found = self._queued.get(self._urgent.popleft())
            op = found if found is not None and found.waiter is not None else None
        if op is None:
            op = next(iter(self._queued.values()))
        del self._queued[op.key]
        self._inflight[op.key] = op
        return op

    def _requeue(self, op: Op) -> None:
        """An interrupted op goes back to the front (unless a newer op of its key waits)."""
        del self._inflight[op.key]
        newer = self._after.pop(op.key, None)
        if newer is not None:
            self._queued[op.key] = newer
            self._settle(op)
            return
        self._queued = {op.key: op, **self._queued}

    def _finish(self, op: Op) -> None:
        del self._inflight[op.key]
        newer = self._after.pop(op.key, None)
        if newer is not None:
            self._queued[op.key] = newer
            if newer.waiter is not None:
                self._urgent.append(op.key)
            self._wake.set()
        self._settle(op)

    def _settle(self, op: Op) -> None:
        """Free an op that is done with (applied, given up or superseded)."""
        self.queue_bytes -= op.nbytes
        metrics.SPILL_QUEUE_BYTES.set(self.queue_bytes)
        self._drop(op)
        if not self.pending():
            self._idle.set()

    async def _apply(self, op: Op) -> None:
        """Apply op, retrying transient failures; never raises except CancelledError."""
        backoff_s = _BACKOFF_FIRST_S
        for attempt in itertools.count():
            try:
                async with asyncio.timeout(self._timeout_s):
                    if op.extent is None:
                        await self.objects.delete(op.key)
                    else:
                        await self.objects.put(
                            op.key, self.view(op.extent), op.expires_unix_ms, op.checksum
                        )
            except (errors.KVTierError, TimeoutError, OSError) as exc:
                retryable = not isinstance(exc, errors.KVTierError) or exc.retryable
                spent = attempt >= self._retries and not self._kept(op)
                if not retryable or spent or op.key in self._after:
                    if op.key not in self._after:  # superseded: the newer op decides
                        self._failed(op, exc)
                    _tell(op, SUPERSEDED)  # (a given-up op's waiter was told why already)
                    return
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
            else:
                self._applied(op)
                return

    def _kept(self, op: Op) -> bool:
        """Whether op is retried past `retries`: the upload of a write-back victim while a
        gateway is known. Its bytes in the buffer are the block's only copy, and its put was
        acknowledged, so giving up would lose it (a gateway partition longer than the retries
        did, tests/fault/test_partitions.py); the buffer filling up meanwhile holds further
        victims in DRAM (backpressure) instead."""
        return op.cause is Cause.CAPACITY and op.extent is not None and self.objects.available()

    def _applied(self, op: Op) -> None:
        if op.extent is None:
            return
        self.spilled[op.tenant] += 1
        metrics.SPILLED.labels(metrics.LABELS.tenant(op.tenant), op.cause.value).inc()
        if op.on_durable is not None:
            op.on_durable()
        if op.waiter is not None:  # a newer op of the key waiting would undo this one
            _tell(op, SUPERSEDED if op.key in self._after else "")

    def _failed(self, op: Op, exc: BaseException) -> None:
        kind = "delete" if op.extent is None else "put"
        self.failures[op.tenant] += 1
        metrics.SPILL_FAILURES.labels(kind).inc()
        log.warning(
            "durable tier: gave up the %s of %s (%d B, %s): %s",
            kind, op.key[:80], op.nbytes, op.cause.value, exc,
        )  # fmt: skip
        _tell(op, f"write-through: the durable tier did not take the upload: {exc}")


def _tell(op: Op, outcome: str) -> None:
    """Give op's waiter (if any, and not told yet) its outcome ("": stored)."""
    if op.waiter is not None and not op.waiter.done():
        op.waiter.set_result(outcome)
