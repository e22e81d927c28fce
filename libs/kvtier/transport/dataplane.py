"""A node's data plane: its regions, its grants, and a server per enabled transport."""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Sequence

import prometheus_client

from kvtier import errors
from kvtier import principal as principal_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

log = logging.getLogger(__name__)

OPENED = prometheus_client.Counter(
    "kvtier_dataplane_opened_total",
    "Data-plane sessions negotiated, by chosen transport",
    ["transport"],
)


#: The tenant of a session that names none.
DEFAULT_TENANT = principal_mod.DEFAULT_TENANT
MAX_TENANT_BYTES = principal_mod.MAX_TENANT_BYTES
check_tenant = principal_mod.check_tenant

#: Session principals of services, operators and admins that act for no tenant start with this
#: (followed by the role): no tenant name can (`check_tenant` refuses '@').
NO_TENANT_MARK = "@"


def tenant_of(principal: str) -> str:
    """The tenant a session's principal acts for (principals are `tenant/who/suffix`; a session
    acting for no tenant has `@role` in place of the tenant, which names no tenant)."""
    return principal.split("/", 1)[0]


def role_of(principal: str) -> str:
    """The service role of a session that acts for no tenant (`@gateway/...` -> "gateway"),
    else "" (a tenant's session)."""
    head = tenant_of(principal)
    return head[1:] if head.startswith(NO_TENANT_MARK) else ""


class DataPlane:
    """Regions + issuer + transport servers of one node."""

    def __init__(
        self,
        node_id: str,
        transports: Sequence[str],
        settings: registry.ServerSettings,
    ) -> None:
        self.regions = base.RegionTable()
        self.issuer = base.Issuer(node_id)
        self.ctx = base.ServerContext(
            node_id=node_id,
            regions=self.regions,
            issuer=self.issuer,
            max_inflight_bytes=settings.max_inflight_bytes,
        )
        self._wanted = list(transports)
        self._settings = settings
        self._servers: dict[str, base.TransportServer] = {}
        self._owned_dir = ""
        self.capabilities = common_pb2.DataPlaneCapabilities(host_id=base.host_id())

    def server(self, name: str) -> base.TransportServer:
        """The running server of a transport (rdma needs it for queue-pair set-up)."""
        try:
            return self._servers[name]
        except KeyError:
            raise errors.Unavailable(f"transport {name} is not served here") from None

    async def start(self) -> common_pb2.DataPlaneCapabilities:
        """Start every wanted transport that can run here; logs the ones that cannot."""
        settings = self._settings
        if "shm" in self._wanted and not settings.shm_dir:
            self._owned_dir = registry.private_dir()
            settings = registry.ServerSettings(
                host=settings.host,
                advertise_host=settings.advertise_host,
                tcp_port=settings.tcp_port,
                shm_dir=self._owned_dir,
                rdma_device=settings.rdma_device,
                max_inflight_bytes=settings.max_inflight_bytes,
            )
        for name in self._wanted:
            try:
                module = registry.load(name)
            except (errors.Unavailable, ImportError) as exc:
                log.info("data-plane transport %s not started: %s", name, exc)
                continue
            server = module.make_server(self.ctx, settings)
            endpoint = await server.start()
            self._servers[name] = server
            self.capabilities.endpoints.append(endpoint)
            log.info("data-plane transport %s serving at %s", name, endpoint.address or "-")
        if not self._servers:
            raise errors.Unavailable(f"none of the data-plane transports {self._wanted} can run")
        return self.capabilities

    def open(self, request: common_pb2.OpenDataPlaneRequest) -> common_pb2.OpenDataPlaneResponse:
        """Negotiate a transport for a client and issue its connection token."""
        if not request.client_id:
            raise errors.InvalidArgument("client_id is required")
        tenant = check_tenant(request.tenant or DEFAULT_TENANT)
        endpoint = registry.choose(self.capabilities, request.client, list(request.allowed))
        principal = f"{tenant}/{request.client_id}/{secrets.token_hex(8)}"
        token, expires = self.issuer.issue_token(principal)
        OPENED.labels(endpoint.name).inc()
        log.info("data plane opened for %s over %s", principal, endpoint.name)
        return common_pb2.OpenDataPlaneResponse(
            transport=endpoint.name,
            endpoint=endpoint,
            token=token,
            token_expires_at_unix_ms=expires,
            principal=principal,
        )

    async def stop(self) -> None:
        """Stop every transport server, then release the regions. Idempotent."""
        servers, self._servers = self._servers, {}
        for server in servers.values():
            await server.stop()
        self.regions.close()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = ""
