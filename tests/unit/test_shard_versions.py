"""Unit tests of S3 versions on one drive (services.datanode.versionstore through ShardStore):
non-current versions kept next to the current one, removed one by one, listed from the index,
rebuilt from the metas, and every step of a versioned commit and of a version's removal crashed.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import index, shards, versionstore
from tests.unit import test_shards as base

BUCKET = base.BUCKET
KEY = base.KEY
KIB = base.KIB
MIB = base.MIB


@pytest.fixture
def drive_dir(tmp_path: Path) -> Path:
    return tmp_path / "drive"


@pytest.fixture
def store(drive_dir: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(drive_dir)
    yield opened
    opened.close()


def vput(
    store: shards.ShardStore,
    data: bytes,
    *,
    key: str = KEY,
    null: bool = False,
    marker: bool = False,
    mtime_ns: int = 0,
) -> datanode_pb2.ShardMeta:
    """Commit a version of a versioned bucket (large data: staged data dir; small: write_small)."""
    meta = base.make_meta(key, [data])
    meta.keep_versions, meta.null_version, meta.delete_marker = True, null, marker
    meta.mtime_unix_ns = mtime_ns
    meta.data_id = uuid.uuid4().hex
    if len(data) <= 64 * KIB:
        return store.write_small(meta, data)
    with base.stage(store, [data], block_bytes=64 * KIB) as write:
        return write.commit(meta)


def version_bytes(store: shards.ShardStore, meta: datanode_pb2.ShardMeta) -> bytes:
    return b"".join(base.read_parts(store, meta.key, meta=meta))


def listed(store: shards.ShardStore, **kw: object) -> list[tuple[str, str, bool, bool]]:
    args = {"prefix": "", "after_key": "", "after_version": "", "limit": 1000, **kw}
    return [
        (v.key, v.version_id, v.is_latest, v.delete_marker)
        for v in store.list_versions(BUCKET, **args)  # type: ignore[arg-type]
    ]


def test_versions_are_kept_read_and_removed(store: shards.ShardStore, drive_dir: Path) -> None:
    small, large = base.content("v1", 100), base.content("v2", MIB + 5)
    v1 = vput(store, small)
    v2 = vput(store, large)
    marker = vput(store, b"", marker=True)
    ids = [objversions.version_id(m) for m in (v1, v2, marker)]
    assert store.read_meta(BUCKET, KEY).delete_marker
    assert version_bytes(store, store.read_meta(BUCKET, KEY, ids[0])) == small
    assert version_bytes(store, store.read_meta(BUCKET, KEY, ids[1])) == large
    # listings: objects skip nothing (the gateway hides markers); versions newest first
    assert [(e.key, e.delete_marker) for e in store.list(BUCKET)] == [(KEY, True)]
    assert listed(store) == [
        (KEY, ids[2], True, True),
        (KEY, ids[1], False, False),
        (KEY, ids[0], False, False),
    ]
    assert listed(store, after_key=KEY, after_version=ids[1]) == [(KEY, ids[0], False, False)]
    where = base.object_dir(drive_dir, KEY)
    assert sorted(os.listdir(where / "versions")) == sorted(f"{i}.meta" for i in ids[:2])
    # removing the marker makes v2 current again, byte for byte
    assert store.delete(BUCKET, KEY, ids[2])
    assert store.read_meta(BUCKET, KEY).data_id == v2.data_id
    assert version_bytes(store, store.read_meta(BUCKET, KEY)) == large
    assert listed(store) == [(KEY, ids[1], True, False), (KEY, ids[0], False, False)]
    # removing a non-current one leaves the current alone
    assert store.delete(BUCKET, KEY, ids[0])
    assert not store.delete(BUCKET, KEY, ids[0])
    with pytest.raises(errors.NotFound):
        store.read_meta(BUCKET, KEY, ids[0])
    assert store.delete(BUCKET, KEY, ids[1])
    assert store.list(BUCKET) == []
    assert listed(store) == []
    assert not where.exists()


def test_null_version_replaces_the_null_version(store: shards.ShardStore) -> None:
    plain = base.make_meta(KEY, [b"before versioning"])
    store.write_small(plain, b"before versioning")  # unversioned: the null version
    enabled = vput(store, b"enabled")
    assert listed(store) == [
        (KEY, enabled.data_id, True, False),
        (KEY, "null", False, False),
    ]
    assert version_bytes(store, store.read_meta(BUCKET, KEY, "null")) == b"before versioning"
    suspended = vput(store, b"suspended", null=True)
    assert listed(store) == [(KEY, "null", True, False), (KEY, enabled.data_id, False, False)]
    assert version_bytes(store, store.read_meta(BUCKET, KEY, "null")) == b"suspended"
    again = vput(store, b"suspended again", null=True)
    assert [v[1] for v in listed(store)] == ["null", enabled.data_id]
    assert store.read_meta(BUCKET, KEY).data_id == again.data_id
    assert suspended.data_id != again.data_id


def test_a_concurrent_older_version_becomes_non_current(store: shards.ShardStore) -> None:
    """A staged write learnt the drives' stamps before its commit: one still older than the
    current version was concurrent, and is kept as a non-current version."""
    big = 100 * KIB
    newer = vput(store, base.content("newer", big))
    older = vput(store, base.content("older", big), mtime_ns=newer.mtime_unix_ns - 1000)
    assert store.read_meta(BUCKET, KEY).data_id == newer.data_id
    assert [v[1] for v in listed(store)] == [newer.data_id, older.data_id]


def test_an_older_small_version_is_refused_with_the_current_stamp(
    store: shards.ShardStore,
) -> None:
    """A small write (stamped by a gateway that did not ask the drives) older than the current
    version may come from a lagging gateway after the current one was acknowledged: refused with
    the current stamp, so the gateway restamps it above and it becomes current."""
    newer = vput(store, b"newer")
    with pytest.raises(shards.Superseded) as refused:
        vput(store, b"older", mtime_ns=newer.mtime_unix_ns - 1000)
    assert refused.value.current_mtime_unix_ns == newer.mtime_unix_ns
    assert [v[1] for v in listed(store)] == [newer.data_id]
    restamped = vput(store, b"older", mtime_ns=newer.mtime_unix_ns + 1)
    assert store.read_meta(BUCKET, KEY).data_id == restamped.data_id
    assert [v[1] for v in listed(store)] == [restamped.data_id, newer.data_id]


def test_bad_version_ids_are_refused(store: shards.ShardStore) -> None:
    vput(store, b"x")
    for bad in ("../meta", "a/b", "", "meta", "versions"):
        with pytest.raises(errors.InvalidArgument):
            objversions.check(bad)
    with pytest.raises(errors.InvalidArgument):
        store.read_meta(BUCKET, KEY, "../../x")


def test_rebuild_lists_versions(drive_dir: Path) -> None:
    store = base.open_store(drive_dir)
    metas = [vput(store, base.content(f"r{i}", 300 * KIB if i % 2 else 50)) for i in range(3)]
    vput(store, b"", marker=True, key="other")
    vput(store, b"plain", key="third")
    before = listed(store)
    assert len(before) == 5
    store.close()
    (drive_dir / shards.INDEX_FILE).unlink()
    reopened = base.open_store(drive_dir)
    try:
        assert listed(reopened) == before
        assert [(e.key, e.delete_marker) for e in reopened.list(BUCKET)] == [
            (KEY, False),
            ("other", True),
            ("third", False),
        ]
        for meta in metas:
            got = reopened.read_meta(BUCKET, KEY, meta.data_id)
            assert version_bytes(reopened, got) == version_bytes(reopened, meta)
    finally:
        reopened.close()


def test_unversioned_keys_get_no_versions_dir(store: shards.ShardStore, drive_dir: Path) -> None:
    base.put(store, KEY, [base.content("u", MIB)])
    base.put(store, KEY, [base.content("u2", MIB)])
    where = base.object_dir(drive_dir, KEY)
    assert versionstore.VERSIONS_DIR not in os.listdir(where)
    assert listed(store) == [(KEY, "null", True, False)]


def test_crash_at_every_step_of_a_versioned_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever step a versioned commit dies at, the drive reopens with the old version
    current and nothing lost, or the new one current and the old one non-current, whole."""
    old, new = base.content("old", 300 * KIB), base.content("new", MIB + 3)
    steps = None
    at = 0
    while steps is None or at < steps:
        drive = tmp_path / (f"drive-{at}" if steps is not None else "count")
        crashed = base.open_store(drive)
        first = vput(crashed, old)
        meta = base.make_meta(KEY, [new])
        meta.keep_versions, meta.data_id = True, "second"
        write = base.stage(crashed, [new], block_bytes=64 * KIB)
        with monkeypatch.context() as patcher:
            crash = base.CrashAt(patcher, at if steps is not None else None)
            if steps is None:
                write.commit(meta)
                steps = len(crash.done)
                # data dir in, the old current copied to versions/, the new meta renamed in
                assert crash.done.count("rename") == 1
                assert crash.done.count("replace") == 2
                assert crash.done.count("fsync") >= 5
                crashed.close()
                continue
            with pytest.raises(base.SimulatedCrash):
                write.commit(meta)
        store = base.open_store(drive)
        store.sweep_tmp(0)
        current = store.read_meta(BUCKET, KEY)
        replaced = current.data_id == "second"
        assert version_bytes(store, current) == (new if replaced else old)
        assert version_bytes(store, store.read_meta(BUCKET, KEY, first.data_id)) == old
        want = ["second", first.data_id] if replaced else [first.data_id]
        assert [v[1] for v in listed(store)] == want
        assert [e.key for e in store.list(BUCKET)] == [KEY]
        store.close()
        crashed.close()
        at += 1


def test_crash_at_every_step_of_removing_the_current_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = base.content("old", MIB + 1), base.content("new", 300 * KIB)
    steps = None
    at = 0
    while steps is None or at < steps:
        drive = tmp_path / (f"drive-{at}" if steps is not None else "count")
        crashed = base.open_store(drive)
        first = vput(crashed, old)
        second = vput(crashed, new)
        with monkeypatch.context() as patcher:
            crash = base.CrashAt(patcher, at if steps is not None else None)
            if steps is None:
                assert crashed.delete(BUCKET, KEY, second.data_id)
                steps = len(crash.done)
                assert "replace" in crash.done  # the non-current version renamed over meta
                crashed.close()
                continue
            with pytest.raises(base.SimulatedCrash):
                crashed.delete(BUCKET, KEY, second.data_id)
        store = base.open_store(drive)
        current = store.read_meta(BUCKET, KEY)
        assert current.data_id in (first.data_id, second.data_id)
        assert version_bytes(store, current) == (old if current.data_id == first.data_id else new)
        assert version_bytes(store, store.read_meta(BUCKET, KEY, first.data_id)) == old
        assert listed(store)[0][1] == current.data_id
        store.close()
        crashed.close()
        at += 1


def test_an_index_made_before_versioning_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE objects (bucket TEXT NOT NULL, key BLOB NOT NULL, size INTEGER NOT NULL,"
        " etag TEXT NOT NULL, mtime_ns INTEGER NOT NULL, is_pointer INTEGER NOT NULL,"
        " PRIMARY KEY (bucket, key)) WITHOUT ROWID;"
        "INSERT INTO objects VALUES ('b', CAST('old' AS BLOB), 3, 'e', 7, 0);"
    )
    old.commit()
    old.close()
    migrated = index.ShardIndex(path)
    try:
        assert migrated.list("b") == [index.ListEntry("old", 3, "e", 7, False, False)]
        migrated.put("b", index.ListEntry("new", 1, "f", 8, False, True))
        assert [(e.key, e.delete_marker) for e in migrated.list("b")] == [
            ("new", True),
            ("old", False),
        ]
        assert [v.version_id for v in migrated.list_versions("b", "", "", None, 10)] == [
            "null",
            "null",
        ]
    finally:
        migrated.close()


def test_an_index_made_before_owners_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE objects (bucket TEXT NOT NULL, key BLOB NOT NULL, size INTEGER NOT NULL,"
        " etag TEXT NOT NULL, mtime_ns INTEGER NOT NULL, is_pointer INTEGER NOT NULL,"
        " delete_marker INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (bucket, key)) WITHOUT ROWID;"
        "CREATE TABLE versions (bucket TEXT NOT NULL, key BLOB NOT NULL,"
        " mtime_ns INTEGER NOT NULL, data_id TEXT NOT NULL, version_id TEXT NOT NULL,"
        " size INTEGER NOT NULL, etag TEXT NOT NULL, is_latest INTEGER NOT NULL,"
        " delete_marker INTEGER NOT NULL,"
        " PRIMARY KEY (bucket, key, mtime_ns, data_id)) WITHOUT ROWID;"
        "INSERT INTO objects VALUES ('b', CAST('old' AS BLOB), 3, 'e', 7, 0, 0);"
        "INSERT INTO versions VALUES ('b', CAST('v' AS BLOB), 5, 'd1', 'd1', 1, 'f', 1, 0);"
    )
    old.commit()
    old.close()
    migrated = index.ShardIndex(path)
    try:
        # Entries indexed before: no owner recorded (listings show the bucket's tenant).
        assert migrated.list("b") == [index.ListEntry("old", 3, "e", 7, False, False, "")]
        assert [v.owner for v in migrated.list_versions("b", "", "", None, 10)] == ["", ""]
        migrated.put("b", index.ListEntry("new", 1, "f", 8, False, owner="tenant-x"))
        version = index.VersionEntry("v", 9, "d2", "d2", 2, "g", True, False, "tenant-y")
        migrated.put_key("b", "v", None, [version])
        assert [(e.key, e.owner) for e in migrated.list("b")] == [("new", "tenant-x"), ("old", "")]
        assert [(v.key, v.owner) for v in migrated.list_versions("b", "", "", None, 10)] == [
            ("new", "tenant-x"),
            ("old", ""),
            ("v", "tenant-y"),
        ]
    finally:
        migrated.close()
    assert index.ShardIndex(path).dump()[0][1].owner == "tenant-x"  # reopened: as it was


@pytest.mark.parametrize("versioned", [False, True])
def test_owners_are_indexed_and_rebuilt(drive_dir: Path, versioned: bool) -> None:
    store = base.open_store(drive_dir)
    for key, owner, data in (("mine", "", b"m"), ("small", "other", b"s"), ("big", "other", b"")):
        meta = base.make_meta(key, [data or base.content(key, 300 * KIB)])
        meta.acl.owner, meta.keep_versions = owner, versioned
        # An upload record's initiator (one whose ACL names the bucket's tenant) is indexed too.
        meta.upload_initiator = "starter" if key == "mine" else ""
        meta.data_id = uuid.uuid4().hex
        if data:
            store.write_small(meta, data)
        else:
            with base.stage(store, [base.content(key, 300 * KIB)], block_bytes=64 * KIB) as write:
                write.commit(meta)
    expected = [("big", "other"), ("mine", ""), ("small", "other")]
    started = [("big", ""), ("mine", "starter"), ("small", "")]
    try:
        assert [(e.key, e.owner) for e in store.list(BUCKET)] == expected
        assert [(e.key, e.initiator) for e in store.list(BUCKET)] == started
        got = store.list_versions(BUCKET, prefix="", after_key="", after_version="", limit=10)
        assert [(v.key, v.owner) for v in got] == expected
    finally:
        store.close()
    # A lost index is rebuilt from the metas; so is one of older code (no owner column),
    # closed cleanly: once, at the first open that adds the column.
    for lose in (lambda db: db.unlink(), _drop_owner_columns):
        lose(drive_dir / shards.INDEX_FILE)
        reopened = base.open_store(drive_dir)
        try:
            assert [(e.key, e.owner) for e in reopened.list(BUCKET)] == expected
            assert [(e.key, e.initiator) for e in reopened.list(BUCKET)] == started
            got = reopened.list_versions(BUCKET, prefix="", after_key="", after_version="", limit=9)
            assert [(v.key, v.owner) for v in got] == expected
        finally:
            reopened.close()
    filled = index.ShardIndex(drive_dir / shards.INDEX_FILE).get_state()["filled"]
    assert filled == index.FILLED == "owner,initiator"


def _drop_owner_columns(path: Path) -> None:
    """Make the index one of older code (closed cleanly)."""
    db = sqlite3.connect(path)
    db.executescript(
        "ALTER TABLE objects DROP COLUMN owner; ALTER TABLE versions DROP COLUMN owner;"
        "ALTER TABLE objects DROP COLUMN initiator; DELETE FROM state WHERE name = 'filled';"
    )
    db.commit()
    db.close()
