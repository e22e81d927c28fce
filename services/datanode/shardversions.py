"""A drive's ShardStore on keys of versioned buckets: commits that keep the earlier versions,
reads, removals and listings of one version (layout and crash rules: services.datanode.versionstore;
only metas written with `keep_versions` take this path).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from kvtier import errors, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import index, shardbase, shardfiles, shardmeta, versionstore


class VersionedShards(shardbase.ShardStoreBase):
    """The S3-version operations of a drive's shard store (callers of the private ones hold the
    key's lock)."""

    def _install_versioned(
        self, object_dir: Path, meta: datanode_pb2.ShardMeta, data_dir: Path | None
    ) -> None:
        """Commit a version that keeps the key's earlier ones (caller holds the key's lock)."""
        current = self._current_meta(object_dir)
        shardfiles.makedirs_durable(object_dir)
        if data_dir is not None:
            target = object_dir / meta.data_id
            if target.is_dir():
                shardfiles.replace_files(data_dir, target)  # healing: the same version again
            else:
                os.rename(data_dir, target)
            shardfiles.fsync_dir(object_dir)
        self._index.mark_pending(meta.bucket, meta.key)
        new_id = objversions.version_id(meta)
        if current is not None and objversions.order(current) > objversions.order(meta):
            # A concurrent write that lost: it is a non-current version (a null one only when
            # no newer null version is here).
            held = versionstore.find(object_dir, current, new_id, shardmeta.decode_meta)
            if held is None or objversions.order(held) <= objversions.order(meta):
                versionstore.write_version(
                    self._tmp,
                    object_dir,
                    shardmeta.encode_meta(meta),
                    new_id,
                    shardfiles.write_synced,
                )
        else:
            if current is not None and objversions.order(current) != objversions.order(meta):
                old_id = objversions.version_id(current)
                if old_id != new_id:  # a null version replaces the null version
                    versionstore.write_version(
                        self._tmp,
                        object_dir,
                        shardmeta.encode_meta(current),
                        old_id,
                        shardfiles.write_synced,
                    )
            staged = self._tmp / f"meta-{uuid.uuid4().hex}"
            shardfiles.write_synced(staged, shardmeta.encode_meta(meta))
            os.replace(staged, object_dir / shardmeta.META_FILE)
            shardfiles.fsync_dir(object_dir)
            if new_id == objversions.NULL:
                versionstore.drop_version(object_dir, objversions.NULL)
            current = meta
        self._reindex_versions(object_dir, meta.bucket, meta.key, current)

    def _refuse_as_current(self, object_dir: Path, meta: datanode_pb2.ShardMeta) -> None:
        """A heal of a non-current version must not become (or outrank) the key's current
        version here: PreconditionFailed unless the drive's current version is newer, so the
        commit below keeps meta as a non-current one (caller holds the key's lock)."""
        if not meta.keep_versions:
            raise errors.InvalidArgument(f"{meta.bucket}/{meta.key}: not a versioned write")
        current = self._current_meta(object_dir)
        if current is None or objversions.order(current) <= objversions.order(meta):
            raise errors.PreconditionFailed(
                f"{meta.bucket}/{meta.key}: the current version here is not newer than "
                f"{objversions.version_id(meta)}: heal the current version first"
            )

    def _reindex_versions(
        self, object_dir: Path, bucket: str, key: str, current: datanode_pb2.ShardMeta | None
    ) -> None:
        """Drop unreferenced data dirs and index a versioned key's current entry and versions."""
        others = versionstore.noncurrent(object_dir, current, shardmeta.decode_meta)
        versionstore.prune(object_dir, current, others, shardmeta.is_inline)
        entry, rows = versionstore.entries(current, others)
        self._index.put_key(bucket, key, entry, rows)

    def read_version(self, bucket: str, key: str, version: str) -> datanode_pb2.ShardMeta:
        """One S3 version of the key ("null" or a data_id), current or not; NotFound."""
        object_dir = self._object_dir(bucket, key)
        objversions.check(version)
        found = versionstore.find(
            object_dir, self._current_meta(object_dir), version, shardmeta.decode_meta
        )
        if found is None or found.bucket != bucket or found.key != key:
            raise errors.NotFound(f"{bucket}/{key}: no version {version} on this drive")
        return found

    def delete_version(self, bucket: str, key: str, version: str, if_data_id: str = "") -> bool:
        """Remove one S3 version of the key; the current one is replaced by the newest
        non-current one (one rename), or the key is gone when none is left. False: absent, or
        (if_data_id) that version is not the one with this data_id (a newer null version)."""
        object_dir = self._object_dir(bucket, key)
        objversions.check(version)
        if (bucket, key) in self._journaled:
            self.checkpoint()  # a replay must not bring back a removed journaled version
        with self._key_lock(object_dir):
            current = self._current_meta(object_dir)
            if if_data_id:
                found = versionstore.find(object_dir, current, version, shardmeta.decode_meta)
                if found is None or found.data_id != if_data_id:
                    return False
            if current is not None and objversions.version_id(current) == version:
                self._index.mark_pending(bucket, key)
                others = versionstore.noncurrent(object_dir, current, shardmeta.decode_meta)
                if others:
                    newest = objversions.version_id(others[0])
                    os.replace(
                        versionstore.path_of(object_dir, newest), object_dir / shardmeta.META_FILE
                    )
                    shardfiles.fsync_dir(object_dir / versionstore.VERSIONS_DIR)
                    current = others[0]
                else:
                    os.unlink(object_dir / shardmeta.META_FILE)
                    current = None
                shardfiles.fsync_dir(object_dir)
            elif versionstore.drop_version(object_dir, version):
                self._index.mark_pending(bucket, key)
            else:
                return False
            self._reindex_versions(object_dir, bucket, key, current)
            if current is None:
                with contextlib.suppress(OSError):
                    (object_dir / versionstore.VERSIONS_DIR).rmdir()
                    object_dir.rmdir()
        return True

    def list_versions(
        self, bucket: str, prefix: str, after_key: str, after_version: str, limit: int
    ) -> list[index.VersionEntry]:
        """Up to limit versions (ShardIndex.list_versions) after the version after_version
        of after_key (empty, or not indexed here: after the whole key)."""
        names.check_stored_bucket(bucket)
        if limit < 1:
            raise errors.InvalidArgument(f"limit {limit}: must be positive")
        after = None
        if after_version:
            after = self._index.version_of(bucket, after_key, objversions.check(after_version))
        return self._index.list_versions(bucket, prefix, after_key, after, limit)
