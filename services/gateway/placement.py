"""Where an object's shards live: pure functions of the cluster map (no I/O, no grpc).

- set: `blake2b(bucket/key, key=deployment_id) mod sets(pool)`. Keyed like MinIO's SipHash, so
  nobody who lacks the deployment id can pick keys that pile onto one set.
- shard order: shard i of the object goes to slot `(start + i) mod n` of its set, `start` from
  the same hash: per object a different rotation, so parity and data load spread over the drives.
- pool: a new object goes to an active pool drawn at random, weighted by free space (a draining
  or retired pool gets nothing new). Objects in a pool
  other than 0 leave a *pool record* where they would live in pool 0, so a read asks pool 0's set
  first (one round trip with one pool) and follows the record (two), never asking every pool.
- quorum: write quorum k (k + 1 when k == m, so two disjoint halves can never both succeed),
  read quorum k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Mapping, Sequence

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2

#: The pool that holds every object's entry (the object itself, or its pool record).
FIRST_POOL = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """The drives of one object, in shard order (slots[i] holds shard i)."""

    pool_index: int
    set_index: int
    data_shards: int
    parity_shards: int
    slots: tuple[common_pb2.DriveSlot, ...]
    #: positions[i]: the slot position in the erasure set of shard i (kept in every shard's meta).
    positions: tuple[int, ...]

    @property
    def write_quorum(self) -> int:
        """Shards that must be written for a PUT to succeed."""
        return write_quorum(self.data_shards, self.parity_shards)

    @property
    def read_quorum(self) -> int:
        """Shards (metadata copies) that must agree for a read."""
        return self.data_shards


def object_hash(deployment_id: str, bucket: str, key: str) -> int:
    """The placement hash of bucket/key for this deployment (64 bits)."""
    if not deployment_id:
        raise errors.Unavailable("the cluster map has no deployment id yet")
    digest = hashlib.blake2b(
        f"{bucket}/{key}".encode(), digest_size=8, key=deployment_id.encode()[:64]
    ).digest()
    return int.from_bytes(digest, "little")


def write_quorum(data_shards: int, parity_shards: int) -> int:
    """k, or k + 1 when k == m."""
    return data_shards + 1 if data_shards == parity_shards else data_shards


def locate(cmap: common_pb2.ClusterMap, bucket: str, key: str, pool_index: int = 0) -> Placement:
    """The set and shard order of bucket/key in a pool. Raises Unavailable when the pool does
    not exist (no pool formed yet, or a record naming a pool this map lacks)."""
    pool = next((p for p in cmap.pools if p.index == pool_index), None)
    if pool is None or not pool.sets:
        raise errors.Unavailable(f"no pool {pool_index} in cluster map epoch {cmap.epoch}")
    if pool.state == common_pb2.POOL_STATE_RETIRED:
        raise errors.Unavailable(f"pool {pool_index} is retired")
    h = object_hash(cmap.deployment_id, bucket, key)
    sets = sorted(pool.sets, key=lambda s: s.index)
    es = sets[h % len(sets)]
    n = len(es.slots)
    start = (h >> 32) % n
    positions = tuple((start + i) % n for i in range(n))
    return Placement(
        pool_index=pool.index,
        set_index=es.index,
        data_shards=es.data_shards,
        parity_shards=es.parity_shards,
        slots=tuple(es.slots[p] for p in positions),
        positions=positions,
    )


def choose_pool(
    cmap: common_pb2.ClusterMap, free_bytes: Mapping[int, int], rng: random.Random | None = None
) -> int:
    """The pool a new object goes to: random among the active pools (never one draining or
    retired), weighted by each pool's free bytes.

    `free_bytes` maps pool index to free bytes (pools missing from it count as empty). With one
    pool, or no free-space figures at all, the answer is the first pool.
    """
    indices = sorted(p.index for p in cmap.pools if p.state == common_pb2.POOL_STATE_ACTIVE)
    if not indices:
        raise errors.Unavailable("no active pool is formed yet")
    weights = [max(0, free_bytes.get(i, 0)) for i in indices]
    if len(indices) == 1 or not any(weights):
        return indices[0]
    return (rng or random).choices(indices, weights=weights)[0]


def pool_free_bytes(cmap: common_pb2.ClusterMap, drive_free: Mapping[str, int]) -> dict[int, int]:
    """Usable free bytes per pool: for each set, the smallest free drive times its data shards
    (a stripe needs room on every drive), summed over the pool's sets."""
    result: dict[int, int] = {}
    for pool in cmap.pools:
        total = 0
        for es in pool.sets:
            frees = [drive_free.get(s.drive_id, 0) for s in es.slots]
            total += (min(frees) if frees else 0) * es.data_shards
        result[pool.index] = total
    return result


def online(slots: Sequence[common_pb2.DriveSlot]) -> list[bool]:
    """Which slots the map says are online."""
    return [s.state == common_pb2.DRIVE_STATE_ONLINE for s in slots]
