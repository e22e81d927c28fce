"""A node's data plane: its regions, its grants, and a server per enabled transport."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import prometheus_client

from kvtier import errors
from kvtier import principal as principal_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

if TYPE_CHECKING:  # transports load lazily, by name (registry.load); rdma is only a type here
    from kvtier.transport import rdma_server

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


#: Service roles whose data-plane sessions may act for a tenant they name: gateways, which
#: serve tenants' requests (KV buckets, Score over HTTP). Every other node's sessions act for no
#: tenant (a kvcache node moves the durable KV bucket's bytes only), so that its certificate
#: reaches no tenant's blocks or objects over the data plane, as over gRPC (kvtier.authz).
TENANT_SESSION_ROLES = frozenset({"gateway"})

#: Longest caller name kept in a session principal.
_MAX_NAME_CHARS = 128


def _part(name: str) -> str:
    """A caller-chosen name made safe as one part of a session principal: no '/' (which
    separates the parts), no control characters, bounded."""
    cleaned = "".join("_" if c == "/" or not c.isprintable() else c for c in name)
    return cleaned[:_MAX_NAME_CHARS] or "_"


def session_principal(
    caller: principal_mod.Principal, request: common_pb2.OpenDataPlaneRequest
) -> str:
    """The principal of a new data-plane session, minted from its authenticated caller:

    - a user acting for its own tenant: `tenant/access_key/random`;
    - a gateway, operator or admin naming a tenant: `tenant/role:name/random` (`admin:` for
      an admin user; other services may not name one: `TENANT_SESSION_ROLES`);
    - a service or operator naming none: `@role/name/random` (names no tenant);
    - INSECURE (a cluster run without authentication): `tenant/client_id/random`, the tenant
      the request names (default: DEFAULT_TENANT).

    Raises Unauthenticated (anonymous), PermissionDenied (a user naming another tenant, a
    service other than a gateway naming one), InvalidArgument (a malformed tenant; INSECURE
    without client_id).
    """
    suffix = secrets.token_hex(8)
    kind = caller.kind
    if kind is principal_mod.Kind.INSECURE:
        if not request.client_id:
            raise errors.InvalidArgument("client_id is required")
        tenant = check_tenant(request.tenant or DEFAULT_TENANT)
        return f"{tenant}/{_part(request.client_id)}/{suffix}"
    tenant = caller.acting_tenant(request.tenant)  # Unauthenticated, PermissionDenied
    if kind is principal_mod.Kind.USER:
        if tenant == caller.tenant:
            return f"{tenant}/{_part(caller.name)}/{suffix}"
        return f"{tenant}/admin:{_part(caller.name)}/{suffix}"
    if request.tenant:
        if kind is principal_mod.Kind.SERVICE and caller.role not in TENANT_SESSION_ROLES:
            raise errors.PermissionDenied(
                f"{caller.describe()} may not open a data-plane session for a tenant"
            )
        return f"{tenant}/{_part(caller.role or 'admin')}:{_part(caller.name)}/{suffix}"
    return f"{NO_TENANT_MARK}{_part(caller.role)}/{_part(caller.name)}/{suffix}"


def for_users(endpoint: common_pb2.TransportEndpoint, host: str) -> common_pb2.TransportEndpoint:
    """The tcp endpoint as users dial it: its host replaced by host (the node's
    `advertise_client_host`; empty: unchanged), its port and scheme kept. Other transports
    (shm, rdma) are the same for everyone."""
    if not host or endpoint.name != "tcp":
        return endpoint
    scheme, sep, address = endpoint.address.rpartition("://")
    port = address.rpartition(":")[2]
    dialed = common_pb2.TransportEndpoint()
    dialed.CopyFrom(endpoint)
    dialed.address = f"{scheme}{sep}{host}:{port}"
    return dialed


def _authenticated(caller: principal_mod.Principal) -> bool:
    return caller.authenticated


class DataPlane:
    """Regions + issuer + transport servers of one node."""

    def __init__(
        self,
        node_id: str,
        transports: Sequence[str],
        settings: registry.ServerSettings,
        *,
        may_open: Callable[[principal_mod.Principal], bool] = _authenticated,
    ) -> None:
        """may_open: who may open sessions on this node at all (default: every authenticated
        caller; e.g. a datanode admits only gateways and operators)."""
        self.regions = base.RegionTable()
        self.issuer = base.Issuer(node_id)
        self.ctx = base.ServerContext(
            node_id=node_id,
            regions=self.regions,
            issuer=self.issuer,
            max_inflight_bytes=settings.max_inflight_bytes,
            max_connections_per_principal=settings.max_connections_per_principal,
        )
        self._may_open = may_open
        self._wanted = list(transports)
        self._settings = settings
        self._servers: dict[str, base.TransportServer] = {}
        self._owned_dir = ""
        self.capabilities = common_pb2.DataPlaneCapabilities(host_id=base.host_id())

    def grant(
        self,
        region: base.Region,
        offset: int,
        length: int,
        rights: base.Rights,
        principal: str,
        ttl_s: float = 30.0,
    ) -> base.Descriptor:
        """A descriptor of region[offset:offset+length] for principal (`Issuer.grant`), with
        the rkey of its rights when rdma is served here (an rkey is useless without a queue
        pair, which only an rdma token gets). Revoke it with `issuer.revoke(d.grant_id)`."""
        rdma = self._servers.get("rdma")
        if rdma is not None:
            return cast("rdma_server.Server", rdma).grant(
                region, offset, length, rights, principal, ttl_s
            )
        return self.issuer.grant(region, offset, length, rights, principal, ttl_s)

    def in_use(self, region_id: int, offset: int, length: int) -> bool:
        """Whether region[offset:offset+length] must not be reused yet (`ServerContext.in_use`:
        a transport lease or a live grant): the reuse guard of a pool over a region."""
        return self.ctx.in_use(region_id, offset, length)

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
            settings = dataclasses.replace(settings, shm_dir=self._owned_dir)
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

    def open(
        self, request: common_pb2.OpenDataPlaneRequest, caller: principal_mod.Principal
    ) -> common_pb2.OpenDataPlaneResponse:
        """Negotiate a transport for an authenticated caller, mint its session principal
        (`session_principal`) and issue a token for that transport only.

        shm and rdma are only chosen for callers trusted with whole regions
        (`caller.shm_trusted`). Raises Unauthenticated (anonymous), PermissionDenied (refused by
        may_open, a user naming another tenant, only untrusted-for transports allowed),
        InvalidArgument, Unavailable (no common transport).
        """
        if not caller.authenticated:
            raise errors.Unauthenticated(
                "opening a data-plane session needs an authenticated caller"
            )
        if not self._may_open(caller):
            raise errors.PermissionDenied(
                f"{caller.describe()} may not open data-plane sessions on this node"
            )
        principal = session_principal(caller, request)
        endpoint = registry.choose(
            self.capabilities, request.client, list(request.allowed), trusted=caller.shm_trusted
        )
        if caller.kind is principal_mod.Kind.USER:  # users come in through the client port
            endpoint = for_users(endpoint, self._settings.client_advertise_host)
        token, expires = self.issuer.issue_token(principal, transport=endpoint.name)
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
