"""Unit tests of pool states: services.metadata.placement.set_pool_state (the moves the map
allows) and services.gateway.placement.choose_pool (nothing new in a pool that is not ACTIVE)."""

from __future__ import annotations

import random

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from services.gateway import placement as gateway_placement
from services.gateway.s3 import server as s3_server
from services.metadata import placement

ACTIVE = common_pb2.POOL_STATE_ACTIVE
DRAINING = common_pb2.POOL_STATE_DRAINING
DRAINED = common_pb2.POOL_STATE_DRAINED
RETIRED = common_pb2.POOL_STATE_RETIRED


def _map(*states: common_pb2.PoolState.ValueType) -> common_pb2.ClusterMap:
    cmap = common_pb2.ClusterMap(epoch=7, deployment_id="d")
    for index, state in enumerate(states):
        slot = common_pb2.DriveSlot(
            drive_id=f"p{index}", node_id="n", state=common_pb2.DRIVE_STATE_ONLINE
        )
        erasure_set = common_pb2.ErasureSet(data_shards=1, slots=[slot])
        cmap.pools.add(index=index, state=state, sets=[erasure_set])
    return cmap


def test_a_pool_goes_draining_drained_retired_and_keeps_its_index() -> None:
    cmap = _map(ACTIVE, ACTIVE)
    for state in (DRAINING, DRAINED, RETIRED):
        new = placement.set_pool_state(cmap, 1, state)
        assert new is not None
        assert (new.epoch, new.pools[1].state) == (cmap.epoch + 1, state)
        assert [p.index for p in new.pools] == [0, 1]
        assert new.pools[1].sets == cmap.pools[1].sets  # the tombstone keeps its slots
        cmap = new
    assert placement.set_pool_state(cmap, 1, RETIRED) is None  # already: no change


@pytest.mark.parametrize(
    ("states", "index", "state"),
    [
        ((ACTIVE, ACTIVE), 0, DRAINING),  # pool 0 holds the pool records
        ((ACTIVE, ACTIVE), 1, RETIRED),  # not drained
        ((ACTIVE, ACTIVE), 1, DRAINED),  # a drain marks it drained, nothing else
        ((ACTIVE, RETIRED), 1, DRAINING),  # retired for good
        ((ACTIVE, RETIRED), 1, ACTIVE),
        ((ACTIVE, DRAINED), 1, ACTIVE),
    ],
)
def test_moves_the_map_refuses(
    states: tuple[common_pb2.PoolState.ValueType, ...],
    index: int,
    state: common_pb2.PoolState.ValueType,
) -> None:
    with pytest.raises(errors.PreconditionFailed):
        placement.set_pool_state(_map(*states), index, state)


def test_the_last_active_pool_cannot_be_drained_and_unknown_pools_are_not_found() -> None:
    cmap = _map(ACTIVE, ACTIVE, DRAINING)
    assert placement.set_pool_state(cmap, 2, ACTIVE) is not None  # a drain cancelled
    with pytest.raises(errors.NotFound):
        placement.set_pool_state(cmap, 5, DRAINING)


def test_reconcile_keeps_pool_states_and_says_how_many_drives_form_a_pool() -> None:
    cmap = _map(ACTIVE, RETIRED)
    live = {
        "n": common_pb2.NodeInfo(
            node_id="n",
            role=common_pb2.NODE_ROLE_DATANODE,
            drives=[common_pb2.Drive(drive_id=d) for d in ("p0", "p1", "x")],
        )
    }
    new = placement.reconcile(cmap, live, placement.PlacementPolicy(pool_drives=4))
    assert new is not None
    assert [p.state for p in new.pools] == [ACTIVE, RETIRED]
    assert new.pool_drives == 4
    # A retired pool's drives stay placed (under the same identity): only "x" is pending.
    assert [d.drive_id for d in new.pending_drives] == ["x"]


def test_new_objects_never_go_to_a_pool_that_is_not_active() -> None:
    cmap = _map(ACTIVE, DRAINING, ACTIVE, DRAINED, RETIRED)
    free = {i: 1 << 40 for i in range(5)}
    rng = random.Random(3)
    chosen = {gateway_placement.choose_pool(cmap, free, rng) for _ in range(200)}
    assert chosen == {0, 2}


def test_a_retired_pool_with_its_drives_gone_leaves_the_gateway_ready() -> None:
    """Retired pools are tombstones: their wiped drives stay OFFLINE in the map for good."""
    cmap = _map(ACTIVE, RETIRED)
    cmap.nodes.add(node_id="m", role=common_pb2.NODE_ROLE_METADATA)
    cmap.pools[1].sets[0].slots[0].state = common_pb2.DRIVE_STATE_OFFLINE
    assert s3_server._ready(cmap)
    cmap.pools[1].state = DRAINED  # not retired: its objects may still be read
    assert not s3_server._ready(cmap)
