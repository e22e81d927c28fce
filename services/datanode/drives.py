"""Local drives of a datanode: identity (format file) and capacity.

Each drive holds `.kvtier/format.json` = {"format_version", "drive_id", "node_id"}, written once
when the drive is first used. The drive id is how the cluster map refers to the drive; a drive
that carries another node's format is refused, so disks cannot be silently swapped between nodes.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvtier import config, identity

FORMAT_VERSION = 1
FORMAT_FILE = Path(".kvtier") / "format.json"


@dataclass(frozen=True, slots=True)
class LocalDrive:
    """A formatted drive directory."""

    path: Path
    drive_id: str

    def usage(self) -> tuple[int, int]:
        """(total bytes, free bytes) of the filesystem holding the drive."""
        stat = os.statvfs(self.path)
        return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize


def open_drive(path: Path, node_id: str) -> LocalDrive:
    """Format path on first use, else check that it belongs to node_id.

    Raises ConfigError when the drive belongs to another node or its format is unreadable.
    """
    path.mkdir(parents=True, exist_ok=True)
    fmt_path = path / FORMAT_FILE
    if not fmt_path.exists():
        drive_id = uuid.uuid4().hex
        fmt = {"format_version": FORMAT_VERSION, "drive_id": drive_id, "node_id": node_id}
        identity.write_atomic(fmt_path, json.dumps(fmt).encode())
        return LocalDrive(path=path, drive_id=drive_id)
    try:
        stored = json.loads(fmt_path.read_text())
        drive_id, owner, version = stored["drive_id"], stored["node_id"], stored["format_version"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise config.ConfigError(f"drives: {fmt_path} is unreadable ({exc})") from None
    if version != FORMAT_VERSION:
        raise config.ConfigError(f"drives: {path} has format version {version}")
    if owner != node_id:
        raise config.ConfigError(f"drives: {path} belongs to node {owner}, not {node_id}")
    return LocalDrive(path=path, drive_id=str(drive_id))


def open_drives(paths: list[Path], node_id: str) -> list[LocalDrive]:
    """Open every drive; the same drive reached through two paths is refused."""
    drives = [open_drive(p, node_id) for p in paths]
    if len({d.drive_id for d in drives}) != len(drives):
        raise config.ConfigError("drives: the same drive is listed twice")
    return drives
