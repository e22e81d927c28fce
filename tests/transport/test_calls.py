"""Calls (`base.Transport.call`) over every transport that carries them: tcp and shm.

Each test starts a real DataPlane with one transport and a toy service (`Service`) as its call
handler, and connects real clients. Every payload is checked byte for byte; every plan's on_done
is checked to run exactly once, with True when its bytes went out and False when the call failed
or its connection died.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, rdma_client, registry

KIB, MIB = 1024, 1024 * 1024
REGION_BYTES = 200 * MIB
RW = base.Rights.READ | base.Rights.WRITE

ECHO, GET, PUT, FAIL, BAD_RECEIVED, TOO_LONG, SLOW = range(1, 8)


class Service:
    """A toy node service over one region: echo, gets and puts of ranges, and misbehaviour.

    Requests are JSON. `done` records every on_done(ok) in order; `handled` counts handler calls
    and `on_handle` (if set) runs in each.
    """

    def __init__(self, region: base.Region) -> None:
        self.region = region
        self.done: list[bool] = []
        self.handled = 0
        self.on_handle: Callable[[], None] | None = None

    def __call__(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan:
        self.handled += 1
        if self.on_handle is not None:
            self.on_handle()
        if method == ECHO:
            return base.CallPlan(reply=request)
        req = json.loads(request)
        if method == GET:
            sources = [self._span(o, n) for o, n in req["ranges"]]
            return base.CallPlan(reply=b"got", sources=sources, on_done=self.done.append)
        if method == PUT:
            sinks = [self._span(o, n) for o, n in zip(req["offsets"], segments, strict=True)]
            stored = sum(n for o, n in zip(req["offsets"], segments, strict=True) if o >= 0)
            return base.CallPlan(
                sinks=sinks,
                on_received=lambda: f"stored {stored}".encode(),
                on_done=self.done.append,
            )
        if method == FAIL:
            error = getattr(errors, req["error"], None) or getattr(base, req["error"])
            raise error(req["text"])
        if method == BAD_RECEIVED:
            return base.CallPlan(
                sinks=[self._span(0, n) for n in segments],
                on_received=_raise_corrupt,
                on_done=self.done.append,
            )
        if method == TOO_LONG:
            return base.CallPlan(
                sources=[self._span(0, capacities[0] + 1)], on_done=self.done.append
            )
        if method == SLOW:
            time.sleep(req["sleep_s"])  # a stuck service (this one runs on its own thread)
            return base.CallPlan(sources=[self._span(0, req["length"])], on_done=self.done.append)
        raise errors.InvalidArgument(f"no method {method}")

    def _span(self, offset: int, length: int) -> base.Span | None:
        return base.Span(self.region, offset, length) if offset >= 0 else None


def _raise_corrupt() -> bytes:
    raise errors.Corrupt("checksum mismatch in the put")


@dataclass
class Setup:
    name: str
    plane: dataplane.DataPlane
    region: base.Region
    service: Service
    connect: Callable[..., Awaitable[base.Transport]]

    @property
    def leases(self) -> base.LeaseTable:
        return self.plane.ctx.leases

    def grant(self, offset: int, length: int) -> base.Descriptor:
        return self.plane.issuer.grant(self.region, offset, length, RW, "client-a")


def _transports() -> list[str]:
    return [n for n in ("tcp", "shm") if n in registry.available()]


@contextlib.asynccontextmanager
async def _node(name: str) -> AsyncIterator[Setup]:
    plane = dataplane.DataPlane("node-under-test", [name], registry.ServerSettings())
    region = plane.regions.create(REGION_BYTES)
    service = Service(region)
    plane.ctx.call_handler = service
    caps = await plane.start()
    (endpoint,) = [e for e in caps.endpoints if e.name == name]
    clients: list[base.Transport] = []

    async def connect(**settings: Any) -> base.Transport:
        token, _ = plane.issuer.issue_token("client-a")
        client: base.Transport = await registry.connect(
            endpoint, token, registry.ClientSettings(**{"timeout_s": 20.0, **settings})
        )
        clients.append(client)
        return client

    try:
        yield Setup(name, plane, region, service, connect)
    finally:
        for client in clients:
            await client.close()
        await plane.stop()


@pytest.fixture(params=_transports())
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    async with _node(request.param) as started:
        yield started


def _random(n: int, rng: random.Random) -> np.ndarray:
    return np.frombuffer(rng.randbytes(n), dtype=np.uint8).copy()


def _digest(buf: Any) -> str:
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def _req(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - polls server state
            await asyncio.sleep(0.005)


async def _finished(setup: Setup, expected: list[bool]) -> None:
    """on_done ran exactly as expected (it may trail the reply: shm ends on the release)."""
    await _until(lambda: len(setup.service.done) >= len(expected))
    await asyncio.sleep(0.02)  # a second on_done would show up by now
    assert setup.service.done == expected
    await _until(lambda: len(setup.leases) == 0)


async def _usable(client: base.Transport) -> None:
    result = await client.call(ECHO, b"still here")
    assert result.reply == b"still here"


@pytest.mark.timeout(30)
async def test_transports_say_they_carry_calls(setup: Setup) -> None:
    client = await setup.connect()
    assert client.supports_calls is True
    assert (await client.call(ECHO, b"")).reply == b""
    result = await client.call(ECHO, b"hello", intos=[bytearray(8)])
    assert (result.reply, list(result.lengths)) == (b"hello", [0])
    assert setup.service.done == []  # a plan without on_done


# Around tcp's staging (16 KiB) and its 4 KiB inline reply, and shm's message size (64 KiB).
MESSAGE_SIZES = [0, 1, 100, 4 * KIB - 1, 4 * KIB, 5000, 16 * KIB - 1, 16 * KIB + 1, 64 * KIB - 17,
                 64 * KIB, 64 * KIB + 1, 200 * KIB, 1 * MIB]  # fmt: skip


@pytest.mark.timeout(60)
async def test_messages_of_every_size_round_trip_pipelined(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    rng = random.Random(11)
    messages = [rng.randbytes(n) for n in MESSAGE_SIZES]
    data = rng.randbytes(8 * KIB)
    setup.region.view[0 : len(data)] = data

    async def echo(message: bytes) -> None:
        assert (await client.call(ECHO, message)).reply == message

    async def get(index: int) -> None:
        into = bytearray(len(data))
        result = await client.call(GET, _req(ranges=[[0, len(data)]], pad="x" * index), [], [into])
        assert result.reply == b"got"
        assert bytes(into) == data

    for _ in range(3):  # sequential, then many in flight on the one connection
        for message in messages:
            await echo(message)
    await asyncio.gather(*(echo(m) for m in messages * 3), *(get(n) for n in MESSAGE_SIZES[:-1]))
    await _finished(setup, [True] * (len(MESSAGE_SIZES) - 1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [0, 1, 4 * KIB, 64 * KIB, 2 * MIB, 32 * MIB])
async def test_batch_get_is_byte_exact(setup: Setup, size: int) -> None:
    rng = random.Random(size)
    client = await setup.connect()
    offsets = [5, 40 * MIB + 3, 80 * MIB + 1]  # unaligned on purpose
    data = [_random(size, rng) for _ in offsets]
    for offset, block in zip(offsets, data, strict=True):
        setup.region.view[offset : offset + size] = block.tobytes()
    intos: list[Any] = [
        np.zeros(size, dtype=np.uint8),
        bytearray(size + 7),  # longer than its source: filled from its start
        memoryview(bytearray(size)),
        bytearray(3),  # a missing key: no bytes
    ]
    ranges = [[o, size] for o in offsets] + [[-1, 0]]
    result = await client.call(GET, _req(ranges=ranges), intos=intos)
    assert result.reply == b"got"
    assert list(result.lengths) == [size, size, size, 0]
    for into, block in zip(intos[:3], data, strict=True):
        assert _digest(memoryview(into)[:size]) == _digest(block)
    assert bytes(intos[1][size:]) == bytes(7)
    await _finished(setup, [True])


@pytest.mark.timeout(60)
async def test_batch_of_thousands_of_blocks(setup: Setup) -> None:
    rng = random.Random(7)
    client = await setup.connect()
    count, size = 3000, 4 * KIB + 1  # more buffers than one sendmsg takes
    blocks = [_random(size, rng) for _ in range(count)]
    offsets = [i * (size + 3) for i in range(count)]
    put = await client.call(PUT, _req(offsets=offsets), segments=blocks)
    assert put.reply == f"stored {count * size}".encode()
    intos = [np.zeros(size, dtype=np.uint8) for _ in range(count)]
    got = await client.call(GET, _req(ranges=[[o, size] for o in offsets]), intos=intos)
    assert list(got.lengths) == [size] * count
    for block, into in zip(blocks, intos, strict=True):
        assert _digest(into) == _digest(block)
    await _finished(setup, [True, True])


@pytest.mark.timeout(60)
async def test_put_lands_in_sinks_and_drops_unwanted_segments(setup: Setup) -> None:
    rng = random.Random(3)
    client = await setup.connect()
    sizes = [64 * KIB, 2 * MIB, 1, 0, 4 * KIB, 3 * MIB]
    offsets = [0, 1 * MIB, -1, 10 * MIB, 12 * MIB, -1]  # -1: the service skips that key
    segments = [_random(n, rng) for n in sizes]
    setup.region.view[0 : 16 * MIB] = bytes(16 * MIB)
    result = await client.call(PUT, _req(offsets=offsets), segments=segments)
    stored = sum(n for n, o in zip(sizes, offsets, strict=True) if o >= 0)
    assert result.reply == f"stored {stored}".encode()
    assert list(result.lengths) == []
    for offset, segment in zip(offsets, segments, strict=True):
        if offset >= 0:
            landed = setup.region.view[offset : offset + segment.size]
            assert _digest(landed) == _digest(segment)
    await _finished(setup, [True])
    # Every segment dropped: the connection stays in step.
    everything_skipped = await client.call(
        PUT, _req(offsets=[-1, -1]), segments=[bytes(2 * MIB), b"x"]
    )
    assert everything_skipped.reply == b"stored 0"
    await _usable(client)
    back = bytearray(2 * MIB)
    assert list((await client.call(GET, _req(ranges=[[1 * MIB, 2 * MIB]]), intos=[back])).lengths)
    assert _digest(back) == _digest(segments[1])


ERRORS = [
    errors.NotFound,
    errors.AlreadyExists,
    errors.PreconditionFailed,
    errors.InvalidArgument,
    errors.Overloaded,
    errors.QuotaExceeded,
    errors.Unavailable,
    errors.Corrupt,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.DeadlineExceeded,
    errors.Internal,
    errors.StaleEpoch,
    base.DescriptorExpired,
    base.DescriptorRejected,
    base.PeerLost,
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
async def test_handler_errors_reach_the_caller_as_the_same_class(
    setup: Setup, error: type[errors.KVTierError]
) -> None:
    client = await setup.connect()
    request = _req(error=error.__name__, text=f"the service says {error.__name__}")
    with pytest.raises(error) as raised:
        await client.call(FAIL, request, segments=[bytes(1 * MIB)], intos=[bytearray(10)])
    assert type(raised.value) is error
    assert raised.value.message == f"the service says {error.__name__}"
    await _usable(client)
    assert setup.service.done == []  # no plan, no on_done


@pytest.mark.timeout(30)
async def test_on_received_error_fails_the_call_and_aborts_the_plan(setup: Setup) -> None:
    client = await setup.connect()
    with pytest.raises(errors.Corrupt, match="checksum mismatch"):
        await client.call(BAD_RECEIVED, b"{}", segments=[bytes(2 * MIB), b"abc"])
    await _finished(setup, [False])
    await _usable(client)


@pytest.mark.timeout(30)
async def test_source_longer_than_its_buffer_is_internal(setup: Setup) -> None:
    client = await setup.connect()
    into = bytearray(100)
    with pytest.raises(errors.Internal):
        await client.call(TOO_LONG, b"{}", intos=[into])
    assert into == bytearray(100)
    await _finished(setup, [False])
    await _usable(client)


@pytest.mark.timeout(30)
async def test_no_handler_is_unavailable(setup: Setup) -> None:
    client = await setup.connect()
    setup.plane.ctx.call_handler = None
    with pytest.raises(errors.Unavailable, match="serves no data-plane calls"):
        await client.call(ECHO, b"x", segments=[bytes(64 * KIB)])
    # Reads and writes still work on the same connection.
    data = random.Random(1).randbytes(64 * KIB)
    await client.write(setup.grant(0, len(data)), data)
    out = bytearray(len(data))
    await client.read(setup.grant(0, len(data)), out)
    assert bytes(out) == data


@pytest.mark.timeout(30)
async def test_limits_are_checked_before_anything_is_sent(setup: Setup) -> None:
    client = await setup.connect()
    with pytest.raises(errors.InvalidArgument, match="exceeds"):
        await client.call(ECHO, bytes(base.MAX_CALL_MESSAGE_BYTES + 1))
    with pytest.raises(errors.InvalidArgument, match="at most"):
        await client.call(ECHO, b"", intos=[bytearray(1)] * (base.MAX_CALL_ITEMS + 1))
    with pytest.raises(errors.InvalidArgument, match="method"):
        await client.call(-1, b"")
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        await client.call(ECHO, b"", intos=[b"immutable"])
    assert setup.service.handled == 0
    # The largest message there may be goes through, both ways (in pieces on shm).
    big = random.Random(2).randbytes(base.MAX_CALL_MESSAGE_BYTES)
    assert (await client.call(ECHO, big)).reply == big


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", [GET, PUT])
async def test_client_dying_mid_transfer_ends_the_plan_with_false(
    setup: Setup, method: int
) -> None:
    victim = await setup.connect()
    handled = asyncio.Event()
    setup.service.on_handle = handled.set
    size = 32 * MIB
    if method == GET:
        call = victim.call(
            GET, _req(ranges=[[0, size], [size, size]]), intos=[bytearray(size), bytearray(size)]
        )
    else:
        call = victim.call(PUT, _req(offsets=[0, size]), segments=[bytes(size), bytes(size)])
    transfer = asyncio.create_task(call)
    await asyncio.wait_for(handled.wait(), 10)
    await victim.close()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(transfer, 20)
    server = setup.plane.server(setup.name)
    await _until(lambda: server.connection_count() == 0)
    await _finished(setup, [False])
    setup.service.on_handle = None
    await _usable(await setup.connect())


@pytest.mark.timeout(60)
async def test_cancelled_put_keeps_the_connection_in_step(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    handled = asyncio.Event()
    setup.service.on_handle = handled.set
    size = 32 * MIB
    data = random.Random(9).randbytes(size)
    put = asyncio.create_task(
        client.call(PUT, _req(offsets=[0, size]), segments=[data, memoryview(data)])
    )
    await asyncio.wait_for(handled.wait(), 10)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    # tcp: the request was partly sent, so the rest goes out (copied) and the put lands, as a
    # cancelled write may; shm: the client quits before filling the sinks and the plan aborts.
    await _finished(setup, [setup.name == "tcp"])
    setup.service.on_handle = None
    await _usable(client)
    if setup.name == "tcp":
        assert bytes(setup.region.view[size : 2 * size]) == data


@pytest.mark.timeout(60)
async def test_many_calls_interleave_with_reads_and_writes(setup: Setup) -> None:
    client = await setup.connect()
    slot = 2 * MIB

    async def one(index: int) -> None:
        rng = random.Random(index)
        offset = index * slot
        size = rng.choice([1, 4 * KIB, 64 * KIB, slot])
        data = _random(size, rng)
        if index % 2:
            put = await client.call(PUT, _req(offsets=[offset]), segments=[data])
            assert put.reply == f"stored {size}".encode()
        else:
            await client.write(setup.grant(offset, size), data)
        out = np.zeros(size, dtype=np.uint8)
        if index % 3:
            got = await client.call(GET, _req(ranges=[[offset, size]]), intos=[out])
            assert list(got.lengths) == [size]
        else:
            await client.read(setup.grant(offset, size), out)
        assert _digest(out) == _digest(data), f"task {index}"

    await asyncio.gather(*(one(i) for i in range(48)))
    calls = sum(1 for i in range(48) if i % 2) + sum(1 for i in range(48) if i % 3)
    await _finished(setup, [True] * calls)


@pytest.mark.timeout(60)
async def test_calls_larger_than_the_byte_budget_run_alone(setup: Setup) -> None:
    client = await setup.connect(max_inflight_bytes=1 * MIB)
    data = random.Random(5).randbytes(3 * MIB)
    setup.region.view[0 : len(data)] = data
    outs = [bytearray(3 * MIB) for _ in range(4)]
    results = await asyncio.gather(
        *(client.call(GET, _req(ranges=[[0, len(data)]]), intos=[out]) for out in outs)
    )
    assert [list(r.lengths) for r in results] == [[len(data)]] * 4
    assert all(bytes(out) == data for out in outs)


# A service stuck in its handler must not stall the client: the server runs on its own thread.


@contextlib.asynccontextmanager
async def _node_on_a_thread(name: str) -> AsyncIterator[Setup]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()

    holder: list[Setup] = []
    started = asyncio.Event()
    stop = asyncio.Event()
    here = asyncio.get_running_loop()

    async def serve() -> None:
        async with _node(name) as node:
            holder.append(node)
            here.call_soon_threadsafe(started.set)
            while not stop.is_set():  # noqa: ASYNC110 - stop is set from the test's loop
                await asyncio.sleep(0.01)

    serving = asyncio.run_coroutine_threadsafe(serve(), loop)
    try:
        await asyncio.wait_for(started.wait(), 10)
        node = holder[0]

        async def connect(**settings: Any) -> base.Transport:
            token, _ = node.plane.issuer.issue_token("client-a")
            endpoint = node.plane.capabilities.endpoints[0]
            client: base.Transport = await registry.connect(
                endpoint, token, registry.ClientSettings(**settings)
            )
            return client

        yield Setup(name, node.plane, node.region, node.service, connect)
    finally:
        stop.set()
        await asyncio.wrap_future(serving)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", _transports())
async def test_deadline_abandons_the_call_and_the_connection_stays_usable(name: str) -> None:
    async with _node_on_a_thread(name) as setup:
        client = await setup.connect(timeout_s=0.3, connections=1)
        try:
            setup.region.view[0 : 1 * MIB] = b"\xee" * MIB
            into = bytearray(1 * MIB)
            with pytest.raises(errors.DeadlineExceeded):
                await client.call(SLOW, _req(sleep_s=1.0, length=1 * MIB), intos=[into])
            assert setup.service.done == []  # raised while the service was still stuck
            await _until(lambda: setup.service.done == [True])  # the service came unstuck
            await _usable(client)  # answered after the late reply, on the same connection
            assert into == bytearray(1 * MIB)  # the late payload never touched the buffer
            await _until(lambda: len(setup.leases) == 0)
        finally:
            await client.close()


@pytest.mark.timeout(30)
async def test_rdma_does_not_carry_calls() -> None:
    async def exchange(mine: common_pb2.RdmaQueuePair) -> common_pb2.RdmaQueuePair:
        return mine

    client = rdma_client.Client(
        common_pb2.TransportEndpoint(name="rdma"), registry.ClientSettings(rdma_exchange=exchange)
    )
    assert client.supports_calls is False
    with pytest.raises(errors.Unavailable, match="not carried over rdma"):
        await client.call(ECHO, b"")
