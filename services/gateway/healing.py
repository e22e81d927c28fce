"""Healing: objects whose drives lack their current version, or hold it damaged, are rebuilt.

Healing one object (`Healer.heal_object`): its current version is the one the read quorum
agrees on (`ObjectEngine.resolve`); every drive of its set is probed (`rebuild.Rebuilder.probe`);
drives with no copy, an older version, an unreadable meta or blocks that fail their checksum get
their whole shard rebuilt from the others and committed as the same version
(`rebuild.Rebuilder.rebuild`). The outcome is healthy, healed, unrecoverable (some stripe is
intact on fewer than k drives that answered: nothing is written), gone (deleted meanwhile) or
skipped (drives unreachable or errors: retried). Concurrent heals of one object share one run;
at most `max_objects` objects are healed at once.

Three callers:
- the heal queue: the engine adds objects it found degraded (a read rebuilt a block, a PUT
  committed on fewer than every drive, drives disagreed on the version), each with its reason
  (`healqueue`; `list_queue` answers `AdminService.ListHealQueue`); `run_queue` drains it.
  What was skipped is retried with exponential backoff; an object waiting for a drive that is
  down stays queued and is retried as soon as the map shows the drive online again;
- the scanner (`run_scanner`): every `scan_interval_s` a slice of the objects, in listing order
  bucket after bucket, resumed where the previous cycle stopped and wrapping around at the end;
- `AdminService.Heal` (`heal_tree`, `kvtier admin heal`): every object of a bucket or prefix,
  with progress.

Buckets here are storage names (`kvtier.names.storage_name`, from `ObjectFront.storage_buckets`
and `storage_name`), the durable KV bucket included; progress shows the user-facing names.

Known gap: a heal racing a DELETE of the same object may put one drive's shard back after the
delete; below the read quorum it stays invisible (reads and listings need k copies).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import prometheus_client

from kvtier import clustermap, errors, names
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import front as front_mod
from services.gateway import healqueue, placement, rebuild, versions

log = logging.getLogger(__name__)

_QUEUE_TICK_S = 0.25
_BACKOFF_S = 1.0
_BACKOFF_MAX_S = 300.0
_MAX_PENDING = 100_000
_PROGRESS_EVERY_S = 0.25

HEALED = prometheus_client.Counter(
    "kvtier_gateway_heal_objects_total", "Objects checked by healing, by outcome", ["outcome"]
)
HEALED_SHARDS = prometheus_client.Counter(
    "kvtier_gateway_heal_shards_total", "Drive shards rebuilt and committed by healing"
)
QUEUE_LENGTH = prometheus_client.Gauge(
    "kvtier_gateway_heal_queue_length", "Objects queued for healing (new, retrying or waiting)"
)


class Outcome(enum.Enum):
    """What healing one object came to."""

    HEALTHY = "healthy"  # every drive holds the version, every block verified
    HEALED = "healed"  # shards were rebuilt (dry run: would be); every drive holds the version
    UNRECOVERABLE = "unrecoverable"  # a stripe has fewer than k intact blocks: nothing written
    GONE = "gone"  # the object no longer exists
    SKIPPED = "skipped"  # not (fully) done now: drives unreachable, errors; retried later


@dataclasses.dataclass(frozen=True, slots=True)
class HealResult:
    """The outcome of healing one object."""

    outcome: Outcome
    #: Drive shards rewritten (with dry_run: that would be).
    shards: int = 0
    #: Drives that could not be reached: the object is retried once they are online.
    waiting_on: frozenset[str] = frozenset()
    detail: str = ""


class Healer:
    """The gateway's healing (see the module docstring)."""

    def __init__(
        self,
        view: clustermap.MapView,
        front: front_mod.ObjectFront,
        rebuilder: rebuild.Rebuilder,
        *,
        max_objects: int = 2,
        scan_interval_s: float = 60.0,
        scan_objects_per_cycle: int = 1000,
    ) -> None:
        self._view = view
        self._front = front
        self._engine = front.engine
        self._rebuilder = rebuilder
        self._max_objects = max_objects
        self._limit = asyncio.Semaphore(max_objects)
        self._scan_interval_s = scan_interval_s
        self._scan_objects = scan_objects_per_cycle
        self._scan_at = ("", "")  # (bucket, last key scanned)
        self._busy: dict[tuple[str, str], asyncio.Event] = {}
        self._pending: dict[tuple[str, str], healqueue.Pending] = {}
        self._running: set[tuple[str, str]] = set()
        self._dropped = 0  # objects not queued because the queue was full

    # One object.

    async def heal_object(self, bucket: str, key: str, *, dry_run: bool = False) -> HealResult:
        """Check one object and rebuild what its drives lack (with dry_run: only check).

        Heals of one object run one after the other (the second finds it healthy); at most
        max_objects objects at once. Errors of the cluster come back as SKIPPED.
        """
        if dry_run:
            async with self._limit:
                return await self._guarded(bucket, key, dry_run=True)
        name = (bucket, key)
        while (busy := self._busy.get(name)) is not None:
            await busy.wait()
        done = self._busy[name] = asyncio.Event()
        try:
            async with self._limit:
                result = await self._guarded(bucket, key, dry_run=False)
        finally:
            del self._busy[name]
            done.set()
        HEALED.labels(result.outcome.value).inc()
        HEALED_SHARDS.inc(result.shards)
        if result.outcome is not Outcome.SKIPPED and name not in self._running:
            self._pending.pop(name, None)  # settled by the scanner or an admin heal
        if result.outcome not in (Outcome.HEALTHY, Outcome.GONE):
            level = logging.ERROR if result.outcome is Outcome.UNRECOVERABLE else logging.INFO
            log.log(level, "heal %s/%s: %s, %d shards rebuilt %s", bucket, key,
                    result.outcome.value, result.shards, result.detail)  # fmt: skip
        return result

    async def _guarded(self, bucket: str, key: str, *, dry_run: bool) -> HealResult:
        try:
            return await self._heal(bucket, key, dry_run=dry_run)
        except errors.KVTierError as exc:
            return HealResult(Outcome.SKIPPED, detail=f"{type(exc).__name__}: {exc}")

    async def _heal(self, bucket: str, key: str, *, dry_run: bool) -> HealResult:
        """Heal the object's entry in pool 0 and, when that is a pool record, the object in
        its pool: the record's result when it is not done, else the object's."""
        try:
            found = await self._engine.resolve(
                bucket, key, queue_heal=False, follow=False, markers=True
            )
        except errors.NotFound:
            return HealResult(Outcome.GONE)
        except errors.Unavailable as exc:
            where = placement.locate(self._view.current, bucket, key, 0)
            return await self._unresolved(where, bucket, key, str(exc))
        record = await self._heal_version(found, dry_run=dry_run)
        if not found.meta.is_pointer or record.outcome not in (Outcome.HEALTHY, Outcome.HEALED):
            return record
        pool = found.meta.pool_pointer
        where = placement.locate(self._view.current, bucket, key, pool)
        try:
            target = await self._engine.resolve_in(where, bucket, key, queue_heal=False)
        except errors.NotFound:
            return HealResult(Outcome.UNRECOVERABLE, detail=f"pool {pool} lacks the object")
        except errors.Unavailable as exc:
            return await self._unresolved(where, bucket, key, str(exc))
        result = await self._heal_version(target, dry_run=dry_run)
        if result.outcome is Outcome.HEALTHY and record.outcome is Outcome.HEALED:
            return record
        return dataclasses.replace(result, shards=result.shards + record.shards)

    async def _heal_version(self, found: versions.Resolved, *, dry_run: bool) -> HealResult:
        meta, where = found.meta, found.where
        k = meta.data_shards
        drives = await self._rebuilder.probe(meta, where)
        targets = [d for d in drives if d.state in (rebuild.State.STALE, rebuild.State.BAD)]
        waiting = frozenset(d.slot.drive_id for d in drives if d.state is rebuild.State.UNREACHABLE)
        ahead = any(d.state is rebuild.State.AHEAD for d in drives)
        if not targets:
            if waiting or ahead:
                return HealResult(Outcome.SKIPPED, waiting_on=waiting, detail="not every drive")
            return HealResult(Outcome.HEALTHY)
        intact = rebuild.worst_stripe(drives)
        if intact < k:
            detail = f"a stripe is intact on {intact} drives, {k} needed"
            if intact + len(waiting) >= k:
                return HealResult(Outcome.SKIPPED, waiting_on=waiting, detail=detail)
            return HealResult(Outcome.UNRECOVERABLE, detail=detail)
        if dry_run:
            outcome = Outcome.SKIPPED if waiting else Outcome.HEALED
            return HealResult(outcome, shards=len(targets), waiting_on=waiting)
        written, failed = await self._rebuilder.rebuild(meta, drives, targets)
        if written < len(targets) or waiting:
            detail = f"{len(failed)} drives failed" if failed else "not every drive"
            return HealResult(Outcome.SKIPPED, shards=written, waiting_on=waiting, detail=detail)
        return HealResult(Outcome.HEALED, shards=written)

    async def _unresolved(
        self, where: placement.Placement, bucket: str, key: str, why: str
    ) -> HealResult:
        """No version has the read quorum: unrecoverable when every drive answered and fewer
        than k metas are readable; else maybe later (drives down, commits in flight)."""

        async def read(slot: common_pb2.DriveSlot) -> str:
            try:
                await self._rebuilder.nodes.shards(slot.node_id).read_meta(
                    slot.drive_id, bucket, key
                )
            except (errors.NotFound, errors.Corrupt):
                return "lost"
            except errors.KVTierError:
                return "unreachable"
            return "readable"

        answers = collections.Counter(await asyncio.gather(*(read(s) for s in where.slots)))
        if not answers["unreachable"] and answers["readable"] < where.data_shards:
            return HealResult(Outcome.UNRECOVERABLE, detail=why)
        waiting = frozenset(
            s.drive_id for s in where.slots if s.state != common_pb2.DRIVE_STATE_ONLINE
        )
        return HealResult(Outcome.SKIPPED, waiting_on=waiting, detail=why)

    # The heal queue.

    def enqueue(
        self,
        bucket: str,
        key: str,
        result: HealResult | None = None,
        *,
        intake: healqueue.Intake | None = None,
    ) -> None:
        """Queue an object for healing (again, after result when given); intake: why and
        when it was first queued (kept while it stays queued)."""
        name = (bucket, key)
        item = self._pending.get(name)
        if item is None:
            if len(self._pending) >= _MAX_PENDING:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 10_000 == 0:
                    log.warning("heal queue full: %d objects left to the scanner", self._dropped)
                return
            intake = intake or healqueue.Intake(f"heal {result.outcome.value}" if result else "")
            item = self._pending[name] = healqueue.Pending(
                reason=intake.reason, version_id=intake.version_id, queued_at=intake.queued_at
            )
        if result is not None:
            item.attempts += 1
            item.last_error = result.detail or result.outcome.value
            delay = min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** min(item.attempts, 16))
            item.due = time.monotonic() + delay * random.uniform(0.5, 1.0)
            item.waiting_on = result.waiting_on
            online = self._online_drives()
            item.was_offline = not result.waiting_on <= online

    def queued(self, bucket: str, key: str) -> tuple[int, frozenset[str]] | None:
        """(tries so far, drives it waits for) of a queued object; None when not queued."""
        item = self._pending.get((bucket, key))
        return None if item is None else (item.attempts, item.waiting_on)

    @property
    def queue_length(self) -> int:
        """Objects queued: new, retrying, waiting for drives or being healed now."""
        return len(self._engine.heal_queue) + len(self._pending)

    def _absorb(self) -> None:
        """Move the engine's new entries into the queue (known ones keep their schedule)."""
        queue = self._engine.heal_queue
        while queue:
            name, intake = queue.pop()
            if name not in self._pending and name not in self._running:
                self.enqueue(*name, intake=intake)

    def list_queue(self, limit: int) -> admin_pb2.ListHealQueueResponse:
        """What the queue holds, oldest first (at most limit: `healqueue.clamp_limit`), and
        its totals (`AdminService.ListHealQueue`)."""
        return healqueue.listing(
            self._pending, self._engine.heal_queue, self._running, self._online_drives(),
            limit=limit, dropped=self._dropped,
        )  # fmt: skip

    def _online_drives(self) -> set[str]:
        return {
            s.drive_id
            for pool in self._view.current.pools
            for es in pool.sets
            for s in es.slots
            if s.state == common_pb2.DRIVE_STATE_ONLINE
        }

    def _ready(self, now: float) -> list[tuple[str, str]]:
        online = self._online_drives()
        free = self._max_objects - len(self._running)
        ready: list[tuple[str, str]] = []
        for name, item in self._pending.items():
            if len(ready) >= free:
                break
            if name in self._running:
                continue
            if item.waiting_on and not item.waiting_on <= online:
                continue  # a drive it needs is down: wait for it
            if item.due <= now or item.was_offline:  # due, or its drives just came back
                ready.append(name)
        return ready

    async def run_queue(self) -> None:
        """Drain the heal queue forever (a loop of the gateway's task group)."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._absorb()
                for name in self._ready(time.monotonic()):
                    self._running.add(name)
                    task = asyncio.create_task(self._heal_queued(name))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                QUEUE_LENGTH.set(self.queue_length)
                await asyncio.sleep(_QUEUE_TICK_S)
        finally:
            await self._cancel(tasks)

    @staticmethod
    async def _cancel(tasks: Iterable[asyncio.Future[Any]]) -> None:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _heal_queued(self, name: tuple[str, str]) -> None:
        try:
            result = await self.heal_object(*name)
        except Exception as exc:  # boundary: one object must not stop the queue
            log.exception("heal of %s/%s failed", *name)
            result = HealResult(Outcome.SKIPPED, detail=str(exc))
        finally:
            self._running.discard(name)
        if result.outcome is Outcome.SKIPPED:
            self.enqueue(*name, result=result)
        else:
            self._pending.pop(name, None)

    # The scanner.

    async def run_scanner(self) -> None:
        """Every scan_interval_s, verify and heal the next slice of objects (0: off)."""
        if self._scan_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self._scan_interval_s)
            try:
                await self.scan_slice()
            except Exception:  # boundary: the next cycle tries again
                log.exception("heal scanner cycle failed")

    async def scan_slice(self) -> int:
        """Verify and heal up to scan_objects_per_cycle objects after the last position;
        returns how many were looked at."""
        buckets = await self._front.storage_buckets()
        at_bucket, at_key = self._scan_at
        budget = self._scan_objects
        for bucket in (b for b in buckets if b >= at_bucket):
            after = at_key if bucket == at_bucket else ""
            while budget > 0:
                request = pb.ListObjectsRequest(
                    bucket=bucket, start_after=after, max_keys=min(budget, 1000)
                )
                page = await self._front.lister.list_objects(request)
                keys = [o.key for o in page.objects]
                async for key, result in self._heal_each(bucket, keys, dry_run=False):
                    if result.outcome is Outcome.SKIPPED:
                        intake = healqueue.Intake(f"scanner: {result.detail or 'skipped'}")
                        self.enqueue(bucket, key, result=result, intake=intake)
                budget -= len(keys)
                after = keys[-1] if keys else after
                if not page.is_truncated:
                    break
            if budget <= 0:
                self._scan_at = (bucket, after)
                return self._scan_objects
        self._scan_at = ("", "")  # the end: the next cycle starts over
        return self._scan_objects - budget

    # Admin.

    async def heal_tree(
        self, bucket: str, prefix: str, *, dry_run: bool
    ) -> AsyncIterator[admin_pb2.HealProgress]:
        """Heal every object of bucket (every bucket when empty) under prefix; progress now and
        then, and a last message with done set. NotFound when the bucket does not exist."""
        if bucket:
            buckets = [await self._front.storage_name(bucket)]
        else:
            buckets = await self._front.storage_buckets()
        progress = admin_pb2.HealProgress()
        sent = time.monotonic()
        for name in buckets:
            token = ""
            while True:
                request = pb.ListObjectsRequest(
                    bucket=name, prefix=prefix, continuation_token=token
                )
                page = await self._front.lister.list_objects(request)
                keys = [o.key for o in page.objects]
                sizes = {o.key: o.size for o in page.objects}
                async for key, result in self._heal_each(name, keys, dry_run=dry_run):
                    _tally(progress, f"{names.user_bucket(name)}/{key}", result, sizes[key])
                    if result.outcome is Outcome.SKIPPED and not dry_run:
                        intake = healqueue.Intake(f"admin heal: {result.detail or 'skipped'}")
                        self.enqueue(name, key, result=result, intake=intake)
                    if time.monotonic() - sent >= _PROGRESS_EVERY_S:
                        sent = time.monotonic()
                        yield _copy(progress)
                        del progress.unrecoverable_keys[:]
                if not page.is_truncated:
                    break
                token = page.next_continuation_token
        progress.done = True
        yield progress

    async def _heal_each(
        self, bucket: str, keys: Sequence[str], *, dry_run: bool
    ) -> AsyncIterator[tuple[str, HealResult]]:
        """Heal keys, max_objects at a time; (key, result) as each finishes."""

        async def one(key: str) -> tuple[str, HealResult]:
            return key, await self.heal_object(bucket, key, dry_run=dry_run)

        tasks = [asyncio.ensure_future(one(key)) for key in keys]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            await self._cancel(tasks)


def _tally(progress: admin_pb2.HealProgress, name: str, result: HealResult, size: int) -> None:
    progress.scanned += 1
    progress.bytes_scanned += size
    progress.current_key = name
    if result.outcome is Outcome.HEALTHY:
        progress.healthy += 1
    elif result.outcome is Outcome.HEALED:
        progress.healed += 1
        progress.bytes_healed += size
    elif result.outcome is Outcome.UNRECOVERABLE:
        progress.unrecoverable += 1
        progress.unrecoverable_keys.append(name)
    elif result.outcome is Outcome.SKIPPED:
        progress.skipped += 1
    if result.outcome is not Outcome.UNRECOVERABLE:
        progress.shards_healed += result.shards


def _copy(progress: admin_pb2.HealProgress) -> admin_pb2.HealProgress:
    copy = admin_pb2.HealProgress()
    copy.CopyFrom(progress)
    return copy
