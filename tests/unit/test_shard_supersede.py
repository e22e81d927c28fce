"""A drive keeps the version an overwrite of an unversioned key replaced, so that undoing the
overwrite (a commit that missed its write quorum: DeleteShard if_data_id + restore_previous)
brings it back (issue 16); the copy is reclaimed after its keep time, and a plain removal takes
it with the key (services.datanode.supersede)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shards, supersede
from tests.unit import test_shards as base

BUCKET, KEY, KIB, MIB = base.BUCKET, base.KEY, base.KIB, base.MIB
#: How each version is written: WRITE_SMALL (journaled), a batch of them, a staged write whose
#: shard is inline in its meta, a staged write with a data dir.
MODES = {"small": 100, "batch": 3 * KIB, "inline": 10 * KIB, "staged": MIB + 5}


@pytest.fixture
def drive_dir(tmp_path: Path) -> Path:
    return tmp_path / "drive"


@pytest.fixture
def store(drive_dir: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(drive_dir)
    yield opened
    opened.close()


def uput(
    store: shards.ShardStore, data: bytes, mode: str, data_id: str = ""
) -> datanode_pb2.ShardMeta:
    """Commit a version of the unversioned KEY, stamped now, as `mode` writes it."""
    meta = base.make_meta(KEY, [data])
    meta.data_id = data_id or uuid.uuid4().hex
    meta.mtime_unix_ns = time.time_ns()
    if mode == "small":
        return store.write_small(meta, data)
    if mode == "batch":
        [stored] = store.write_smalls([(meta, data)])
        assert not isinstance(stored, Exception)
        return stored
    with base.stage(store, [data], block_bytes=64 * KIB) as write:
        return write.commit(meta)


def undo(store: shards.ShardStore, failed: datanode_pb2.ShardMeta) -> bool:
    return store.delete(BUCKET, KEY, if_data_id=failed.data_id, restore_previous=True)


def holds(store: shards.ShardStore, want: datanode_pb2.ShardMeta, data: bytes) -> None:
    """The drive's current version of KEY is want, byte-exact, listed, and nothing else of
    the key is left on it (no superseded copy, no other data dir, no mark)."""
    current = store.read_meta(BUCKET, KEY)
    assert (current.data_id, current.mtime_unix_ns) == (want.data_id, want.mtime_unix_ns)
    assert base.read_parts(store, KEY) == [data]
    assert store.verify(BUCKET, KEY) == []
    assert [(e.key, e.etag) for e in store.list(BUCKET)] == [(KEY, want.etag)]
    files = ["meta"] if shards.is_inline(want) else ["meta", want.data_id]
    assert sorted(os.listdir(base.object_dir(store.drive.path, KEY))) == sorted(files)
    assert os.listdir(store.drive.path / supersede.MARKS_DIR) == []


@pytest.mark.parametrize("mode", MODES)
def test_undoing_an_overwrite_brings_the_version_before_back(
    store: shards.ShardStore, drive_dir: Path, mode: str
) -> None:
    """Before: the overwrite removed the version before it here and the undo removed the key."""
    size = MODES[mode]
    older, before = uput(store, base.content("older", size), mode), base.content("before", size)
    acked = uput(store, before, mode)
    failed = uput(store, base.content("failed", size), mode)
    assert base.read_parts(store, KEY) == [base.content("failed", size)]
    assert not undo(store, older)  # not the current version: nothing happens
    assert undo(store, failed)
    holds(store, acked, before)
    # A restart (the journal replayed: the undone small write stays undone) keeps it.
    reopened = base.open_store(drive_dir)
    assert base.read_parts(reopened, KEY) == [before]
    reopened.close()


def test_the_copy_is_reclaimed_after_its_keep_time(store: shards.ShardStore) -> None:
    before, after = base.content("before", MIB), base.content("after", MIB + 1)
    uput(store, before, "staged")
    acked = uput(store, after, "staged")
    assert store.reclaim_superseded(3600) == 0  # kept: an undo may still come
    assert supersede.PREV_FILE in os.listdir(base.object_dir(store.drive.path, KEY))
    assert store.reclaim_superseded(0) == 1
    holds(store, acked, after)
    assert undo(store, acked)  # nothing kept any more: the undo removes the key, as before
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    assert not base.object_dir(store.drive.path, KEY).exists()


def test_a_restart_keeps_the_copy_then_reclaims_it(drive_dir: Path) -> None:
    """Marks found at open are aged from the open (no wall clock is trusted)."""
    store = base.open_store(drive_dir)
    before = base.content("before", MIB)
    acked = uput(store, before, "staged")
    failed = uput(store, base.content("failed", 2 * MIB), "staged")
    store.close()
    store = base.open_store(drive_dir)
    assert store.reclaim_superseded(3600) == 0
    assert undo(store, failed)
    holds(store, acked, before)
    uput(store, base.content("again", 10), "small")
    store.close()
    store = base.open_store(drive_dir)
    assert store.reclaim_superseded(0) == 1
    assert sorted(os.listdir(base.object_dir(drive_dir, KEY))) == ["meta"]
    store.close()


def test_the_same_version_again_keeps_the_version_before(store: shards.ShardStore) -> None:
    """A write committed again with its data_id (stamped again above a newer version, or
    healed) must not make itself the version its undo restores."""
    before = base.content("before", 100)
    acked = uput(store, before, "small")
    failed = uput(store, base.content("failed", 100), "small")
    again = uput(store, base.content("failed", 100), "small", data_id=failed.data_id)
    assert undo(store, again)
    holds(store, acked, before)


@pytest.mark.parametrize("plain", [False, True], ids=["drain", "delete"])
def test_a_removal_takes_the_copy_with_the_key(store: shards.ShardStore, plain: bool) -> None:
    """A pool drain's conditional delete and a plain delete restore nothing and leave nothing."""
    uput(store, base.content("before", MIB), "staged")
    current = uput(store, base.content("current", MIB), "staged")
    if plain:
        assert store.delete(BUCKET, KEY)
    else:
        assert store.delete(BUCKET, KEY, if_data_id=current.data_id)
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY)
    assert not base.object_dir(store.drive.path, KEY).exists()
    assert os.listdir(store.drive.path / supersede.MARKS_DIR) == []
    assert store.list(BUCKET) == []
