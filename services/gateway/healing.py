"""Healing: objects whose drives lack their current version, or hold it damaged, are rebuilt.

Healing one object (`Healer.heal_object`): its current version is the one the read quorum
agrees on (`ObjectEngine.resolve`); every drive of its set is probed (`rebuild.Rebuilder.probe`);
drives with no copy, an older version, an unreadable meta or blocks that fail their checksum get
their whole shard rebuilt from the others and committed as the same version
(`rebuild.Rebuilder.rebuild`). The outcome is healthy, healed, unrecoverable (some stripe is
intact on fewer than k drives that answered: nothing is written), gone (deleted meanwhile) or
skipped (drives unreachable or errors: retried). Concurrent heals of one object share one run;
at most `max_objects` objects are healed at once. A non-current version of a versioned bucket's
key is healed the same way, by its version id (`heal_object`'s version_id): probed and verified
as that version on each drive and committed as a non-current one (a drive whose current version
is not newer refuses it: never made current; the current version is healed first).

Three callers:
- the heal queue: the engine adds objects it found degraded (a read rebuilt a block, a PUT
  committed on fewer than every drive, drives disagreed on the version), each with its reason
  (`healqueue`; `list_queue` answers `AdminService.ListHealQueue`); `run_queue` drains it,
  healing the version each entry recorded and the current one when that is another.
  What was skipped is retried with exponential backoff; an object waiting for a drive that is
  down stays queued and is retried as soon as the map shows the drive online again;
- the scanner (`run_scanner`): every `scan_interval_s` a slice of the objects, in listing order
  bucket after bucket (a versioned bucket's every version, delete markers included, in
  ListObjectVersions order, each counting as one object of the slice), resumed where the
  previous cycle stopped and wrapping around at the end;
- `AdminService.Heal` (`heal_tree`, `kvtier admin heal`): every object of a bucket or prefix,
  then every other version of a versioned bucket's keys (non-current versions and delete
  markers), as ListObjectVersions lists them, with progress.

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

from kvtier import clustermap, errors, names, objversions
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
        self._scan_at = ("", "", "")  # (bucket, last key scanned, its version id or "")
        self._busy: dict[tuple[str, str], asyncio.Event] = {}
        self._pending: dict[tuple[str, str], healqueue.Pending] = {}
        self._running: set[tuple[str, str]] = set()
        self._dropped = 0  # objects not queued because the queue was full

    # One object.

    async def heal_object(
        self,
        bucket: str,
        key: str,
        *,
        version_id: str = "",
        dry_run: bool = False,
        and_current: bool = False,
    ) -> HealResult:
        """Check one object and rebuild what its drives lack (with dry_run: only check).

        version_id: that S3 version of the key, current or not (a non-current one is rebuilt
        as non-current: `rebuild.Rebuilder.rebuild`); with and_current, the current version
        too when it is another (a queue entry names the version its report saw). Heals of one
        object run one after the other (the second finds it healthy); at most max_objects
        objects at once. Errors of the cluster come back as SKIPPED.
        """
        version = (version_id, and_current)
        if dry_run:
            async with self._limit:
                return await self._guarded(bucket, key, version, dry_run=True)
        name = (bucket, key)
        while (busy := self._busy.get(name)) is not None:
            await busy.wait()
        done = self._busy[name] = asyncio.Event()
        try:
            async with self._limit:
                result = await self._guarded(bucket, key, version, dry_run=False)
        finally:
            del self._busy[name]
            done.set()
        HEALED.labels(result.outcome.value).inc()
        HEALED_SHARDS.inc(result.shards)
        item = self._pending.get(name)
        settled = item is not None and (not version_id or item.version_id == version_id)
        if result.outcome is not Outcome.SKIPPED and name not in self._running and settled:
            self._pending.pop(name, None)  # settled by the scanner or an admin heal
        if result.outcome not in (Outcome.HEALTHY, Outcome.GONE):
            level = logging.ERROR if result.outcome is Outcome.UNRECOVERABLE else logging.INFO
            log.log(level, "heal %s/%s%s: %s, %d shards rebuilt %s", bucket, key,
                    f" version {version_id}" if version_id else "", result.outcome.value,
                    result.shards, result.detail)  # fmt: skip
        return result

    async def _guarded(
        self, bucket: str, key: str, version: tuple[str, bool], *, dry_run: bool
    ) -> HealResult:
        try:
            version_id, and_current = version
            if not version_id or await self._current_id(bucket, key, version_id) == version_id:
                return await self._heal(bucket, key, "", dry_run=dry_run)
            older = await self._heal(bucket, key, version_id, dry_run=dry_run)
            if not and_current:
                return older
            return _worse(older, await self._heal(bucket, key, "", dry_run=dry_run))
        except errors.KVTierError as exc:
            return HealResult(Outcome.SKIPPED, detail=f"{type(exc).__name__}: {exc}")

    async def _current_id(self, bucket: str, key: str, version_id: str) -> str:
        """The S3 version id of the key's current version ("" when there is none; version_id
        when no version has the read quorum: healed as the current one, which says why)."""
        try:
            found = await self._engine.resolve(
                bucket, key, queue_heal=False, follow=False, markers=True
            )
        except errors.NotFound:
            return ""
        except errors.Unavailable:
            return version_id
        return objversions.version_id(found.meta)

    async def _heal(self, bucket: str, key: str, version_id: str, *, dry_run: bool) -> HealResult:
        """Heal the object's entry in pool 0 (version_id: that non-current S3 version) and,
        when that is a pool record, the object in its pool: the record's result when it is
        not done, else the object's."""
        try:
            found = await self._engine.resolve(
                bucket, key, queue_heal=False, follow=False, version_id=version_id, markers=True
            )
        except errors.NotFound:
            return HealResult(Outcome.GONE)
        except errors.Unavailable as exc:
            where = placement.locate(self._view.current, bucket, key, 0)
            return await self._unresolved(where, bucket, key, str(exc), version_id)
        record = await self._heal_version(found, version_id, dry_run=dry_run)
        if not found.meta.is_pointer or record.outcome not in (Outcome.HEALTHY, Outcome.HEALED):
            return record
        pool = found.meta.pool_pointer
        where = placement.locate(self._view.current, bucket, key, pool)
        try:
            target = await self._engine.resolve_in(
                where, bucket, key, queue_heal=False, version_id=version_id
            )
        except errors.NotFound:
            return HealResult(Outcome.UNRECOVERABLE, detail=f"pool {pool} lacks the object")
        except errors.Unavailable as exc:
            return await self._unresolved(where, bucket, key, str(exc), version_id)
        result = await self._heal_version(target, version_id, dry_run=dry_run)
        if result.outcome is Outcome.HEALTHY and record.outcome is Outcome.HEALED:
            return record
        return dataclasses.replace(result, shards=result.shards + record.shards)

    async def _heal_version(
        self, found: versions.Resolved, version_id: str, *, dry_run: bool
    ) -> HealResult:
        """Heal one version (version_id: a non-current one, probed and committed as such)."""
        meta, where = found.meta, found.where
        k = meta.data_shards
        drives = await self._rebuilder.probe(meta, where, version_id)
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
        written, failed = await self._rebuilder.rebuild(
            meta, drives, targets, noncurrent=bool(version_id)
        )
        if written < len(targets) or waiting:
            detail = f"{len(failed)} drives failed" if failed else "not every drive"
            return HealResult(Outcome.SKIPPED, shards=written, waiting_on=waiting, detail=detail)
        return HealResult(Outcome.HEALED, shards=written)

    async def _unresolved(
        self, where: placement.Placement, bucket: str, key: str, why: str, version_id: str = ""
    ) -> HealResult:
        """No version has the read quorum: unrecoverable when every drive answered and fewer
        than k metas are readable; else maybe later (drives down, commits in flight)."""

        async def read(slot: common_pb2.DriveSlot) -> str:
            try:
                await self._rebuilder.nodes.shards(slot.node_id).read_meta(
                    slot.drive_id, bucket, key, version_id
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
        item = self._pending.get(name)
        version_id = item.version_id if item is not None else ""
        try:
            # The version the report saw, and the current one when that is another: one
            # entry per key, so a later report of the current version may be folded in.
            result = await self.heal_object(*name, version_id=version_id, and_current=True)
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
        """Verify and heal up to scan_objects_per_cycle objects after the last position (in a
        versioned bucket each version counts: non-current ones and delete markers are healed
        too, in ListObjectVersions order); returns how many were looked at."""
        buckets = await self._front.storage_buckets()
        at_bucket, at_key, at_version = self._scan_at
        budget = self._scan_objects
        for bucket in (b for b in buckets if b >= at_bucket):
            after = (at_key, at_version) if bucket == at_bucket else ("", "")
            try:
                versioned = await self._versioned(bucket)
            except errors.Unavailable:  # its record unknown here now: current versions this time
                versioned = False
            page = self._versions_after if versioned else self._keys_after
            while budget > 0:
                items, after, more = await page(bucket, after, min(budget, 1000))
                async for (key, version), result in self._heal_each(bucket, items, dry_run=False):
                    if result.outcome is Outcome.SKIPPED:
                        intake = healqueue.Intake(f"scanner: {result.detail or 'skipped'}", version)
                        self.enqueue(bucket, key, result=result, intake=intake)
                budget -= len(items)
                if not more:
                    break
            if budget <= 0:
                self._scan_at = (bucket, *after)
                return self._scan_objects
        self._scan_at = ("", "", "")  # the end: the next cycle starts over
        return self._scan_objects - budget

    async def _keys_after(
        self, bucket: str, after: tuple[str, str], limit: int
    ) -> tuple[list[tuple[str, str]], tuple[str, str], bool]:
        """The scanner's next (key, "") items of bucket after (key, _): (items, the position
        after them, whether more follow)."""
        request = pb.ListObjectsRequest(bucket=bucket, start_after=after[0], max_keys=limit)
        page = await self._front.lister.list_objects(request)
        items = [(o.key, "") for o in page.objects]
        return items, (items[-1] if items else after), page.is_truncated

    async def _versions_after(
        self, bucket: str, after: tuple[str, str], limit: int
    ) -> tuple[list[tuple[str, str]], tuple[str, str], bool]:
        """As _keys_after, every version of a versioned bucket after (key, version id): the
        current one as (key, ""), another by its id."""
        listed = await self._front.version_lister.list_versions(
            bucket, key_marker=after[0], version_marker=after[1], max_keys=limit
        )
        items = [(e.key, "" if e.is_latest else e.version_id) for e in listed.versions]
        last = listed.versions[-1] if listed.versions else None
        position = (last.key, last.version_id) if last is not None else after
        return items, position, listed.is_truncated

    # Admin.

    async def heal_tree(
        self, bucket: str, prefix: str, *, dry_run: bool
    ) -> AsyncIterator[admin_pb2.HealProgress]:
        """Heal every object of bucket (every bucket when empty) under prefix, and every
        non-current version and delete marker of a versioned bucket's keys; progress now
        and then, and a last message with done set. NotFound when the bucket does not exist."""
        if bucket:
            buckets = [await self._front.storage_name(bucket)]
        else:
            buckets = await self._front.storage_buckets()
        progress = admin_pb2.HealProgress()
        sent = time.monotonic()
        for name in buckets:
            async for (key, version), result, size in self._tree(name, prefix, dry_run=dry_run):
                shown = f"{names.user_bucket(name)}/{key}"
                _tally(progress, f"{shown}?versionId={version}" if version else shown, result, size)
                if result.outcome is Outcome.SKIPPED and not dry_run:
                    why = f"admin heal: {result.detail or 'skipped'}"
                    self.enqueue(name, key, result=result, intake=healqueue.Intake(why, version))
                if time.monotonic() - sent >= _PROGRESS_EVERY_S:
                    sent = time.monotonic()
                    yield _copy(progress)
                    del progress.unrecoverable_keys[:]
        progress.done = True
        yield progress

    async def _tree(
        self, bucket: str, prefix: str, *, dry_run: bool
    ) -> AsyncIterator[tuple[tuple[str, str], HealResult, int]]:
        """((key, version id), result, size) of each object of bucket under prefix healed (its
        current version: no id), then of each other version (non-current, or a delete marker:
        a key whose current version is one is not listed above) when bucket keeps versions."""
        token = ""
        while True:
            request = pb.ListObjectsRequest(bucket=bucket, prefix=prefix, continuation_token=token)
            page = await self._front.lister.list_objects(request)
            sizes = {o.key: o.size for o in page.objects}
            items = [(o.key, "") for o in page.objects]
            async for item, result in self._heal_each(bucket, items, dry_run=dry_run):
                yield item, result, sizes[item[0]]
            if not page.is_truncated:
                break
            token = page.next_continuation_token
        if not await self._versioned(bucket):
            return
        key_marker = version_marker = latest = ""
        while True:
            listed = await self._front.version_lister.list_versions(
                bucket, prefix=prefix, key_marker=key_marker, version_marker=version_marker
            )
            older: dict[tuple[str, str], int] = {}
            for entry in listed.versions:  # by key, newest (the current version) first
                first, latest = entry.key != latest, entry.key
                if not first or entry.delete_marker:  # a current marker: not listed above
                    older[(entry.key, entry.version_id)] = entry.size
            async for item, result in self._heal_each(bucket, list(older), dry_run=dry_run):
                yield item, result, older[item]
            if not listed.is_truncated:
                return
            key_marker, version_marker = listed.next_key_marker, listed.next_version_marker

    async def _versioned(self, bucket: str) -> bool:
        """Whether bucket (a storage name) keeps non-current versions (versioning set)."""
        try:
            info = await self._front.bucket_info(names.user_bucket(bucket))
        except (errors.NotFound, errors.InvalidArgument):  # gone, or internal
            return False
        return bool(info.versioning.status) and front_mod.storage(info) == bucket

    async def _heal_each(
        self, bucket: str, items: Sequence[tuple[str, str]], *, dry_run: bool
    ) -> AsyncIterator[tuple[tuple[str, str], HealResult]]:
        """Heal (key, version id) items (no id: the current version), max_objects at a
        time; (item, result) as each finishes."""

        async def one(item: tuple[str, str]) -> tuple[tuple[str, str], HealResult]:
            key, version = item
            return item, await self.heal_object(bucket, key, version_id=version, dry_run=dry_run)

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            await self._cancel(tasks)


#: Outcomes from best to worst (`_worse`): SKIPPED last, so that what is left is retried.
_RANK = (Outcome.GONE, Outcome.HEALTHY, Outcome.HEALED, Outcome.UNRECOVERABLE, Outcome.SKIPPED)


def _worse(a: HealResult, b: HealResult) -> HealResult:
    """Two heals of one key as one result: the worse outcome, the shards of both."""
    worst = max(a, b, key=lambda r: _RANK.index(r.outcome))
    return dataclasses.replace(
        worst, shards=a.shards + b.shards, waiting_on=a.waiting_on | b.waiting_on
    )


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
