"""kvtier.common.v1.DataPlaneService: transport negotiation and RDMA set-up over gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from kvtier import principal, rpc
from kvtier.proto.common.v1 import common_pb2, common_pb2_grpc
from kvtier.transport import dataplane

if TYPE_CHECKING:  # transports load lazily, by name (registry.load); rdma is only a type here
    from kvtier.transport import rdma


class DataPlaneServicer(common_pb2_grpc.DataPlaneServiceServicer):
    """Thin: decode, ask the node's DataPlane, encode."""

    def __init__(self, plane: dataplane.DataPlane) -> None:
        self._plane = plane

    async def OpenDataPlane(
        self, request: common_pb2.OpenDataPlaneRequest, context: rpc.ServicerContext
    ) -> common_pb2.OpenDataPlaneResponse:
        return self._plane.open(request, principal.current())

    async def ConnectRdma(
        self, request: common_pb2.ConnectRdmaRequest, context: rpc.ServicerContext
    ) -> common_pb2.ConnectRdmaResponse:
        session = self._plane.issuer.check_token(request.token, "rdma")
        server = cast("rdma.Server", self._plane.server("rdma"))
        accepted = await server.accept(request.client, session)
        return common_pb2.ConnectRdmaResponse(server=accepted)
