"""Unit tests of UpdateMeta on a drive's kept S3 versions (services.datanode.metaupdate through
ShardStore.rewrite_meta): the tags and ACL of a non-current version change in place, by its
data_id, and nothing else does (the current version, the bytes, the listing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import errors, objversions
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.datanode.v1 import shards_pb2
from services.datanode import metaupdate, shards
from tests.unit import test_shard_versions as versioned
from tests.unit import test_shards as base

BUCKET, KEY, MIB = base.BUCKET, base.KEY, base.MIB
_READER = acl_pb2.Acl(
    grants=[
        acl_pb2.AclGrant(
            grantee_type=acl_pb2.GRANTEE_TYPE_ALL_USERS, permission=acl_pb2.ACL_PERMISSION_READ
        )
    ]
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[shards.ShardStore]:
    opened = base.open_store(tmp_path / "drive")
    yield opened
    opened.close()


def _update(store: shards.ShardStore, data_id: str, **change: object) -> shards.ShardMeta:
    req = shards_pb2.UpdateMetaRequest(bucket=BUCKET, key=KEY, data_id=data_id, **change)  # type: ignore[arg-type]
    return metaupdate.update_meta(store, req)


@pytest.mark.parametrize("size", [100, MIB + 5])  # a small (inline) version, a large one
def test_a_non_current_version_changes_alone(store: shards.ShardStore, size: int) -> None:
    old_bytes = base.content("old", size)
    old = versioned.vput(store, old_bytes, mtime_ns=1)
    new = versioned.vput(store, b"new bytes", mtime_ns=2)
    old_id, new_id = objversions.version_id(old), objversions.version_id(new)
    listing = versioned.listed(store)
    changed = _update(
        store, old.data_id, replace_tags=True, tags={"gen": "old"}, acl=_READER, changed_unix_ns=5
    )
    assert (changed.data_id, dict(changed.tags), changed.acl) == (
        old.data_id,
        {"gen": "old"},
        _READER,
    )
    kept = store.read_meta(BUCKET, KEY, old_id)
    assert (dict(kept.tags), kept.acl, kept.meta_changed_unix_ns) == ({"gen": "old"}, _READER, 5)
    assert (kept.etag, kept.mtime_unix_ns, kept.size) == (old.etag, old.mtime_unix_ns, old.size)
    assert versioned.version_bytes(store, kept) == old_bytes
    current = store.read_meta(BUCKET, KEY)
    assert (current.data_id, dict(current.tags), current.HasField("acl")) == (
        new.data_id, {}, False,
    )  # fmt: skip
    assert store.read_meta(BUCKET, KEY, new_id).data_id == new.data_id
    assert versioned.listed(store) == listing  # still newest first, the same ids
    # An older change than the one held is kept out, as on the current version.
    _update(store, old.data_id, replace_tags=True, tags={"gen": "stale"}, changed_unix_ns=4)
    assert dict(store.read_meta(BUCKET, KEY, old_id).tags) == {"gen": "old"}


def test_an_unknown_version_is_refused(store: shards.ShardStore) -> None:
    versioned.vput(store, b"one", mtime_ns=1)
    versioned.vput(store, b"two", mtime_ns=2)
    with pytest.raises(errors.PreconditionFailed):
        _update(store, "0" * 32, replace_tags=True, tags={"a": "b"})
    with pytest.raises(errors.NotFound):
        metaupdate.update_meta(
            store, shards_pb2.UpdateMetaRequest(bucket=BUCKET, key="absent", data_id="0" * 32)
        )


def test_a_change_of_owner_is_indexed(store: shards.ShardStore) -> None:
    """The ACL's owner is listed (S3's Owner): an in-place change of it reaches the index, of
    a kept version and of the current one, and leaves no pending mark."""
    old = versioned.vput(store, b"old", mtime_ns=1)
    new = versioned.vput(store, b"new", mtime_ns=2)
    _update(store, old.data_id, acl=acl_pb2.Acl(owner="writer"))
    _update(store, new.data_id, acl=acl_pb2.Acl(owner="other"))
    got = store.list_versions(BUCKET, prefix="", after_key="", after_version="", limit=10)
    assert [v.owner for v in got] == ["other", "writer"]
    assert [e.owner for e in store.list(BUCKET)] == ["other"]
    _update(store, new.data_id, acl=_READER)  # no owner recorded: the bucket's tenant's again
    assert [e.owner for e in store.list(BUCKET)] == [""]
    assert store._index.pending() == []
