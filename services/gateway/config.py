"""Settings of a gateway."""

from __future__ import annotations

import dataclasses

from kvtier import config, devports

_MIB = 1024 * 1024
_PORTS = devports.PortPlan().node_ports("gateway", 1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig(config.DataPlaneServiceConfig):
    """The stateless front door: the gRPC object API and the S3 API (HTTPS by default)."""

    # Fixed defaults, the ports of the dev cluster's first gateway (docs/operations.md, Ports).
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

    staging_bytes: int = config.setting(
        256 * _MIB, "data-plane staging memory for stripes being encoded or decoded"
    )
    staging_slot_bytes: int = config.setting(
        64 * _MIB, "memory of one object call in flight (its stripes, parity and padding)"
    )
    datanode_call_bytes: int = config.setting(
        8 * _MIB,
        "most shard bytes sent to a datanode in one WRITE_SHARD call (a shard's bytes of a "
        "larger call go in several): at most the datanodes' staging_slot_bytes",
    )
    codec_threads: int = config.setting(2, "threads for erasure coding and hashing")
    heal_max_objects: int = config.setting(
        2, "objects healed at once (a rebuild holds one staging slot per batch of stripes)"
    )
    scan_interval_s: float = config.setting(
        60.0, "seconds between cycles of the heal scanner; 0 turns the scanner off"
    )
    pool_drain_grace_s: float = config.setting(
        5.0,
        "seconds a pool drain waits after switching an object's pool-0 entry to its new copy "
        "before it deletes the old copy (a GET that read the entry just before still reads it)",
    )
    scan_objects_per_cycle: int = config.setting(
        1000, "objects the heal scanner verifies (and heals) per cycle"
    )
    lifecycle_interval_s: float = config.setting(
        3600.0,
        "seconds between passes of the lifecycle expirer (S3 lifecycle rules of erasure-coded "
        "buckets; run by the lowest gateway id of the map); 0 turns it off (KV buckets' TTLs "
        "still apply)",
    )
    lifecycle_day_s: float = config.setting(
        86400.0,
        "seconds in a lifecycle rule's day (Days, DaysAfterInitiation, the rounding to "
        "midnight): 86400; smaller only to test rules, as Ceph RGW's rgw_lc_debug_interval",
    )
    s3_port: int = config.setting(
        _PORTS["s3_port"],
        "port of the S3 HTTP API (0: any free port, announced in the map; -1: off)",
    )
    s3_region: str = config.setting("us-east-1", "the region the S3 API reports and signs for")
    s3_tls_cert_file: str = config.setting(
        "",
        "certificate chain (PEM) the S3 API presents, e.g. from a public CA; re-read when "
        "replaced; empty: the gateway's cluster certificate (tls_cert_file)",
    )
    s3_tls_key_file: str = config.setting("", "private key of s3_tls_cert_file (PEM, mode 0600)")
    s3_plain_http: bool = config.setting(
        False,
        "serve S3 over plain HTTP in a secure cluster: bodies and presigned URLs travel in "
        "clear (trusted networks only); an insecure cluster always serves plain HTTP",
    )
    master_key_file: str = config.setting(
        "",
        "file of the key that opens S3 secrets in etcd (mode 0600; empty: "
        "KVTIER_MASTER_KEY, else S3 requests are refused)",
    )
    s3_domain: str = config.setting(
        "", "domain for virtual-host style S3 requests (<bucket>.<domain>); empty: path style"
    )
    max_staged_writes_per_tenant: int = config.setting(
        64, "PUTs and parts one tenant may have in flight on this gateway (more: Overloaded)"
    )
    # 128 KiB by default in the release whose datanodes first read larger inline shards: the
    # upgrade policy writes a new form only from the release after (docs/upgrades.md), so a
    # datanode can still be rolled back; 524288 once that is no longer wanted.
    small_write_max_bytes: int = config.setting(
        128 * 1024,
        "largest shard of a small PUT (one WRITE_SMALL call per datanode, journaled, inline in "
        "its meta) on a set whose datanodes all advertise datanode.small-writes-512k: "
        "131072-524288; above 131072 a datanode of an earlier release cannot read what is "
        "written (docs/upgrades.md, rolling back); 524288 puts a 2 MiB object (RS 8+4) there",
    )
    s3_body_timeout_s: float = config.setting(
        20.0,
        "seconds an S3 request body may send nothing before the request fails with 400 "
        "RequestTimeout (nothing stored)",
    )
    s3_send_timeout_s: float = config.setting(
        20.0,
        "seconds an S3 response (a GET's body) may wait for its client to read before the "
        "connection is closed",
    )

    s3_access_log: str = config.setting(
        "",
        "the S3 access log, one JSON line per request: empty off, '-' the service log, else a "
        "file path (appended)",
    )

    def __post_init__(self) -> None:
        config.DataPlaneServiceConfig.__post_init__(self)
        if self.staging_slot_bytes < 32 * _MIB or self.staging_bytes < self.staging_slot_bytes:
            raise config.ConfigError(
                "staging_slot_bytes: at least 32 MiB (two 16-drive stripes) and at most "
                "staging_bytes"
            )
        if self.datanode_call_bytes < _MIB:
            raise config.ConfigError("datanode_call_bytes: at least 1 MiB (one shard block)")
        if not 1 <= self.codec_threads <= 64:
            raise config.ConfigError(f"codec_threads: {self.codec_threads} is not in 1..64")
        if not 1 <= self.heal_max_objects <= 64:
            raise config.ConfigError(f"heal_max_objects: {self.heal_max_objects} is not in 1..64")
        if self.scan_interval_s < 0:
            raise config.ConfigError("scan_interval_s: must not be negative (0 turns it off)")
        if not -1 <= self.s3_port <= 65535:
            raise config.ConfigError(f"s3_port: {self.s3_port} is not a port (or -1: off)")
        if bool(self.s3_tls_cert_file) != bool(self.s3_tls_key_file):
            raise config.ConfigError("s3_tls_cert_file and s3_tls_key_file: give both or neither")
        if self.s3_tls_cert_file and (self.s3_plain_http or self.insecure):
            raise config.ConfigError(
                "s3_tls_cert_file: S3 serves plain HTTP with s3_plain_http or insecure, and "
                "presents no certificate"
            )
        if self.lifecycle_interval_s < 0 or self.lifecycle_day_s <= 0:
            raise config.ConfigError(
                "lifecycle_interval_s: must not be negative (0: off); lifecycle_day_s: positive"
            )
        if self.scan_objects_per_cycle < 1:
            raise config.ConfigError("scan_objects_per_cycle: must be at least 1")
        if self.max_staged_writes_per_tenant < 1:
            raise config.ConfigError("max_staged_writes_per_tenant: must be at least 1")
        if not 128 * 1024 <= self.small_write_max_bytes <= 512 * 1024:
            raise config.ConfigError("small_write_max_bytes: 131072-524288")
        if self.s3_body_timeout_s <= 0 or self.s3_send_timeout_s <= 0:
            raise config.ConfigError("s3_body_timeout_s, s3_send_timeout_s: must be positive")
