"""This machine's limits, measured in the same run as what we compare against them."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvtier import erasure

MIB = 1024 * 1024
WORKING_SET_BYTES = 256 * MIB


def memcpy_gbps(
    block_bytes: int, seconds: float = 0.5, working_set_bytes: int = 256 * MIB
) -> float:
    """numpy.copyto of block_bytes chunks between preallocated, pre-faulted buffers.

    The chunks walk a working set larger than the CPU caches, as KV blocks do: a cache-resident
    copy of one small block would overstate the ceiling several times over.
    """
    count = max(1, working_set_bytes // block_bytes)
    src = np.ones(count * block_bytes, dtype=np.uint8)
    dst = np.zeros(count * block_bytes, dtype=np.uint8)
    np.copyto(dst, src)
    moved, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        lo = (i % count) * block_bytes
        np.copyto(dst[lo : lo + block_bytes], src[lo : lo + block_bytes])
        moved += block_bytes
        i += 1
    return moved / (time.perf_counter() - start) / 1e9


def erasure_gbps(
    block_bytes: int = MIB, data_shards: int = 8, parity_shards: int = 4, seconds: float = 0.4
) -> dict[str, float] | None:
    """Reed-Solomon k+m (kvtier.erasure, ISA-L) on preallocated buffers, in GB/s of stripe data
    (k x block_bytes) per second: encode, and rebuild of the first 2 and 4 data shards from the
    rest. None without libisal2.

    The stripes walk a working set larger than the caches, as an object's stripes do.
    """
    if not erasure.available():
        return None
    k, m = data_shards, parity_shards
    codec = erasure.Codec(k, m)
    count = max(2, WORKING_SET_BYTES // ((k + m) * block_bytes))
    shards = np.full((count, k + m, block_bytes), 0x5A, dtype=np.uint8)
    rebuilt = np.ones((count, m, block_bytes), dtype=np.uint8)
    stripes = [list(stripe) for stripe in shards]
    for stripe in stripes:  # also faults every page in
        codec.encode(stripe[:k], stripe[k:])

    def rate(step: Callable[[int], None]) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step(done % count)
            done += 1
        return done * k * block_bytes / (time.perf_counter() - start) / 1e9

    def rebuild(lost: int) -> Callable[[int], None]:
        def step(i: int) -> None:
            present = dict(enumerate(stripes[i][lost:], start=lost))
            codec.reconstruct(present, dict(enumerate(rebuilt[i][:lost])))

        return step

    result = {"encode": rate(lambda i: codec.encode(stripes[i][:k], stripes[i][k:]))}
    for lost in (2, 4):
        if lost <= m:
            result[f"reconstruct_{lost}"] = rate(rebuild(lost))
    return result


def disk_gbps(
    directory: str | os.PathLike[str],
    total_bytes: int = 512 * MIB,
    block_bytes: int = 8 * MIB,
    repeats: int = 2,
) -> dict[str, Any]:
    """Sequential write and read of one file in `directory`'s filesystem, in GB/s (best of
    `repeats`); the file is removed afterwards.

    write_fsync: buffered writes then fsync, timed to the end of the fsync, as a datanode
    stages and commits a shard. read: O_DIRECT into an aligned buffer, so the page cache
    serves nothing (`read_method` says "O_DIRECT"); where the filesystem refuses O_DIRECT
    (tmpfs), buffered reads after posix_fadvise(DONTNEED) and the method says so.
    """
    path = os.path.join(directory, f".kvtier-disk-ceiling-{os.getpid()}")
    buf = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT needs
    buf.write(np.random.default_rng(7).integers(0, 256, block_bytes, dtype=np.uint8).tobytes())
    count = max(1, total_bytes // block_bytes)
    writes, reads, method = [], [], "O_DIRECT"
    try:
        for _ in range(repeats):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            start = time.perf_counter()
            try:
                for _ in range(count):
                    os.write(fd, buf)
                os.fsync(fd)
            finally:
                os.close(fd)
            writes.append(count * block_bytes / (time.perf_counter() - start) / 1e9)
            rate, method = _read_uncached(path, buf, count)
            reads.append(rate)
    finally:
        buf.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"write_fsync": max(writes), "read": max(reads), "read_method": method}


def _read_uncached(path: str, buf: mmap.mmap, count: int) -> tuple[float, str]:
    try:
        fd, method = os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    except OSError:
        fd, method = os.open(path, os.O_RDONLY), "buffered after fadvise(DONTNEED)"
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        start = time.perf_counter()
        got = 0
        for _ in range(count):
            got += os.readv(fd, [buf])
        return got / (time.perf_counter() - start) / 1e9, method
    finally:
        os.close(fd)


def md5_gbps(total_bytes: int = 256 * MIB) -> float:
    """hashlib MD5 (the ETag of an object) over pre-faulted memory on one core, GB/s: one PUT
    hashes its bytes in order, so this bounds a single PUT stream."""
    data = np.ones(total_bytes, dtype=np.uint8)
    start = time.perf_counter()
    hashlib.md5(data.data).digest()
    return total_bytes / (time.perf_counter() - start) / 1e9


def _sender(port_out: Connection, block_bytes: int, total_bytes: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MIB)
    pool = memoryview(np.ones(WORKING_SET_BYTES, dtype=np.uint8).data)
    count = WORKING_SET_BYTES // block_bytes
    sent = i = 0
    while sent < total_bytes:
        lo = (i % count) * block_bytes
        conn.sendall(pool[lo : lo + block_bytes])
        sent += block_bytes
        i += 1
    conn.close()


def raw_socket_gbps(block_bytes: int = 2 * MIB, total_bytes: int = 4096 * MIB) -> float:
    """One TCP stream over loopback between two processes, recv_into preallocated memory.

    Both ends walk a working set larger than the caches (as the transports' benchmarks do).
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sender, args=(child, block_bytes, total_bytes), daemon=True)
    proc.start()
    port = parent.recv()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
    pool = memoryview(np.zeros(WORKING_SET_BYTES, dtype=np.uint8).data)
    got, start = 0, time.perf_counter()
    while got < total_bytes:
        lo = got % WORKING_SET_BYTES
        n = sock.recv_into(pool[lo : lo + min(block_bytes, WORKING_SET_BYTES - lo)])
        if n == 0:
            break
        got += n
    elapsed = time.perf_counter() - start
    sock.close()
    proc.join(5)
    return got / elapsed / 1e9


def _echo(port_out: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return
        conn.sendall(buf[:n])


def raw_round_trip_us(samples: int = 5000) -> tuple[float, float]:
    """p50 and p99 of a 64-byte request/response over loopback TCP between two processes."""
    return raw_fanout_us(samples, peers=1)


def raw_fanout_us(samples: int = 5000, peers: int = 2) -> tuple[float, float]:
    """p50 and p99 of one client sending a 64-byte request to each of `peers` echo processes
    over loopback TCP and waiting for every reply: the least a call to that many nodes costs
    on this host (a Score, or a lookup of keys with two owners, asks two kvcache nodes at once).
    The client sends every request before it reads a reply, as the sync KV client does."""
    ctx = multiprocessing.get_context("fork")
    procs, socks = [], []
    try:
        for _ in range(peers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_echo, args=(child,), daemon=True)
            proc.start()
            procs.append(proc)
            sock = socket.create_connection(("127.0.0.1", parent.recv()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        msg, buf = b"x" * 64, bytearray(64)
        view = memoryview(buf)
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            for sock in socks:
                sock.sendall(msg)
            for sock in socks:
                got = 0
                while got < 64:
                    n = sock.recv_into(view[got:])
                    if not n:
                        raise ConnectionError("an echo process closed its connection")
                    got += n
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        for sock in socks:
            sock.close()  # the echo process sees the end of its stream and exits
        for proc in procs:
            proc.join(5)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]
