"""Datanode drive metrics: capacity, free bytes and online state per drive (issue 17)."""

from __future__ import annotations

import os
from pathlib import Path

import prometheus_client

from services.datanode import drivemetrics, drives


def _sample(name: str, drive: drives.LocalDrive) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(name, {"drive": drive.drive_id})


def test_gauges_follow_the_drive(tmp_path: Path) -> None:
    drive = drives.open_drive(tmp_path / "d0", "node-1")
    drivemetrics.refresh([drive])
    stat = os.statvfs(drive.path)
    assert _sample("kvtier_datanode_drive_online", drive) == 1
    assert _sample("kvtier_datanode_drive_capacity_bytes", drive) == stat.f_blocks * stat.f_frsize
    free = _sample("kvtier_datanode_drive_free_bytes", drive)
    assert free is not None
    assert 0 < free <= stat.f_blocks * stat.f_frsize
    (drive.path / drives.FORMAT_FILE).unlink()  # the drive lost its identity: not online
    drivemetrics.refresh([drive])
    assert _sample("kvtier_datanode_drive_online", drive) == 0
    os.rmdir(drive.path / ".kvtier")
    os.rmdir(drive.path)  # gone altogether
    drivemetrics.refresh([drive])
    assert _sample("kvtier_datanode_drive_online", drive) == 0
