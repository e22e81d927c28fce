"""Which conditional writes the drives hold atomically, and the error of one they refused
(services/gateway/conditional.py, issue 14): a set of pool 0 whose datanodes all advertise
datanode.conditional-commit, else the gateway checks and then writes; a refused commit is 412
when more drives refused it than took it, else 409 ConditionalRequestConflict."""

from __future__ import annotations

import pytest

from kvtier import errors, features
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import conditional, placement
from services.gateway.s3 import s3errors


def _cmap(*older: str, pools: int = 1) -> common_pb2.ClusterMap:
    """Nodes a, b, c (those in older advertising nothing) and pools 0..pools-1."""
    cmap = common_pb2.ClusterMap(epoch=1)
    for node in ("a", "b", "c"):
        kind = [] if node in older else [features.DATANODE_CONDITIONAL_COMMIT]
        cmap.nodes.add(node_id=node, features=kind)
    for index in range(pools):
        cmap.pools.add(index=index)
    return cmap


SLOTS = (*(common_pb2.DriveSlot(node_id=n, drive_id=f"{n}-0") for n in ("a", "b", "c")),)


def _where(slots: tuple[common_pb2.DriveSlot, ...] = SLOTS, pool: int = 0) -> placement.Placement:
    return placement.Placement(pool, 0, 2, 1, slots, tuple(range(len(slots))))


def test_atomic_only_in_pool_0_of_current_datanodes() -> None:
    assert conditional.atomic(_cmap(), _where())
    assert conditional.atomic(_cmap(pools=2), _where())  # pool 0 holds every key's entry
    assert not conditional.atomic(_cmap(pools=2), _where(pool=1))  # (an upload placed there)
    assert not conditional.atomic(_cmap("b"), _where())  # an older build: it would ignore it
    gone = (*SLOTS, common_pb2.DriveSlot(node_id="gone", drive_id="gone-0"))
    assert not conditional.atomic(_cmap(), _where(gone))  # not in the map: nothing says it does


def test_the_check_before_the_write() -> None:
    held = datanode_pb2.ShardMeta(bucket="b", key="k", etag="abc", data_id="d1")
    conditional.check("b", "k", None, absent=True, if_match="")
    with pytest.raises(errors.PreconditionFailed):
        conditional.check("b", "k", held, absent=True, if_match="")
    with pytest.raises(errors.NotFound):
        conditional.check("b", "k", None, absent=False, if_match='"abc"')
    with pytest.raises(errors.PreconditionFailed):
        conditional.check("b", "k", held, absent=False, if_match='"other"')
    for value in ('"abc"', "abc", '"x", "abc"', "*", 'W/"abc"'):
        conditional.check("b", "k", held, absent=False, if_match=value)
    meta = datanode_pb2.ShardMeta(bucket="b", key="k", data_id="new")
    conditional.attach(meta, held, absent=False, if_match='"abc"')
    assert meta.commit_if_data_id == "d1"
    assert not meta.commit_if_absent
    assert conditional.conditional(meta)
    conditional.clear(meta)
    assert not conditional.conditional(meta)
    assert b"d1" not in meta.SerializeToString()


def test_a_refused_commit_is_412_or_a_conflict() -> None:
    meta = datanode_pb2.ShardMeta(bucket="b", key="k")
    failed = conditional.refusal(meta, took=1, refused=5)
    assert isinstance(failed, errors.PreconditionFailed)
    assert not failed.reason
    assert s3errors.from_domain(failed).status == 412
    split = conditional.refusal(meta, took=3, refused=3)
    assert split.reason == conditional.CONFLICT
    answer = s3errors.from_domain(split)
    assert (answer.code, answer.status) == ("ConditionalRequestConflict", 409)
