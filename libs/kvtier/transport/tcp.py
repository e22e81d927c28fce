"""The tcp data-plane transport: one-sided reads and writes of a peer's regions, emulated over TCP,
and calls to the peer's service.

Wire protocol (little endian). Each TCP connection is one ordered pipeline:

    client → server  HELLO     magic, token length (u16), token
    server → client  RESPONSE  for request id 0: OK, or an error after which the server closes
    client → server  REQUEST   op, rights, region, request id, offset, length, expiry, grant id,
                               MAC (the descriptor's fields), then `length` payload bytes if a
                               WRITE
    client → server  CALL      op, method (u32), request id, message length, payload length,
                               segments (u32), capacities (u32), trace context (24 bytes:
                               zeros, or the caller's sampled trace and span id): as long as
                               a REQUEST; then the request message, the segment lengths and
                               the capacities (u64 each), then the segments' bytes
    server → client  RESPONSE  request id, status, message length, payload length, then the
                               error message or, for a READ that succeeded, the bytes; for a
                               CALL that succeeded the reply message, one u64 length per
                               capacity and the payload (each buffer's bytes, in order)

HELLO's token must have been issued for tcp (a shm or rdma token is refused), and each identity
(the principal without its random suffix) may hold `ServerContext.max_connections_per_principal`
connections to the node (Overloaded past it). The server checks every request against the
descriptor's MAC for the connection's principal and against the issuer's live grants (a revoked
grant is refused), leases the range while bytes move, receives WRITE payloads straight into
region memory (an invalid WRITE's payload is drained into a shared scratch buffer, so the
connection stays usable) and sends READ payloads straight from it. Responses come back in
request order.

A CALL's body goes to the node's `ServerContext.call_handler` before its payload is read; each
segment is received straight into the sink the handler chose (or drained), then on_received
gives the reply, sent with the sources straight from region memory; on_done(True) runs once the
frame is out, on_done(False) when the call fails after its plan or the connection dies first.
A handler or on_received may return an awaitable: the connection parses nothing further while a
handler is awaited, and a reply awaited holds back the responses queued after it (see
docs/transports.md, "Asynchronous handlers and completions").
Statuses carry the error's class (`tcp_wire.Status`), so the client raises what the service did.

Both sides drive non-blocking sockets from loop reader/writer callbacks, like a BufferedProtocol
but with sends that never copy: no streams, no tasks (but one per awaitable a call's service
returns) and no payload buffers per message. Headers
pass through a small staging buffer; a client receives READ and CALL payloads into the caller's
buffers. A client keeps `ClientSettings.connections` connections per peer (`tcp_client`),
pipelines requests on each and puts every new request on the least loaded one; a
`base.ByteBudget` bounds its bytes in flight.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import ssl
from collections.abc import Sequence
from typing import Any, ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, calls, registry, tcp_client, tcp_server, tcp_tls, tcp_wire

NAME = tcp_wire.NAME

#: The serving side (defined in `kvtier.transport.tcp_server`, named here for callers).
Server = tcp_server.Server


def available() -> bool:
    """tcp works on every host."""
    return True


def make_server(ctx: base.ServerContext, settings: registry.ServerSettings) -> tcp_server.Server:
    """The tcp server of a node (not listening until `start`)."""
    return tcp_server.Server(ctx, settings)


# A small request's reply is polled for (spinning) up to _POLL_S before the loop sleeps; after
# _POLL_MISSES misses in a row polling pauses for _POLL_PAUSE requests (as the shm client does).
_POLL_S = 300e-6
_POLL_MISSES = 8
_POLL_PAUSE = 1024
_POLL_MAX_BYTES = 1024 * 1024


class Client:
    """A tcp data-plane client of one peer (implements base.Transport)."""

    name: ClassVar[str] = tcp_wire.NAME
    supports_calls: ClassVar[bool] = True

    def __init__(
        self, conns: list[tcp_client.Connection], settings: registry.ClientSettings
    ) -> None:
        self._conns = conns
        self._settings = settings
        self._budget = base.ByteBudget(settings.max_inflight_bytes)
        self._ids = itertools.count(1)
        self._closed = False
        self._poll_misses = 0
        self._poll_pause = 0

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

    async def call(
        self,
        method: int,
        request: Any,
        segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> base.CallResult:
        """One call to the peer's service (see `base.Transport.call`), on the least loaded
        connection: request and segments out, the reply's payloads straight into `intos`.

        Its bytes (segments and capacities) come from the byte budget. Raises InvalidArgument
        (limits, buffers) before sending, the service's error, DeadlineExceeded
        (settings.timeout_s; the call is abandoned, the connection stays usable), PeerLost, or
        Unavailable when the node serves no calls.
        """
        segs = [base.as_buffer(seg, writable=False) for seg in segments]
        bufs = [base.as_buffer(into, writable=True) for into in intos]
        message = calls.check_request(method, request, segs, bufs)
        if self._closed:
            raise base.PeerLost("tcp data-plane client is closed")
        loop = asyncio.get_running_loop()
        op = tcp_client.CallOp(method, message, segs, bufs, next(self._ids), loop)
        op.deadline = loop.time() + self._settings.timeout_s
        await self._admit(op, set())
        try:
            conn = self._pick()
        except base.PeerLost:
            await self._budget.release(op.nbytes)
            raise
        conn.enqueue(op)
        conn.kick()
        if op.nbytes <= _POLL_MAX_BYTES:
            self._poll(conn, op.fut)
        error = await self._finish(op)
        if error is not None:
            raise error
        return base.CallResult(op.reply, op.lengths)

    # The synchronous short path (`kvtier.kv_sync`): a caller that owns the event loop and does
    # not run it between operations sends a call and waits for its reply on the socket itself,
    # without a task, a future await or a loop iteration (each costs tens of microseconds).

    def begin_call_now(
        self, method: int, request: Any, intos: Sequence[Any] = ()
    ) -> tcp_client.CallOp | None:
        """Send a call without payload segments now, from outside the loop; None (nothing sent)
        when it cannot go this way: closed, other bytes in flight, or a connection with output
        waiting for the loop. Finish it with `wait_now` and `end_call_now`, or `finish_call`.
        Raises InvalidArgument as `call` does."""
        bufs = [base.as_buffer(into, writable=True) for into in intos]
        message = calls.check_request(method, request, (), bufs)
        if self._closed:
            return None
        conn: tcp_client.Connection | None = None
        for each in self._conns:  # `_pick`, and no connection may wait for the loop to send
            if each._writing:  # send_blocked, without a property call per connection
                return None
            if not each.closed and (conn is None or each.load < conn.load):
                conn = each
        if conn is None:
            raise base.PeerLost("every tcp data-plane connection to the peer is lost")
        loop = conn.loop
        op = tcp_client.CallOp(method, message, (), bufs, next(self._ids), loop)
        if not self._budget.take_now(op.nbytes):
            return None
        op.deadline = loop.time() + self._settings.timeout_s
        conn.send_now(op)
        return op

    def wait_now(self, op: tcp_client.CallOp, spin_s: float) -> bool:
        """Wait for op's reply outside the loop: spin up to spin_s (unless recent replies came
        later than that: see `_poll`), then sleep on the socket until it is done or its deadline
        passes (it then fails with DeadlineExceeded). False when only the loop can move it on
        (a send waits for the socket): use `finish_call`. spin_s 0: no spin (and no miss
        counted against later spins)."""
        conn = op.conn
        assert conn is not None
        if spin_s > 0:
            self._poll(conn, op.fut, spin_s)
        while not op.fut.done():
            if conn.send_blocked or conn.closed:
                return op.fut.done()
            left = op.deadline - conn.loop.time()
            if left <= 0:
                self._expire(op)
                return True
            conn.wait_readable(left)
        return True

    def end_call_now(self, op: tcp_client.CallOp) -> base.CallResult:
        """The result of a call that `wait_now` saw done (its bytes return to the budget);
        raises its error."""
        self._budget.give_now(op.nbytes)
        error = op.fut.exception()
        if error is not None:
            raise error
        return base.CallResult(op.reply, op.lengths)

    async def finish_call(self, op: tcp_client.CallOp) -> base.CallResult:
        """Wait in the loop for a call that `begin_call_now` sent; as `call`."""
        error = await self._finish(op)
        if error is not None:
            raise error
        return base.CallResult(op.reply, op.lengths)

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
        own: collections.deque[tcp_client.Op] = collections.deque()
        dirty: set[tcp_client.Connection] = set()
        failure: errors.KVTierError | None = None
        try:
            for desc, buf in zip(descs, bufs, strict=True):
                op = tcp_client.rw_op(kind, desc, buf, next(self._ids), loop)
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
            held = sum(op.nbytes for op in own)
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
        op = tcp_client.rw_op(kind, desc, buf, next(self._ids), loop)
        op.deadline = loop.time() + self._settings.timeout_s
        conn = self._pick()
        if desc.length:
            await self._budget.acquire(desc.length)  # it fits: returns at once
        conn.enqueue(op)
        conn.kick()
        if desc.length <= _POLL_MAX_BYTES:
            self._poll(conn, op.fut)
        error = await self._finish(op)
        if error is not None:
            raise error

    def _poll(
        self, conn: tcp_client.Connection, reply: asyncio.Future[Any], seconds: float = _POLL_S
    ) -> None:
        """Spin briefly for the reply of a small request (see `tcp_wire.Channel.poll`); after
        repeated misses (a busy or remote server) stop spinning for a while."""
        if self._poll_pause:
            self._poll_pause -= 1
        elif conn.poll(reply, seconds):
            self._poll_misses = 0
        else:
            self._poll_misses += 1
            if self._poll_misses >= _POLL_MISSES:
                self._poll_misses, self._poll_pause = 0, _POLL_PAUSE

    def _fits(self, length: int) -> bool:
        used = self._budget.used_bytes
        return used == 0 or used + length <= self._budget.limit_bytes

    async def _admit(self, op: tcp_client.Op, dirty: set[tcp_client.Connection]) -> None:
        """Take op's bytes from the budget, waiting (until op's deadline) when it is spent."""
        if not op.nbytes:
            return
        if self._fits(op.nbytes):
            await self._budget.acquire(op.nbytes)  # returns at once
            return
        self._kick(dirty)
        try:
            async with asyncio.timeout_at(op.deadline):
                await self._budget.acquire(op.nbytes)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"tcp data plane: no room in the byte budget within {self._settings.timeout_s}s"
            ) from None

    async def _finish(self, op: tcp_client.Op) -> errors.KVTierError | None:
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
            if op.nbytes:
                await self._budget.release(op.nbytes)
        return None

    def _expire(self, op: tcp_client.Op) -> None:
        if op.fut.done():
            return
        verb = tcp_client.VERBS[op.kind]
        op.fut.set_exception(
            errors.DeadlineExceeded(
                f"tcp {verb} of {op.nbytes} bytes took over {self._settings.timeout_s}s"
            )
        )
        op.abandon()

    def _pick(self) -> tcp_client.Connection:
        best: tcp_client.Connection | None = None
        for conn in self._conns:
            if not conn.closed and (best is None or conn.load < best.load):
                best = conn
        if best is None:
            raise base.PeerLost("every tcp data-plane connection to the peer is lost")
        return best

    @staticmethod
    def _kick(dirty: set[tcp_client.Connection]) -> None:
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
    tls, address = tcp_tls.split_address(endpoint.address)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise errors.InvalidArgument(f"tcp endpoint address {endpoint.address!r} is not host:port")
    host = host.strip("[]")
    context = tcp_tls.client_context(settings.tls_ca_file) if tls else None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(settings.timeout_s):
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            results = await asyncio.gather(
                *(_open(loop, infos[0], token, context, host) for _ in range(settings.connections)),
                return_exceptions=True,
            )
    except TimeoutError:
        raise errors.DeadlineExceeded(f"tcp data plane at {endpoint.address}: no answer") from None
    except OSError as exc:
        raise errors.Unavailable(f"tcp data plane at {endpoint.address}: {exc}") from None
    opened = [r for r in results if isinstance(r, tuple)]
    failed = [r for r in results if not isinstance(r, tuple)]
    if failed:
        for sock, _ in opened:
            sock.close()
        first = failed[0]
        if isinstance(first, OSError):
            raise errors.Unavailable(f"tcp data plane at {endpoint.address}: {first}") from first
        raise first
    return Client([tcp_client.Connection(sock, loop, tls) for sock, tls in opened], settings)


async def _open(
    loop: asyncio.AbstractEventLoop, info: Any, token: bytes, context: ssl.SSLContext | None,
    host: str,
) -> tuple[socket.socket, tcp_tls.Session | None]:  # fmt: skip
    """A connected, tuned socket (and its TLS session) whose HELLO the server accepted."""
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    tls = None
    try:
        tcp_wire.tune(sock)
        await loop.sock_connect(sock, address)
        hello = tcp_wire.HELLO.pack(tcp_wire.MAGIC, len(token)) + token
        if context is None:
            await loop.sock_sendall(sock, hello)
            header = await _recv_exactly(loop, sock, tcp_wire.RESPONSE.size)
            _, status, message_len, _ = tcp_wire.RESPONSE.unpack(header)
            size = min(message_len, tcp_wire.MAX_MESSAGE_BYTES)
            message = await _recv_exactly(loop, sock, size)
        else:
            tls = tcp_tls.Session(context, server_side=False, server_hostname=host)
            await tls.handshake(loop, sock, f"{host}:{address[1]}")
            tls.encrypt([hello])
            await tls.flush_async(loop, sock)
            header = await tls.recv_exactly(loop, sock, tcp_wire.RESPONSE.size)
            _, status, message_len, _ = tcp_wire.RESPONSE.unpack(header)
            size = min(message_len, tcp_wire.MAX_MESSAGE_BYTES)
            message = await tls.recv_exactly(loop, sock, size)
        if status != tcp_wire.Status.OK:
            raise tcp_wire.error_of(status, message.decode(errors="replace"))
    except BaseException:
        sock.close()
        raise
    return sock, tls


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise base.PeerLost("tcp data-plane server closed the connection during HELLO")
        got += n
    return bytes(buf)
