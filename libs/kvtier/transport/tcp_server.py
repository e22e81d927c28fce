"""The serving side of the tcp transport: the listener and one connection per client.

Each connection checks, serves and answers its requests (reads, writes and calls) in order; the
protocol is described in `kvtier.transport.tcp`. A call whose handler returns an awaitable holds
the connection's parsing until its plan is in (its payload follows on the stream); one whose
on_received returns an awaitable lets later requests be served, but its reply holds back the
frames queued after it, since the client matches responses to requests in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
from collections.abc import Iterator, Sequence
from typing import ClassVar, overload

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, calls, registry, tcp_tls, tcp_wire

log = logging.getLogger(__name__)

_MAX_OP_BYTES = 1 << 34  # a length beyond this is a broken peer, not a request
_MAX_CALL_BYTES = 1 << 40  # the same for the payload of a call
_HELLO_TIMEOUT_S = 10.0  # a connection that has not presented its token by then is dropped
# Connections that have not presented a token yet: anyone who reaches the port can open them,
# so they are bounded apart from the per-principal bound that applies after HELLO.
_MAX_HANDSHAKING = 1024
# Frames queued on one connection before it stops reading requests. Queued bytes are bounded by
# ServerContext.max_inflight_bytes, but payloads are region memory (never copied) while each
# frame's header, reply and bookkeeping are not: a client that sends small calls and never reads
# their replies would otherwise hold max_inflight_bytes / ~100 objects.
_MAX_QUEUED_FRAMES = 16384
# A call's reply message shorter than this is copied behind its header (one buffer to send).
_JOIN_BYTES = 4 * tcp_wire.KIB
# A call's reply header and status, bound once (each reply packs one).
_RESPONSE, _OK = tcp_wire.RESPONSE, int(tcp_wire.Status.OK)


class _Arriving:
    """A call whose body (message, segment lengths, capacities) or segments are arriving."""

    __slots__ = ("body", "call", "error", "index", "message_len", "method", "n_caps", "n_segs",
                 "payload_len", "request_id", "sinks", "trace")  # fmt: skip

    def __init__(
        self, request_id: int, method: int, message_len: int, payload_len: int, n_segs: int,
        n_caps: int, trace: bytes = b"",
    ) -> None:  # fmt: skip
        self.request_id, self.method = request_id, method
        self.trace = trace  # the caller's span (tracing.wire_context), zeros when untraced
        self.message_len, self.payload_len = message_len, payload_len
        self.n_segs, self.n_caps = n_segs, n_caps
        self.body: bytearray | None = None  # set while a body too long for staging arrives
        self.call: calls.ServerCall | None = None
        self.error: BaseException | None = None  # the handler failed: drain the segments
        self.sinks: Sequence[base.Span | None] = ()
        self.index = 0  # the next segment


class _CallReply(tcp_wire.PartsFrame):
    """A call's reply and its sources; the call finishes once the frame is out (or lost)."""

    __slots__ = ("call",)

    def __init__(self, parts: tcp_wire.Parts, call: calls.ServerCall) -> None:
        super().__init__(parts)
        self.call = call


class _Slot:
    """The place of a call's reply in the send order while its on_received is awaited."""

    __slots__ = ("call", "frame")

    def __init__(self, call: calls.ServerCall) -> None:
        self.call = call
        self.frame: tcp_wire.Frame | None = None


class _ServerConnection(tcp_wire.Channel):
    """One client's connection: HELLO, then requests checked, served and answered in order."""

    def __init__(
        self, server: Server, sock: socket.socket, tls: tcp_tls.Session | None = None
    ) -> None:
        super().__init__(sock, server.loop, tls)
        self._server = server
        self._ctx = server.ctx
        self.principal: str | None = None
        self._identity = ""  # counted in ctx.connections once HELLO is accepted
        self._queued_bytes = 0
        self._paused = False
        # The WRITE payload being received: into (None: drain it), position, length, lease, reply.
        self._rx_into: memoryview | None = None
        self._rx_pos = 0
        self._rx_len = 0
        self._rx_lease = 0
        self._rx_reply = b""
        self._arriving: _Arriving | None = None  # the call whose body or segments arrive
        self._planning = False  # the arriving call's handler is awaited: parse nothing more
        self._awaits = calls.Awaits()  # handlers and on_receiveds being awaited
        # Frames that must wait for an awaited reply before them (the first item is a _Slot);
        # empty unless an on_received is awaited, so sync calls go straight to _out.
        self._held: collections.deque[tcp_wire.Frame | _Slot] = collections.deque()
        self._hello_timer = self._loop.call_later(_HELLO_TIMEOUT_S, self._lost, "no HELLO in time")
        self._set_reading(True)

    def _step(self) -> bool:
        if self._rx_len:
            return self._take_payload()
        if self._planning:
            return self._read_ahead()
        staged = self._tail - self._head
        if self.principal is None:
            if staged >= tcp_wire.HELLO.size:
                magic, size = tcp_wire.HELLO.unpack_from(self._staging, self._head)
                if magic != tcp_wire.MAGIC or size > tcp_wire.MAX_TOKEN_BYTES:
                    raise tcp_wire.ProtocolError("not a kvtier tcp client")
                if staged >= tcp_wire.HELLO.size + size:
                    start = self._head + tcp_wire.HELLO.size
                    self._head = start + size
                    self._hello(bytes(self._view[start : start + size]))
                    return True
        elif staged >= tcp_wire.REQUEST.size:
            if self._staging[self._head] == tcp_wire.CALL:
                call = tcp_wire.CALL_TRACED.unpack_from(self._staging, self._head)
                self._head += tcp_wire.CALL_TRACED.size
                self._call(*call[3:])
            else:
                fields = tcp_wire.REQUEST.unpack_from(self._staging, self._head)
                self._head += tcp_wire.REQUEST.size
                self._request(*fields)
            return True
        return self._recvs_left > 0 and self._fill()  # none left: the socket is drained

    def _hello(self, token: bytes) -> None:
        self._hello_timer.cancel()
        ctx = self._ctx
        try:
            principal = ctx.issuer.check_token(token, tcp_wire.NAME)
            self._identity = ctx.connections.admit(principal, ctx.max_connections_per_principal)
        except errors.KVTierError as exc:
            log.info("tcp data plane: refused a connection: %s", exc)
            self._queue(tcp_wire.Frame(tcp_wire.error_response(0, exc)))
            self.flush()
            self._lost("refused")
            return
        self.principal = principal
        self._server.authenticated(self)
        self._queue(tcp_wire.Frame(tcp_wire.RESPONSE.pack(0, tcp_wire.Status.OK, 0, 0)))

    def _request(
        self, op: int, rights: int, _pad: int, region_id: int, request_id: int, offset: int,
        length: int, expires_at_ms: int, grant_id: int, mac: bytes,
    ) -> None:  # fmt: skip
        if op not in (tcp_wire.READ, tcp_wire.WRITE) or length > _MAX_OP_BYTES:
            raise tcp_wire.ProtocolError(f"bad request: op {op}, length {length}")
        need = base.Rights.READ if op == tcp_wire.READ else base.Rights.WRITE
        try:
            region = self._ctx.issuer.check(
                self._ctx.regions, self.principal or "", need, region_id, offset, length, rights,
                expires_at_ms, mac, grant_id,
            )  # fmt: skip
        except Exception as exc:  # every failure is answered; the connection stays usable
            reply = tcp_wire.error_response(request_id, exc)
            if op == tcp_wire.WRITE and length:
                self._expect(None, length, 0, reply)  # the payload follows anyway: drain it
            else:
                self._queue(tcp_wire.Frame(reply))
            return
        if not length:
            reply = tcp_wire.RESPONSE.pack(request_id, tcp_wire.Status.OK, 0, 0)
            self._queue(tcp_wire.Frame(reply))
            return
        lease = self._ctx.leases.acquire(region_id, offset, length, self, expires_at_ms)
        view = region.view[offset : offset + length]
        if op == tcp_wire.WRITE:
            reply = tcp_wire.RESPONSE.pack(request_id, tcp_wire.Status.OK, 0, 0)
            self._expect(view, length, lease, reply)
        else:
            reply = tcp_wire.RESPONSE.pack(request_id, tcp_wire.Status.OK, 0, length)
            self._queue(tcp_wire.Frame(reply, view, lease))

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
            self._rx_into, self._rx_len = None, 0
            if self._arriving is not None:
                self._call_arrived(self._arriving)
            else:
                self._ctx.leases.release(self._rx_lease)
                self._queue(tcp_wire.Frame(self._rx_reply))
                self._rx_lease = 0
        return True

    def _call(
        self, method: int, request_id: int, message_len: int, payload_len: int, n_segs: int,
        n_caps: int, trace: bytes,
    ) -> None:  # fmt: skip
        """A CALL header: take its body from staging, or receive it into a buffer of its own."""
        if (
            message_len > base.MAX_CALL_MESSAGE_BYTES
            or max(n_segs, n_caps) > base.MAX_CALL_ITEMS
            or payload_len > _MAX_CALL_BYTES
        ):
            raise tcp_wire.ProtocolError(
                f"bad call: {message_len} message bytes, {n_segs} segments, {n_caps} buffers"
            )
        head = _Arriving(request_id, method, message_len, payload_len, n_segs, n_caps, trace)
        body_len = message_len + 8 * (n_segs + n_caps)
        if self._tail - self._head >= body_len:
            body = self._view[self._head : self._head + body_len]
            self._head += body_len
            self._call_body(head, body)
        else:
            head.body = bytearray(body_len)
            self._arriving = head
            self._expect(memoryview(head.body), body_len, 0, b"")

    def _call_arrived(self, head: _Arriving) -> None:
        """The body or a segment of the arriving call is in."""
        if head.body is not None:
            body, head.body = head.body, None
            self._call_body(head, memoryview(body))
        else:
            self._next_segment(head)

    def _call_body(self, head: _Arriving, body: memoryview) -> None:
        """Run the handler on the body, then receive the segments into its sinks."""
        sizes = calls.unpack_u64s(body, head.message_len, head.n_segs + head.n_caps)
        segments, capacities = sizes[: head.n_segs], sizes[head.n_segs :]
        if sum(segments) != head.payload_len:
            raise tcp_wire.ProtocolError(f"call segments do not add up to {head.payload_len}")
        call = head.call = calls.ServerCall(head.request_id, segments, capacities)
        self._arriving = head
        try:
            pending = call.start(
                self._ctx, self.principal or "", head.method, bytes(body[: head.message_len]),
                trace=head.trace,
            )  # fmt: skip
        except Exception as exc:  # answered; the payload that follows is drained
            head.error = exc
        else:
            if pending is not None:  # the sinks are not known yet: parse nothing until they are
                self._planning = True
                self._awaits.run(call, pending, functools.partial(self._planned, head))
                return
            if not head.n_segs:  # nothing to receive (gets, probes): answer now
                self._arriving = None
                self._call_reply(call, None)
                return
            head.sinks = call.sinks()
            call.lease(self._ctx, head.sinks, self)
        self._next_segment(head)

    def _read_ahead(self) -> bool:
        """While a handler is awaited: stage what arrives (so that a hang-up is noticed) without
        parsing it, and stop reading once staging is half full (the rest waits in the socket)."""
        if self._tail - self._head < tcp_wire.STAGING_BYTES // 2:
            return self._fill()
        self._set_reading(False)
        return False

    def _planned(
        self, head: _Arriving, call: calls.ServerCall, plan: object, error: BaseException | None
    ) -> None:
        """The awaited handler is done: receive the segments into its sinks, parse on."""
        with self._guard():
            self._planning = False
            if error is None:
                try:
                    call.planned(plan)
                except Exception as exc:
                    error = exc
                else:
                    head.sinks = call.sinks()
                    call.lease(self._ctx, head.sinks, self)
            head.error = error
            self._next_segment(head)
            self.kick()
            if self._reading:
                self._on_readable()  # what was read ahead waits in staging
            else:
                self._resume()

    def _next_segment(self, head: _Arriving) -> None:
        """Receive the next segment into its sink (None: drain it), or answer once all are in."""
        assert head.call is not None
        segments, sinks = head.call.segments, head.sinks
        while head.index < len(segments):
            index = head.index
            head.index += 1
            if segments[index]:
                sink = sinks[index] if index < len(sinks) else None
                self._expect(sink.view() if sink is not None else None, segments[index], 0, b"")
                return
        self._arriving = None
        self._call_reply(head.call, head.error)

    def _call_reply(self, call: calls.ServerCall, error: BaseException | None) -> None:
        """Every segment of a call is in: run on_received (awaited when it returns an
        awaitable, its reply keeping its place in the send order), then answer."""
        reply: object = None
        if error is None:
            try:
                reply = call.receive()
            except Exception as exc:
                error = exc
            else:
                if type(reply) is not bytes and calls.is_pending(reply):
                    slot = _Slot(call)
                    self._held.append(slot)
                    self._awaits.run(call, reply, functools.partial(self._received, slot))
                    if len(self._awaits) >= calls.MAX_AWAITING:
                        self._set_reading(False)  # backpressure: resumed as they complete
                    return
        frame = self._answer(call, reply, error, now=True)
        if frame is not None:
            self._queue(frame)

    def _received(
        self, slot: _Slot, call: calls.ServerCall, reply: object, error: BaseException | None
    ) -> None:
        """An awaited on_received is done: its reply takes its place, and the frames held
        behind it go out as far as the next reply still awaited."""
        with self._guard():
            frame = slot.frame = self._answer(call, reply, error)
            self._count(frame)
            held, out = self._held, self._out
            while held:
                item = held[0]
                if isinstance(item, _Slot):
                    if item.frame is None:
                        break
                    item = item.frame
                held.popleft()
                out.append(item)
            self.kick()
            self._resume()

    @overload
    def _answer(
        self, call: calls.ServerCall, reply: object, error: BaseException | None
    ) -> tcp_wire.Frame: ...
    @overload
    def _answer(
        self, call: calls.ServerCall, reply: object, error: BaseException | None, *, now: bool
    ) -> tcp_wire.Frame | None: ...
    def _answer(
        self, call: calls.ServerCall, reply: object, error: BaseException | None, *,
        now: bool = False,
    ) -> tcp_wire.Frame | None:  # fmt: skip
        """The frame that answers a call: its error, or its reply and sources (leased until
        the frame is out). The sinks' leases end here. now: when nothing is queued before it,
        the reply is sent at once, in one sendmsg; None when all of it went (no frame, no
        lease: its bytes are in the kernel), else the frame of what is left."""
        if call.leases:
            call.unlease(self._ctx)
        try:
            if error is not None:
                raise error
            message, sources = call.replied(reply)
        except Exception as exc:
            call.finish(False)
            return tcp_wire.Frame(tcp_wire.error_response(call.request_id, exc))
        if sources:
            lengths = [source.length if source is not None else 0 for source in sources]
            payload, tail = sum(lengths), calls.pack_u64s(lengths)
        else:  # no receive buffers (probes): no lengths to pack
            payload, tail = 0, b""
        header = _RESPONSE.pack(call.request_id, _OK, len(message), payload)
        items: list[bytes | memoryview]
        if len(message) < _JOIN_BYTES:
            items = [b"".join((header, message, tail))]
            sizes = [len(items[0])]
        else:
            items = [header, message, tail]
            sizes = [len(header), len(message), len(tail)]
        if payload:
            for source in sources:
                if source is not None and source.length:
                    items.append(source.view())
                    sizes.append(source.length)
        sent = self._send_now(items) if now else 0
        if sent == len(header) + len(message) + len(tail) + payload:
            call.finish(True)
            return None
        call.lease(self._ctx, sources, self)
        frame = _CallReply(tcp_wire.Parts(items, sizes), call)
        frame.sent = sent
        return frame

    def _send_now(self, items: list[bytes | memoryview]) -> int:
        """Send items in one sendmsg when nothing waits before them; how many bytes went (0
        when they must be queued: a failure is found again by the flush that follows)."""
        if (
            self._out
            or self._held
            or self._writing
            or self._tls is not None
            or self.closed
            or len(items) > tcp_wire.IOV_LIMIT
        ):
            return 0
        try:
            return self.sock.sendmsg(items)
        except OSError:
            return 0

    def _queue(self, frame: tcp_wire.Frame) -> None:
        if self._held:
            self._held.append(frame)  # an awaited reply comes first
        else:
            self._out.append(frame)
        self._count(frame)

    def _count(self, frame: tcp_wire.Frame) -> None:
        self._queued_bytes += frame.size
        if self._paused:
            return
        if (
            self._queued_bytes > self._ctx.max_inflight_bytes
            or len(self._out) + len(self._held) > _MAX_QUEUED_FRAMES
        ):
            self._paused = True  # the client is not taking its replies: stop taking requests
            self._set_reading(False)

    def _sent(self, frame: tcp_wire.Frame) -> None:
        if frame.lease:
            self._ctx.leases.release(frame.lease)
        elif isinstance(frame, _CallReply):
            frame.call.unlease(self._ctx)
            frame.call.finish(True)
        self._queued_bytes -= frame.size
        if (
            self._paused
            and self._queued_bytes <= self._ctx.max_inflight_bytes // 2
            and len(self._out) + len(self._held) <= _MAX_QUEUED_FRAMES // 2
        ):
            self._paused = False
            self._resume()

    def _resume(self) -> None:
        """Read again unless something still holds reading: too many bytes queued, a handler
        awaited, or MAX_AWAITING awaits pending."""
        if (
            self._reading
            or self.closed
            or self._paused
            or self._planning
            or len(self._awaits) >= calls.MAX_AWAITING
        ):
            return
        self._set_reading(True)
        self._loop.call_soon(self._on_readable)  # requests may wait in staging already

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """For callbacks other than the reader's: a failure drops this connection only."""
        try:
            yield
        except (OSError, tcp_wire.ProtocolError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("tcp data plane: unexpected error on a connection")
            self._lost("internal error")

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        log.debug("tcp data plane: connection of %s closed: %s", self.principal, reason)
        self._hello_timer.cancel()
        self._awaits.cancel()  # nothing they return may touch this connection any more
        unfinished = [f.call for f in self._out if isinstance(f, _CallReply)]
        unfinished += [i.call for i in self._held if isinstance(i, _Slot | _CallReply)]
        if self._arriving is not None and self._arriving.call is not None:
            unfinished.append(self._arriving.call)
        self._shut()
        self._rx_into, self._arriving = None, None
        self._held.clear()
        self._ctx.leases.release_owner(self)
        for call in unfinished:
            call.finish(False)
        if self._identity:
            self._ctx.connections.release(self._identity)
            self._identity = ""
        self._server.forget(self)

    def close(self) -> None:
        """Drop the connection now (its client's pending operations fail with PeerLost)."""
        self._lost("server stopping")


class Server:
    """Serves a node's regions over TCP (see `kvtier.transport.tcp` for the protocol)."""

    name: ClassVar[str] = tcp_wire.NAME
    loop: asyncio.AbstractEventLoop  # set by start

    def __init__(self, ctx: base.ServerContext, settings: registry.ServerSettings) -> None:
        self.ctx = ctx
        self._settings = settings
        self._listener: socket.socket | None = None
        self._conns: set[_ServerConnection] = set()
        self._handshaking: set[_ServerConnection] = set()  # no HELLO accepted yet
        self._scratch: memoryview | None = None
        self._credentials = (
            tcp_tls.ServerCredentials(settings.tls_cert_file, settings.tls_key_file)
            if settings.tls
            else None
        )

    @property
    def scratch(self) -> memoryview:
        """Where rejected WRITE payloads are drained (shared: its contents never matter)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(tcp_wire.SINK_BYTES))
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
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tcp_wire.SOCKET_BUFFER_BYTES)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._on_accept)
        port = listener.getsockname()[1]
        scheme = tcp_tls.SCHEME if self._credentials is not None else ""
        return common_pb2.TransportEndpoint(
            name=tcp_wire.NAME, address=f"{scheme}{self._settings.advertise_host}:{port}"
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
            if len(self._handshaking) >= _MAX_HANDSHAKING:
                log.warning("tcp data plane: %d connections without HELLO; refusing more",
                            len(self._handshaking))  # fmt: skip
                sock.close()
                continue
            try:
                tcp_wire.tune(sock)
            except OSError:
                sock.close()
                continue
            tls = None
            if self._credentials is not None:
                tls = tcp_tls.Session(self._credentials.context(), server_side=True)
            conn = _ServerConnection(self, sock, tls)
            self._conns.add(conn)
            self._handshaking.add(conn)

    def authenticated(self, conn: _ServerConnection) -> None:
        """A connection's HELLO was accepted."""
        self._handshaking.discard(conn)

    def forget(self, conn: _ServerConnection) -> None:
        """A connection has closed."""
        self._conns.discard(conn)
        self._handshaking.discard(conn)

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
