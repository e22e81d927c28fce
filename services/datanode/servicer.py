"""gRPC surface of a datanode (thin)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvtier import rpc
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc
from services.datanode import drives


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
