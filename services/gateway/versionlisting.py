"""ListObjectVersions: every S3 version of a bucket's keys, merged from the sets' drives.

As `listing` does for current versions: each drive of each pool-0 set is asked for its sorted
versions (`ListShards` with `versions`: by key, newest first) after a (key, version id) marker;
a version counts when the set's read quorum of drives list it; the sets' streams are merged;
a delimiter folds keys into common prefixes. Versioned buckets keep every version in pool 0,
so pool 0 lists them all. Reads the drives' indexes only.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import logging

from kvtier import clustermap, errors, names
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import shards_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout, listing

log = logging.getLogger(__name__)

MAX_KEYS = listing.MAX_KEYS
Entry = shards_pb2.ShardEntry
Position = tuple[bytes, int, tuple[int, ...]]


def position(entry: Entry) -> Position:
    """Where a version sorts: by key bytes, then newest first (mtime, then data_id)."""
    return entry.key.encode(), -entry.mtime_unix_ns, (*(-b for b in entry.data_id.encode()), 1)


@dataclasses.dataclass(slots=True)
class VersionPage:
    """One page of ListObjectVersions (storage-level entries; the caller renders them)."""

    versions: list[Entry] = dataclasses.field(default_factory=list)
    common_prefixes: list[str] = dataclasses.field(default_factory=list)
    is_truncated: bool = False
    next_key_marker: str = ""
    next_version_marker: str = ""


class VersionLister:
    """Version listings of one gateway."""

    def __init__(self, view: clustermap.MapView, nodes: datanodes_mod.Datanodes) -> None:
        self._view = view
        self._nodes = nodes

    async def list_versions(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        key_marker: str = "",
        version_marker: str = "",
        max_keys: int = MAX_KEYS,
    ) -> VersionPage:
        """A page of bucket's versions (a storage name) after key_marker's version
        version_marker (empty: after key_marker's every version), S3's semantics."""
        names.check_storage_bucket(bucket)
        if not 0 <= max_keys <= MAX_KEYS:
            raise errors.InvalidArgument(f"max_keys must be 0..{MAX_KEYS}")
        page = VersionPage()
        key, version = key_marker, version_marker if key_marker else ""
        skipped = listing.past_folded(key, prefix, delimiter)
        if skipped != key:  # a marker inside a common prefix: resume after all of it
            key, version = skipped, ""
        if max_keys == 0:
            return page
        last: Position | None = None
        while True:
            batch, horizon = await self._merged(bucket, prefix, key, version, max_keys + 1)
            folded_away = False
            for entry in batch:
                if len(page.versions) + len(page.common_prefixes) == max_keys:
                    page.is_truncated = True
                    page.next_key_marker, page.next_version_marker = key, version
                    return page
                folded = listing.fold(entry.key, prefix, delimiter)
                if folded is not None:
                    page.common_prefixes.append(folded)
                    key, version = folded + "\U0010ffff", ""
                    folded_away = True
                    break
                page.versions.append(entry)
                key, version, last = entry.key, entry.version_id, position(entry)
            if folded_away:
                continue
            if horizon is None:
                return page
            if last is None or position(horizon) > last:
                # versions up to the horizon were all seen (some below quorum)
                key, version, last = horizon.key, horizon.version_id, position(horizon)

    async def _merged(
        self, bucket: str, prefix: str, key: str, version: str, limit: int
    ) -> tuple[list[Entry], Entry | None]:
        """Versions after the marker of every set, merged, and the horizon (None: complete;
        else the last version up to which the merge is complete)."""
        cmap = self._view.current
        pool = next((p for p in cmap.pools if p.index == 0), None)
        if pool is None:
            raise errors.Unavailable("no pool 0 is formed")
        answers = await asyncio.gather(
            *(self._set_versions(es, bucket, prefix, key, version, limit) for es in pool.sets)
        )
        horizons = [h for _, h in answers if h is not None]
        horizon = min(horizons, key=position) if horizons else None
        merged = list(heapq.merge(*(entries for entries, _ in answers), key=position))
        if horizon is None:
            return merged, None
        end = position(horizon)
        return [e for e in merged if position(e) <= end], horizon

    async def _set_versions(
        self, es: common_pb2.ErasureSet, bucket: str, prefix: str, key: str, version: str,
        limit: int,
    ) -> tuple[list[Entry], Entry | None]:  # fmt: skip
        async def drive(slot: common_pb2.DriveSlot) -> list[Entry]:
            return await self._nodes.shards(slot.node_id).list_shards(
                slot.drive_id, bucket, prefix, key, limit,
                versions=True, start_after_version=version,
            )  # fmt: skip

        quorum = es.data_shards
        answers = listing.answered(
            await fanout.each_drive("list_shards", self._nodes, es.slots, drive, quorum),
            f"listing versions of {bucket}", es.slots,
        )  # fmt: skip
        if len(answers) < quorum:
            raise errors.Unavailable(
                f"listing {bucket}: {len(answers)} drives of set {es.index} answered, "
                f"{quorum} needed"
            )
        full = [a[-1] for a in answers if len(a) >= limit]
        horizon = min(full, key=position) if full else None
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        first: dict[tuple[str, str], Entry] = {}
        latest: collections.Counter[tuple[str, str]] = collections.Counter()
        for answer in answers:
            for entry in answer:
                if horizon is not None and position(entry) > position(horizon):
                    break
                ident = (entry.key, entry.version_id)
                counts[ident] += 1
                latest[ident] += entry.is_latest
                first.setdefault(ident, entry)
        entries = []
        for ident, count in counts.items():
            if count >= quorum:
                entry = Entry()
                entry.CopyFrom(first[ident])
                entry.is_latest = latest[ident] * 2 > count  # most of its holders say so
                entries.append(entry)
        return sorted(entries, key=position), horizon
