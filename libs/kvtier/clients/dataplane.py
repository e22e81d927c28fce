"""Opening a data-plane connection to a node: negotiate over gRPC, then connect the transport."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import prometheus_client

from kvtier.clients import base
from kvtier.proto.common.v1 import common_pb2, common_pb2_grpc
from kvtier.transport import base as transport_base
from kvtier.transport import registry

log = logging.getLogger(__name__)

CONNECTIONS = prometheus_client.Counter(
    "kvtier_dataplane_client_connections_total",
    "Data-plane connections this process opened, by transport",
    ["transport"],
)


@dataclasses.dataclass(frozen=True, slots=True)
class DataPlaneSession:
    """An open data-plane connection to one node."""

    transport: transport_base.Transport
    #: The identity the node grants this session's descriptors to.
    principal: str
    #: "rdma", "shm" or "tcp".
    name: str

    async def close(self) -> None:
        """Close the transport."""
        await self.transport.close()


class DataPlaneClient(base.BaseClient):
    """Negotiates a transport with one node (kvtier.common.v1.DataPlaneService)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = common_pb2_grpc.DataPlaneServiceStub(self.channel)

    async def negotiate(
        self, client_id: str, allowed: Sequence[str] = (), tenant: str = ""
    ) -> common_pb2.OpenDataPlaneResponse:
        """Which transport the node would use with us, and a connection token."""
        request = common_pb2.OpenDataPlaneRequest(
            client_id=client_id,
            client=registry.client_capabilities(list(allowed) or None),
            allowed=list(allowed),
            tenant=tenant,
        )
        return await self._unary(self._stub.OpenDataPlane, request)

    async def open(
        self,
        client_id: str,
        allowed: Sequence[str] = (),
        settings: registry.ClientSettings | None = None,
        tenant: str = "",
    ) -> DataPlaneSession:
        """A connected transport to the node (rdma > shm > tcp unless `allowed` narrows it),
        acting for `tenant` (a user: empty or its own; certificate holders: the tenant they act
        for, empty for none)."""
        reply = await self.negotiate(client_id, allowed, tenant)
        settings = settings or registry.ClientSettings()
        if not settings.tls_ca_file and self.security.ca_file:
            # A tcp endpoint served over TLS is checked against the same CA as gRPC.
            settings = dataclasses.replace(settings, tls_ca_file=self.security.ca_file)
        if reply.transport == "rdma":
            settings = dataclasses.replace(settings, rdma_exchange=self._rdma_exchange(reply.token))
        transport: transport_base.Transport = await registry.connect(
            reply.endpoint, reply.token, settings
        )
        CONNECTIONS.labels(reply.transport).inc()
        log.info("data plane to %s over %s", self.address, reply.transport)
        return DataPlaneSession(transport, reply.principal, reply.transport)

    def _rdma_exchange(self, token: bytes) -> registry.RdmaExchange:
        async def exchange(mine: common_pb2.RdmaQueuePair) -> common_pb2.RdmaQueuePair:
            request = common_pb2.ConnectRdmaRequest(token=token, client=mine)
            reply: common_pb2.ConnectRdmaResponse = await self._unary(
                self._stub.ConnectRdma, request
            )
            return reply.server

        return exchange
