"""Which copy a drive kept past a DELETE the gateway removes when it goes back there
(services.gateway.deleteretry): only a stale one, never a newer or live write of the key."""

from __future__ import annotations

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import deleteretry, fanout, placement

BEGAN_NS = 1_000


def _partial(missed: tuple[int, ...] = (0, 1), if_data_id: str = "") -> deleteretry.PartialDelete:
    # 4+2: write quorum 4, so at most 2 drives miss a delete that succeeded.
    slots = tuple(common_pb2.DriveSlot(node_id=f"n{i // 2}", drive_id=f"d{i}") for i in range(6))
    where = placement.Placement(0, 0, 4, 2, slots, tuple(range(6)))
    return deleteretry.PartialDelete(where, "b", "k", "", if_data_id, BEGAN_NS, missed)


def _meta(data_id: str, stamp: int = BEGAN_NS - 10) -> datanode_pb2.ShardMeta:
    return datanode_pb2.ShardMeta(bucket="b", key="k", data_id=data_id, mtime_unix_ns=stamp)


def _gone() -> list[fanout.Answer]:
    return [errors.NotFound("none")] * 6


def test_a_copy_only_the_missed_drives_hold_is_stale() -> None:
    others = _gone()
    others[1] = _meta("old")  # the other drive that missed the delete holds it too
    assert deleteretry.stale(_partial(), 0, _meta("old"), others)


def test_a_copy_a_drive_that_took_the_delete_holds_is_live() -> None:
    others = _gone()
    others[4] = _meta("new")  # a newer PUT of the key that reached the missed drive as well
    assert not deleteretry.stale(_partial(), 0, _meta("new"), others)
    assert deleteretry.stale(_partial(), 0, _meta("old"), others)  # an older one still goes


def test_a_copy_stamped_after_the_delete_began_is_kept() -> None:
    assert not deleteretry.stale(_partial(), 0, _meta("new", BEGAN_NS + 1), _gone())


def test_a_conditional_delete_removes_only_the_version_it_named() -> None:
    assert deleteretry.stale(_partial(if_data_id="moved"), 0, _meta("moved"), _gone())
    assert not deleteretry.stale(_partial(if_data_id="moved"), 0, _meta("client"), _gone())


def test_too_few_answers_decide_nothing() -> None:
    # An acknowledged write is on 4 of 6 drives, at most 2 of them missed ones: 3 answers of
    # the 4 others must include it; 2 need not.
    others: list[fanout.Answer] = [errors.Unavailable("silent")] * 6
    others[2] = others[3] = errors.NotFound("none")
    assert not deleteretry._enough(_partial(), others)
    others[4] = _meta("x")
    assert deleteretry._enough(_partial(), others)
    others[4] = errors.Unavailable("silent")
    others[0] = others[1] = errors.NotFound("none")  # the missed drives do not count
    assert not deleteretry._enough(_partial(), others)
