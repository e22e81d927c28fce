"""Transports by name, loaded lazily, and the choice of one per peer.

Each implementation module (`kvtier.transport.tcp`, `.shm`, `.rdma`) provides:
    available() -> bool                                  usable on this host?
    make_server(ctx, settings) -> base.TransportServer   the serving side
    async connect(endpoint, token, settings) -> base.Transport
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base

#: Sends our queue-pair info to the server (gRPC ConnectRdma) and returns the server's.
RdmaExchange = Callable[[common_pb2.RdmaQueuePair], Awaitable[common_pb2.RdmaQueuePair]]

#: Every transport, in default order of preference.
PREFERENCE = ("rdma", "shm", "tcp")
#: Transports that hand a client a whole region (shm: its memfd; rdma: an rkey of the whole
#: MR), whatever its descriptors say: only trusted principals get them (`choose`).
WHOLE_REGION = ("rdma", "shm")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSettings:
    """How a node serves its data plane."""

    host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    #: The host users' sessions are told to dial for tcp (where users reach the node another
    #: way than nodes do: published ports); empty: advertise_host.
    client_advertise_host: str = ""
    tcp_port: int = 0
    #: Where the shm Unix socket lives (a private 0700 directory when empty).
    shm_dir: str = ""
    #: RDMA device to use (empty: the first one found).
    rdma_device: str = ""
    max_inflight_bytes: int = 256 * 1024 * 1024
    #: Data-plane connections one identity (a session principal without its random suffix)
    #: may hold open to this node, over every transport; past it HELLO gets Overloaded.
    max_connections_per_principal: int = 64
    #: Serve the tcp data plane over TLS with the node's certificate (tls_cert_file and
    #: tls_key_file, PEM); its endpoint then reads `tls://host:port`. Off: cleartext, only for
    #: networks the operator trusts (docs/transports.md, "TLS").
    tls: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: The cluster CA (unused by the tcp server: clients authenticate with their token).
    tls_ca_file: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSettings:
    """How a client connects to one peer."""

    #: Parallel connections per peer (tcp).
    connections: int = 4
    #: Bytes in flight to one peer before new requests wait.
    max_inflight_bytes: int = 256 * 1024 * 1024
    #: Deadline of one data-plane operation.
    timeout_s: float = 30.0
    rdma_device: str = ""
    #: The cluster CA (PEM) that a TLS tcp endpoint's certificate must chain to; needed only
    #: for endpoints served over TLS (`tls://host:port`).
    tls_ca_file: str = ""
    #: rdma only: exchanges queue-pair info with the server over gRPC (ConnectRdma).
    rdma_exchange: (
        Callable[[common_pb2.RdmaQueuePair], Awaitable[common_pb2.RdmaQueuePair]] | None
    ) = field(default=None)


def load(name: str) -> ModuleType:
    """The implementation module of a transport; Unavailable when it cannot run here."""
    if name not in PREFERENCE:
        raise errors.InvalidArgument(f"unknown transport {name!r}; known: {', '.join(PREFERENCE)}")
    module = importlib.import_module(f"kvtier.transport.{name}")
    if not module.available():
        raise errors.Unavailable(f"transport {name} is not available on this host")
    return module


@functools.cache
def available() -> tuple[str, ...]:
    """The transports usable on this host, in preference order (probed once per process)."""
    usable = []
    for name in PREFERENCE:
        try:
            load(name)
        except (errors.Unavailable, ImportError):
            continue
        usable.append(name)
    return tuple(usable)


def choose(
    server: common_pb2.DataPlaneCapabilities,
    client: common_pb2.DataPlaneCapabilities,
    allowed: Sequence[str] = PREFERENCE,
    *,
    trusted: bool = True,
) -> common_pb2.TransportEndpoint:
    """The server endpoint: the first of `allowed` both sides offer (shm: same host only; shm
    and rdma only for a `trusted` caller, see WHOLE_REGION).

    Raises PermissionDenied when only transports the caller is not trusted with would do,
    Unavailable when no transport is common at all.
    """
    offered = {e.name: e for e in server.endpoints}
    client_side = {e.name for e in client.endpoints}
    withheld = []
    for name in allowed or PREFERENCE:
        if name not in offered or name not in client_side:
            continue
        if name == "shm" and server.host_id != client.host_id:
            continue
        if name in WHOLE_REGION and not trusted:
            withheld.append(name)
            continue
        return offered[name]
    if withheld:
        raise errors.PermissionDenied(
            f"{' and '.join(withheld)} hand out a node's whole memory region: only services, "
            "operators and users an admin marked trusted for shared memory may use them; "
            "allow tcp"
        )
    raise errors.Unavailable(
        f"no common data-plane transport (server offers {sorted(offered)}, "
        f"client {sorted(client_side)}, allowed {list(allowed)})"
    )


def private_dir() -> str:
    """A fresh 0700 directory for Unix sockets."""
    path = tempfile.mkdtemp(prefix="kvtier-dp-")
    os.chmod(path, 0o700)
    return path


def client_capabilities(names: Sequence[str] | None = None) -> common_pb2.DataPlaneCapabilities:
    """What this process can use as a client."""
    usable = available() if names is None else [n for n in available() if n in names]
    return common_pb2.DataPlaneCapabilities(
        host_id=base.host_id(),
        endpoints=[common_pb2.TransportEndpoint(name=n) for n in usable],
    )


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: ClientSettings
) -> Any:
    """Open a client connection of the endpoint's transport."""
    return await load(endpoint.name).connect(endpoint, token, settings)
