"""A drive keeps a short stack of superseded versions per unversioned key (issue 16,
services.datanode.supersede): two concurrent failed overwrites B and C of a key whose
acknowledged version is V0 leave a drive that took both with C over [B, V0], and their undos
(DeleteShard if_data_id + restore_previous) bring V0 back in either order. The stack is bounded
(MAX_KEPT) and each kept version is reclaimed by its own age."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors
from services.datanode import shards, supersede
from tests.unit import test_shard_supersede as single
from tests.unit import test_shards as base

BUCKET, KEY, MIB = base.BUCKET, base.KEY, base.MIB
uput, undo, holds = single.uput, single.undo, single.holds


@pytest.fixture
def drive_dir(tmp_path: Path) -> Path:
    return tmp_path / "drive"


@pytest.fixture
def store(drive_dir: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(drive_dir)
    yield opened
    opened.close()


def current_id(store: shards.ShardStore) -> str:
    return store.read_meta(BUCKET, KEY).data_id


@pytest.mark.parametrize("mode", ["small", "staged"])
@pytest.mark.parametrize("order", ["newer-first", "older-first", "older-first-restart"])
def test_two_failed_overwrites_undone_in_either_order_bring_v0_back(
    drive_dir: Path, mode: str, order: str
) -> None:
    """Before: the drive kept one superseded version, B's; V0 was gone from it once C
    committed, and the undos ended with the key removed (older-first) or B's undo found B not
    current and C's restored B, a version whose PUT failed (newer-first: then B's undo did)."""
    size = single.MODES[mode]
    store = base.open_store(drive_dir)
    v0_data = base.content("v0", size)
    v0 = uput(store, v0_data, mode)
    b = uput(store, base.content("b", size), mode)
    c = uput(store, base.content("c", size), mode)
    if order == "newer-first":
        assert undo(store, c)  # C current: the newest kept version, B, comes back
        assert current_id(store) == b.data_id
        assert base.read_parts(store, KEY) == [base.content("b", size)]
        assert undo(store, b)
    else:
        assert not undo(store, b)  # B is not current: only its kept copy goes, C stays
        assert current_id(store) == c.data_id
        assert base.read_parts(store, KEY) == [base.content("c", size)]
        assert not undo(store, b)  # again: nothing left of it
        if order == "older-first-restart":
            store.close()
            store = base.open_store(drive_dir)
        assert undo(store, c)
    holds(store, v0, v0_data)
    store.close()


def test_an_undo_never_removes_a_newer_acknowledged_version(store: shards.ShardStore) -> None:
    """An undo of B after C replaced it and was acknowledged: C stays, and so does the stack
    below B (a later undo of C, were C to fail, would still find V0)."""
    v0 = uput(store, base.content("v0", MIB), "staged")
    b = uput(store, base.content("b", MIB + 1), "staged")
    c_data = base.content("c", MIB + 2)
    c = uput(store, c_data, "staged")
    assert not undo(store, b)
    assert current_id(store) == c.data_id
    assert base.read_parts(store, KEY) == [c_data]
    assert store.verify(BUCKET, KEY) == []
    directory = base.object_dir(store.drive.path, KEY)
    assert sorted(os.listdir(directory)) == sorted(["meta", "meta.prev", v0.data_id, c.data_id])
    assert store.reclaim_superseded(0) == 1
    holds(store, c, c_data)


def test_the_stack_is_bounded(store: shards.ShardStore) -> None:
    """Six versions: the four before the current one are kept (their metas and data dirs), the
    oldest is gone; undos walk back through the kept ones, and past the last the key is removed
    (as before)."""
    assert supersede.MAX_KEPT == 4
    datas = [base.content(f"v{n}", MIB + n) for n in range(6)]
    written = [uput(store, data, "staged") for data in datas]
    directory = base.object_dir(store.drive.path, KEY)
    assert sorted(os.listdir(directory)) == sorted(
        ["meta", *supersede.PREV_FILES, *(m.data_id for m in written[1:])]
    )
    for n in range(5, 1, -1):  # undoing V5 .. V2 brings back V4 .. V1
        assert undo(store, written[n])
        assert current_id(store) == written[n - 1].data_id
        assert base.read_parts(store, KEY) == [datas[n - 1]]
    holds(store, written[1], datas[1])  # nothing kept any more
    assert undo(store, written[1])  # V0 was not kept: the key is removed
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    assert not directory.exists()


def test_each_kept_version_is_reclaimed_by_its_own_age(store: shards.ShardStore) -> None:
    """A superseded 0.3 s earlier than the next one: a reclaim of what is older than 0.15 s
    takes A's copy and keeps B's, which an undo of C still brings back."""
    a = uput(store, base.content("a", MIB), "staged")
    b_data = base.content("b", MIB + 1)
    b = uput(store, b_data, "staged")  # A superseded now
    time.sleep(0.3)
    c = uput(store, base.content("c", MIB + 2), "staged")  # B superseded now
    assert store.reclaim_superseded(0.15) == 1
    directory = base.object_dir(store.drive.path, KEY)
    assert sorted(os.listdir(directory)) == sorted(["meta", "meta.prev", b.data_id, c.data_id])
    assert a.data_id not in os.listdir(directory)
    assert store.reclaim_superseded(3600) == 0
    assert undo(store, c)
    holds(store, b, b_data)


def test_a_restart_finds_every_kept_version_to_reclaim(drive_dir: Path) -> None:
    """Three kept versions (and a gap a crash while they moved would leave) survive a restart,
    aged from the open, then all go with the mark."""
    store = base.open_store(drive_dir)
    written = [uput(store, base.content(f"v{n}", MIB + n), "staged") for n in range(4)]
    store.close()
    directory = base.object_dir(drive_dir, KEY)
    os.rename(directory / "meta.prev.2", directory / "meta.prev.3")  # V0 moved, V1 not yet
    store = base.open_store(drive_dir)
    assert store.reclaim_superseded(3600) == 0
    assert undo(store, written[3])  # the newest kept one comes back, the rest move up
    assert current_id(store) == written[2].data_id
    assert sorted(os.listdir(directory)) == sorted(
        ["meta", "meta.prev", "meta.prev.1", *(m.data_id for m in written[:3])]
    )
    assert store.reclaim_superseded(0) == 1
    holds(store, written[2], base.content("v2", MIB + 2))
    store.close()
