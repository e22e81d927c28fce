"""Unit tests of services.metadata.placement: set sizes, pool formation and map reconciliation."""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Iterable, Mapping

import pytest

from kvtier.proto.common.v1 import common_pb2
from services.metadata import placement

log = logging.getLogger(__name__)

ONLINE = common_pb2.DRIVE_STATE_ONLINE
OFFLINE = common_pb2.DRIVE_STATE_OFFLINE
POLICY_12 = placement.PlacementPolicy(pool_drives=12)


def datanode(node_id: str, drive_ids: Iterable[str]) -> common_pb2.NodeInfo:
    """A datanode announcement with the given drives."""
    return common_pb2.NodeInfo(
        node_id=node_id,
        role=common_pb2.NODE_ROLE_DATANODE,
        grpc_address=f"{node_id}.test:7000",
        drives=[
            common_pb2.Drive(
                drive_id=d, path=f"/drives/{d}", total_bytes=1 << 40, free_bytes=1 << 39
            )
            for d in drive_ids
        ],
    )


def other_node(node_id: str, role: common_pb2.NodeRole.ValueType) -> common_pb2.NodeInfo:
    """A non-datanode announcement (kvcache, gateway, metadata)."""
    return common_pb2.NodeInfo(node_id=node_id, role=role, grpc_address=f"{node_id}.test:7000")


def drive_ids(node_id: str, count: int) -> list[str]:
    return [f"{node_id}-d{i}" for i in range(count)]


def datanodes(count: int, drives_each: int, *, first: int = 1) -> dict[str, common_pb2.NodeInfo]:
    """`count` datanodes dn-01.. with `drives_each` drives, keyed by node id."""
    nodes = {}
    for n in range(first, first + count):
        node_id = f"dn-{n:02d}"
        nodes[node_id] = datanode(node_id, drive_ids(node_id, drives_each))
    return nodes


def step(
    current: common_pb2.ClusterMap,
    live: Mapping[str, common_pb2.NodeInfo],
    policy: placement.PlacementPolicy = POLICY_12,
) -> common_pb2.ClusterMap:
    """reconcile() that must report a change, checked to bump the epoch by exactly one."""
    new = placement.reconcile(current, live, policy)
    assert new is not None
    assert new.epoch == current.epoch + 1
    return new


def slot_states(cmap: common_pb2.ClusterMap) -> dict[str, common_pb2.DriveState.ValueType]:
    return {s.drive_id: s.state for p in cmap.pools for es in p.sets for s in es.slots}


def pools_shape(cmap: common_pb2.ClusterMap) -> list[bytes]:
    """The pools serialized with every slot state cleared: equal iff placement is unchanged."""
    shapes = []
    for pool in cmap.pools:
        copy = common_pb2.Pool()
        copy.CopyFrom(pool)
        for erasure_set in copy.sets:
            for slot in erasure_set.slots:
                slot.state = common_pb2.DRIVE_STATE_UNSPECIFIED
        shapes.append(copy.SerializeToString(deterministic=True))
    return shapes


def pending_ids(cmap: common_pb2.ClusterMap) -> set[str]:
    return {d.drive_id for d in cmap.pending_drives}


# --- set sizes and layouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool_drives", "expected"),
    [(12, 12), (16, 16), (32, 16), (24, 12), (6, 6), (3, 3), (1, 1), (4, 4), (48, 16), (30, 15)],
)
def test_choose_set_size_picks_largest_divisor(pool_drives: int, expected: int) -> None:
    assert placement.choose_set_size(pool_drives) == expected


@pytest.mark.parametrize("pool_drives", [17, 19, 23, 34])
def test_choose_set_size_rejects_pools_without_a_divisor(pool_drives: int) -> None:
    with pytest.raises(ValueError, match=str(pool_drives)):
        placement.choose_set_size(pool_drives)


@pytest.mark.parametrize(
    ("set_size", "parity"),
    [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 1),
        (4, 2),
        (5, 2),
        (6, 3),
        (7, 3),
        (8, 4),
        (12, 4),
        (16, 4),
    ],
)
def test_default_parity_table(set_size: int, parity: int) -> None:
    assert placement.default_parity(set_size) == parity


@pytest.mark.parametrize(
    ("policy", "layout"),
    [
        (placement.PlacementPolicy(pool_drives=12), (12, 4)),
        (placement.PlacementPolicy(pool_drives=12, set_drives=6), (6, 3)),
        (placement.PlacementPolicy(pool_drives=12, set_drives=4, parity_shards=1), (4, 1)),
        (placement.PlacementPolicy(pool_drives=12, parity_shards=6), (12, 6)),
        (placement.PlacementPolicy(pool_drives=12, parity_shards=0), (12, 0)),
        (placement.PlacementPolicy(pool_drives=1), (1, 0)),
    ],
)
def test_set_layout(policy: placement.PlacementPolicy, layout: tuple[int, int]) -> None:
    assert placement.set_layout(policy) == layout


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (placement.PlacementPolicy(pool_drives=12, parity_shards=7), "parity 7 exceeds half"),
        (placement.PlacementPolicy(pool_drives=4, set_drives=4, parity_shards=3), "parity 3"),
        (placement.PlacementPolicy(pool_drives=12, set_drives=5), "does not divide"),
        (placement.PlacementPolicy(pool_drives=12, set_drives=24), "does not divide"),
        (placement.PlacementPolicy(pool_drives=12, set_drives=-3), "does not divide"),
        (placement.PlacementPolicy(pool_drives=32, set_drives=32), "exceeds 16"),
        (placement.PlacementPolicy(pool_drives=17), "cannot be split"),
    ],
)
def test_set_layout_rejects_impossible_policies(
    policy: placement.PlacementPolicy, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        placement.set_layout(policy)


# --- reconcile ---------------------------------------------------------------------------------


def test_first_reconcile_creates_deployment_and_epoch_one() -> None:
    live = dict(reversed(list(datanodes(3, 2).items())))
    live["gw-1"] = other_node("gw-1", common_pb2.NODE_ROLE_GATEWAY)
    live["a-meta"] = other_node("a-meta", common_pb2.NODE_ROLE_METADATA)

    cmap = step(common_pb2.ClusterMap(), live)

    assert cmap.epoch == 1
    assert len(cmap.deployment_id) == 32
    assert [n.node_id for n in cmap.nodes] == ["a-meta", "dn-01", "dn-02", "dn-03", "gw-1"]
    assert list(cmap.pools) == []
    assert pending_ids(cmap) == {d for n in ("dn-01", "dn-02", "dn-03") for d in drive_ids(n, 2)}


def test_first_reconcile_with_no_nodes_still_creates_the_deployment() -> None:
    cmap = step(common_pb2.ClusterMap(), {})
    assert cmap.epoch == 1
    assert cmap.deployment_id
    assert placement.reconcile(cmap, {}, POLICY_12) is None


def test_deployment_id_is_kept_across_changes() -> None:
    first = step(common_pb2.ClusterMap(), datanodes(1, 2))
    second = step(first, datanodes(2, 2))
    assert second.deployment_id == first.deployment_id


def test_reconcile_does_not_mutate_its_input() -> None:
    current = step(common_pb2.ClusterMap(), datanodes(3, 2))
    before = current.SerializeToString(deterministic=True)
    step(current, datanodes(6, 2))
    assert current.SerializeToString(deterministic=True) == before


def test_drives_stay_pending_until_a_pool_worth_arrives() -> None:
    all_nodes = datanodes(6, 2)
    cmap = common_pb2.ClusterMap()
    for count in range(1, 6):
        live = dict(list(all_nodes.items())[:count])
        cmap = step(cmap, live)
        assert list(cmap.pools) == []
        assert len(cmap.pending_drives) == 2 * count
    cmap = step(cmap, all_nodes)

    assert list(cmap.pending_drives) == []
    assert len(cmap.pools) == 1
    pool = cmap.pools[0]
    assert pool.index == 0
    assert pool.formed_at_epoch == cmap.epoch == 6
    assert len(pool.sets) == 1
    erasure_set = pool.sets[0]
    assert (erasure_set.index, erasure_set.data_shards, erasure_set.parity_shards) == (0, 8, 4)
    assert len(erasure_set.slots) == 12
    assert all(s.state == ONLINE for s in erasure_set.slots)
    # Round-robin across nodes: slot i sits on node i mod 6.
    node_ids = sorted(all_nodes)
    assert [s.node_id for s in erasure_set.slots] == [node_ids[i % 6] for i in range(12)]
    assert {s.drive_id for s in erasure_set.slots} == {d for n in node_ids for d in drive_ids(n, 2)}
    for slot in erasure_set.slots:
        assert slot.drive_id.startswith(slot.node_id + "-")


def test_pool_with_smaller_sets_puts_one_drive_of_every_node_in_each_set() -> None:
    policy = placement.PlacementPolicy(pool_drives=12, set_drives=6)
    live = datanodes(6, 2)

    cmap = step(common_pb2.ClusterMap(), live, policy)

    (pool,) = cmap.pools
    assert [es.index for es in pool.sets] == [0, 1]
    for erasure_set in pool.sets:
        assert (erasure_set.data_shards, erasure_set.parity_shards) == (3, 3)
        assert sorted(s.node_id for s in erasure_set.slots) == sorted(live)
    placed = [s.drive_id for es in pool.sets for s in es.slots]
    assert sorted(placed) == sorted(d for n in live for d in drive_ids(n, 2))


def test_all_drives_at_once_form_the_pool_in_one_step() -> None:
    cmap = step(common_pb2.ClusterMap(), datanodes(6, 2))
    assert cmap.epoch == 1
    assert cmap.pools[0].formed_at_epoch == 1


def test_unchanged_input_returns_none() -> None:
    live = datanodes(6, 2)
    cmap = step(common_pb2.ClusterMap(), live)
    assert placement.reconcile(cmap, live, POLICY_12) is None
    assert placement.reconcile(cmap, dict(reversed(list(live.items()))), POLICY_12) is None


def test_leaving_node_keeps_its_slots_offline() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    without = {k: v for k, v in live.items() if k != "dn-03"}

    cmap = step(formed, without)

    assert [n.node_id for n in cmap.nodes] == sorted(without)
    assert pools_shape(cmap) == pools_shape(formed)
    states = slot_states(cmap)
    assert {d for d, st in states.items() if st == OFFLINE} == set(drive_ids("dn-03", 2))
    assert all(st == ONLINE for d, st in states.items() if not d.startswith("dn-03-"))
    assert list(cmap.pending_drives) == []
    assert placement.reconcile(cmap, without, POLICY_12) is None


def test_rejoining_node_with_same_drives_turns_its_slots_online() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    gone = step(formed, {k: v for k, v in live.items() if k != "dn-03"})

    back = step(gone, live)

    assert back.epoch == formed.epoch + 2
    assert all(st == ONLINE for st in slot_states(back).values())
    assert list(back.pending_drives) == []
    assert pools_shape(back) == pools_shape(formed)
    # Everything but the epoch is as it was before the node left.
    back.epoch = formed.epoch
    assert back == formed


def test_rejoining_node_with_new_drive_ids_leaves_old_slots_offline() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    reformatted = dict(live)
    reformatted["dn-03"] = datanode("dn-03", ["dn-03-new0", "dn-03-new1"])

    cmap = step(formed, reformatted)

    assert pools_shape(cmap) == pools_shape(formed)
    offline = {d for d, st in slot_states(cmap).items() if st == OFFLINE}
    assert offline == set(drive_ids("dn-03", 2))
    assert pending_ids(cmap) == {"dn-03-new0", "dn-03-new1"}


def test_drive_announced_by_another_node_is_offline_in_its_slot() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    moved = dict(live)
    moved["dn-01"] = datanode("dn-01", ["dn-01-d0"])
    moved["dn-02"] = datanode("dn-02", [*drive_ids("dn-02", 2), "dn-01-d1"])

    cmap = step(formed, moved)

    assert slot_states(cmap)["dn-01-d1"] == OFFLINE
    assert pending_ids(cmap) == set()
    assert pools_shape(cmap) == pools_shape(formed)


def test_new_node_drives_are_pending_and_never_move_existing_slots() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    grown = {**live, **datanodes(1, 2, first=7)}

    cmap = step(formed, grown)

    assert pending_ids(cmap) == set(drive_ids("dn-07", 2))
    assert {p.node_id for p in cmap.pending_drives} == {"dn-07"}
    assert [n.node_id for n in cmap.nodes] == sorted(grown)
    assert pools_shape(cmap) == pools_shape(formed)
    assert all(st == ONLINE for st in slot_states(cmap).values())


def test_new_node_joining_while_another_left_keeps_placement() -> None:
    live = datanodes(6, 2)
    formed = step(common_pb2.ClusterMap(), live)
    churned = {k: v for k, v in live.items() if k != "dn-05"} | datanodes(1, 2, first=7)

    cmap = step(formed, churned)

    assert pools_shape(cmap) == pools_shape(formed)
    assert pending_ids(cmap) == set(drive_ids("dn-07", 2))
    assert {d for d, st in slot_states(cmap).items() if st == OFFLINE} == set(drive_ids("dn-05", 2))


def test_second_pool_forms_from_new_nodes_only() -> None:
    first_six = datanodes(6, 2)
    cmap = step(common_pb2.ClusterMap(), first_six)
    formed = pools_shape(cmap)
    live = dict(first_six)
    for n in range(7, 13):
        live |= datanodes(1, 2, first=n)
        cmap = step(cmap, live)
        assert pools_shape(cmap)[:1] == formed

    assert len(cmap.pools) == 2
    second = cmap.pools[1]
    assert second.index == 1
    assert second.formed_at_epoch == cmap.epoch
    assert {s.node_id for es in second.sets for s in es.slots} == {
        f"dn-{n:02d}" for n in range(7, 13)
    }
    assert list(cmap.pending_drives) == []


def test_epochs_strictly_increase_over_a_sequence_of_changes() -> None:
    live = datanodes(6, 2)
    sequence: list[dict[str, common_pb2.NodeInfo]] = [
        dict(list(live.items())[:3]),
        live,
        {k: v for k, v in live.items() if k != "dn-02"},
        {**live, "kv-1": other_node("kv-1", common_pb2.NODE_ROLE_KVCACHE)},
        {**live, **datanodes(1, 2, first=7)},
        {},
        live,
    ]
    cmap = common_pb2.ClusterMap()
    epochs = []
    for members in sequence:
        cmap = step(cmap, members)
        epochs.append(cmap.epoch)
    assert epochs == list(range(1, len(sequence) + 1))


@pytest.mark.parametrize("role", [common_pb2.NODE_ROLE_KVCACHE, common_pb2.NODE_ROLE_GATEWAY])
def test_non_datanode_joining_changes_nodes_not_pools(
    role: common_pb2.NodeRole.ValueType,
) -> None:
    live = datanodes(7, 2)  # one pool plus two pending drives
    formed = step(common_pb2.ClusterMap(), live)
    # A non-datanode that (wrongly) announces drives must not have them placed either.
    joiner = other_node("kv-1", role)
    joiner.drives.append(common_pb2.Drive(drive_id="kv-1-d0", path="/x"))

    cmap = step(formed, {**live, "kv-1": joiner})

    assert "kv-1" in [n.node_id for n in cmap.nodes]
    assert list(cmap.pools) == list(formed.pools)
    assert list(cmap.pending_drives) == list(formed.pending_drives)
    assert placement.reconcile(cmap, {**live, "kv-1": joiner}, POLICY_12) is None


def test_pool_drives_zero_never_forms_pools() -> None:
    policy = placement.PlacementPolicy(pool_drives=0)
    cmap = step(common_pb2.ClusterMap(), datanodes(6, 2), policy)
    assert list(cmap.pools) == []
    assert len(cmap.pending_drives) == 12


def test_reconcile_reaches_a_fixed_point_in_one_call() -> None:
    live = datanodes(12, 2)  # 24 drives, two pools' worth, arriving in one watch event
    cmap = step(common_pb2.ClusterMap(), live)
    assert len(cmap.pending_drives) < POLICY_12.pool_drives
    assert placement.reconcile(cmap, live, POLICY_12) is None


def test_uneven_nodes_are_spread_evenly_over_sets() -> None:
    policy = placement.PlacementPolicy(pool_drives=12, set_drives=6)  # 3+3 sets
    live = {
        "dn-a": datanode("dn-a", drive_ids("dn-a", 6)),
        **{n: datanode(n, drive_ids(n, 2)) for n in ("dn-b", "dn-c", "dn-d")},
    }
    cmap = step(common_pb2.ClusterMap(), live, policy)
    (pool,) = cmap.pools
    crowded = []  # (set index, node id, drives of the node in the set) above an even share
    for erasure_set in pool.sets:
        per_node = collections.Counter(s.node_id for s in erasure_set.slots)
        for node_id, count in sorted(per_node.items()):
            if count > math.ceil(len(live[node_id].drives) / len(pool.sets)):
                crowded.append((erasure_set.index, node_id, count))
    # Today: set 1 holds 4 of dn-a's drives, so losing dn-a makes it unreadable (parity 3).
    assert crowded == []


# --- property: random membership churn ---------------------------------------------------------


def _universe(rng: random.Random) -> dict[str, common_pb2.NodeInfo]:
    nodes: dict[str, common_pb2.NodeInfo] = {}
    for n in range(1, 11):
        node_id = f"dn-{n:02d}"
        nodes[node_id] = datanode(node_id, drive_ids(node_id, rng.randint(1, 3)))
    nodes["kv-1"] = other_node("kv-1", common_pb2.NODE_ROLE_KVCACHE)
    nodes["gw-1"] = other_node("gw-1", common_pb2.NODE_ROLE_GATEWAY)
    return nodes


def _slot_ids(pool: common_pb2.Pool) -> list[list[tuple[str, str]]]:
    return [[(s.drive_id, s.node_id) for s in es.slots] for es in pool.sets]


def _check_map(
    cmap: common_pb2.ClusterMap, live: Mapping[str, common_pb2.NodeInfo], seed: int
) -> None:
    announced = {
        d.drive_id: n.node_id
        for n in live.values()
        if n.role == common_pb2.NODE_ROLE_DATANODE
        for d in n.drives
    }
    placed = [s for p in cmap.pools for es in p.sets for s in es.slots]
    placed_ids = [s.drive_id for s in placed]
    assert len(placed_ids) == len(set(placed_ids)), seed
    assert not pending_ids(cmap) & set(placed_ids), seed
    assert pending_ids(cmap) == set(announced) - set(placed_ids), seed
    for slot in placed:
        expected = ONLINE if announced.get(slot.drive_id) == slot.node_id else OFFLINE
        assert slot.state == expected, (seed, slot.drive_id)
    assert [n.node_id for n in cmap.nodes] == sorted(live), seed


@pytest.mark.parametrize("seed", range(8))
def test_random_churn_never_moves_formed_pools(seed: int) -> None:
    log.info("placement churn seed %d", seed)
    rng = random.Random(seed)
    universe = _universe(rng)
    policy = placement.PlacementPolicy(pool_drives=4)
    cmap = common_pb2.ClusterMap()
    live: dict[str, common_pb2.NodeInfo] = {}
    formed: dict[int, tuple[list[list[tuple[str, str]]], int]] = {}
    for _ in range(60):
        for node_id in rng.sample(sorted(universe), k=rng.choice([1, 1, 1, 2, 3])):
            if node_id in live:
                del live[node_id]
            else:
                live[node_id] = universe[node_id]
        new = placement.reconcile(cmap, live, policy)
        if new is None:
            _check_map(cmap, live, seed)
            continue
        assert new.epoch == cmap.epoch + 1, seed
        assert new.deployment_id, seed
        assert len(new.pools) >= len(cmap.pools), seed
        for pool in new.pools:
            ids = _slot_ids(pool)
            if pool.index in formed:
                assert (ids, pool.formed_at_epoch) == formed[pool.index], (seed, pool.index)
            else:
                assert pool.formed_at_epoch == new.epoch, seed
                formed[pool.index] = (ids, pool.formed_at_epoch)
        _check_map(new, live, seed)
        cmap = new
    assert formed, f"seed {seed} never formed a pool"
