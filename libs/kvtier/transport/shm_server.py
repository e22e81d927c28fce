"""The serving side of the shm transport: a listener in a private directory and, per client, a
connection that checks descriptors, holds leases and hands region fds over (protocol and trust
model in `kvtier.transport.shm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import struct
from typing import ClassVar

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry, shm_wire

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 10.0


class _ServerConnection(shm_wire.Channel):
    """One client's connection: its principal, its leases, the regions it has been handed."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._ctx = server.ctx
        self.principal: str | None = None
        self._held: dict[int, list[int]] = {}  # request id -> lease ids
        self._handed: dict[int, bool] = {}  # region id -> writable fd handed
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
        else:
            self._broken(f"unexpected message type {kind}")

    def _hello(self, version: int, token: bytes) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if version != shm_wire.VERSION:
            self.reject(errors.InvalidArgument(f"shm protocol {version} unsupported"))
            return
        try:
            principal = self._ctx.issuer.check_token(token)
        except errors.PermissionDenied as exc:
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
        writable = need is base.Rights.WRITE
        statuses = bytearray(count)
        first, first_text, leases = shm_wire.NO_ERROR, b"", []
        fd_entries: list[bytes] = []
        fds: list[int] = []
        for index, fields in enumerate(shm_wire.ITEM.iter_unpack(msg[start:end])):
            region_id, offset, length, rights, expires_at_ms, mac = fields
            try:
                region = ctx.issuer.check(
                    ctx.regions, self.principal, need, region_id, offset, length, rights,
                    expires_at_ms, mac,
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
        code = statuses[first] if first != shm_wire.NO_ERROR else 0
        info = shm_wire.ACK_INFO.pack(len(fds), first, len(first_text), code)
        header = shm_wire.HEADER.pack(shm_wire.ACK, 0, count, request)
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
