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

At most one piece is being written while the next is gathered. Measurements (docs/s3.md,
"HTTPS and certificates"; docs/benchmarks.md, "Security").
"""

from __future__ import annotations

import asyncio

from aiohttp import web

#: Bytes handed to the transport per write: a whole number of TLS records (16 KiB). In 64 MiB
#: HTTPS GETs from the gateway, 64 KiB and 1 MiB pieces did no better (docs/s3.md).
WRITE_PIECE_BYTES = 256 << 10


class BodyWriter:
    """Writes a response body handed over piece by piece (`sink`), each in the background.

    Use: `sink` for every piece, then `finish` once all are handed over; `close` in a
    `finally` stops a write left running when the GET fails. A write's error (the client went
    away: an OSError) is raised from the next `sink` or from `finish`.
    """

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._writing: asyncio.Task[None] | None = None

    async def sink(self, view: memoryview) -> None:
        """Wait for the previous piece's write, then start writing a copy of view (the
        caller may reuse view's memory on return)."""
        await self.finish()
        # A copy: the slot behind view is refilled as soon as we return, and the transport
        # may keep a reference to what it could not send yet (uvloop's does).
        data = memoryview(bytes(view))
        self._writing = asyncio.create_task(self._write(data))

    async def _write(self, data: memoryview) -> None:
        for at in range(0, len(data), WRITE_PIECE_BYTES):
            await self._response.write(data[at : at + WRITE_PIECE_BYTES])

    async def finish(self) -> None:
        """Wait until the piece being written is handed to the transport."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    def close(self) -> None:
        """Stop a write still running (the GET failed); its error, if any, is dropped."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        if not writing.done():
            writing.cancel()
        elif not writing.cancelled():
            writing.exception()  # retrieved: the GET's own error is the one reported
