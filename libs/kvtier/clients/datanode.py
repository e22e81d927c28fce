"""Client of kvtier.datanode.v1.DatanodeService."""

from __future__ import annotations

from typing import Any

from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2, datanode_pb2_grpc


class DatanodeClient(base.BaseClient):
    """Shard storage on one datanode (calls carry the caller's map epoch when one is given)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = datanode_pb2_grpc.DatanodeServiceStub(self.channel)

    async def list_drives(self) -> list[common_pb2.Drive]:
        """The node's drives with current capacity."""
        reply = await self._unary(self._stub.ListDrives, datanode_pb2.ListDrivesRequest())
        return list(reply.drives)
