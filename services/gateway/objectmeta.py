"""Metadata changes of an object's version in place: its tags and its ACL.

S3's PutObjectTagging, DeleteObjectTagging and PutObjectAcl change no bytes, no ETag and no
LastModified: the current version (or, with a version id, that S3 version, current or not) is
resolved (the read quorum's, `ObjectEngine.resolve`, pool records followed), then every drive of
its set rewrites its meta of that version (UpdateMeta by data_id, all drives at once; a drive
finds a non-current version among the key's kept ones). The change is done once the write quorum
has it, the rule of a commit, and decided there (fanout.each_drive: a silent datanode is left
behind after the straggler grace, at once while it is suspect, its call running on to its own
deadline); drives that missed it are queued for healing, which rewrites their
shard of the current version with the prevailing meta (`versions.prevailing`: the latest change,
`meta_changed_unix_ns`, stamped once per change and sent to every drive; a drive never takes an
older change than it holds, so concurrent changes converge on the later one; a read of a
non-current version takes the prevailing meta of the drives it asks). A current version replaced
meanwhile (a concurrent PUT won on the drives) keeps the change when the drives kept it (a
versioned key: the change came first); gone from them, the key is resolved again and the change
applied to the new version, as S3 orders the two requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Protocol

from kvtier import errors, objversions
from kvtier.proto.common.v1 import acl_pb2, common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import datanodes as datanodes_mod
from services.gateway import fanout, healqueue, versions

log = logging.getLogger(__name__)

#: Resolutions of a key before a change gives up on versions replaced under it (Unavailable).
ATTEMPTS = 3


class Resolve(Protocol):
    """`ObjectEngine.resolve`: the current version of bucket/key, or version_id's."""

    def __call__(
        self, bucket: str, key: str, *, version_id: str = ""
    ) -> Awaitable[versions.Resolved]: ...


class MetaUpdater:
    """Tags and ACL of versions, changed in place (see the module docstring)."""

    def __init__(
        self,
        nodes: datanodes_mod.Datanodes,
        resolve: Resolve,
        heal_queue: healqueue.HealQueue,
    ) -> None:
        self._nodes = nodes
        self._resolve = resolve
        self._heal_queue = heal_queue

    async def update(
        self,
        bucket: str,
        key: str,
        *,
        tags: Mapping[str, str] | None = None,
        acl: acl_pb2.Acl | None = None,
        version_id: str = "",
    ) -> datanode_pb2.ShardMeta:
        """Replace the tags (when tags is not None; empty removes them) and/or the ACL (when
        given) of the current version of bucket/key, or of the S3 version version_id (a storage
        name: access is the caller's check). Returns the version's new meta.

        Raises NotFound when there is no such object or version (versions.DeleteMarker for a
        delete marker: it has no tags nor ACL), InvalidArgument for tags beyond S3's
        limits (the datanodes check them), Unavailable below the write quorum or when the
        version kept being replaced for ATTEMPTS resolutions.
        """
        tried = ""
        for _ in range(ATTEMPTS):
            found = await self._resolve(bucket, key, version_id=version_id)
            if found.meta.data_id == tried:  # not replaced: drives behind it refused
                break
            updated = await self._update_version(found, tags, acl)
            if updated is not None:
                return updated
            tried = found.meta.data_id
        raise errors.Unavailable(f"{bucket}/{key}: the write quorum did not take the change")

    async def _update_version(
        self,
        found: versions.Resolved,
        tags: Mapping[str, str] | None,
        acl: acl_pb2.Acl | None,
    ) -> datanode_pb2.ShardMeta | None:
        """The change on every drive of found's set; the new meta, or None when the version
        may have been replaced meanwhile (a drive holds another one)."""
        meta, where = found.meta, found.where
        # One stamp for every drive: the later of two concurrent changes prevails everywhere.
        stamp = max(time.time_ns(), meta.meta_changed_unix_ns + 1)

        async def update(
            slot: common_pb2.DriveSlot,
        ) -> datanode_pb2.ShardMeta | errors.InvalidArgument:
            try:
                return await self._nodes.shards(slot.node_id).update_meta(
                    slot.drive_id, meta.bucket, meta.key, meta.data_id, tags=tags, acl=acl,
                    changed_unix_ns=stamp,
                )  # fmt: skip
            except errors.InvalidArgument as exc:  # an answer: it counts towards the quorum
                return exc

        answers = await fanout.each_drive(
            "update_meta", self._nodes, where.slots, update, where.write_quorum
        )
        refused = [a for a in answers if isinstance(a, errors.InvalidArgument)]
        if refused:
            raise refused[0]  # the change itself is refused: every drive would say so
        done = [a for a in answers if isinstance(a, datanode_pb2.ShardMeta)]
        if len(done) >= where.write_quorum:
            if len(done) < len(where.slots):
                why = f"metadata update applied on {len(done)} of {len(where.slots)} drives"
                self._heal_queue.add((meta.bucket, meta.key), why, objversions.version_id(meta))
            return done[0]
        for slot, answer in zip(where.slots, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning(
                    "meta update of %s/%s on %s: %s", meta.bucket, meta.key, slot.drive_id, answer
                )
        if any(isinstance(a, errors.PreconditionFailed) for a in answers):
            return None  # another version on some drives: maybe replaced, resolve again
        raise errors.Unavailable(
            f"{meta.bucket}/{meta.key}: metadata changed on {len(done)} drives, "
            f"the write quorum is {where.write_quorum}"
        )
