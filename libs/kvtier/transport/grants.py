"""Bookkeeping of a node's data plane that bounds what callers hold: ranges in use (grants,
revocable; transport leases), searchable by overlap, and open connections per identity. Pure
data structures, times in ms."""

from __future__ import annotations

import collections
import heapq

from kvtier import errors

#: Ranges are indexed by the 1 MiB buckets of their region they touch.
_BUCKET_SHIFT = 20


class RangeIndex:
    """Ranges of regions, each with an id, an owner and an end time (ms): added and removed in
    O(1) per MiB they span, forgotten once ended, and found by overlap looking only at ranges
    in the same MiBs.

    Memory is bounded by what was added within one lifetime: ended entries are dropped on
    every `add` (and by `expire`), removed ones at once.
    """

    def __init__(self) -> None:
        # id -> region, offset, length, until, owner
        self._live: dict[int, tuple[int, int, int, int, object]] = {}
        self._buckets: dict[tuple[int, int], set[int]] = {}  # (region, MiB) -> ids
        self._ends: list[tuple[int, int]] = []  # heap of (until, id)

    def add(
        self, item_id: int, region_id: int, offset: int, length: int, until_ms: int, now: int,
        owner: object = None,
    ) -> None:  # fmt: skip
        """Record a live range (those ended by now, in ms, are dropped first)."""
        if self._ends and self._ends[0][0] < now:
            self.expire(now)
        self._live[item_id] = (region_id, offset, length, until_ms, owner)
        buckets = self._buckets
        for bucket in _spanned(offset, length):
            ids = buckets.get((region_id, bucket))
            if ids is None:
                buckets[(region_id, bucket)] = {item_id}
            else:
                ids.add(item_id)
        heapq.heappush(self._ends, (until_ms, item_id))

    def is_live(self, item_id: int, now: int) -> bool:
        """Whether the range is recorded, not removed, and has not ended by now (ms)."""
        entry = self._live.get(item_id)
        return entry is not None and entry[3] >= now

    def remove(self, item_id: int) -> bool:
        """Forget a range now; False when it is unknown (ended, removed or never added)."""
        entry = self._live.pop(item_id, None)
        if entry is None:
            return False
        self._unindex(item_id, entry)
        if len(self._ends) > 2 * len(self._live) + 1024:  # entries of removed ranges pile up
            self._ends = [(e[3], i) for i, e in self._live.items()]
            heapq.heapify(self._ends)
        return True

    def remove_owner(self, owner: object) -> int:
        """Forget every range of owner; returns how many (a scan: for rare events)."""
        doomed = [i for i, e in self._live.items() if e[4] is owner]
        for item_id in doomed:
            self.remove(item_id)
        return len(doomed)

    def expire(self, now: int) -> int:
        """Forget ranges ended by now (ms); returns how many."""
        heap, dropped = self._ends, 0
        while heap and heap[0][0] < now:
            _, item_id = heapq.heappop(heap)
            entry = self._live.pop(item_id, None)
            if entry is not None:
                self._unindex(item_id, entry)
                dropped += 1
        return dropped

    def overlaps(self, region_id: int, offset: int, length: int, now: int) -> bool:
        """Whether a range live at now (ms) touches region[offset:offset+length]."""
        if length <= 0 or not self._live:
            return False
        end, live, buckets = offset + length, self._live, self._buckets
        for bucket in _spanned(offset, length):
            for item_id in buckets.get((region_id, bucket), ()):
                _, start, size, until, _ = live[item_id]
                if size and start < end and offset < start + size and until >= now:
                    return True
        return False

    def _unindex(self, item_id: int, entry: tuple[int, int, int, int, object]) -> None:
        region_id, offset, length = entry[0], entry[1], entry[2]
        buckets = self._buckets
        for bucket in _spanned(offset, length):
            ids = buckets[(region_id, bucket)]
            ids.discard(item_id)
            if not ids:
                del buckets[(region_id, bucket)]

    def __len__(self) -> int:
        return len(self._live)


def _spanned(offset: int, length: int) -> range:
    """The buckets a range touches (a zero-length range: the one its offset falls in)."""
    first = offset >> _BUCKET_SHIFT
    return range(first, ((offset + max(length, 1) - 1) >> _BUCKET_SHIFT) + 1)


class GrantTable(RangeIndex):
    """The live grants of an issuer (by grant id): revocable, forgotten once expired."""

    def revoke(self, grant_id: int) -> bool:
        """End a grant now; False when it had ended already (expired, revoked, never issued)."""
        return self.remove(grant_id)


def identity_of(principal: str) -> str:
    """Who a session principal belongs to: the principal without its random suffix
    (`tenant/access_key/1f2e...` -> `tenant/access_key`); the unit of per-principal bounds."""
    return principal.rpartition("/")[0] or principal


class ConnectionCounts:
    """Open data-plane connections per identity (`identity_of`), shared by a node's servers."""

    def __init__(self) -> None:
        self._open: collections.Counter[str] = collections.Counter()

    def admit(self, principal: str, limit: int) -> str:
        """Count one more connection of principal's identity and return the identity;
        Overloaded when it already has `limit` open."""
        who = identity_of(principal)
        if self._open[who] >= limit:
            raise errors.Overloaded(
                f"{who} already has {limit} data-plane connections to this node "
                "(dataplane_max_connections_per_principal)"
            )
        self._open[who] += 1
        return who

    def release(self, who: str) -> None:
        """A connection `admit` counted has closed."""
        self._open[who] -= 1
        if self._open[who] <= 0:
            del self._open[who]

    def count(self, principal: str) -> int:
        """Open connections of principal's identity."""
        return self._open.get(identity_of(principal), 0)
