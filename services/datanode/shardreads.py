"""A drive's ShardStore reads: metas, blocks of a part's shard (every block's checksum checked),
verification of a whole object and listings from the index. A shard is read from the meta's
inline data or from `<h>/<data_id>/part.N` (services.datanode.framing checks the blocks).
"""

from __future__ import annotations

import contextlib
import time

from kvtier import errors, names
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import framing, index, shardmeta, shardversions, versionstore

_VERIFY_BLOCKS = 4

ListEntry = index.ListEntry
BadBlock = tuple[int, int]


class ShardReads(shardversions.VersionedShards):
    """The read path of a drive's shard store (current versions, and kept ones by data_id)."""

    def read_meta(self, bucket: str, key: str, version: str = "") -> datanode_pb2.ShardMeta:
        """The object's meta on this drive (version: that S3 version's, current or not);
        NotFound when absent, Corrupt when unreadable."""
        if version:
            return self.read_version(bucket, key, version)
        path = self._object_dir(bucket, key) / shardmeta.META_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise errors.NotFound(f"{bucket}/{key}: not on this drive") from None
        meta = shardmeta.decode_meta(raw, f"{bucket}/{key}")
        if meta.bucket != bucket or meta.key != key:
            raise errors.Corrupt(f"{bucket}/{key}: meta names {meta.bucket}/{meta.key}")
        return meta

    def read_meta_aged(self, bucket: str, key: str, version: str = "") -> datanode_pb2.ShardMeta:
        """read_meta's meta with stored_age_ms set (this node's clock: shardmeta.stored_age_ms),
        as a READ_METAS call answers with it."""
        meta = self.read_meta(bucket, key, version)
        mtime_ns = 0
        if not meta.stored_unix_ns and not version:  # stored before the field: the file's
            with contextlib.suppress(OSError):
                path = self._object_dir(bucket, key) / shardmeta.META_FILE
                mtime_ns = path.stat().st_mtime_ns
        meta.stored_age_ms = shardmeta.stored_age_ms(meta, mtime_ns, time.time_ns())
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
            older = versionstore.find_data(
                self._object_dir(bucket, key), data_id, shardmeta.decode_meta
            )
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
        found = versionstore.find_data(
            self._object_dir(bucket, key), data_id, shardmeta.decode_meta
        )
        return found is None

    def verify(self, bucket: str, key: str, version: str = "") -> list[BadBlock]:
        """Every (part, block) of the object's shard here (version: that S3 version's,
        current or not) that is missing or fails its checksum.

        Raises NotFound when the object is absent and Corrupt when its meta is unreadable.
        """
        meta = self.read_meta(bucket, key, version)
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
        if shardmeta.is_inline(meta):
            return span.from_frames(memoryview(meta.inline_data)[inline_at:])
        object_dir = self._object_dir(meta.bucket, meta.key)
        return span.from_file(object_dir / meta.data_id / f"part.{part}")

    def current_stamp(self, bucket: str, key: str) -> int:
        """The stamp (mtime) of the object's current version here; 0 when there is none."""
        current = self._current_version(self._object_dir(bucket, key))
        return current[0] if current is not None else 0

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


def _locate_part(meta: datanode_pb2.ShardMeta, number: int) -> tuple[int, int]:
    """(shard bytes of the part, where its frames start in inline_data)."""
    at = 0
    for part in meta.parts:
        if part.number == number:
            return part.shard_bytes, at
        at += framing.framed_bytes(part.shard_bytes, meta.block_bytes)
    raise errors.InvalidArgument(f"{meta.bucket}/{meta.key}: no part {number}")
