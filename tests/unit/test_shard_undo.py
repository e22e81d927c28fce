"""A drive's side of undoing a failed commit and of aging a version (issue 16, clock skew):
DeleteShard's if_data_id with a version id removes that version only when it is the one with
that data_id (a gateway undoing its write never removes a newer null version), and the age a
drive reports of a version is by its own clock at both ends (whatever the writer sent)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import objversions
from services.datanode import shardmeta, shards
from tests.unit import test_shard_versions as versioned
from tests.unit import test_shards as base

BUCKET, KEY, KIB, MIB = base.BUCKET, base.KEY, base.KIB, base.MIB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(tmp_path / "drive")
    yield opened
    opened.close()


@pytest.mark.parametrize("size", [100, MIB + 5], ids=["small", "staged"])
def test_undo_of_a_version_brings_the_one_before_back(store: shards.ShardStore, size: int) -> None:
    before = versioned.vput(store, base.content("before", size))
    failed = versioned.vput(store, base.content("failed", size))
    version = objversions.version_id(failed)
    assert not store.delete(BUCKET, KEY, version, if_data_id=before.data_id)
    assert store.delete(BUCKET, KEY, version, if_data_id=failed.data_id)
    current = store.read_meta(BUCKET, KEY)
    assert current.data_id == before.data_id
    assert versioned.version_bytes(store, current) == base.content("before", size)
    assert [v for _, v, _, _ in versioned.listed(store)] == [objversions.version_id(before)]


def test_undo_of_a_null_version_spares_a_newer_null_version(store: shards.ShardStore) -> None:
    failed = versioned.vput(store, b"failed", null=True)
    newer = versioned.vput(store, b"newer", null=True)  # replaces the null version
    assert not store.delete(BUCKET, KEY, objversions.NULL, if_data_id=failed.data_id)
    assert store.read_meta(BUCKET, KEY).data_id == newer.data_id
    assert versioned.version_bytes(store, store.read_meta(BUCKET, KEY)) == b"newer"
    # Kept (non-current) null version: the same rule.
    versioned.vput(store, b"on top")
    assert not store.delete(BUCKET, KEY, objversions.NULL, if_data_id=failed.data_id)
    assert store.delete(BUCKET, KEY, objversions.NULL, if_data_id=newer.data_id)
    assert [v for _, v, _, _ in versioned.listed(store)] != []
    assert objversions.NULL not in [v for _, v, _, _ in versioned.listed(store)]


def test_the_age_of_a_version_is_by_the_drives_clock(store: shards.ShardStore) -> None:
    meta = base.make_meta(KEY, [b"x" * 10])
    meta.stored_unix_ns, meta.stored_age_ms = 1, 10**9  # what a writer sends is ignored
    with base.stage(store, [b"x" * 10]) as write:
        stored = write.commit(meta)
    assert abs(stored.stored_unix_ns - time.time_ns()) < 60 * 10**9
    assert stored.stored_age_ms == 0
    assert store.read_meta(BUCKET, KEY).stored_age_ms == 0  # nothing of it is stored
    assert 1 <= store.read_meta_aged(BUCKET, KEY).stored_age_ms < 60_000

    # A version stored before the field: its meta file's mtime, by the same clock.
    def legacy(old: shardmeta.ShardMeta) -> shardmeta.ShardMeta:
        old.stored_unix_ns = 0
        return old

    store.rewrite_meta(BUCKET, KEY, legacy)
    path = base.object_dir(store.drive.path, KEY) / shardmeta.META_FILE
    hours_ago = time.time() - 7200
    os.utime(path, (hours_ago, hours_ago))
    age_ms = store.read_meta_aged(BUCKET, KEY).stored_age_ms
    assert 7200_000 <= age_ms < 7260_000
    assert shardmeta.stored_age_ms(shardmeta.ShardMeta(), 0, time.time_ns()) == 0  # unknown
