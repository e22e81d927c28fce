"""The shard store of one drive: block-checksummed shards and their metadata, committed atomically.

Layout under the drive (ARCHITECTURE.md, "The durable object tier"), h = hex SHA-256 of the key:

    objects/<bucket>/<h[:2]>/<h>/meta              ShardMeta bytes + their xxh3-64 (8 bytes LE)
    objects/<bucket>/<h[:2]>/<h>/<data_id>/part.N  the part's shard: blocks of <= block_bytes,
                                                   each followed by its xxh3-64 (8 bytes LE;
                                                   services.datanode.framing)
    .kvtier/tmp/<write_id>/                        a staged write (data/part.N, meta)
    .kvtier/index.sqlite                           the listing index (services.datanode.index)
    .kvtier/journal                                small commits and their removals, not yet
                                                   synced in the files (services.datanode.journal)

A shard of at most INLINE_MAX_BYTES in total (all parts) has no data directory: its framed blocks
live in `meta.inline_data`, in part order.

Commit order (a crash at any point leaves the old version or the new one readable, whole):
fsync part files and the staged data dir → rename it to `<h>/<data_id>` → fsync `<h>` → mark the
key pending in the index → write `meta` in staging, fsync → rename over `<h>/meta` → fsync `<h>`
→ index entry → remove every other data dir under `<h>` (the previous version, crash leftovers).
A commit of a data_id whose data dir exists (healing rewrites a drive's shard of the version it
holds) renames the staged part files over the existing ones instead, one by one.
A small write (`ShardStore.write_small`: one part, the whole shard of at most INLINE_MAX_BYTES in
one call) takes another path: its meta (the shard inline) is appended to the drive's journal and
synced there, one fdatasync for every commit that arrived meanwhile (group commit), then written
over `<h>/meta` by rename without a sync of its own; a removal of a key whose last change is
journaled is journaled too. Opening the store replays the journal (each record installed only
over an older version, removed only over one as old or older) before anything is read; a
checkpoint (syncfs, then an empty journal) runs when the journal grows past
JOURNAL_CHECKPOINT_BYTES and at close.
Operations on one key are serialized by a striped lock; everything here blocks (run it in the
datanode's bounded executor).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf import message as pb_message

from kvtier import errors, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import drives, framing, index, journal, versionstore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 20
MAX_BLOCK_BYTES = 16 << 20
INLINE_MAX_BYTES = 128 << 10
MAX_PART_NUMBER = 10_000
OBJECTS_DIR = "objects"
TMP_DIR = Path(".kvtier") / "tmp"
INDEX_FILE = Path(".kvtier") / "index.sqlite"
JOURNAL_FILE = Path(".kvtier") / "journal"
#: Present only while the drive is closed cleanly (its index checkpointed and synced): created
#: durably at close, removed durably at open before anything changes. Its absence at open on a
#: new boot means the index may have lost transactions: it is rebuilt. A file, not a row of the
#: index: the index's own writes are not synced (synchronous=NORMAL), so a "dirty" row could be
#: lost with a power loss and the next boot would trust a stale index.
CLEAN_FILE = Path(".kvtier") / "index.clean"
JOURNAL_CHECKPOINT_BYTES = 64 << 20
META_FILE = "meta"

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Names in a key's directory that no data dir may take.
_RESERVED_IDS = frozenset({META_FILE, versionstore.VERSIONS_DIR, objversions.NULL})
_LOCK_STRIPES = 64
_VERIFY_BLOCKS = 4

ShardMeta = datanode_pb2.ShardMeta
ListEntry = index.ListEntry
BadBlock = tuple[int, int]


def is_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether the object's shard lives in its meta (small shards, pool records) or in files."""
    return sum(p.shard_bytes for p in meta.parts) <= INLINE_MAX_BYTES


def encode_meta(meta: datanode_pb2.ShardMeta) -> bytes:
    """The bytes of a meta file: the message and its checksum."""
    body = meta.SerializeToString(deterministic=True)
    return body + framing.digest(body)


def decode_meta(raw: bytes, where: str) -> datanode_pb2.ShardMeta:
    """Parse a meta file; raises Corrupt when its checksum, encoding or version is wrong."""
    body = raw[: -framing.HASH_BYTES]
    if len(raw) < framing.HASH_BYTES or framing.digest(body) != raw[-framing.HASH_BYTES :]:
        raise errors.Corrupt(f"{where}: meta checksum mismatch")
    meta = ShardMeta()
    try:
        meta.ParseFromString(body)
    except pb_message.DecodeError:
        raise errors.Corrupt(f"{where}: meta does not parse") from None
    if meta.format_version != FORMAT_VERSION:
        raise errors.Corrupt(f"{where}: unknown meta format version {meta.format_version}")
    if not 0 < meta.block_bytes <= MAX_BLOCK_BYTES:
        raise errors.Corrupt(f"{where}: meta has block_bytes {meta.block_bytes}")
    return meta


def _entry(meta: datanode_pb2.ShardMeta) -> index.ListEntry:
    return index.ListEntry(
        meta.key, meta.size, meta.etag, meta.mtime_unix_ns, meta.is_pointer, meta.delete_marker
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create path and its missing parents, each made durable in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        _fsync_dir(directory.parent)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _remove_data_dirs(object_dir: Path, keep: str | None) -> None:
    """Remove every data dir of object_dir except keep (old versions, crash leftovers) and
    those of the key's non-current S3 versions (versionstore), which stay."""
    stale = []
    versioned = False
    with contextlib.suppress(FileNotFoundError), os.scandir(object_dir) as entries:
        for e in entries:
            if e.name == versionstore.VERSIONS_DIR:
                versioned = True
            elif e.name != keep and e.is_dir(follow_symlinks=False):
                stale.append(e.path)
    if versioned and stale:  # only keys of versioned buckets pay this
        held = {m.data_id for m in versionstore.noncurrent(object_dir, None, decode_meta)}
        stale = [p for p in stale if os.path.basename(p) not in held]
    for path in stale:
        shutil.rmtree(path)


def _replace_files(staged: Path, target: Path) -> None:
    """Move every file of staged over its namesake in target, each by an atomic rename.

    Used when a commit brings a data dir that already exists: a version's shard rewritten by
    healing (its data_id names the version, and a drive always holds the same shard index of
    it, so the new files are byte for byte what the old ones should have been). Whatever file
    a crash leaves old, the version stays readable where it was intact before.
    """
    with os.scandir(staged) as entries:
        for entry in entries:
            os.replace(entry.path, target / entry.name)
    _fsync_dir(target)


#: How far ahead of this node's clock a version's stamp may be. Stamps come from the gateways'
#: hybrid logical clocks (kvtier.hlc), which run ahead of real time by at most the largest
#: clock skew among the gateways: 30 min tolerates gateways skewed ±10 min (the fault suite's
#: scenario) with room to spare, and still refuses a stamp that would win every later write
#: for hours.
MAX_FUTURE_MTIME_NS = 1800 * 1_000_000_000


def _stamp(stored: datanode_pb2.ShardMeta, where: str) -> None:
    """Set the format version and a missing mtime (now); ClockSkew for one more than
    MAX_FUTURE_MTIME_NS ahead of this node's clock."""
    stored.format_version = FORMAT_VERSION
    now = time.time_ns()
    if stored.mtime_unix_ns > now + MAX_FUTURE_MTIME_NS:
        # A version stamped far in the future would win every later write (commits keep the
        # newest stamp): refused, whoever sent it.
        ahead_s = (stored.mtime_unix_ns - now) // 1_000_000_000
        raise errors.ClockSkew(
            f"{where}: mtime is {ahead_s} s ahead of this datanode's clock (at most "
            f"{MAX_FUTURE_MTIME_NS // 1_000_000_000} s): the writer's clock is skewed"
        )
    stored.mtime_unix_ns = stored.mtime_unix_ns or now


def _name_version(stored: datanode_pb2.ShardMeta, where: str) -> None:
    """Set a missing data_id (a new uuid); InvalidArgument for one that is no safe name."""
    stored.data_id = stored.data_id or uuid.uuid4().hex
    if not _SAFE_ID.fullmatch(stored.data_id) or stored.data_id in _RESERVED_IDS:
        raise errors.InvalidArgument(f"{where}: data_id {stored.data_id!r} is not a safe name")


def seal_small(meta: datanode_pb2.ShardMeta, shard: framing.Buffer) -> datanode_pb2.ShardMeta:
    """The meta to store for a small write: meta completed (as a commit does) with the shard's
    framed blocks inline. InvalidArgument unless meta has one part whose shard_bytes is
    len(shard), at most INLINE_MAX_BYTES."""
    names.check_stored(meta.bucket, meta.key)
    where = f"{meta.bucket}/{meta.key}"
    view = memoryview(shard).cast("B")
    if len(meta.parts) != 1 or meta.parts[0].shard_bytes != len(view):
        raise errors.InvalidArgument(f"{where}: a small write has one part of the shard's bytes")
    if len(view) > INLINE_MAX_BYTES or not 1 <= meta.parts[0].number <= MAX_PART_NUMBER:
        raise errors.InvalidArgument(f"{where}: not a small write ({len(view)} shard bytes)")
    stored = ShardMeta()
    stored.CopyFrom(meta)
    size = stored.block_bytes = stored.block_bytes or BLOCK_BYTES
    if not 0 < size <= MAX_BLOCK_BYTES:
        raise errors.InvalidArgument(f"{where}: block_bytes {size}: 1-{MAX_BLOCK_BYTES}")
    _stamp(stored, where)
    _name_version(stored, where)
    blocks = (view[at : at + size] for at in range(0, len(view), size))
    stored.inline_data = b"".join(bytes(b) + framing.digest(b) for b in blocks)
    return stored


class Superseded(errors.PreconditionFailed):
    """A commit with only_if_newer found a newer version on the drive, stamped
    `current_mtime_unix_ns` (the writer may stamp its version above it and commit again)."""

    def __init__(self, message: str = "", *, current_mtime_unix_ns: int = 0) -> None:
        super().__init__(message)
        self.current_mtime_unix_ns = current_mtime_unix_ns


class StagedWrite:
    """A write of one object version to a drive, invisible until commit.

    Shard bytes arrive through write_part (appends in order, or block-aligned writes); the store
    frames them into checksummed blocks on arrival, in memory while the whole shard could still
    be inline, then in files under the staging dir. A write whose commit raised must be aborted.
    Usable as a context manager that aborts unless committed.
    """

    def __init__(self, store: ShardStore, write_id: str, path: Path, block_bytes: int) -> None:
        self.write_id = write_id
        self.path = path
        self.block_bytes = block_bytes
        self._store = store
        self._lock = threading.Lock()
        self._parts: dict[int, framing.PartStager] = {}
        self._staged = 0
        self._in_memory = True
        self._state = "open"
        #: commit only when the drive holds no newer version (mtime, then data_id)
        self.only_if_newer = False
        #: a versioned bucket's write the gateway can send again (compose): refused like an
        #: unversioned one when older, so the gateway restamps it (see _refuse_older)
        self.resendable = False

    def __enter__(self) -> StagedWrite:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.abort()

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def write_part(
        self, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> int:
        """Stage data (raw shard bytes) at offset of the part's shard; returns len(data).

        offset must be a multiple of block_bytes or the end of the previous write of a block still
        filling; bytes already written cannot be written again (InvalidArgument).
        """
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise errors.InvalidArgument(f"part number {part_number}: must be 1-{MAX_PART_NUMBER}")
        if offset < 0:
            raise errors.InvalidArgument(f"offset {offset}: must not be negative")
        view = memoryview(data).cast("B")
        with self._lock:
            self._check_open()
            stage = self._parts.get(part_number)
            if stage is None:
                stage = self._parts[part_number] = framing.PartStager(self.block_bytes)
                if not self._in_memory:
                    stage.spill(self.data_dir / f"part.{part_number}")
            end = offset + len(view)
            if self._in_memory and max(end, self._staged + len(view)) > INLINE_MAX_BYTES:
                self._spill()
            stage.write(offset, view)
            self._staged += len(view)
        return len(view)

    def adopt_part(
        self, part_number: int, shard_bytes: int, *, frames: bytes = b"", path: Path | None = None
    ) -> None:
        """Take a whole part's shard from a committed object on this drive: its framed bytes
        (an inline shard) or its part file, hard-linked (no copy; the source may go away later).

        Multipart uploads are completed this way: each uploaded part is an object of its own.
        """
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise errors.InvalidArgument(f"part number {part_number}: must be 1-{MAX_PART_NUMBER}")
        with self._lock:
            self._check_open()
            if part_number in self._parts:
                raise errors.InvalidArgument(f"part {part_number} is staged already")
            if self._in_memory and self._staged + shard_bytes > INLINE_MAX_BYTES:
                self._spill()
            stage = framing.PartStager.finished(self.block_bytes, shard_bytes)
            if path is None:
                stage.memory = bytearray(frames)
                if not self._in_memory:
                    stage.spill(self.data_dir / f"part.{part_number}")
            elif self._in_memory:
                stage.memory = bytearray(path.read_bytes())
            else:
                target = self.data_dir / f"part.{part_number}"
                os.link(path, target)
                stage.fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            self._parts[part_number] = stage
            self._staged += shard_bytes

    def _spill(self) -> None:
        self.data_dir.mkdir()
        for number, stage in self._parts.items():
            stage.spill(self.data_dir / f"part.{number}")
        self._in_memory = False

    def commit(self, meta: datanode_pb2.ShardMeta) -> datanode_pb2.ShardMeta:
        """Make the staged shard, described by meta, the object's version on this drive.

        meta names the bucket, key, parts (number and shard_bytes, matching what was written) and
        the rest of the object's metadata. The store sets format_version, block_bytes and
        inline_data, and fills an empty mtime_unix_ns (now) and data_id (a new uuid). Returns the
        stored meta. Raises InvalidArgument when meta does not match the staged bytes and
        PreconditionFailed when the data_id already exists for the key.
        """
        with self._lock:
            self._check_open()
            try:
                stored = self._seal(meta)
                self._store._install(self, stored)
            except Exception:
                self._state = "failed"
                raise
            self._state = "committed"
            for stage in self._parts.values():
                stage.close()
        self._store._release(self.write_id)
        shutil.rmtree(self.path, ignore_errors=True)
        return stored

    def _seal(self, meta: datanode_pb2.ShardMeta) -> datanode_pb2.ShardMeta:
        """Check meta against the staged parts and complete it; files are synced."""
        names.check_stored(meta.bucket, meta.key)
        stored = ShardMeta()
        stored.CopyFrom(meta)
        where = f"{meta.bucket}/{meta.key}"
        if stored.block_bytes not in (0, self.block_bytes):
            raise errors.InvalidArgument(f"{where}: block_bytes differs from the staged write")
        stored.block_bytes = self.block_bytes
        _stamp(stored, where)
        numbers = [p.number for p in stored.parts]
        if numbers != sorted(set(numbers)) or not set(self._parts) <= set(numbers):
            raise errors.InvalidArgument(f"{where}: parts must be unique, ascending and complete")
        for part in stored.parts:
            stage = self._parts.get(part.number)
            if (stage.staged if stage else 0) != part.shard_bytes:
                raise errors.InvalidArgument(f"{where}: part {part.number} shard_bytes mismatch")
            if stage:
                stage.finish(f"{where} part {part.number}")
        _name_version(stored, where)
        if is_inline(stored):
            stored.inline_data = b"".join(
                self._parts[p.number].frames(framing.framed_bytes(p.shard_bytes, self.block_bytes))
                for p in stored.parts
                if p.number in self._parts
            )
            return stored
        stored.inline_data = b""
        for stage in self._parts.values():
            stage.sync_and_close()
        _fsync_dir(self.data_dir)
        return stored

    def abort(self) -> None:
        """Drop the staged bytes (idempotent; a no-op after a successful commit)."""
        with self._lock:
            if self._state in ("committed", "aborted"):
                return
            self._state = "aborted"
            for stage in self._parts.values():
                stage.close()
        self._store._release(self.write_id)
        shutil.rmtree(self.path, ignore_errors=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise errors.PreconditionFailed(f"write {self.write_id} is {self._state}")


class ShardStore:
    """The shards of one drive (see the module docstring for the format).

    Opening it repairs the listing index after a crash (pending keys re-read; after an unclean
    shutdown of another boot, or without an index, a rebuild from the meta files). Call
    sweep_tmp at start to drop staged writes of a previous process, and close() at shutdown.
    """

    def __init__(self, drive: drives.LocalDrive) -> None:
        self.drive = drive
        self._objects = drive.path / OBJECTS_DIR
        self._tmp = drive.path / TMP_DIR
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        fresh = not (drive.path / INDEX_FILE).exists()
        self._index = index.ShardIndex(drive.path / INDEX_FILE)
        self._journal = journal.Journal(drive.path / JOURNAL_FILE)
        #: keys whose last change is in the journal (their removal is journaled too)
        self._journaled: set[tuple[str, str]] = set()
        self._checkpoint_lock = threading.Lock()
        self._closed = False
        self._replay()
        self._recover(fresh)

    def close(self) -> None:
        """Checkpoint the journal, mark the index clean and close both (idempotent)."""
        if not self._closed:
            self._closed = True
            self.checkpoint()
            self._journal.close()
            self._index.close(synced=True)
            _write_synced(self.drive.path / CLEAN_FILE, b"clean\n")
            _fsync_dir((self.drive.path / CLEAN_FILE).parent)

    def _recover(self, fresh: bool) -> None:
        marker = self.drive.path / CLEAN_FILE
        clean = marker.exists()
        state, boot = self._index.get_state(), _boot_id()
        if fresh or "boot_id" not in state or (not clean and state["boot_id"] != boot):
            count = self.rebuild_index()
            log.info("drive %s: index rebuilt, %d objects", self.drive.path, count)
        else:
            for bucket, key in self._index.pending():
                self._reindex(bucket, key)
        self._index.set_state(boot_id=boot)
        if clean:  # dirty from now on, durably, before the first change
            marker.unlink()
            _fsync_dir(marker.parent)

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

    # Writes.

    def begin_write(self, write_id: str, *, block_bytes: int = BLOCK_BYTES) -> StagedWrite:
        """Start staging a write under `.kvtier/tmp/<write_id>/`.

        Raises InvalidArgument for an unsafe write id or block size, AlreadyExists when the
        write id is in use.
        """
        if not _SAFE_ID.fullmatch(write_id):
            raise errors.InvalidArgument(f"write id {write_id!r}: 1-128 of [A-Za-z0-9_.-]")
        if not 0 < block_bytes <= MAX_BLOCK_BYTES:
            raise errors.InvalidArgument(f"block_bytes {block_bytes}: 1-{MAX_BLOCK_BYTES}")
        path = self._tmp / write_id
        with self._active_lock:
            if write_id in self._active:
                raise errors.AlreadyExists(f"write {write_id} is in progress")
            try:
                path.mkdir()
            except FileExistsError:
                raise errors.AlreadyExists(f"write {write_id} exists") from None
            self._active.add(write_id)
        return StagedWrite(self, write_id, path, block_bytes)

    def compose(
        self, write_id: str, meta: datanode_pb2.ShardMeta, sources: list[tuple[str, str, str]]
    ) -> datanode_pb2.ShardMeta:
        """Commit a version whose part i is part 1 of the object version sources[i]
        ((bucket, key, data_id)) on this drive, without copying shard bytes.

        Raises NotFound when a source version is not here, InvalidArgument when its layout does
        not match meta, Superseded when the drive holds a newer version of meta's key.
        """
        if len(sources) != len(meta.parts):
            raise errors.InvalidArgument(f"{len(sources)} sources for {len(meta.parts)} parts")
        with self.begin_write(write_id, block_bytes=meta.block_bytes or BLOCK_BYTES) as write:
            for part, (bucket, key, data_id) in zip(meta.parts, sources, strict=True):
                source = self.read_meta(bucket, key)
                where = f"{bucket}/{key}"
                if source.data_id != data_id:
                    raise errors.NotFound(f"{where}: version {data_id} is not on this drive")
                if (
                    len(source.parts) != 1
                    or source.parts[0].shard_bytes != part.shard_bytes
                    or source.block_bytes != write.block_bytes
                ):
                    raise errors.InvalidArgument(f"{where}: layout differs from part {part.number}")
                if is_inline(source):
                    write.adopt_part(part.number, part.shard_bytes, frames=source.inline_data)
                else:
                    name = f"part.{source.parts[0].number}"
                    path = self._object_dir(bucket, key) / data_id / name
                    try:
                        write.adopt_part(part.number, part.shard_bytes, path=path)
                    except FileNotFoundError:
                        raise errors.NotFound(f"{where}: version {data_id} is gone") from None
            write.only_if_newer = write.resendable = True
            return write.commit(meta)

    def _release(self, write_id: str) -> None:
        with self._active_lock:
            self._active.discard(write_id)

    def write_small(
        self, meta: datanode_pb2.ShardMeta, shard: framing.Buffer
    ) -> datanode_pb2.ShardMeta:
        """Commit a version of one part whose whole shard is `shard` (at most INLINE_MAX_BYTES)
        in one step, through the journal (module docstring); the stored meta once durable.

        Raises InvalidArgument as seal_small and commit do, Superseded when the drive holds a
        newer version, Unavailable when the journal's sync failed.
        """
        stored = seal_small(meta, shard)
        object_dir = self._object_dir(stored.bucket, stored.key)
        if stored.keep_versions:  # versioned buckets: synced in place, never journaled
            if (stored.bucket, stored.key) in self._journaled:
                self.checkpoint()
            with self._key_lock(object_dir):
                self._refuse_older(object_dir, stored)
                self._install_versioned(object_dir, stored, None)
            return stored
        raw = encode_meta(stored)
        with self._key_lock(object_dir):
            self._refuse_older(object_dir, stored)
            self._journal.commit(journal.encode(journal.Kind.INSTALL, raw))
            self._journaled.add((stored.bucket, stored.key))
            self._apply(object_dir, stored, raw)
        if self._journal.bytes > JOURNAL_CHECKPOINT_BYTES:
            try:
                self.checkpoint(JOURNAL_CHECKPOINT_BYTES)
            except OSError as exc:  # this write is durable already; a later one tries again
                log.warning("drive %s: journal checkpoint failed: %s", self.drive.path, exc)
        return stored

    def _apply(self, object_dir: Path, meta: datanode_pb2.ShardMeta, raw: bytes) -> None:
        """Replace the object's meta by raw (journaled: no sync here) and index it."""
        fresh = True  # a directory made now holds no data dirs to remove
        try:  # (os rather than pathlib on this path: it is most of the CPU of a small write)
            os.mkdir(object_dir)
        except FileExistsError:
            fresh = False
        except FileNotFoundError:
            os.makedirs(object_dir, exist_ok=True)
        staged = f"{self._tmp}/meta-{threading.get_ident()}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            framing.pwrite_all(fd, [raw], 0)
        finally:
            os.close(fd)
        os.replace(staged, f"{object_dir}/{META_FILE}")
        self._index.put(meta.bucket, _entry(meta))
        if not fresh:
            _remove_data_dirs(object_dir, None)

    def _remove_journaled(self, object_dir: Path, bucket: str, key: str) -> None:
        """Remove a key whose last change is journaled: the removal is journaled too (a replay
        must not bring back what was journaled before it)."""
        removed = ShardMeta(bucket=bucket, key=key)
        current = self._current_version(object_dir)
        if current is not None:
            removed.mtime_unix_ns, removed.data_id = current
        body = removed.SerializeToString()
        self._journal.commit(journal.encode(journal.Kind.REMOVE, body))
        os.unlink(object_dir / META_FILE)

    def checkpoint(self, over_bytes: int = 0) -> None:
        """When the journal holds more than over_bytes: sync the drive's filesystem (every
        journaled change is then in durable files) and empty the journal. Holds off every
        writer meanwhile."""
        with self._checkpoint_lock:
            if self._journal.bytes <= over_bytes:
                return
            with self._all_locks():
                journal.sync_filesystem(self.drive.path)
                self._journal.reset()
                self._journaled.clear()

    def _replay(self) -> None:
        """Apply the journal's records again (module docstring), sync, empty the journal; the
        index entries of every key in it are read again (a crash may have come between a meta
        file and its index entry)."""
        records = self._journal.read()
        touched: set[tuple[str, str]] = set()
        for kind, body in records:
            try:
                if kind is journal.Kind.INSTALL:
                    meta = decode_meta(body, "journal record")
                else:
                    meta = ShardMeta.FromString(body)
                object_dir = self._object_dir(meta.bucket, meta.key)
            except (errors.KVTierError, pb_message.DecodeError) as exc:
                log.warning("drive %s: journal record skipped: %s", self.drive.path, exc)
                continue
            touched.add((meta.bucket, meta.key))
            current = self._current_version(object_dir)
            version = (meta.mtime_unix_ns, meta.data_id)
            if kind is journal.Kind.INSTALL and (current is None or current < version):
                self._apply(object_dir, meta, body)
            elif kind is journal.Kind.REMOVE and current is not None and current <= version:
                os.unlink(object_dir / META_FILE)
                _remove_data_dirs(object_dir, None)
        for bucket, key in touched:
            self._reindex(bucket, key)
        if records:
            log.info("drive %s: %d journal records replayed", self.drive.path, len(records))
        if self._journal.bytes:
            journal.sync_filesystem(self.drive.path)
            self._journal.reset()

    def _install(self, write: StagedWrite, meta: datanode_pb2.ShardMeta) -> None:
        """Steps of a commit that touch the object's directory (module docstring)."""
        object_dir = self._object_dir(meta.bucket, meta.key)
        inline = is_inline(meta)
        if (meta.keep_versions or not write.only_if_newer) and (
            meta.bucket,
            meta.key,
        ) in self._journaled:
            self.checkpoint()  # a replay would put the journaled, newer version back
        with self._key_lock(object_dir):
            if meta.keep_versions and write.resendable:
                self._refuse_older(object_dir, meta)
            if meta.keep_versions:
                # Staged writes learnt the drives' stamps first (WRITE_SHARD's reply): one still
                # below the current version here was concurrent and is kept as a non-current one.
                self._install_versioned(object_dir, meta, None if inline else write.data_dir)
                return
            if write.only_if_newer:
                self._refuse_older(object_dir, meta)
            _makedirs_durable(object_dir)
            if not inline:
                target = object_dir / meta.data_id
                if target.is_dir():
                    _replace_files(write.data_dir, target)  # healing: the same version again
                else:
                    os.rename(write.data_dir, target)
                _fsync_dir(object_dir)
            self._index.mark_pending(meta.bucket, meta.key)
            staged_meta = write.path / META_FILE
            _write_synced(staged_meta, encode_meta(meta))
            os.replace(staged_meta, object_dir / META_FILE)
            _fsync_dir(object_dir)
            self._index.put(meta.bucket, _entry(meta))
            _remove_data_dirs(object_dir, None if inline else meta.data_id)

    def _refuse_older(self, object_dir: Path, meta: datanode_pb2.ShardMeta) -> None:
        """Superseded (with the current stamp) when the drive's current version is newer than
        meta. Small writes to versioned buckets too: the gateway stamps them without asking the
        drives first, so one stamped below the current version may come from a lagging gateway
        after the current one was acknowledged; the gateway restamps it above (and it becomes
        current) rather than it being kept as a non-current version."""
        current = self._current_version(object_dir)
        if current is not None and current > (meta.mtime_unix_ns, meta.data_id):
            raise Superseded(
                f"{meta.bucket}/{meta.key}: a newer version is here",
                current_mtime_unix_ns=current[0],
            )

    # S3 versions (services.datanode.versionstore: layout and crash rules).

    @staticmethod
    def _current_meta(object_dir: Path) -> datanode_pb2.ShardMeta | None:
        return versionstore.read_file(object_dir / META_FILE, decode_meta)

    def _install_versioned(
        self, object_dir: Path, meta: datanode_pb2.ShardMeta, data_dir: Path | None
    ) -> None:
        """Commit a version that keeps the key's earlier ones (caller holds the key's lock)."""
        current = self._current_meta(object_dir)
        _makedirs_durable(object_dir)
        if data_dir is not None:
            target = object_dir / meta.data_id
            if target.is_dir():
                _replace_files(data_dir, target)  # healing: the same version again
            else:
                os.rename(data_dir, target)
            _fsync_dir(object_dir)
        self._index.mark_pending(meta.bucket, meta.key)
        new_id = objversions.version_id(meta)
        if current is not None and objversions.order(current) > objversions.order(meta):
            # A concurrent write that lost: it is a non-current version (a null one only when
            # no newer null version is here).
            held = versionstore.find(object_dir, current, new_id, decode_meta)
            if held is None or objversions.order(held) <= objversions.order(meta):
                versionstore.write_version(
                    self._tmp, object_dir, encode_meta(meta), new_id, _write_synced
                )
        else:
            if current is not None and objversions.order(current) != objversions.order(meta):
                old_id = objversions.version_id(current)
                if old_id != new_id:  # a null version replaces the null version
                    versionstore.write_version(
                        self._tmp, object_dir, encode_meta(current), old_id, _write_synced
                    )
            staged = self._tmp / f"meta-{uuid.uuid4().hex}"
            _write_synced(staged, encode_meta(meta))
            os.replace(staged, object_dir / META_FILE)
            _fsync_dir(object_dir)
            if new_id == objversions.NULL:
                versionstore.drop_version(object_dir, objversions.NULL)
            current = meta
        self._reindex_versions(object_dir, meta.bucket, meta.key, current)

    def _reindex_versions(
        self, object_dir: Path, bucket: str, key: str, current: datanode_pb2.ShardMeta | None
    ) -> None:
        """Drop unreferenced data dirs and index a versioned key's current entry and versions."""
        others = versionstore.noncurrent(object_dir, current, decode_meta)
        versionstore.prune(object_dir, current, others, is_inline)
        entry, rows = versionstore.entries(current, others)
        self._index.put_key(bucket, key, entry, rows)

    def read_version(self, bucket: str, key: str, version: str) -> datanode_pb2.ShardMeta:
        """One S3 version of the key ("null" or a data_id), current or not; NotFound."""
        object_dir = self._object_dir(bucket, key)
        objversions.check(version)
        found = versionstore.find(object_dir, self._current_meta(object_dir), version, decode_meta)
        if found is None or found.bucket != bucket or found.key != key:
            raise errors.NotFound(f"{bucket}/{key}: no version {version} on this drive")
        return found

    def delete_version(self, bucket: str, key: str, version: str) -> bool:
        """Remove one S3 version of the key; the current one is replaced by the newest
        non-current one (one rename), or the key is gone when none is left. False: absent."""
        object_dir = self._object_dir(bucket, key)
        objversions.check(version)
        if (bucket, key) in self._journaled:
            self.checkpoint()  # a replay must not bring back a removed journaled version
        with self._key_lock(object_dir):
            current = self._current_meta(object_dir)
            if current is not None and objversions.version_id(current) == version:
                self._index.mark_pending(bucket, key)
                others = versionstore.noncurrent(object_dir, current, decode_meta)
                if others:
                    newest = objversions.version_id(others[0])
                    os.replace(versionstore.path_of(object_dir, newest), object_dir / META_FILE)
                    _fsync_dir(object_dir / versionstore.VERSIONS_DIR)
                    current = others[0]
                else:
                    os.unlink(object_dir / META_FILE)
                    current = None
                _fsync_dir(object_dir)
            elif versionstore.drop_version(object_dir, version):
                self._index.mark_pending(bucket, key)
            else:
                return False
            self._reindex_versions(object_dir, bucket, key, current)
            if current is None:
                with contextlib.suppress(OSError):
                    (object_dir / versionstore.VERSIONS_DIR).rmdir()
                    object_dir.rmdir()
        return True

    def list_versions(
        self, bucket: str, prefix: str, after_key: str, after_version: str, limit: int
    ) -> list[index.VersionEntry]:
        """Up to limit versions (ShardIndex.list_versions) after the version after_version
        of after_key (empty, or not indexed here: after the whole key)."""
        names.check_stored_bucket(bucket)
        if limit < 1:
            raise errors.InvalidArgument(f"limit {limit}: must be positive")
        after = None
        if after_version:
            after = self._index.version_of(bucket, after_key, objversions.check(after_version))
        return self._index.list_versions(bucket, prefix, after_key, after, limit)

    def current_stamp(self, bucket: str, key: str) -> int:
        """The stamp (mtime) of the object's current version here; 0 when there is none."""
        current = self._current_version(self._object_dir(bucket, key))
        return current[0] if current is not None else 0

    @staticmethod
    def _current_version(object_dir: Path) -> tuple[int, str] | None:
        """(mtime, data_id) of the object's meta here, or None when absent or unreadable."""
        try:
            with open(f"{object_dir}/{META_FILE}", "rb") as file:
                meta = decode_meta(file.read(), str(object_dir))
        except (FileNotFoundError, errors.Corrupt):
            return None
        return meta.mtime_unix_ns, meta.data_id

    def delete(self, bucket: str, key: str, version: str = "") -> bool:
        """Remove the object from this drive (meta first, then data), every S3 version of it
        included; False when it was absent. version: remove that version only (delete_version)."""
        if version:
            return self.delete_version(bucket, key, version)
        object_dir = self._object_dir(bucket, key)
        with self._key_lock(object_dir):
            versions_dir = object_dir / versionstore.VERSIONS_DIR
            if versions_dir.is_dir():  # a versioned key: its versions go first
                shutil.rmtree(versions_dir)
                self._index.remove(bucket, key, versions=True)
            if not (object_dir / META_FILE).exists():
                self._index.remove(bucket, key)
                _remove_data_dirs(object_dir, None)  # leftovers of a crash
                with contextlib.suppress(OSError):
                    object_dir.rmdir()
                return False
            if (bucket, key) in self._journaled:
                self._remove_journaled(object_dir, bucket, key)
            else:
                self._index.mark_pending(bucket, key)
                os.unlink(object_dir / META_FILE)
                _fsync_dir(object_dir)
            self._index.remove(bucket, key)
            _remove_data_dirs(object_dir, None)
            with contextlib.suppress(OSError):
                object_dir.rmdir()
        return True

    def rewrite_meta(
        self, bucket: str, key: str, change: Callable[[ShardMeta], ShardMeta]
    ) -> ShardMeta:
        """Replace the object's meta by change(current meta), under the key's lock, atomically
        and durably as a commit writes it (staged, fsync, rename, fsync); the listing index is
        not touched, so change must keep the listed fields. NotFound when absent; what change
        raises. Returns the stored meta (services.datanode.metaupdate)."""
        object_dir = self._object_dir(bucket, key)
        with self._key_lock(object_dir):
            meta = change(self.read_meta(bucket, key))
            staged = self._tmp / f"meta-{uuid.uuid4().hex}"
            _write_synced(staged, encode_meta(meta))
            os.replace(staged, object_dir / META_FILE)
            _fsync_dir(object_dir)
        return meta

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

    # Reads.

    def read_meta(self, bucket: str, key: str, version: str = "") -> datanode_pb2.ShardMeta:
        """The object's meta on this drive (version: that S3 version's, current or not);
        NotFound when absent, Corrupt when unreadable."""
        if version:
            return self.read_version(bucket, key, version)
        path = self._object_dir(bucket, key) / META_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise errors.NotFound(f"{bucket}/{key}: not on this drive") from None
        meta = decode_meta(raw, f"{bucket}/{key}")
        if meta.bucket != bucket or meta.key != key:
            raise errors.Corrupt(f"{bucket}/{key}: meta names {meta.bucket}/{meta.key}")
        return meta

    def read_shard(
        self,
        bucket: str,
        key: str,
        part: int,
        block_offset: int,
        block_count: int,
        into: bytearray | memoryview,
        *,
        data_id: str = "",
    ) -> int:
        """Read blocks [block_offset, block_offset + block_count) of a part's shard into `into`.

        The count is cut at the shard's end; returns the bytes read. Every block's checksum is
        checked: Corrupt names the first bad block. A data_id that is not the current version's
        raises PreconditionFailed (also when the version changes during the read).
        """
        meta = self.read_meta(bucket, key)
        if data_id and meta.data_id != data_id:
            older = versionstore.find_data(self._object_dir(bucket, key), data_id, decode_meta)
            if older is None:
                raise errors.PreconditionFailed(f"{bucket}/{key}: version {data_id} is gone")
            meta = older
        shard_bytes, _ = _locate_part(meta, part)
        size = meta.block_bytes
        blocks = -(-shard_bytes // size)
        if not 0 <= block_offset <= blocks or block_count < 0:
            raise errors.InvalidArgument(f"block offset {block_offset}: the part has {blocks}")
        end = min(blocks, block_offset + block_count)
        length = max(0, min(end * size, shard_bytes) - block_offset * size)
        dest = memoryview(into).cast("B")
        if dest.readonly or len(dest) < length:
            raise errors.InvalidArgument(f"buffer: needs {length} writable bytes")
        where = f"{bucket}/{key} part {part}"
        try:
            bad = self._read_blocks(meta, part, block_offset, end, dest[:length])
        except FileNotFoundError:
            if self._version_gone(bucket, key, meta.data_id):
                raise errors.PreconditionFailed(f"{where}: replaced during the read") from None
            raise errors.Corrupt(f"{where}: shard file missing") from None
        if bad:
            raise errors.Corrupt(f"{where} block {bad[0]}: checksum mismatch or short")
        return length

    def _version_gone(self, bucket: str, key: str, data_id: str) -> bool:
        """Whether the version data_id is neither the current one nor a kept one any more."""
        try:
            if self.read_meta(bucket, key).data_id == data_id:
                return False
        except errors.NotFound:
            return True
        found = versionstore.find_data(self._object_dir(bucket, key), data_id, decode_meta)
        return found is None

    def verify(self, bucket: str, key: str) -> list[BadBlock]:
        """Every (part, block) of the object's shard here that is missing or fails its checksum.

        Raises NotFound when the object is absent and Corrupt when its meta is unreadable.
        """
        meta = self.read_meta(bucket, key)
        size = meta.block_bytes
        largest = max((p.shard_bytes for p in meta.parts), default=0)
        scratch = memoryview(bytearray(min(_VERIFY_BLOCKS * size, largest)))
        bad: list[BadBlock] = []
        for part in meta.parts:
            blocks = -(-part.shard_bytes // size)
            for first in range(0, blocks, _VERIFY_BLOCKS):
                end = min(blocks, first + _VERIFY_BLOCKS)
                try:
                    failed = self._read_blocks(meta, part.number, first, end, scratch)
                except FileNotFoundError:
                    failed = list(range(first, end))
                bad.extend((part.number, block) for block in failed)
        return bad

    def _read_blocks(
        self, meta: datanode_pb2.ShardMeta, part: int, first: int, end: int, dest: memoryview
    ) -> list[int]:
        """Read blocks [first, end) of a part into dest; returns the bad ones."""
        shard_bytes, inline_at = _locate_part(meta, part)
        if first >= end:
            return []  # an empty part has no file
        span = framing.BlockSpan(shard_bytes, meta.block_bytes, first, end, dest)
        if is_inline(meta):
            return span.from_frames(memoryview(meta.inline_data)[inline_at:])
        object_dir = self._object_dir(meta.bucket, meta.key)
        return span.from_file(object_dir / meta.data_id / f"part.{part}")

    # Listing.

    def list(
        self, bucket: str, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ListEntry]:
        """Up to limit objects of bucket on this drive, sorted by the bytes of their keys.

        Only keys starting with prefix and sorting after start_after; read from the index only.
        """
        names.check_stored_bucket(bucket)
        if limit < 1:
            raise errors.InvalidArgument(f"limit {limit}: must be positive")
        return self._index.list(bucket, prefix, start_after, limit)

    def rebuild_index(self) -> int:
        """Rebuild the listing index from the meta files (blocks writers meanwhile).

        Also removes data dirs no meta refers to. Returns the number of objects indexed.
        """
        rows: list[tuple[str, ListEntry]] = []
        kept: list[tuple[str, index.VersionEntry]] = []
        with self._all_locks():
            for bucket_dir in sorted(self._objects.iterdir()):
                for object_dir in sorted(bucket_dir.glob("*/*")):
                    meta = self._scan_object(bucket_dir.name, object_dir)
                    if (object_dir / versionstore.VERSIONS_DIR).is_dir():
                        others = versionstore.noncurrent(object_dir, meta, decode_meta)
                        versionstore.prune(object_dir, meta, others, is_inline)
                        entry, versions = versionstore.entries(meta, others)
                        kept.extend((bucket_dir.name, v) for v in versions)
                        if entry is not None:
                            rows.append((bucket_dir.name, entry))
                    elif meta is not None:
                        if meta.keep_versions:
                            _, versions = versionstore.entries(meta, [])
                            kept.extend((bucket_dir.name, v) for v in versions)
                        rows.append((bucket_dir.name, _entry(meta)))
            self._index.replace_all(rows, kept)
        return len(rows)

    def _scan_object(self, bucket: str, object_dir: Path) -> datanode_pb2.ShardMeta | None:
        if not object_dir.is_dir():
            return None
        try:
            meta = decode_meta((object_dir / META_FILE).read_bytes(), str(object_dir))
            digest = hashlib.sha256(meta.key.encode()).hexdigest()
            if (meta.bucket, digest) != (bucket, object_dir.name):
                raise errors.Corrupt(f"{object_dir}: meta names {meta.bucket}/{meta.key}")
        except FileNotFoundError:
            _remove_data_dirs(object_dir, None)  # a crash after the data rename
            with contextlib.suppress(OSError):
                object_dir.rmdir()
            return None
        except errors.Corrupt as exc:
            log.warning("drive %s: not indexed: %s", self.drive.path, exc)
            return None
        _remove_data_dirs(object_dir, None if is_inline(meta) else meta.data_id)
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
                self._index.put(bucket, _entry(self.read_meta(bucket, key)))
            except (errors.NotFound, errors.Corrupt):
                self._index.remove(bucket, key)


def _locate_part(meta: datanode_pb2.ShardMeta, number: int) -> tuple[int, int]:
    """(shard bytes of the part, where its frames start in inline_data)."""
    at = 0
    for part in meta.parts:
        if part.number == number:
            return part.shard_bytes, at
        at += framing.framed_bytes(part.shard_bytes, meta.block_bytes)
    raise errors.InvalidArgument(f"{meta.bucket}/{meta.key}: no part {number}")
