"""TLS material and credentials: what servers present and what clients bring.

- `ServerTLS` (every node of a secure cluster): the node's CA, certificate and key files
  (`tls_ca_file`, `tls_cert_file`, `tls_key_file`), served by gRPC with dynamic credentials that
  re-read the files when they change (rotation without a restart), and used for the node's own
  outgoing calls (mutual TLS as itself: `client_security()`).
- `ClientSecurity` (SDK, CLI, plugins, tests, and nodes calling each other): trust anchors (a CA
  file; none: the system's roots), optionally a client certificate (nodes and operators: mutual
  TLS on the nodes' service ports) and optionally a user's access key and secret (exchanged for
  session tokens, sent on the nodes' client ports). `insecure=True` speaks plaintext to an
  insecure cluster. `from_env()` reads `KVTIER_*` variables, `from_cluster_file()` a
  `cluster.json` of `kvtier up`.
- `TokenSource`: a user's session token, fetched with a signed request and renewed before it
  expires (`kvtier.tokens`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from kvtier import config, errors, pki, tokens
from kvtier.proto.auth.v1 import auth_pb2, auth_pb2_grpc

ENV_INSECURE = "KVTIER_INSECURE"
ENV_CA_FILE = "KVTIER_CA_FILE"
ENV_CERT_FILE = "KVTIER_CERT_FILE"
ENV_KEY_FILE = "KVTIER_KEY_FILE"
ENV_ACCESS_KEY = "KVTIER_ACCESS_KEY"
ENV_SECRET_KEY = "KVTIER_SECRET_KEY"
ENV_CLUSTER_FILE = "KVTIER_CLUSTER_FILE"
#: Renew a session token when less than this part of its life is left.
_RENEW_FRACTION = 0.2


class ServerTLS:
    """A node's TLS identity (see the module docstring)."""

    def __init__(self, files: pki.CertificateFiles) -> None:
        ident = files.material.identity
        if ident is None:
            raise errors.InvalidArgument(f"{files.cert_file} names no kvtier role (URI SAN)")
        self.files = files
        self.identity = ident

    @classmethod
    def from_config(cls, cfg: config.ServiceConfig) -> ServerTLS | None:
        """The node's TLS material (None in an insecure cluster); ConfigError when unusable."""
        if cfg.insecure:
            return None
        try:
            return cls(pki.CertificateFiles(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file))
        except errors.InvalidArgument as exc:
            raise config.ConfigError(f"tls: {exc.message}") from None

    def credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """gRPC server credentials that pick up rotated files on the next handshake."""
        files = self.files
        served = [files.generation]

        def configuration() -> Any:
            material = files.material
            return grpc.ssl_server_certificate_configuration(
                [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
            )

        def fetch() -> Any:
            files.refresh()
            if files.generation == served[0]:
                return None
            served[0] = files.generation
            return configuration()

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=require_client_cert
        )

    def client_security(self) -> ClientSecurity:
        """Mutual TLS as this node, for its calls to other nodes."""
        return ClientSecurity(
            ca_file=self.files.ca_file,
            cert_file=self.files.cert_file,
            key_file=self.files.key_file,
            files=self.files,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientSecurity:
    """How a client reaches a cluster (see the module docstring)."""

    insecure: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    access_key: str = ""
    secret_key: str = dataclasses.field(default="", repr=False)
    #: Where to get session tokens (a metadata or gateway client port); empty: the address
    #: being called, or the SDK's metadata address.
    token_address: str = ""
    files: pki.CertificateFiles | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise errors.InvalidArgument("give a client certificate and its key, or neither")
        if bool(self.access_key) != bool(self.secret_key):
            raise errors.InvalidArgument("give an access key and its secret, or neither")
        if not self.insecure and self.files is None and (self.ca_file or self.cert_file):
            try:
                files = pki.CertificateFiles(self.ca_file, self.cert_file, self.key_file)
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"client TLS: {exc.message}") from None
            object.__setattr__(self, "files", files)

    @property
    def has_cert(self) -> bool:
        """Whether the client authenticates with a certificate (mutual TLS, service ports)."""
        return bool(self.cert_file) and not self.insecure

    @property
    def has_user(self) -> bool:
        """Whether the client authenticates as a user (session tokens, client ports)."""
        return bool(self.access_key) and not self.insecure and not self.has_cert

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials with the current files (with the certificate for mutual TLS)."""
        if self.files is None:
            return grpc.ssl_channel_credentials()
        self.files.refresh()
        material = self.files.material
        return grpc.ssl_channel_credentials(
            root_certificates=material.ca_pem or None,
            private_key=material.key_pem or None,
            certificate_chain=material.cert_pem or None,
        )

    def address_of(self, grpc_address: str, client_address: str) -> str:
        """Which of a node's ports this client dials: certificate holders and insecure
        clients the service port, users the client port (when the node has one)."""
        if self.has_cert or self.insecure or not client_address:
            return grpc_address
        return client_address

    def with_user(self, access_key: str, secret_key: str) -> ClientSecurity:
        """The same trust anchors, authenticating as a user (no certificate)."""
        return ClientSecurity(
            insecure=self.insecure,
            ca_file=self.ca_file,
            access_key=access_key,
            secret_key=secret_key,
            token_address=self.token_address,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """From KVTIER_CLUSTER_FILE (a cluster.json), then KVTIER_INSECURE, KVTIER_CA_FILE,
        KVTIER_CERT_FILE / KVTIER_KEY_FILE, KVTIER_ACCESS_KEY / KVTIER_SECRET_KEY (which
        override the cluster file's). Nothing set: TLS with the system's trust store."""
        env = os.environ if environ is None else environ
        base = cls()
        if env.get(ENV_CLUSTER_FILE):
            base = cls.from_cluster_file(env[ENV_CLUSTER_FILE])
        insecure = env.get(ENV_INSECURE, "").strip().lower() in {"1", "true", "yes", "on"}
        return cls(
            insecure=insecure or base.insecure,
            ca_file=env.get(ENV_CA_FILE) or base.ca_file,
            cert_file=env.get(ENV_CERT_FILE, base.cert_file),
            key_file=env.get(ENV_KEY_FILE, base.key_file),
            access_key=env.get(ENV_ACCESS_KEY, base.access_key),
            secret_key=env.get(ENV_SECRET_KEY, base.secret_key),
            token_address=base.token_address,
        )

    @classmethod
    def from_cluster_file(cls, path: str | Path, *, as_operator: bool = False) -> ClientSecurity:
        """From a `cluster.json` of `kvtier up`: its CA and admin user (as_operator: its
        operator certificate instead, for the CLI)."""
        try:
            info = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise errors.InvalidArgument(f"cluster file {path}: {exc}") from None
        if info.get("insecure"):
            return cls(insecure=True)
        if as_operator and info.get("operator_cert"):
            return cls(
                ca_file=str(info.get("ca_file", "")),
                cert_file=str(info["operator_cert"]),
                key_file=str(info.get("operator_key", "")),
            )
        return cls(
            ca_file=str(info.get("ca_file", "")),
            access_key=str(info.get("s3_access_key", "")),
            secret_key=str(info.get("s3_secret_key", "")),
            token_address=str(info.get("metadata_client", "")),
        )


_DEFAULT: list[ClientSecurity] = []
_DEFAULT_LOCK = threading.Lock()


def default() -> ClientSecurity:
    """The process's default client security: from_env(), read once."""
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            _DEFAULT.append(ClientSecurity.from_env())
        return _DEFAULT[0]


def reset_default() -> None:
    """Forget the cached default (tests that change the environment)."""
    with _DEFAULT_LOCK:
        _DEFAULT.clear()


class TokenSource:
    """A user's session token from an issuer, renewed before it expires.

    issuer_address may name several issuers separated by commas (metadata nodes and gateways
    both issue tokens every node accepts): each fetch tries them in order, the one that
    answered last first, and moves on when one cannot answer (UNAVAILABLE, deadline).

    Safe to share between event loops and threads: each fetch opens its own short-lived
    channel, and concurrent fetches at worst fetch twice.
    """

    def __init__(
        self, security: ClientSecurity, issuer_address: str, *, timeout_s: float = 10.0
    ) -> None:
        if not security.has_user:
            raise errors.InvalidArgument("a token source needs a user's access key and secret")
        self._security = security
        self.issuer_address = issuer_address
        self._issuers = [a.strip() for a in issuer_address.split(",") if a.strip()]
        self._timeout_s = timeout_s
        self._token = ""
        self._renew_at_ms = 0

    def invalidate(self) -> None:
        """Fetch a new token next time (the server refused this one)."""
        self._renew_at_ms = 0

    async def token(self) -> str:
        """A valid token (fetching one when there is none or it is about to expire).

        Raises Unauthenticated (wrong key or secret), Unavailable (no issuer reachable: each
        named), InvalidArgument (the one issuer issues no tokens)."""
        if self._token and tokens.now_ms() < self._renew_at_ms:
            return self._token
        failures: list[str] = []
        for issuer in list(self._issuers):
            try:
                reply = await self._fetch(issuer)
            except (errors.Unavailable, errors.DeadlineExceeded, errors.InvalidArgument) as exc:
                if len(self._issuers) == 1 or (
                    isinstance(exc, errors.InvalidArgument) and exc.reason != "WrongService"
                ):
                    raise
                failures.append(f"{issuer}: {type(exc).__name__}: {exc.message}")
                continue
            if issuer != self._issuers[0]:
                self._issuers.remove(issuer)
                self._issuers.insert(0, issuer)
            break
        else:
            raise errors.Unavailable(
                f"no session token issuer answered: {'; '.join(failures)} (a user's access "
                "key needs one; a gateway issues them too)"
            )
        now = tokens.now_ms()
        life = max(reply.expires_at_unix_ms - now, 0)
        self._token = reply.token
        self._renew_at_ms = reply.expires_at_unix_ms - int(life * _RENEW_FRACTION)
        return self._token

    async def _fetch(self, issuer: str) -> auth_pb2.GetSessionTokenResponse:
        """A new token from one issuer (a freshly signed request)."""
        request = tokens.sign_request(self._security.access_key, self._security.secret_key)
        channel = grpc.aio.secure_channel(issuer, self._security.channel_credentials())
        try:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            reply: auth_pb2.GetSessionTokenResponse = await stub.GetSessionToken(
                request, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise errors.InvalidArgument(
                    f"{issuer} issues no session tokens (not a metadata node or a gateway)",
                    reason="WrongService",
                ) from None
            raise errors.from_rpc_error(exc) from None
        finally:
            await channel.close()
        return reply


_SOURCES: dict[tuple[str, str], TokenSource] = {}
_SOURCES_LOCK = threading.Lock()


def token_source(security: ClientSecurity, issuer_address: str) -> TokenSource:
    """The process's shared token source for a user and an issuer."""
    key = (security.access_key, security.token_address or issuer_address)
    with _SOURCES_LOCK:
        source = _SOURCES.get(key)
        if source is None or source._security != security:
            source = TokenSource(security, key[1])
            _SOURCES[key] = source
        return source
