"""Client of kvtier.datanode.v1.DatanodeService."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtier.clients import base
from kvtier.proto.common.v1 import acl_pb2, common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc, shards_pb2, shards_pb2_grpc


class DatanodeClient(base.BaseClient):
    """Shard storage on one datanode (calls carry the caller's map epoch when one is given)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = datanode_pb2_grpc.DatanodeServiceStub(self.channel)

    async def list_drives(self) -> list[common_pb2.Drive]:
        """The node's drives with current capacity."""
        reply = await self._unary(self._stub.ListDrives, datanode_pb2.ListDrivesRequest())
        return list(reply.drives)


class ShardClient(base.BaseClient):
    """kvtier.datanode.v1.ShardService of one datanode (the control side of shard I/O)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = shards_pb2_grpc.ShardServiceStub(self.channel)

    async def commit_write(self, request: shards_pb2.CommitWriteRequest) -> bool:
        """Make a staged write the object's version on a drive; False when the drive already
        holds a newer version (the write was dropped: superseded)."""
        return not (await self.commit(request)).superseded

    async def commit(
        self, request: shards_pb2.CommitWriteRequest
    ) -> shards_pb2.CommitWriteResponse:
        """commit_write's whole reply: superseded, and then the newer version's stamp."""
        reply: shards_pb2.CommitWriteResponse = await self._unary(self._stub.CommitWrite, request)
        return reply

    async def abort_write(self, drive_id: str, write_id: str) -> None:
        """Drop a staged write."""
        request = shards_pb2.AbortWriteRequest(drive_id=drive_id, write_id=write_id)
        await self._unary(self._stub.AbortWrite, request)

    async def read_meta(
        self, drive_id: str, bucket: str, key: str, version_id: str = ""
    ) -> datanode_pb2.ShardMeta:
        """The object's metadata on a drive (version_id: that S3 version's; NotFound when
        absent)."""
        request = shards_pb2.ReadMetaRequest(
            drive_id=drive_id, bucket=bucket, key=key, version_id=version_id
        )
        reply: shards_pb2.ReadMetaResponse = await self._unary(self._stub.ReadMeta, request)
        return reply.meta

    async def update_meta(
        self,
        drive_id: str,
        bucket: str,
        key: str,
        data_id: str,
        *,
        tags: Mapping[str, str] | None = None,
        acl: acl_pb2.Acl | None = None,
        changed_unix_ns: int = 0,
    ) -> datanode_pb2.ShardMeta:
        """Replace the tags (when tags is not None; empty removes them) and/or the ACL (when
        given) of version data_id on a drive, in place, unless the drive holds a change later
        than changed_unix_ns; the stored meta. NotFound when the drive holds no such object,
        PreconditionFailed when it holds another version."""
        request = shards_pb2.UpdateMetaRequest(
            drive_id=drive_id, bucket=bucket, key=key, data_id=data_id,
            replace_tags=tags is not None, tags=dict(tags or {}), acl=acl,
            changed_unix_ns=changed_unix_ns,
        )  # fmt: skip
        reply: shards_pb2.UpdateMetaResponse = await self._unary(self._stub.UpdateMeta, request)
        return reply.meta

    async def delete_shard(
        self,
        drive_id: str,
        bucket: str,
        key: str,
        version_id: str = "",
        if_data_id: str = "",
        *,
        restore_previous: bool = False,
    ) -> bool:
        """Remove the object's shard from a drive (version_id: that S3 version only;
        if_data_id: only when the current version is that one; restore_previous: the undo of a
        failed commit, which brings back the version it replaced where the drive keeps it);
        whether one was removed."""
        request = shards_pb2.DeleteShardRequest(
            drive_id=drive_id, bucket=bucket, key=key, version_id=version_id,
            if_data_id=if_data_id, restore_previous=restore_previous,
        )  # fmt: skip
        reply: shards_pb2.DeleteShardResponse = await self._unary(self._stub.DeleteShard, request)
        return reply.deleted

    async def list_shards(
        self,
        drive_id: str,
        bucket: str,
        prefix: str,
        start_after: str,
        limit: int,
        *,
        versions: bool = False,
        start_after_version: str = "",
    ) -> list[shards_pb2.ShardEntry]:
        """Sorted entries of a drive's index (versions: every S3 version, newest first per
        key, after start_after's version start_after_version when given)."""
        request = shards_pb2.ListShardsRequest(
            drive_id=drive_id, bucket=bucket, prefix=prefix, start_after=start_after, limit=limit,
            versions=versions, start_after_version=start_after_version,
        )  # fmt: skip
        reply: shards_pb2.ListShardsResponse = await self._unary(self._stub.ListShards, request)
        return list(reply.entries)

    async def verify_shard(
        self, drive_id: str, bucket: str, key: str, version_id: str = ""
    ) -> shards_pb2.VerifyShardResponse:
        """The object's bad blocks on a drive (version_id: that S3 version's)."""
        request = shards_pb2.VerifyShardRequest(
            drive_id=drive_id, bucket=bucket, key=key, version_id=version_id
        )
        return await self._unary(self._stub.VerifyShard, request)
