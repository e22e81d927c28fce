"""Object versions as the gateway sees them: the resolved version of an object, its metadata
(new versions, parts, the API's ObjectInfo) and the content hashers. Pure: no I/O."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping, Sequence

from kvtier import checksums, errors, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import placement

CHECKSUMS = checksums.ALGORITHMS


def new_hasher(name: str) -> checksums.Checksum:
    """A hasher (update/digest) for an S3 checksum algorithm; InvalidArgument when unknown."""
    return checksums.new(name)


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """An object's current version: its metadata (from one drive) and where its shards are."""

    meta: datanode_pb2.ShardMeta
    where: placement.Placement
    #: Shard index -> whether that drive holds this version.
    holders: frozenset[int]
    #: Shard index -> that drive's shard of a small version (its framed blocks, from the meta
    #: read: reads.Reader needs no further call for them).
    inline: Mapping[int, bytes] = dataclasses.field(default_factory=dict)


class DeleteMarker(errors.NotFound):
    """The version asked for (the key's current one, or one by id) is an S3 delete marker."""

    def __init__(self, message: str, *, version_id: str, by_id: bool) -> None:
        super().__init__(message)
        self.version_id = version_id
        #: asked for by its version id (S3: 405 MethodNotAllowed), not as the current one (404)
        self.by_id = by_id


def versioning(status: int) -> tuple[bool, bool]:
    """(keep_versions, null_version) of a write into a bucket of versioning status (the
    metadata proto's VersioningStatus: 0 never enabled, 1 Enabled, 2 Suspended)."""
    return status != 0, status == 2


def mark_versioning(headers: pb.ObjectHeaders, status: int) -> None:
    """Set the write's versioning from the bucket's status (whatever the caller sent)."""
    headers.keep_versions, headers.null_version = versioning(status)


def new_meta(
    bucket: str, key: str, where: placement.Placement, h: pb.ObjectHeaders, *, data_id: str
) -> datanode_pb2.ShardMeta:
    """The metadata of a new version of bucket/key with headers h on where's drives (size,
    ETag, checksums and parts are the caller's to fill). Its mtime is provisional: the engine
    stamps the version from its hybrid logical clock when it commits (commits.py)."""
    return datanode_pb2.ShardMeta(
        bucket=bucket, key=key,
        content_type=h.content_type or "application/octet-stream",
        content_encoding=h.content_encoding, content_disposition=h.content_disposition,
        cache_control=h.cache_control, expires=h.expires, content_language=h.content_language,
        user_metadata=dict(h.user_metadata), tags=dict(h.tags), mtime_unix_ns=time.time_ns(),
        acl=h.acl, data_shards=where.data_shards, parity_shards=where.parity_shards,
        distribution=list(where.positions), data_id=data_id,
        keep_versions=h.keep_versions, null_version=h.keep_versions and h.null_version,
    )  # fmt: skip


def part_at(meta: datanode_pb2.ShardMeta, offset: int) -> tuple[datanode_pb2.ShardMeta.Part, int]:
    """The part holding object byte `offset` and where that part starts (an offset at the end
    gives the last part)."""
    start = 0
    for part in meta.parts:
        if offset < start + part.size:
            return part, start
        start += part.size
    if not meta.parts:
        raise errors.Corrupt(f"{meta.bucket}/{meta.key}: metadata lists no parts")
    last = meta.parts[-1]
    return last, start - last.size


def info(meta: datanode_pb2.ShardMeta) -> pb.ObjectInfo:
    """The API's view of a stored version (its bucket by the user-facing name)."""
    return pb.ObjectInfo(
        bucket=names.user_bucket(meta.bucket), key=meta.key, size=meta.size, etag=meta.etag,
        mtime_unix_ms=meta.mtime_unix_ns // 1_000_000,
        headers=pb.ObjectHeaders(
            content_type=meta.content_type, content_encoding=meta.content_encoding,
            content_disposition=meta.content_disposition, cache_control=meta.cache_control,
            expires=meta.expires, content_language=meta.content_language,
            user_metadata=dict(meta.user_metadata), tags=dict(meta.tags), acl=meta.acl,
            keep_versions=meta.keep_versions, null_version=meta.null_version,
        ),
        checksums=dict(meta.checksums), parts=len(meta.parts),
        version_id=objversions.version_id(meta), delete_marker=meta.delete_marker,
    )  # fmt: skip


def prevailing(metas: Sequence[datanode_pb2.ShardMeta]) -> datanode_pb2.ShardMeta:
    """Of metas of one version (from the drives holding it), one with the latest in-place change
    of its tags and ACL (objectmeta stamps each change once, `meta_changed_unix_ns`): a drive
    that missed a change, or took an older concurrent one, is outvoted; among metas of one stamp
    (none should differ) the variant most hold (ties: the first, in shard order)."""
    if len(metas) == 1:
        return metas[0]
    latest = max(m.meta_changed_unix_ns for m in metas)
    metas = [m for m in metas if m.meta_changed_unix_ns == latest]
    variants = collections.Counter(_changeable(m) for m in metas)
    best = variants.most_common(1)[0][0]
    return next(m for m in metas if _changeable(m) == best)


def same_changes(a: datanode_pb2.ShardMeta, b: datanode_pb2.ShardMeta) -> bool:
    """Whether two metas of one version agree on what objectmeta changes in place."""
    return _changeable(a) == _changeable(b)


def _changeable(meta: datanode_pb2.ShardMeta) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    """What an in-place change may differ in: its stamp, the tags and the ACL."""
    return (
        meta.meta_changed_unix_ns,
        tuple(sorted(meta.tags.items())),
        meta.acl.SerializeToString(deterministic=True),
    )
