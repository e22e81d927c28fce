"""Placement of drives into pools and erasure sets: the pure logic behind the cluster map.

Rules (see ARCHITECTURE.md, "Cluster map"):
- Pools are append-only. Once formed, a pool's erasure sets and their drive slots never change,
  so `hash(object) mod sets` of that pool keeps pointing at the same drives forever.
- A drive that is announced but not in any pool is pending. When `pool_drives` drives are
  pending, they form a new pool. A new node therefore never moves data already written.
- A node that leaves keeps its slots; they turn OFFLINE and ONLINE again when the same node
  announces the same drive ids (its identity and drives live on its disks).
- A pool takes pending drives round-robin across nodes, then deals them (grouped by node) into
  sets in turn, so each set holds an equal share of every node's drives: losing a node costs
  each set as few shards as possible.
- All pools that the pending drives allow are formed in one step.
- Every change bumps the epoch by one.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2

MIN_SET_DRIVES = 4
MAX_SET_DRIVES = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementPolicy:
    """How pending drives become a pool."""

    pool_drives: int
    set_drives: int = 0  # 0: the largest size in 4..16 that divides pool_drives
    parity_shards: int = -1  # -1: MinIO's default for the set size


def default_parity(set_size: int) -> int:
    """Parity shards by set size, as MinIO chooses them (no parity for a single drive)."""
    if set_size <= 1:
        return 0
    if set_size <= 3:
        return 1
    if set_size <= 5:
        return 2
    if set_size <= 7:
        return 3
    return 4


def choose_set_size(pool_drives: int) -> int:
    """The largest erasure-set size that divides pool_drives; ValueError when none does."""
    if pool_drives < MIN_SET_DRIVES:
        return pool_drives
    for size in range(MAX_SET_DRIVES, MIN_SET_DRIVES - 1, -1):
        if pool_drives % size == 0:
            return size
    raise ValueError(
        f"{pool_drives} drives cannot be split into equal erasure sets of "
        f"{MIN_SET_DRIVES}..{MAX_SET_DRIVES} drives"
    )


def set_layout(policy: PlacementPolicy) -> tuple[int, int]:
    """(set size, parity shards) for a pool under policy; ValueError when impossible."""
    size = policy.set_drives or choose_set_size(policy.pool_drives)
    if size < 1 or policy.pool_drives % size != 0:
        raise ValueError(f"set_drives {size} does not divide pool_drives {policy.pool_drives}")
    if size > MAX_SET_DRIVES:
        raise ValueError(f"set_drives {size} exceeds {MAX_SET_DRIVES}")
    parity = default_parity(size) if policy.parity_shards < 0 else policy.parity_shards
    if parity > size // 2:
        raise ValueError(f"parity {parity} exceeds half of the set size {size}")
    return size, parity


def _interleave(pending: list[common_pb2.PendingDrive]) -> list[common_pb2.PendingDrive]:
    """Order drives round-robin across nodes: n1.d0, n2.d0, ..., n1.d1, n2.d1, ..."""
    by_node: dict[str, list[common_pb2.PendingDrive]] = {}
    for drive in pending:
        by_node.setdefault(drive.node_id, []).append(drive)
    columns = [by_node[node] for node in sorted(by_node)]
    order: list[common_pb2.PendingDrive] = []
    for rank in range(max((len(c) for c in columns), default=0)):
        order.extend(column[rank] for column in columns if rank < len(column))
    return order


def _form_pool(
    index: int, drives: list[common_pb2.PendingDrive], policy: PlacementPolicy
) -> common_pb2.Pool:
    size, parity = set_layout(policy)
    set_count = len(drives) // size
    # Grouped by node, then dealt round-robin into sets: each set gets an equal share of every
    # node's drives (as equal as the counts allow), so losing one node costs each set the least.
    grouped = sorted(drives, key=lambda d: d.node_id)
    members_of: list[list[common_pb2.PendingDrive]] = [[] for _ in range(set_count)]
    for position, drive in enumerate(grouped):
        members_of[position % set_count].append(drive)
    pool = common_pb2.Pool(index=index)
    for set_index, members in enumerate(members_of):
        pool.sets.append(
            common_pb2.ErasureSet(
                index=set_index,
                data_shards=size - parity,
                parity_shards=parity,
                slots=[
                    common_pb2.DriveSlot(
                        drive_id=d.drive_id, node_id=d.node_id, state=common_pb2.DRIVE_STATE_ONLINE
                    )
                    for d in _interleave(members)
                ],
            )
        )
    return pool


def reconcile(
    current: common_pb2.ClusterMap,
    live: Mapping[str, common_pb2.NodeInfo],
    policy: PlacementPolicy,
) -> common_pb2.ClusterMap | None:
    """The next map given the live nodes, or None when nothing changed."""
    new = common_pb2.ClusterMap()
    new.CopyFrom(current)
    if not new.deployment_id:
        new.deployment_id = uuid.uuid4().hex
    del new.nodes[:]
    new.nodes.extend(live[node_id] for node_id in sorted(live))
    announced = {
        drive.drive_id: node.node_id
        for node in new.nodes
        if node.role == common_pb2.NODE_ROLE_DATANODE
        for drive in node.drives
    }
    placed: set[str] = set()
    for pool in new.pools:
        for erasure_set in pool.sets:
            for slot in erasure_set.slots:
                placed.add(slot.drive_id)
                online = announced.get(slot.drive_id) == slot.node_id
                slot.state = (
                    common_pb2.DRIVE_STATE_ONLINE if online else common_pb2.DRIVE_STATE_OFFLINE
                )
    pending = [
        common_pb2.PendingDrive(drive_id=drive_id, node_id=node_id)
        for drive_id, node_id in announced.items()
        if drive_id not in placed
    ]
    while policy.pool_drives > 0 and len(pending) >= policy.pool_drives:
        ordered = _interleave(pending)
        chosen, pending = ordered[: policy.pool_drives], ordered[policy.pool_drives :]
        pool = _form_pool(len(new.pools), chosen, policy)
        pool.formed_at_epoch = current.epoch + 1
        new.pools.append(pool)
    del new.pending_drives[:]
    new.pending_drives.extend(pending)
    new.pool_drives = max(0, policy.pool_drives)
    if new == current:
        return None
    new.epoch = current.epoch + 1
    return new


#: The moves between pool states (ARCHITECTURE.md, "Pool states"); a move to the state a pool
#: is already in is no change.
_POOL_MOVES = {
    (common_pb2.POOL_STATE_ACTIVE, common_pb2.POOL_STATE_DRAINING),
    (common_pb2.POOL_STATE_DRAINING, common_pb2.POOL_STATE_ACTIVE),
    (common_pb2.POOL_STATE_DRAINING, common_pb2.POOL_STATE_DRAINED),
    (common_pb2.POOL_STATE_DRAINED, common_pb2.POOL_STATE_RETIRED),
    (common_pb2.POOL_STATE_DRAINED, common_pb2.POOL_STATE_DRAINING),
}


def set_pool_state(
    current: common_pb2.ClusterMap, index: int, state: common_pb2.PoolState.ValueType
) -> common_pb2.ClusterMap | None:
    """The next map with pool `index` in `state`, or None when it is already there.

    NotFound for no such pool; PreconditionFailed for a move not in _POOL_MOVES, for pool 0
    (it holds every pool record and multipart upload record) and for draining the last
    active pool (its objects would have nowhere to go)."""
    pool = next((p for p in current.pools if p.index == index), None)
    if pool is None:
        raise errors.NotFound(f"no pool {index} in cluster map epoch {current.epoch}")
    if pool.state == state:
        return None
    name = common_pb2.PoolState.Name
    if index == 0:
        raise errors.PreconditionFailed(
            "pool 0 cannot be drained or removed: it holds every object's entry (pool records)"
        )
    if (pool.state, state) not in _POOL_MOVES:
        raise errors.PreconditionFailed(
            f"pool {index} is {name(pool.state)}: it cannot become {name(state)}"
        )
    active = [p for p in current.pools if p.state == common_pb2.POOL_STATE_ACTIVE]
    if state == common_pb2.POOL_STATE_DRAINING and active == [pool]:
        raise errors.PreconditionFailed(f"pool {index} is the last active pool")
    new = common_pb2.ClusterMap()
    new.CopyFrom(current)
    next(p for p in new.pools if p.index == index).state = state
    new.epoch = current.epoch + 1
    return new
