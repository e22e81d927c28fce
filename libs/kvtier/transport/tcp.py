"""The tcp data-plane transport: one-sided reads and writes of a peer's regions, emulated over TCP.

Wire protocol (little endian). Each TCP connection is one ordered pipeline:

    client → server  HELLO     magic, token length (u16), token
    server → client  RESPONSE  for request id 0: OK, or an error after which the server closes
    client → server  REQUEST   op, rights, region, request id, offset, length, expiry, MAC
                               (the descriptor's fields), then `length` payload bytes if a WRITE
    server → client  RESPONSE  request id, status, message length, payload length, then the
                               error message or, for a READ that succeeded, the bytes

The server checks every request against the descriptor's MAC for the connection's principal,
leases the range while bytes move, receives WRITE payloads straight into region memory (an
invalid WRITE's payload is drained into a shared scratch buffer, so the connection stays usable)
and sends READ payloads straight from it. Responses come back in request order.

Both sides drive non-blocking sockets from loop reader/writer callbacks, like a BufferedProtocol
but with sends that never copy: no streams, no tasks and no payload buffers per message. Headers
pass through a small staging buffer; a client receives READ payloads into the caller's buffer.
A client keeps `ClientSettings.connections` connections per peer, pipelines requests on each
and puts every new request on the least loaded one; a `base.ByteBudget` bounds its bytes in flight.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

log = logging.getLogger(__name__)

NAME = "tcp"

KIB, MIB = 1024, 1024 * 1024
_MAGIC = b"KVT1"
_HELLO = struct.Struct("<4sH")  # magic, token length
_REQUEST = struct.Struct("<BBHIQQQq16s")  # op, rights, 0, region, id, offset, length, expiry, mac
_RESPONSE = struct.Struct("<QB3xIQ")  # request id, status, message length, payload length
_READ, _WRITE = 1, 2

_SOCKET_BUFFER_BYTES = 4 * MIB
_STAGING_BYTES = 16 * KIB  # headers (and small payloads that come with them) land here first
_SINK_BYTES = 256 * KIB  # where unwanted payload bytes are drained
_DIRECT_MIN_BYTES = 4 * KIB  # a client never stages READ payloads from this size up
_MAX_OP_BYTES = 1 << 34  # a length beyond this is a broken peer, not a request
_MAX_MESSAGE_BYTES = 512
_MAX_TOKEN_BYTES = 4 * KIB
_HELLO_TIMEOUT_S = 10.0  # a connection that has not presented its token by then is dropped
_GATHER_ITEMS = 64  # queued frames per sendmsg call
_RECV_ROUNDS = 64  # recv calls per reader callback, so that one busy connection starves no other
_PER_OP_LOAD = 256  # what an op costs in the least-loaded choice besides its bytes


class _Status(enum.IntEnum):
    OK = 0
    REJECTED = 1
    EXPIRED = 2
    DENIED = 3
    INVALID = 4
    INTERNAL = 5


# Most specific first: the expired and rejected descriptor errors are PermissionDenied too.
_STATUS_OF: tuple[tuple[type[errors.KVTierError], _Status], ...] = (
    (base.DescriptorExpired, _Status.EXPIRED),
    (base.DescriptorRejected, _Status.REJECTED),
    (errors.PermissionDenied, _Status.DENIED),
    (errors.InvalidArgument, _Status.INVALID),
)
_ERROR_OF: dict[int, type[errors.KVTierError]] = {s: cls for cls, s in _STATUS_OF}


class _ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


def available() -> bool:
    """tcp works on every host."""
    return True


def _error_response(request_id: int, exc: BaseException) -> bytes:
    status = next((s for cls, s in _STATUS_OF if isinstance(exc, cls)), _Status.INTERNAL)
    if status is _Status.INTERNAL:
        log.error("tcp data plane: request %d failed", request_id, exc_info=exc)
        exc = errors.Internal("internal error in the tcp data plane")
    message = str(exc).encode()[:_MAX_MESSAGE_BYTES]
    return _RESPONSE.pack(request_id, status, len(message), 0) + message


def _error(status: int, message: str) -> errors.KVTierError:
    return _ERROR_OF.get(status, errors.Internal)(message)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Frame:
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


class _Channel:
    """A non-blocking socket driven by loop callbacks: an ordered send queue and a staging buffer.

    Subclasses parse what arrives in `_step` (False when the socket has nothing more for now),
    hear of each frame that went out completely in `_sent`, and clean up in `_lost`.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.closed = False
        self._fd = sock.fileno()
        self._loop = loop
        self._out: collections.deque[_Frame] = collections.deque()
        self._writing = False
        self._reading = False
        self._staging = bytearray(_STAGING_BYTES)
        self._view = memoryview(self._staging)
        self._head = 0  # the staged bytes are _staging[_head:_tail]
        self._tail = 0
        self._recvs_left = 0

    def _step(self) -> bool:
        raise NotImplementedError

    def _sent(self, frame: _Frame) -> None:
        """A frame has gone out completely."""

    def _lost(self, reason: str) -> None:
        raise NotImplementedError

    def _set_reading(self, on: bool) -> None:
        if on and not self._reading and not self.closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        elif not on and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        self._recvs_left = _RECV_ROUNDS
        try:
            while self._reading and self._step():
                pass
        except (OSError, _ProtocolError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("tcp data plane: unexpected error on a connection")
            self._lost("internal error")
        else:
            self.kick()

    def kick(self) -> None:
        """Send what is queued now, unless the socket is full (then the writer callback will)."""
        if self._out and not self._writing:
            self.flush()

    def flush(self) -> None:
        """Send queued frames until none is left or the socket is full (then wait for writable)."""
        out = self._out
        while out and not self.closed:
            iov: list[bytes | memoryview] = []
            wanted = 0
            for frame in out if len(out) <= _GATHER_ITEMS else itertools.islice(out, _GATHER_ITEMS):
                wanted += frame.unsent(iov)
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

    def _fill(self, limit: int = _STAGING_BYTES) -> bool:
        """Receive up to limit more bytes into staging; False when none are there yet."""
        if self._head == self._tail:
            self._head = self._tail = 0
        elif _STAGING_BYTES - self._tail < _HELLO.size + _MAX_TOKEN_BYTES:
            # Only an incomplete header (or HELLO) is staged here: moving it is cheap.
            staged = self._tail - self._head
            self._view[:staged] = self._view[self._head : self._tail]
            self._head, self._tail = 0, staged
        room = min(_STAGING_BYTES - self._tail, limit)
        got = self._recv(self._view[self._tail : self._tail + room])
        self._tail += got
        return got > 0

    def _recv(self, into: memoryview) -> int:
        """recv_into; 0 when nothing is there yet; ConnectionResetError at the end of the stream."""
        if self._recvs_left <= 0:
            return 0  # let other connections go first: the reader callback will come back
        self._recvs_left -= 1
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


# ---------------------------------------------------------------------------------------- server


class _ServerConnection(_Channel):
    """One client's connection: HELLO, then requests checked, served and answered in order."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        super().__init__(sock, server.loop)
        self._server = server
        self._ctx = server.ctx
        self.principal: str | None = None
        self._queued_bytes = 0
        self._paused = False
        # The WRITE payload being received: into (None: drain it), position, length, lease, reply.
        self._rx_into: memoryview | None = None
        self._rx_pos = 0
        self._rx_len = 0
        self._rx_lease = 0
        self._rx_reply = b""
        self._hello_timer = self._loop.call_later(_HELLO_TIMEOUT_S, self._lost, "no HELLO in time")
        self._set_reading(True)

    def _step(self) -> bool:
        if self._rx_len:
            return self._take_payload()
        staged = self._tail - self._head
        if self.principal is None:
            if staged >= _HELLO.size:
                magic, size = _HELLO.unpack_from(self._staging, self._head)
                if magic != _MAGIC or size > _MAX_TOKEN_BYTES:
                    raise _ProtocolError("not a kvtier tcp client")
                if staged >= _HELLO.size + size:
                    start = self._head + _HELLO.size
                    self._head = start + size
                    self._hello(bytes(self._view[start : start + size]))
                    return True
        elif staged >= _REQUEST.size:
            fields = _REQUEST.unpack_from(self._staging, self._head)
            self._head += _REQUEST.size
            self._request(*fields)
            return True
        return self._fill()

    def _hello(self, token: bytes) -> None:
        self._hello_timer.cancel()
        try:
            self.principal = self._ctx.issuer.check_token(token)
        except errors.KVTierError as exc:
            log.info("tcp data plane: refused a connection: %s", exc)
            self._queue(_Frame(_error_response(0, exc)))
            self.flush()
            self._lost("refused")
            return
        self._queue(_Frame(_RESPONSE.pack(0, _Status.OK, 0, 0)))

    def _request(
        self, op: int, rights: int, _pad: int, region_id: int, request_id: int, offset: int,
        length: int, expires_at_ms: int, mac: bytes,
    ) -> None:  # fmt: skip
        if op not in (_READ, _WRITE) or length > _MAX_OP_BYTES:
            raise _ProtocolError(f"bad request: op {op}, length {length}")
        need = base.Rights.READ if op == _READ else base.Rights.WRITE
        try:
            region = self._ctx.issuer.check(
                self._ctx.regions, self.principal or "", need, region_id, offset, length, rights,
                expires_at_ms, mac,
            )  # fmt: skip
        except Exception as exc:  # every failure is answered; the connection stays usable
            reply = _error_response(request_id, exc)
            if op == _WRITE and length:
                self._expect(None, length, 0, reply)  # the payload follows anyway: drain it
            else:
                self._queue(_Frame(reply))
            return
        if not length:
            self._queue(_Frame(_RESPONSE.pack(request_id, _Status.OK, 0, 0)))
            return
        lease = self._ctx.leases.acquire(region_id, offset, length, self, expires_at_ms)
        view = region.view[offset : offset + length]
        if op == _WRITE:
            self._expect(view, length, lease, _RESPONSE.pack(request_id, _Status.OK, 0, 0))
        else:
            self._queue(_Frame(_RESPONSE.pack(request_id, _Status.OK, 0, length), view, lease))

    def _expect(self, into: memoryview | None, length: int, lease: int, reply: bytes) -> None:
        """Receive a WRITE payload next (into region memory, or drained), then queue reply."""
        self._rx_into, self._rx_pos, self._rx_len = into, 0, length
        self._rx_lease, self._rx_reply = lease, reply

    def _take_payload(self) -> bool:
        into = self._rx_into
        if self._tail > self._head:
            dest = into[self._rx_pos :] if into is not None else None
            got = self._unstage(dest, self._rx_len - self._rx_pos)
        elif into is not None:
            got = self._recv(into[self._rx_pos :])
        else:
            got = self._recv(self._server.scratch[: self._rx_len - self._rx_pos])
        if not got:
            return False
        self._rx_pos += got
        if self._rx_pos == self._rx_len:
            self._ctx.leases.release(self._rx_lease)
            self._queue(_Frame(self._rx_reply))
            self._rx_into, self._rx_len, self._rx_lease = None, 0, 0
        return True

    def _queue(self, frame: _Frame) -> None:
        self._out.append(frame)
        self._queued_bytes += frame.size
        if self._queued_bytes > self._ctx.max_inflight_bytes and not self._paused:
            self._paused = True  # the client is not taking its replies: stop taking requests
            self._set_reading(False)

    def _sent(self, frame: _Frame) -> None:
        if frame.lease:
            self._ctx.leases.release(frame.lease)
        self._queued_bytes -= frame.size
        if self._paused and self._queued_bytes <= self._ctx.max_inflight_bytes // 2:
            self._paused = False
            self._set_reading(True)
            self._loop.call_soon(self._on_readable)  # requests may wait in staging already

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        log.debug("tcp data plane: connection of %s closed: %s", self.principal, reason)
        self._hello_timer.cancel()
        self._shut()
        self._rx_into = None
        self._ctx.leases.release_owner(self)
        self._server.forget(self)

    def close(self) -> None:
        """Drop the connection now (its client's pending operations fail with PeerLost)."""
        self._lost("server stopping")


class Server:
    """Serves a node's regions over TCP (see the module docstring for the protocol)."""

    name: ClassVar[str] = NAME
    loop: asyncio.AbstractEventLoop  # set by start

    def __init__(self, ctx: base.ServerContext, settings: registry.ServerSettings) -> None:
        self.ctx = ctx
        self._settings = settings
        self._listener: socket.socket | None = None
        self._conns: set[_ServerConnection] = set()
        self._scratch: memoryview | None = None

    @property
    def scratch(self) -> memoryview:
        """Where rejected WRITE payloads are drained (shared: its contents never matter)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SINK_BYTES))
        return self._scratch

    async def start(self) -> common_pb2.TransportEndpoint:
        """Listen on settings.host:settings.tcp_port (0: a free port); returns the endpoint."""
        self.loop = asyncio.get_running_loop()
        infos = await self.loop.getaddrinfo(
            self._settings.host, self._settings.tcp_port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )  # fmt: skip
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit the receive buffer (and the window scale it implies).
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._on_accept)
        port = listener.getsockname()[1]
        return common_pb2.TransportEndpoint(
            name=NAME, address=f"{self._settings.advertise_host}:{port}"
        )

    def _on_accept(self) -> None:
        for _ in range(64):
            if self._listener is None:
                return
            try:
                sock, _peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log.warning("tcp data plane: accept failed: %s", exc)
                return
            try:
                _tune(sock)
            except OSError:
                sock.close()
                continue
            self._conns.add(_ServerConnection(self, sock))

    def forget(self, conn: _ServerConnection) -> None:
        """A connection has closed."""
        self._conns.discard(conn)

    async def stop(self) -> None:
        """Stop listening and drop every connection (their leases end); idempotent."""
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for conn in list(self._conns):
            conn.close()

    def connection_count(self) -> int:
        """Open client connections."""
        return len(self._conns)


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> Server:
    """The tcp server of a node (not listening until `start`)."""
    return Server(ctx, settings)


# ---------------------------------------------------------------------------------------- client

_QUEUED, _DONE = 1, 2


class _Op(_Frame):
    """One READ or WRITE: the request frame, the caller's buffer and the completion future."""

    __slots__ = ("buf", "conn", "deadline", "desc", "fut", "kind", "request_id", "state")

    def __init__(
        self,
        kind: int,
        desc: base.Descriptor,
        buf: memoryview,
        request_id: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            header = _REQUEST.pack(
                kind, int(desc.rights), 0, desc.region_id, request_id, desc.offset, desc.length,
                desc.expires_at_ms, desc.mac,
            )  # fmt: skip
        except struct.error as exc:
            raise errors.InvalidArgument(f"descriptor field out of range: {exc}") from None
        super().__init__(header, buf if kind == _WRITE else None)
        self.kind = kind
        self.desc = desc
        self.buf = buf
        self.request_id = request_id
        self.fut: asyncio.Future[None] = loop.create_future()
        self.conn: _ClientConnection | None = None
        self.deadline = 0.0
        self.state = 0

    def abandon(self) -> None:
        """The caller stops waiting: no byte may touch its buffer from now on."""
        if not self.fut.done():
            self.fut.cancel()
        if self.conn is not None:
            self.conn.abandon(self)


class _ClientConnection(_Channel):
    """One pipelined connection to the server: requests out in order, responses back in order."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(sock, loop)
        self._pending: collections.deque[_Op] = collections.deque()  # awaiting their responses
        self._rx: _Op | None = None  # the READ whose payload is arriving
        self._rx_pos = 0
        self._sink: memoryview | None = None
        self.load = 0
        self._set_reading(True)

    def enqueue(self, op: _Op) -> None:
        """Queue op to be sent (by `kick`); its future completes with its response."""
        op.conn, op.state = self, _QUEUED
        self._pending.append(op)
        self._out.append(op)
        self.load += op.desc.length + _PER_OP_LOAD

    def abandon(self, op: _Op) -> None:
        """Forget op if it has not left yet; else keep the stream intact without its buffer."""
        if op.state != _QUEUED or self.closed:
            return
        if op.sent == 0:
            self._out.remove(op)
            self._pending.remove(op)
            self._done(op, None)
        elif op.payload is not None and op.sent < op.size:
            op.payload = memoryview(bytes(op.payload))  # rare: the caller may reuse its buffer
        # A READ's payload goes to the sink from now on (its future is done).

    def _step(self) -> bool:
        if self._rx is not None:
            return self._take_payload()
        staged = self._tail - self._head
        need = _RESPONSE.size
        if staged >= need:
            request_id, status, message_len, length = _RESPONSE.unpack_from(
                self._staging, self._head
            )
            if message_len > _MAX_MESSAGE_BYTES:
                raise _ProtocolError("oversized error message")
            need += message_len
            if staged >= need:
                message = bytes(self._view[self._head + _RESPONSE.size : self._head + need])
                self._head += need
                self._response(request_id, status, message.decode(errors="replace"), length)
                return True
        if not self._pending:
            # Nothing is expected: recv only to learn why we were woken (end of stream, or junk).
            return self._recvs_left == _RECV_ROUNDS and self._fill()
        front = self._pending[0]
        if front.kind == _READ and front.desc.length >= _DIRECT_MIN_BYTES:
            return self._fill(need - staged)  # stop at the header: the payload goes to its buffer
        return self._fill()

    def _response(self, request_id: int, status: int, message: str, length: int) -> None:
        if not self._pending or self._pending[0].request_id != request_id:
            raise _ProtocolError(f"response {request_id} out of order")
        op = self._pending.popleft()
        if status != _Status.OK:
            self._done(op, _error(status, message))
        elif op.kind == _READ and length != op.desc.length:
            raise _ProtocolError(f"response of {length} bytes to a read of {op.desc.length}")
        elif op.kind == _READ and length:
            self._rx, self._rx_pos = op, 0
        else:
            self._done(op, None)

    def _take_payload(self) -> bool:
        op = self._rx
        assert op is not None
        need = op.desc.length - self._rx_pos
        into = op.buf[self._rx_pos :] if not op.fut.done() else None
        if self._tail > self._head:
            got = self._unstage(into, need)
        elif into is not None:
            got = self._recv(into)
        else:
            if self._sink is None:
                self._sink = memoryview(bytearray(_SINK_BYTES))
            got = self._recv(self._sink[:need])
        if not got:
            return False
        self._rx_pos += got
        if self._rx_pos == op.desc.length:
            self._rx = None
            self._done(op, None)
        return True

    def _done(self, op: _Op, exc: errors.KVTierError | None) -> None:
        op.state = _DONE
        self.load -= op.desc.length + _PER_OP_LOAD
        if op.fut.done():
            return
        if exc is None:
            op.fut.set_result(None)
        else:
            op.fut.set_exception(exc)

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        log.debug("tcp data plane: client connection closed: %s", reason)
        self._shut()
        pending, self._pending = self._pending, collections.deque()
        if self._rx is not None:
            pending.appendleft(self._rx)
            self._rx = None
        for op in pending:
            self._done(op, base.PeerLost(f"tcp data-plane connection lost: {reason}"))

    def close(self) -> None:
        """Close now; pending operations fail with PeerLost."""
        self._lost("closed by the client")


class Client:
    """A tcp data-plane client of one peer (implements base.Transport)."""

    name: ClassVar[str] = NAME

    def __init__(self, conns: list[_ClientConnection], settings: registry.ClientSettings) -> None:
        self._conns = conns
        self._settings = settings
        self._budget = base.ByteBudget(settings.max_inflight_bytes)
        self._ids = itertools.count(1)
        self._closed = False

    async def read(self, desc: base.Descriptor, into: Any) -> None:
        """Copy the described range into `into` (len == desc.length).

        Raises InvalidArgument (buffer), DescriptorExpired/DescriptorRejected (grant),
        DeadlineExceeded (settings.timeout_s) or PeerLost (connection).
        """
        buf = base.as_buffer(into, writable=True)
        base.check_sizes((desc,), (buf,))
        await self._one(_READ, desc, buf)

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """Copy `data` (len == desc.length) into the described range; errors as `read`."""
        buf = base.as_buffer(data, writable=False)
        base.check_sizes((desc,), (buf,))
        await self._one(_WRITE, desc, buf)

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, pipelined over the connections; all complete or the first error is raised."""
        bufs = [base.as_buffer(b, writable=True) for b in intos]
        base.check_sizes(descs, bufs)
        await self._run(_READ, descs, bufs)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, pipelined over the connections; all complete or the first error raises."""
        bufs = [base.as_buffer(b, writable=False) for b in datas]
        base.check_sizes(descs, bufs)
        await self._run(_WRITE, descs, bufs)

    async def close(self) -> None:
        """Close every connection; pending operations fail with PeerLost. Idempotent."""
        self._closed = True
        for conn in self._conns:
            conn.close()

    async def _run(
        self, kind: int, descs: Sequence[base.Descriptor], bufs: Sequence[memoryview]
    ) -> None:
        """Send the ops as the byte budget allows, wait for all, raise the first failure.

        On a deadline or cancellation the unfinished ops are abandoned (their buffers are no
        longer touched) and their budget returns at once, though their bytes may still be moving.
        """
        if self._closed:
            raise base.PeerLost("tcp data-plane client is closed")
        loop = asyncio.get_running_loop()
        own: collections.deque[_Op] = collections.deque()
        dirty: set[_ClientConnection] = set()
        failure: errors.KVTierError | None = None
        try:
            for desc, buf in zip(descs, bufs, strict=True):
                op = _Op(kind, desc, buf, next(self._ids), loop)
                op.deadline = loop.time() + self._settings.timeout_s
                while failure is None and own:
                    if not own[0].fut.done() and self._fits(desc.length):
                        break
                    self._kick(dirty)
                    failure = await self._finish(own.popleft())
                if failure is not None:
                    break
                await self._admit(op, dirty)
                own.append(op)
                conn = self._pick()
                conn.enqueue(op)
                dirty.add(conn)
            self._kick(dirty)
            while own:
                error = await self._finish(own.popleft())
                failure = failure or error
        finally:
            for op in own:
                op.abandon()
            held = sum(op.desc.length for op in own)
            if held:
                await self._budget.release(held)
        if failure is not None:
            raise failure

    async def _one(self, kind: int, desc: base.Descriptor, buf: memoryview) -> None:
        """One op: what `_run` does, without its bookkeeping (latency matters here)."""
        if self._closed or not self._fits(desc.length):
            await self._run(kind, (desc,), (buf,))
            return
        loop = asyncio.get_running_loop()
        op = _Op(kind, desc, buf, next(self._ids), loop)
        op.deadline = loop.time() + self._settings.timeout_s
        conn = self._pick()
        if desc.length:
            await self._budget.acquire(desc.length)  # it fits: returns at once
        conn.enqueue(op)
        conn.kick()
        error = await self._finish(op)
        if error is not None:
            raise error

    def _fits(self, length: int) -> bool:
        used = self._budget.used_bytes
        return used == 0 or used + length <= self._budget.limit_bytes

    async def _admit(self, op: _Op, dirty: set[_ClientConnection]) -> None:
        """Take op's bytes from the budget, waiting (until op's deadline) when it is spent."""
        if not op.desc.length:
            return
        if self._fits(op.desc.length):
            await self._budget.acquire(op.desc.length)  # returns at once
            return
        self._kick(dirty)
        try:
            async with asyncio.timeout_at(op.deadline):
                await self._budget.acquire(op.desc.length)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"tcp data plane: no room in the byte budget within {self._settings.timeout_s}s"
            ) from None

    async def _finish(self, op: _Op) -> errors.KVTierError | None:
        """Wait for op until its deadline and return its budget; returns (not raises) its error.

        Raises DeadlineExceeded when the deadline passes first (op is abandoned).
        """
        timer = None
        if not op.fut.done():
            timer = asyncio.get_running_loop().call_at(op.deadline, self._expire, op)
        try:
            await op.fut
        except errors.DeadlineExceeded:
            raise
        except errors.KVTierError as exc:
            return exc
        except BaseException:
            op.abandon()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if op.desc.length:
                await self._budget.release(op.desc.length)
        return None

    def _expire(self, op: _Op) -> None:
        if op.fut.done():
            return
        verb = "read" if op.kind == _READ else "write"
        op.fut.set_exception(
            errors.DeadlineExceeded(
                f"tcp {verb} of {op.desc.length} bytes took over {self._settings.timeout_s}s"
            )
        )
        op.abandon()

    def _pick(self) -> _ClientConnection:
        best: _ClientConnection | None = None
        for conn in self._conns:
            if not conn.closed and (best is None or conn.load < best.load):
                best = conn
        if best is None:
            raise base.PeerLost("every tcp data-plane connection to the peer is lost")
        return best

    @staticmethod
    def _kick(dirty: set[_ClientConnection]) -> None:
        for conn in dirty:
            conn.kick()
        dirty.clear()


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> Client:
    """Open settings.connections connections to a tcp endpoint and present the token on each.

    Raises PermissionDenied (token refused), Unavailable (unreachable) or DeadlineExceeded.
    """
    if settings.connections < 1:
        raise errors.InvalidArgument("ClientSettings.connections must be at least 1")
    if len(token) > _MAX_TOKEN_BYTES:
        raise errors.InvalidArgument("data-plane token too long")
    host, _, port = endpoint.address.rpartition(":")
    if not host or not port.isdigit():
        raise errors.InvalidArgument(f"tcp endpoint address {endpoint.address!r} is not host:port")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(settings.timeout_s):
            infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            results = await asyncio.gather(
                *(_open(loop, infos[0], token) for _ in range(settings.connections)),
                return_exceptions=True,
            )
    except TimeoutError:
        raise errors.DeadlineExceeded(f"tcp data plane at {endpoint.address}: no answer") from None
    except OSError as exc:
        raise errors.Unavailable(f"tcp data plane at {endpoint.address}: {exc}") from None
    socks = [r for r in results if isinstance(r, socket.socket)]
    failed = [r for r in results if not isinstance(r, socket.socket)]
    if failed:
        for sock in socks:
            sock.close()
        first = failed[0]
        if isinstance(first, OSError):
            raise errors.Unavailable(f"tcp data plane at {endpoint.address}: {first}") from first
        raise first
    return Client([_ClientConnection(sock, loop) for sock in socks], settings)


async def _open(loop: asyncio.AbstractEventLoop, info: Any, token: bytes) -> socket.socket:
    """A connected, tuned socket whose HELLO the server accepted."""
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        _tune(sock)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, _HELLO.pack(_MAGIC, len(token)) + token)
        header = await _recv_exactly(loop, sock, _RESPONSE.size)
        _, status, message_len, _ = _RESPONSE.unpack(header)
        message = await _recv_exactly(loop, sock, min(message_len, _MAX_MESSAGE_BYTES))
        if status != _Status.OK:
            raise _error(status, message.decode(errors="replace"))
    except BaseException:
        sock.close()
        raise
    return sock


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise base.PeerLost("tcp data-plane server closed the connection during HELLO")
        got += n
    return bytes(buf)
