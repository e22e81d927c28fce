"""Object placement: deterministic, spread over sets and rotations, quorum rules, pool choice."""

from __future__ import annotations

import collections
import random

import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from services.gateway import placement


def _map(
    pools: list[tuple[int, int, int, int]], deployment: str = "dep-1"
) -> common_pb2.ClusterMap:
    """pools: (sets, drives per set, data, parity) each."""
    cmap = common_pb2.ClusterMap(epoch=3, deployment_id=deployment)
    for p, (nsets, n, k, m) in enumerate(pools):
        pool = cmap.pools.add(index=p)
        for s in range(nsets):
            es = pool.sets.add(index=s, data_shards=k, parity_shards=m)
            for d in range(n):
                es.slots.add(
                    drive_id=f"p{p}s{s}d{d}", node_id=f"n{d}", state=common_pb2.DRIVE_STATE_ONLINE
                )
    return cmap


def test_locate_is_deterministic_and_every_shard_gets_its_own_drive() -> None:
    cmap = _map([(4, 12, 8, 4)])
    a = placement.locate(cmap, "models", "llama/weights-00001.safetensors")
    b = placement.locate(cmap, "models", "llama/weights-00001.safetensors")
    assert a == b
    assert len({s.drive_id for s in a.slots}) == 12
    assert sorted(a.positions) == list(range(12))
    assert (a.data_shards, a.parity_shards, a.read_quorum, a.write_quorum) == (8, 4, 8, 8)


def test_objects_spread_over_sets_and_rotations() -> None:
    cmap = _map([(4, 8, 4, 4)])
    sets: collections.Counter[int] = collections.Counter()
    starts: collections.Counter[int] = collections.Counter()
    for i in range(4000):
        p = placement.locate(cmap, "b", f"key-{i}")
        sets[p.set_index] += 1
        starts[p.positions[0]] += 1
    assert all(abs(c - 1000) < 120 for c in sets.values()), sets
    assert len(starts) == 8
    assert all(abs(c - 500) < 100 for c in starts.values()), starts


def test_the_deployment_id_keys_the_hash() -> None:
    one, two = _map([(16, 4, 2, 2)], "dep-a"), _map([(16, 4, 2, 2)], "dep-b")
    keys = [f"k{i}" for i in range(200)]
    same = sum(
        placement.locate(one, "b", k).set_index == placement.locate(two, "b", k).set_index
        for k in keys
    )
    assert same < 40  # ~1/16 expected by chance


def test_write_quorum_takes_one_more_when_data_equals_parity() -> None:
    assert placement.write_quorum(8, 4) == 8
    assert placement.write_quorum(2, 2) == 3
    assert placement.write_quorum(1, 0) == 1


def test_missing_pools_and_deployment_are_unavailable() -> None:
    with pytest.raises(errors.Unavailable):
        placement.locate(common_pb2.ClusterMap(deployment_id="d"), "b", "k")
    with pytest.raises(errors.Unavailable):
        placement.locate(_map([(1, 4, 2, 2)]), "b", "k", pool_index=3)
    with pytest.raises(errors.Unavailable):
        placement.locate(_map([(1, 4, 2, 2)], deployment=""), "b", "k")


def test_pool_choice_follows_free_space() -> None:
    cmap = _map([(1, 4, 2, 2), (1, 4, 2, 2)])
    rng = random.Random(7)
    picks = collections.Counter(
        placement.choose_pool(cmap, {0: 100, 1: 300}, rng) for _ in range(4000)
    )
    assert 0.7 < picks[1] / 4000 < 0.8
    assert placement.choose_pool(cmap, {0: 0, 1: 0}, rng) == 0
    assert placement.choose_pool(_map([(1, 4, 2, 2)]), {}, rng) == 0
    free = placement.pool_free_bytes(cmap, {"p0s0d0": 10, "p0s0d1": 50, "p0s0d2": 50, "p0s0d3": 50})
    assert free == {0: 20, 1: 0}  # the fullest drive bounds a set: 10 B x 2 data shards
