"""The block layout of KV buckets' objects (`services/gateway/s3/kv_layout.py`): a blob of up to
the documented 64 MiB fits the kvcache nodes' largest block with its version id, spilling into a
tail block only past 64 MiB - 16 bytes, and ranges read across the two blocks exactly."""

from __future__ import annotations

import pytest

from services.gateway.s3 import kv_layout
from services.kvcache import slab

HEAD = kv_layout.HEAD_BYTES


def test_block_limit_is_the_kvcache_nodes_largest_block() -> None:
    default = slab.SlabAllocator(4 * slab.DEFAULT_PAGE_BYTES)
    assert kv_layout.KV_BLOCK_BYTES == slab.MAX_BLOCK_BYTES == default.max_block_bytes
    assert kv_layout.MAX_KV_OBJECT_BYTES == 64 << 20


@pytest.mark.parametrize(
    ("size", "block_sizes"),
    [
        (0, [16]),
        (5, [21]),
        (HEAD, [kv_layout.KV_BLOCK_BYTES]),
        (HEAD + 1, [kv_layout.KV_BLOCK_BYTES, 17]),
        (kv_layout.MAX_KV_OBJECT_BYTES, [kv_layout.KV_BLOCK_BYTES, 32]),
    ],
)
def test_blocks_never_exceed_the_block_limit(size: int, block_sizes: list[int]) -> None:
    blob = kv_layout.Blob(size)
    assert [len(b) for b in blob.blocks] == block_sizes
    assert all(b[: kv_layout.VERSION_BYTES] == blob.version for b in blob.blocks)
    assert sum(len(p) for p in blob.pieces()) == size


def test_pieces_of_a_range_across_the_tail() -> None:
    size = kv_layout.MAX_KV_OBJECT_BYTES
    blob = kv_layout.Blob(size)
    # Write a pattern through the pieces; read ranges back.
    pattern = bytes(range(256)) * (size // 256)
    offset = 0
    for piece in blob.pieces():
        piece[:] = pattern[offset : offset + len(piece)]
        offset += len(piece)
    for first, last in ((0, 9), (HEAD - 3, HEAD + 3), (HEAD, size - 1), (size - 1, size - 1)):
        got = b"".join(bytes(p) for p in blob.pieces(first, last))
        assert got == pattern[first : last + 1], (first, last)
    assert blob.pieces(5, 4) == []


def test_intact_needs_whole_blocks_of_the_same_version() -> None:
    blob = kv_layout.Blob(HEAD + 10)
    sizes = [len(b) for b in blob.blocks]
    assert blob.intact(sizes)
    assert not blob.intact([sizes[0], None])
    assert not blob.intact([sizes[0], sizes[1] - 1])
    blob.blocks[1][0] ^= 1  # the tail of another writer
    assert not blob.intact(sizes)


def test_internal_keys_never_collide_with_object_keys() -> None:
    data, tail = kv_layout.object_keys("a/b")
    assert data == b"a/b"
    uid = "0" * 32
    internal = [tail, kv_layout.meta_key("a/b"), kv_layout.record_key(uid)]
    internal += list(kv_layout.part_keys(uid, 7))
    assert all(k.startswith(b"\x00") for k in internal)
    assert len(set(internal)) == len(internal)
    assert kv_layout.part_keys(uid, 7)[2].startswith(kv_layout.parts_prefix(uid, b"m"))
