"""The wire of the tcp transport: frame formats, status codes and the socket channel both sides use.

The protocol these carry is described in `kvtier.transport.tcp`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
import itertools
import logging
import os
import select
import socket
import struct
import time
from typing import Any

from kvtier import errors
from kvtier.transport import base, tcp_tls

log = logging.getLogger(__name__)

NAME = "tcp"

KIB, MIB = 1024, 1024 * 1024
MAGIC = b"KVT2"  # KVT1 had no grant id in REQUEST
HELLO = struct.Struct("<4sH")  # magic, token length
# op, rights, 0, region, id, offset, length, expiry, grant id, mac
REQUEST = struct.Struct("<BBHIQQQqQ16s")
# op, 0, 0, method, id, message length, payload length, segments, capacities (as long as REQUEST)
CALL_REQUEST = struct.Struct("<BBHIQQQII24x")
# CALL_REQUEST whose last 24 bytes carry the caller's sampled span (`kvtier.tracing.wire_context`:
# trace id, span id); all zero, as CALL_REQUEST sends them, when the call is not traced.
CALL_TRACED = struct.Struct("<BBHIQQQII24s")
RESPONSE = struct.Struct("<QB3xIQ")  # request id, status, message length, payload length
READ, WRITE, CALL = 1, 2, 3

SOCKET_BUFFER_BYTES = 4 * MIB
STAGING_BYTES = 16 * KIB  # headers (and small payloads that come with them) land here first
SINK_BYTES = 256 * KIB  # where unwanted payload bytes are drained
MAX_MESSAGE_BYTES = 512
MAX_TOKEN_BYTES = 4 * KIB
_GATHER_ITEMS = 64  # queued frames per sendmsg call
IOV_LIMIT = 1000  # buffers per sendmsg call: the kernel refuses more than IOV_MAX (1024)
RECV_ROUNDS = 64  # recv calls per reader callback, so that one busy connection starves no other


class Status(enum.IntEnum):
    """The status of a RESPONSE; every one but OK stands for an error (see `error_of`).

    Values never change meaning; the ones from NOT_FOUND on carry the errors of call handlers.
    """

    OK = 0
    REJECTED = 1
    EXPIRED = 2
    DENIED = 3
    INVALID = 4
    INTERNAL = 5
    NOT_FOUND = 6
    ALREADY_EXISTS = 7
    PRECONDITION_FAILED = 8
    OVERLOADED = 9
    QUOTA_EXCEEDED = 10
    UNAVAILABLE = 11
    CORRUPT = 12
    UNAUTHENTICATED = 13
    DEADLINE_EXCEEDED = 14
    STALE_EPOCH = 15
    PEER_LOST = 16


# Most specific first: the expired and rejected descriptor errors are PermissionDenied too, and
# PeerLost is Unavailable.
_STATUS_OF: tuple[tuple[type[errors.KVTierError], Status], ...] = (
    (base.DescriptorExpired, Status.EXPIRED),
    (base.DescriptorRejected, Status.REJECTED),
    (errors.PermissionDenied, Status.DENIED),
    (errors.InvalidArgument, Status.INVALID),
    (errors.NotFound, Status.NOT_FOUND),
    (errors.AlreadyExists, Status.ALREADY_EXISTS),
    (errors.PreconditionFailed, Status.PRECONDITION_FAILED),
    (errors.Overloaded, Status.OVERLOADED),
    (errors.QuotaExceeded, Status.QUOTA_EXCEEDED),
    (base.PeerLost, Status.PEER_LOST),
    (errors.Unavailable, Status.UNAVAILABLE),
    (errors.Corrupt, Status.CORRUPT),
    (errors.Unauthenticated, Status.UNAUTHENTICATED),
    (errors.DeadlineExceeded, Status.DEADLINE_EXCEEDED),
    (errors.StaleEpoch, Status.STALE_EPOCH),
    (errors.Internal, Status.INTERNAL),
)
_ERROR_OF: dict[int, type[errors.KVTierError]] = {s: cls for cls, s in _STATUS_OF}


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


def error_response(request_id: int, exc: BaseException) -> bytes:
    """The RESPONSE frame (header and message) that reports exc; logs one that is no
    KVTierError (and keeps its text out of the reply)."""
    status = next((s for cls, s in _STATUS_OF if isinstance(exc, cls)), None)
    if status is None:
        log.error("tcp data plane: request %d failed", request_id, exc_info=exc)
        status, exc = Status.INTERNAL, errors.Internal("internal error in the tcp data plane")
    message = str(exc).encode()[:MAX_MESSAGE_BYTES]
    return RESPONSE.pack(request_id, status, len(message), 0) + message


def error_of(status: int, message: str) -> errors.KVTierError:
    """The error that a non-OK status and its message stand for."""
    return _ERROR_OF.get(status, errors.Internal)(message)


def tune(sock: socket.socket) -> None:
    """Make sock non-blocking, with large buffers and (for TCP) no Nagle delay."""
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Frame:
    """Bytes to send: a header and an optional payload, and how much of them has gone out."""

    __slots__ = ("header", "lease", "payload", "sent", "size")

    def __init__(self, header: bytes, payload: memoryview | None = None, lease: int = 0) -> None:
        self.header = header
        self.payload = payload
        self.lease = lease  # server only: released once the frame is out
        self.sent = 0
        self.size = len(header) + (payload.nbytes if payload is not None else 0)

    def unsent(self, iov: list[bytes | memoryview]) -> int:
        """Append what is left to send to iov; returns its size."""
        head = len(self.header)
        if self.sent < head:
            iov.append(memoryview(self.header)[self.sent :] if self.sent else self.header)
        if self.payload is not None and self.payload.nbytes:
            iov.append(self.payload[self.sent - head :] if self.sent > head else self.payload)
        return self.size - self.sent


class Parts:
    """The buffers of a frame too long or too scattered for header + payload (a call's body
    and segments, or its reply and sources), sent in order without copies."""

    __slots__ = ("_index", "_sizes", "_start", "items", "size")

    def __init__(self, items: list[bytes | memoryview], sizes: list[int] | None = None) -> None:
        """items, and their sizes in bytes when the caller knows them already."""
        self.items = items
        self._sizes = sizes or [len(i) if isinstance(i, bytes) else i.nbytes for i in items]
        self.size = sum(self._sizes)
        self._index = 0  # items before it have gone out; it starts at byte _start of the frame
        self._start = 0

    def unsent(self, iov: list[bytes | memoryview], sent: int) -> int:
        """Append what is left after `sent` bytes to iov, up to IOV_LIMIT buffers in iov;
        returns how many bytes that is."""
        items, sizes = self.items, self._sizes
        while self._index < len(items) and self._start + sizes[self._index] <= sent:
            self._start += sizes[self._index]
            self._index += 1
        index, skip, appended = self._index, sent - self._start, 0
        while index < len(items) and len(iov) < IOV_LIMIT:
            item = items[index]
            iov.append(memoryview(item)[skip:] if skip else item)
            appended += sizes[index] - skip
            index, skip = index + 1, 0
        return appended

    def own(self) -> None:
        """Copy what may not have gone out yet: its owner may reuse the buffers from now on."""
        for index in range(self._index, len(self.items)):
            if not isinstance(self.items[index], bytes):
                self.items[index] = bytes(self.items[index])


class PartsFrame(Frame):
    """A frame sent from its `Parts` (header included)."""

    __slots__ = ("parts",)

    def __init__(self, parts: Parts) -> None:
        super().__init__(b"")
        self.parts = parts
        self.size = parts.size

    def unsent(self, iov: list[bytes | memoryview]) -> int:
        """Append what is left to send to iov (up to IOV_LIMIT buffers); returns its size."""
        return self.parts.unsent(iov, self.sent)


class Channel(abc.ABC):
    """A non-blocking socket driven by loop callbacks: an ordered send queue and a staging buffer.

    Subclasses parse what arrives in `_step` (False when the socket has nothing more for now),
    hear of each frame that went out completely in `_sent`, and clean up in `_lost`. With a
    `tcp_tls.Session` the bytes are encrypted and decrypted on their way (see `tcp_tls`).
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        tls: tcp_tls.Session | None = None,
    ) -> None:
        self.sock = sock
        self._tls = tls
        self.closed = False
        self._fd = sock.fileno()
        self._loop = loop
        self._out: collections.deque[Frame] = collections.deque()
        self._writing = False
        self._reading = False
        self._staging = bytearray(STAGING_BYTES)
        self._view = memoryview(self._staging)
        self._head = 0  # the staged bytes are _staging[_head:_tail]
        self._tail = 0
        self._recvs_left = 0

    @abc.abstractmethod
    def _step(self) -> bool:
        """Parse what has arrived; False when the socket has nothing more for now."""

    def _sent(self, frame: Frame) -> None:  # noqa: B027 - an optional hook, empty by default
        """A frame has gone out completely."""

    @abc.abstractmethod
    def _lost(self, reason: str) -> None:
        """The connection is gone; fail what is pending."""

    def _set_reading(self, on: bool) -> None:
        if on and not self._reading and not self.closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        elif not on and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def poll(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Receive without sleeping until future is done or seconds pass; whether it is done.

        Waking a sleeping event loop costs 25-30 us on our VMs, a large part of a small
        request's round trip: a client that expects a reply soon spins on its socket instead.
        Between two looks it yields its CPU to whatever else is runnable there (on a busy host,
        often the server it waits for): measured on 2 shared vCPUs, a 64 KiB get then costs its
        client ~25 % less CPU at the same p50; on an idle CPU the yield returns at once.
        """
        end = time.perf_counter() + seconds
        while not future.done() and self._reading and time.perf_counter() < end:
            self._on_readable()
            if not future.done():
                os.sched_yield()
        return future.done()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop whose callbacks drive this channel."""
        return self._loop

    @property
    def send_blocked(self) -> bool:
        """Whether queued bytes wait for the socket to drain (only the loop sends them)."""
        return self._writing

    def wait_readable(self, seconds: float) -> None:
        """Sleep until the socket is readable or seconds pass, then take what arrived: outside
        the loop (the synchronous short path; bytes already inside TLS count as readable)."""
        if self._tls is None or self._tls.starved:
            select.select([self._fd], [], [], seconds)
        if self._reading:
            self._on_readable()

    def _on_readable(self) -> None:
        self._recvs_left = RECV_ROUNDS
        try:
            while self._reading and self._step():
                pass
        except (OSError, ProtocolError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("tcp data plane: unexpected error on a connection")
            self._lost("internal error")
        else:
            self.kick()
            tls = self._tls
            if tls is not None and not tls.starved and self._reading and not self.closed:
                # Decrypted or received bytes may wait inside TLS: no readiness would wake us.
                self._loop.call_soon(self._on_readable)

    def kick(self) -> None:
        """Send what is queued now, unless the socket is full (then the writer callback will)."""
        if (self._out or (self._tls is not None and self._tls.cipher)) and not self._writing:
            self.flush()

    def flush(self) -> None:
        """Send queued frames until none is left or the socket is full (then wait for writable)."""
        if self._tls is not None:
            self._flush_tls(self._tls)
            return
        out = self._out
        while out and not self.closed:
            iov: list[bytes | memoryview] = []
            wanted = 0
            for frame in out if len(out) <= _GATHER_ITEMS else itertools.islice(out, _GATHER_ITEMS):
                wanted += frame.unsent(iov)
                if len(iov) >= IOV_LIMIT:
                    break  # a frame of many parts may not have fit: what follows must wait
            try:
                sent = self.sock.sendmsg(iov)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                return
            self._advance(sent)
            if sent < wanted:
                if not self._writing and not self.closed:
                    self._loop.add_writer(self._fd, self.flush)
                    self._writing = True
                return
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _flush_tls(self, tls: tcp_tls.Session) -> None:
        """flush() over TLS: encrypt up to tcp_tls.CHUNK_BYTES of queued frames at a time (they
        count as sent once encrypted) and send the ciphertext."""
        out = self._out
        while not self.closed:
            if not tls.cipher:
                if not out:
                    break
                iov: list[bytes | memoryview] = []
                for frame in itertools.islice(out, _GATHER_ITEMS):
                    frame.unsent(iov)
                    if len(iov) >= IOV_LIMIT:
                        break
                chunk, room = [], tcp_tls.CHUNK_BYTES
                for buf in iov:
                    view = memoryview(buf)
                    chunk.append(view[:room])
                    room -= min(view.nbytes, room)
                    if not room:
                        break
                taken = tls.encrypt(chunk)
                if not taken:
                    break
                self._advance(taken)
            try:
                done = tls.send(self.sock)
            except OSError as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                return
            if not done:
                if not self._writing and not self.closed:
                    self._loop.add_writer(self._fd, self.flush)
                    self._writing = True
                return
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _advance(self, sent: int) -> None:
        out = self._out
        while sent and out:
            frame = out[0]
            left = frame.size - frame.sent
            if sent < left:
                frame.sent += sent
                return
            sent -= left
            frame.sent = frame.size
            out.popleft()
            self._sent(frame)

    def _fill(self, limit: int = STAGING_BYTES) -> bool:
        """Receive up to limit more bytes into staging; False when none are there yet."""
        if self._head == self._tail:
            self._head = self._tail = 0
        elif STAGING_BYTES - self._tail < HELLO.size + MAX_TOKEN_BYTES:
            # Only an incomplete header (or HELLO) is staged here: moving it is cheap.
            staged = self._tail - self._head
            self._view[:staged] = self._view[self._head : self._tail]
            self._head, self._tail = 0, staged
        room = min(STAGING_BYTES - self._tail, limit)
        got = self._recv(self._view[self._tail : self._tail + room])
        self._tail += got
        return got > 0

    def _recv(self, into: memoryview) -> int:
        """recv_into; 0 when nothing is there yet; ConnectionResetError at the end of the stream."""
        if self._recvs_left <= 0:
            return 0  # let other connections go first: the reader callback will come back
        self._recvs_left -= 1
        if self._tls is not None:
            return self._tls.recv_into(self.sock, into)  # staged TLS bytes need no readiness
        try:
            got = self.sock.recv_into(into)
        except BlockingIOError:
            return 0
        if got == 0:
            raise ConnectionResetError("peer closed the connection")
        if got < into.nbytes:
            self._recvs_left = 0  # drained: skip the EAGAIN round trip, readiness brings us back
        return got

    def _unstage(self, into: memoryview | None, limit: int) -> int:
        """Move up to limit staged bytes into `into` (None: drop them); returns how many."""
        count = min(self._tail - self._head, limit)
        if into is not None:
            into[:count] = self._view[self._head : self._head + count]
        self._head += count
        return count

    def _shut(self) -> None:
        """Stop the callbacks and close the socket; the caller fails or frees what was queued."""
        self._set_reading(False)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self.closed = True
        self._out.clear()
        self.sock.close()
