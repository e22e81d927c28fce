"""Block checksums of the KV tier: the xxh3-64 of a block's bytes, for the SDK and kvcache nodes.

xxh3 runs at ~20 GB/s on one core (~0.1 ms per 2 MiB block). One block, or a small batch, is
hashed inline: handing it to a thread would cost about as much. On a host with 4 cores or more
a large batch is hashed on a small shared thread pool, its blocks split across the threads
(xxhash releases the GIL), so a 32 MiB batch costs a fraction of a millisecond of wall time
instead of ~1.5 ms (with fewer cores, threads only add hand-offs: measured slower on 2).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Sequence
from typing import Any

import xxhash

#: Batches smaller than this (in bytes) are hashed inline on the calling thread.
PARALLEL_MIN_BYTES = 4 * 1024 * 1024
#: Threads of the shared pool (hashing is memory-bound: a few threads saturate a socket).
MAX_THREADS = 8
#: Threads used: half the cores, at most MAX_THREADS (below 2: no pool, everything inline).
WORKERS = min(MAX_THREADS, (os.cpu_count() or 1) // 2)

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def checksum(data: Any) -> int:
    """The xxh3-64 of data (a buffer: memoryview, bytes, bytearray)."""
    return xxhash.xxh3_64_intdigest(data)


def parallel(views: Sequence[memoryview]) -> bool:
    """Whether `checksums` hashes these views on threads (else inline)."""
    return WORKERS >= 2 and len(views) >= 2 and sum(v.nbytes for v in views) >= PARALLEL_MIN_BYTES


def _all(views: Sequence[Any]) -> list[int]:
    return [xxhash.xxh3_64_intdigest(v) for v in views]


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(MAX_THREADS, "kvtier-blocksums")
        return _pool


async def checksums(views: Sequence[memoryview]) -> list[int]:
    """The checksum of each view, in order: inline for a small batch, else split across
    `WORKERS` threads of the shared pool (the views must stay valid until this returns)."""
    if not parallel(views):
        return _all(views)
    pool = _threads()
    parts = min(len(views), WORKERS)
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(pool, _all, views[i::parts]) for i in range(parts)]
    results = await asyncio.gather(*jobs)
    found = [0] * len(views)
    for i, part in enumerate(results):
        found[i::parts] = part
    return found
