"""GET bodies: written in pieces, in order, in the background while the next is gathered."""

from __future__ import annotations

import asyncio
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
