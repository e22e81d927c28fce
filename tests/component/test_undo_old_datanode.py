"""A gateway sends the undo of a failed commit (DeleteShard if_data_id + restore_previous) only
to datanodes that advertise they honour it (NodeInfo.features, kvtier.features; issue 16,
mixed-version rolling upgrade). An older datanode drops those fields and removes the key
outright, a newer write included: it gets no undo, the object is queued for healing instead.

The older datanode is played by datanode 0 of the in-process cluster registering without the
feature (this checkout's code otherwise): the test sees whether a DeleteShard reached it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors, etcdserver, features, membership, objects, service
from kvtier.proto.common.v1 import common_pb2
from services.datanode import __main__ as datanode_main
from services.datanode import shards
from services.gateway import conditional, placement
from tests.component import objects_cluster
from tests.component import test_skew_undo as skew

KIB, MIB = objects_cluster.KIB, objects_cluster.MIB
Cluster = objects_cluster.Cluster
drives_full = skew.drives_full


@pytest.fixture
async def first_datanode_old(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Cluster]:
    """The cluster, its datanode 0 (started first) advertising no features, as an older
    build registers."""
    real = datanode_main._advertise
    started: list[str] = []

    async def advertise(ctx: service.Context, info: common_pb2.NodeInfo) -> None:
        started.append(info.node_id)
        if len(started) > 1:
            await real(ctx, info)

    monkeypatch.setattr(datanode_main, "_advertise", advertise)
    async with objects_cluster.object_cluster(etcd, etcd_prefix, store, tmp_path) as cluster:
        assert started[0] == cluster.datanodes[0].spec.node_id
        yield cluster


async def test_an_older_datanode_gets_no_undo(
    first_datanode_old: Cluster, drives_full: Callable[[set[int]], None]
) -> None:
    """5 of 12 drives take an overwrite (write quorum 8), two of them on the older datanode:
    the PUT fails; the 3 newer drives restore the version before it, the older datanode's two
    are sent nothing and keep the failed version, the object is queued for healing, and GET
    reads the acknowledged version (on 10 drives). Before, the older datanode got the undo
    (DeleteShard with if_data_id and restore_previous), which an older build reads as "remove
    the key"."""
    cluster, engine = first_datanode_old, first_datanode_old.engine
    old = cluster.datanodes[0].spec.node_id
    advertised = {
        n.node_id
        for n in engine.view.current.nodes
        if features.DATANODE_CONDITIONAL_UNDO in n.features
    }
    assert advertised == {node.spec.node_id for node in cluster.datanodes[1:]}
    deletes: list[tuple[Any, ...]] = []
    for shard_store in getattr(cluster.datanodes[0].spec.loops[0], "__self__").stores.values():  # noqa: B009

        def spy(*args: Any, _real: Any = shard_store.delete, **kwargs: Any) -> bool:
            deletes.append((*args, kwargs))
            return bool(_real(*args, **kwargs))

        shard_store.delete = spy
    sizes = {"small": 4 * KIB, "staged": 2 * MIB + 3}
    stored = cluster.stored
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("mixed")
        for n, (key, size) in enumerate(sizes.items()):
            await client.put_object("mixed", key, objects_cluster.data(n, size))
        bucket = stored("mixed")
        for n, (key, size) in enumerate(sizes.items()):
            acked = {m.data_id for m in skew.key_metas(cluster, "mixed", key)}
            where = placement.locate(engine.view.current, bucket, key, 0)
            on_old = {i for i, slot in enumerate(where.slots) if slot.node_id == old}
            newer = [i for i in range(len(where.slots)) if i not in on_old][:3]
            assert len(on_old) == 2
            drives_full(set(range(len(where.slots))) - on_old - set(newer))
            with pytest.raises(errors.StorageFull):
                await client.put_object("mixed", key, objects_cluster.data(n + 10, size))
            drives_full(set())
            assert not [d for d in deletes if key in d], key  # no DeleteShard reached it
            on_old_drives = {
                shards.decode_meta(path.read_bytes(), str(path)).data_id
                for drive in cluster.drive_paths(0)
                for path in drive.glob(f"objects/{bucket}/*/*/meta")
                if shards.decode_meta(path.read_bytes(), str(path)).key == key
            }
            assert len(on_old_drives) == 1, key  # the failed version, on both its drives
            assert not on_old_drives & acked, key
            rest = {m.data_id for m in skew.key_metas(cluster, "mixed", key)} - on_old_drives
            assert rest == acked, key  # the newer drives restored it
            assert (bucket, key) in engine.heal_queue or cluster.healer.queued(bucket, key)
            assert await client.get_object("mixed", key) == objects_cluster.data(n, size), key


async def test_conditions_fall_back_to_a_check_with_an_older_datanode(
    first_datanode_old: Cluster,
) -> None:
    """A conditional write's commit goes as such only to a set whose datanodes all advertise
    datanode.conditional-commit (an older build would keep the fields and ignore them): with
    the older datanode in the set, the gateway checks and then writes, and the conditions still
    refuse what completed before."""
    atomic = conditional.CONDITIONAL.labels("atomic")
    checked = conditional.CONDITIONAL.labels("checked")
    before = (atomic._value.get(), checked._value.get())
    cluster = first_datanode_old
    async with await objects.AsyncObjectClient.connect(cluster.gateway.address) as client:
        await client.create_bucket("older-cond")
        first = await client.put_object("older-cond", "k", b"first", if_none_match=True)
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("older-cond", "k", b"second", if_none_match=True)
        with pytest.raises(errors.PreconditionFailed):
            await client.put_object("older-cond", "k", b"stale", if_match='"0123"')
        await client.put_object("older-cond", "k", b"second", if_match=first.etag)
        assert await client.get_object("older-cond", "k") == b"second"
    assert (atomic._value.get(), checked._value.get()) == (before[0], before[1] + 2)
