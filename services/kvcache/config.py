"""Settings of a kvcache node."""

from __future__ import annotations

import dataclasses
import math

from kvtier import config, devports

_MIB = 1024 * 1024
_PORTS = devports.PortPlan().node_ports("kvcache", 1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KVCacheConfig(config.DataPlaneServiceConfig):
    """A kvcache node: one DRAM arena of KV-cache blocks, served over gRPC and the data plane."""

    # Fixed defaults, the ports of the dev cluster's first kvcache (docs/operations.md, Ports).
    grpc_port: int = config.setting(
        _PORTS["grpc_port"],
        "gRPC port for the cluster (mutual TLS); 0 picks a free one (registered in etcd)",
    )
    client_port: int = config.setting(
        _PORTS["client_port"],
        "gRPC port for users (TLS + session tokens); 0 picks a free one, -1: none",
    )
    metrics_port: int = config.setting(
        _PORTS["metrics_port"], "Prometheus metrics port (HTTPS); 0 picks a free one, -1 disables"
    )

    data_dir: str = config.setting("./kvtier-data/kvcache", "node state (identity, lock)")
    arena_bytes: int = config.setting(
        1024 * _MIB, "DRAM arena for blocks, preallocated at start (a multiple of page_bytes)"
    )
    page_bytes: int = config.setting(
        64 * _MIB, "slab page: the unit the arena is lent to size classes in (64 MiB max block)"
    )
    eviction_policy: str = config.setting("s3fifo", "capacity eviction policy: s3fifo or lru")
    high_watermark: float = config.setting(0.95, "fill (0-1] at which eviction starts")
    low_watermark: float = config.setting(0.85, "fill eviction brings the arena back down to")
    put_timeout_s: float = config.setting(
        30.0, "a put not committed by then is aborted and its room freed"
    )
    read_lease_s: float = config.setting(
        10.0, "longest a read lease protects a block (gRPC BatchGet may ask for less)"
    )
    expire_interval_s: float = config.setting(
        1.0, "how often TTL-expired blocks, stale leases and stuck puts are swept"
    )
    tenant_quotas: str = config.setting(
        "", "per-tenant byte quotas on this node: tenant=bytes,tenant=bytes (SetQuota changes them)"
    )
    default_tenant_quota_bytes: int = config.setting(
        0,
        "byte quota on this node of every tenant without one in tenant_quotas or from SetQuota "
        "(0: none)",
    )
    max_pin_s: float = config.setting(
        3600.0, "longest pin a Pin request may ask for (longer ones are InvalidArgument)"
    )
    max_pinned_fraction: float = config.setting(
        0.5,
        "share (0-1] of the arena one tenant's pinned blocks may hold; keys past it stay unpinned",
    )
    durable_namespaces: str = config.setting(
        "",
        "namespaces backed by the durable tier: tenant/namespace=write_back|write_through,... "
        "(SetNamespacePolicy changes them; runtime changes are not persisted)",
    )
    spill_buffer_bytes: int = config.setting(
        256 * _MIB,
        "DRAM for blocks on their way to the durable tier, allocated on first use (a multiple "
        "of page_bytes); when full, durable namespaces' victims stay in DRAM",
    )
    spill_concurrency: int = config.setting(8, "durable-tier uploads and deletes in flight")
    spill_retries: int = config.setting(
        3,
        "retries of a failed durable-tier upload or delete before it is given up (a write-back "
        "victim's upload is retried for as long as a gateway is in the map)",
    )
    spill_timeout_s: float = config.setting(
        10.0, "deadline of one durable-tier upload or delete (then retried)"
    )
    read_through_timeout_s: float = config.setting(
        2.0,
        "deadline of a read-through or probe of the durable tier (keep it under clients' "
        "deadlines: a slow durable tier then turns into misses)",
    )
    write_through_timeout_s: float = config.setting(
        3.0,
        "how long a write-through put waits for its durable copy before it fails UNAVAILABLE "
        "(keep it under clients' timeout_s, 5 s by default, or they give up on the node first)",
    )
    spill_drain_s: float = config.setting(
        10.0, "at a clean stop, how long queued spills may take to reach the durable tier"
    )
    kv_events: bool = config.setting(
        False,
        "publish KV events in vLLM's format (ZMQ PUB + replay) on the advertised host, for "
        "cache-aware routers (docs/routing.md)",
    )
    kv_events_auth: str = config.setting(
        "curve",
        "who may read the KV events: curve (subscribers an admin authorized, ZMQ CURVE) or none "
        "(anyone who reaches the ports: trusted networks only); an insecure cluster is always none",
    )
    kv_events_key_ttl_s: float = config.setting(
        900.0,
        "how long a subscriber key AuthorizeEventsSubscriber admitted is admitted (its open "
        "SUB connection is cut within about 0.1 s of the end; the SDK renews before)",
    )
    kv_events_port: int = config.setting(0, "KV-event PUB port; 0 picks a free one (announced)")
    kv_events_replay_port: int = config.setting(
        0, "KV-event replay (ROUTER) port; 0 picks a free one (announced)"
    )
    kv_events_queue_batches: int = config.setting(
        4096, "KV-event batches waiting to be sent; past it batches are dropped (a sequence gap)"
    )
    kv_events_replay_batches: int = config.setting(
        10_000, "KV-event batches kept for replay to subscribers that missed them"
    )

    def __post_init__(self) -> None:
        config.DataPlaneServiceConfig.__post_init__(self)
        config.check_storage_dir("data_dir", self.data_dir)
        if self.page_bytes < 4096 or self.page_bytes % 4096:
            raise config.ConfigError("page_bytes: must be a positive multiple of 4096")
        if self.arena_bytes < self.page_bytes or self.arena_bytes % self.page_bytes:
            raise config.ConfigError("arena_bytes: must be a positive multiple of page_bytes")
        if self.eviction_policy not in ("s3fifo", "lru"):
            raise config.ConfigError("eviction_policy: must be s3fifo or lru")
        if not 0.0 < self.low_watermark < self.high_watermark <= 1.0:
            raise config.ConfigError("watermarks: need 0 < low_watermark < high_watermark <= 1")
        timeouts = ("put_timeout_s", "read_lease_s", "expire_interval_s", "spill_timeout_s")
        for name in (*timeouts, "read_through_timeout_s", "write_through_timeout_s"):
            if not getattr(self, name) > 0:
                raise config.ConfigError(f"{name}: must be > 0")
        if self.spill_buffer_bytes < self.page_bytes or self.spill_buffer_bytes % self.page_bytes:
            raise config.ConfigError(
                "spill_buffer_bytes: must be a positive multiple of page_bytes"
            )
        if self.spill_concurrency < 1 or self.spill_retries < 0 or self.spill_drain_s < 0:
            raise config.ConfigError(
                "spill settings: need spill_concurrency >= 1, spill_retries >= 0, "
                "spill_drain_s >= 0"
            )
        if self.read_through_timeout_s >= self.put_timeout_s:
            # A read-through fills a pending put: it must end before the put's deadline.
            raise config.ConfigError("read_through_timeout_s: must be < put_timeout_s")
        if self.write_through_timeout_s >= self.put_timeout_s:
            # A write-through put stays pending while it waits: it must end before its deadline.
            raise config.ConfigError("write_through_timeout_s: must be < put_timeout_s")
        if not (math.isfinite(self.max_pin_s) and self.max_pin_s > 0):
            raise config.ConfigError("max_pin_s: must be finite and > 0")
        if not 0.0 < self.max_pinned_fraction <= 1.0:
            raise config.ConfigError("max_pinned_fraction: must be in (0, 1]")
        if self.default_tenant_quota_bytes < 0:
            raise config.ConfigError("default_tenant_quota_bytes: must be >= 0 (0: none)")
        for name in ("kv_events_port", "kv_events_replay_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise config.ConfigError(f"{name}: not a port number 0..65535")
        if self.kv_events_queue_batches < 1 or self.kv_events_replay_batches < 1:
            raise config.ConfigError("kv_events_queue_batches, _replay_batches: must be >= 1")
        if self.kv_events_auth not in ("curve", "none"):
            raise config.ConfigError("kv_events_auth: must be curve or none")
        if not (math.isfinite(self.kv_events_key_ttl_s) and self.kv_events_key_ttl_s > 0):
            raise config.ConfigError("kv_events_key_ttl_s: must be finite and > 0")
        self.quotas()  # raises ConfigError when malformed
        self.durable_policies()

    def events_authenticated(self) -> bool:
        """Whether the KV-event sockets admit only authorized CURVE subscribers: kv_events_auth
        is curve and the cluster is secure (an insecure cluster authenticates nobody)."""
        return self.kv_events_auth == "curve" and not self.insecure

    def quotas(self) -> dict[str, int]:
        """tenant_quotas parsed: tenant -> bytes."""
        result: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in self.tenant_quotas.split(","))):
            tenant, sep, value = item.partition("=")
            try:
                if not sep or not tenant or int(value) < 0:
                    raise ValueError(item)
                result[tenant] = int(value)
            except ValueError:
                raise config.ConfigError(
                    f"tenant_quotas: expected tenant=bytes[,tenant=bytes], got {item!r}"
                ) from None
        return result

    def durable_policies(self) -> dict[tuple[str, str], str]:
        """durable_namespaces parsed: (tenant, namespace) -> write_back | write_through | none."""
        result: dict[tuple[str, str], str] = {}
        for item in filter(None, (part.strip() for part in self.durable_namespaces.split(","))):
            name, sep, mode = item.rpartition("=")
            tenant, slash, namespace = name.partition("/")
            mode = mode.strip().lower()
            if not sep or not slash or not tenant or mode not in _DURABILITIES:
                raise config.ConfigError(
                    "durable_namespaces: expected tenant/namespace=write_back|write_through"
                    f"[,...], got {item!r}"
                )
            result[(tenant, namespace)] = mode
        return result


_DURABILITIES = ("none", "write_back", "write_through")
