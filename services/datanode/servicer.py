"""gRPC surface of a datanode (thin)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvtier import rpc
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc, shards_pb2, shards_pb2_grpc
from services.datanode import drives, shardserver


def describe(local: Sequence[drives.LocalDrive]) -> list[common_pb2.Drive]:
    """The drives as protobuf messages, with capacity read now (blocking: statvfs)."""
    described = []
    for drive in local:
        total, free = drive.usage()
        described.append(
            common_pb2.Drive(
                drive_id=drive.drive_id, path=str(drive.path), total_bytes=total, free_bytes=free
            )
        )
    return described


class DatanodeServicer(datanode_pb2_grpc.DatanodeServiceServicer):
    """Serves a datanode's drives."""

    def __init__(self, node_id: str, local: Sequence[drives.LocalDrive]) -> None:
        self._node_id = node_id
        self._drives = local

    async def ListDrives(
        self, request: datanode_pb2.ListDrivesRequest, context: rpc.ServicerContext
    ) -> datanode_pb2.ListDrivesResponse:
        described = await asyncio.to_thread(describe, self._drives)
        return datanode_pb2.ListDrivesResponse(node_id=self._node_id, drives=described)


class ShardServicer(shards_pb2_grpc.ShardServiceServicer):
    """kvtier.datanode.v1.ShardService over the node's `shardserver.ShardNode` (thin)."""

    def __init__(self, node: shardserver.ShardNode) -> None:
        self._node = node

    async def CommitWrite(
        self, request: shards_pb2.CommitWriteRequest, context: rpc.ServicerContext
    ) -> shards_pb2.CommitWriteResponse:
        return await self._node.commit_write(request)

    async def AbortWrite(
        self, request: shards_pb2.AbortWriteRequest, context: rpc.ServicerContext
    ) -> shards_pb2.AbortWriteResponse:
        return await self._node.abort_write(request)

    async def ReadMeta(
        self, request: shards_pb2.ReadMetaRequest, context: rpc.ServicerContext
    ) -> shards_pb2.ReadMetaResponse:
        return await self._node.read_meta(request)

    async def UpdateMeta(
        self, request: shards_pb2.UpdateMetaRequest, context: rpc.ServicerContext
    ) -> shards_pb2.UpdateMetaResponse:
        return await self._node.update_meta(request)

    async def DeleteShard(
        self, request: shards_pb2.DeleteShardRequest, context: rpc.ServicerContext
    ) -> shards_pb2.DeleteShardResponse:
        return await self._node.delete_shard(request)

    async def ListShards(
        self, request: shards_pb2.ListShardsRequest, context: rpc.ServicerContext
    ) -> shards_pb2.ListShardsResponse:
        return await self._node.list_shards(request)

    async def VerifyShard(
        self, request: shards_pb2.VerifyShardRequest, context: rpc.ServicerContext
    ) -> shards_pb2.VerifyShardResponse:
        return await self._node.verify_shard(request)
