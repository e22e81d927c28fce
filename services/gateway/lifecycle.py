"""S3 lifecycle expiration: the rules of `BucketInfo.lifecycle`, what they match, when they
expire, and the gateway's background expirer for the erasure-coded tier.

**Rules** (`metadata_pb2.LifecycleRule`, written by PutBucketLifecycleConfiguration): an
enabled rule matches an object when its key starts with the prefix, it carries every tag of
the filter, and its size is above `object_size_greater_than` and below
`object_size_less_than` (each 0: no bound). It expires the object `expiration_days` days after
its last modification, rounded up to the next midnight UTC as S3 rounds (created 10:30 on the
15th with Days=3: gone from midnight starting the 19th), or from `expiration_date_unix_s` on;
and aborts multipart uploads `abort_incomplete_multipart_days` days after initiation (same
rounding; the prefix alone selects uploads: they have no size, and S3 refuses tag filters
there). When several rules match, the earliest expiry wins. A "day" is `day_s` seconds:
86400, smaller only to test rules (as Ceph RGW's rgw_lc_debug_interval).

**Where rules apply.** Erasure-coded buckets: the `Expirer` (below). KV buckets: the rule's
expiry becomes the blocks' TTL when the object is written (`kv_ttl_s`, used by the S3 PUT and
CompleteMultipartUpload on KV buckets), so the KV tier expires them itself; objects written
before the rule was set keep the TTL they had (none).

**The expirer.** Every `interval_s`, one pass over the buckets with enabled rules: list the
objects under each rule's prefix, HEAD those whose rules filter on tags (for the tags), delete
the expired ones through the object front's ordinary delete, and abort the multipart uploads
past their DaysAfterInitiation. It acts as the gateway itself (a service principal: every
tenant's buckets). Several gateways are safe: only the gateway the `leader` predicate names
runs a pass (the lowest gateway id of the map, `lowest_gateway`), and were two to run at once,
deletes and aborts are idempotent. Known gap: an object overwritten between the listing and
the delete is deleted although its new version is young (the window is one listing page).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import prometheus_client

from kvtier import clustermap, errors, principal
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod

log = logging.getLogger(__name__)

#: Seconds in a lifecycle day.
DAY_S = 86400.0
_PAGE = 1000

EXPIRED = prometheus_client.Counter(
    "kvtier_gateway_lifecycle_expired_objects_total",
    "Objects deleted by lifecycle expiration rules",
)
ABORTED = prometheus_client.Counter(
    "kvtier_gateway_lifecycle_aborted_uploads_total",
    "Multipart uploads aborted by lifecycle AbortIncompleteMultipartUpload rules",
)
FAILED = prometheus_client.Counter(
    "kvtier_gateway_lifecycle_failures_total",
    "Lifecycle deletes, aborts and bucket scans that failed (retried next pass)",
)
PASS_SECONDS = prometheus_client.Histogram(
    "kvtier_gateway_lifecycle_pass_seconds",
    "Duration of one lifecycle expiration pass over the buckets with rules",
    buckets=(0.01, 0.1, 1, 10, 60, 300, 1800, 7200),
)


# Rules.


def active(config: metadata_pb2.LifecycleConfiguration) -> list[metadata_pb2.LifecycleRule]:
    """The enabled rules of a configuration."""
    return [rule for rule in config.rules if rule.enabled]


def matches(rule: metadata_pb2.LifecycleRule, key: str, size: int, tags: Mapping[str, str]) -> bool:
    """Whether rule's filter selects an object (key, size in bytes, tags)."""
    if not key.startswith(rule.prefix):
        return False
    if rule.object_size_greater_than and not size > rule.object_size_greater_than:
        return False
    if rule.object_size_less_than and not size < rule.object_size_less_than:
        return False
    return all(tags.get(name) == value for name, value in rule.tags.items())


def after_days(start_s: float, days: int, day_s: float = DAY_S) -> float:
    """When something started at start_s (unix seconds) is `days` days old, rounded up to the
    next midnight UTC (the next multiple of day_s since the epoch) as S3 rounds."""
    return math.ceil((start_s + days * day_s) / day_s) * day_s


def expiry_s(
    rule: metadata_pb2.LifecycleRule, mtime_s: float, day_s: float = DAY_S
) -> float | None:
    """When rule expires an object last modified at mtime_s (unix seconds); None: never."""
    found = []
    if rule.expiration_days:
        found.append(after_days(mtime_s, rule.expiration_days, day_s))
    if rule.expiration_date_unix_s:
        found.append(float(rule.expiration_date_unix_s))
    return min(found) if found else None


def object_expiry_s(
    rules: Iterable[metadata_pb2.LifecycleRule],
    key: str,
    size: int,
    tags: Mapping[str, str],
    mtime_s: float,
    day_s: float = DAY_S,
) -> float | None:
    """The earliest expiry of an object among the enabled rules that match it; None: never."""
    found = [
        when
        for rule in rules
        if rule.enabled and matches(rule, key, size, tags)
        for when in [expiry_s(rule, mtime_s, day_s)]
        if when is not None
    ]
    return min(found) if found else None


def kv_ttl_s(
    config: metadata_pb2.LifecycleConfiguration,
    key: str,
    size: int,
    tags: Mapping[str, str],
    *,
    now_s: float,
    day_s: float = DAY_S,
) -> float | None:
    """The TTL of a KV object written now: seconds until the rules expire it (at least 1 s: an
    object a past Date already expires is gone a second after its PUT); None: no rule expires
    it."""
    when = object_expiry_s(config.rules, key, size, tags, now_s, day_s)
    return None if when is None else max(when - now_s, 1.0)


def _prefixes(rules: Sequence[metadata_pb2.LifecycleRule]) -> list[str]:
    """The fewest prefixes whose listings cover every rule's prefix (no object twice)."""
    kept: list[str] = []
    for prefix in sorted({rule.prefix for rule in rules}):
        if not any(prefix.startswith(k) for k in kept):
            kept.append(prefix)
    return kept


def lowest_gateway(view: clustermap.MapView, node_id: str) -> Callable[[], bool]:
    """A leader predicate: whether node_id is the lowest gateway id in the current map (a
    gateway missing from the map runs no pass)."""

    def leader() -> bool:
        ids = [n.node_id for n in view.current.nodes if n.role == common_pb2.NODE_ROLE_GATEWAY]
        return bool(ids) and min(ids) == node_id

    return leader


# The expirer.


@dataclasses.dataclass(slots=True)
class PassStats:
    """What one expiration pass did."""

    buckets: int = 0  # buckets with enabled rules, scanned
    objects: int = 0  # objects looked at
    expired: int = 0
    aborted: int = 0
    failures: int = 0


class Expirer:
    """Deletes expired objects and aborts stale multipart uploads of the erasure-coded buckets
    (see the module docstring). `clock` gives the time in unix seconds (tests inject one)."""

    def __init__(
        self,
        front: front_mod.ObjectFront,
        *,
        interval_s: float = 3600.0,
        day_s: float = DAY_S,
        clock: Callable[[], float] = time.time,
        identity: principal.Principal | None = None,
        leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._front = front
        self._interval_s = interval_s
        self._day_s = day_s
        self._clock = clock
        self._identity = identity or principal.service("gateway", "lifecycle")
        self._leader = leader

    async def run(self) -> None:
        """Every interval_s, one pass (0: off; gateways the leader predicate does not name
        skip theirs)."""
        if self._interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self._interval_s)
            if not self._leader():
                continue
            try:
                await self.run_pass()
            except Exception:  # boundary: the next pass tries again
                FAILED.inc()
                log.exception("lifecycle pass failed")

    async def run_pass(self) -> PassStats:
        """One pass over every bucket with enabled rules, as of clock(); returns its tally."""
        started = time.perf_counter()
        stats = PassStats()
        bound = principal.bind(self._identity)
        try:
            now_s = self._clock()
            for bucket in await self._front.list_buckets():
                try:
                    await self._bucket(bucket.name, now_s, stats)
                except errors.NotFound:  # deleted meanwhile
                    continue
                except errors.KVTierError as exc:  # unreachable drives...: next pass
                    stats.failures += 1
                    FAILED.inc()
                    log.warning("lifecycle: bucket %s: %s", bucket.name, exc)
        finally:
            principal.unbind(bound)
        elapsed = time.perf_counter() - started
        PASS_SECONDS.observe(elapsed)
        log.info(
            "lifecycle pass: %d buckets with rules, %d objects looked at, %d expired, "
            "%d uploads aborted, %d failures in %.2fs",
            stats.buckets, stats.objects, stats.expired, stats.aborted, stats.failures, elapsed,
        )  # fmt: skip
        return stats

    async def _bucket(self, name: str, now_s: float, stats: PassStats) -> None:
        info = await self._front.bucket_info(name, fresh=True)
        rules = active(info.lifecycle)
        if not rules or info.kind != metadata_pb2.BUCKET_KIND_OBJECTS:
            return  # KV buckets: the blocks' TTL expires them
        stats.buckets += 1
        expiring = [r for r in rules if r.expiration_days or r.expiration_date_unix_s]
        for prefix in _prefixes(expiring):
            await self._expire_objects(name, prefix, expiring, now_s, stats)
        aborting = [r for r in rules if r.abort_incomplete_multipart_days]
        for prefix in _prefixes(aborting):
            await self._abort_uploads(name, prefix, aborting, now_s, stats)

    async def _expire_objects(
        self,
        bucket: str,
        prefix: str,
        rules: Sequence[metadata_pb2.LifecycleRule],
        now_s: float,
        stats: PassStats,
    ) -> None:
        after = ""
        while True:
            page = await self._front.list_objects(
                pb.ListObjectsRequest(
                    bucket=bucket, prefix=prefix, start_after=after, max_keys=_PAGE
                )
            )
            for obj in page.objects:
                stats.objects += 1
                if await self._expired(bucket, obj, rules, now_s):
                    await self._delete(bucket, obj.key, stats)
            if not page.is_truncated or not page.objects:
                return
            after = page.objects[-1].key

    async def _expired(
        self,
        bucket: str,
        obj: pb.ObjectInfo,
        rules: Sequence[metadata_pb2.LifecycleRule],
        now_s: float,
    ) -> bool:
        """Whether a listed object is expired (HEAD for its tags only when a rule needs them)."""
        mtime_s = obj.mtime_unix_ms / 1000
        untagged = [r for r in rules if not r.tags]
        when = object_expiry_s(untagged, obj.key, obj.size, {}, mtime_s, self._day_s)
        if when is not None and when <= now_s:
            return True
        # Rules on tags whose prefix and sizes match (their own tags stand in for the object's).
        tagged = [r for r in rules if r.tags and matches(r, obj.key, obj.size, r.tags)]
        if not tagged:
            return False
        try:
            head = await self._front.head_object(bucket, obj.key)
        except errors.NotFound:
            return False
        tags = dict(head.headers.tags)
        when = object_expiry_s(
            tagged, obj.key, head.size, tags, head.mtime_unix_ms / 1000, self._day_s
        )
        return when is not None and when <= now_s

    async def _delete(self, bucket: str, key: str, stats: PassStats) -> None:
        try:
            await self._front.delete_object(bucket, key)
        except errors.NotFound:
            return
        except errors.KVTierError as exc:
            stats.failures += 1
            FAILED.inc()
            log.warning("lifecycle: deleting %s/%s: %s", bucket, key, exc)
            return
        stats.expired += 1
        EXPIRED.inc()

    async def _abort_uploads(
        self,
        bucket: str,
        prefix: str,
        rules: Sequence[metadata_pb2.LifecycleRule],
        now_s: float,
        stats: PassStats,
    ) -> None:
        key_marker = upload_marker = ""
        while True:
            page = await self._front.list_uploads(
                pb.ListMultipartUploadsRequest(
                    bucket=bucket, prefix=prefix, key_marker=key_marker,
                    upload_id_marker=upload_marker, max_uploads=_PAGE,
                )
            )  # fmt: skip
            for upload in page.uploads:
                if self._stale(upload, rules, now_s):
                    await self._abort(bucket, upload, stats)
            if not page.is_truncated or not page.next_key_marker:
                return
            key_marker, upload_marker = page.next_key_marker, page.next_upload_id_marker

    def _stale(
        self,
        upload: pb.MultipartUploadInfo,
        rules: Sequence[metadata_pb2.LifecycleRule],
        now_s: float,
    ) -> bool:
        started_s = upload.initiated_unix_ms / 1000
        return any(
            upload.key.startswith(r.prefix)
            and after_days(started_s, r.abort_incomplete_multipart_days, self._day_s) <= now_s
            for r in rules
        )

    async def _abort(self, bucket: str, upload: pb.MultipartUploadInfo, stats: PassStats) -> None:
        request = pb.AbortMultipartUploadRequest(
            bucket=bucket, key=upload.key, upload_id=upload.upload_id
        )
        try:
            await self._front.abort_multipart(request)
        except errors.NotFound:
            return
        except errors.KVTierError as exc:
            stats.failures += 1
            FAILED.inc()
            log.warning("lifecycle: aborting upload %s of %s: %s", upload.upload_id, bucket, exc)
            return
        stats.aborted += 1
        ABORTED.inc()
