"""StagedWrite: one object version written to a drive under `.kvtier/tmp/<write_id>/`, invisible
until its commit (services.datanode.shards: `ShardStore.begin_write`, the commit order).

The staged shard is framed into checksummed blocks (services.datanode.framing) as it arrives: in
memory while the whole shard could still be inline (shardmeta.INLINE_MAX_BYTES), in part files
under the staging dir past that. Committing checks the meta against the staged parts, completes
it (shardmeta: stamp, data_id, inline data), syncs the files and hands it to the store's install.
"""

from __future__ import annotations

import os
import shutil
import threading
import types
from pathlib import Path
from typing import Protocol

from kvtier import errors, names
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import framing, shardfiles, shardmeta


class Store(Protocol):
    """What a staged write calls of its store (shards.ShardStore; a Protocol: no import cycle)."""

    def _install(self, write: StagedWrite, meta: datanode_pb2.ShardMeta) -> None:
        """Make the sealed meta (and the write's data dir) the key's version on the drive."""

    def _release(self, write_id: str) -> None:
        """Forget the write id: the write is committed or aborted."""


class StagedWrite:
    """A write of one object version to a drive, invisible until commit.

    Shard bytes arrive through write_part (appends in order, or block-aligned writes); the store
    frames them into checksummed blocks on arrival, in memory while the whole shard could still
    be inline, then in files under the staging dir. A write whose commit raised must be aborted.
    Usable as a context manager that aborts unless committed.
    """

    def __init__(self, store: Store, write_id: str, path: Path, block_bytes: int) -> None:
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
        #: a heal of a non-current version: installed as non-current only (shards._install)
        self.noncurrent = False

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
        if not 1 <= part_number <= shardmeta.MAX_PART_NUMBER:
            raise errors.InvalidArgument(
                f"part number {part_number}: must be 1-{shardmeta.MAX_PART_NUMBER}"
            )
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
            if self._in_memory and max(end, self._staged + len(view)) > shardmeta.INLINE_MAX_BYTES:
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
        if not 1 <= part_number <= shardmeta.MAX_PART_NUMBER:
            raise errors.InvalidArgument(
                f"part number {part_number}: must be 1-{shardmeta.MAX_PART_NUMBER}"
            )
        with self._lock:
            self._check_open()
            if part_number in self._parts:
                raise errors.InvalidArgument(f"part {part_number} is staged already")
            if self._in_memory and self._staged + shard_bytes > shardmeta.INLINE_MAX_BYTES:
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
        stored = shardmeta.ShardMeta()
        stored.CopyFrom(meta)
        where = f"{meta.bucket}/{meta.key}"
        if stored.block_bytes not in (0, self.block_bytes):
            raise errors.InvalidArgument(f"{where}: block_bytes differs from the staged write")
        stored.block_bytes = self.block_bytes
        shardmeta.stamp(stored, where)
        numbers = [p.number for p in stored.parts]
        if numbers != sorted(set(numbers)) or not set(self._parts) <= set(numbers):
            raise errors.InvalidArgument(f"{where}: parts must be unique, ascending and complete")
        for part in stored.parts:
            stage = self._parts.get(part.number)
            if (stage.staged if stage else 0) != part.shard_bytes:
                raise errors.InvalidArgument(f"{where}: part {part.number} shard_bytes mismatch")
            if stage:
                stage.finish(f"{where} part {part.number}")
        shardmeta.name_version(stored, where)
        if shardmeta.fits_inline(stored):  # (by size: the request's inline_data means nothing)
            stored.inline_data = b"".join(
                self._parts[p.number].frames(framing.framed_bytes(p.shard_bytes, self.block_bytes))
                for p in stored.parts
                if p.number in self._parts
            )
            return stored
        stored.inline_data = b""
        for stage in self._parts.values():
            stage.sync_and_close()
        shardfiles.fsync_dir(self.data_dir)
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
