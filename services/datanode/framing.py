"""Block framing of shard bytes: blocks of at most block_bytes, each followed by its xxh3-64.

A part's shard on disk (or in `ShardMeta.inline_data`) is `block0 hash0 block1 hash1 ...`, every
block block_bytes long except the last, every hash the 8-byte little-endian xxh3-64 of its block.
`PartStager` frames bytes as they arrive (into memory or a file); `BlockSpan` reads a run of
blocks back into a caller's buffer, checking each. xxh3 runs at tens of GB/s, well over disk
speed, so every read is checked; bitrot is random damage, so a non-cryptographic hash suffices.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from kvtier import errors

HASH_BYTES = 8
# preadv takes at most IOV_MAX (1024 on Linux) buffers: two per block.
_BLOCKS_PER_READ = 512

Buffer = bytes | bytearray | memoryview


def digest(block: Buffer) -> bytes:
    """The checksum stored after a block."""
    return xxhash.xxh3_64_intdigest(block).to_bytes(HASH_BYTES, "little")


def framed_bytes(shard_bytes: int, block_bytes: int) -> int:
    """Bytes of a framed shard of shard_bytes: the data plus one checksum per block."""
    return shard_bytes + HASH_BYTES * -(-shard_bytes // block_bytes)


def pwrite_all(fd: int, buffers: list[Buffer], offset: int) -> None:
    """Write buffers at offset, completing short writes."""
    written = os.pwritev(fd, buffers, offset)
    if written == sum(memoryview(b).nbytes for b in buffers):
        return  # the usual case: no copy of the bytes (a 1 MiB block per call while staging)
    rest = memoryview(b"".join(buffers))[written:]  # only after a short write (rare)
    while rest:
        written += (n := os.pwrite(fd, rest, offset + written))
        rest = rest[n:]


class PartStager:
    """One part's shard being staged: blocks are framed as they complete, in memory or a file.

    Bytes arrive at block-aligned offsets or continuing a block still filling; the last block
    of the part may be short and is framed by finish().
    """

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.done: dict[int, int] = {}  # block index -> its bytes, framed and written
        self.tails: dict[int, bytearray] = {}  # block index -> bytes of a block still filling
        self.staged = 0
        self.memory: bytearray | None = bytearray()
        self.fd = -1

    @classmethod
    def finished(cls, block_bytes: int, shard_bytes: int) -> PartStager:
        """A stager for a shard framed elsewhere (its frames or file are set by the caller)."""
        stage = cls(block_bytes)
        full, rest = divmod(shard_bytes, block_bytes)
        stage.done = dict.fromkeys(range(full), block_bytes)
        if rest:
            stage.done[full] = rest
        stage.staged = shard_bytes
        return stage

    def write(self, offset: int, data: memoryview) -> None:
        """Stage data at offset; InvalidArgument when misaligned or overlapping staged bytes."""
        size = self.block_bytes
        block, within = divmod(offset, size)
        tail = self.tails.get(block)
        if within and (tail is None or len(tail) != within):
            raise errors.InvalidArgument(f"offset {offset}: not block-aligned nor an append")
        if not data:
            return
        first_new = block + 1 if within else block
        last = (offset + len(data) - 1) // size
        if any(b in self.done or b in self.tails for b in range(first_new, last + 1)):
            raise errors.InvalidArgument(f"offset {offset}: overlaps bytes already written")
        pos = 0
        if tail is not None and within:
            pos = min(size - within, len(data))
            tail += data[:pos]
            if len(tail) == size:
                self._frame(block, tail)
                del self.tails[block]
            block += 1
        while len(data) - pos >= size:
            self._frame(block, data[pos : pos + size])
            pos += size
            block += 1
        if pos < len(data):
            self.tails[block] = bytearray(data[pos:])
        self.staged += len(data)

    def _frame(self, block: int, raw: Buffer) -> None:
        at = block * (self.block_bytes + HASH_BYTES)
        check = digest(raw)
        if self.memory is None:
            pwrite_all(self.fd, [raw, check], at)
        else:
            end = at + len(raw) + HASH_BYTES
            if len(self.memory) < end:
                self.memory.extend(bytes(end - len(self.memory)))
            self.memory[at : at + len(raw)] = raw
            self.memory[at + len(raw) : end] = check
        self.done[block] = len(raw)

    def spill(self, path: Path) -> None:
        """Move the staged frames from memory into a new file at path."""
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if self.memory:
            pwrite_all(self.fd, [self.memory], 0)
        self.memory = None

    def finish(self, where: str) -> None:
        """Frame the last, short block; InvalidArgument when the shard has a hole."""
        if len(self.tails) > 1:
            raise errors.InvalidArgument(f"{where}: unfinished blocks in the middle of the shard")
        for block, tail in list(self.tails.items()):
            self._frame(block, tail)
        self.tails.clear()
        count = len(self.done)
        if sorted(self.done) != list(range(count)) or any(
            self.done[b] != self.block_bytes for b in range(count - 1)
        ):
            raise errors.InvalidArgument(f"{where}: the shard has holes")

    def frames(self, framed: int) -> bytes:
        """The framed shard (read back from the file only when a rejected write had spilled it)."""
        if self.memory is not None:
            return bytes(self.memory)
        return os.pread(self.fd, framed, 0)

    def sync_and_close(self) -> None:
        """fsync and close the file, if any."""
        if self.fd >= 0:
            os.fsync(self.fd)
            self.close()

    def close(self) -> None:
        """Close the file, if any (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockSpan:
    """Blocks [first, end) of a framed shard of shard_bytes, read (data only) into dest."""

    def __init__(
        self, shard_bytes: int, block_bytes: int, first: int, end: int, dest: memoryview
    ) -> None:
        self.shard_bytes = shard_bytes
        self.size = block_bytes
        self.first = first
        self.end = end
        self.dest = dest

    def _slot(self, block: int) -> memoryview:
        at = (block - self.first) * self.size
        return self.dest[at : at + min(self.size, self.shard_bytes - block * self.size)]

    def from_frames(self, frames: memoryview) -> list[int]:
        """Copy and check from framed bytes in memory; returns the bad (or missing) blocks."""
        bad = []
        for block in range(self.first, self.end):
            slot = self._slot(block)
            at = block * (self.size + HASH_BYTES)
            raw = frames[at : at + len(slot)]
            check = frames[at + len(slot) : at + len(slot) + HASH_BYTES]
            slot[: len(raw)] = raw
            if len(raw) != len(slot) or digest(raw) != check:
                bad.append(block)
        return bad

    def from_file(self, path: Path) -> list[int]:
        """Scatter-read from a shard file straight into dest and check; returns the bad blocks.

        Raises FileNotFoundError when the file is missing.
        """
        bad = []
        checks = memoryview(bytearray(HASH_BYTES * min(_BLOCKS_PER_READ, self.end - self.first)))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for start in range(self.first, self.end, _BLOCKS_PER_READ):
                blocks = range(start, min(self.end, start + _BLOCKS_PER_READ))
                buffers: list[memoryview] = []
                for i, block in enumerate(blocks):
                    buffers += [self._slot(block), checks[i * HASH_BYTES : (i + 1) * HASH_BYTES]]
                got = os.preadv(fd, buffers, start * (self.size + HASH_BYTES))
                for i, block in enumerate(blocks):
                    raw, check = buffers[2 * i], buffers[2 * i + 1]
                    got -= len(raw) + HASH_BYTES
                    if got < 0 or digest(raw) != check:
                        bad.append(block)
        finally:
            os.close(fd)
        return bad
