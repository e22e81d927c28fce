"""GET bodies: written in pieces, in order, in the background while the next is gathered."""

from __future__ import annotations

import asyncio
import mmap
from typing import Any, cast

import pytest
from aiohttp import web

from services.gateway.s3 import response_body

PIECE = response_body.WRITE_PIECE_BYTES


class _Response:
    """Records what is written; each write waits for `gate` (a slow client)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def write(self, data: memoryview) -> None:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.written.append(bytes(data))


def _writer(response: _Response) -> response_body.BodyWriter:
    return response_body.BodyWriter(cast(web.StreamResponse, response))


async def test_pieces_arrive_in_order_and_the_slot_is_free_when_sink_returns() -> None:
    response = _Response()
    writer = _writer(response)
    slot = bytearray(b"a" * (2 * PIECE + 7))
    await writer.sink(memoryview(slot))  # returns before anything is written
    assert response.written == []
    slot[:] = b"b" * len(slot)  # the engine refills the slot: the copy is what goes out
    response.gate.set()
    await writer.sink(memoryview(slot)[:5])
    await writer.finish()
    assert [len(p) for p in response.written] == [PIECE, PIECE, 7, 5]
    assert b"".join(response.written) == b"a" * (2 * PIECE + 7) + b"b" * 5


async def test_a_failed_write_is_raised_from_finish_and_close_stops_a_running_one() -> None:
    response = _Response()
    response.fail = ConnectionResetError("client gone")
    response.gate.set()
    writer = _writer(response)
    await writer.sink(memoryview(b"x" * 10))
    with pytest.raises(ConnectionResetError):
        await writer.finish()
    stalled = _Response()
    writer = _writer(stalled)
    await writer.sink(memoryview(b"y" * 10))
    running: Any = writer._writing
    writer.close()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert stalled.written == []


async def test_buffered_pieces_go_out_uncopied_and_a_buffer_still_viewed_is_not_reused() -> None:
    response = _Response()
    response.gate.set()
    writer = _writer(response)
    held: list[memoryview] = []
    first = writer.buffer(10)
    first[:] = b"1" * 10
    await writer.sink(first)
    held.append(first)  # like a transport keeping bytes it could not send yet
    await writer.ready()
    second = writer.buffer(10)
    second[:] = b"2" * 10
    assert second.obj is not first.obj  # the first piece's memory is still viewed
    await writer.sink(second)
    del second
    await writer.ready()
    third = writer.buffer(10)
    assert third.obj is not first.obj  # the writer's other buffer, free again, is reused
    third[:] = b"3" * 10
    await writer.sink(third)
    del third
    await writer.finish()
    assert b"".join(response.written) == b"1" * 10 + b"2" * 10 + b"3" * 10
    # Kept for later GETs only once nothing views it; a larger request never gets a small one.
    assert not response_body.unshared(cast(mmap.mmap, first.obj))
    pool = response_body.PiecePool(keep=1)
    buffer = pool.take(4)
    pool.give(buffer)
    assert pool.take(4) is buffer
    assert len(pool.take(100)) >= 100
    view = memoryview(buffer)
    pool.give(buffer)
    assert pool.take(4) is not buffer
    del view
    idle = response_body.PiecePool(keep=2, idle_s=0.05)  # freed once unused for idle_s
    idle.give(idle.take(4))
    assert idle.kept == 1
    await asyncio.sleep(0.2)
    assert idle.kept == 0
