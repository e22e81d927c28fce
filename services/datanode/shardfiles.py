"""The durable file steps of a drive's shard store (services.datanode.shards has the commit order).

A file is written and fsynced before it is renamed into place; a directory is fsynced after an
entry of it is made, renamed or removed. Data dirs are removed only when no version of the key
refers to them. Everything here blocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from services.datanode import shardmeta, versionstore


def fsync_dir(path: Path) -> None:
    """fsync a directory: the entries made, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """Create path and its missing parents, each made durable in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        fsync_dir(directory.parent)


def make_dir(path: Path) -> bool:
    """Make a key's directory (and its parent when missing), not synced (a journaled small
    write's: the journal's replay makes it again); False when it was there already. A small
    write makes a new key's directory before its journal commit: one that fails leaves it
    empty, which reads, writes, removals and the index rebuild take as no object."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except FileNotFoundError:  # the first key of its <h[:2]> directory
        os.makedirs(path, exist_ok=True)
    return True


def write_synced(path: Path, data: bytes) -> None:
    """Write data to path (created or truncated) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_data_dirs(object_dir: Path, keep: str | None) -> None:
    """Remove every data dir of object_dir except keep (old versions, crash leftovers), those
    of the key's non-current S3 versions (versionstore) and those of its superseded versions
    (shardmeta.PREV_FILES, services.datanode.supersede), which stay."""
    stale = []
    versioned, superseded = False, []
    with contextlib.suppress(FileNotFoundError), os.scandir(object_dir) as entries:
        for e in entries:
            if e.name == versionstore.VERSIONS_DIR:
                versioned = True
            elif e.name in shardmeta.PREV_FILES:
                superseded.append(e.name)
            elif e.name != keep and e.is_dir(follow_symlinks=False):
                stale.append(e.path)
    if versioned and stale:  # only keys of versioned buckets pay this
        held = {m.data_id for m in versionstore.noncurrent(object_dir, None, shardmeta.decode_meta)}
        stale = [p for p in stale if os.path.basename(p) not in held]
    for name in superseded if stale else ():
        prev = versionstore.read_file(object_dir / name, shardmeta.decode_meta)
        if prev is not None:
            stale = [p for p in stale if os.path.basename(p) != prev.data_id]
    for path in stale:
        shutil.rmtree(path)


def replace_files(staged: Path, target: Path) -> None:
    """Move every file of staged over its namesake in target, each by an atomic rename.

    Used when a commit brings a data dir that already exists: a version's shard rewritten by
    healing (its data_id names the version, and a drive always holds the same shard index of
    it, so the new files are byte for byte what the old ones should have been). Whatever file
    a crash leaves old, the version stays readable where it was intact before.
    """
    with os.scandir(staged) as entries:
        for entry in entries:
            os.replace(entry.path, target / entry.name)
    fsync_dir(target)
