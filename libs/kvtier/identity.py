"""Persistent node identity and the state-directory lock.

A datanode or kvcache node keeps its id in `<data_dir>/node.json` so that a restart rejoins the
cluster as the same node. An exclusive `flock` on `<data_dir>/LOCK` keeps two processes from
running with the same state directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import IO

from kvtier import config


def lock_state_dir(data_dir: Path) -> IO[bytes]:
    """Take an exclusive lock on data_dir, held until the returned file is closed.

    Raises ConfigError when another process (or another open of it) holds the lock.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "LOCK").open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise config.ConfigError(f"data_dir: {data_dir} is in use by another process") from None
    return handle


def load_or_create(data_dir: Path, configured_id: str, role: str) -> str:
    """The node id kept in data_dir, created on first start.

    A configured id must match the kept one (a ConfigError otherwise): a state directory belongs
    to exactly one node.
    """
    path = data_dir / "node.json"
    if path.exists():
        try:
            kept = str(json.loads(path.read_text())["node_id"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise config.ConfigError(f"data_dir: {path} is unreadable ({exc})") from None
        if configured_id and configured_id != kept:
            raise config.ConfigError(
                f"node_id: {configured_id!r} differs from {kept!r} kept in {path}"
            )
        return kept
    node_id = configured_id or f"{role}-{uuid.uuid4().hex[:8]}"
    write_atomic(path, json.dumps({"node_id": node_id, "role": role}).encode())
    return node_id


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write a small file so that readers see the old or the new content, never a torn one.

    With mode, the file has that mode from its creation (a secret is never readable by others,
    not even for a moment); without, the process's default.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)  # exactly mode, whatever the umask
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
