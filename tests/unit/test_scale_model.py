"""The scale model (bench/scale_model.py, docs/scaling.md) against direct counts on small inputs,
so that its numbers cannot silently drift from the code they model."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from bench import scale_load, scale_model
from kvtier import rendezvous
from kvtier.proto.common.v1 import common_pb2
from services.gateway import placement as object_placement
from services.metadata import placement

pytestmark = pytest.mark.timeout(60)


def test_joined_fraction_is_the_direct_count_of_moved_keys() -> None:
    ids = scale_model.kv_node_ids(11)
    nodes, new = ids[:10], ids[10]
    keys = scale_model.kv_keys(3000)
    moved_join = sum(
        rendezvous.owners(nodes, k) != rendezvous.owners([*nodes, new], k) for k in keys
    )
    assert scale_model.joined_fraction(nodes, new, keys) == moved_join / len(keys)
    # ~1/11 of the keys, within 4 standard deviations of a binomial draw.
    sd = (1 / 11 * 10 / 11 / len(keys)) ** 0.5
    assert abs(moved_join / len(keys) - 1 / 11) < 4 * sd


def test_direct_moves_counts_only_the_new_and_the_leaving_node() -> None:
    ids = scale_model.kv_node_ids(11)
    keys = scale_model.kv_keys(2000)
    counts = scale_model.direct_moves(ids[:10], ids[10], keys)
    owned_by_leaver = sum(rendezvous.owners(ids[:10], k)[0] == ids[0] for k in keys)
    assert counts["left"] == owned_by_leaver
    assert counts["stray"] == 0
    assert counts["joined"] == round(scale_model.joined_fraction(ids[:10], ids[10], keys) * 2000)
    # With two replicas a join still only inserts the new node into owner lists.
    assert scale_model.direct_moves(ids[:10], ids[10], keys[:500], replicas=2)["stray"] == 0


def test_map_is_the_reconciled_map_and_grows_linearly() -> None:
    sizes = {n: scale_model.measure_map(n)["map_bytes"] for n in (100, 200, 400)}
    shape = scale_model.Shape.of(200)
    assert shape.nodes == 200
    live = scale_model.live_nodes(shape)
    cmap = scale_model.build_map(live)
    assert len(cmap.nodes) == 200
    drives = sum(len(n.drives) for n in live.values())
    placed = sum(len(s.slots) for p in cmap.pools for s in p.sets) + len(cmap.pending_drives)
    assert placed == drives
    per_node_a = (sizes[200] - sizes[100]) / 100
    per_node_b = (sizes[400] - sizes[200]) / 200
    assert abs(per_node_a / per_node_b - 1) < 0.05


def test_the_map_crosses_etcds_limit_where_the_model_says() -> None:
    maps = [scale_model.measure_map(n) for n in (300, 600, 1000)]
    intercept, slope = scale_model.linear_fit(
        [float(m["nodes"]) for m in maps], [float(m["map_bytes"]) for m in maps]
    )
    limit = scale_load.ETCD_MAX_REQUEST_BYTES
    n = scale_model.crossing(intercept, slope, limit)
    assert intercept + slope * (n - 1) <= limit < intercept + slope * n
    above, below = scale_model.measure_map(n + 10), scale_model.measure_map(n - 10)
    assert below["map_bytes"] <= limit < above["map_bytes"]


def test_adding_a_pool_moves_no_object() -> None:
    result = scale_model.measure_objects(120, 2000)
    assert result["moved_on_pool_add"] == 0
    # ...while a changed set count would move most of them (why pools are immutable).
    sets = result["sets_per_pool"]
    assert abs(result["mod_change_moved"] - sets / (sets + 1)) < 0.05


def test_locate_in_a_pool_depends_only_on_that_pool() -> None:
    live = scale_model.live_nodes(scale_model.Shape.of(120))
    cmap = scale_model.build_map(live)
    emptied = common_pb2.ClusterMap()
    emptied.CopyFrom(cmap)
    del emptied.nodes[:]
    for bucket, key in scale_model.object_names(200):
        a = object_placement.locate(cmap, bucket, key, 1)
        b = object_placement.locate(emptied, bucket, key, 1)
        assert (a.set_index, a.positions) == (b.set_index, b.positions)


def test_change_cost_counts_every_watcher() -> None:
    p = scale_load.Params(lease_ttl_s=10, client_refresh_s=2, metadata_replicas=3)
    cost = scale_load.change_cost(nodes=10, map_bytes=1000, record_bytes=100, p=p)
    assert cost.watch_events == 3 + 10
    assert cost.watch_bytes == 3 * 100 + 10 * 1000
    # Replicas list 10 records and read the map; 2 losers re-read it; 10 nodes re-read it.
    assert cost.etcd_read_bytes == 3 * 10 * 100 + 5 * 1000 + 10 * 1000
    restart = scale_load.churn_load(scale_load.rolling_restart(10, 30.0), cost)
    assert restart.churn.changes == 20
    assert restart.total_egress_bytes == 20 * cost.egress_bytes
    # The quota crossing solves 2 N^2 b = 2 GiB.
    n = scale_load.quota_nodes(1000.0)
    assert 2 * n * n * 1000 <= scale_load.ETCD_DEFAULT_QUOTA_BYTES < 2 * (n + 1) ** 2 * 1000


def test_params_come_from_the_code() -> None:
    from kvtier import config, kv

    p = scale_load.Params.from_code()
    fields = {f.name: f.default for f in dataclasses.fields(config.ServiceConfig)}
    assert p.lease_ttl_s == fields["lease_ttl_s"]
    assert p.keepalive_period_s == pytest.approx(p.lease_ttl_s / 3)
    assert p.client_refresh_s == inspect.signature(kv.AsyncKVClient).parameters["refresh_s"].default
    assert placement.set_layout(scale_model.POLICY) == (16, 4)
