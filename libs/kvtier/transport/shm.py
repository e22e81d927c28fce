"""The same-host data plane: peers map the owner's memfd regions and copy with memcpy.

Protocol, over a Unix SOCK_SEQPACKET socket (one message per send, fds travel with it):

    client                                       server
    HELLO token                        ->        check_token, SO_PEERCRED uid == ours or 0
                                       <-        WELCOME ok | error code + message
    LEASE need, [descriptor...]        ->        issuer.check each; leases.acquire the good ones
                                       <-        ACK per-item status, first error, fds of regions
                                                 this connection has not been handed yet
    (memcpy between the caller's buffer and the mapping, no intermediate bytes)
    RELEASE [request...]  (reads)      ->        leases of those requests end (no reply)
    COMMIT request        (writes)     ->        leases end
                                       <-        COMMITTED: write() returns only after this

Control messages are small fixed structs. A region's fd is passed once per connection (SCM_RIGHTS)
and mapped once; a client that has only leased for reading gets a read-only fd (reopened through
/proc/self/fd) and a read-only mapping, so a stray write by a buggy reader faults instead of
corrupting the pool; a writable fd follows on its first write lease.

Trust model: shm peers are same-host processes of the same uid (or root). Leases and descriptors are
enforced by this protocol, but a malicious local process holding a mapping could touch other ranges
of a region it was handed (or reopen a read-only memfd writable through /proc; same-uid processes
can ptrace each other anyway). The fd is only given to a peer that presented a valid token over a
socket in a 0700 directory, and whose uid the kernel vouches for (SO_PEERCRED).

Performance (measured on the 2-vCPU VMs we run on; numbers in the constants' comments):
- Batches are leased in windows (<= 16 MiB, <= the client's byte budget), up to _DEPTH ahead.
- Copies of windows of at least _OFFLOAD_MIN_BYTES run in worker threads (ctypes.memmove releases
  the GIL), split across _COPY_THREADS, so the loop stays free; two threads beat one by ~10-20%
  there. Smaller copies are memoryview slice assignments on the loop: a hand-off to an idle worker
  costs more than it saves.
- Pending RELEASEs ride on the next LEASE; a client polls briefly for its reply (_POLL_S).
- Mappings are not prefaulted (MAP_POPULATE costs ~140 ms/GiB on the loop); pages fault in once.
- Deadlines ride on the awaited replies (one sweep timer per connection), not a timer per op.
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import mmap
import os
import secrets
import shutil
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

log = logging.getLogger(__name__)

NAME = "shm"
_VERSION = 1

# Message types.
_HELLO, _WELCOME, _LEASE, _ACK, _RELEASE, _COMMIT, _COMMITTED = range(1, 8)
_HEADER = struct.Struct("<BBHI")  # type, flags (need / status / version), count, request id
_ITEM = struct.Struct("<IQQBq16s")  # region_id, offset, length, rights, expires_at_ms, mac
_ACK_INFO = struct.Struct("<HHHB")  # fds, first error index, message bytes, first error code
_FD_ENTRY = struct.Struct("<IQB")  # region_id, size, writable
_REQUEST = struct.Struct("<I")
_COUNT = struct.Struct("<H")  # releases carried by a LEASE
_CRED = struct.Struct("3i")  # pid, uid, gid

_MAX_MESSAGE = 64 * 1024
_MAX_ITEMS = 1024  # per LEASE: 1024 * 45 bytes fit a message
_MAX_REGIONS = 128  # distinct regions per LEASE, so an ACK never carries more fds than SCM allows
_MAX_ERROR_TEXT = 512
_NO_ERROR = 0xFFFF
_WINDOW_BYTES = 16 * 1024 * 1024  # bytes leased per round trip (a larger single range goes alone)
_DEPTH = 4  # leased windows outstanding per operation
_OFFLOAD_MIN_BYTES = 8 * 1024 * 1024
_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_HELLO_TIMEOUT_S = 10.0
# A client polls its socket this long for a reply before sleeping in the event loop: waking an
# idle vCPU costs 25-30 us per hop on the VMs we run on, half of a 64 KiB read. After
# _POLL_MISSES misses in a row (say, the server shares its event loop) it pauses polling for
# _POLL_PAUSE replies.
_POLL_S = 100e-6
_POLL_MISSES = 8
_POLL_PAUSE = 1024
_NEEDS = {int(base.Rights.READ): base.Rights.READ, int(base.Rights.WRITE): base.Rights.WRITE}

# Status codes in WELCOME and ACK; 0 is success.
_CODES: tuple[type[errors.KVTierError], ...] = (
    base.DescriptorExpired,  # subclasses before their bases: the first match wins
    base.DescriptorRejected,
    errors.PermissionDenied,
    errors.InvalidArgument,
    errors.Unavailable,
    errors.Internal,
)


def available() -> bool:
    """Linux with memfd regions and fd passing over Unix sockets."""
    return (
        sys.platform == "linux"
        and hasattr(os, "memfd_create")
        and hasattr(socket, "SCM_RIGHTS")
        and hasattr(socket, "SOCK_SEQPACKET")
    )


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> Server:
    """The shm server of a node (not yet listening)."""
    return Server(ctx, settings)


def _code(exc: BaseException) -> int:
    for index, cls in enumerate(_CODES):
        if isinstance(exc, cls):
            return index + 1
    return len(_CODES)  # Internal


def _error(code: int, message: str) -> errors.KVTierError:
    cls = _CODES[code - 1] if 1 <= code <= len(_CODES) else errors.Internal
    return cls(message)


def _peer_uid_ok(sock: socket.socket) -> tuple[bool, int]:
    """Whether the kernel says the peer runs as our uid or root."""
    _pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    return uid in (0, os.geteuid()), uid


class _Channel:
    """A non-blocking SEQPACKET socket on the event loop: ordered sends that may carry fds."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.closed = False
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _broken(self, reason: str) -> None:
        raise NotImplementedError

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one message; the channel owns (and closes) fds once sent."""
        if self.closed:
            _close_fds(fds)
            return
        if not self._queue:
            try:
                self._sendmsg(data, fds)
                _close_fds(fds)
                return
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
            except OSError as exc:
                _close_fds(fds)
                self._broken(f"send failed: {exc}")
                return
        self._queue.append((bytes(data), list(fds)))

    def _sendmsg(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self.sock.sendmsg([data], anc)
        else:
            self.sock.send(data)

    def _on_writable(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                self._sendmsg(data, fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self._broken(f"send failed: {exc}")
                return
            self._queue.popleft()
            _close_fds(fds)
        self.loop.remove_writer(self.sock.fileno())

    def shutdown(self) -> None:
        """Stop watching and close the socket; drops unsent messages. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._queue:
            _close_fds(self._queue.popleft()[1])


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _ServerConnection(_Channel):
    """One client's connection: its principal, its leases, the regions it has been handed."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._ctx = server.ctx
        self.principal: str | None = None
        self._held: dict[int, list[int]] = {}  # request id -> lease ids
        self._handed: dict[int, bool] = {}  # region id -> writable fd handed
        self._rbuf = bytearray(_MAX_MESSAGE)
        self._rview = memoryview(self._rbuf)
        super().__init__(sock, asyncio.get_running_loop())
        self._hello_timer: asyncio.TimerHandle | None = self.loop.call_later(
            _HELLO_TIMEOUT_S, self._broken, "no HELLO in time"
        )

    def reject(self, exc: errors.KVTierError) -> None:
        """Tell the client why it is refused, then hang up."""
        text = exc.message.encode()[:_MAX_ERROR_TEXT]
        self.send(_HEADER.pack(_WELCOME, _code(exc), len(text), 0) + text)
        self.close()

    def _on_readable(self) -> None:
        # One message per call: readiness is level-triggered, and a drain loop would end in a
        # wasted EAGAIN syscall on every small request.
        try:
            size = self.sock.recv_into(self._rbuf, 0, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(f"receive failed: {exc}")
            return
        if size == 0:
            self.close()
        elif size > len(self._rbuf) or size < _HEADER.size:
            self._broken(f"bad message of {size} bytes")
        else:
            try:
                self._dispatch(self._rview[:size])
            except (struct.error, ValueError) as exc:
                self._broken(f"malformed message: {exc}")
            except Exception:  # a reader callback is a boundary: log, drop this client only
                log.exception("shm connection of %s failed", self.principal or "?")
                self.close()

    def _dispatch(self, msg: memoryview) -> None:
        kind, flags, count, request = _HEADER.unpack_from(msg)
        if kind == _HELLO and self.principal is None:
            self._hello(flags, bytes(msg[_HEADER.size : _HEADER.size + count]))
        elif self.principal is None:
            self._broken(f"message {kind} before HELLO")
        elif kind == _LEASE:
            (releases,) = _COUNT.unpack_from(msg, _HEADER.size)
            start = _HEADER.size + _COUNT.size
            self._release_all(msg, start, releases)
            self._lease(flags, count, request, msg, start + _REQUEST.size * releases)
        elif kind == _RELEASE:
            self._release_all(msg, _HEADER.size, count)
            if len(msg) != _HEADER.size + _REQUEST.size * count:
                raise ValueError(f"RELEASE of {count} requests in {len(msg)} bytes")
        elif kind == _COMMIT:
            self._release(request)
            self.send(_HEADER.pack(_COMMITTED, 0, 0, request))
        else:
            self._broken(f"unexpected message type {kind}")

    def _hello(self, version: int, token: bytes) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if version != _VERSION:
            self.reject(errors.InvalidArgument(f"shm protocol {version} unsupported"))
            return
        try:
            principal = self._ctx.issuer.check_token(token)
        except errors.PermissionDenied as exc:
            self.reject(exc)
            return
        self.principal = principal
        self.send(_HEADER.pack(_WELCOME, 0, 0, 0))

    def _release_all(self, msg: memoryview, start: int, count: int) -> None:
        for (request,) in _REQUEST.iter_unpack(msg[start : start + _REQUEST.size * count]):
            self._release(request)

    def _lease(self, flags: int, count: int, request: int, msg: memoryview, start: int) -> None:
        assert self.principal is not None
        need = _NEEDS.get(flags)
        if need is None or not 0 < count <= _MAX_ITEMS:
            raise ValueError(f"LEASE of {count} items needing {flags}")
        ctx, end = self._ctx, start + _ITEM.size * count
        if len(msg) != end:
            raise ValueError(f"LEASE of {count} items in {len(msg)} bytes")
        writable = need is base.Rights.WRITE
        statuses = bytearray(count)
        first, first_text, leases = _NO_ERROR, b"", []
        fd_entries: list[bytes] = []
        fds: list[int] = []
        for index, fields in enumerate(_ITEM.iter_unpack(msg[start:end])):
            region_id, offset, length, rights, expires_at_ms, mac = fields
            try:
                region = ctx.issuer.check(
                    ctx.regions, self.principal, need, region_id, offset, length, rights,
                    expires_at_ms, mac,
                )  # fmt: skip
            except errors.KVTierError as exc:
                statuses[index] = _code(exc)
                if first == _NO_ERROR:
                    first, first_text = index, exc.message.encode()[:_MAX_ERROR_TEXT]
                continue
            leases.append(ctx.leases.acquire(region_id, offset, length, self, expires_at_ms))
            if region_id not in self._handed or (writable and not self._handed[region_id]):
                fds.append(_handover_fd(region, writable))
                fd_entries.append(_FD_ENTRY.pack(region_id, region.size, writable))
                self._handed[region_id] = writable
        if leases:
            self._held[request] = leases
        code = statuses[first] if first != _NO_ERROR else 0
        info = _ACK_INFO.pack(len(fds), first, len(first_text), code)
        header = _HEADER.pack(_ACK, 0, count, request)
        self.send(b"".join((header, info, statuses, *fd_entries, first_text)), fds)

    def _release(self, request: int) -> None:
        for lease_id in self._held.pop(request, ()):
            self._ctx.leases.release(lease_id)

    def _broken(self, reason: str) -> None:
        if not self.closed:
            log.warning("shm connection of %s dropped: %s", self.principal or "?", reason)
        self.close()

    def close(self) -> None:
        """Hang up and end every lease of this connection. Idempotent."""
        if self.closed:
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.shutdown()
        self._held.clear()
        self._ctx.leases.release_owner(self)
        self._server.forget(self)


def _handover_fd(region: base.Region, writable: bool) -> int:
    """A new fd of the region for a peer: read-only unless it must write."""
    if writable:
        return os.dup(region.fd)
    return os.open(f"/proc/self/fd/{region.fd}", os.O_RDONLY | os.O_CLOEXEC)


class Server:
    """Serves a node's regions to same-host clients over a Unix socket in a private directory."""

    name: ClassVar[str] = NAME

    def __init__(self, ctx: base.ServerContext, settings: registry.ServerSettings) -> None:
        self.ctx = ctx
        self._settings = settings
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_ServerConnection] = set()
        self._path = ""
        self._owned_dir = ""

    async def start(self) -> common_pb2.TransportEndpoint:
        """Listen on `<shm_dir>/shm-<random>.sock` (mode 0600); returns its path."""
        directory = self._settings.shm_dir
        if not directory:
            directory = self._owned_dir = registry.private_dir()
        elif os.stat(directory).st_mode & 0o022:
            log.warning("shm directory %s is writable by others; use a private one", directory)
        self._path = os.path.join(directory, f"shm-{secrets.token_hex(8)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self._path)
            os.chmod(self._path, 0o600)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener, self._loop = listener, asyncio.get_running_loop()
        self._loop.add_reader(listener.fileno(), self._on_accept)
        return common_pb2.TransportEndpoint(name=NAME, address=self._path)

    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("shm accept failed: %s", exc)
                return
            sock.setblocking(False)
            conn = _ServerConnection(self, sock)
            self._conns.add(conn)
            trusted, uid = _peer_uid_ok(sock)
            if not trusted:
                log.warning("shm client with uid %d refused", uid)
                conn.reject(errors.PermissionDenied(f"peer uid {uid} may not use this shm"))

    def forget(self, conn: _ServerConnection) -> None:
        """A connection closed."""
        self._conns.discard(conn)

    async def stop(self) -> None:
        """Stop listening, hang up every client (their leases end). Idempotent."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        for conn in list(self._conns):
            conn.close()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = ""

    def connection_count(self) -> int:
        """Open client connections."""
        return len(self._conns)


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


class _Pinned:
    """A buffer export held open, so its address stays valid while a worker thread copies."""

    __slots__ = ("_view", "address")

    def __init__(self, obj: object) -> None:
        view = _PyBuffer()
        _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE: contiguous bytes
        self._view: _PyBuffer | None = view
        self.address = int(view.buf or 0)

    def release(self) -> None:
        if self._view is not None:
            _release_buffer(ctypes.byref(self._view))
            self._view = None

    def __del__(self) -> None:
        self.release()


class _Mapping:
    """A client's mapping of one region; unmapped when the last reference (copy, table) goes."""

    __slots__ = ("_map", "_pin", "address", "size", "view")

    def __init__(self, fd: int, size: int, writable: bool) -> None:
        # No MAP_POPULATE: it costs ~140 ms per GiB on the event loop. Pages fault in on first
        # touch instead (+0.3 ms per 2 MiB read, +1 ms per 2 MiB write, once per connection).
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        view = memoryview(self._map)  # writable even for PROT_READ maps: a write would segfault
        self.view = view if writable else view.toreadonly()
        self._pin = _Pinned(self.view)
        self.address, self.size = self._pin.address, size


_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _copy_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            _COPY_THREADS, thread_name_prefix="kvtier-shm-copy"
        )
    return _executor


def _memmove_all(jobs: Sequence[tuple[int, int, int]]) -> None:
    for dst, src, size in jobs:
        ctypes.memmove(dst, src, size)  # a foreign call: releases the GIL


def _split_jobs(jobs: list[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
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


@dataclass(slots=True)
class _Ack:
    statuses: bytes
    error: errors.KVTierError | None
    granted: bool


@dataclass(slots=True)
class _Window:
    descs: Sequence[base.Descriptor]
    views: Sequence[memoryview]
    nbytes: int
    request: int = 0
    ack: asyncio.Future[_Ack] | None = field(default=None)


def _windows(
    descs: Sequence[base.Descriptor], views: Sequence[memoryview], max_bytes: int
) -> list[_Window]:
    """Cut a batch into windows of at most max_bytes (or one larger range), _MAX_ITEMS ranges
    and _MAX_REGIONS regions."""
    if len(descs) == 1:
        return [_Window(descs, views, descs[0].length)]
    out, start, nbytes, regions = [], 0, 0, set[int]()
    for index, desc in enumerate(descs):
        full = index - start >= _MAX_ITEMS or len(regions) >= _MAX_REGIONS
        if index > start and (full or nbytes + desc.length > max_bytes):
            out.append(_Window(descs[start:index], views[start:index], nbytes))
            start, nbytes, regions = index, 0, set()
        nbytes += desc.length
        regions.add(desc.region_id)
    out.append(_Window(descs[start:], views[start:], nbytes))
    return out


class Client:
    """A connection to one same-host peer: lease over the socket, copy through the mapping."""

    name: ClassVar[str] = NAME

    def __init__(self, sock: socket.socket, settings: registry.ClientSettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = settings.timeout_s
        self._budget = base.ByteBudget(settings.max_inflight_bytes)
        self._channel = _ClientChannel(self, sock, self._loop)
        # Request id -> (reply future, deadline on the loop clock), swept every _sweep_s.
        self._pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self._sweep_s = min(max(self._timeout_s / 10, 0.001), 0.1)
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_request = 1
        self._maps: dict[int, _Mapping] = {}
        self._rw_maps: dict[int, _Mapping] = {}
        self._releases: list[int] = []
        self._lost: errors.KVTierError | None = None
        self._poll_misses = 0
        self._poll_pause = 0

    async def read(self, desc: base.Descriptor, into: Any) -> None:
        """Copy the described range into `into` (len == desc.length)."""
        views = [base.as_buffer(into, writable=True)]
        base.check_sizes([desc], views)
        await self._transfer(base.Rights.READ, [desc], views)

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """Copy `data` into the described range; the server has seen it when this returns."""
        views = [base.as_buffer(data, writable=False)]
        base.check_sizes([desc], views)
        await self._transfer(base.Rights.WRITE, [desc], views)

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, leased a window at a time; all complete or the first error is raised."""
        views = [base.as_buffer(into, writable=True) for into in intos]
        base.check_sizes(descs, views)
        await self._transfer(base.Rights.READ, descs, views)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, leased a window at a time; all complete or the first error is raised."""
        views = [base.as_buffer(data, writable=False) for data in datas]
        base.check_sizes(descs, views)
        await self._transfer(base.Rights.WRITE, descs, views)

    async def close(self) -> None:
        """Hang up (the server ends our leases); pending operations raise PeerLost. Idempotent."""
        self._lose(base.PeerLost("shm connection closed by the client"))

    async def _hello(self, token: bytes) -> None:
        """Present the token; PermissionDenied when the server refuses us."""
        future = self._expect(0, self._loop.time() + self._timeout_s)
        self._channel.send(_HEADER.pack(_HELLO, _VERSION, len(token), 0) + token)
        await future

    async def _transfer(
        self, need: base.Rights, descs: Sequence[base.Descriptor], views: Sequence[memoryview]
    ) -> None:
        # The deadline rides on every reply this operation awaits (see _sweep) instead of an
        # asyncio.timeout per operation, which costs a timer each (5 us, a tenth of a 64 KiB read).
        if descs:
            windows = _windows(descs, views, min(_WINDOW_BYTES, self._budget.limit_bytes))
            await self._pipeline(need, windows, self._loop.time() + self._timeout_s)

    async def _pipeline(self, need: base.Rights, windows: list[_Window], deadline: float) -> None:
        """Lease up to _DEPTH windows ahead (within the byte budget) and copy them in order."""
        inflight: collections.deque[_Window] = collections.deque()
        commits: list[asyncio.Future[Any]] = []
        first: errors.KVTierError | None = None
        budget = self._budget
        try:
            for window in windows:
                while inflight and (
                    len(inflight) >= _DEPTH
                    or budget.used_bytes + window.nbytes > budget.limit_bytes
                ):
                    error = await self._complete(need, inflight.popleft(), commits, deadline)
                    first = first or error
                await self._reserve(window.nbytes, deadline)
                inflight.append(window)
                self._lease(need, window, deadline)
            while inflight:
                error = await self._complete(need, inflight.popleft(), commits, deadline)
                first = first or error
            for commit in commits:
                self._poll(commit)
                await commit
        finally:
            for window in inflight:
                self._let_go(window)
                await budget.release(window.nbytes)
        if first is not None:
            raise first

    async def _reserve(self, nbytes: int, deadline: float) -> None:
        """Take bytes from the budget; a wait for other operations has our deadline too."""
        budget = self._budget
        if budget.used_bytes == 0 or budget.used_bytes + nbytes <= budget.limit_bytes:
            await budget.acquire(nbytes)  # fits: returns without waiting
            return
        try:
            async with asyncio.timeout_at(deadline):
                await budget.acquire(nbytes)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"shm transfer waited {self._timeout_s}s for in-flight bytes"
            ) from None

    def _lease(self, need: base.Rights, window: _Window, deadline: float) -> None:
        self._check_open()
        releases = min(len(self._releases), _MAX_ITEMS)  # ride along: no message of their own
        count, pos = len(window.descs), _HEADER.size + _COUNT.size + _REQUEST.size * releases
        msg = bytearray(pos + _ITEM.size * count)
        try:
            for d in window.descs:
                _ITEM.pack_into(
                    msg, pos, d.region_id, d.offset, d.length, int(d.rights), d.expires_at_ms, d.mac
                )
                pos += _ITEM.size
        except struct.error as exc:
            raise base.DescriptorRejected(f"descriptor field out of range: {exc}") from None
        request = self._next_request
        self._next_request = request % 0xFFFF_FFFF + 1
        _HEADER.pack_into(msg, 0, _LEASE, int(need), count, request)
        _COUNT.pack_into(msg, _HEADER.size, releases)
        for index in range(releases):
            at = _HEADER.size + _COUNT.size + _REQUEST.size * index
            _REQUEST.pack_into(msg, at, self._releases[index])
        del self._releases[:releases]
        window.request, window.ack = request, self._expect(request, deadline)
        self._channel.send(msg)

    async def _complete(
        self,
        need: base.Rights,
        window: _Window,
        commits: list[asyncio.Future[Any]],
        deadline: float,
    ) -> errors.KVTierError | None:
        """Copy one leased window, release (reads) or commit (writes) its leases, and return its
        bytes to the budget; returns the window's first error."""
        committed = False
        try:
            assert window.ack is not None
            self._poll(window.ack)
            ack = await window.ack
            if ack.granted:
                self._check_open()
                await self._copy(need, window, ack.statuses)
                self._check_open()  # reads: the lease may have ended while we copied
                if need is base.Rights.WRITE:
                    commits.append(self._expect(window.request, deadline))
                    self._channel.send(_HEADER.pack(_COMMIT, 0, 0, window.request))
                    committed = True
            return ack.error
        finally:
            if not committed:
                self._let_go(window)
            await self._budget.release(window.nbytes)

    def _let_go(self, window: _Window) -> None:
        """End a window's leases (if granted); an ack still on its way is ignored."""
        if window.ack is None:
            return
        self._pending.pop(window.request, None)
        if not window.ack.done():
            window.ack.cancel()
        elif not window.ack.cancelled():
            window.ack.exception()  # seen: the error that matters is raised elsewhere
        if self._lost is None:
            if not self._releases:
                self._loop.call_soon(self._flush_releases)
            self._releases.append(window.request)

    async def _copy(self, need: base.Rights, window: _Window, statuses: bytes) -> None:
        writing = need is base.Rights.WRITE
        pairs: list[tuple[_Mapping, base.Descriptor, memoryview]] = []
        for status, desc, view in zip(statuses, window.descs, window.views, strict=True):
            if status == 0:
                mapping = self._rw_maps.get(desc.region_id)
                if mapping is None and not writing:
                    mapping = self._maps.get(desc.region_id)
                if mapping is None or desc.offset + desc.length > mapping.size:
                    raise errors.Internal(
                        f"shm server granted region {desc.region_id} unmapped here"
                    )
                pairs.append((mapping, desc, view))
        if window.nbytes < _OFFLOAD_MIN_BYTES:
            for mapping, desc, view in pairs:
                if writing:
                    mapping.view[desc.offset : desc.offset + desc.length] = view
                else:
                    view[:] = mapping.view[desc.offset : desc.offset + desc.length]
            return
        await self._copy_in_threads(pairs, writing)

    async def _copy_in_threads(
        self, pairs: list[tuple[_Mapping, base.Descriptor, memoryview]], writing: bool
    ) -> None:
        pins = [_Pinned(view) for _, _, view in pairs]
        try:
            jobs = []
            for (mapping, desc, _), pin in zip(pairs, pins, strict=True):
                at = mapping.address + desc.offset
                jobs.append(
                    (at, pin.address, desc.length) if writing else (pin.address, at, desc.length)
                )
            pool = _copy_executor()
            parts = _split_jobs(jobs, _COPY_THREADS)
            done = asyncio.gather(
                *(self._loop.run_in_executor(pool, _memmove_all, p) for p in parts)
            )
            await _uncancellable(done)
        finally:
            for pin in pins:
                pin.release()

    def _flush_releases(self) -> None:
        pending, self._releases = self._releases, []
        if self._lost is not None:
            return
        for start in range(0, len(pending), _MAX_ITEMS):
            chunk = pending[start : start + _MAX_ITEMS]
            body = struct.pack(f"<{len(chunk)}I", *chunk)
            self._channel.send(_HEADER.pack(_RELEASE, 0, len(chunk), 0) + body)

    def _poll(self, reply: asyncio.Future[Any]) -> None:
        """Poll briefly for a reply that is not in yet (see _POLL_S)."""
        if reply.done():
            return
        if self._poll_pause:
            self._poll_pause -= 1
        elif self._channel.poll(reply, _POLL_S):
            self._poll_misses = 0
        else:
            self._poll_misses += 1
            if self._poll_misses >= _POLL_MISSES:
                self._poll_misses, self._poll_pause = 0, _POLL_PAUSE

    def _expect(self, request: int, deadline: float) -> asyncio.Future[Any]:
        """A future for the server's reply to request, failed by _sweep after deadline."""
        self._check_open()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[request] = (future, deadline)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)
        return future

    def _sweep(self) -> None:
        """Fail replies past their deadline (DeadlineExceeded); runs while any are pending."""
        now = self._loop.time()
        late = [request for request, (_, deadline) in self._pending.items() if deadline <= now]
        for request in late:
            _fail(
                self._pending.pop(request)[0],
                errors.DeadlineExceeded(f"shm server gave no answer within {self._timeout_s}s"),
            )
        self._sweeper = None
        if self._pending and self._lost is None:
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)

    def _check_open(self) -> None:
        if self._lost is not None:
            raise type(self._lost)(self._lost.message)

    def _lose(self, exc: errors.KVTierError) -> None:
        """The connection is gone: fail everything pending, drop mappings. Idempotent."""
        if self._lost is not None:
            return
        self._lost = exc
        self._channel.shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            _fail(future, type(exc)(exc.message))
        # Copies in flight hold their own references; the memory goes with the last one.
        self._maps.clear()
        self._rw_maps.clear()

    def _on_message(self, msg: memoryview, fds: list[int]) -> None:
        """A message from the server (its fds are ours to close)."""
        kind, flags, count, request = _HEADER.unpack_from(msg)
        if kind == _ACK:
            result: object = self._on_ack(msg, count, fds)
        elif kind == _WELCOME:
            text = bytes(msg[_HEADER.size : _HEADER.size + count]).decode(errors="replace")
            result = _error(flags, text) if flags else None
        elif kind == _COMMITTED:
            result = None
        else:
            _close_fds(fds)
            raise ValueError(f"unexpected message type {kind}")
        entry = self._pending.pop(request, None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if isinstance(result, errors.KVTierError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _on_ack(self, msg: memoryview, count: int, fds: list[int]) -> _Ack:
        pos = _HEADER.size
        n_fds, first, text_bytes, code = _ACK_INFO.unpack_from(msg, pos)
        pos += _ACK_INFO.size
        statuses = bytes(msg[pos : pos + count])
        pos += count
        if n_fds != len(fds):
            _close_fds(fds)
            raise ValueError(f"ACK names {n_fds} fds but carries {len(fds)}")
        for fd in fds:
            region_id, size, writable = _FD_ENTRY.unpack_from(msg, pos)
            pos += _FD_ENTRY.size
            try:
                table = self._rw_maps if writable else self._maps
                table[region_id] = _Mapping(fd, size, bool(writable))
            finally:
                os.close(fd)
        text = bytes(msg[pos : pos + text_bytes]).decode(errors="replace")
        error = _error(code, text) if first != _NO_ERROR else None
        return _Ack(statuses, error, 0 in statuses)


def _fail(future: asyncio.Future[Any], exc: errors.KVTierError) -> None:
    """Fail a reply; marked as seen, since abandoned windows' replies are never awaited."""
    if not future.done():
        future.set_exception(exc)
        future.exception()


async def _uncancellable(future: asyncio.Future[Any]) -> None:
    """Await bytes moving in worker threads; if cancelled, let them land first, then re-raise."""
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise


class _ClientChannel(_Channel):
    """Receives with recvmsg so that region fds arrive with their ACK."""

    def __init__(
        self, client: Client, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._client = client
        self._rbuf = bytearray(_MAX_MESSAGE)
        self._rview = memoryview(self._rbuf)
        self._anc = socket.CMSG_SPACE(_MAX_REGIONS * 4)
        self._breaking = False
        super().__init__(sock, loop)

    def poll(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Receive without sleeping until future is done or seconds pass; whether it is done."""
        end = time.perf_counter() + seconds
        while not future.done() and not self.closed and time.perf_counter() < end:
            self._on_readable()
        return future.done()

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:  # one message per call, as on the server
            size, anc, flags, _ = self.sock.recvmsg_into(
                [self._rbuf], self._anc, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(f"receive failed: {exc}")
            return
        fds = _fds_of(anc) if anc else []
        if size == 0 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or size < _HEADER.size:
            _close_fds(fds)
            self._broken("server hung up" if size == 0 else f"bad message of {size} bytes")
            return
        try:
            self._client._on_message(self._rview[:size], fds)
        except (struct.error, ValueError, OSError) as exc:
            self._broken(f"bad message from server: {exc}")
        except Exception:  # a reader callback is a boundary: log, fail this connection only
            log.exception("shm client connection failed")
            self._broken("internal error")

    def _broken(self, reason: str) -> None:
        if self._breaking:
            return
        self._breaking = True
        self._on_readable()  # a refusing server says why, then hangs up: deliver that first
        self._client._lose(base.PeerLost(f"shm peer lost: {reason}"))


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> Client:
    """Connect to a same-host peer's shm endpoint and authenticate.

    Raises PermissionDenied (token or uid refused), Unavailable (no server there),
    DeadlineExceeded (no answer within settings.timeout_s).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    client: Client | None = None
    try:
        async with asyncio.timeout(settings.timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, endpoint.address)
            trusted, uid = _peer_uid_ok(sock)
            if not trusted:
                raise errors.PermissionDenied(f"shm server runs as uid {uid}, not ours or root")
            client = Client(sock, settings)
            await client._hello(token)
    except BaseException as exc:
        if client is not None:
            await client.close()
        sock.close()
        if isinstance(exc, TimeoutError):
            raise errors.DeadlineExceeded(f"shm connect to {endpoint.address} timed out") from None
        if isinstance(exc, PermissionError):
            raise errors.PermissionDenied(f"shm socket {endpoint.address}: {exc}") from None
        if isinstance(exc, FileNotFoundError | ConnectionError):
            raise errors.Unavailable(f"shm socket {endpoint.address}: {exc}") from None
        raise
    return client
