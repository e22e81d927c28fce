"""Drive metrics of a datanode for Prometheus: each drive's capacity, free bytes and whether it
is online (its file system answers and its format file is readable), refreshed every
REFRESH_S by the node's drive loop, and the latency of the node's disk work by operation
(`IO_SECONDS`, observed around every job of the I/O pool). No grpc here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import prometheus_client

from services.datanode import drives

#: Seconds between two refreshes of the drive gauges.
REFRESH_S = 10.0

CAPACITY = prometheus_client.Gauge(
    "kvtier_datanode_drive_capacity_bytes", "Size of the file system holding the drive", ["drive"]
)
FREE = prometheus_client.Gauge(
    "kvtier_datanode_drive_free_bytes",
    "Bytes free for kvtier on the drive's file system",
    ["drive"],
)
ONLINE = prometheus_client.Gauge(
    "kvtier_datanode_drive_online",
    "1 when the drive answers (statvfs and its format file)",
    ["drive"],
)
IO_SECONDS = prometheus_client.Histogram(
    "kvtier_datanode_io_seconds",
    "Disk work of one shard operation in the I/O pool (queueing included)",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


def online(drive: drives.LocalDrive) -> bool:
    """Whether the drive answers: its file system and its format file."""
    try:
        os.statvfs(drive.path)
        return (drive.path / drives.FORMAT_FILE).is_file()
    except OSError:
        return False


def refresh(local: Iterable[drives.LocalDrive]) -> None:
    """Set every drive's gauges (blocking: statvfs; run it off the event loop)."""
    for drive in local:
        up = online(drive)
        ONLINE.labels(drive.drive_id).set(1 if up else 0)
        if not up:
            continue
        try:
            total, free = drive.usage()
        except OSError:
            ONLINE.labels(drive.drive_id).set(0)
            continue
        CAPACITY.labels(drive.drive_id).set(total)
        FREE.labels(drive.drive_id).set(free)
