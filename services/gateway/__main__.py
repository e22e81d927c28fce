"""python -m services.gateway: the stateless front door."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence

import grpc

from kvtier import service
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import config, servicer


def _add_servicers(server: grpc.aio.Server, ctx: service.Context) -> Sequence[str]:
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
        servicer.GatewayServicer(ctx.map_view), server
    )
    return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]


def build(cfg: config.GatewayConfig) -> service.ServiceSpec:
    """The gateway's plug-in to the shared runtime (stateless: a fresh id unless configured)."""
    return service.ServiceSpec(
        role=common_pb2.NODE_ROLE_GATEWAY,
        label="gateway",
        node_id=cfg.node_id or f"gateway-{uuid.uuid4().hex[:8]}",
        add_servicers=_add_servicers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a gateway; returns the process exit code."""
    return service.main(
        config.GatewayConfig,
        "gateway",
        build,
        description="kvtier gateway: the front door (gRPC object API, S3).",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
