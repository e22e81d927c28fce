"""A drive's commit journal: small commits made durable by one group fsync for many writers.

`<drive>/.kvtier/journal` is a sequence of records, each `kind (u8) | length (u32 LE) | body |
xxh3-64 of the previous fields and body (8 bytes LE)`; a body is a `ShardMeta`. A commit appends
its record and returns once an fdatasync covers it: writers that arrive while a sync is in
flight queue their records, and the next sync (made by the first of them, the leader) covers
them all. A failed write or sync fails every commit of its batch. A failed sync, or any other
I/O error, leaves the journal broken (Unavailable for every later commit) until the datanode
restarts: the tail after the last good sync is unknown, and replay stops at the first record
that does not check. A drive found full before the sync (ENOSPC or EDQUOT writing the batch)
does not: the batch is cut off the file and that cut synced, so the file holds exactly the
acknowledged records again, and the next commit tries anew (a full drive refuses writes while
it is full and takes them again once space is freed; broken, it refused them until a restart).

The file is preallocated ahead of the appends, PREALLOCATE_BYTES at a time, by writing zeros:
an append into blocks already written and sized does not change the file's size or extents, so
its fdatasync flushes the data alone, not the inode too (fallocate(2) would leave unwritten
extents, whose conversion on the first write is a metadata change again). Crash safety is
unchanged: a zeroed tail reads as the end (kind 0 is no record); the first sync into a fresh
chunk also makes its size and zeros durable (fdatasync covers a size change), so a replay never
sees a chunk whose zeros were lost; a torn record ends the replay as before, and what follows it
(zeros, or the rest of a batch that was never acknowledged) is ignored. A reset truncates the
file to nothing, so no record of an earlier generation is left behind the new ones.

The store (services.datanode.shards) applies a journaled change to the drive's files without
syncing them, replays the journal when it opens (a crash may have lost the applied files), and
empties it at a checkpoint once those files are synced (`syncfs`). Everything here blocks.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvtier import errors
from services.datanode import framing

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<BI")

#: how far the file is extended with zeros when an append reaches its end
#: (the first sync into a chunk writes it all: 4 MiB costs ~1 ms of CPU and a few ms of wait,
#: once per ~1,700 two-shard calls)
PREALLOCATE_BYTES = 4 << 20
_ZEROS = bytes(1 << 20)


class Kind(enum.IntEnum):
    """What a record does at replay."""

    #: Install the meta (inline shard included) unless the drive holds a version as new or newer.
    INSTALL = 1
    #: Remove the key unless the drive holds a newer version than the meta's (mtime, data_id).
    REMOVE = 2


_KINDS = frozenset(k.value for k in Kind)


#: A drive full (or its user over quota): the batch was refused, the journal stays usable.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def encode(kind: Kind, body: bytes) -> bytes:
    """One record's bytes."""
    head = _HEAD.pack(int(kind), len(body))
    return head + body + framing.digest(head + body)


def decode(raw: bytes) -> Iterator[tuple[Kind, bytes]]:
    """The records of raw, up to the first one that is torn or does not check."""
    at, view = 0, memoryview(raw)
    while at + _HEAD.size <= len(raw):
        kind, length = _HEAD.unpack_from(raw, at)
        end = at + _HEAD.size + length
        if end + framing.HASH_BYTES > len(raw) or kind not in _KINDS:
            return
        if framing.digest(view[at:end]) != raw[end : end + framing.HASH_BYTES]:
            return
        yield Kind(kind), raw[at + _HEAD.size : end]
        at = end + framing.HASH_BYTES


class Journal:
    """One drive's journal (see the module docstring); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._cond = threading.Condition()
        self._queued: list[bytes] = []
        self._appended = 0  # sequence number of the last record queued
        self._durable = 0  # ... of the last record a sync covered
        self._failed: list[tuple[int, int, str]] = []  # (first, last, why) of failed batches
        self._syncing = False
        self._broken = ""
        #: where the next record goes: at open, past whatever the file holds (the store
        #: replays and resets a journal that is not empty before it commits)
        self.bytes = os.fstat(self._fd).st_size
        self._allocated = self.bytes  # the file's size: zeros from self.bytes on
        #: syncs made (for tests and metrics)
        self.syncs = 0

    def read(self) -> list[tuple[Kind, bytes]]:
        """Every good record in the journal, in order (for replay at open)."""
        return list(decode(self.path.read_bytes()))

    def commit(self, record: bytes) -> None:
        """Append record (from `encode`) and return once it is durable; Unavailable when the
        write or sync of its batch failed, or the journal broke before."""
        self.commit_many((record,))

    def commit_many(self, records: Sequence[bytes]) -> None:
        """Append records (in order, in one sync batch) and return once all are durable; as
        `commit` (a failure fails them all)."""
        with self._cond:
            if self._broken:
                raise errors.Unavailable(f"journal {self.path} is broken: {self._broken}")
            self._queued.extend(records)
            self._appended += len(records)
            mine = self._appended
            while self._syncing and self._durable < mine:
                self._cond.wait()
            if self._durable >= mine:
                return
            self._raise_if_failed(mine)
            batch, self._queued = self._queued, []
            first, last = self._appended - len(batch) + 1, self._appended
            self._syncing = True
        why, broken = self._write(batch)
        with self._cond:
            self._syncing = False
            if why:
                if broken:
                    self._broken = why
                self._failed.append((first, last, why))
            else:
                self._durable = last
            self._cond.notify_all()
            self._raise_if_failed(mine)

    def _write(self, batch: list[bytes]) -> tuple[str, bool]:
        """Write and sync a batch (no lock held); an error's text ("" when none) and whether
        it leaves the journal broken (module docstring)."""
        data = b"".join(batch)
        syncing = False
        try:
            if self.bytes + len(data) > self._allocated:
                self._preallocate(self.bytes + len(data))
            framing.pwrite_all(self._fd, [data], self.bytes)
            syncing = True
            os.fdatasync(self._fd)
        except OSError as exc:
            log.error("journal %s: %s; failing %d commits", self.path, exc, len(batch))
            cut = False
            try:  # a replay must not bring back commits that were refused
                self._allocated = self.bytes
                os.ftruncate(self._fd, self.bytes)
                if not syncing and exc.errno in _FULL_ERRNOS:
                    os.fdatasync(self._fd)  # the cut durable: the file is what was acknowledged
                    cut = True
            except OSError:
                log.warning("journal %s: the failed batch could not be cut off", self.path)
            return str(exc), not cut
        self.bytes += len(data)
        self.syncs += 1
        return "", False

    def _preallocate(self, end: int) -> None:
        """Extend the file with zeros to cover end and PREALLOCATE_BYTES more (not synced
        here: the batch's fdatasync covers them). A drive too full for that keeps the file as
        it was: the batch then grows it as it goes, as an append without preallocation does."""
        # (after a failed preallocation the records themselves grew the file past _allocated)
        at, goal = max(self._allocated, self.bytes), end + PREALLOCATE_BYTES
        try:
            while at < goal:
                at += os.pwrite(self._fd, memoryview(_ZEROS)[: goal - at], at)
        except OSError as exc:
            log.warning("journal %s: not preallocated: %s", self.path, exc)
            self._allocated = self.bytes
            os.ftruncate(self._fd, self.bytes)
            return
        self._allocated = at

    def _raise_if_failed(self, seq: int) -> None:
        for first, last, why in self._failed:
            if first <= seq <= last:
                raise errors.Unavailable(f"journal {self.path}: the commit failed: {why}")
        if self._broken:
            raise errors.Unavailable(f"journal {self.path} is broken: {self._broken}")

    def reset(self) -> None:
        """Empty the journal (a checkpoint: the caller has made every applied change durable
        and holds off new commits)."""
        with self._cond:
            if self._syncing or self._queued:
                raise errors.Internal("journal reset while commits are in flight")
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self.bytes = self._allocated = 0

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


_libc: ctypes.CDLL | None = None


def sync_filesystem(path: Path) -> None:
    """Make every write to the filesystem holding path durable (syncfs(2); sync(2) without it)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
