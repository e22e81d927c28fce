"""Client of kvtier.common.v1.NodeService, served by every kvtier process."""

from __future__ import annotations

from typing import Any

from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2, common_pb2_grpc


class NodeClient(base.BaseClient):
    """Asks any node about itself."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = common_pb2_grpc.NodeServiceStub(self.channel)

    async def get_node_info(self) -> common_pb2.GetNodeInfoResponse:
        """The node's identity, the newest map epoch it has seen, and its uptime."""
        return await self._unary(self._stub.GetNodeInfo, common_pb2.GetNodeInfoRequest())
