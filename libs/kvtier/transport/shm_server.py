"""The serving side of the shm transport: a listener in a private directory and, per client, a
connection that checks descriptors, holds leases and hands region fds over (protocol and trust
model in `kvtier.transport.shm`). A call whose handler or on_received returns an awaitable waits
for it in a task while the connection serves other requests (replies carry their request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import socket
import struct
from collections.abc import Awaitable, Sequence
from typing import Any, ClassVar

from kvtier import errors, tracing
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, calls, registry, shm_wire

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 10.0
# What one connection may hold at once (a client that never releases would otherwise grow the
# server's tables without end): ranges leased by LEASE and not released or committed yet (the
# client leases at most a few windows of MAX_ITEMS ahead), and calls whose plan is open or awaited.
_MAX_HELD_ITEMS = 64 * shm_wire.MAX_ITEMS
_MAX_OPEN_CALLS = 4096


class _ServerConnection(shm_wire.Channel):
    """One client's connection: its principal, its leases, the regions it has been handed."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._ctx = server.ctx
        self.principal: str | None = None
        self._identity = ""  # counted in ctx.connections once HELLO is accepted
        self._held: dict[int, list[int]] = {}  # request id -> lease ids
        self._held_items = 0  # lease ids in _held
        self._handed: dict[int, bool] = {}  # region id -> writable fd handed
        # Calls whose plan is open, by request id: (call, replied). Not replied: the client is
        # filling the sinks (CALL_DONE or RELEASE next); replied: it is copying the sources out.
        self._calls: dict[int, tuple[calls.ServerCall, bool]] = {}
        # Calls whose handler or on_received is awaited, by request id; a RELEASE marks one
        # abandoned (the client gave up): it ends with on_done(False) and nothing is sent.
        self._awaiting: dict[int, calls.ServerCall] = {}
        self._awaits = calls.Awaits()
        self._reading = True  # False while MAX_AWAITING awaits are pending (backpressure)
        self._incoming = shm_wire.Reassembler()  # CALLs arrive in pieces
        self._rbuf = bytearray(shm_wire.MAX_MESSAGE)
        self._rview = memoryview(self._rbuf)
        super().__init__(sock, asyncio.get_running_loop())
        self._hello_timer: asyncio.TimerHandle | None = self.loop.call_later(
            _HELLO_TIMEOUT_S, self._broken, "no HELLO in time"
        )

    def reject(self, exc: errors.KVTierError) -> None:
        """Tell the client why it is refused, then hang up."""
        text = exc.message.encode()[: shm_wire.MAX_ERROR_TEXT]
        self.send(
            shm_wire.HEADER.pack(shm_wire.WELCOME, shm_wire.code_of(exc), len(text), 0) + text
        )
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
        elif size > len(self._rbuf) or size < shm_wire.HEADER.size:
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
        kind, flags, count, request = shm_wire.HEADER.unpack_from(msg)
        if kind == shm_wire.HELLO and self.principal is None:
            self._hello(flags, bytes(msg[shm_wire.HEADER.size : shm_wire.HEADER.size + count]))
        elif self.principal is None:
            self._broken(f"message {kind} before HELLO")
        elif kind == shm_wire.LEASE:
            (releases,) = shm_wire.COUNT.unpack_from(msg, shm_wire.HEADER.size)
            start = shm_wire.HEADER.size + shm_wire.COUNT.size
            self._release_all(msg, start, releases)
            self._lease(flags, count, request, msg, start + shm_wire.REQUEST.size * releases)
        elif kind == shm_wire.RELEASE:
            self._release_all(msg, shm_wire.HEADER.size, count)
            if len(msg) != shm_wire.HEADER.size + shm_wire.REQUEST.size * count:
                raise ValueError(f"RELEASE of {count} requests in {len(msg)} bytes")
        elif kind == shm_wire.COMMIT:
            self._release(request)
            self.send(shm_wire.HEADER.pack(shm_wire.COMMITTED, 0, 0, request))
        elif kind in (shm_wire.CALL, shm_wire.MORE):
            self._call_piece(count, msg)
        elif kind == shm_wire.CALL_DONE:
            entry = self._calls.get(request)
            if entry is not None and not entry[1]:
                self._reply(entry[0])
        else:
            self._broken(f"unexpected message type {kind}")

    def _hello(self, version: int, token: bytes) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if version != shm_wire.VERSION:
            self.reject(errors.InvalidArgument(f"shm protocol {version} unsupported"))
            return
        ctx = self._ctx
        try:
            principal = ctx.issuer.check_token(token, shm_wire.NAME)
            self._identity = ctx.connections.admit(principal, ctx.max_connections_per_principal)
        except (errors.PermissionDenied, errors.Overloaded) as exc:
            log.info("shm data plane: refused a connection: %s", exc)
            self.reject(exc)
            return
        self.principal = principal
        self.send(shm_wire.HEADER.pack(shm_wire.WELCOME, 0, 0, 0))

    def _release_all(self, msg: memoryview, start: int, count: int) -> None:
        for (request,) in shm_wire.REQUEST.iter_unpack(
            msg[start : start + shm_wire.REQUEST.size * count]
        ):
            self._release(request)

    def _lease(self, flags: int, count: int, request: int, msg: memoryview, start: int) -> None:
        assert self.principal is not None
        need = shm_wire.NEEDS.get(flags)
        if need is None or not 0 < count <= shm_wire.MAX_ITEMS:
            raise ValueError(f"LEASE of {count} items needing {flags}")
        ctx, end = self._ctx, start + shm_wire.ITEM.size * count
        if len(msg) != end:
            raise ValueError(f"LEASE of {count} items in {len(msg)} bytes")
        if self._held_items + count > _MAX_HELD_ITEMS:
            self._refuse_lease(count, request, errors.Overloaded(
                f"{self._held_items} ranges leased on this connection and not released"
            ))  # fmt: skip
            return
        writable = need is base.Rights.WRITE
        statuses = bytearray(count)
        first, first_text, leases = shm_wire.NO_ERROR, b"", []
        fd_entries: list[bytes] = []
        fds: list[int] = []
        for index, fields in enumerate(shm_wire.ITEM.iter_unpack(msg[start:end])):
            region_id, offset, length, rights, expires_at_ms, grant_id, mac = fields
            try:
                region = ctx.issuer.check(
                    ctx.regions, self.principal, need, region_id, offset, length, rights,
                    expires_at_ms, mac, grant_id,
                )  # fmt: skip
            except errors.KVTierError as exc:
                statuses[index] = shm_wire.code_of(exc)
                if first == shm_wire.NO_ERROR:
                    first, first_text = index, exc.message.encode()[: shm_wire.MAX_ERROR_TEXT]
                continue
            leases.append(ctx.leases.acquire(region_id, offset, length, self, expires_at_ms))
            if region_id not in self._handed or (writable and not self._handed[region_id]):
                fds.append(shm_wire.handover_fd(region, writable))
                fd_entries.append(shm_wire.FD_ENTRY.pack(region_id, region.size, writable))
                self._handed[region_id] = writable
        if leases:
            self._held[request] = leases
            self._held_items += len(leases)
        code = statuses[first] if first != shm_wire.NO_ERROR else 0
        info = shm_wire.ACK_INFO.pack(len(fds), first, len(first_text), code)
        header = shm_wire.HEADER.pack(shm_wire.ACK, 0, count, request)
        self.send(b"".join((header, info, statuses, *fd_entries, first_text)), fds)

    def _refuse_lease(self, count: int, request: int, exc: errors.KVTierError) -> None:
        """ACK every item of a LEASE with exc (nothing leased)."""
        code, text = shm_wire.code_of(exc), exc.message.encode()[: shm_wire.MAX_ERROR_TEXT]
        info = shm_wire.ACK_INFO.pack(0, 0, len(text), code)
        header = shm_wire.HEADER.pack(shm_wire.ACK, 0, count, request)
        self.send(b"".join((header, info, bytes([code]) * count, text)))

    def _release(self, request: int) -> None:
        held = self._held.pop(request, ())
        self._held_items -= len(held)
        for lease_id in held:
            self._ctx.leases.release(lease_id)
        entry = self._calls.pop(request, None)
        if entry is not None:  # the client is done with a call: its sources went out, or it quit
            call, replied = entry
            call.unlease(self._ctx)
            call.finish(replied)
        elif request in self._awaiting:  # it quit while we await: that ends the call after it
            self._awaiting[request].abandoned = True

    def _call_piece(self, count: int, msg: memoryview) -> None:
        """A CALL, or a MORE of one: serve it once its body is complete."""
        if count:
            raise ValueError("a client passed fds")
        _, done = self._incoming.feed(msg, 0)
        if done is not None:
            kind, request, body = done
            if kind != shm_wire.CALL:
                raise ValueError(f"long message {kind} from a client")
            self._call(request, body)

    def _call(self, request: int, body: memoryview) -> None:
        """Run the handler; then hand out the sinks (the client fills them) or answer."""
        method, message_len, n_segs, n_caps, n_releases = shm_wire.CALL_INFO.unpack_from(body)
        start = shm_wire.CALL_INFO.size + 4 * n_releases
        end = start + message_len + 8 * (n_segs + n_caps)
        if (
            message_len > base.MAX_CALL_MESSAGE_BYTES
            or max(n_segs, n_caps) > base.MAX_CALL_ITEMS
            or (body.nbytes != end and body.nbytes != end + tracing.WIRE_BYTES)
        ):
            raise ValueError(f"CALL of {body.nbytes} bytes does not add up")
        if n_releases:
            self._release_all(body, shm_wire.CALL_INFO.size, n_releases)
        if len(self._calls) + len(self._awaiting) >= _MAX_OPEN_CALLS:
            self._call_error(request, errors.Overloaded(
                f"{_MAX_OPEN_CALLS} calls open on this connection; release some first"
            ))  # fmt: skip
            return
        sizes_at = start + message_len
        sizes = calls.unpack_u64s(body, sizes_at, n_segs + n_caps)
        call = calls.ServerCall(request, sizes[:n_segs], sizes[n_segs:])
        try:
            pending = call.start(
                self._ctx, self.principal or "", method, bytes(body[start:sizes_at]),
                local_writer=True, trace=bytes(body[end:]) if body.nbytes > end else b"",
            )  # fmt: skip
        except Exception as exc:  # answered; the connection stays usable
            self._call_error(request, exc)
            return
        if pending is not None:
            self._await(call, pending, self._planned)
            return
        self._serve(call)

    def _serve(self, call: calls.ServerCall) -> None:
        """The plan is made: hand out the sinks (the client fills them) or answer."""
        request = call.request_id
        sinks = call.sinks()
        if not any(sink is not None and sink.length for sink in sinks):
            self._reply(call)
            return
        call.lease(self._ctx, sinks, self)
        self._calls[request] = (call, False)
        spans, entries, fds = self._spans(sinks, len(call.segments), writable=True)
        shm_wire.send_long(self, shm_wire.SINKS, request, spans, entries, fds)

    def _reply(self, call: calls.ServerCall) -> None:
        """The sinks are filled (or there were none): run on_received (awaited when it returns an
        awaitable), then send reply and sources."""
        try:
            reply = call.receive()  # on failure, the call is finished already
        except Exception as exc:
            self._calls.pop(call.request_id, None)
            call.unlease(self._ctx)
            self._call_error(call.request_id, exc)
            return
        if type(reply) is not bytes and calls.is_pending(reply):
            self._calls.pop(call.request_id, None)  # a RELEASE now marks it abandoned instead
            self._await(call, reply, self._received)
            return
        self._send_reply(call, reply)

    def _send_reply(self, call: calls.ServerCall, reply: object) -> None:
        """Send the reply and the sources (leased until the client releases the call)."""
        call.unlease(self._ctx)  # the sinks' leases: on_received is done with them
        try:
            message, sources = call.replied(reply)  # on failure, the call is finished already
        except Exception as exc:
            self._calls.pop(call.request_id, None)
            self._call_error(call.request_id, exc)
            return
        call.lease(self._ctx, sources, self)
        spans, entries, fds = self._spans(sources, len(sources), writable=False)
        info = shm_wire.REPLY_INFO.pack(0, len(message), len(sources))
        body = b"".join((info, message, spans))
        shm_wire.send_long(self, shm_wire.CALL_REPLY, call.request_id, body, entries, fds)
        if call.leases:
            self._calls[call.request_id] = (call, True)
        else:  # nothing to copy out: no RELEASE will come
            self._calls.pop(call.request_id, None)
            call.finish(True)

    def _await(
        self, call: calls.ServerCall, awaitable: Awaitable[Any], then: calls.Then[Any]
    ) -> None:
        self._awaiting[call.request_id] = call
        self._awaits.run(call, awaitable, functools.partial(self._awaited, then))
        if len(self._awaits) >= calls.MAX_AWAITING and self._reading:
            self._reading = False  # backpressure: read on as they complete
            self.loop.remove_reader(self.sock.fileno())

    def _awaited(
        self,
        then: calls.Then[Any],
        call: calls.ServerCall,
        result: object,
        error: BaseException | None,
    ) -> None:
        """An awaited handler or on_received is done (the connection is open: a closing one
        cancels its awaits, and their outcomes never come here)."""
        self._awaiting.pop(call.request_id, None)
        if not self._reading and len(self._awaits) < calls.MAX_AWAITING:
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
        try:
            then(call, result, error)
        except Exception:  # a loop callback is a boundary: log, drop this client only
            log.exception("shm connection of %s failed", self.principal or "?")
            self.close()

    def _planned(self, call: calls.ServerCall, plan: object, error: BaseException | None) -> None:
        """The awaited handler is done: serve the call, unless the client gave up meanwhile."""
        if error is None:
            try:
                call.planned(plan)  # on failure, the call is finished already
            except Exception as exc:
                error = exc
        if call.abandoned:
            call.finish(False)
            calls.log_unexpected(call.request_id, error)
        elif error is not None:
            self._call_error(call.request_id, error)
        else:
            self._serve(call)

    def _received(self, call: calls.ServerCall, reply: object, error: BaseException | None) -> None:
        """The awaited on_received is done: reply, unless the client gave up meanwhile."""
        if error is None and not call.abandoned:
            self._send_reply(call, reply)
            return
        call.unlease(self._ctx)
        call.finish(False)
        if call.abandoned:
            calls.log_unexpected(call.request_id, error)
        else:
            assert error is not None
            self._call_error(call.request_id, error)

    def _call_error(self, request: int, exc: BaseException) -> None:
        if not isinstance(exc, errors.KVTierError):
            log.error("shm data plane: call %d failed", request, exc_info=exc)
            exc = errors.Internal("internal error in the shm data plane")
        text = exc.message.encode()[: shm_wire.MAX_ERROR_TEXT]
        body = shm_wire.REPLY_INFO.pack(shm_wire.code_of(exc), len(text), 0) + text
        shm_wire.send_long(self, shm_wire.CALL_REPLY, request, body)

    def _spans(
        self, spans: Sequence[base.Span | None], count: int, writable: bool
    ) -> tuple[bytes, list[bytes], list[int]]:
        """SPAN entries for `count` items (missing or None: no bytes), and the fds (and their
        FD_ENTRYs) of the regions this connection has not been handed (writable) yet."""
        out = bytearray(shm_wire.SPAN.size * count)
        entries: list[bytes] = []
        fds: list[int] = []
        for index, span in enumerate(spans):
            if span is None or not span.length:
                continue
            region = span.region
            region_id = region.region_id
            if region_id not in self._handed or (writable and not self._handed[region_id]):
                fds.append(shm_wire.handover_fd(region, writable))
                entries.append(shm_wire.FD_ENTRY.pack(region_id, region.size, writable))
                self._handed[region_id] = writable
            shm_wire.SPAN.pack_into(
                out, shm_wire.SPAN.size * index, region_id, span.offset, span.length
            )
        return bytes(out), entries, fds

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
        self._held_items = 0
        self._awaits.cancel()  # nothing they return may touch this connection any more
        self._ctx.leases.release_owner(self)
        open_calls, self._calls = self._calls, {}
        awaiting, self._awaiting = self._awaiting, {}
        for call in [*(c for c, _ in open_calls.values()), *awaiting.values()]:
            call.finish(False)
        if self._identity:
            self._ctx.connections.release(self._identity)
            self._identity = ""
        self._server.forget(self)


class Server:
    """Serves a node's regions to same-host clients over a Unix socket in a private directory."""

    name: ClassVar[str] = shm_wire.NAME

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
        return common_pb2.TransportEndpoint(name=shm_wire.NAME, address=self._path)

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
            trusted, uid = shm_wire.peer_uid_ok(sock)
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
