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
nothing for `send_timeout_s` has its connection closed.

Large pieces skip the slot and the copy: the erasure-coded engine gathers them straight into
memory the writer hands out (`buffer`), two buffers a GET at most (the piece being written,
the next one gathering), which `sink` then writes as they are. The buffers are reused, within
a GET and across GETs (`PiecePool`: up to KEEP_FREE_BUFFERS kept, freed after IDLE_S unused):
fresh memory costs a page fault and a zeroing per 4 KiB written, about what the copy cost. A buffer
is reused only when nothing holds a view of it any more (a plain-HTTP transport keeps one of
bytes it could not send yet). Measurements (docs/s3.md, "HTTPS and certificates";
docs/benchmarks.md, "Security" and "S3 API: kvtier against Ceph RGW").
"""

from __future__ import annotations

import asyncio
import mmap
import time

from aiohttp import web

from services.gateway.s3 import body

#: Bytes handed to the transport per write: a whole number of TLS records (16 KiB). In 64 MiB
#: HTTPS GETs from the gateway, 64 KiB and 1 MiB pieces did no better (docs/s3.md).
WRITE_PIECE_BYTES = 256 << 10
#: Free piece buffers the gateway keeps between GETs (each up to a piece's stripes and parity
#: room, 28 MiB for RS 8+4 and 64 MiB slots, of which only the pages written are memory):
#: enough for 8 GETs at once (two each). With 8 kept, 64 MiB GETs at c8 saved nothing (half
#: their buffers were new memory, each page faulted and zeroed: as dear as the copy).
KEEP_FREE_BUFFERS = 16
#: Seconds a free buffer is kept unused before it is freed (an idle gateway holds none).
IDLE_S = 30.0


def unshared(buffer: mmap.mmap) -> bool:
    """Whether no view of buffer exists (none may then read it later): a mapping cannot be
    resized while exported (a resize to its own size, otherwise a no-op, is the probe)."""
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return False
    return True


class PiecePool:
    """Piece buffers kept between GETs (see the module docstring)."""

    def __init__(self, keep: int = KEEP_FREE_BUFFERS, idle_s: float = IDLE_S) -> None:
        self._keep = keep
        self._idle_s = idle_s
        self._free: list[mmap.mmap] = []
        self._used = 0.0  # when a buffer was last taken or given
        self._trimming: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self, nbytes: int) -> mmap.mmap:
        """A buffer of at least nbytes: a kept one that fits, the smallest, or a new one (an
        anonymous mapping: the kernel zeroes a page when it is first written, and never one
        left unused, such as the parity room of a read with every drive up)."""
        self._used = time.monotonic()
        fits = [b for b in self._free if len(b) >= nbytes]
        if fits:
            chosen = min(fits, key=len)
            self._free.remove(chosen)
            return chosen
        return mmap.mmap(-1, nbytes)

    def give(self, buffer: mmap.mmap) -> None:
        """Keep buffer for later GETs (unless enough larger ones are kept, or a view of it is
        still held: then it is dropped and freed once that view goes)."""
        if not unshared(buffer):
            return
        self._used = time.monotonic()
        self._free.append(buffer)
        self._free.sort(key=len, reverse=True)
        del self._free[self._keep :]
        loop = asyncio.get_running_loop()
        if self._trimming is None or self._loop is not loop:  # (tests run several loops)
            self._loop = loop
            self._trimming = loop.call_later(self._idle_s, self._trim)

    def _trim(self) -> None:
        """Free the kept buffers once none was taken or given for idle_s."""
        self._trimming = None
        idle = time.monotonic() - self._used
        if idle >= self._idle_s:
            self._free.clear()
        elif self._free and self._loop is not None:
            self._trimming = self._loop.call_later(self._idle_s - idle, self._trim)

    @property
    def kept(self) -> int:
        """Free buffers kept now."""
        return len(self._free)


#: The gateway's pool (one event loop: no locking).
POOL = PiecePool()


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
        self._own: list[mmap.mmap] = []  # buffers handed out by `buffer` (two at most in use)

    async def ready(self) -> None:
        """Wait until no piece waits behind the one being written (then the next may be
        gathered)."""
        if self._queued is not None:
            await self._wait_writing()
            self._start()

    def buffer(self, nbytes: int) -> memoryview:
        """Memory of nbytes to gather the next piece into (`objectlayer.Buffer`), called once
        `ready` returned: one of this writer's buffers that no piece uses any more, else one
        from the pool. A piece in it goes to `sink` without a copy."""
        free = [own for own in self._own if unshared(own)]  # not the piece being written
        for own in free:
            if len(own) >= nbytes:
                return memoryview(own)[:nbytes]
        for own in free:  # too small for this piece
            self._own.remove(own)
            POOL.give(own)
        own = POOL.take(nbytes)
        self._own.append(own)
        return memoryview(own)[:nbytes]

    async def sink(self, view: memoryview) -> None:
        """Copy view (the caller may reuse its memory on return), to be written once the piece
        before it is; a view of this writer's `buffer` is written as it is."""
        await self.ready()
        if any(view.obj is own for own in self._own):
            self._queued = view  # the caller gathers the next piece elsewhere (`buffer`)
        else:
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
        self._give_back()

    def _give_back(self) -> None:
        own, self._own = self._own, []
        for buffer in own:
            POOL.give(buffer)

    def close(self) -> None:
        """Stop a write still running (the GET failed); its error, if any, is dropped."""
        self._queued = None
        writing, self._writing = self._writing, None
        if writing is None or writing.done():
            self._give_back()  # (a write still running keeps its buffer: dropped)
        else:
            self._own = []
        if writing is None:
            return
        if not writing.done():
            writing.cancel()
        elif not writing.cancelled():
            writing.exception()  # retrieved: the GET's own error is the one reported
