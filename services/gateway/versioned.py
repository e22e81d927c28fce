"""Deletes in S3-versioned buckets, between the object front (which checks access and names the
storage bucket) and the engine: a delete marker written as the key's new current version, or
one version removed for good (docs/s3.md, "Versioning")."""

from __future__ import annotations

import uuid

from kvtier import errors, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import objects, placement, versions


async def delete(
    engine: objects.ObjectEngine,
    stored: str,
    key: str,
    status: int,
    version_id: str = "",
    *,
    owner: str = "",
) -> pb.ObjectInfo:
    """Delete bucket/key (stored: a storage name; status: the bucket's versioning status).
    Without version_id: unversioned, the object goes (an empty info); versioned, a delete
    marker is written (its info). With version_id: that version is removed for good (the info
    of what was removed, a marker or not; absent: fine, an info with that id only). owner:
    the tenant recorded as a marker's owner (`put_marker`)."""
    if version_id:
        try:
            found = await engine.resolve(stored, key, version_id=version_id, markers=True)
        except errors.NotFound:
            return pb.ObjectInfo(version_id=objversions.check(version_id))
        await delete_version(engine, stored, key, version_id)
        return versions.info(found.meta)
    if not status:
        await engine.delete(stored, key)
        return pb.ObjectInfo()
    null = status == metadata_pb2.VERSIONING_STATUS_SUSPENDED
    return versions.info(await put_marker(engine, stored, key, null=null, owner=owner))


async def delete_version(
    engine: objects.ObjectEngine, bucket: str, key: str, version_id: str
) -> None:
    """Remove one S3 version of bucket/key from every drive of its set (pool 0: where a
    versioned bucket's versions live; the newest remaining one becomes current there)."""
    names.check_stored(bucket, key)
    objversions.check(version_id)
    await engine.delete_in(bucket, key, placement.FIRST_POOL, version_id=version_id)


async def put_marker(
    engine: objects.ObjectEngine, bucket: str, key: str, *, null: bool, owner: str = ""
) -> datanode_pb2.ShardMeta:
    """Write an S3 delete marker as the key's new current version (null: the "null" version,
    a Suspended bucket's), committed like an empty small object; its metadata. owner: its
    deleter's tenant when another than the bucket's ("": the bucket's), recorded as its ACL's
    owner as a write's is, so that listings show it (S3 lists a marker's deleter)."""
    names.check_stored(bucket, key)
    where = placement.locate(engine.view.current, bucket, key, placement.FIRST_POOL)
    headers = pb.ObjectHeaders(keep_versions=True, null_version=null)
    if owner:
        headers.acl.owner = owner  # grants none: private, as an object's ACL of its writer
    meta = versions.new_meta(bucket, key, where, headers, data_id=uuid.uuid4().hex)
    meta.content_type, meta.delete_marker = "", True
    meta.parts.add(number=1, size=0, shard_bytes=0)
    await engine.commit_shards(where, meta, meta.data_id, set(), small=[b""] * len(where.slots))
    return meta
