"""Optional TLS for the tcp data plane (`ServerSettings.tls`; docs/transports.md, "TLS").

TLS runs over memory BIOs (`ssl.SSLObject`), so the channel keeps its own non-blocking socket,
frame queue and backpressure (`tcp_wire.Channel`): plaintext frames are encrypted in chunks of at
most CHUNK_BYTES into a ciphertext queue that `sendmsg` drains, and what arrives is decrypted
straight into staging, region memory or the caller's buffer. A frame counts as sent once it is
encrypted (its bytes are copied then), so leases end and buffers may be reused exactly as on a
plain connection. The server presents the node's certificate; the client verifies it against the
cluster CA and the host it dialled. The token still authenticates the client (no client
certificate). An endpoint served over TLS advertises `tls://host:port`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import socket
import ssl
from collections.abc import Sequence

from kvtier import errors

#: The address prefix of a tcp endpoint that speaks TLS.
SCHEME = "tls://"
#: Plaintext encrypted per step of a flush: bounds the ciphertext waiting for the socket.
CHUNK_BYTES = 256 * 1024
#: Ciphertext received per recv call (TLS records are at most 16 KiB of plaintext).
RAW_BYTES = 256 * 1024
_IOV_ITEMS = 64


def split_address(address: str) -> tuple[bool, str]:
    """(whether the endpoint speaks TLS, its host:port)."""
    if address.startswith(SCHEME):
        return True, address[len(SCHEME) :]
    return False, address


class ServerCredentials:
    """The node's certificate and key as a server context, reloaded when the files change
    (certificate rotation: new connections get the new certificate)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        if not cert_file or not key_file:
            raise errors.InvalidArgument(
                "dataplane TLS needs the node's certificate and key (tls_cert_file, tls_key_file)"
            )
        self._files = (cert_file, key_file)
        self._stamp: tuple[int, ...] = ()
        self._context = self._load()

    def _stamps(self) -> tuple[int, ...]:
        try:
            return tuple(os.stat(path).st_mtime_ns for path in self._files)
        except OSError:
            return self._stamp

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        stamp = self._stamps()
        try:
            context.load_cert_chain(*self._files)
        except (OSError, ssl.SSLError) as exc:
            raise errors.InvalidArgument(f"dataplane TLS certificate or key: {exc}") from None
        self._stamp = stamp
        return context

    def context(self) -> ssl.SSLContext:
        """The current context (re-read when the files moved; a half-written pair keeps the
        old one until it is whole)."""
        if self._stamps() != self._stamp:
            with contextlib.suppress(errors.InvalidArgument):
                self._context = self._load()
        return self._context


def client_context(ca_file: str) -> ssl.SSLContext:
    """Verifies a node's certificate against the cluster CA and the host dialled."""
    if not ca_file:
        raise errors.InvalidArgument(
            "this tcp data plane speaks TLS: set ClientSettings.tls_ca_file (the cluster CA)"
        )
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise errors.InvalidArgument(f"cluster CA {ca_file} unusable: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class Session:
    """One connection's TLS state: the SSL object, its BIOs and the ciphertext to send."""

    __slots__ = ("_in", "_out", "_raw", "_sent", "cipher", "obj", "starved")

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._raw = memoryview(bytearray(RAW_BYTES))
        self.cipher: collections.deque[bytes] = collections.deque()  # to send, in order
        self._sent = 0  # bytes of cipher[0] already sent
        # The last receive found the socket empty while TLS wanted more: only readiness helps.
        self.starved = False

    def encrypt(self, plain: Sequence[bytes | memoryview]) -> int:
        """Encrypt buffers into the ciphertext queue; returns the plaintext bytes taken."""
        taken = sum(self.obj.write(buf) for buf in plain)
        self._drain()
        return taken

    def _drain(self) -> None:
        if self._out.pending:
            self.cipher.append(self._out.read())

    def send(self, sock: socket.socket) -> bool:
        """Send queued ciphertext until none is left (True) or the socket is full (False).
        Raises OSError (but not BlockingIOError) when the connection broke."""
        cipher = self.cipher
        while cipher:
            first = memoryview(cipher[0])[self._sent :]
            iov: list[bytes | memoryview] = [first, *itertools.islice(cipher, 1, _IOV_ITEMS)]
            try:
                sent = sock.sendmsg(iov)
            except BlockingIOError:
                return False
            sent += self._sent
            while cipher and sent >= len(cipher[0]):
                sent -= len(cipher.popleft())
            self._sent = sent
            if sent:
                return False  # the socket took part of a buffer: it is full
        return True

    def recv_into(self, sock: socket.socket, into: memoryview) -> int:
        """Decrypt into `into` what has arrived (receiving ciphertext from sock as needed):
        every record already received, up to into's size; returns the bytes decrypted, 0 when
        none are there yet (`starved`). ConnectionResetError at the end of the stream;
        ssl.SSLError (an OSError) on a broken or refused TLS stream."""
        size, total = into.nbytes, 0
        while True:
            try:
                while total < size:  # one record per read: take all that are here
                    total += _read_into(self.obj, size - total, into[total:] if total else into)
            except ssl.SSLWantReadError:
                self._drain()  # handshake or post-handshake messages may need to go out
            except ssl.SSLZeroReturnError:
                if not total:
                    raise ConnectionResetError("peer closed the TLS session") from None
            if total:
                self.starved = False
                return total
            try:
                raw = sock.recv_into(self._raw)
            except BlockingIOError:
                self.starved = True
                return 0
            if raw == 0:
                raise ConnectionResetError("peer closed the connection")
            self._in.write(self._raw[:raw])

    async def handshake(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, address: str
    ) -> None:
        """Client side: complete the handshake over a connected non-blocking socket.
        PermissionDenied when the server's certificate is refused."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush_async(loop, sock)
                await self._receive_async(loop, sock)
            except ssl.SSLCertVerificationError as exc:
                raise errors.PermissionDenied(
                    f"tcp data plane at {address}: TLS certificate refused: {exc.verify_message}"
                ) from None
            else:
                self._drain()
                await self.flush_async(loop, sock)
                return

    async def flush_async(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Send every queued ciphertext byte (before the channel drives the socket)."""
        self._drain()
        while self.cipher:
            await loop.sock_sendall(sock, self.cipher.popleft()[self._sent :])
            self._sent = 0

    async def _receive_async(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        raw = await loop.sock_recv_into(sock, self._raw)
        if raw == 0:
            raise ConnectionResetError("tcp data-plane server closed the connection during TLS")
        self._in.write(self._raw[:raw])

    async def recv_exactly(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int
    ) -> bytes:
        """Client side, before the channel drives the socket: size decrypted bytes."""
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            try:
                got += _read_into(self.obj, size - got, view[got:])
            except ssl.SSLWantReadError:
                await self.flush_async(loop, sock)
                await self._receive_async(loop, sock)
        return bytes(buf)


def _read_into(obj: ssl.SSLObject, size: int, into: memoryview) -> int:
    """SSLObject.read with a buffer returns the count (typeshed only knows the bytes form)."""
    got: object = obj.read(size, into)
    assert isinstance(got, int)
    return got
