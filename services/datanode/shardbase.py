"""What every layer of a drive's ShardStore shares (services.datanode.shards is the store).

The drive's paths (OBJECTS_DIR, TMP_DIR and the files under `.kvtier`), a key's directory, the
striped per-key locks, the staged writes in progress, the listing index, the journal and its
checkpoint. The store's layers build on it in this order: shardversions (S3 versions of a key),
shardreads (reads, verification, listings), shardrecovery (index repair, rebuilds, the staging
sweep), shards.ShardStore (opening, commits, small writes and the journal, removals).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

from kvtier import errors, names
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import drives, index, journal, shardmeta, versionstore

OBJECTS_DIR = "objects"
TMP_DIR = Path(".kvtier") / "tmp"
#: The listing index of this release's schema (`index.GENERATION` in its name: other releases'
#: files are left to them, `index.other_generations`).
INDEX_FILE = Path(".kvtier") / index.file_name()
JOURNAL_FILE = Path(".kvtier") / "journal"
#: Present only while the drive is closed cleanly (its index checkpointed and synced): created
#: durably at close, removed durably at open before anything changes. Its absence at open on a
#: new boot means the index may have lost transactions: it is rebuilt. A file, not a row of the
#: index: the index's own writes are not synced (synchronous=NORMAL), so a "dirty" row could be
#: lost with a power loss and the next boot would trust a stale index.
CLEAN_FILE = Path(".kvtier") / "index.clean"

_LOCK_STRIPES = 64


class ShardStoreBase:
    """The state of one drive's shard store; makes the drive's directories, opens the listing
    index and the journal (the store replays the journal and repairs the index next)."""

    def __init__(self, drive: drives.LocalDrive) -> None:
        self.drive = drive
        self._objects = drive.path / OBJECTS_DIR
        self._tmp = drive.path / TMP_DIR
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        self._index = index.ShardIndex(drive.path / INDEX_FILE)
        self._journal = journal.Journal(drive.path / JOURNAL_FILE)
        #: keys whose last change is in the journal (their removal is journaled too)
        self._journaled: set[tuple[str, str]] = set()
        self._checkpoint_lock = threading.Lock()
        self._closed = False

    def _object_dir(self, bucket: str, key: str) -> Path:
        names.check_stored(bucket, key)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return Path(f"{self._objects}/{bucket}/{digest[:2]}/{digest}")  # one parse: a hot path

    def _key_lock(self, object_dir: Path) -> threading.Lock:
        return self._locks[int(object_dir.name[:8], 16) % _LOCK_STRIPES]

    @contextlib.contextmanager
    def _all_locks(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for lock in self._locks:
                stack.enter_context(lock)
            yield

    def _release(self, write_id: str) -> None:
        with self._active_lock:
            self._active.discard(write_id)

    @property
    def index_deferred(self) -> int:
        """Listing-index entries waiting in memory (a hint, read without the lock)."""
        return self._index.deferred

    def flush_index(self) -> bool:
        """Write the listing index's deferred entries (index.ShardIndex.put_later) now; False
        when none waited (nothing done)."""
        if not self._index.deferred:
            return False
        self._index.flush()
        return True

    def checkpoint(self, over_bytes: int = 0) -> None:
        """When the journal holds more than over_bytes: sync the drive's filesystem (every
        journaled change is then in durable files) and empty the journal. Holds off every
        writer meanwhile."""
        with self._checkpoint_lock:
            if self._journal.bytes <= over_bytes:
                return
            with self._all_locks():
                self._index.flush()  # the journal's deferred entries, before it is emptied
                journal.sync_filesystem(self.drive.path)
                self._journal.reset()
                self._journaled.clear()

    @staticmethod
    def _current_meta(object_dir: Path) -> datanode_pb2.ShardMeta | None:
        return versionstore.read_file(object_dir / shardmeta.META_FILE, shardmeta.decode_meta)

    @staticmethod
    def _current_version(object_dir: Path) -> tuple[int, str] | None:
        """(mtime, data_id) of the object's meta here, or None when absent or unreadable."""
        try:
            with open(f"{object_dir}/{shardmeta.META_FILE}", "rb") as file:
                meta = shardmeta.decode_meta(file.read(), str(object_dir))
        except (FileNotFoundError, errors.Corrupt):
            return None
        return meta.mtime_unix_ns, meta.data_id
