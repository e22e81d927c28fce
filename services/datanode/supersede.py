"""Superseded versions of a drive: the version an overwrite of an unversioned key replaced,
kept for a while so that undoing the overwrite brings it back (issue 16).

A commit that misses its write quorum is undone on the drives that took it
(services/gateway/commits.py, DeleteShard with if_data_id and restore_previous). Before this,
such a drive had already removed the version the overwrite replaced, and the undo removed the
key: the acknowledged version before the failed PUT was left only on the drives that refused
it, fewer than the data shards when more drives took the write than parity can lose.

On disk (beside the key's `meta`; ARCHITECTURE.md, "On-disk format"):

    objects/<bucket>/<h[:2]>/<h>/meta.prev   the version the last overwrite replaced: a hard
                                             link made to `meta` just before a commit renames
                                             over it (no copy, no sync of its own)
    objects/<bucket>/<h[:2]>/<h>/meta.prev.N the versions replaced before it, N = 1..3, newest
                                             first (each overwrite moves the stack down one)
    objects/<bucket>/<h[:2]>/<h>/<data_id>/  a kept version's data dir, if it has one: kept
                                             while a meta.prev* names it
                                             (shardfiles.remove_data_dirs)
    .kvtier/superseded/<bucket>@<h>          an empty mark: that key may hold kept versions (so
                                             a restart finds every one to reclaim)

A stack of MAX_KEPT superseded versions per key at most, newest first: an overwrite pushes the
version it replaces (the oldest goes past MAX_KEPT), a removal of the key removes them all. Two
concurrent failed overwrites B then C of a key whose acknowledged version is V0 leave a drive
that took both with `meta` = C over [B, V0]; their undos (DeleteShard if_data_id=X with
restore_previous; `ShardStore.delete`) bring V0 back in either order: the undo of the current
version makes the newest kept one current (C undone: B, then B undone: V0), the undo of a kept
version drops only that one (B undone while C is current: [V0], then C undone: V0). An undo
never removes a version that is neither X nor one X replaced. A gap in the stack (a crash while
it moved) is skipped and closed by the next change. Each kept version is reclaimed
(ShardStore.reclaim_superseded, from the datanode's sweep loop) keep_s after it was superseded
by this process's monotonic clock, or after the store's opening for marks found then: no
writer's stamp and no jump of the host's wall clock can shorten it, and a crash only restarts
the wait. An undo arrives within its PUT (seconds), so keep_s need only outlast a request's
deadline.

Everything here blocks and runs under the key's lock (the store's callers hold it), except
`expired`, which only reads the registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import shardmeta, versionstore

log = logging.getLogger(__name__)
PREV_FILE = shardmeta.PREV_FILE
PREV_FILES = shardmeta.PREV_FILES
#: The most superseded versions a key keeps (the oldest goes first).
MAX_KEPT = len(PREV_FILES)
MARKS_DIR = Path(".kvtier") / "superseded"
#: How long a superseded version is kept by default (the datanode's superseded_keep_s).
KEEP_S = 120.0


class Registry:
    """Which keys of a drive hold superseded versions, and since when each was superseded
    (monotonic, newest first, as the stack on disk; for marks found at open: the open)."""

    def __init__(self, drive_path: Path, objects: Path) -> None:
        self._marks = drive_path / MARKS_DIR
        self._marks.mkdir(parents=True, exist_ok=True)
        self._objects = objects
        self._lock = threading.Lock()
        now = time.monotonic()
        self._since: dict[str, list[float]] = {name: [now] for name in os.listdir(self._marks)}

    def __len__(self) -> int:
        return len(self._since)

    def keep(self, object_dir: Path, current: tuple[int, str] | None, data_id: str) -> None:
        """Before object_dir's meta is replaced by the version data_id: push the version it
        holds now (current: its (mtime, data_id); None when there is none) on the key's stack.
        The same version again (stamped again, healed) leaves the stack as it is. Best effort:
        where the drive cannot keep it (logged), an undo removes the key as it did before."""
        if current is None or current[1] == data_id:
            return
        name = mark_name(object_dir)
        with self._lock:
            known = name in self._since
        kept = stack(object_dir) if known else []  # (unmarked: none; the mark comes first)
        with self._lock:
            times = self._times(name, len(kept))
            times.insert(0, time.monotonic())
            del times[MAX_KEPT:]
        try:
            if not known:  # the mark first: a crash then leaves no meta.prev unmarked
                os.close(os.open(f"{self._marks}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC))
            _push(object_dir, kept)
        except OSError as exc:
            log.warning("%s: the superseded version is not kept: %s", object_dir, exc)

    def newest(self, object_dir: Path) -> tuple[str, datanode_pb2.ShardMeta | None] | None:
        """The newest kept version: its file's name and meta (None: unreadable); None: none."""
        kept = stack(object_dir)
        if not kept:
            return None
        return kept[0], versionstore.read_file(object_dir / kept[0], shardmeta.decode_meta)

    def restored(self, object_dir: Path) -> None:
        """The newest kept version was made current (its file renamed over `meta`; the data
        dirs no version names removed): the rest move up, the key is dropped when none is left."""
        kept = stack(object_dir)
        with self._lock:
            self._times(mark_name(object_dir), len(kept) + 1).pop(0)
        _compact(object_dir, kept)
        if not kept:
            self.drop(object_dir)

    def forget(self, object_dir: Path, data_id: str) -> bool:
        """Remove the kept version data_id (an undone write that a newer one replaced here)
        and its data dir; False when the key keeps no such version."""
        kept = stack(object_dir)
        for at, name in enumerate(kept):
            meta = versionstore.read_file(object_dir / name, shardmeta.decode_meta)
            if meta is None or meta.data_id != data_id:
                continue
            with self._lock:
                del self._times(mark_name(object_dir), len(kept))[at]
            os.unlink(object_dir / name)
            if not shardmeta.is_inline(meta):
                shutil.rmtree(object_dir / data_id, ignore_errors=True)
            del kept[at]
            _compact(object_dir, kept)
            if not kept:
                self.drop(object_dir)
            return True
        return False

    def reclaim(self, object_dir: Path, older_than_s: float) -> int | None:
        """Remove the key's kept versions superseded more than older_than_s ago; how many it
        keeps then (the caller removes their data dirs, and drops the key at 0), or None when
        none was that old (renewed meanwhile: an overwrite or an undo)."""
        kept = stack(object_dir)
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            times = self._times(mark_name(object_dir), len(kept))
            left = sum(1 for since in times if since > cutoff)  # newest first: a prefix
            if kept and left == len(kept):
                return None
            del times[left:]
        for name in kept[left:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(object_dir / name)
        _compact(object_dir, kept[:left])
        return left

    def drop(self, object_dir: Path) -> None:
        """object_dir holds no superseded version any more (removed, restored or reclaimed)."""
        name = mark_name(object_dir)
        with self._lock:
            marked = self._since.pop(name, None) is not None
        if marked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marks / name)

    def expired(self, older_than_s: float) -> list[Path]:
        """The key dirs with a superseded version older than older_than_s."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            names = [n for n, times in self._since.items() if not times or times[-1] <= cutoff]
        return [self._object_dir(name) for name in names]

    def _times(self, name: str, count: int) -> list[float]:
        """The key's times, made as long as its stack (count): a stack the registry knows less
        of (marks found at open) takes the oldest time it has. Call with _lock held."""
        times = self._since.setdefault(name, [])
        del times[count:]
        if len(times) < count:
            times.extend([times[-1] if times else time.monotonic()] * (count - len(times)))
        return times

    def _object_dir(self, name: str) -> Path:
        bucket, _, digest = name.rpartition("@")
        return self._objects / bucket / digest[:2] / digest


def mark_name(object_dir: Path) -> str:
    """The mark of a key dir objects/<bucket>/<h[:2]>/<h>: `<bucket>@<h>`."""
    return f"{object_dir.parent.parent.name}@{object_dir.name}"


def stack(object_dir: Path) -> list[str]:
    """The names of the key's kept versions' meta files, newest first (gaps skipped)."""
    return [name for name in PREV_FILES if os.path.lexists(f"{object_dir}/{name}")]


def remove_prev(object_dir: Path) -> None:
    """Remove the key's superseded metas, if any (their data dirs go with remove_data_dirs)."""
    for name in stack(object_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(object_dir / name)


def _compact(object_dir: Path, kept: list[str]) -> None:
    """Move the files kept (stack order, gaps allowed) to the first slots, front to back:
    each target is free by then (it is a gap, or its file moved further up already)."""
    for at, name in enumerate(kept):
        if name != PREV_FILES[at]:
            os.replace(object_dir / name, object_dir / PREV_FILES[at])
            kept[at] = PREV_FILES[at]


def _push(object_dir: Path, kept: list[str]) -> None:
    """Link `meta` as the newest kept version (PREV_FILE): the stack (kept) compacted, the
    oldest past MAX_KEPT removed, the rest moved down one slot, back to front."""
    meta = f"{object_dir}/{shardmeta.META_FILE}"
    with contextlib.suppress(FileNotFoundError):
        if kept and os.path.samefile(meta, object_dir / kept[0]):
            return  # kept already (a commit that failed after keep, tried again)
    for name in kept[MAX_KEPT - 1 :]:
        os.unlink(object_dir / name)
    del kept[MAX_KEPT - 1 :]
    _compact(object_dir, kept)
    for at in reversed(range(len(kept))):
        os.replace(object_dir / PREV_FILES[at], object_dir / PREV_FILES[at + 1])
    try:
        os.link(meta, object_dir / PREV_FILE)
    except FileExistsError:  # an unmarked leftover (a removal that failed half-way): stale
        os.unlink(object_dir / PREV_FILE)
        os.link(meta, object_dir / PREV_FILE)
    except FileNotFoundError:
        pass
