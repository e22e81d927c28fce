"""The gateway's WRITE_SHARD batching: a shard's bytes of one call cut to the datanodes' slot."""

from __future__ import annotations

from services.gateway import datanodes

MIB = 1 << 20


def _sizes(batches: list[list[memoryview]]) -> list[list[int]]:
    return [[len(v) for v in batch] for batch in batches]


def test_batches_fit_the_limit_keep_order_and_split_segments_where_needed() -> None:
    blocks = [bytes([i]) * MIB for i in range(15)] + [b"\xff" * 1000]  # 2+2: 15 blocks + a tail
    batches = datanodes.write_batches(blocks, 8 * MIB)
    assert _sizes(batches) == [[MIB] * 8, [MIB] * 7 + [1000]]
    assert b"".join(v for batch in batches for v in batch) == b"".join(blocks)
    odd = datanodes.write_batches([b"a" * (3 * MIB), b"b" * MIB], 2 * MIB + 5)
    assert _sizes(odd) == [[2 * MIB + 5], [MIB - 5, MIB]]
    assert b"".join(v for batch in odd for v in batch) == b"a" * (3 * MIB) + b"b" * MIB


def test_no_bytes_is_one_empty_call_and_a_small_call_is_one() -> None:
    assert datanodes.write_batches([], 8 * MIB) == [[]]
    assert _sizes(datanodes.write_batches([b"x" * 10, b"y"], 8 * MIB)) == [[10, 1]]
