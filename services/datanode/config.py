"""Settings of a datanode."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvtier import config, devports

_PORTS = devports.PortPlan().node_ports("datanode", 1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DatanodeConfig(config.DataPlaneServiceConfig):
    """A datanode: shard storage on local drives."""

    # Fixed defaults, the ports of the dev cluster's first datanode (docs/operations.md, Ports).
    grpc_port: int = config.setting(
        _PORTS["grpc_port"],
        "gRPC port for the cluster (mutual TLS); 0 picks a free one (registered in etcd)",
    )
    metrics_port: int = config.setting(
        _PORTS["metrics_port"], "Prometheus metrics port (HTTPS); 0 picks a free one, -1 disables"
    )

    data_dir: str = config.setting("./kvtier-data/datanode", "node state (identity, lock)")
    drives: tuple[str, ...] = config.setting(
        (), "comma-separated drive directories; empty: drive_count folders under data_dir"
    )
    drive_count: int = config.setting(2, "drives to create under data_dir when drives is empty")
    staging_bytes: int = config.setting(
        128 * 1024 * 1024, "data-plane staging memory for shard bytes on their way to/from disk"
    )
    staging_slot_bytes: int = config.setting(
        8 * 1024 * 1024, "largest shard transfer of one call (a staging slot)"
    )
    io_threads: int = config.setting(8, "threads doing disk I/O (bounded: the rest waits)")
    superseded_keep_s: float = config.setting(
        120.0,
        "how long a drive keeps the version an overwrite replaced, so that undoing a commit "
        "that missed its write quorum brings it back (by this process's monotonic clock; "
        "longer than a commit's and its undo's call deadlines, 30 s each)",
    )

    def __post_init__(self) -> None:
        config.DataPlaneServiceConfig.__post_init__(self)
        config.check_storage_dir("data_dir", self.data_dir)
        for drive in self.drives:
            config.check_storage_dir("drives", drive)
        if not self.drives and not 1 <= self.drive_count <= 64:
            raise config.ConfigError(f"drive_count: {self.drive_count} is not in 1..64")
        if self.staging_slot_bytes < 64 * 1024 or self.staging_bytes < self.staging_slot_bytes:
            raise config.ConfigError("staging_slot_bytes: at least 65536 and at most staging_bytes")
        if not 1 <= self.io_threads <= 256:
            raise config.ConfigError(f"io_threads: {self.io_threads} is not in 1..256")
        if not 60 <= self.superseded_keep_s <= 86_400:
            raise config.ConfigError(
                f"superseded_keep_s: {self.superseded_keep_s} is not in 60..86400"
            )
        paths = self.drive_paths()
        if len({p.resolve() for p in paths}) != len(paths):
            raise config.ConfigError("drives: a directory is listed twice")

    def drive_paths(self) -> list[Path]:
        """The drive directories this node serves, in order."""
        if self.drives:
            return [Path(d) for d in self.drives]
        return [Path(self.data_dir) / f"drive{i}" for i in range(self.drive_count)]
