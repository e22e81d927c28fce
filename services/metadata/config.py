"""Settings of the metadata service."""

from __future__ import annotations

import dataclasses

from kvtier import config, devports
from services.metadata import placement

_PORTS = devports.PortPlan().node_ports("metadata", 1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MetadataConfig(config.ServiceConfig):
    """The metadata service: owner of the cluster map."""

    # Fixed defaults, the ports of the dev cluster's first metadata (docs/operations.md, Ports).
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

    pool_drives: int = config.setting(
        12, "pending datanode drives that form a new pool (the dev cluster: 6 nodes x 2 drives)"
    )
    set_drives: int = config.setting(
        0, "drives per erasure set; 0 picks the largest of 4..16 dividing pool_drives"
    )
    parity_shards: int = config.setting(
        -1, "parity shards per set; -1 uses MinIO's default for the set size"
    )
    master_key_file: str = config.setting(
        "",
        "file of the 32-byte key sealing S3 secrets in etcd (mode 0600; empty: "
        "KVTIER_MASTER_KEY, else no S3 users)",
    )

    def __post_init__(self) -> None:
        config.ServiceConfig.__post_init__(self)
        if self.pool_drives < 1:
            raise config.ConfigError(f"pool_drives: {self.pool_drives} must be at least 1")
        try:
            placement.set_layout(self.policy())
        except ValueError as exc:
            raise config.ConfigError(f"pool_drives/set_drives/parity_shards: {exc}") from None

    def policy(self) -> placement.PlacementPolicy:
        """The placement policy these settings describe."""
        return placement.PlacementPolicy(
            pool_drives=self.pool_drives,
            set_drives=self.set_drives,
            parity_shards=self.parity_shards,
        )
