"""The shard store of one drive: block-checksummed shards and their metadata, committed atomically.

Layout under the drive (ARCHITECTURE.md, "The durable object tier"), h = hex SHA-256 of the key:

    objects/<bucket>/<h[:2]>/<h>/meta              ShardMeta bytes + their xxh3-64 (8 bytes LE;
                                                   services.datanode.shardmeta)
    objects/<bucket>/<h[:2]>/<h>/<data_id>/part.N  the part's shard: blocks of <= block_bytes,
                                                   each followed by its xxh3-64 (8 bytes LE;
                                                   services.datanode.framing)
    objects/<bucket>/<h[:2]>/<h>/versions/         a versioned key's non-current versions
                                                   (services.datanode.versionstore)
    objects/<bucket>/<h[:2]>/<h>/meta.new          a small write's meta before its rename (a
                                                   crash's leftover: reused by the next one)
    objects/<bucket>/<h[:2]>/<h>/meta.prev[.N]     an unversioned key's superseded versions
                                                   (those the last overwrites replaced), kept
                                                   for an undo (services.datanode.supersede)
    .kvtier/tmp/<write_id>/                        a staged write (data/part.N, meta;
                                                   services.datanode.stagedwrite)
    .kvtier/index-2.sqlite                         the listing index (services.datanode.index;
                                                   `index.sqlite` is v0.1.0's)
    .kvtier/journal                                small commits and their removals, not yet
                                                   synced in the files (services.datanode.journal)

A shard of at most INLINE_MAX_BYTES in total (all parts), or a small write's of at most
SMALL_WRITE_MAX_BYTES, has no data directory: its framed blocks live in `meta.inline_data`, in
part order (shardmeta.is_inline).

Commit order (a crash at any point leaves the old version or the new one readable, whole):
fsync part files and the staged data dir → rename it to `<h>/<data_id>` → fsync `<h>` → mark the
key pending in the index → write `meta` in staging, fsync → hard-link `<h>/meta` as
`<h>/meta.prev` (an overwrite of an unversioned key) → rename over `<h>/meta` → fsync `<h>` →
index entry → remove every other data dir under `<h>` (crash leftovers, the version before the
superseded one; the superseded one's stays until it is reclaimed).
A commit of a data_id whose data dir exists (healing rewrites a drive's shard of the version it
holds) renames the staged part files over the existing ones instead, one by one.
A small write (`ShardStore.write_small`: one part, the whole shard of at most SMALL_WRITE_MAX_BYTES
in one call) takes another path: its meta (the shard inline) is appended to the drive's journal and
synced there, one fdatasync for every commit that arrived meanwhile (group commit), then written
as `<h>/meta.new` and renamed over `<h>/meta` without a sync of its own (`write_smalls`: several
objects' small writes with one append and sync; their index entries are written later, in
batches: services.datanode.index); a removal of a key whose last change
is journaled is journaled too. Opening the store replays the journal (each record installed only
over an older version, removed only over one as old or older) before anything is read; a
checkpoint (syncfs, then an empty journal) runs when the journal grows past
JOURNAL_CHECKPOINT_BYTES and at close.
Operations on one key are serialized by a striped lock; everything here blocks (run it in the
datanode's bounded executor).

This module is the store's entry point: import ShardStore and the names below from here. The
code lives in these modules; ShardStore is built in layers, each class on the one listed before
it (ShardStoreBase → VersionedShards → ShardReads → ShardRecovery → ShardStore):
    shardmeta      the meta file's format (encode, decode), stamps, version names, small writes'
                   sealed metas
    shardfiles     the durable file steps (fsync, write then rename, data dir removal)
    stagedwrite    StagedWrite: a write staged under `.kvtier/tmp` until its commit
    shardbase      ShardStoreBase: paths, per-key locks, the index, the journal's checkpoint
    shardversions  S3 versions of a key (layout and crash rules: versionstore)
    shardreads     reads of metas and blocks, verification, listings
    shardrecovery  the index's repair at open, rebuilds, the sweep of staged writes
    shards         ShardStore: opening and closing, commits, small writes and the journal
                   (its replay), removals, rewrites of a meta
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf import message as pb_message

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import (
    drives,
    framing,
    journal,
    shardbase,
    shardfiles,
    shardmeta,
    shardreads,
    shardrecovery,
    stagedwrite,
    supersede,
    versionstore,
)

log = logging.getLogger(__name__)

# What other modules use of the store, from the modules that define it.
FORMAT_VERSION = shardmeta.FORMAT_VERSION
BLOCK_BYTES = shardmeta.BLOCK_BYTES
MAX_BLOCK_BYTES = shardmeta.MAX_BLOCK_BYTES
INLINE_MAX_BYTES = shardmeta.INLINE_MAX_BYTES
SMALL_WRITE_MAX_BYTES = shardmeta.SMALL_WRITE_MAX_BYTES
MAX_PART_NUMBER = shardmeta.MAX_PART_NUMBER
MAX_FUTURE_MTIME_NS = shardmeta.MAX_FUTURE_MTIME_NS
META_FILE = shardmeta.META_FILE
OBJECTS_DIR = shardbase.OBJECTS_DIR
TMP_DIR = shardbase.TMP_DIR
INDEX_FILE = shardbase.INDEX_FILE
JOURNAL_FILE = shardbase.JOURNAL_FILE
CLEAN_FILE = shardbase.CLEAN_FILE
ShardMeta = shardmeta.ShardMeta
ListEntry = shardreads.ListEntry
BadBlock = shardreads.BadBlock
StagedWrite = stagedwrite.StagedWrite
is_inline = shardmeta.is_inline
encode_meta = shardmeta.encode_meta
decode_meta = shardmeta.decode_meta
seal_small = shardmeta.seal_small

JOURNAL_CHECKPOINT_BYTES = 64 << 20

#: A small write of write_smalls: (its place in the results, its key's directory, the meta to
#: store, its condition).
_Small = tuple[int, Path, datanode_pb2.ShardMeta, shardmeta.Condition | None]


class Superseded(errors.PreconditionFailed):
    """A commit with only_if_newer found a newer version on the drive, stamped
    `current_mtime_unix_ns` (the writer may stamp its version above it and commit again)."""

    def __init__(self, message: str = "", *, current_mtime_unix_ns: int = 0) -> None:
        super().__init__(message)
        self.current_mtime_unix_ns = current_mtime_unix_ns


class ShardStore(shardrecovery.ShardRecovery):
    """The shards of one drive (see the module docstring for the format).

    Opening it repairs the listing index after a crash (pending keys re-read; after an unclean
    shutdown of another boot, or without an index, a rebuild from the meta files). Call
    sweep_tmp at start to drop staged writes of a previous process, and close() at shutdown.
    """

    def __init__(self, drive: drives.LocalDrive) -> None:
        fresh = not (drive.path / INDEX_FILE).exists()
        super().__init__(drive)
        self._superseded = supersede.Registry(drive.path, self._objects)
        self._replay()
        self._recover(fresh)

    def close(self) -> None:
        """Checkpoint the journal, mark the index clean and close both (idempotent)."""
        if not self._closed:
            self._closed = True
            self.checkpoint()
            self._journal.close()
            self._index.close(synced=True)
            shardfiles.write_synced(self.drive.path / CLEAN_FILE, b"clean\n")
            shardfiles.fsync_dir((self.drive.path / CLEAN_FILE).parent)

    # Writes.

    def begin_write(self, write_id: str, *, block_bytes: int = BLOCK_BYTES) -> StagedWrite:
        """Start staging a write under `.kvtier/tmp/<write_id>/`.

        Raises InvalidArgument for an unsafe write id or block size, AlreadyExists when the
        write id is in use.
        """
        if not shardmeta.SAFE_ID.fullmatch(write_id):
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

    def write_small(
        self, meta: datanode_pb2.ShardMeta, shard: framing.Buffer
    ) -> datanode_pb2.ShardMeta:
        """Commit a version of one part whose whole shard is `shard` (at most SMALL_WRITE_MAX_BYTES)
        in one step, through the journal (module docstring); the stored meta once durable.

        Raises InvalidArgument as seal_small and commit do, Superseded when the drive holds a
        newer version, Unavailable when the journal's sync failed.
        """
        stored = seal_small(meta, shard)
        condition = shardmeta.take_condition(stored)
        object_dir = self._object_dir(stored.bucket, stored.key)
        if stored.keep_versions:  # versioned buckets: synced in place, never journaled
            if (stored.bucket, stored.key) in self._journaled:
                self.checkpoint()
            with self._key_lock(object_dir):
                self._check_condition(object_dir, condition, stored)
                self._refuse_older(object_dir, stored)
                self._install_versioned(object_dir, stored, None)
            return stored
        raw = encode_meta(stored)
        with self._key_lock(object_dir):
            self._check_condition(object_dir, condition, stored)
            current = self._refuse_older(object_dir, stored)
            self._journal.commit(journal.encode(journal.Kind.INSTALL, raw))
            self._journaled.add((stored.bucket, stored.key))
            self._superseded.keep(object_dir, current, stored.data_id)
            self._apply(object_dir, raw)
            self._index.put(stored.bucket, shardmeta.list_entry(stored))
        if self._journal.bytes > JOURNAL_CHECKPOINT_BYTES:
            try:
                self.checkpoint(JOURNAL_CHECKPOINT_BYTES)
            except OSError as exc:  # this write is durable already; a later one tries again
                log.warning("drive %s: journal checkpoint failed: %s", self.drive.path, exc)
        return stored

    def write_smalls(
        self, items: Sequence[tuple[datanode_pb2.ShardMeta, framing.Buffer]]
    ) -> list[datanode_pb2.ShardMeta | Exception]:
        """write_small of several shards (of several objects; two versions of a key go in
        their order) whose journal records share one append and sync; per item, in order, its
        stored meta once durable or its own error (what write_small raises, or an OSError of
        its drive): one item's refusal leaves the others as they go. A failed journal sync
        fails every item it carried."""
        out: list[datanode_pb2.ShardMeta | Exception] = []
        plain: list[_Small] = []
        for meta, shard in items:
            try:
                if meta.keep_versions:  # synced in place, never journaled: one at a time
                    out.append(self.write_small(meta, shard))
                    continue
                stored = seal_small(meta, shard)
                condition = shardmeta.take_condition(stored)
                object_dir = self._object_dir(stored.bucket, stored.key)
                plain.append((len(out), object_dir, stored, condition))
                out.append(stored)
            except (errors.KVTierError, OSError) as exc:
                out.append(exc)
        if plain:
            self._journal_smalls(plain, out)
            self._checkpoint_if_big()
        return out

    def _journal_smalls(
        self, plain: Sequence[_Small], out: list[datanode_pb2.ShardMeta | Exception]
    ) -> None:
        """The journaled part of write_smalls: every key's lock held (in stripe order, as
        _all_locks takes them) from the check of its current version to the apply."""
        locks = sorted({self._key_lock(d) for _, d, _, _ in plain}, key=self._locks.index)
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            newest: dict[Path, tuple[int, str]] = {}  # what this batch installs before
            batched: dict[Path, datanode_pb2.ShardMeta] = {}  # (its meta)
            made: set[Path] = set()  # key directories made here, empty until their apply
            accepted, records = [], []
            for at, object_dir, stored, condition in plain:
                try:
                    before = newest.get(object_dir)
                    if condition is not None:  # against what this batch installs before
                        held = batched.get(object_dir)
                        if held is None:
                            held = self._current_meta(object_dir)
                        shardmeta.check_condition(condition, held, stored)
                    if before is None and shardfiles.make_dir(object_dir):  # new: no meta to read
                        made.add(object_dir)
                        current = None
                    else:
                        current = self._refuse_older_than(object_dir, stored, before)
                    raw = encode_meta(stored)
                except (errors.KVTierError, OSError) as exc:
                    out[at] = exc
                    continue
                newest[object_dir] = (stored.mtime_unix_ns, stored.data_id)
                batched[object_dir] = stored
                accepted.append((at, object_dir, stored, raw, current))
                records.append(journal.encode(journal.Kind.INSTALL, raw))
            if not records:
                return
            try:
                self._journal.commit_many(records)
            except errors.KVTierError as exc:
                for at, *_ in accepted:
                    out[at] = exc
                return
            applied = []
            for at, object_dir, stored, raw, current in accepted:
                self._journaled.add((stored.bucket, stored.key))
                try:
                    self._superseded.keep(object_dir, current, stored.data_id)
                    fresh = object_dir in made
                    made.discard(object_dir)  # (a key's later version in the batch: not made)
                    self._apply(object_dir, raw, made=fresh)
                except OSError as exc:  # journaled: a replay installs it; the writer hears
                    out[at] = exc
                else:
                    applied.append(stored)
            # Indexed later, with other batches' entries (journaled: a replay indexes them).
            self._index.put_later([(m.bucket, shardmeta.list_entry(m)) for m in applied])

    def _refuse_older_than(
        self,
        object_dir: Path,
        meta: datanode_pb2.ShardMeta,
        before: tuple[int, str] | None,
    ) -> tuple[int, str] | None:
        """_refuse_older, against `before` (the version an earlier item of the same batch
        installs, already checked against the drive's) when there is one; returns the version
        meta replaces."""
        if before is None:
            return self._refuse_older(object_dir, meta)
        if before > (meta.mtime_unix_ns, meta.data_id):
            raise Superseded(
                f"{meta.bucket}/{meta.key}: a newer version is here",
                current_mtime_unix_ns=before[0],
            )
        return before

    def _checkpoint_if_big(self) -> None:
        if self._journal.bytes > JOURNAL_CHECKPOINT_BYTES:
            try:
                self.checkpoint(JOURNAL_CHECKPOINT_BYTES)
            except OSError as exc:  # the writes are durable already; a later one tries again
                log.warning("drive %s: journal checkpoint failed: %s", self.drive.path, exc)

    def _apply(self, object_dir: Path, raw: bytes, *, made: bool = False) -> None:
        """Replace the object's meta by raw (journaled: no sync here; the caller indexes it).
        made: the caller has just made object_dir (shardfiles.make_dir)."""
        # (os rather than pathlib on this path: it is most of the CPU of a small write)
        fresh = made or shardfiles.make_dir(object_dir)  # a directory made now has no data dirs
        # Staged in the key's own directory (the key's lock is held): its inode is allocated
        # near the directory and the rename stays within it, half the CPU of staging it under
        # .kvtier/tmp (~60 of ~120 µs, ext4). A crash's leftover is reused by the next write.
        staged = f"{object_dir}/{shardmeta.STAGED_META_FILE}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            framing.pwrite_all(fd, [raw], 0)
        finally:
            os.close(fd)
        os.replace(staged, f"{object_dir}/{META_FILE}")
        if not fresh:
            shardfiles.remove_data_dirs(object_dir, None)

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
                self._superseded.keep(object_dir, current, meta.data_id)
                self._apply(object_dir, body)
                self._index.put(meta.bucket, shardmeta.list_entry(meta))
            elif kind is journal.Kind.REMOVE and current is not None and current <= version:
                os.unlink(object_dir / META_FILE)
                shardfiles.remove_data_dirs(object_dir, None)
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
        condition = shardmeta.take_condition(meta)
        with self._key_lock(object_dir):
            self._check_condition(object_dir, condition, meta)
            if write.noncurrent:
                self._refuse_as_current(object_dir, meta)
            if meta.keep_versions and write.resendable:
                self._refuse_older(object_dir, meta)
            if meta.keep_versions:
                # Staged writes learnt the drives' stamps first (WRITE_SHARD's reply): one still
                # below the current version here was concurrent and is kept as a non-current one.
                self._install_versioned(object_dir, meta, None if inline else write.data_dir)
                return
            if write.only_if_newer:
                current = self._refuse_older(object_dir, meta)
            else:
                current = self._current_version(object_dir)
            shardfiles.makedirs_durable(object_dir)
            if not inline:
                target = object_dir / meta.data_id
                if target.is_dir():
                    shardfiles.replace_files(
                        write.data_dir, target
                    )  # healing: the same version again
                else:
                    os.rename(write.data_dir, target)
                shardfiles.fsync_dir(object_dir)
            self._index.mark_pending(meta.bucket, meta.key)
            staged_meta = write.path / META_FILE
            shardfiles.write_synced(staged_meta, encode_meta(meta))
            self._superseded.keep(object_dir, current, meta.data_id)
            os.replace(staged_meta, object_dir / META_FILE)
            shardfiles.fsync_dir(object_dir)
            self._index.put(meta.bucket, shardmeta.list_entry(meta))
            shardfiles.remove_data_dirs(object_dir, None if inline else meta.data_id)

    def _check_condition(
        self,
        object_dir: Path,
        condition: shardmeta.Condition | None,
        meta: datanode_pb2.ShardMeta,
    ) -> None:
        """A conditional write's check (shardmeta.check_condition) against the key's current
        version here; the caller holds the key's lock."""
        if condition is not None:
            shardmeta.check_condition(condition, self._current_meta(object_dir), meta)

    def _refuse_older(
        self, object_dir: Path, meta: datanode_pb2.ShardMeta
    ) -> tuple[int, str] | None:
        """Superseded (with the current stamp) when the drive's current version is newer than
        meta; else that version (None: none). Small writes to versioned buckets too: the
        gateway stamps them without asking the drives first, so one stamped below the current
        version may come from a lagging gateway after the current one was acknowledged; the
        gateway restamps it above (and it becomes current) rather than it being kept as a
        non-current version."""
        current = self._current_version(object_dir)
        if current is not None and current > (meta.mtime_unix_ns, meta.data_id):
            raise Superseded(
                f"{meta.bucket}/{meta.key}: a newer version is here",
                current_mtime_unix_ns=current[0],
            )
        return current

    # Removals.

    def delete(
        self,
        bucket: str,
        key: str,
        version: str = "",
        if_data_id: str = "",
        *,
        restore_previous: bool = False,
    ) -> bool:
        """Remove the object from this drive (meta first, then data), every S3 version of it
        included; False when it was absent. version: remove that version only (delete_version).
        if_data_id: only when the current version is that one (with version: when that version
        is), else False and nothing removed. restore_previous (with if_data_id, no version: a
        failed commit's undo): the newest superseded version, when the drive still keeps it
        (services.datanode.supersede), becomes current again instead; and when if_data_id is
        not current but kept as superseded, that kept version alone is removed (still False:
        the key's current version is untouched)."""
        if version:
            return self.delete_version(bucket, key, version, if_data_id)
        object_dir = self._object_dir(bucket, key)
        if restore_previous and (bucket, key) in self._journaled:
            self.checkpoint()  # a replay must not install the undone version again
        with self._key_lock(object_dir):
            if if_data_id and (self._current_version(object_dir) or (0, ""))[1] != if_data_id:
                if restore_previous:  # an undo of a write a newer one replaced here
                    self._superseded.forget(object_dir, if_data_id)  # its kept copy alone goes
                return False
            if restore_previous and if_data_id and self._restore_previous(object_dir):
                return True
            supersede.remove_prev(object_dir)
            self._superseded.drop(object_dir)
            versions_dir = object_dir / versionstore.VERSIONS_DIR
            if versions_dir.is_dir():  # a versioned key: its versions go first
                shutil.rmtree(versions_dir)
                self._index.remove(bucket, key, versions=True)
            if not (object_dir / META_FILE).exists():
                self._index.remove(bucket, key)
                shardfiles.remove_data_dirs(object_dir, None)  # leftovers of a crash
                with contextlib.suppress(OSError):
                    object_dir.rmdir()
                return False
            if (bucket, key) in self._journaled:
                self._remove_journaled(object_dir, bucket, key)
            else:
                self._index.mark_pending(bucket, key)
                os.unlink(object_dir / META_FILE)
                shardfiles.fsync_dir(object_dir)
            self._index.remove(bucket, key)
            shardfiles.remove_data_dirs(object_dir, None)
            with contextlib.suppress(OSError):
                object_dir.rmdir()
        return True

    def _restore_previous(self, object_dir: Path) -> bool:
        """Make the key's newest superseded version current again (its meta renamed over
        `meta`, then the data dirs of the undone version removed); False when there is none to
        restore: none kept, already reclaimed, its data gone (an older datanode overwrote the
        key), or the key journaled again since the caller's checkpoint (rare: it is then
        removed)."""
        name, prev = self._superseded.newest(object_dir) or ("", None)
        current = self._current_version(object_dir)
        if prev is None or current is None or prev.data_id == current[1]:
            return False
        inline = is_inline(prev)
        if (prev.bucket, prev.key) in self._journaled or (
            not inline and not (object_dir / prev.data_id).is_dir()
        ):
            return False
        self._index.mark_pending(prev.bucket, prev.key)
        os.replace(object_dir / name, object_dir / META_FILE)
        shardfiles.fsync_dir(object_dir)
        self._index.put(prev.bucket, shardmeta.list_entry(prev))
        shardfiles.remove_data_dirs(object_dir, None if inline else prev.data_id)
        self._superseded.restored(object_dir)
        log.info(
            "drive %s: %s/%s: version %s undone, version %s current again",
            self.drive.path, prev.bucket, prev.key, current[1], prev.data_id,
        )  # fmt: skip
        return True

    def reclaim_superseded(self, older_than_s: float = supersede.KEEP_S) -> int:
        """Remove the superseded versions kept longer than older_than_s (by this process's
        monotonic clock; services.datanode.supersede); returns how many keys were visited."""
        reclaimed = 0
        for object_dir in self._superseded.expired(older_than_s):
            with self._key_lock(object_dir):
                left = self._superseded.reclaim(object_dir, older_than_s)
                if left is None:
                    continue  # overwritten or undone meanwhile: kept from then on
                current = self._current_meta(object_dir)
                if current is not None:
                    shardfiles.remove_data_dirs(
                        object_dir, None if is_inline(current) else current.data_id
                    )
                elif not (object_dir / META_FILE).exists():  # (an unreadable one: data stays)
                    shardfiles.remove_data_dirs(object_dir, None)
                    with contextlib.suppress(OSError):
                        object_dir.rmdir()
                if not left:
                    self._superseded.drop(object_dir)
                reclaimed += 1
        if reclaimed:
            log.info("drive %s: %d superseded versions reclaimed", self.drive.path, reclaimed)
        return reclaimed

    def rewrite_meta(
        self, bucket: str, key: str, change: Callable[[ShardMeta], ShardMeta], data_id: str = ""
    ) -> ShardMeta:
        """Replace the object's meta by change(current meta), under the key's lock, atomically
        and durably as a commit writes it (staged, fsync, rename, fsync); the listing index is
        not touched, so change must keep the listed fields (or the caller marks the key
        pending and indexes it again: `metaupdate`). data_id: when the current version
        is another one, a kept (non-current) version with that data_id is changed instead
        (`versionstore.write_version`); none: change(current meta) decides. NotFound when
        absent; what change raises. Returns the stored meta (services.datanode.metaupdate)."""
        object_dir = self._object_dir(bucket, key)
        with self._key_lock(object_dir):
            current = self.read_meta(bucket, key)
            if data_id and current.data_id != data_id:
                kept = versionstore.find_data(object_dir, data_id, decode_meta)
                if kept is not None:
                    meta = change(kept)
                    version = objversions.version_id(meta)
                    raw = encode_meta(meta)
                    versionstore.write_version(
                        self._tmp, object_dir, raw, version, shardfiles.write_synced
                    )
                    return meta
            meta = change(current)
            staged = self._tmp / f"meta-{uuid.uuid4().hex}"
            shardfiles.write_synced(staged, encode_meta(meta))
            os.replace(staged, object_dir / META_FILE)
            shardfiles.fsync_dir(object_dir)
        return meta
