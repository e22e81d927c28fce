"""Slow clients: a request body that pauses leaves its staging slot, one that stops is
RequestTimeout; a GET response nobody reads is cut off after the send timeout."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import pytest
from aiohttp import streams, web

from services.gateway.s3 import body, response_body, s3errors


class _Connection:
    """The connection side of an aiohttp StreamReader (bytes are fed by the test)."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


def _payload(size: int, timeout_s: float = 5.0) -> tuple[streams.StreamReader, body.Payload]:
    stream = streams.StreamReader(cast(Any, _Connection()), 1 << 16)
    payload = body.Payload(stream, size=size)
    payload.timeout_s = timeout_s
    return stream, payload


def _count(kind: str) -> float:
    return float(body.TIMEOUTS.labels(kind)._value.get())


async def test_a_pause_moves_the_bytes_out_of_the_slot_and_nothing_is_lost() -> None:
    data = os.urandom(3000)
    stream, payload = _payload(len(data))
    stream.feed_data(data[:1000])
    slot = bytearray(2000)
    with pytest.raises(body.Stalled):  # after SLOT_IDLE_S with nothing more
        await payload.stage(memoryview(slot))
    assert payload.spilled == 1000
    slot[:] = bytes(2000)  # the slot went to another request

    async def later() -> None:
        await asyncio.sleep(0.1)
        stream.feed_data(data[1000:2500])
        await asyncio.sleep(0.1)
        stream.feed_data(data[2500:])
        stream.feed_eof()

    feeding = asyncio.create_task(later())
    await payload.spill(2000)  # the rest of the call, no slot held
    assert payload.spilled == 2000
    assert await payload.stage(memoryview(slot)) == 2000
    assert bytes(slot) == data[:2000]
    rest = bytearray(1000)
    assert await payload.stage(memoryview(rest)) == 1000
    assert bytes(rest) == data[2000:]
    await payload.finish()
    await feeding


async def test_a_body_still_coming_at_the_stage_deadline_moves_out_of_the_slot() -> None:
    """A trickle never pauses for SLOT_IDLE_S, but bytes still missing at `until` stall too."""
    data = os.urandom(3000)
    stream, payload = _payload(len(data))
    stream.feed_data(data[:1000])
    slot = bytearray(3000)

    async def trickle() -> None:
        for at in range(1000, 3000, 100):
            await asyncio.sleep(0.02)
            stream.feed_data(data[at : at + 100])
        stream.feed_eof()

    feeding = asyncio.create_task(trickle())
    loop = asyncio.get_running_loop()
    with pytest.raises(body.Stalled):
        await payload.stage(memoryview(slot), until=loop.time() + 0.1)
    assert 1000 <= payload.spilled < 3000  # the bytes so far, out of the slot
    await payload.spill(3000)
    await feeding
    assert await payload.stage(memoryview(slot), until=loop.time() - 1) == 3000  # all spilled
    assert bytes(slot) == data


async def test_a_body_that_sends_nothing_is_request_timeout() -> None:
    before = _count("body")
    stream, payload = _payload(10_000)
    stream.feed_data(b"a" * 100)
    slot = bytearray(10_000)
    with pytest.raises(body.Stalled):  # a slot is left sooner than the request
        await payload.stage(memoryview(slot))
    payload.timeout_s = 0.2
    with pytest.raises(s3errors.S3Error) as caught:
        await payload.spill(10_000)
    assert caught.value.code == "RequestTimeout"
    assert caught.value.status == 400
    assert "not read from or written to within the timeout period" in caught.value.message
    assert _count("body") == before + 1
    _stream, idle = _payload(10, timeout_s=0.2)
    with pytest.raises(s3errors.S3Error, match="timeout period"):
        await idle.read_all(1000)  # XML bodies too


class _UnreadResponse:
    """A response whose client reads nothing: every write waits forever."""

    def __init__(self) -> None:
        self.writes = 0

    async def write(self, data: memoryview) -> None:
        self.writes += 1
        await asyncio.Event().wait()


async def test_an_unread_response_times_out_and_gathering_waits_with_no_piece_queued() -> None:
    before = _count("send")
    response = _UnreadResponse()
    writer = response_body.BodyWriter(cast(web.StreamResponse, response), send_timeout_s=0.3)
    await writer.sink(memoryview(b"a" * 10))  # written in the background
    await writer.ready()  # nothing queued: the next piece may be gathered
    await writer.sink(memoryview(b"b" * 10))  # queued behind the unread one
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):  # an OSError: the GET closes the connection
        await writer.ready()
    assert 0.2 < asyncio.get_running_loop().time() - started < 2
    assert response.writes == 1
    assert _count("send") == before + 1
    writer.close()
