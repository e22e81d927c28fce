"""Request bodies as operations read them: decoded (aws-chunked) and checked, streamed.

A `Payload` hands out the decoded bytes in whatever pieces the connection delivers, copied
straight into the caller's buffer (an engine staging slot for a PUT). Its size is known up front
(Content-Length, or x-amz-decoded-content-length for aws-chunked bodies), except for a plain
HTTP chunked body (`Transfer-Encoding: chunked`, size -1), which ends where its last chunk
does. A body shorter than announced is IncompleteBody; one longer cannot happen (aiohttp
frames by Content-Length and the chunk decoder checks its own total). Small bodies (XML) are
read whole and their x-amz-content-sha256 checked here; large bodies have it checked by the
engine at commit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol

from aiohttp import streams

from services.gateway.s3 import s3errors


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

    async def _more(self) -> bool:
        if self._stream is None:
            return False
        try:
            raw = await self._stream.readany()
        except Exception as exc:  # the client went away mid-body
            raise s3errors.S3Error("IncompleteBody", f"the body was cut short: {exc}") from None
        if not raw:
            return False
        pieces = self._decoder.feed(raw) if self._decoder is not None else [memoryview(raw)]
        self._pending.extend(p for p in pieces if len(p))
        return True

    async def readinto(self, view: memoryview) -> int:
        """Copy the next decoded bytes into view; 0 at the end of the body."""
        while not self._pending:
            if not await self._more():
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
