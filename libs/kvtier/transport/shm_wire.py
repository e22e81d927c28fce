"""The wire of the shm transport: message formats, status codes, and the channel that passes fds.

The protocol these carry is described in `kvtier.transport.shm`.
"""

from __future__ import annotations

import abc
import array
import asyncio
import collections
import contextlib
import os
import socket
import struct
from collections.abc import Sequence

from kvtier import errors
from kvtier.transport import base

NAME = "shm"
VERSION = 1

# Message types.
HELLO, WELCOME, LEASE, ACK, RELEASE, COMMIT, COMMITTED = range(1, 8)
HEADER = struct.Struct("<BBHI")  # type, flags (need / status / version), count, request id
ITEM = struct.Struct("<IQQBq16s")  # region_id, offset, length, rights, expires_at_ms, mac
ACK_INFO = struct.Struct("<HHHB")  # fds, first error index, message bytes, first error code
FD_ENTRY = struct.Struct("<IQB")  # region_id, size, writable
REQUEST = struct.Struct("<I")
COUNT = struct.Struct("<H")  # releases carried by a LEASE
_CRED = struct.Struct("3i")  # pid, uid, gid

MAX_MESSAGE = 64 * 1024
MAX_ITEMS = 1024  # per LEASE: 1024 * 45 bytes fit a message
MAX_REGIONS = 128  # distinct regions per LEASE, so an ACK never carries more fds than SCM allows
MAX_ERROR_TEXT = 512
NO_ERROR = 0xFFFF

NEEDS = {int(base.Rights.READ): base.Rights.READ, int(base.Rights.WRITE): base.Rights.WRITE}

# Status codes in WELCOME and ACK; 0 is success.
CODES: tuple[type[errors.KVTierError], ...] = (
    base.DescriptorExpired,  # subclasses before their bases: the first match wins
    base.DescriptorRejected,
    errors.PermissionDenied,
    errors.InvalidArgument,
    errors.Unavailable,
    errors.Internal,
)


def code_of(exc: BaseException) -> int:
    """The status code that carries exc (Internal for any error not in CODES)."""
    for index, cls in enumerate(CODES):
        if isinstance(exc, cls):
            return index + 1
    return len(CODES)  # Internal


def error_of(code: int, message: str) -> errors.KVTierError:
    """The error a nonzero status code stands for (Internal when unknown)."""
    cls = CODES[code - 1] if 1 <= code <= len(CODES) else errors.Internal
    return cls(message)


def peer_uid_ok(sock: socket.socket) -> tuple[bool, int]:
    """Whether the kernel says the peer runs as our uid or root."""
    _pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    return uid in (0, os.geteuid()), uid


class Channel(abc.ABC):
    """A non-blocking SEQPACKET socket on the event loop: ordered sends that may carry fds."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.closed = False
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        loop.add_reader(sock.fileno(), self._on_readable)

    @abc.abstractmethod
    def _on_readable(self) -> None:
        """The socket has messages to read."""

    @abc.abstractmethod
    def _broken(self, reason: str) -> None:
        """The socket failed; tear the connection down."""

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one message; the channel owns (and closes) fds once sent."""
        if self.closed:
            close_fds(fds)
            return
        if not self._queue:
            try:
                self._sendmsg(data, fds)
                close_fds(fds)
                return
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
            except OSError as exc:
                close_fds(fds)
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
            close_fds(fds)
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
            close_fds(self._queue.popleft()[1])


def close_fds(fds: Sequence[int]) -> None:
    """Close fds, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def handover_fd(region: base.Region, writable: bool) -> int:
    """A new fd of the region for a peer: read-only unless it must write."""
    if writable:
        return os.dup(region.fd)
    return os.open(f"/proc/self/fd/{region.fd}", os.O_RDONLY | os.O_CLOEXEC)


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds passed (SCM_RIGHTS) in a received message's ancillary data."""
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)
