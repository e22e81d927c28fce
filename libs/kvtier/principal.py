"""Who is calling: the authenticated principal of the request being served.

Every entry point (the gRPC interceptor in `kvtier.rpc`, the S3 front, data-plane sessions)
authenticates its caller and then acts on a `Principal`:

- a **service** (a kvtier node: metadata, datanode, kvcache, gateway), identified by the cluster
  certificate it presented over mutual TLS (`kvtier.pki`);
- an **operator** (a person or tool holding a certificate of role `operator`): an admin;
- a **user** (an access key of `kvtier admin user`), identified by a session token
  (`kvtier.tokens`) or a SigV4 signature (S3): acts for its tenant; admins may act for others,
  but only when they name the tenant explicitly;
- `INSECURE`: a cluster explicitly run without authentication (`insecure = true`): every
  caller is this one, with every right (benchmarks and trusted test rigs only).

`current()` is the principal of the gRPC call being served (set by the interceptor; anonymous
outside a call). Never imports grpc.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum

from kvtier import errors

#: The tenant of requests that name none.
DEFAULT_TENANT = "default"
_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_TENANT_BYTES = 64

#: Service roles (certificate roles of kvtier nodes).
SERVICE_ROLES = ("metadata", "datanode", "kvcache", "gateway")
#: The certificate role of operators (people and tools with admin rights).
OPERATOR_ROLE = "operator"


def check_tenant(tenant: str) -> str:
    """tenant, if it is a valid tenant name (1-64 of [A-Za-z0-9._-]); else InvalidArgument."""
    if not 0 < len(tenant) <= MAX_TENANT_BYTES or not set(tenant) <= _TENANT_CHARS:
        raise errors.InvalidArgument(
            f"tenant must be 1-{MAX_TENANT_BYTES} characters of [A-Za-z0-9._-], got {tenant!r}"
        )
    return tenant


class Kind(enum.Enum):
    """What kind of caller a principal is."""

    ANONYMOUS = "anonymous"
    USER = "user"
    SERVICE = "service"
    OPERATOR = "operator"
    INSECURE = "insecure"


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller (see the module docstring)."""

    kind: Kind
    #: user: the access key; service and operator: the name in its certificate.
    name: str = ""
    #: service: metadata, datanode, kvcache or gateway; operator: "operator"; else "".
    role: str = ""
    #: user: its tenant; everyone else: "" (they act for a tenant only when they name one).
    tenant: str = ""
    #: users with the admin flag; operators and INSECURE always.
    is_admin: bool = False
    #: May map a node's whole arena over shared memory or RDMA (services, operators, INSECURE,
    #: and users whose credential an admin marked trusted for same-host shared memory).
    shm_trusted: bool = False

    @property
    def authenticated(self) -> bool:
        """Anything but ANONYMOUS."""
        return self.kind is not Kind.ANONYMOUS

    @property
    def is_service(self) -> bool:
        """A kvtier node (any role)."""
        return self.kind is Kind.SERVICE

    @property
    def privileged(self) -> bool:
        """Services, operators, admins and INSECURE: may act for any tenant (explicitly)."""
        return self.is_admin or self.kind in (Kind.SERVICE, Kind.OPERATOR, Kind.INSECURE)

    def acting_tenant(self, requested: str = "") -> str:
        """The tenant a request acts for.

        A user acts for its own tenant: `requested` must be empty or equal to it, unless the
        user is an admin. Services, operators and admins act for `requested` (the default tenant
        when empty). Raises PermissionDenied for a user naming another tenant, InvalidArgument
        for a malformed name, Unauthenticated for an anonymous caller.
        """
        if not self.authenticated:
            raise errors.Unauthenticated("this operation needs an authenticated caller")
        if requested:
            check_tenant(requested)
        if self.kind is Kind.USER and not self.is_admin:
            if requested and requested != self.tenant:
                raise errors.PermissionDenied(
                    f"user {self.name} of tenant {self.tenant} may not act for tenant {requested}"
                )
            return self.tenant
        if self.kind is Kind.USER and not requested:
            return self.tenant
        return requested or DEFAULT_TENANT

    def may_use(self, tenant: str) -> bool:
        """Whether this caller may touch a resource of tenant (its own; privileged: any)."""
        return self.privileged or (self.kind is Kind.USER and tenant == self.tenant)

    def describe(self) -> str:
        """A short text for logs and errors (never a secret)."""
        if self.kind is Kind.USER:
            return f"user {self.name} (tenant {self.tenant}{', admin' if self.is_admin else ''})"
        if self.kind in (Kind.SERVICE, Kind.OPERATOR):
            return f"{self.role} {self.name}"
        return str(self.kind.value)


ANONYMOUS = Principal(Kind.ANONYMOUS)
INSECURE = Principal(Kind.INSECURE, name="insecure", is_admin=True, shm_trusted=True)


def service(role: str, name: str) -> Principal:
    """A kvtier node of role (from its certificate)."""
    if role == OPERATOR_ROLE:
        return Principal(Kind.OPERATOR, name=name, role=role, is_admin=True, shm_trusted=True)
    if role not in SERVICE_ROLES:
        raise errors.PermissionDenied(f"certificate role {role!r} is not a kvtier role")
    return Principal(Kind.SERVICE, name=name, role=role, shm_trusted=True)


def user(access_key: str, tenant: str, *, is_admin: bool, shm_trusted: bool) -> Principal:
    """A user of tenant (from a session token or an S3 signature)."""
    return Principal(
        Kind.USER, name=access_key, tenant=tenant, is_admin=is_admin, shm_trusted=shm_trusted
    )


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "kvtier_principal", default=ANONYMOUS
)


def current() -> Principal:
    """The principal of the gRPC call being served (ANONYMOUS outside a call)."""
    return _current.get()


def bind(principal: Principal) -> contextvars.Token[Principal]:
    """Make principal the current one (the interceptor does this for each call)."""
    return _current.set(principal)


def unbind(token: contextvars.Token[Principal]) -> None:
    """Undo a bind()."""
    _current.reset(token)
