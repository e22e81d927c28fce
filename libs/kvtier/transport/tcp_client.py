"""The client side of the tcp transport's connections: ops (READ, WRITE, CALL) and the pipelined
connection that sends them and routes the responses' payloads into the callers' buffers.

The protocol is described in `kvtier.transport.tcp`, whose `Client` spreads ops over these.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Sequence

from kvtier import errors, tracing
from kvtier.transport import base, calls, tcp_tls, tcp_wire

log = logging.getLogger(__name__)

_DIRECT_MIN_BYTES = 4 * tcp_wire.KIB  # a client never stages READ payloads from this size up
_PER_OP_LOAD = 256  # what an op costs in the least-loaded choice besides its bytes
# A call's request message shorter than this is copied behind its header (one buffer to send).
_JOIN_BYTES = 4 * tcp_wire.KIB
# Call replies: staged with their header when this short, so that one recv brings the header, the
# reply message, the lengths and the start of the payload (copied out: cheaper than a syscall).
_CALL_PEEK_BYTES = 1 * tcp_wire.KIB
# A call reply's header, message and lengths wait in staging up to this size (there is always
# this much room, see Channel._fill); a longer one gets a buffer of its own.
_STAGED_REPLY_BYTES = 4 * tcp_wire.KIB


_QUEUED, _DONE = 1, 2
_NO_BUF = memoryview(b"")
#: What each kind of op is called in error messages.
VERBS = {tcp_wire.READ: "read", tcp_wire.WRITE: "write", tcp_wire.CALL: "call"}


class Op(tcp_wire.Frame):
    """One READ, WRITE or CALL: the request frame, the caller's buffer and the completion future.

    `nbytes` is what the op takes from the byte budget (and counts for in the connection load).
    """

    __slots__ = ("buf", "conn", "deadline", "fut", "kind", "nbytes", "request_id", "state")

    def __init__(
        self,
        kind: int,
        header: bytes,
        buf: memoryview,
        nbytes: int,
        request_id: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(header, buf if kind == tcp_wire.WRITE else None)
        self.kind = kind
        self.buf = buf
        self.nbytes = nbytes
        self.request_id = request_id
        self.fut: asyncio.Future[None] = loop.create_future()
        self.conn: Connection | None = None
        self.deadline = 0.0
        self.state = 0

    def abandon(self) -> None:
        """The caller stops waiting: no byte may touch its buffer from now on."""
        if not self.fut.done():
            self.fut.cancel()
        if self.conn is not None:
            self.conn.abandon(self)

    def own_unsent(self) -> None:
        """Copy the payload that has not gone out yet: the caller may reuse its buffer."""
        if self.payload is not None:
            self.payload = memoryview(bytes(self.payload))


def rw_op(
    kind: int, desc: base.Descriptor, buf: memoryview, request_id: int,
    loop: asyncio.AbstractEventLoop,
) -> Op:  # fmt: skip
    """A READ or WRITE of the described range."""
    try:
        header = tcp_wire.REQUEST.pack(
            kind, int(desc.rights), 0, desc.region_id, request_id, desc.offset, desc.length,
            desc.expires_at_ms, desc.grant_id, desc.mac,
        )  # fmt: skip
    except struct.error as exc:
        raise errors.InvalidArgument(f"descriptor field out of range: {exc}") from None
    return Op(kind, header, buf, desc.length, request_id, loop)


class CallOp(Op):
    """One CALL: request message and segments out (as `Parts`), reply and payloads back.

    The reply's payloads land in `intos` (the caller's buffers) in order; `lengths` says how
    much each got. `body` receives a reply message too long to pass through staging.
    """

    __slots__ = ("body", "capacity", "index", "intos", "lengths", "parts", "reply", "total")

    def __init__(
        self, method: int, message: memoryview, segments: Sequence[memoryview],
        intos: Sequence[memoryview], request_id: int, loop: asyncio.AbstractEventLoop,
    ) -> None:  # fmt: skip
        # Gets and probes (the short path's every call) carry no segments, probes no buffers:
        # their empty lists and sums are not built per call.
        seg_lengths = [seg.nbytes for seg in segments] if segments else []
        capacities = [into.nbytes for into in intos] if intos else []
        payload = sum(seg_lengths) if segments else 0
        trace = tracing.wire_context()  # b"" unless a sampled span is current
        if trace:
            header = tcp_wire.CALL_TRACED.pack(
                tcp_wire.CALL, 0, 0, method, request_id, message.nbytes, payload,
                len(segments), len(intos), trace,
            )  # fmt: skip
        else:
            header = tcp_wire.CALL_REQUEST.pack(
                tcp_wire.CALL, 0, 0, method, request_id, message.nbytes, payload,
                len(segments), len(intos),
            )  # fmt: skip
        lengths = calls.pack_u64s(seg_lengths + capacities) if segments or intos else b""
        items: list[bytes | memoryview]
        if message.nbytes < _JOIN_BYTES:
            items = [b"".join((header, message, lengths))]
            sizes = [len(items[0])]
        else:
            items = [header, message, lengths]
            sizes = [len(header), message.nbytes, len(lengths)]
        if payload:
            for seg, length in zip(segments, seg_lengths, strict=True):
                if length:
                    items.append(seg)
                    sizes.append(length)
        self.capacity = sum(capacities) if intos else 0
        super().__init__(tcp_wire.CALL, b"", _NO_BUF, payload + self.capacity, request_id, loop)
        self.parts = tcp_wire.Parts(items, sizes)
        self.size = self.parts.size
        self.intos = intos
        self.reply = b""
        self.lengths: tuple[int, ...] = ()
        self.body: bytearray | None = None
        self.index = 0  # the receive buffer whose payload arrives
        self.total = 0  # payload bytes in the reply

    def unsent(self, iov: list[bytes | memoryview]) -> int:
        """Append what is left to send to iov (up to IOV_LIMIT buffers); returns its size."""
        return self.parts.unsent(iov, self.sent)

    def own_unsent(self) -> None:
        """Copy the segments that have not gone out yet."""
        self.parts.own()


class Connection(tcp_wire.Channel):
    """One pipelined connection to the server: requests out in order, responses back in order."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        tls: tcp_tls.Session | None = None,
    ) -> None:
        super().__init__(sock, loop, tls)
        self._pending: collections.deque[Op] = collections.deque()  # awaiting their responses
        self._rx: Op | None = None  # the READ whose payload is arriving
        self._rx_call: CallOp | None = None  # the CALL whose reply body or payload is arriving
        self._rx_pos = 0
        self._sink: memoryview | None = None
        self.load = 0
        self._set_reading(True)

    def enqueue(self, op: Op) -> None:
        """Queue op to be sent (by `kick`); its future completes with its response."""
        op.conn, op.state = self, _QUEUED
        self._pending.append(op)
        self._out.append(op)
        self.load += op.nbytes + _PER_OP_LOAD

    def send_now(self, op: CallOp) -> None:
        """`enqueue` and `kick` for a call without segments: sent in one sendmsg when nothing
        is queued before it (no iov gathered, no frame bookkeeping), else queued as usual."""
        op.conn, op.state = self, _QUEUED
        self._pending.append(op)
        self.load += op.nbytes + _PER_OP_LOAD
        if self._out or self._tls is not None or self.closed:
            self._out.append(op)
            self.kick()
            return
        try:
            sent = self.sock.sendmsg(op.parts.items)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        op.sent = sent  # what went out (`abandon` tells a call that left from one that did not)
        if sent < op.size:  # the socket is full: the rest goes as any queued frame's does
            self._out.append(op)
            self.flush()

    def abandon(self, op: Op) -> None:
        """Forget op if it has not left yet; else keep the stream intact without its buffer."""
        if op.state != _QUEUED or self.closed:
            return
        if op.sent == 0:
            self._out.remove(op)
            self._pending.remove(op)
            self._done(op, None)
        elif op.sent < op.size:
            op.own_unsent()  # rare: the caller may reuse its buffer
        # A READ's or CALL's payload goes to the sink from now on (its future is done).

    def _step(self) -> bool:
        if self._rx is not None:
            return self._take_payload()
        if self._rx_call is not None:
            return self._take_call(self._rx_call)
        if self._pending and isinstance(self._pending[0], CallOp):
            return self._call_response(self._pending[0])
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
        if front.kind == tcp_wire.READ and front.nbytes >= _DIRECT_MIN_BYTES:
            return self._fill(need - staged)  # stop at the header: the payload goes to its buffer
        return self._fill()

    def _response(self, request_id: int, status: int, message: str, length: int) -> None:
        if not self._pending or self._pending[0].request_id != request_id:
            raise tcp_wire.ProtocolError(f"response {request_id} out of order")
        op = self._pending.popleft()
        if status != tcp_wire.Status.OK:
            self._done(op, tcp_wire.error_of(status, message))
        elif op.kind == tcp_wire.READ and length != op.nbytes:
            raise tcp_wire.ProtocolError(f"response of {length} bytes to a read of {op.nbytes}")
        elif op.kind == tcp_wire.READ and length:
            self._rx, self._rx_pos = op, 0
        else:
            self._done(op, None)

    def _take_payload(self) -> bool:
        op = self._rx
        assert op is not None
        need = op.nbytes - self._rx_pos
        got = self._receive(op.buf[self._rx_pos :] if not op.fut.done() else None, need)
        if not got:
            return False
        self._rx_pos += got
        if self._rx_pos == op.nbytes:
            self._rx = None
            self._done(op, None)
        return True

    def _receive(self, into: memoryview | None, need: int) -> int:
        """Take up to need payload bytes (staged ones first) into `into` (len == need), or into
        the sink when None (the op was abandoned); returns how many."""
        if self._tail > self._head:
            return self._unstage(into, need)
        if into is not None:
            return self._recv(into)
        if self._sink is None:
            self._sink = memoryview(bytearray(tcp_wire.SINK_BYTES))
        return self._recv(self._sink[:need])

    def _call_response(self, op: CallOp) -> bool:
        """Parse the reply to the CALL at the front: an error, or the reply header and (when it
        fits staging) its message and lengths; a longer body gets a buffer of its own."""
        staged = self._tail - self._head
        need = tcp_wire.RESPONSE.size
        direct = op.capacity >= _DIRECT_MIN_BYTES
        if staged >= need:
            request_id, status, message_len, length = tcp_wire.RESPONSE.unpack_from(
                self._staging, self._head
            )
            if request_id != op.request_id:
                raise tcp_wire.ProtocolError(f"response {request_id} out of order")
            if status != tcp_wire.Status.OK:
                return self._call_error(op, status, message_len)
            if message_len > base.MAX_CALL_MESSAGE_BYTES or length > op.capacity:
                raise tcp_wire.ProtocolError(f"call reply of {message_len}+{length} bytes")
            start = self._head + tcp_wire.RESPONSE.size
            need += message_len + 8 * len(op.intos)
            op.total = length
            if staged >= need:
                op.reply = bytes(self._view[start : start + message_len])
                op.lengths = calls.unpack_u64s(self._staging, start + message_len, len(op.intos))
                self._head += need
                self._pending.popleft()
                self._call_payload(op)
                return True
            if need > _STAGED_REPLY_BYTES:  # may not fit staging: receive it into its own buffer
                self._head = start
                op.body = bytearray(need - tcp_wire.RESPONSE.size)
                self._pending.popleft()
                self._rx_call, self._rx_pos = op, 0
                return True
        return self._fill(need - staged + _CALL_PEEK_BYTES) if direct else self._fill()

    def _call_error(self, op: CallOp, status: int, message_len: int) -> bool:
        if message_len > tcp_wire.MAX_MESSAGE_BYTES:
            raise tcp_wire.ProtocolError("oversized error message")
        need = tcp_wire.RESPONSE.size + message_len
        if self._tail - self._head < need:
            return self._fill()
        message = bytes(self._view[self._head + tcp_wire.RESPONSE.size : self._head + need])
        self._head += need
        self._pending.popleft()
        self._done(op, tcp_wire.error_of(status, message.decode(errors="replace")))
        return True

    def _take_call(self, op: CallOp) -> bool:
        """Receive the reply body that did not fit staging, or the payload for op.intos."""
        if op.body is not None:
            return self._take_call_body(op, op.body)
        length = op.lengths[op.index]
        into = op.intos[op.index][self._rx_pos : length] if not op.fut.done() else None
        got = self._receive(into, length - self._rx_pos)
        if not got:
            return False
        self._rx_pos += got
        if self._rx_pos == length:
            self._rx_pos = 0
            self._next_into(op, op.index + 1)
        return True

    def _take_call_body(self, op: CallOp, body: bytearray) -> bool:
        got = self._receive(memoryview(body)[self._rx_pos :], len(body) - self._rx_pos)
        if not got:
            return False
        self._rx_pos += got
        if self._rx_pos == len(body):
            message_len = len(body) - 8 * len(op.intos)
            op.reply = bytes(body[:message_len])
            op.lengths = calls.unpack_u64s(body, message_len, len(op.intos))
            op.body = None
            self._call_payload(op)
        return True

    def _call_payload(self, op: CallOp) -> None:
        """The reply's lengths are in: receive the payload into the buffers that get bytes."""
        # Without receive buffers (probes) there are no lengths, and total is 0 (checked
        # against the capacity): nothing to check.
        if op.intos and (
            sum(op.lengths) != op.total
            or any(n > into.nbytes for n, into in zip(op.lengths, op.intos, strict=True))
        ):
            raise tcp_wire.ProtocolError("call reply lengths do not fit the receive buffers")
        self._rx_pos = 0
        if op.total and len(op.intos) == 1 and not op.fut.done():
            self._one_into(op, op.intos[0][: op.total])
        else:
            self._next_into(op, 0)

    def _one_into(self, op: CallOp, into: memoryview) -> None:
        """The payload of a call with one receive buffer (a single get): the staged bytes, then
        straight from the socket, in this turn as far as it has them (what `_take_call` does,
        without a parser step per recv); the rest, if any, arrives through `_take_call`."""
        op.index, self._rx_call = 0, op  # a connection lost meanwhile fails op (`_lost`)
        need = into.nbytes
        got = self._unstage(into, need) if self._tail > self._head else 0
        while got < need:
            self._rx_pos = got
            more = self._recv(into[got:])
            if not more:
                return
            got += more
        self._rx_pos, self._rx_call = 0, None
        self._done(op, None)

    def _next_into(self, op: CallOp, index: int) -> None:
        """Point at the next buffer that gets bytes, or complete op when none is left."""
        lengths = op.lengths
        while index < len(lengths) and not lengths[index]:
            index += 1
        if index == len(lengths):
            self._rx_call = None
            self._done(op, None)
        else:
            op.index = index
            self._rx_call = op

    def _done(self, op: Op, exc: errors.KVTierError | None) -> None:
        op.state = _DONE
        self.load -= op.nbytes + _PER_OP_LOAD
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
        if self._rx_call is not None:
            pending.appendleft(self._rx_call)
            self._rx_call = None
        for op in pending:
            self._done(op, base.PeerLost(f"tcp data-plane connection lost: {reason}"))

    def close(self) -> None:
        """Close now; pending operations fail with PeerLost."""
        self._lost("closed by the client")
