"""Unit tests of a healed non-current version's commit on one drive (CommitWriteRequest.noncurrent:
`StagedWrite.noncurrent`): installed as a non-current version under the newer current one, and
refused where it would become the current version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shards
from tests.unit import test_shard_versions as versioned
from tests.unit import test_shards as base

BUCKET, KEY, KIB, MIB = base.BUCKET, base.KEY, base.KIB, base.MIB
store = versioned.store
drive_dir = versioned.drive_dir


def _heal(store: shards.ShardStore, meta: datanode_pb2.ShardMeta, data: bytes) -> None:
    """Commit meta's version again from data as healing does: staged, committed non-current."""
    mine = datanode_pb2.ShardMeta()
    mine.CopyFrom(meta)
    mine.inline_data = b""
    with base.stage(store, [data], block_bytes=64 * KIB) as write:
        write.noncurrent = True
        write.commit(mine)


def test_a_healed_version_stays_non_current(store: shards.ShardStore, drive_dir: Path) -> None:
    old, new = base.content("v1", MIB + 5), base.content("v2", MIB + 7)
    v1 = versioned.vput(store, old)
    v2 = versioned.vput(store, new)
    current = store.read_meta(BUCKET, KEY)
    shutil.rmtree(next(drive_dir.rglob(v1.data_id)))  # v1's data dir lost
    assert store.verify(BUCKET, KEY, objversions.version_id(v1))

    _heal(store, v1, old)
    assert store.read_meta(BUCKET, KEY) == current
    assert versioned.version_bytes(store, store.read_meta(BUCKET, KEY)) == new
    assert not store.verify(BUCKET, KEY, objversions.version_id(v1))
    assert versioned.version_bytes(store, v1) == old
    ids = [objversions.version_id(m) for m in (v2, v1)]
    assert versioned.listed(store) == [(KEY, ids[0], True, False), (KEY, ids[1], False, False)]


def test_a_healed_version_never_becomes_current(store: shards.ShardStore, tmp_path: Path) -> None:
    old, new = base.content("v1", MIB + 5), base.content("v2", MIB + 7)
    v1 = versioned.vput(store, old)
    # This drive holds v1 as its current version (it missed v2): refused, v1 stays as it was.
    with pytest.raises(errors.PreconditionFailed):
        _heal(store, v1, old)
    assert store.read_meta(BUCKET, KEY) == v1
    # A drive without the key: refused, nothing stored.
    empty = base.open_store(tmp_path / "empty")
    try:
        with pytest.raises(errors.PreconditionFailed):
            _heal(empty, v1, old)
        with pytest.raises(errors.NotFound):
            empty.read_meta(BUCKET, KEY, objversions.version_id(v1))
        assert versioned.listed(empty) == []
    finally:
        empty.close()
    # Once the newer current version is here, the same heal is kept as non-current.
    versioned.vput(store, new)
    _heal(store, v1, old)
    assert versioned.version_bytes(store, store.read_meta(BUCKET, KEY)) == new
