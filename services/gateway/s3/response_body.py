"""Response bodies: a GET's bytes written to the client while the engine gathers the next piece.

The engine hands a GET's range over one staging slot at a time (`ObjectEngine.stream`: 24 MiB
for RS 8+4). Writing a slot's bytes to the transport in one call, then waiting for them to drain
before gathering the next, made a GET a relay of gather, send, gather. Over HTTPS that is worse
than it looks: uvloop's TLS layer encrypts the whole write before any of it leaves (its memory
BIO grows to 24 MiB by reallocation), and the gateway's encryption, the client's decryption and
the next gather then run one after the other. Instead:

- each piece is copied out of its slot (which is refilled as soon as the sink returns) and
  written in the background while the engine gathers the next one;
- the copy goes to the transport `WRITE_PIECE_BYTES` at a time, awaiting the transport's flow
  control in between, so that TLS encrypts as the client reads and its buffers stay small.

At most one piece is being written while the next is gathered and copied. The engine holds
a slot only while it gathers a piece and `sink` copies it out: it waits for the client
(`ready`) with no slot, so clients that stop reading cannot tie the slots up; one that reads
nothing for `send_timeout_s` has its connection closed. Measurements (docs/s3.md, "HTTPS and
certificates"; docs/benchmarks.md, "Security").
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.gateway.s3 import body

#: Bytes handed to the transport per write: a whole number of TLS records (16 KiB). In 64 MiB
#: HTTPS GETs from the gateway, 64 KiB and 1 MiB pieces did no better (docs/s3.md).
WRITE_PIECE_BYTES = 256 << 10


class BodyWriter:
    """Writes a response body handed over piece by piece (`sink`), each in the background.

    Use: `ready` before gathering each piece (no slot held), `sink` for it, then `finish`
    once all are handed over; `close` in a `finally` stops a write left running when the GET
    fails. A write's error (the client went away, or read nothing for send_timeout_s: an
    OSError) is raised from the next `ready` or from `finish`.
    """

    def __init__(
        self, response: web.StreamResponse, send_timeout_s: float = body.BODY_TIMEOUT_S
    ) -> None:
        self._response = response
        self._send_timeout_s = send_timeout_s
        self._writing: asyncio.Task[None] | None = None
        self._queued: memoryview | None = None  # the next piece, once the one before is sent

    async def ready(self) -> None:
        """Wait until no piece waits behind the one being written (then the next may be
        gathered)."""
        if self._queued is not None:
            await self._wait_writing()
            self._start()

    async def sink(self, view: memoryview) -> None:
        """Copy view (the caller may reuse its memory on return), to be written once the piece
        before it is."""
        await self.ready()
        # A copy: the slot behind view is refilled as soon as we return, and the transport
        # may keep a reference to what it could not send yet (uvloop's does).
        self._queued = memoryview(bytes(view))
        if self._writing is None:
            self._start()

    def _start(self) -> None:
        data, self._queued = self._queued, None
        if data is not None:
            self._writing = asyncio.create_task(self._write(data))

    async def _write(self, data: memoryview) -> None:
        for at in range(0, len(data), WRITE_PIECE_BYTES):
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await self._response.write(data[at : at + WRITE_PIECE_BYTES])
            except TimeoutError:
                body.TIMEOUTS.labels("send").inc()
                raise TimeoutError(f"the client read nothing for {self._send_timeout_s}s") from None

    async def _wait_writing(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def finish(self) -> None:
        """Wait until every piece is handed to the transport."""
        await self.ready()
        await self._wait_writing()

    def close(self) -> None:
        """Stop a write still running (the GET failed); its error, if any, is dropped."""
        self._queued = None
        writing, self._writing = self._writing, None
        if writing is None:
            return
        if not writing.done():
            writing.cancel()
        elif not writing.cancelled():
            writing.exception()  # retrieved: the GET's own error is the one reported
