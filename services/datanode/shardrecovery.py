"""A drive's ShardStore repairs: the listing index checked at open (pending keys read again, or
rebuilt from the meta files after an unclean shutdown of another boot), rebuilds, and the sweep
of staged writes a previous process left in `.kvtier/tmp`. The journal's replay comes first
(services.datanode.shards).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import index, shardbase, shardfiles, shardmeta, shardreads, versionstore

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class ShardRecovery(shardreads.ShardReads):
    """Index repair and rebuilds of a drive's shard store."""

    def _recover(self, fresh: bool) -> None:
        marker = self.drive.path / shardbase.CLEAN_FILE
        clean = marker.exists()
        state, boot = self._index.get_state(), _boot_id()
        # Another release's index file: that release may have run on this drive since this
        # file was last written (a rollback, then this release again), so this one is rebuilt,
        # and the other's removed once it is, for that release to rebuild its own if run again.
        others = index.other_generations(self.drive.path / shardbase.INDEX_FILE)
        if others or fresh or "boot_id" not in state or (not clean and state["boot_id"] != boot):
            count = self.rebuild_index()
            log.info("drive %s: index rebuilt, %d objects", self.drive.path, count)
        else:
            for bucket, key in self._index.pending():
                self._reindex(bucket, key)
        self._index.set_state(boot_id=boot)
        if others:
            for path in others:
                path.unlink(missing_ok=True)
            log.info("drive %s: index files of other releases removed: %s", self.drive.path,
                     ", ".join(p.name for p in others))  # fmt: skip
        if clean:  # dirty from now on, durably, before the first change
            marker.unlink()
        if others or clean:
            shardfiles.fsync_dir(marker.parent)

    def sweep_tmp(self, older_than_s: float) -> int:
        """Remove staged writes (not in progress here) older than older_than_s; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                with self._active_lock:
                    if entry.name in self._active:
                        continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        if removed:
            log.info("drive %s: swept %d stale staged writes", self.drive.path, removed)
        return removed

    def rebuild_index(self) -> int:
        """Rebuild the listing index from the meta files (blocks writers meanwhile).

        Also removes data dirs no meta refers to. Returns the number of objects indexed.
        """
        rows: list[tuple[str, index.ListEntry]] = []
        kept: list[tuple[str, index.VersionEntry]] = []
        progress = _Progress(str(self.drive.path))
        with self._all_locks():
            for bucket_dir in sorted(self._objects.iterdir()):
                for object_dir in sorted(bucket_dir.glob("*/*")):
                    progress.step()
                    meta = self._scan_object(bucket_dir.name, object_dir)
                    if (object_dir / versionstore.VERSIONS_DIR).is_dir():
                        others = versionstore.noncurrent(object_dir, meta, shardmeta.decode_meta)
                        versionstore.prune(object_dir, meta, others, shardmeta.is_inline)
                        entry, versions = versionstore.entries(meta, others)
                        kept.extend((bucket_dir.name, v) for v in versions)
                        if entry is not None:
                            rows.append((bucket_dir.name, entry))
                    elif meta is not None:
                        if meta.keep_versions:
                            _, versions = versionstore.entries(meta, [])
                            kept.extend((bucket_dir.name, v) for v in versions)
                        rows.append((bucket_dir.name, shardmeta.list_entry(meta)))
            self._index.replace_all(rows, kept)
        return len(rows)

    def _scan_object(self, bucket: str, object_dir: Path) -> datanode_pb2.ShardMeta | None:
        if not object_dir.is_dir():
            return None
        try:
            meta = shardmeta.decode_meta(
                (object_dir / shardmeta.META_FILE).read_bytes(), str(object_dir)
            )
            digest = hashlib.sha256(meta.key.encode()).hexdigest()
            if (meta.bucket, digest) != (bucket, object_dir.name):
                raise errors.Corrupt(f"{object_dir}: meta names {meta.bucket}/{meta.key}")
        except FileNotFoundError:
            # A crash after the data rename, or an older datanode's removal of a key that
            # kept a superseded version (services.datanode.supersede).
            for name in shardmeta.PREV_FILES:
                (object_dir / name).unlink(missing_ok=True)
            shardfiles.remove_data_dirs(object_dir, None)
            with contextlib.suppress(OSError):
                object_dir.rmdir()
            return None
        except errors.Corrupt as exc:
            log.warning("drive %s: not indexed: %s", self.drive.path, exc)
            return None
        shardfiles.remove_data_dirs(object_dir, None if shardmeta.is_inline(meta) else meta.data_id)
        return meta

    def _reindex(self, bucket: str, key: str) -> None:
        object_dir = self._object_dir(bucket, key)
        with self._key_lock(object_dir):
            current = self._current_meta(object_dir)
            versioned = current is not None and current.keep_versions
            if versioned or (object_dir / versionstore.VERSIONS_DIR).is_dir():
                self._reindex_versions(object_dir, bucket, key, current)
                return
            try:
                self._index.put(bucket, shardmeta.list_entry(self.read_meta(bucket, key)))
            except (errors.NotFound, errors.Corrupt):
                self._index.remove(bucket, key)

    def mark_pending(self, bucket: str, key: str) -> None:
        """Mark the key pending in the index before an in-place rewrite of one of its metas
        changes a listed field (the owner in its ACL: `metaupdate`), so that a crash before
        `reindex` is repaired at the next open."""
        self._index.mark_pending(bucket, key)

    def reindex(self, bucket: str, key: str) -> None:
        """Index the key again from its metas (and clear its pending mark)."""
        self._reindex(bucket, key)


class _Progress:
    """A rebuild's progress in the log every PROGRESS_S (a drive of millions of objects takes
    minutes, ~20 µs a meta, at boot: the operator sees it move)."""

    PROGRESS_S = 5.0
    #: keys between two looks at the clock
    EVERY = 1024

    def __init__(self, drive: str) -> None:
        self._drive, self._seen = drive, 0
        self._start = self._last = time.monotonic()

    def step(self) -> None:
        self._seen += 1
        if self._seen % self.EVERY:
            return
        now = time.monotonic()
        if now - self._last >= self.PROGRESS_S:
            self._last = now
            rate = self._seen / (now - self._start)
            log.info("drive %s: rebuilding the index, %d keys read (%.0f/s)", self._drive,
                     self._seen, rate)  # fmt: skip
