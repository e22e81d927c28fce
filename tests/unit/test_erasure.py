"""Unit tests of kvtier.erasure: every erasure pattern decodes byte-exact, parity matches an
independent GF(2^8) reference, errors are typed, stripes split and pad, async helpers offload."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import random
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvtier import erasure, errors

log = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(not erasure.available(), reason="libisal2 is not installed")

LAYOUTS = [(1, 0), (2, 1), (4, 2), (8, 4), (12, 4), (6, 3)]
#: Patterns tried per layout: all of them up to this many, else a seeded sample of this many.
MAX_PATTERNS = 1000
#: Odd on purpose: not a multiple of any vector width.
SHARD_BYTES = 1000


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("KVTIER_TEST_SEED") or random.randrange(2**32))
    log.info("seed %d", seed)
    return np.random.default_rng(seed)


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = erasure.new_executor(2)
    yield pool
    pool.shutdown(wait=True)


def random_shards(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


def encoded(
    codec: erasure.Codec, rng: np.random.Generator, size: int = SHARD_BYTES
) -> list[np.ndarray]:
    """k random data shards followed by their m parity shards."""
    data = random_shards(rng, codec.data_shards, size)
    parity = [np.zeros(size, dtype=np.uint8) for _ in range(codec.parity_shards)]
    codec.encode(data, parity)
    return data + parity


def erasure_patterns(n: int, m: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every set of 1..m erased shards out of n, or a seeded sample when there are many."""
    total = sum(math.comb(n, r) for r in range(1, m + 1))
    if total <= MAX_PATTERNS:
        return [c for r in range(1, m + 1) for c in itertools.combinations(range(n), r)]
    patterns = {tuple(range(n - m, n)), tuple(range(m))}  # all parity, the first data shards
    while len(patterns) < MAX_PATTERNS:
        size = int(rng.integers(1, m + 1))
        patterns.add(tuple(sorted(int(i) for i in rng.choice(n, size, replace=False))))
    return sorted(patterns)


# An independent GF(2^8) for checking that we drive ISA-L right: the field ISA-L uses is
# GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), its Cauchy parity coefficient for shard i, data j
# is 1 / (i xor j).
def gf_tables() -> tuple[np.ndarray, np.ndarray]:
    exp, log_ = np.zeros(510, dtype=np.int64), np.zeros(256, dtype=np.int64)
    x = 1
    for power in range(255):
        exp[power], log_[x] = x, power
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    exp[255:] = exp[:255]
    return exp, log_


EXP, LOG = gf_tables()


def gf_scale(c: int, x: np.ndarray) -> np.ndarray:
    """c · x bytewise in GF(2^8)."""
    if c == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    product: np.ndarray = EXP[LOG[c] + LOG[x]].astype(np.uint8)
    product[x == 0] = 0
    return product


def gf_inv(c: int) -> int:
    return int(EXP[255 - LOG[c]])


def reference_parity(data: list[np.ndarray], m: int) -> list[np.ndarray]:
    k = len(data)
    parity = []
    for i in range(k, k + m):
        acc = np.zeros_like(data[0])
        for j in range(k):
            acc ^= gf_scale(gf_inv(i ^ j), data[j])
        parity.append(acc)
    return parity


def test_reference_field_is_sound() -> None:
    assert gf_scale(2, np.array([0x80], dtype=np.uint8))[0] == 0x1D
    for c in range(1, 256):
        assert gf_scale(c, np.array([gf_inv(c)], dtype=np.uint8))[0] == 1


@pytest.mark.parametrize(("k", "m"), [(4, 2), (6, 3), (8, 4), (3, 9), (1, 5)])
def test_parity_matches_independent_gf256_reference(
    k: int, m: int, rng: np.random.Generator
) -> None:
    codec = erasure.Codec(k, m)
    data = random_shards(rng, k, 257)
    parity = [np.zeros(257, dtype=np.uint8) for _ in range(m)]
    codec.encode(data, parity)
    for j, (got, want) in enumerate(zip(parity, reference_parity(data, m), strict=True)):
        assert bytes(got) == bytes(want), f"{k}+{m} parity {j}"


@pytest.mark.parametrize(("k", "m"), LAYOUTS)
def test_every_erasure_of_up_to_m_shards_reconstructs(
    k: int, m: int, rng: np.random.Generator
) -> None:
    codec = erasure.Codec(k, m)
    shards = encoded(codec, rng)
    for lost in erasure_patterns(k + m, m, rng):
        present = {i: s for i, s in enumerate(shards) if i not in lost}
        out = {i: np.full(SHARD_BYTES, 0xAA, dtype=np.uint8) for i in lost}
        codec.reconstruct(present, out)
        for i in lost:
            assert bytes(out[i]) == bytes(shards[i]), f"{k}+{m} lost {lost}: shard {i}"


@pytest.mark.parametrize(("k", "m"), LAYOUTS)
def test_losing_more_than_m_shards_is_not_enough(k: int, m: int, rng: np.random.Generator) -> None:
    codec = erasure.Codec(k, m)
    shards = encoded(codec, rng)
    lost = {int(i) for i in rng.choice(k + m, m + 1, replace=False)}
    present = {i: s for i, s in enumerate(shards) if i not in lost}
    out = {i: np.zeros(SHARD_BYTES, dtype=np.uint8) for i in lost}
    with pytest.raises(erasure.NotEnoughShards, match=f"needs {k} of {k + m}") as caught:
        codec.reconstruct(present, out)
    assert isinstance(caught.value, errors.Unavailable)


def test_decodes_from_any_k_shards_and_ignores_extras(rng: np.random.Generator) -> None:
    codec = erasure.Codec(4, 2)
    shards = encoded(codec, rng)
    out = {0: np.zeros(SHARD_BYTES, dtype=np.uint8)}
    codec.reconstruct({i: shards[i] for i in (1, 3, 4, 5)}, out)  # exactly k, two of parity
    assert bytes(out[0]) == bytes(shards[0])
    out = {5: np.zeros(SHARD_BYTES, dtype=np.uint8)}
    codec.reconstruct({i: shards[i] for i in range(5)}, out)  # parity from all the data
    assert bytes(out[5]) == bytes(shards[5])
    codec.reconstruct({i: shards[i] for i in range(6)}, {})  # nothing wanted: nothing done


def test_no_parity_layout() -> None:
    codec = erasure.Codec(1, 0)
    codec.encode([b"abc"], [])
    out = bytearray(3)
    with pytest.raises(erasure.NotEnoughShards):
        codec.reconstruct({}, {0: out})


@pytest.mark.parametrize("size", [0, 1, 15, 31, 63, 64, 65, 4097])
def test_any_shard_length_works(size: int, rng: np.random.Generator) -> None:
    codec = erasure.Codec(4, 2)
    shards = encoded(codec, rng, size)
    if size:
        assert [bytes(p) for p in shards[4:]] == [bytes(p) for p in reference_parity(shards[:4], 2)]
    out = {0: np.zeros(size, dtype=np.uint8), 2: np.zeros(size, dtype=np.uint8)}
    codec.reconstruct({i: shards[i] for i in (1, 3, 4, 5)}, out)
    assert bytes(out[0]) == bytes(shards[0])
    assert bytes(out[2]) == bytes(shards[2])


def test_buffer_kinds_and_unaligned_views(rng: np.random.Generator) -> None:
    codec = erasure.Codec(3, 2)
    data = random_shards(rng, 3, 100)
    want = reference_parity(data, 2)
    backing = bytearray(1 + 2 * 100)
    parity = [memoryview(backing)[1:101], np.zeros((10, 10), dtype=np.uint8)]  # odd address, 2-D
    codec.encode([bytes(data[0]), bytearray(data[1]), data[2].data], parity)
    assert bytes(parity[0]) == bytes(want[0])
    assert bytes(parity[1]) == bytes(want[1])


def test_wrong_lengths_and_buffers_are_invalid(rng: np.random.Generator) -> None:
    codec = erasure.Codec(4, 2)
    data = random_shards(rng, 4, 64)
    parity = [np.zeros(64, dtype=np.uint8) for _ in range(2)]
    bad_calls: list[tuple[list[Any], list[Any]]] = [
        (data[:3], parity),  # too few data shards
        (data, parity[:1]),  # too few parity shards
        ([*data[:3], data[3][:63]], parity),  # one data shard short
        (data, [parity[0], np.zeros(65, dtype=np.uint8)]),  # one parity shard long
        (data, [parity[0], bytes(64)]),  # read-only parity
        (data, [parity[0], np.zeros(128, dtype=np.uint8)[::2]]),  # not contiguous
        ([*data[:3], 42], parity),  # not a buffer
    ]
    for args in bad_calls:
        with pytest.raises(errors.InvalidArgument):
            codec.encode(*args)
    shards = data + parity
    present = {i: shards[i] for i in range(1, 6)}
    with pytest.raises(errors.InvalidArgument, match="differ in length"):
        codec.reconstruct(present, {0: np.zeros(63, dtype=np.uint8)})
    with pytest.raises(errors.InvalidArgument, match="out of range"):
        codec.reconstruct(present, {6: np.zeros(64, dtype=np.uint8)})
    with pytest.raises(errors.InvalidArgument, match="both present and wanted"):
        codec.reconstruct(present, {1: np.zeros(64, dtype=np.uint8)})
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        codec.reconstruct(present, {0: bytes(64)})


@pytest.mark.parametrize(("k", "m"), [(0, 1), (-1, 0), (1, -1), (20, 13), (33, 0)])
def test_bad_layouts_are_invalid(k: int, m: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        erasure.Codec(k, m)


def test_largest_layout_works(rng: np.random.Generator) -> None:
    codec = erasure.Codec(16, 16)
    shards = encoded(codec, rng, 128)
    lost = range(16)  # every data shard: decode from parity alone
    out = {i: np.zeros(128, dtype=np.uint8) for i in lost}
    codec.reconstruct({i: shards[i] for i in range(16, 32)}, out)
    assert all(bytes(out[i]) == bytes(shards[i]) for i in lost)


def test_decode_tables_are_cached_and_bounded(rng: np.random.Generator) -> None:
    codec = erasure.Codec(8, 4)
    shards = encoded(codec, rng, 64)
    for lost in itertools.combinations(range(12), 2):
        out = {i: np.zeros(64, dtype=np.uint8) for i in lost}
        codec.reconstruct({i: s for i, s in enumerate(shards) if i not in lost}, out)
        assert all(bytes(out[i]) == bytes(shards[i]) for i in lost)
    assert len(codec._decode_tables) == erasure.DECODE_CACHE_ENTRIES


def test_without_libisal_codec_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(erasure, "_load", lambda: None)
    assert not erasure.available()
    with pytest.raises(errors.Unavailable, match="apt-get install libisal2"):
        erasure.Codec(4, 2)


def test_shard_size() -> None:
    mib = 1 << 20
    assert erasure.shard_size(0, 4, mib) == 0
    assert erasure.shard_size(5, 4, mib) == 2
    assert erasure.shard_size(4 * mib, 4, mib) == mib
    assert erasure.shard_size(9 * mib + 3, 4, mib) == 2 * mib + mib // 4 + 1
    assert erasure.shard_size(7, 1, 4) == 7
    with pytest.raises(errors.InvalidArgument):
        erasure.shard_size(-1, 4, mib)


def test_split_full_stripe_is_zero_copy() -> None:
    stripe = bytearray(range(12))
    views = erasure.split(stripe, 3, 4)
    assert [bytes(v) for v in views] == [
        bytes(range(0, 4)),
        bytes(range(4, 8)),
        bytes(range(8, 12)),
    ]
    stripe[5] = 99
    assert views[1][1] == 99


def test_split_short_stripe_pads_into_scratch() -> None:
    scratch = np.full(16, 0xFF, dtype=np.uint8)
    size = erasure.shard_size(10, 3, 1 << 20)
    views = erasure.split(b"0123456789", 3, size, scratch=scratch)
    assert [bytes(v) for v in views] == [b"0123", b"4567", b"89\0\0"]
    assert scratch[12:].tolist() == [0xFF] * 4  # only k x shard_bytes of it is touched
    with pytest.raises(errors.InvalidArgument, match="scratch"):
        erasure.split(b"0123456789", 3, size)
    with pytest.raises(errors.InvalidArgument, match="scratch"):
        erasure.split(b"0123456789", 3, size, scratch=bytearray(11))
    with pytest.raises(errors.InvalidArgument, match="stripe of 10 bytes"):
        erasure.split(b"0123456789", 3, 3)


def test_split_then_encode_then_rebuild_object(rng: np.random.Generator) -> None:
    codec, block = erasure.Codec(4, 2), 256
    obj = rng.integers(0, 256, 3 * 4 * block + 777, dtype=np.uint8).tobytes()
    scratch = np.zeros(4 * block, dtype=np.uint8)
    parity = [np.zeros(block, dtype=np.uint8) for _ in range(2)]
    rebuilt = bytearray()
    for lo in range(0, len(obj), 4 * block):
        stripe = memoryview(obj)[lo : lo + 4 * block]
        size = erasure.shard_size(len(stripe), 4, block)
        data = erasure.split(stripe, 4, size, scratch=scratch)
        codec.encode(data, [p[:size] for p in parity])
        out = {0: np.zeros(size, dtype=np.uint8), 3: np.zeros(size, dtype=np.uint8)}
        codec.reconstruct({1: data[1], 2: data[2], 4: parity[0][:size], 5: parity[1][:size]}, out)
        rebuilt += bytes(out[0]) + bytes(data[1]) + bytes(data[2]) + bytes(out[3])
    assert len(rebuilt) == 4 * erasure.shard_size(len(obj), 4, block)
    assert bytes(rebuilt[: len(obj)]) == obj
    assert not any(rebuilt[len(obj) :])


async def test_async_helpers_run_in_executor(
    rng: np.random.Generator, executor: concurrent.futures.ThreadPoolExecutor
) -> None:
    codec = erasure.Codec(8, 4)
    data = random_shards(rng, 8, 4096)
    parity = [np.zeros(4096, dtype=np.uint8) for _ in range(4)]
    await codec.encode_async(data, parity, executor=executor)
    assert [bytes(p) for p in parity] == [bytes(p) for p in reference_parity(data, 4)]
    shards = data + parity
    out = {i: np.zeros(4096, dtype=np.uint8) for i in (0, 3, 9, 11)}
    present = {i: s for i, s in enumerate(shards) if i not in out}
    await codec.reconstruct_async(present, out, executor=executor)
    assert all(bytes(out[i]) == bytes(shards[i]) for i in out)
    with pytest.raises(errors.InvalidArgument):
        await codec.encode_async(data[:7], parity, executor=executor)
    with pytest.raises(erasure.NotEnoughShards):
        await codec.reconstruct_async({0: data[0]}, {1: out[0]}, executor=executor)


async def test_cancelled_encode_returns_only_after_parity_is_written(
    rng: np.random.Generator,
) -> None:
    codec = erasure.Codec(4, 2)
    data = random_shards(rng, 4, 4096)
    parity = [np.zeros(4096, dtype=np.uint8) for _ in range(2)]
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait)  # holds the only worker, so the encode queues behind it
        task = asyncio.create_task(codec.encode_async(data, parity, executor=pool))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()  # still waiting for the worker to write
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [bytes(p) for p in parity] == [bytes(p) for p in reference_parity(data, 2)]
