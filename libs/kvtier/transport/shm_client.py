"""The client side of the shm transport: lease windows over the socket, copy through the mapping
(protocol and performance notes in `kvtier.transport.shm`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from kvtier import errors, tracing
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, calls, registry, shm_copy, shm_wire

log = logging.getLogger(__name__)

_WINDOW_BYTES = 16 * 1024 * 1024  # bytes leased per round trip (a larger single range goes alone)
_DEPTH = 4  # leased windows outstanding per operation

# A client polls its socket this long for a reply before sleeping in the event loop: waking an
# idle vCPU costs 25-30 us per hop on the VMs we run on, half of a 64 KiB read. After
# _POLL_MISSES misses in a row (say, the server shares its event loop) it pauses polling for
# _POLL_PAUSE replies.
_POLL_S = 100e-6
_POLL_MISSES = 8
_POLL_PAUSE = 1024
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # an int: IntFlag arithmetic costs ~1 us


@dataclass(slots=True)
class _Ack:
    statuses: bytes
    error: errors.KVTierError | None
    granted: bool


@dataclass(slots=True)
class _Window:
    descs: Sequence[base.Descriptor]
    views: Sequence[memoryview]
    nbytes: int
    request: int = 0
    ack: asyncio.Future[_Ack] | None = field(default=None)


def _windows(
    descs: Sequence[base.Descriptor], views: Sequence[memoryview], max_bytes: int
) -> list[_Window]:
    """Cut a batch into windows of at most max_bytes (or one larger range), shm_wire.MAX_ITEMS
    ranges and shm_wire.MAX_REGIONS regions."""
    if len(descs) == 1:
        return [_Window(descs, views, descs[0].length)]
    out, start, nbytes, regions = [], 0, 0, set[int]()
    for index, desc in enumerate(descs):
        full = index - start >= shm_wire.MAX_ITEMS or len(regions) >= shm_wire.MAX_REGIONS
        if index > start and (full or nbytes + desc.length > max_bytes):
            out.append(_Window(descs[start:index], views[start:index], nbytes))
            start, nbytes, regions = index, 0, set()
        nbytes += desc.length
        regions.add(desc.region_id)
    out.append(_Window(descs[start:], views[start:], nbytes))
    return out


class Client:
    """A connection to one same-host peer: lease over the socket, copy through the mapping."""

    name: ClassVar[str] = shm_wire.NAME
    supports_calls: ClassVar[bool] = True

    def __init__(self, sock: socket.socket, settings: registry.ClientSettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = settings.timeout_s
        self._budget = base.ByteBudget(settings.max_inflight_bytes)
        self._channel = _ClientChannel(self, sock, self._loop)
        # Request id -> (reply future, deadline on the loop clock), swept every _sweep_s.
        self._pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self._sweep_s = min(max(self._timeout_s / 10, 0.001), 0.1)
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_request = 1
        self._maps = shm_copy.Mappings()
        self._releases: list[int] = []
        self._incoming = shm_wire.Reassembler()  # SINKS and CALL_REPLY arrive in pieces
        self._lost: errors.KVTierError | None = None
        self._poll_misses = 0
        self._poll_pause = 0

    async def read(self, desc: base.Descriptor, into: Any) -> None:
        """Copy the described range into `into` (len == desc.length)."""
        views = [base.as_buffer(into, writable=True)]
        base.check_sizes([desc], views)
        await self._transfer(base.Rights.READ, [desc], views)

    async def write(self, desc: base.Descriptor, data: Any) -> None:
        """Copy `data` into the described range; the server has seen it when this returns."""
        views = [base.as_buffer(data, writable=False)]
        base.check_sizes([desc], views)
        await self._transfer(base.Rights.WRITE, [desc], views)

    async def read_batch(self, descs: Sequence[base.Descriptor], intos: Sequence[Any]) -> None:
        """Many reads, leased a window at a time; all complete or the first error is raised."""
        views = [base.as_buffer(into, writable=True) for into in intos]
        base.check_sizes(descs, views)
        await self._transfer(base.Rights.READ, descs, views)

    async def write_batch(self, descs: Sequence[base.Descriptor], datas: Sequence[Any]) -> None:
        """Many writes, leased a window at a time; all complete or the first error is raised."""
        views = [base.as_buffer(data, writable=False) for data in datas]
        base.check_sizes(descs, views)
        await self._transfer(base.Rights.WRITE, descs, views)

    async def call(
        self,
        method: int,
        request: Any,
        segments: Sequence[Any] = (),
        intos: Sequence[Any] = (),
    ) -> base.CallResult:
        """One call to the peer's service (see `base.Transport.call`); we copy the segments into
        the sinks it hands us and its sources into `intos`. One round trip without segments,
        two with.

        Its bytes (segments and capacities) come from the byte budget. Raises InvalidArgument
        (limits, buffers) before sending, the service's error, DeadlineExceeded (timeout_s; the
        call is abandoned, the connection stays usable), PeerLost, or Unavailable when the node
        serves no calls.
        """
        segs = [base.as_buffer(seg, writable=False) for seg in segments]
        bufs = [base.as_buffer(into, writable=True) for into in intos]
        message = calls.check_request(method, request, segs, bufs)
        self._check_open()
        nbytes = sum(seg.nbytes for seg in segs) + sum(buf.nbytes for buf in bufs)
        deadline = self._loop.time() + self._timeout_s
        if nbytes:
            await self._reserve(nbytes, deadline)
        try:
            return await self._call(method, message, segs, bufs, deadline)
        finally:
            if nbytes:
                await self._budget.release(nbytes)

    async def call_filled(
        self, method: int, request: Any, sizes: Sequence[int], fill: base.SinkFill
    ) -> base.CallResult:
        """A call whose segments (of these sizes) fill writes itself, straight into the sinks
        the peer hands out (writable views of its mapped memory; None for a segment it drops):
        no buffer of the caller's, no copy. fill runs only when a sink takes bytes; when it
        raises, the call is released unfilled (the peer aborts it: nothing of it is kept) and
        its error raised. timeout_s bounds the wait for the sinks and, again, for the reply
        once fill returns, not fill itself. Raises as `call`."""
        message = calls.check_request(method, request, [memoryview(b"")] * len(sizes), [])
        self._check_open()
        nbytes = sum(sizes)
        deadline = self._loop.time() + self._timeout_s
        if nbytes:
            await self._reserve(nbytes, deadline)
        try:
            return await self._call(method, message, list(sizes), [], deadline, fill)
        finally:
            if nbytes:
                await self._budget.release(nbytes)

    async def _call(
        self,
        method: int,
        message: memoryview,
        segs: list[memoryview] | list[int],
        bufs: list[memoryview],
        deadline: float,
        fill: base.SinkFill | None = None,
    ) -> base.CallResult:
        """segs: the segments' bytes, or with fill their sizes (fill writes the sinks)."""
        request = self._new_request()
        answer = self._expect(request, deadline)
        if fill is None:
            seg_sizes = [seg.nbytes for seg in cast("list[memoryview]", segs)]
        else:
            seg_sizes = cast("list[int]", segs)
        self._send_call(request, method, message, seg_sizes, bufs)
        open_ = True  # the server holds the call until we release it (or it failed)
        try:
            self._poll(answer)
            got: shm_wire.CallAnswer = await answer
            if got.kind == shm_wire.SINKS:
                if fill is None:
                    await self._fill_sinks(got.spans, cast("list[memoryview]", segs))
                else:
                    await self._hand_sinks(got.spans, cast("list[int]", segs), fill)
                    deadline = self._loop.time() + self._timeout_s  # fill's time is not ours
                answer = self._expect(request, deadline)
                self._channel.send(shm_wire.HEADER.pack(shm_wire.CALL_DONE, 0, 0, request))
                self._poll(answer)
                got = await answer
            if got.error is not None:
                open_ = False
                raise got.error
            lengths = tuple(length for _, _, length in got.spans)
            open_ = any(lengths)
            if open_:
                await self._take_sources(got.spans, bufs)
            return base.CallResult(got.message, lengths)
        finally:
            self._pending.pop(request, None)
            if open_:
                self._release_later(request)

    def _send_call(
        self,
        request: int,
        method: int,
        message: memoryview,
        seg_sizes: list[int],
        bufs: list[memoryview],
    ) -> None:
        releases = self._releases[: shm_wire.MAX_ITEMS]  # pending releases ride along
        del self._releases[: len(releases)]
        sizes = seg_sizes, [buf.nbytes for buf in bufs]
        body = shm_wire.call_body(method, message, *sizes, releases, tracing.wire_context())
        shm_wire.send_long(self._channel, shm_wire.CALL, request, body)

    async def _fill_sinks(self, spans: list[tuple[int, int, int]], segs: list[memoryview]) -> None:
        """Copy each segment into its sink (none: the server drops it)."""
        if len(spans) != len(segs):
            raise errors.Internal(f"shm server sent {len(spans)} sinks for {len(segs)} segments")
        pairs, nbytes = [], 0
        for (region_id, offset, length), seg in zip(spans, segs, strict=True):
            if length:
                if length != seg.nbytes:
                    raise errors.Internal(f"shm server sent a sink of {length} bytes")
                pairs.append((self._maps.get(region_id, offset, length, writing=True), offset, seg))
                nbytes += length
        self._check_open()
        await shm_copy.move(self._loop, pairs, True, nbytes)
        self._check_open()

    async def _hand_sinks(
        self, spans: list[tuple[int, int, int]], sizes: list[int], fill: base.SinkFill
    ) -> None:
        """Hand fill a writable view of each sink (None where the server drops the segment);
        the views end when it returns."""
        if len(spans) != len(sizes):
            raise errors.Internal(f"shm server sent {len(spans)} sinks for {len(sizes)} segments")
        views: list[memoryview | None] = []
        for (region_id, offset, length), size in zip(spans, sizes, strict=True):
            if length and length != size:
                raise errors.Internal(f"shm server sent a sink of {length} bytes")
            mapping = self._maps.get(region_id, offset, length, writing=True) if length else None
            views.append(None if mapping is None else mapping.view[offset : offset + length])
        self._check_open()
        try:
            await fill(views)
        finally:
            for view in views:
                if view is not None:
                    view.release()
        self._check_open()  # lost meanwhile: the server ended the call, nothing is kept

    async def _take_sources(
        self, spans: list[tuple[int, int, int]], bufs: list[memoryview]
    ) -> None:
        """Copy each source into the start of its buffer."""
        if len(spans) != len(bufs):
            raise errors.Internal(f"shm server sent {len(spans)} sources for {len(bufs)} buffers")
        pairs, nbytes = [], 0
        for (region_id, offset, length), buf in zip(spans, bufs, strict=True):
            if length:
                if length > buf.nbytes:
                    raise errors.Internal(f"shm server sent a source of {length} bytes")
                pairs.append(
                    (self._maps.get(region_id, offset, length, writing=False), offset, buf[:length])
                )
                nbytes += length
        self._check_open()
        await shm_copy.move(self._loop, pairs, False, nbytes)
        self._check_open()  # the leases may have ended (connection lost) while we copied

    def _release_later(self, request: int) -> None:
        """Tell the server we are done with request: on the next LEASE or CALL, or this turn."""
        if self._lost is None:
            if not self._releases:
                self._loop.call_soon(self._flush_releases)
            self._releases.append(request)

    def _new_request(self) -> int:
        request = self._next_request
        self._next_request = request % 0xFFFF_FFFF + 1
        return request

    async def close(self) -> None:
        """Hang up (the server ends our leases); pending operations raise PeerLost. Idempotent."""
        self._lose(base.PeerLost("shm connection closed by the client"))

    async def _hello(self, token: bytes) -> None:
        """Present the token; PermissionDenied when the server refuses us."""
        future = self._expect(0, self._loop.time() + self._timeout_s)
        self._channel.send(
            shm_wire.HEADER.pack(shm_wire.HELLO, shm_wire.VERSION, len(token), 0) + token
        )
        await future

    async def _transfer(
        self, need: base.Rights, descs: Sequence[base.Descriptor], views: Sequence[memoryview]
    ) -> None:
        # The deadline rides on every reply this operation awaits (see _sweep) instead of an
        # asyncio.timeout per operation, which costs a timer each (5 us, a tenth of a 64 KiB read).
        if descs:
            windows = _windows(descs, views, min(_WINDOW_BYTES, self._budget.limit_bytes))
            await self._pipeline(need, windows, self._loop.time() + self._timeout_s)

    async def _pipeline(self, need: base.Rights, windows: list[_Window], deadline: float) -> None:
        """Lease up to _DEPTH windows ahead (within the byte budget) and copy them in order."""
        inflight: collections.deque[_Window] = collections.deque()
        commits: list[asyncio.Future[Any]] = []
        first: errors.KVTierError | None = None
        budget = self._budget
        try:
            for window in windows:
                while inflight and (
                    len(inflight) >= _DEPTH
                    or budget.used_bytes + window.nbytes > budget.limit_bytes
                ):
                    error = await self._complete(need, inflight.popleft(), commits, deadline)
                    first = first or error
                await self._reserve(window.nbytes, deadline)
                inflight.append(window)
                self._lease(need, window, deadline)
            while inflight:
                error = await self._complete(need, inflight.popleft(), commits, deadline)
                first = first or error
            for commit in commits:
                self._poll(commit)
                await commit
        finally:
            for window in inflight:
                self._let_go(window)
                await budget.release(window.nbytes)
        if first is not None:
            raise first

    async def _reserve(self, nbytes: int, deadline: float) -> None:
        """Take bytes from the budget; a wait for other operations has our deadline too."""
        budget = self._budget
        if budget.used_bytes == 0 or budget.used_bytes + nbytes <= budget.limit_bytes:
            await budget.acquire(nbytes)  # fits: returns without waiting
            return
        try:
            async with asyncio.timeout_at(deadline):
                await budget.acquire(nbytes)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"shm transfer waited {self._timeout_s}s for in-flight bytes"
            ) from None

    def _lease(self, need: base.Rights, window: _Window, deadline: float) -> None:
        self._check_open()
        # Pending releases ride along: no message of their own.
        releases = min(len(self._releases), shm_wire.MAX_ITEMS)
        count, pos = (
            len(window.descs),
            shm_wire.HEADER.size + shm_wire.COUNT.size + shm_wire.REQUEST.size * releases,
        )
        msg = bytearray(pos + shm_wire.ITEM.size * count)
        try:
            for d in window.descs:
                shm_wire.ITEM.pack_into(
                    msg, pos, d.region_id, d.offset, d.length, int(d.rights), d.expires_at_ms,
                    d.grant_id, d.mac,
                )  # fmt: skip
                pos += shm_wire.ITEM.size
        except struct.error as exc:
            raise base.DescriptorRejected(f"descriptor field out of range: {exc}") from None
        request = self._new_request()
        shm_wire.HEADER.pack_into(msg, 0, shm_wire.LEASE, int(need), count, request)
        shm_wire.COUNT.pack_into(msg, shm_wire.HEADER.size, releases)
        for index in range(releases):
            at = shm_wire.HEADER.size + shm_wire.COUNT.size + shm_wire.REQUEST.size * index
            shm_wire.REQUEST.pack_into(msg, at, self._releases[index])
        del self._releases[:releases]
        window.request, window.ack = request, self._expect(request, deadline)
        self._channel.send(msg)

    async def _complete(
        self,
        need: base.Rights,
        window: _Window,
        commits: list[asyncio.Future[Any]],
        deadline: float,
    ) -> errors.KVTierError | None:
        """Copy one leased window, release (reads) or commit (writes) its leases, and return its
        bytes to the budget; returns the window's first error."""
        committed = False
        try:
            assert window.ack is not None
            self._poll(window.ack)
            ack = await window.ack
            if ack.granted:
                self._check_open()
                await self._copy(need, window, ack.statuses)
                self._check_open()  # reads: the lease may have ended while we copied
                if need is base.Rights.WRITE:
                    commits.append(self._expect(window.request, deadline))
                    self._channel.send(shm_wire.HEADER.pack(shm_wire.COMMIT, 0, 0, window.request))
                    committed = True
            return ack.error
        finally:
            if not committed:
                self._let_go(window)
            await self._budget.release(window.nbytes)

    def _let_go(self, window: _Window) -> None:
        """End a window's leases (if granted); an ack still on its way is ignored."""
        if window.ack is None:
            return
        self._pending.pop(window.request, None)
        if not window.ack.done():
            window.ack.cancel()
        elif not window.ack.cancelled():
            window.ack.exception()  # seen: the error that matters is raised elsewhere
        self._release_later(window.request)

    async def _copy(self, need: base.Rights, window: _Window, statuses: bytes) -> None:
        writing = need is base.Rights.WRITE
        pairs: list[tuple[shm_copy.Mapping, int, memoryview]] = []
        for status, desc, view in zip(statuses, window.descs, window.views, strict=True):
            if status == 0:
                mapping = self._maps.get(desc.region_id, desc.offset, desc.length, writing=writing)
                pairs.append((mapping, desc.offset, view))
        await shm_copy.move(self._loop, pairs, writing, window.nbytes)

    def _flush_releases(self) -> None:
        pending, self._releases = self._releases, []
        if self._lost is not None:
            return
        for start in range(0, len(pending), shm_wire.MAX_ITEMS):
            chunk = pending[start : start + shm_wire.MAX_ITEMS]
            body = struct.pack(f"<{len(chunk)}I", *chunk)
            self._channel.send(shm_wire.HEADER.pack(shm_wire.RELEASE, 0, len(chunk), 0) + body)

    def _poll(self, reply: asyncio.Future[Any]) -> None:
        """Poll briefly for a reply that is not in yet (see _POLL_S)."""
        if reply.done():
            return
        if self._poll_pause:
            self._poll_pause -= 1
        elif self._channel.poll(reply, _POLL_S):
            self._poll_misses = 0
        else:
            self._poll_misses += 1
            if self._poll_misses >= _POLL_MISSES:
                self._poll_misses, self._poll_pause = 0, _POLL_PAUSE

    def _expect(self, request: int, deadline: float) -> asyncio.Future[Any]:
        """A future for the server's reply to request, failed by _sweep after deadline."""
        self._check_open()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[request] = (future, deadline)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)
        return future

    def _sweep(self) -> None:
        """Fail replies past their deadline (DeadlineExceeded); runs while any are pending."""
        now = self._loop.time()
        late = [request for request, (_, deadline) in self._pending.items() if deadline <= now]
        for request in late:
            _fail(
                self._pending.pop(request)[0],
                errors.DeadlineExceeded(f"shm server gave no answer within {self._timeout_s}s"),
            )
        self._sweeper = None
        if self._pending and self._lost is None:
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)

    def _check_open(self) -> None:
        if self._lost is not None:
            raise type(self._lost)(self._lost.message)

    def _lose(self, exc: errors.KVTierError) -> None:
        """The connection is gone: fail everything pending, drop mappings. Idempotent."""
        if self._lost is not None:
            return
        self._lost = exc
        self._channel.shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            _fail(future, type(exc)(exc.message))
        # Copies in flight hold their own references; the memory goes with the last one.
        self._maps.clear()

    def _on_message(self, msg: memoryview, fds: list[int]) -> None:
        """A message from the server (its fds are ours to close)."""
        kind, flags, count, request = shm_wire.HEADER.unpack_from(msg)
        if kind in (shm_wire.SINKS, shm_wire.CALL_REPLY, shm_wire.MORE):
            self._on_call_piece(count, msg, fds)
            return
        if kind == shm_wire.ACK:
            result: object = self._on_ack(msg, count, fds)
        elif kind == shm_wire.WELCOME:
            text = bytes(msg[shm_wire.HEADER.size : shm_wire.HEADER.size + count]).decode(
                errors="replace"
            )
            result = shm_wire.error_of(flags, text) if flags else None
        elif kind == shm_wire.COMMITTED:
            result = None
        else:
            shm_wire.close_fds(fds)
            raise ValueError(f"unexpected message type {kind}")
        entry = self._pending.pop(request, None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if isinstance(result, errors.KVTierError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _on_ack(self, msg: memoryview, count: int, fds: list[int]) -> _Ack:
        pos = shm_wire.HEADER.size
        n_fds, first, text_bytes, code = shm_wire.ACK_INFO.unpack_from(msg, pos)
        pos += shm_wire.ACK_INFO.size
        statuses = bytes(msg[pos : pos + count])
        pos += count
        self._map_regions(msg[pos : pos + n_fds * shm_wire.FD_ENTRY.size], n_fds, fds)
        pos += n_fds * shm_wire.FD_ENTRY.size
        text = bytes(msg[pos : pos + text_bytes]).decode(errors="replace")
        error = shm_wire.error_of(code, text) if first != shm_wire.NO_ERROR else None
        return _Ack(statuses, error, 0 in statuses)

    def _map_regions(self, entries: memoryview, count: int, fds: list[int]) -> None:
        """Map the regions whose fds (and FD_ENTRYs) a message carries; closes the fds."""
        if count != len(fds) or entries.nbytes != count * shm_wire.FD_ENTRY.size:
            shm_wire.close_fds(fds)
            raise ValueError(f"a message names {count} fds but carries {len(fds)}")
        for index, fd in enumerate(fds):
            region_id, size, writable = shm_wire.FD_ENTRY.unpack_from(
                entries, index * shm_wire.FD_ENTRY.size
            )
            try:
                self._maps.add(region_id, fd, size, bool(writable))
            finally:
                os.close(fd)

    def _on_call_piece(self, count: int, msg: memoryview, fds: list[int]) -> None:
        """A SINKS, CALL_REPLY or a MORE of one: map its regions; answer once it is complete
        (even for a call nobody waits for any more: its regions are handed all the same)."""
        try:
            entries, done = self._incoming.feed(msg, count)
        except ValueError:
            shm_wire.close_fds(fds)
            raise
        self._map_regions(entries, count, fds)
        if done is None:
            return
        kind, request, body = done
        answer = shm_wire.parse_answer(kind, body)
        entry = self._pending.pop(request, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(answer)


def _fail(future: asyncio.Future[Any], exc: errors.KVTierError) -> None:
    """Fail a reply; marked as seen, since abandoned windows' replies are never awaited."""
    if not future.done():
        future.set_exception(exc)
        future.exception()


class _ClientChannel(shm_wire.Channel):
    """Receives with recvmsg so that region fds arrive with their ACK."""

    def __init__(
        self, client: Client, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._client = client
        self._rbuf = bytearray(shm_wire.MAX_MESSAGE)
        self._rview = memoryview(self._rbuf)
        self._anc = socket.CMSG_SPACE(shm_wire.MAX_REGIONS * 4)
        self._breaking = False
        super().__init__(sock, loop)

    def poll(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Receive without sleeping until future is done or seconds pass; whether it is done."""
        end = time.perf_counter() + seconds
        while not future.done() and not self.closed and time.perf_counter() < end:
            self._on_readable()
        return future.done()

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:  # one message per call, as on the server
            size, anc, flags, _ = self.sock.recvmsg_into(
                [self._rbuf], self._anc, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(f"receive failed: {exc}")
            return
        fds = shm_wire.fds_of(anc) if anc else []
        if size == 0 or flags & _TRUNCATED or size < shm_wire.HEADER.size:
            shm_wire.close_fds(fds)
            self._broken("server hung up" if size == 0 else f"bad message of {size} bytes")
            return
        try:
            self._client._on_message(self._rview[:size], fds)
        except (struct.error, ValueError, OSError) as exc:
            self._broken(f"bad message from server: {exc}")
        except Exception:  # a reader callback is a boundary: log, fail this connection only
            log.exception("shm client connection failed")
            self._broken("internal error")

    def _broken(self, reason: str) -> None:
        if self._breaking:
            return
        self._breaking = True
        self._on_readable()  # a refusing server says why, then hangs up: deliver that first
        self._client._lose(base.PeerLost(f"shm peer lost: {reason}"))


async def connect(
    endpoint: common_pb2.TransportEndpoint, token: bytes, settings: registry.ClientSettings
) -> Client:
    """Connect to a same-host peer's shm endpoint and authenticate.

    Raises PermissionDenied (token or uid refused), Unavailable (no server there),
    DeadlineExceeded (no answer within settings.timeout_s).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    client: Client | None = None
    try:
        async with asyncio.timeout(settings.timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, endpoint.address)
            trusted, uid = shm_wire.peer_uid_ok(sock)
            if not trusted:
                raise errors.PermissionDenied(f"shm server runs as uid {uid}, not ours or root")
            client = Client(sock, settings)
            await client._hello(token)
    except BaseException as exc:
        if client is not None:
            await client.close()
        sock.close()
        if isinstance(exc, TimeoutError):
            raise errors.DeadlineExceeded(f"shm connect to {endpoint.address} timed out") from None
        if isinstance(exc, PermissionError):
            raise errors.PermissionDenied(f"shm socket {endpoint.address}: {exc}") from None
        if isinstance(exc, FileNotFoundError | ConnectionError):
            raise errors.Unavailable(f"shm socket {endpoint.address}: {exc}") from None
        raise
    return client
