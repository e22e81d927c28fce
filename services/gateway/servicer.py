"""gRPC surface of the gateway (thin)."""

from __future__ import annotations

from kvtier import clustermap, rpc
from kvtier.proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves the gateway's watched copy of the cluster map."""

    def __init__(self, view: clustermap.MapView) -> None:
        self._view = view

    async def GetClusterMap(
        self, request: gateway_pb2.GetClusterMapRequest, context: rpc.ServicerContext
    ) -> gateway_pb2.GetClusterMapResponse:
        current = self._view.newer_than(request.known_epoch)
        if current is None:
            return gateway_pb2.GetClusterMapResponse(unchanged=True)
        return gateway_pb2.GetClusterMapResponse(map=current)
