"""Request bodies as operations read them: decoded (aws-chunked) and checked, streamed.

A `Payload` hands out the decoded bytes in whatever pieces the connection delivers, copied
straight into the caller's buffer (an engine staging slot for a PUT). Its size is known up front
(Content-Length, or x-amz-decoded-content-length for aws-chunked bodies), except for a plain
HTTP chunked body (`Transfer-Encoding: chunked`, size -1), which ends where its last chunk
does. A body shorter than announced is IncompleteBody; one longer cannot happen (aiohttp
frames by Content-Length and the chunk decoder checks its own total). Small bodies (XML) are
read whole and their x-amz-content-sha256 checked here; large bodies have it checked by the
engine at commit.

Slow clients: a body that sends nothing for `timeout_s` is RequestTimeout (400). A PUT's bytes go
into a staging slot only while they keep coming (`stage`): the slot is taken once a first byte is
here, and when the body pauses for more than `SLOT_IDLE_S` the bytes so far move out of the slot
into the request's own buffer (`Stalled`; `spill` then receives the rest of the call there), so
that a client that stalls, or trickles, holds the memory of the bytes it sent and never a slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol

import prometheus_client
from aiohttp import streams

from services.gateway import objectlayer
from services.gateway.s3 import s3errors

TIMEOUTS = prometheus_client.Counter(
    "kvtier_gateway_s3_timeouts_total",
    "S3 requests ended by a slow client: body (sent nothing for s3_body_timeout_s: "
    "RequestTimeout), send (read nothing of a response for s3_send_timeout_s: closed)",
    ["kind"],
)
#: Seconds a body may pause while it fills a staging slot before its bytes move out of the slot
#: (a fast client's next bytes come within milliseconds).
SLOT_IDLE_S = 0.5
#: The default of s3_body_timeout_s (S3 closes a connection idle for about 20 s).
BODY_TIMEOUT_S = 20.0


#: The body paused while filling a staging slot (defined with the object layer that catches it).
Stalled = objectlayer.Stalled


def request_timeout() -> s3errors.S3Error:
    """S3's error for a body that stopped coming."""
    TIMEOUTS.labels("body").inc()
    return s3errors.S3Error(
        "RequestTimeout",
        "Your socket connection to the server was not read from or written to within the "
        "timeout period. Idle connections will be closed.",
    )


class Decoder(Protocol):
    """An incremental body decoder (aws-chunked)."""

    def feed(self, data: bytes) -> Sequence[memoryview]:
        """Payload pieces decoded from the next raw bytes."""

    def finish(self) -> dict[str, str]:
        """Check the end of the body; its trailers."""


class Payload:
    """One request's decoded body (see the module docstring)."""

    def __init__(
        self,
        stream: streams.StreamReader | None,
        *,
        size: int,
        sha256_hex: str = "",
        decoder: Decoder | None = None,
    ) -> None:
        self._stream = stream
        self.size = size
        #: The hex SHA-256 the client signed for the body ('' when unsigned or streamed).
        self.sha256_hex = sha256_hex
        self._decoder = decoder
        self._pending: list[memoryview] = []
        self.read = 0
        self.trailers: dict[str, str] = {}
        #: Seconds the body may send nothing (RequestTimeout after).
        self.timeout_s = BODY_TIMEOUT_S
        self._spill = bytearray()  # a call's bytes received while no slot was held

    async def _more(self, patience_s: float | None = None) -> bool:
        """Read the next raw bytes; RequestTimeout after timeout_s of nothing, Stalled after
        patience_s (when given: shorter)."""
        if self._stream is None:
            return False
        wait_s = self.timeout_s if patience_s is None else min(patience_s, self.timeout_s)
        try:
            async with asyncio.timeout(wait_s):
                raw = await self._stream.readany()
        except TimeoutError:
            if patience_s is not None and patience_s < self.timeout_s:
                raise Stalled from None
            raise request_timeout() from None
        except Exception as exc:  # the client went away mid-body
            raise s3errors.S3Error("IncompleteBody", f"the body was cut short: {exc}") from None
        if not raw:
            return False
        pieces = self._decoder.feed(raw) if self._decoder is not None else [memoryview(raw)]
        self._pending.extend(p for p in pieces if len(p))
        return True

    async def readinto(self, view: memoryview, patience_s: float | None = None) -> int:
        """Copy the next decoded bytes into view; 0 at the end of the body."""
        while not self._pending:
            if not await self._more(patience_s):
                return 0
        piece = self._pending[0]
        n = min(len(piece), len(view))
        view[:n] = piece[:n]
        if n == len(piece):
            self._pending.pop(0)
        else:
            self._pending[0] = piece[n:]
        self.read += n
        return n

    async def fill(self, view: memoryview) -> None:
        """Fill view exactly (IncompleteBody when the body ends first)."""
        if await self.fill_to_end(view) < len(view):
            raise s3errors.S3Error(
                "IncompleteBody",
                f"You did not provide the number of bytes specified ({self.size}); got {self.read}",
            )

    async def fill_to_end(self, view: memoryview) -> int:
        """Fill view as far as the body goes: len(view), or fewer bytes at its end."""
        got = 0
        while got < len(view):
            n = await self.readinto(view[got:])
            if n == 0:
                break
            got += n
        return got

    async def stage(
        self, view: memoryview, *, to_end: bool = False, until: float | None = None
    ) -> int:
        """Fill view (a staging slot) with the next bytes of the body: first those `spill`
        kept, then from the connection while they keep coming. A pause longer than
        SLOT_IDLE_S (or, with until, bytes still missing at that loop time) copies view's
        bytes out (to the spill) and raises Stalled: the caller frees the slot, calls `spill`,
        and stages again. The bytes staged: len(view), or with to_end fewer at the body's end
        (else IncompleteBody)."""
        got = len(self._spill)
        view[:got] = self._spill
        self._spill = bytearray()
        loop = asyncio.get_running_loop()
        while got < len(view):
            patience_s = SLOT_IDLE_S if until is None else min(SLOT_IDLE_S, until - loop.time())
            try:
                if patience_s <= 0:
                    raise Stalled
                n = await self.readinto(view[got:], patience_s)
            except Stalled:
                self._spill = bytearray(view[:got])
                raise
            if n == 0:
                break
            got += n
        if got < len(view) and not to_end:
            raise s3errors.S3Error(
                "IncompleteBody",
                f"You did not provide the number of bytes specified ({self.size}); got {self.read}",
            )
        return got

    async def spill(self, length: int) -> None:
        """Receive the body's next bytes into the request's own buffer (no slot held) until it
        holds length bytes or the body ends; `stage` hands them on."""
        while len(self._spill) < length:
            while not self._pending:
                if not await self._more():
                    return
            piece = self._pending[0]
            n = min(len(piece), length - len(self._spill))
            self._spill += piece[:n]
            if n == len(piece):
                self._pending.pop(0)
            else:
                self._pending[0] = piece[n:]
            self.read += n

    @property
    def spilled(self) -> int:
        """Bytes `spill` holds for the next `stage`."""
        return len(self._spill)

    async def at_end(self) -> bool:
        """Whether no byte of the body is left (reads ahead to know)."""
        while not self._pending:
            if not await self._more():
                return True
        return False

    async def finish(self) -> dict[str, str]:
        """After the last byte: nothing may follow; the trailers of an aws-chunked body."""
        while await self._more():
            if self._pending:
                raise s3errors.S3Error("IncompleteBody", "more bytes than announced")
        if self._decoder is not None:
            self.trailers = self._decoder.finish()
        return self.trailers

    async def read_all(self, limit: int) -> bytes:
        """The whole body (at most limit bytes), its signed SHA-256 checked."""
        if self.size > limit:
            raise s3errors.S3Error("MalformedXML", f"the body exceeds {limit} bytes")
        buffer = bytearray(max(self.size, 0))
        if self.size >= 0:
            await self.fill(memoryview(buffer))
        else:
            while await self._more():
                for piece in self._pending:
                    buffer += piece
                self._pending.clear()
                if len(buffer) > limit:
                    raise s3errors.S3Error("MalformedXML", f"the body exceeds {limit} bytes")
        await self.finish()
        data = bytes(buffer)
        if self.sha256_hex and not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), self.sha256_hex.lower()
        ):
            raise s3errors.S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        return data
