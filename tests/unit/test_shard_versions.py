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


#: v0.1.0's listing index (its own statements: six values inserted positionally).
V010_SCHEMA = (
    "CREATE TABLE objects (bucket TEXT NOT NULL, key BLOB NOT NULL, size INTEGER NOT NULL,"
    " etag TEXT NOT NULL, mtime_ns INTEGER NOT NULL, is_pointer INTEGER NOT NULL,"
    " PRIMARY KEY (bucket, key)) WITHOUT ROWID;"
    "CREATE TABLE pending (bucket TEXT NOT NULL, key BLOB NOT NULL,"
    " PRIMARY KEY (bucket, key)) WITHOUT ROWID;"
    "CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
)


def _v010_index(drive: Path, rows: list[tuple[str, str, int]]) -> Path:
    """An index v0.1.0 left on drive (closed cleanly), with rows (bucket, key, size)."""
    path = drive / ".kvtier" / index.file_name(1)
    db = sqlite3.connect(path)
    db.executescript(V010_SCHEMA)
    db.executemany("INSERT INTO objects VALUES (?, CAST(? AS BLOB), ?, 'e', 7, 0)", rows)
    db.execute("INSERT INTO state VALUES ('boot_id', 'b')")
    db.commit()
    db.close()
    return path


def test_another_releases_index_is_left_to_it(drive_dir: Path) -> None:
    """This release's index has a file of its own (index.GENERATION), so v0.1.0's is never
    written with rows it cannot read, nor read for columns it lacks; finding one, the store
    rebuilds its own (that release may have changed the drive since) and removes the other,
    which that release then rebuilds if run again (docs/upgrades.md, rolling back)."""
    assert shards.INDEX_FILE.name == index.file_name() == "index-2.sqlite"
    store = base.open_store(drive_dir)
    try:
        store.write_small(base.make_meta("kept", [b"k"]), b"k")
        store.write_small(base.make_meta("dropped", [b"d"]), b"d")
    finally:
        store.close()
    # Another release ran meanwhile (simulated: this store makes the drive's changes, then
    # this release's file is put back as it was before them): it made "added" and removed
    # "dropped", and wrote neither to this release's file.
    other = base.open_store(drive_dir)
    try:
        other.write_small(base.make_meta("added", [b"a"]), b"a")
        other.delete(BUCKET, "dropped")
        ours_then = other._index.dump()
    finally:
        other.close()
    stale = sqlite3.connect(drive_dir / shards.INDEX_FILE)
    stale.execute("DELETE FROM objects WHERE key = CAST('added' AS BLOB)")
    stale.execute(
        "INSERT INTO objects (bucket, key, size, etag, mtime_ns, is_pointer)"
        " VALUES (?, CAST('dropped' AS BLOB), 1, 'e', 1, 0)", (BUCKET,)
    )  # fmt: skip
    stale.commit()
    stale.close()
    v010 = _v010_index(drive_dir, [(BUCKET, "added", 1)])
    reopened = base.open_store(drive_dir)
    try:
        assert [e.key for e in reopened.list(BUCKET)] == ["added", "kept"]
        assert reopened._index.dump() == ours_then
    finally:
        reopened.close()
    assert not v010.exists()
    assert sorted(p.name for p in (drive_dir / ".kvtier").glob("index*")) == [
        "index-2.sqlite", "index.clean"
    ]  # fmt: skip
    # Without another release's file, a cleanly closed index is trusted as before.
    poisoned = sqlite3.connect(drive_dir / shards.INDEX_FILE)
    poisoned.execute("DELETE FROM objects WHERE key = CAST('kept' AS BLOB)")
    poisoned.commit()
    poisoned.close()
    trusted = base.open_store(drive_dir)
    try:
        assert [e.key for e in trusted.list(BUCKET)] == ["added"]
    finally:
        trusted.close()


def test_v010_rebuilds_an_index_it_does_not_find(drive_dir: Path) -> None:
    """The other half of a rollback, v0.1.0's side, as its store opens a drive (services/
    datanode/shards.py of v0.1.0): `fresh = not index.sqlite.exists()`, then `if fresh or ...:
    rebuild`. A drive this release closed has no index.sqlite, so v0.1.0 rebuilds one."""
    store = base.open_store(drive_dir)
    try:
        store.write_small(base.make_meta("k", [b"k"]), b"k")
    finally:
        store.close()
    assert not (drive_dir / ".kvtier" / index.file_name(1)).exists()


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
    # A lost index is rebuilt from the metas; so is one whose owners are stale (closed
    # cleanly) when another release's index file is beside it (another release ran since).
    for lose in (lambda db: db.unlink(), _blank_owners_beside_v010):
        lose(drive_dir / shards.INDEX_FILE)
        reopened = base.open_store(drive_dir)
        try:
            assert [(e.key, e.owner) for e in reopened.list(BUCKET)] == expected
            assert [(e.key, e.initiator) for e in reopened.list(BUCKET)] == started
            got = reopened.list_versions(BUCKET, prefix="", after_key="", after_version="", limit=9)
            assert [(v.key, v.owner) for v in got] == expected
        finally:
            reopened.close()


def _blank_owners_beside_v010(path: Path) -> None:
    """Owners and initiators blanked in this release's index (closed cleanly), and a v0.1.0
    index file beside it."""
    db = sqlite3.connect(path)
    db.executescript(
        "UPDATE objects SET owner = '', initiator = ''; UPDATE versions SET owner = '';"
    )
    db.commit()
    db.close()
    _v010_index(path.parent.parent, [])
