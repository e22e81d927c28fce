"""S3 versions of a key on one drive: the non-current versions kept next to the current one.

Layout (ARCHITECTURE.md, "On-disk format"), in the key's directory `objects/<bucket>/<h[:2]>/<h>/`:

    meta                       the current version (possibly a delete marker)
    versions/<version id>.meta the non-current versions' metas (version id: data_id or "null")
    <data_id>/part.N           the data dir of every version, current or not, that has one

Only metas written with `keep_versions` (a bucket with versioning Enabled or Suspended) take
this path (`ShardStore` calls it); a key of an unversioned bucket never has a `versions` dir.

A commit (crash-safe by the same stage/fsync/rename rules as an unversioned one): the data dir
is renamed into place and `<h>` fsynced → the previous current meta is copied to
`versions/<its id>.meta` (staged, fsynced, renamed, `versions` fsynced) → the new meta replaces
`meta` by rename (fsync `<h>`) → the superseded null version's file and unreferenced data dirs
are removed. A crash between two steps leaves a version both current and in `versions/`, or a
stale `versions/null.meta` under a current null version: a file under `versions/` whose id is the
current version's is a leftover and ignored (readers, listings, the index rebuild). A commit
older than the current version (a concurrent PUT that lost) becomes a non-current version.
Removing one version: a non-current one is unlinked (fsync `versions`); the current one is
replaced by the newest non-current one in one rename (`versions/<v>.meta` over `meta`) or
unlinked when none is left. Callers hold the key's lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import index

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
SUFFIX = ".meta"
ShardMeta = datanode_pb2.ShardMeta
#: shardmeta.decode_meta, shardfiles.write_synced and shardmeta.is_inline (passed in: shardmeta
#: imports this module).
Decode = Callable[[bytes, str], ShardMeta]
Sync = Callable[[Path, bytes], None]
Inline = Callable[[ShardMeta], bool]


def path_of(object_dir: Path, version: str) -> Path:
    """The file of a non-current version."""
    return object_dir / VERSIONS_DIR / f"{objversions.check(version)}{SUFFIX}"


def read_file(path: Path, decode: Decode) -> ShardMeta | None:
    """A meta file's meta; None when absent or unreadable (logged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode(raw, str(path))
    except errors.Corrupt as exc:
        log.warning("unreadable version meta skipped: %s", exc)
        return None


def noncurrent(object_dir: Path, current: ShardMeta | None, decode: Decode) -> list[ShardMeta]:
    """The key's non-current versions, newest first (leftovers of the current's id skipped)."""
    now = objversions.version_id(current) if current is not None else None
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(object_dir / VERSIONS_DIR) as entries:
        for entry in entries:
            if not entry.name.endswith(SUFFIX) or entry.name[: -len(SUFFIX)] == now:
                continue
            meta = read_file(Path(entry.path), decode)
            if meta is not None:
                found.append(meta)
    return sorted(found, key=objversions.order, reverse=True)


def find(
    object_dir: Path, current: ShardMeta | None, version: str, decode: Decode
) -> ShardMeta | None:
    """A version by id (current or not), or None."""
    if current is not None and objversions.version_id(current) == version:
        return current
    if current is not None and objversions.version_id(current) == objversions.NULL == version:
        return current
    return read_file(path_of(object_dir, version), decode)


def find_data(object_dir: Path, data_id: str, decode: Decode) -> ShardMeta | None:
    """A non-current version by its data_id (reads of a version's shard), or None."""
    for name in (data_id, objversions.NULL):
        meta = read_file(object_dir / VERSIONS_DIR / f"{name}{SUFFIX}", decode)
        if meta is not None and meta.data_id == data_id:
            return meta
    return None


def write_version(tmp: Path, object_dir: Path, raw: bytes, version: str, sync: Sync) -> None:
    """Store raw (an encoded meta) as the non-current version `version`, durably."""
    directory = object_dir / VERSIONS_DIR
    if not directory.is_dir():
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        _fsync_dir(object_dir)
    staged = tmp / f"version-{uuid.uuid4().hex}"
    sync(staged, raw)
    os.replace(staged, path_of(object_dir, version))
    _fsync_dir(directory)


def drop_version(object_dir: Path, version: str) -> bool:
    """Unlink a non-current version's file (durably); False when absent."""
    try:
        os.unlink(path_of(object_dir, version))
    except FileNotFoundError:
        return False
    _fsync_dir(object_dir / VERSIONS_DIR)
    return True


def prune(
    object_dir: Path, current: ShardMeta | None, others: list[ShardMeta], inline: Inline
) -> None:
    """Remove the data dirs no version refers to (superseded versions, crash leftovers)."""
    keep = {VERSIONS_DIR}
    for meta in ([current] if current is not None else []) + others:
        if not inline(meta):
            keep.add(meta.data_id)
    stale = []
    with contextlib.suppress(FileNotFoundError), os.scandir(object_dir) as entries:
        stale = [e.path for e in entries if e.name not in keep and e.is_dir(follow_symlinks=False)]
    for path in stale:
        shutil.rmtree(path)


def entries(
    current: ShardMeta | None, others: list[ShardMeta]
) -> tuple[index.ListEntry | None, list[index.VersionEntry]]:
    """What the index holds of a versioned key: its current entry and every version."""
    rows = []
    for meta in ([current] if current is not None else []) + others:
        rows.append(
            index.VersionEntry(
                meta.key, meta.mtime_unix_ns, meta.data_id, objversions.version_id(meta),
                meta.size, meta.etag, meta is current, meta.delete_marker, meta.acl.owner,
            )
        )  # fmt: skip
    if current is None:
        return None, rows
    entry = index.ListEntry(
        current.key, current.size, current.etag, current.mtime_unix_ns, current.is_pointer,
        current.delete_marker, current.acl.owner, current.upload_initiator,
    )  # fmt: skip
    return entry, rows


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
