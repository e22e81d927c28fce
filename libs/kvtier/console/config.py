"""`ConsoleConfig`: the console's settings (one frozen dataclass, `kvtier console`'s flags)."""

from __future__ import annotations

import dataclasses

from kvtier import errors
from kvtier.console import throttle

DEFAULT_PORT = 9001
#: Shortest console session: tests of expiry use a few seconds; the cluster's token lives longer.
MIN_SESSION_S = 2.0
#: The cluster's session tokens live 60 s to 12 h (`kvtier.tokens`).
MAX_SESSION_S = 43_200.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ConsoleConfig:
    """How the console serves and which cluster it fronts."""

    #: Address to bind the console's HTTPS port.
    host: str = "127.0.0.1"
    #: The console's HTTPS port (0: any free port, printed at start).
    port: int = DEFAULT_PORT
    #: The console's server certificate and key (PEM): what browsers see.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: The cluster CA: the console verifies every node it calls with it.
    ca_file: str = ""
    #: A metadata node's users' port (host:port): logins (session tokens) and the cluster map.
    metadata_address: str = ""
    #: A console session's lifetime from login (the session token's, at least 60 s).
    session_ttl_s: float = 3600.0
    #: Deadline of each call to the cluster.
    rpc_timeout_s: float = 10.0
    #: Largest object uploaded through the console (a browser form, held in memory).
    max_upload_bytes: int = 16 << 20
    #: When failed logins lock a client address or an access key out (429, Retry-After).
    login_limits: throttle.ThrottleLimits = dataclasses.field(
        default_factory=throttle.ThrottleLimits
    )

    def __post_init__(self) -> None:
        if not (self.tls_cert_file and self.tls_key_file):
            raise errors.InvalidArgument("the console serves HTTPS only: give a certificate")
        if not self.ca_file:
            raise errors.InvalidArgument("the console needs the cluster CA (ca_file)")
        if not self.metadata_address:
            raise errors.InvalidArgument("the console needs a metadata users' address")
        if not MIN_SESSION_S <= self.session_ttl_s <= MAX_SESSION_S:
            raise errors.InvalidArgument(
                f"session_ttl_s must be within {MIN_SESSION_S:g}..{MAX_SESSION_S:g} s"
            )
        if not 0 <= self.port <= 65535:
            raise errors.InvalidArgument(f"port {self.port} is out of range")
        if self.max_upload_bytes <= 0 or self.rpc_timeout_s <= 0:
            raise errors.InvalidArgument("max_upload_bytes and rpc_timeout_s must be > 0")
