"""Copies between a client's buffers and its mappings of a peer's regions, off the event loop.

ctypes.memmove releases the GIL, so large copies run in worker threads while the loop stays free
(see the performance notes in `kvtier.transport.shm`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import Any

from kvtier import errors

COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
OFFLOAD_MIN_BYTES = 8 * 1024 * 1024  # a copy this large goes to the worker threads


class _PyBuffer(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


# Own prototypes (not ctypes.pythonapi.X.argtypes = ..., which is global state).
_get_buffer = ctypes.PYFUNCTYPE(
    ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int
)(("PyObject_GetBuffer", ctypes.pythonapi))
_release_buffer = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(
    ("PyBuffer_Release", ctypes.pythonapi)
)


class Pinned:
    """A buffer export held open, so its address stays valid while a worker thread copies."""

    __slots__ = ("_view", "address")

    def __init__(self, obj: object) -> None:
        view = _PyBuffer()
        _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE: contiguous bytes
        self._view: _PyBuffer | None = view
        self.address = int(view.buf or 0)

    def release(self) -> None:
        """End the export (the address is no longer safe to use). Idempotent."""
        if self._view is not None:
            _release_buffer(ctypes.byref(self._view))
            self._view = None

    def __del__(self) -> None:
        self.release()


class Mapping:
    """A client's mapping of one region; unmapped when the last reference (copy, table) goes."""

    __slots__ = ("_map", "_pin", "address", "size", "view")

    def __init__(self, fd: int, size: int, writable: bool) -> None:
        # No MAP_POPULATE: it costs ~140 ms per GiB on the event loop. Pages fault in on first
        # touch instead (+0.3 ms per 2 MiB read, +1 ms per 2 MiB write, once per connection).
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        view = memoryview(self._map)  # writable even for PROT_READ maps: a write would segfault
        self.view = view if writable else view.toreadonly()
        self._pin = Pinned(self.view)
        self.address, self.size = self._pin.address, size


class Mappings:
    """A client's mappings of the regions it has been handed, read-only and writable."""

    def __init__(self) -> None:
        self._ro: dict[int, Mapping] = {}
        self._rw: dict[int, Mapping] = {}

    def add(self, region_id: int, fd: int, size: int, writable: bool) -> None:
        """Map a region's fd (the caller closes it)."""
        (self._rw if writable else self._ro)[region_id] = Mapping(fd, size, writable)

    def get(self, region_id: int, offset: int, length: int, *, writing: bool) -> Mapping:
        """The mapping to copy a granted range through; Internal when the region is not mapped
        (writable, to write) or the range is outside it."""
        mapping = self._rw.get(region_id)
        if mapping is None and not writing:
            mapping = self._ro.get(region_id)
        if mapping is None or offset + length > mapping.size:
            raise errors.Internal(f"shm server granted region {region_id} unmapped here")
        return mapping

    def clear(self) -> None:
        """Drop every mapping (copies in flight hold their own references)."""
        self._ro.clear()
        self._rw.clear()


async def move(
    loop: asyncio.AbstractEventLoop,
    pairs: Sequence[tuple[Mapping, int, memoryview]],
    writing: bool,
    nbytes: int,
) -> None:
    """Copy between each view and its mapping at the offset (writing: into the mapping), in
    worker threads from OFFLOAD_MIN_BYTES of nbytes on, else here."""
    if nbytes < OFFLOAD_MIN_BYTES:
        for mapping, offset, view in pairs:
            if writing:
                mapping.view[offset : offset + view.nbytes] = view
            else:
                view[:] = mapping.view[offset : offset + view.nbytes]
        return
    pins = [Pinned(view) for _, _, view in pairs]
    try:
        jobs = []
        for (mapping, offset, view), pin in zip(pairs, pins, strict=True):
            at = mapping.address + offset
            jobs.append(
                (at, pin.address, view.nbytes) if writing else (pin.address, at, view.nbytes)
            )
        parts = split_jobs(jobs, COPY_THREADS)
        pool = copy_executor()
        done = asyncio.gather(*(loop.run_in_executor(pool, memmove_all, p) for p in parts))
        await uncancellable(done)
    finally:
        for pin in pins:
            pin.release()


_executor: concurrent.futures.ThreadPoolExecutor | None = None


def copy_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide pool of COPY_THREADS copy workers, started on first use."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            COPY_THREADS, thread_name_prefix="kvtier-shm-copy"
        )
    return _executor


def memmove_all(jobs: Sequence[tuple[int, int, int]]) -> None:
    """Run (dst, src, size) copies between raw addresses; for a worker thread."""
    for dst, src, size in jobs:
        ctypes.memmove(dst, src, size)  # a foreign call: releases the GIL


def split_jobs(jobs: list[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut (dst, src, size) copies into `parts` lists of about equal bytes."""
    share = -(-sum(size for _, _, size in jobs) // parts)
    out: list[list[tuple[int, int, int]]] = [[]]
    room = share
    for dst, src, size in jobs:
        while size > 0:
            if room == 0:
                out.append([])
                room = share
            step = min(size, room)
            out[-1].append((dst, src, step))
            dst, src, size, room = dst + step, src + step, size - step, room - step
    return out


async def uncancellable(future: asyncio.Future[Any]) -> None:
    """Await bytes moving in worker threads; if cancelled, let them land first, then re-raise."""
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise
