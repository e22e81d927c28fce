"""The rdma data-plane transport: one-sided RDMA READ/WRITE over reliable-connected queue pairs.

Written against pyverbs (rdma-core's binding; Debian python3-pyverbs), imported inside functions
so hosts without it import this module fine. The server registers each region as memory regions
(MRs) and connects one RC queue pair per client (set up over gRPC ConnectRdma); the client posts
RDMA READ/WRITE work requests with a descriptor's rkey and remote address, and a thread polls the
completion queue. Everything that does not touch a device is in `rdma_logic` (unit-tested).
This module has NOT yet run on an RDMA device: see docs/transports.md, "What has and has not run".

This module is the transport's interface (`registry.load`): NAME, available(), make_server(),
connect(). The server is in `rdma_server`, the client in `rdma_client`, the pyverbs wrapper
in `rdma_device` and the verbs.h constants in `rdma_verbs_consts`.
"""

from __future__ import annotations

import logging

from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, rdma_client, rdma_device, rdma_logic, rdma_server, registry

NAME = rdma_logic.NAME

log = logging.getLogger(__name__)

#: The serving side and the client of this transport.
Server = rdma_server.Server
Client = rdma_client.Client


def available() -> bool:
    """Whether pyverbs imports and at least one RDMA device exists."""
    try:
        return bool(rdma_device.load_verbs().device.get_device_list())
    except Exception as exc:  # ImportError, or PyverbsRDMAError without kernel support
        log.debug("rdma not available: %s", exc)
        return False


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> rdma_server.Server:
    """The serving side (nothing touches the device until start())."""
    return rdma_server.Server(ctx, settings)


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> rdma_client.Client:
    """A connected client. The token travels inside settings.rdma_exchange (ConnectRdma)."""
    client = rdma_client.Client(endpoint, settings)
    try:
        await client.open()
    except BaseException:
        await client.close()
        raise
    return client
