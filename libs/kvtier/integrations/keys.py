"""How engines' names map to kvtier's, shared by the engine integrations.

- **Namespace**: model + cache salt (`"<model>@<salt>"`, or `"<model>"` without a salt). Blocks
  of different models or salts never meet; the tenant (who the client acts for) separates
  further, and is not part of the namespace.
- **Keys**: kvtier keys are opaque bytes of 1..1024; an engine key that does not fit is hashed
  down to `b"h" + SHA-256` (the durable tier does the same with long object-name parts).
- **Layout**: engines whose bytes for a key depend on more than the key (dtype, block size,
  parallel layout) scope the namespace with `with_layout` (`"<namespace>#<digest>"`).
- **TierSettings**: what every plugin reads from its engine's configuration (where the
  cluster is, who we are, deadlines, credentials), and the `KVClient.connect` arguments made
  from it.
- **Credentials**: a plugin's config may name the trust anchor (`ca_file`, `cluster_file`,
  `insecure`) and an identity (a user's `access_key` with `secret_key` or `secret_key_file`;
  or a cluster certificate, `cert_file` + `key_file`); what it does not name comes from the
  `KVTIER_*` environment variables (`kvtier.security.ClientSecurity.from_env`). An identity
  named in the config replaces the environment's whole. Secrets never appear in a repr, an
  exception or a log line.

Nothing here imports an engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvtier import errors, security

KEY_MAX_BYTES = 1024
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
#: The settings that say how the plugin authenticates (the rest say where and what).
CREDENTIAL_SETTINGS = (
    "ca_file", "access_key", "secret_key", "secret_key_file", "cert_file", "key_file",
    "cluster_file", "token_address", "insecure",
)  # fmt: skip


def namespace(model: str, cache_salt: str = "") -> str:
    """The kvtier namespace of an engine's blocks: `model@salt`, or `model` without a salt.

    Raises ValueError for an empty model name (blocks of unnamed models must not meet).
    """
    model = model.strip()
    if not model:
        raise ValueError("a namespace needs a model name")
    return f"{model}@{cache_salt}" if cache_salt else model


def fit_key(key: bytes) -> bytes:
    """key when it is a valid kvtier key (1..1024 bytes), else `b"h" + SHA-256(key)`."""
    if 0 < len(key) <= KEY_MAX_BYTES:
        return key
    return b"h" + hashlib.sha256(key).digest()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TierSettings:
    """Where the kvtier cluster is and who an engine acts as there.

    Read from an engine's plugin configuration with `from_mapping`; every field has a default
    except the address (`metadata` or `nodes`).
    """

    metadata: str = ""  # metadata/gateway addresses (comma-separated): the cluster map
    nodes: tuple[str, ...] = ()  # or a fixed list of kvcache node addresses
    tenant: str = ""  # who the engine acts for (empty: "default")
    namespace: str = ""  # overrides the namespace made from the model and cache_salt
    cache_salt: str = ""  # an operator's salt: engines sharing it share blocks
    timeout_s: float = 2.0  # deadline per node and operation; a late node reads as a miss
    replicas: int = 1  # copies per block
    transports: tuple[str, ...] = ()  # data-plane transports allowed (empty: rdma, shm, tcp)
    ttl_s: float = 0.0  # lifetime of stored blocks (0: the namespace's default, or none)
    retry_s: float = 5.0  # after a failed connect, answer misses this long before trying again
    verify_checksums: bool = True  # checksum puts, check gets' bytes before the engine sees them
    # Credentials: what is not set here comes from KVTIER_* environment variables.
    ca_file: str = ""  # the cluster CA (PEM): the trust anchor of TLS
    access_key: str = ""  # a kvtier user (`kvtier admin user add`): acts for its own tenant
    secret_key: str = dataclasses.field(default="", repr=False)  # its secret (or the file:)
    secret_key_file: str = ""  # a file holding the secret, mode 0600 (keeps it off cmd lines)
    cert_file: str = ""  # or a cluster certificate (operators, services): mutual TLS
    key_file: str = ""  # its private key
    cluster_file: str = ""  # a cluster.json of `kvtier up`: its CA and admin user
    token_address: str = ""  # where a user gets session tokens when `nodes` is fixed
    insecure: bool = False  # the cluster runs without TLS and authentication

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retry_s < 0 or self.ttl_s < 0:
            raise ValueError("timeout_s must be > 0, retry_s and ttl_s >= 0")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.secret_key and self.secret_key_file:
            raise ValueError("give secret_key or secret_key_file, not both")
        if (self.secret_key or self.secret_key_file) and not self.access_key:
            raise ValueError("a secret_key needs its access_key")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("give cert_file and key_file together")
        if self.cert_file and self.access_key:
            raise ValueError("authenticate with access_key or cert_file, not both")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "") -> TierSettings:
        """Settings from an engine's config dict: the keys `prefix + field name` (strings or
        values; `nodes` and `transports` as lists or comma-separated). Unknown keys are left
        alone (the dict also carries the engine's own settings). Raises ValueError."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = values.get(prefix + field.name)
            if raw is None or raw == "":
                continue
            if field.name in ("nodes", "transports"):
                items = raw.split(",") if isinstance(raw, str) else list(raw)
                kwargs[field.name] = tuple(str(i).strip() for i in items if str(i).strip())
            elif field.name == "replicas":
                kwargs[field.name] = int(raw)
            elif field.name in ("timeout_s", "ttl_s", "retry_s"):
                kwargs[field.name] = float(raw)
            elif field.name in ("insecure", "verify_checksums"):
                kwargs[field.name] = _flag(field.name, raw)
            else:
                kwargs[field.name] = str(raw)
        return cls(**kwargs)

    def namespace_for(self, model: str) -> str:
        """The namespace of this engine's blocks (see `namespace`)."""
        return self.namespace or namespace(model, self.cache_salt)

    def client_kwargs(self, model: str) -> dict[str, Any]:
        """Arguments for `kvtier.KVClient.connect` / `AsyncKVClient.connect`. Raises ValueError
        when neither `metadata` nor `nodes` is set."""
        if not self.metadata and not self.nodes:
            raise ValueError("kvtier needs 'metadata' (an address) or 'nodes' (addresses)")
        kwargs: dict[str, Any] = {
            "namespace": self.namespace_for(model),
            "tenant": self.tenant,
            "replicas": self.replicas,
            "timeout_s": self.timeout_s,
            "transports": list(self.transports),
            "verify_checksums": self.verify_checksums,
        }
        if self.metadata:
            kwargs["metadata"] = self.metadata
        else:
            kwargs["nodes"] = list(self.nodes)
        client_security = self.client_security()
        if client_security is not None:
            kwargs["security"] = client_security
        return kwargs

    @property
    def names_credentials(self) -> bool:
        """Whether the engine's config says how to authenticate (else: the environment)."""
        return any(getattr(self, name) for name in CREDENTIAL_SETTINGS)

    def client_security(
        self, environ: Mapping[str, str] | None = None
    ) -> security.ClientSecurity | None:
        """The SDK's `security` argument: None when the config names no credential (the SDK
        then reads KVTIER_* itself). Raises ValueError for unusable credentials (a secret
        file that others may read, a missing secret, a certificate without its key)."""
        if not self.names_credentials:
            return None
        env = os.environ if environ is None else environ
        base = self._base_security(env)
        cert_file, key_file = base.cert_file, base.key_file
        access_key, secret_key = base.access_key, base.secret_key
        if self.cert_file:
            cert_file, key_file, access_key, secret_key = self.cert_file, self.key_file, "", ""
        elif self.access_key:
            cert_file, key_file, access_key = "", "", self.access_key
            secret_key = self._secret(env)
        try:
            return security.ClientSecurity(
                insecure=self.insecure or base.insecure,
                ca_file=self.ca_file or base.ca_file,
                cert_file=cert_file,
                key_file=key_file,
                access_key=access_key,
                secret_key=secret_key,
                token_address=self.token_address or base.token_address,
            )
        except errors.InvalidArgument as exc:
            raise ValueError(f"kvtier credentials: {exc.message}") from None

    def _base_security(self, env: Mapping[str, str]) -> security.ClientSecurity:
        """What the config does not name: its cluster file's, else the environment's (only
        the trust anchors when the config names its own identity)."""
        try:
            if self.cluster_file:
                return security.ClientSecurity.from_cluster_file(self.cluster_file)
            if not (self.cert_file or self.access_key):
                return security.ClientSecurity.from_env(env)
            cluster = env.get(security.ENV_CLUSTER_FILE, "")
            trust = security.ClientSecurity.from_cluster_file(cluster) if cluster else None
            return security.ClientSecurity(
                insecure=_flag(security.ENV_INSECURE, env.get(security.ENV_INSECURE, ""))
                or (trust is not None and trust.insecure),
                ca_file=env.get(security.ENV_CA_FILE) or (trust.ca_file if trust else ""),
                token_address=trust.token_address if trust else "",
            )
        except errors.InvalidArgument as exc:
            raise ValueError(f"kvtier credentials: {exc.message}") from None

    def _secret(self, env: Mapping[str, str]) -> str:
        """The user's secret: secret_key, secret_key_file, else KVTIER_SECRET_KEY (when
        KVTIER_ACCESS_KEY is unset or names the same user)."""
        if self.secret_key:
            return self.secret_key
        if self.secret_key_file:
            return read_secret_file(self.secret_key_file)
        env_secret = env.get(security.ENV_SECRET_KEY, "")
        if env_secret and env.get(security.ENV_ACCESS_KEY, self.access_key) == self.access_key:
            return env_secret
        raise ValueError(
            f"access_key {self.access_key} needs secret_key_file, secret_key or "
            f"{security.ENV_SECRET_KEY}"
        )

    def identity(self) -> str:
        """Who the plugin authenticates as, for its start-up log line (never a secret)."""
        if self.insecure:
            return "insecure (no TLS, no authentication)"
        if self.cert_file:
            return f"certificate {self.cert_file}"
        if self.access_key:
            return f"user {self.access_key}"
        if self.cluster_file:
            return f"the admin user of {self.cluster_file}"
        return "the KVTIER_* environment"


def read_secret_file(path: str) -> str:
    """The secret in path (surrounding whitespace dropped). Raises ValueError when the file
    cannot be read, is empty, or may be read by its group or others (it must be 0600 or
    stricter: a secret readable by other users is no secret)."""
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"secret_key_file {path} has mode {stat.S_IMODE(mode):04o}: make it 0600 "
                "(chmod 600), it holds a secret"
            )
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"secret_key_file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret_key_file {path} is not text") from None
    if not secret:
        raise ValueError(f"secret_key_file {path} is empty")
    return secret


def _flag(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be true or false, got {raw!r}")


LAYOUT_DIGEST_CHARS = 12


def layout_digest(fields: Mapping[str, Any]) -> str:
    """A short, stable name for an engine's block layout: the first 12 hex digits of SHA-256
    over the canonical JSON of fields (sorted keys, no spaces).

    Engines put in fields whatever makes two deployments' bytes for the same key differ (model,
    KV dtype, tokens per block, layers, parallel sizes when the bytes depend on them, block
    bytes); values must be JSON-serializable. Raises TypeError when they are not.
    """
    canonical = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:LAYOUT_DIGEST_CHARS]


def with_layout(namespace_name: str, fields: Mapping[str, Any]) -> str:
    """namespace_name scoped to one block layout: `"<namespace>#<layout digest>"`, so that
    deployments whose bytes differ never read each other's blocks under the same key."""
    return f"{namespace_name}#{layout_digest(fields)}"
