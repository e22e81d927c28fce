"""Superseded versions of a drive: the version an overwrite of an unversioned key replaced,
kept for a while so that undoing the overwrite brings it back (issue 16).

A commit that misses its write quorum is undone on the drives that took it
(services/gateway/commits.py, DeleteShard with if_data_id and restore_previous). Before this,
such a drive had already removed the version the overwrite replaced, and the undo removed the
key: the acknowledged version before the failed PUT was left only on the drives that refused
it, fewer than the data shards when more drives took the write than parity can lose.

On disk (beside the key's `meta`; ARCHITECTURE.md, "On-disk format"):

    objects/<bucket>/<h[:2]>/<h>/meta.prev   the replaced version's meta file: a hard link made
                                             to `meta` just before a commit renames over it (no
                                             copy, no sync of its own)
    objects/<bucket>/<h[:2]>/<h>/<data_id>/  its data dir, if it has one: kept while meta.prev
                                             names it (shardfiles.remove_data_dirs)
    .kvtier/superseded/<bucket>@<h>          an empty mark: that key may hold a meta.prev (so
                                             a restart finds every one to reclaim)

One superseded version per key at most: the next overwrite replaces it, a removal of the key
removes it, an undo makes it current again. The rest is reclaimed (ShardStore.reclaim_superseded,
from the datanode's sweep loop) keep_s after the overwrite by this process's monotonic clock, or
after the store's opening for marks found then: no writer's stamp and no jump of the host's
wall clock can shorten it, and a crash only restarts the wait. An undo arrives within its PUT
(seconds), so keep_s need only outlast a request's deadline.

Everything here blocks and runs under the key's lock (the store's callers hold it), except
`expired`, which only reads the registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from services.datanode import shardmeta

log = logging.getLogger(__name__)
PREV_FILE = shardmeta.PREV_FILE
MARKS_DIR = Path(".kvtier") / "superseded"
#: How long a superseded version is kept by default (the datanode's superseded_keep_s).
KEEP_S = 120.0


class Registry:
    """Which keys of a drive may hold a superseded version, and since when (monotonic)."""

    def __init__(self, drive_path: Path, objects: Path) -> None:
        self._marks = drive_path / MARKS_DIR
        self._marks.mkdir(parents=True, exist_ok=True)
        self._objects = objects
        self._lock = threading.Lock()
        now = time.monotonic()
        self._since: dict[str, float] = {name: now for name in os.listdir(self._marks)}

    def __len__(self) -> int:
        return len(self._since)

    def keep(self, object_dir: Path, current: tuple[int, str] | None, data_id: str) -> None:
        """Before object_dir's meta is replaced by the version data_id: keep the version it
        holds now (current: its (mtime, data_id); None when there is none) as superseded. The
        same version again (stamped again, healed) leaves the one kept before it. Best effort:
        where the drive cannot keep it (logged), an undo removes the key as it did before."""
        if current is None or current[1] == data_id:
            return
        name = mark_name(object_dir)
        with self._lock:
            known = name in self._since
            self._since[name] = time.monotonic()
        prev = f"{object_dir}/{PREV_FILE}"
        try:
            if not known:  # the mark first: a crash then leaves no meta.prev unmarked
                os.close(os.open(f"{self._marks}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prev)
            with contextlib.suppress(FileNotFoundError):
                os.link(f"{object_dir}/{shardmeta.META_FILE}", prev)
        except OSError as exc:
            log.warning("%s: the superseded version is not kept: %s", object_dir, exc)

    def drop(self, object_dir: Path) -> None:
        """object_dir holds no superseded version any more (meta.prev removed or restored)."""
        name = mark_name(object_dir)
        with self._lock:
            marked = self._since.pop(name, None) is not None
        if marked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marks / name)

    def expired(self, older_than_s: float) -> list[Path]:
        """The key dirs whose superseded version is older than older_than_s."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            names = [name for name, since in self._since.items() if since <= cutoff]
        return [self._object_dir(name) for name in names]

    def still_expired(self, object_dir: Path, older_than_s: float) -> bool:
        """expired for one key again, under its lock (an overwrite meanwhile renews it)."""
        with self._lock:
            since = self._since.get(mark_name(object_dir))
        return since is not None and since <= time.monotonic() - older_than_s

    def _object_dir(self, name: str) -> Path:
        bucket, _, digest = name.rpartition("@")
        return self._objects / bucket / digest[:2] / digest


def mark_name(object_dir: Path) -> str:
    """The mark of a key dir objects/<bucket>/<h[:2]>/<h>: `<bucket>@<h>`."""
    return f"{object_dir.parent.parent.name}@{object_dir.name}"


def remove_prev(object_dir: Path) -> None:
    """Remove the key's superseded meta, if any (its data dir goes with remove_data_dirs)."""
    prev = object_dir / PREV_FILE
    if os.path.lexists(prev):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prev)
