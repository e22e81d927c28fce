"""A pool drain's conditional deletes (DeleteShard if_data_id) go only to datanodes that
advertise datanode.conditional-undo (kvtier.features; issue 16, mixed-version rolling upgrade):
an older build drops if_data_id and removes whatever version is current, a client's newer write
included. Its drives are skipped and keep the copy, and the drain says so in its progress."""

from __future__ import annotations

from typing import Any

from kvtier import features
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.gateway import objectpools, pooldrain


def _cmap() -> common_pb2.ClusterMap:
    cmap = common_pb2.ClusterMap(epoch=3)
    cmap.nodes.add(node_id="new", features=[features.DATANODE_CONDITIONAL_UNDO])
    cmap.nodes.add(node_id="old")  # an older build advertises nothing
    return cmap


def _slots() -> list[common_pb2.DriveSlot]:
    return [
        common_pb2.DriveSlot(node_id=node, drive_id=f"{node}-{n}")
        for n in range(2)
        for node in ("new", "old", "gone")
    ]


def test_only_datanodes_that_honour_the_condition_get_it() -> None:
    honours, older = objectpools.conditional_split(_cmap(), _slots())
    assert [s.drive_id for s in honours] == ["new-0", "new-1"]
    # Not in the map: nothing says it honours the condition either.
    assert [s.drive_id for s in older] == ["old-0", "gone-0", "old-1", "gone-1"]


class _Engine:
    """The engine's delete_in as the drain sees it: the drives it skipped as older."""

    def __init__(self, older: list[str]) -> None:
        self.older = older
        self.deletes: list[tuple[Any, ...]] = []

    async def delete_in(self, bucket: str, key: str, pool: int, *, if_data_id: str) -> list[str]:
        self.deletes.append((bucket, key, pool, if_data_id))
        return self.older


def _drainer(engine: _Engine) -> pooldrain.Drainer:
    front: Any = type("Front", (), {"engine": engine})()
    return pooldrain.Drainer(view=None, front=front)  # type: ignore[arg-type]


async def test_the_drain_reports_copies_kept_on_older_datanodes() -> None:
    engine = _Engine(["old-0", "old-1"])
    drainer = _drainer(engine)
    await drainer._delete_if("photos@1234", "cat.jpg", 1, "d1")
    assert engine.deletes == [("photos@1234", "cat.jpg", 1, "d1")]
    progress = admin_pb2.DrainProgress()
    drainer._note_kept(progress)
    assert progress.last_error == (
        "photos/cat.jpg in pool 1: drives old-0, old-1 are on older datanodes (no "
        "datanode.conditional-undo): the conditional delete skipped them, they keep the copy"
    )
    progress.last_error = ""
    drainer._note_kept(progress)  # said once
    assert not progress.last_error

    quiet = _drainer(_Engine([]))
    await quiet._delete_if("photos@1234", "dog.jpg", 1, "d2")
    quiet._note_kept(progress)
    assert not progress.last_error
