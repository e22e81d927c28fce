"""Client of kvtier.gateway.v1.GatewayService."""

from __future__ import annotations

from typing import Any

from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayClient(base.BaseClient):
    """The front door."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def get_cluster_map(self, known_epoch: int = 0) -> common_pb2.ClusterMap | None:
        """The gateway's copy of the map, or None when its epoch equals known_epoch."""
        reply = await self._unary(
            self._stub.GetClusterMap, gateway_pb2.GetClusterMapRequest(known_epoch=known_epoch)
        )
        return None if reply.unchanged else reply.map
