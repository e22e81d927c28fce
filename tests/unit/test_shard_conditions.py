"""A drive's side of conditional writes (S3 If-None-Match: * and If-Match made atomic, issue 14):
a commit carrying ShardMeta.commit_if_absent / commit_if_data_id is checked under the key's lock
against the drive's current version, refused with PreconditionFailed (nothing stored) or
committed, on every commit path: a staged write, a small write, a batch of small writes, a
versioned bucket's; the condition itself is never stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shards
from tests.unit import test_shard_versions as versioned
from tests.unit import test_shards as base

BUCKET, KEY, KIB, MIB = base.BUCKET, base.KEY, base.KIB, base.MIB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(tmp_path / "drive")
    yield opened
    opened.close()


def _staged(store: shards.ShardStore, meta: datanode_pb2.ShardMeta, data: bytes) -> Any:
    with base.stage(store, [data]) as write:
        return write.commit(meta)


def _small(store: shards.ShardStore, meta: datanode_pb2.ShardMeta, data: bytes) -> Any:
    return store.write_small(meta, data)


def _batched(store: shards.ShardStore, meta: datanode_pb2.ShardMeta, data: bytes) -> Any:
    (got,) = store.write_smalls([(meta, data)])
    if isinstance(got, Exception):
        raise got
    return got


PATHS = {"staged": _staged, "small": _small, "batched": _batched}


def _meta(data: bytes, *, absent: bool = False, data_id: str = "") -> datanode_pb2.ShardMeta:
    meta = base.make_meta(KEY, [data])
    meta.data_id = uuid.uuid4().hex
    meta.commit_if_absent, meta.commit_if_data_id = absent, data_id
    return meta


@pytest.mark.parametrize("path", PATHS)
def test_if_absent_commits_once(store: shards.ShardStore, path: str) -> None:
    commit = PATHS[path]
    first = commit(store, _meta(b"first", absent=True), b"first")
    assert not first.commit_if_absent  # never stored
    raw = (base.object_dir(store.drive.path, KEY) / "meta").read_bytes()
    assert not shards.decode_meta(raw, "meta").commit_if_absent
    with pytest.raises(errors.PreconditionFailed, match="absent"):
        commit(store, _meta(b"second", absent=True), b"second")
    assert store.read_meta(BUCKET, KEY).data_id == first.data_id
    assert base.read_parts(store, KEY) == [b"first"]
    # The same write sent again (a restamp, a retry) meets its own condition.
    again = _meta(b"first", absent=True)
    again.data_id = first.data_id
    again.mtime_unix_ns = first.mtime_unix_ns + 1
    assert commit(store, again, b"first").data_id == first.data_id


@pytest.mark.parametrize("path", PATHS)
def test_if_data_id_commits_only_over_that_version(store: shards.ShardStore, path: str) -> None:
    commit = PATHS[path]
    with pytest.raises(errors.PreconditionFailed, match="none"):
        commit(store, _meta(b"x", data_id="0" * 32), b"x")  # no version here
    assert not base.object_dir(store.drive.path, KEY).joinpath("meta").exists()
    before = base.put(store, KEY, [b"before"])
    with pytest.raises(errors.PreconditionFailed, match="not"):
        commit(store, _meta(b"stale", data_id="0" * 32), b"stale")
    assert store.read_meta(BUCKET, KEY).data_id == before.data_id
    after = commit(store, _meta(b"after", data_id=before.data_id), b"after")
    assert store.read_meta(BUCKET, KEY).data_id == after.data_id
    # A second writer that matched the same version loses: it is gone.
    with pytest.raises(errors.PreconditionFailed):
        commit(store, _meta(b"late", data_id=before.data_id), b"late")
    assert base.read_parts(store, KEY) == [b"after"]


def test_a_staged_write_of_many_blocks_is_refused_whole(store: shards.ShardStore) -> None:
    base.put(store, KEY, [b"held"])
    big = base.content("big", MIB + 5)
    with pytest.raises(errors.PreconditionFailed):
        _staged(store, _meta(big, absent=True), big)
    assert base.read_parts(store, KEY) == [b"held"]


def test_a_batch_checks_each_write_against_the_ones_before_it(store: shards.ShardStore) -> None:
    one, two = _meta(b"one", absent=True), _meta(b"two", absent=True)
    other = base.make_meta("other-key", [b"o"])
    other.commit_if_absent = True
    results = store.write_smalls([(one, b"one"), (two, b"two"), (other, b"o")])
    assert isinstance(results[0], datanode_pb2.ShardMeta)
    assert isinstance(results[1], errors.PreconditionFailed)  # the first of the batch is there
    assert isinstance(results[2], datanode_pb2.ShardMeta)  # other keys go as they go
    assert store.read_meta(BUCKET, KEY).data_id == one.data_id
    # A write naming the batch's earlier version of the key commits over it.
    three = _meta(b"3")
    four = _meta(b"4", data_id=three.data_id)
    results = store.write_smalls([(three, b"3"), (four, b"4")])
    assert all(isinstance(r, datanode_pb2.ShardMeta) for r in results)
    assert base.read_parts(store, KEY) == [b"4"]


@pytest.mark.parametrize("size", [100, MIB + 5], ids=["small", "staged"])
def test_a_delete_marker_counts_as_absent(store: shards.ShardStore, size: int) -> None:
    versioned.vput(store, base.content("v1", size))
    with pytest.raises(errors.PreconditionFailed):
        _versioned(store, base.content("v2", size), absent=True)
    marker = versioned.vput(store, b"", marker=True)
    with pytest.raises(errors.PreconditionFailed):  # If-Match on a deleted object
        _versioned(store, base.content("v2", size), data_id=marker.data_id)
    stored = _versioned(store, base.content("v3", size), absent=True)
    assert store.read_meta(BUCKET, KEY).data_id == stored.data_id
    assert len(versioned.listed(store)) == 3  # v1, the marker, v3


def _versioned(
    store: shards.ShardStore, data: bytes, *, absent: bool = False, data_id: str = ""
) -> datanode_pb2.ShardMeta:
    meta = _meta(data, absent=absent, data_id=data_id)
    meta.keep_versions = True
    if len(data) <= 64 * KIB:
        return store.write_small(meta, data)
    with base.stage(store, [data], block_bytes=64 * KIB) as write:
        return write.commit(meta)
