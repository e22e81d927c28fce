"""UpdateMeta: replace the tags or the ACL of one version of an object on a drive, in place
(the current version or a kept, non-current one of a versioned key).

S3's PutObjectTagging, DeleteObjectTagging and PutObjectAcl change an object's metadata without a
new version: same data_id, mtime and ETag, same shard bytes. The drive's meta file of that version
is rewritten as a commit writes it (`shards.ShardStore.rewrite_meta`: staged, fsync, rename over
the old one, fsync the directory, under the key's lock), so a crash leaves the old meta or the new
one. The listing index holds no tags nor ACL but the ACL's owner (listings show it): a change
of the owner marks the key pending before the rewrite and indexes it again after. No grpc here.
"""

from __future__ import annotations

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.datanode.v1 import shards_pb2 as pb
from services.datanode import shards

#: S3's limits on an object's tags (PutObjectTagging): the gateway checks them first with S3's
#: error codes; the datanode refuses what is beyond them, whoever sends it.
MAX_TAGS = 10
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256


def check_tags(tags: dict[str, str], where: str) -> None:
    """InvalidArgument unless tags are within S3's limits (count, key and value length)."""
    if len(tags) > MAX_TAGS:
        raise errors.InvalidArgument(f"{where}: {len(tags)} tags, at most {MAX_TAGS}")
    for key, value in tags.items():
        if not 0 < len(key) <= MAX_TAG_KEY_CHARS or len(value) > MAX_TAG_VALUE_CHARS:
            raise errors.InvalidArgument(f"{where}: tag {key[:32]!r} is too long or empty")


def update_meta(store: shards.ShardStore, req: pb.UpdateMetaRequest) -> datanode_pb2.ShardMeta:
    """Apply req to the drive's meta of req.bucket/req.key (blocking: run it in the I/O pool).

    Tags are replaced when req.replace_tags (an empty map removes them), the ACL when req.acl is
    set; the rest of the meta stays as it is. The version is req.data_id's, current or kept
    (a non-current S3 version: `ShardStore.rewrite_meta`). Returns the stored meta. Raises
    NotFound when the drive holds no such object, PreconditionFailed (FAILED_PRECONDITION) when
    it holds no version req.data_id, InvalidArgument for an empty data_id or tags beyond S3's
    limits.
    """
    where = f"{req.bucket}/{req.key}"
    if not req.data_id:
        raise errors.InvalidArgument(f"{where}: UpdateMeta needs the version's data_id")
    tags = dict(req.tags)
    if req.replace_tags:
        check_tags(tags, where)

    def change(meta: datanode_pb2.ShardMeta) -> datanode_pb2.ShardMeta:
        if meta.data_id != req.data_id:
            raise errors.PreconditionFailed(
                f"{where}: this drive holds version {meta.data_id}, not {req.data_id}"
            )
        if meta.is_pointer:
            raise errors.InvalidArgument(f"{where}: a pool record has no tags nor ACL of its own")
        if req.changed_unix_ns and req.changed_unix_ns < meta.meta_changed_unix_ns:
            return meta  # a later change is here already: it stays (rewritten unchanged)
        meta.meta_changed_unix_ns = req.changed_unix_ns
        if req.replace_tags:
            meta.tags.clear()
            meta.tags.update(tags)
        if req.HasField("acl"):
            if meta.acl.owner != req.acl.owner:  # listed: the index follows
                store.mark_pending(req.bucket, req.key)
                moved.append(True)
            meta.acl.CopyFrom(req.acl)
        return meta

    moved: list[bool] = []
    stored = store.rewrite_meta(req.bucket, req.key, change, data_id=req.data_id)
    if moved:
        store.reindex(req.bucket, req.key)
    return stored
