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
import itertools
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry, tcp_server, tcp_wire

log = logging.getLogger(__name__)

NAME = tcp_wire.NAME

#: The serving side (defined in `kvtier.transport.tcp_server`, named here for callers).
Server = tcp_server.Server

_DIRECT_MIN_BYTES = 4 * tcp_wire.KIB  # a client never stages READ payloads from this size up
_PER_OP_LOAD = 256  # what an op costs in the least-loaded choice besides its bytes


def available() -> bool:
    """tcp works on every host."""
    return True


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> tcp_server.Server:
    """The tcp server of a node (not listening until `start`)."""
    return tcp_server.Server(ctx, settings)


# ---------------------------------------------------------------------------------------- client

_QUEUED, _DONE = 1, 2


class _Op(tcp_wire.Frame):
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
            header = tcp_wire.REQUEST.pack(
                kind, int(desc.rights), 0, desc.region_id, request_id, desc.offset, desc.length,
                desc.expires_at_ms, desc.mac,
            )  # fmt: skip
        except struct.error as exc:
            raise errors.InvalidArgument(f"descriptor field out of range: {exc}") from None
        super().__init__(header, buf if kind == tcp_wire.WRITE else None)
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


class _ClientConnection(tcp_wire.Channel):
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
        need = tcp_wire.RESPONSE.size
        if staged >= need:
            request_id, status, message_len, length = tcp_wire.RESPONSE.unpack_from(
                self._staging, self._head
            )
            if message_len > tcp_wire.MAX_MESSAGE_BYTES:
                raise tcp_wire.ProtocolError("oversized error message")
            need += message_len
            if staged >= need:
                message = bytes(self._view[self._head + tcp_wire.RESPONSE.size : self._head + need])
                self._head += need
                self._response(request_id, status, message.decode(errors="replace"), length)
                return True
        if not self._pending:
            # Nothing is expected: recv only to learn why we were woken (end of stream, or junk).
            return self._recvs_left == tcp_wire.RECV_ROUNDS and self._fill()
        front = self._pending[0]
        if front.kind == tcp_wire.READ and front.desc.length >= _DIRECT_MIN_BYTES:
            return self._fill(need - staged)  # stop at the header: the payload goes to its buffer
        return self._fill()

    def _response(self, request_id: int, status: int, message: str, length: int) -> None:
        if not self._pending or self._pending[0].request_id != request_id:
            raise tcp_wire.ProtocolError(f"response {request_id} out of order")
        op = self._pending.popleft()
        if status != tcp_wire.Status.OK:
            self._done(op, tcp_wire.error_of(status, message))
        elif op.kind == tcp_wire.READ and length != op.desc.length:
            raise tcp_wire.ProtocolError(
                f"response of {length} bytes to a read of {op.desc.length}"
            )
        elif op.kind == tcp_wire.READ and length:
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
                self._sink = memoryview(bytearray(tcp_wire.SINK_BYTES))
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

    name: ClassVar[str] = tcp_wire.NAME

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
        await self._one(tcp_wire.READ, desc, buf)

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """Copy `data` (len == desc.length) into the described range; errors as `read`."""
        buf = base.as_buffer(data, writable=False)
        base.check_sizes((desc,), (buf,))
        await self._one(tcp_wire.WRITE, desc, buf)

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, pipelined over the connections; all complete or the first error is raised."""
        bufs = [base.as_buffer(b, writable=True) for b in intos]
        base.check_sizes(descs, bufs)
        await self._run(tcp_wire.READ, descs, bufs)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, pipelined over the connections; all complete or the first error raises."""
        bufs = [base.as_buffer(b, writable=False) for b in datas]
        base.check_sizes(descs, bufs)
        await self._run(tcp_wire.WRITE, descs, bufs)

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
        verb = "read" if op.kind == tcp_wire.READ else "write"
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
    if len(token) > tcp_wire.MAX_TOKEN_BYTES:
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
        tcp_wire.tune(sock)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, tcp_wire.HELLO.pack(tcp_wire.MAGIC, len(token)) + token)
        header = await _recv_exactly(loop, sock, tcp_wire.RESPONSE.size)
        _, status, message_len, _ = tcp_wire.RESPONSE.unpack(header)
        message = await _recv_exactly(loop, sock, min(message_len, tcp_wire.MAX_MESSAGE_BYTES))
        if status != tcp_wire.Status.OK:
            raise tcp_wire.error_of(status, message.decode(errors="replace"))
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
