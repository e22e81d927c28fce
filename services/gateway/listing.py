"""ListObjects without a central index: merge the sorted listings of every erasure set.

Every object has an entry (or, for objects of later pools, a pool record) in the drives of its
pool-0 set, so listing pool 0 lists everything. Each set's drives are asked for their sorted
entries after a marker (decided once the read quorum answered, a silent node left behind after
the straggler grace: fanout.each_drive); a key counts when at least the set's read quorum of
drives list it (a failed write that reached fewer drives stays hidden), shown as its newest
entry the read quorum lists; the sets' streams are merged in key
order; a delimiter folds keys into common prefixes. Listing reads only the drives' indexes,
never object data. The continuation token is the last key or prefix returned.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import heapq
import logging
from collections.abc import AsyncIterator, Sequence

from kvtier import clustermap, errors, names
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import shards_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout

log = logging.getLogger(__name__)

MAX_KEYS = 1000


def _token(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode()).decode()


def _marker(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("invalid continuation token") from None


class Lister:
    """Listings of one gateway."""

    def __init__(self, view: clustermap.MapView, nodes: datanodes_mod.Datanodes) -> None:
        self._view = view
        self._nodes = nodes

    @property
    def view(self) -> clustermap.MapView:
        return self._view

    @property
    def nodes(self) -> datanodes_mod.Datanodes:
        return self._nodes

    async def list_objects(self, req: pb.ListObjectsRequest) -> pb.ListObjectsResponse:
        """A page of bucket's objects (S3 ListObjectsV2 semantics); req.bucket is a storage
        name, the objects carry the user-facing one."""
        names.check_storage_bucket(req.bucket)
        shown = names.user_bucket(req.bucket)
        max_keys = req.max_keys or MAX_KEYS
        if not 1 <= max_keys <= MAX_KEYS:
            raise errors.InvalidArgument(f"max_keys must be 1..{MAX_KEYS}")
        if req.continuation_token:
            marker = _marker(req.continuation_token)
        else:
            marker = past_folded(req.start_after, req.prefix, req.delimiter)
        reply = pb.ListObjectsResponse()
        returned = 0
        while True:
            batch, horizon = await self._merged(req.bucket, req.prefix, marker, max_keys + 1)
            skipped = False
            for entry in batch:
                if entry.delete_marker:  # a versioned key whose current version is deleted
                    marker = entry.key
                    continue
                if returned == max_keys:  # one more exists: this page is full
                    reply.is_truncated = True
                    reply.next_continuation_token = _token(marker)
                    return reply
                folded = fold(entry.key, req.prefix, req.delimiter)
                returned += 1
                if folded is not None:
                    reply.common_prefixes.append(folded)
                    # Skip the rest of the prefix: every key under it sorts before this.
                    marker = folded + "\U0010ffff"
                    skipped = True
                    break
                marker = entry.key
                reply.objects.add(
                    bucket=shown, key=entry.key, size=entry.size, etag=entry.etag,
                    mtime_unix_ms=entry.mtime_unix_ns // 1_000_000, owner=entry.owner,
                )  # fmt: skip
            if skipped:
                continue
            if horizon is None:  # the listing is exhausted
                return reply
            if horizon.encode() > marker.encode():
                marker = horizon  # keys up to the horizon were all seen (some below quorum)

    async def scan(
        self, bucket: str, prefix: str, *, pool_index: int = 0, after: str = ""
    ) -> AsyncIterator[shards_pb2.ShardEntry]:
        """Every entry of bucket under prefix in one pool (default pool 0, which lists every
        object), in key order; for the gateway's internal buckets too."""
        while True:
            batch, horizon = await self._merged(bucket, prefix, after, MAX_KEYS, pool_index)
            for entry in batch:
                if not entry.delete_marker:
                    yield entry
                after = entry.key
            if horizon is None:
                return
            if horizon.encode() > after.encode():
                after = horizon

    async def _merged(
        self, bucket: str, prefix: str, after: str, limit: int, pool_index: int = 0
    ) -> tuple[list[shards_pb2.ShardEntry], str | None]:
        """Entries after `after` of every set, merged in key order, and the horizon: None when
        the listing is complete; else the key up to which it is (more may follow)."""
        cmap = self._view.current
        pool = next((p for p in cmap.pools if p.index == pool_index), None)
        if pool is None:
            raise errors.Unavailable(f"no pool {pool_index} is formed")
        answers = await asyncio.gather(
            *(self._set_entries(es, bucket, prefix, after, limit) for es in pool.sets)
        )
        horizons = [h for _, h in answers if h is not None]
        horizon = min(horizons, key=str.encode) if horizons else None
        merged = heapq.merge(*(entries for entries, _ in answers), key=lambda e: e.key.encode())
        if horizon is None:
            return list(merged), None
        return [e for e in merged if e.key.encode() <= horizon.encode()], horizon

    async def _set_entries(
        self, es: common_pb2.ErasureSet, bucket: str, prefix: str, after: str, limit: int
    ) -> tuple[list[shards_pb2.ShardEntry], str | None]:
        async def drive(slot: common_pb2.DriveSlot) -> list[shards_pb2.ShardEntry]:
            return await self._nodes.shards(slot.node_id).list_shards(
                slot.drive_id, bucket, prefix, after, limit
            )

        quorum = es.data_shards
        answers = answered(
            await fanout.each_drive("list_shards", self._nodes, es.slots, drive, quorum),
            f"listing {bucket}", es.slots,
        )  # fmt: skip
        if len(answers) < quorum:
            raise errors.Unavailable(
                f"listing {bucket}: {len(answers)} drives of set {es.index} answered, "
                f"{quorum} needed"
            )
        # A drive whose page is full may have more keys: only keys up to the smallest full
        # page's last key are known on every drive.
        full = [a[-1].key for a in answers if len(a) >= limit]
        horizon = min(full, key=str.encode) if full else None
        counts: collections.Counter[str] = collections.Counter()
        held: collections.Counter[bytes] = collections.Counter()
        seen: dict[str, list[shards_pb2.ShardEntry]] = collections.defaultdict(list)
        for answer in answers:
            for entry in answer:
                if horizon is not None and entry.key.encode() > horizon.encode():
                    break
                counts[entry.key] += 1
                held[entry.SerializeToString(deterministic=True)] += 1
                seen[entry.key].append(entry)
        entries = sorted(
            (_current(seen[k], held, quorum) for k, n in counts.items() if n >= quorum),
            key=lambda e: e.key.encode(),
        )
        return entries, horizon


def _current(
    entries: list[shards_pb2.ShardEntry], held: collections.Counter[bytes], quorum: int
) -> shards_pb2.ShardEntry:
    """Of a key's entries on the drives, the newest one the read quorum of drives list (as a
    GET resolves it): a version left on fewer drives (a delete of that version that missed
    them, a failed write not yet undone) does not shadow the current one; the newest of all
    when drives disagree so much that none has the quorum."""
    agreed = [e for e in entries if held[e.SerializeToString(deterministic=True)] >= quorum]
    return max(agreed or entries, key=lambda e: e.mtime_unix_ns)


def answered(
    answers: Sequence[list[shards_pb2.ShardEntry] | errors.KVTierError],
    what: str,
    slots: Sequence[common_pb2.DriveSlot],
) -> list[list[shards_pb2.ShardEntry]]:
    """The drives' listings that arrived (fanout.each_drive); the others are logged."""
    for slot, answer in zip(slots, answers, strict=True):
        if isinstance(answer, errors.KVTierError):
            log.info("%s on %s failed: %s", what, slot.drive_id, answer)
    return [a for a in answers if not isinstance(a, errors.KVTierError)]


def past_folded(marker: str, prefix: str, delimiter: str) -> str:
    """Where a listing after a client's marker starts: past the whole common prefix the
    marker falls under, so that a marker which is a common prefix (v1's NextMarker with a
    delimiter) or a key under one does not list that prefix again (S3's and RGW's paging)."""
    if not marker.startswith(prefix):
        return marker
    folded = fold(marker, prefix, delimiter)
    return marker if folded is None else folded + "\U0010ffff"


def fold(key: str, prefix: str, delimiter: str) -> str | None:
    """The common prefix key falls under, or None when it is listed itself."""
    if not delimiter:
        return None
    at = key.find(delimiter, len(prefix))
    return key[: at + len(delimiter)] if at >= 0 else None
