"""The wire of the shm transport: message formats, status codes, and the channel that passes fds.

The protocol these carry is described in `kvtier.transport.shm`.
"""

from __future__ import annotations

import abc
import array
import asyncio
import collections
import contextlib
import dataclasses
import os
import socket
import struct
from collections.abc import Sequence

from kvtier import errors
from kvtier.transport import base

NAME = "shm"
VERSION = 2  # 1 had no grant id in ITEM

# Message types.
HELLO, WELCOME, LEASE, ACK, RELEASE, COMMIT, COMMITTED = range(1, 8)
CALL, SINKS, CALL_DONE, CALL_REPLY, MORE = range(8, 13)
HEADER = struct.Struct("<BBHI")  # type, flags (need / status / version), count, request id
ITEM = struct.Struct("<IQQBqQ16s")  # region_id, offset, length, rights, expires_at_ms, grant, mac
ACK_INFO = struct.Struct("<HHHB")  # fds, first error index, message bytes, first error code
FD_ENTRY = struct.Struct("<IQB")  # region_id, size, writable
REQUEST = struct.Struct("<I")
COUNT = struct.Struct("<H")  # releases carried by a LEASE
LONG = struct.Struct("<II")  # body bytes, fds in all: the first message of a long one (calls)
CALL_INFO = struct.Struct("<IIIII")  # method, message bytes, segments, capacities, releases
REPLY_INFO = struct.Struct("<B3xII")  # status code, message (or error text) bytes, spans
SPAN = struct.Struct("<IQQ")  # region id, offset, length (0: no bytes, e.g. a None sink)
_FIRST = struct.Struct(HEADER.format + LONG.format[1:])  # HEADER and LONG in one
_CRED = struct.Struct("3i")  # pid, uid, gid

MAX_MESSAGE = 64 * 1024
MAX_ITEMS = 1024  # per LEASE: 1024 * 53 bytes fit a message
MAX_REGIONS = 128  # distinct regions per LEASE, so an ACK never carries more fds than SCM allows
MAX_ERROR_TEXT = 512
# A call's body: its message and 8 bytes per segment and capacity, or a span per item.
MAX_LONG_BYTES = base.MAX_CALL_MESSAGE_BYTES + 64 + 4 * MAX_ITEMS + 20 * 2 * base.MAX_CALL_ITEMS
NO_ERROR = 0xFFFF

NEEDS = {int(base.Rights.READ): base.Rights.READ, int(base.Rights.WRITE): base.Rights.WRITE}

# Status codes in WELCOME, ACK and CALL_REPLY: CODES[code - 1]; 0 is success. Codes never change
# meaning: new errors are appended. An error travels as its most specific class listed here.
CODES: tuple[type[errors.KVTierError], ...] = (
    base.DescriptorExpired,
    base.DescriptorRejected,
    errors.PermissionDenied,
    errors.InvalidArgument,
    errors.Unavailable,
    errors.Internal,
    errors.NotFound,
    errors.AlreadyExists,
    errors.PreconditionFailed,
    errors.Overloaded,
    errors.QuotaExceeded,
    errors.Corrupt,
    errors.Unauthenticated,
    errors.DeadlineExceeded,
    errors.StaleEpoch,
    base.PeerLost,
)
_CODE_OF = {cls: index + 1 for index, cls in enumerate(CODES)}


def code_of(exc: BaseException) -> int:
    """The status code that carries exc (Internal for any error not in CODES)."""
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code
    return _CODE_OF[errors.Internal]


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


def send_long(
    channel: Channel,
    kind: int,
    request: int,
    body: bytes | bytearray | memoryview,
    fd_entries: Sequence[bytes] = (),
    fds: Sequence[int] = (),
) -> None:
    """Send a message that may not fit MAX_MESSAGE (a call's body, sinks or reply): a first
    message `kind` with LONG, then MOREs, each with up to MAX_REGIONS fds and their entries."""
    if (
        len(fds) <= MAX_REGIONS
        and _FIRST.size + FD_ENTRY.size * len(fds) + len(body) <= MAX_MESSAGE
    ):
        head = _FIRST.pack(kind, 0, len(fds), request, len(body), len(fds))
        channel.send(b"".join((head, *fd_entries, body)), fds)  # the usual case: one message
        return
    view = memoryview(body)
    pos = sent_fds = 0
    first = True
    while first or pos < view.nbytes or sent_fds < len(fds):
        count = min(len(fds) - sent_fds, MAX_REGIONS)
        head = HEADER.pack(kind if first else MORE, 0, count, request)
        if first:
            head += LONG.pack(view.nbytes, len(fds))
        entries = b"".join(fd_entries[sent_fds : sent_fds + count])
        chunk = view[pos : pos + MAX_MESSAGE - len(head) - len(entries)]
        channel.send(b"".join((head, entries, chunk)), fds[sent_fds : sent_fds + count])
        pos, sent_fds, first = pos + chunk.nbytes, sent_fds + count, False


@dataclasses.dataclass(slots=True)
class CallAnswer:
    """The server's answer to a CALL: its sinks (SINKS), or its reply (CALL_REPLY)."""

    kind: int
    spans: list[tuple[int, int, int]]  # region id, offset, length (0: no bytes)
    message: bytes = b""
    error: errors.KVTierError | None = None


def call_body(
    method: int,
    message: memoryview,
    segments: Sequence[int],
    capacities: Sequence[int],
    releases: Sequence[int],
    trace: bytes = b"",
) -> bytes:
    """The body of a CALL: CALL_INFO, the releases riding along, message, lengths, capacities,
    and, only when the call is traced, the caller's span (`kvtier.tracing.wire_context`, 24
    bytes; the server tells by the body's length)."""
    info = CALL_INFO.pack(method, message.nbytes, len(segments), len(capacities), len(releases))
    return b"".join((
        info,
        struct.pack(f"<{len(releases)}I", *releases),
        message,
        struct.pack(f"<{len(segments)}Q", *segments),
        struct.pack(f"<{len(capacities)}Q", *capacities),
        trace,
    ))  # fmt: skip


def parse_answer(kind: int, body: memoryview) -> CallAnswer:
    """A complete SINKS or CALL_REPLY body."""
    if kind == SINKS:
        return CallAnswer(kind, list(SPAN.iter_unpack(body)))
    code, message_bytes, n_spans = REPLY_INFO.unpack_from(body)
    start = REPLY_INFO.size
    message = bytes(body[start : start + message_bytes])
    spans = list(SPAN.iter_unpack(body[start + message_bytes :]))
    if len(spans) != n_spans:
        raise ValueError(f"CALL_REPLY of {len(spans)} spans announces {n_spans}")
    error = error_of(code, message.decode(errors="replace")) if code else None
    return CallAnswer(kind, spans, message, error)


class Reassembler:
    """Puts long messages (see send_long) back together, one at a time."""

    def __init__(self) -> None:
        self._kind = self._request = self._pos = self._fds_left = 0
        self._body: bytearray | None = None

    def feed(
        self, msg: memoryview, count: int
    ) -> tuple[memoryview, tuple[int, int, memoryview] | None]:
        """Take a first message or a MORE carrying `count` fds: its FD_ENTRYs, and the long
        message's (kind, request, body) once complete. ValueError when out of place."""
        kind, _, _, request = HEADER.unpack_from(msg)
        start = HEADER.size
        if kind != MORE:
            if self._body is not None:
                raise ValueError(f"message {kind} inside another long message")
            body_bytes, fds = LONG.unpack_from(msg, start)
            start += LONG.size
        elif self._body is None or request != self._request:
            raise ValueError(f"MORE of request {request} out of place")
        end = start + FD_ENTRY.size * count
        if end > msg.nbytes:
            raise ValueError(f"message of {msg.nbytes} bytes announces {count} fds")
        entries, chunk = msg[start:end], msg[end:]
        if kind != MORE:
            if body_bytes == chunk.nbytes and fds == count:
                return entries, (kind, request, chunk)  # the usual case: it came whole
            if body_bytes > MAX_LONG_BYTES:
                raise ValueError(f"long message of {body_bytes} bytes")
            self._kind, self._request, self._fds_left = kind, request, fds
            self._body, self._pos = bytearray(body_bytes), 0
        return entries, self._add(chunk, count)

    def _add(self, chunk: memoryview, fds: int) -> tuple[int, int, memoryview] | None:
        body = self._body
        assert body is not None
        end = self._pos + chunk.nbytes
        if end > len(body) or fds > self._fds_left:
            raise ValueError("long message longer than announced")
        body[self._pos : end] = chunk
        self._pos, self._fds_left = end, self._fds_left - fds
        if self._pos < len(body) or self._fds_left:
            return None
        self._body = None
        return self._kind, self._request, memoryview(body)
