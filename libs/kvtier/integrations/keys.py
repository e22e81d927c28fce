"""How engines' names map to kvtier's, shared by the engine integrations.

- **Namespace**: model + cache salt (`"<model>@<salt>"`, or `"<model>"` without a salt). Blocks
  of different models or salts never meet; the tenant (who the client acts for) separates
  further, and is not part of the namespace.
- **Keys**: kvtier keys are opaque bytes of 1..1024; an engine key that does not fit is hashed
  down to `b"h" + SHA-256` (the durable tier does the same with long object-name parts).
- **Layout**: engines whose bytes for a key depend on more than the key (dtype, block size,
  parallel layout) scope the namespace with `with_layout` (`"<namespace>#<digest>"`).
- **TierSettings**: what every plugin reads from its engine's configuration (where the
  cluster is, who we are, deadlines), and the `KVClient.connect` arguments made from it.

Nothing here imports the SDK or an engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

KEY_MAX_BYTES = 1024


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

    metadata: str = ""  # a metadata service address: the cluster map, followed as it changes
    nodes: tuple[str, ...] = ()  # or a fixed list of kvcache node addresses
    tenant: str = ""  # who the engine acts for (empty: "default")
    namespace: str = ""  # overrides the namespace made from the model and cache_salt
    cache_salt: str = ""  # an operator's salt: engines sharing it share blocks
    timeout_s: float = 2.0  # deadline per node and operation; a late node reads as a miss
    replicas: int = 1  # copies per block
    transports: tuple[str, ...] = ()  # data-plane transports allowed (empty: rdma, shm, tcp)
    ttl_s: float = 0.0  # lifetime of stored blocks (0: the namespace's default, or none)
    retry_s: float = 5.0  # after a failed connect, answer misses this long before trying again

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retry_s < 0 or self.ttl_s < 0:
            raise ValueError("timeout_s must be > 0, retry_s and ttl_s >= 0")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")

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
        }
        if self.metadata:
            kwargs["metadata"] = self.metadata
        else:
            kwargs["nodes"] = list(self.nodes)
        return kwargs


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
