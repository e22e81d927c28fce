"""Calls (`base.Transport.call`) over every transport that carries them: tcp and shm.

Each test starts a real DataPlane with one transport and a toy service (`Service`) as its call
handler, and connects real clients. Every payload is checked byte for byte; every plan's on_done
is checked to run exactly once, with True when its bytes went out and False when the call failed
or its connection died. The service's handler and on_received may also return awaitables
(method AWAIT), gated by events the tests open.
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
from kvtier.transport import base, calls, dataplane, rdma_client, registry

KIB, MIB = 1024, 1024 * 1024
REGION_BYTES = 200 * MIB
RW = base.Rights.READ | base.Rights.WRITE

ECHO, GET, PUT, FAIL, BAD_RECEIVED, TOO_LONG, SLOW, AWAIT = range(1, 9)


class Service:
    """A toy node service over one region: echo, gets and puts of ranges, and misbehaviour.

    Requests are JSON. `done` records every on_done(ok) in order; `handled` counts handler calls
    and `on_handle` (if set) runs in each.

    AWAIT is the asynchronous method (see `_awaited_plan`): its handler and its on_received may
    each await a gate (`gate(name)`, an Event the test sets) or a sleep first. `waiting` records
    every wait as it starts, `cancelled` every wait cancelled, `committed` the tags of the
    on_receiveds that completed, in order.
    """

    def __init__(self, region: base.Region) -> None:
        self.region = region
        self.done: list[bool] = []
        self.handled = 0
        self.on_handle: Callable[[], None] | None = None
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: list[str] = []
        self.cancelled: list[str] = []
        self.committed: list[int] = []

    def __call__(
        self,
        principal: str,
        method: int,
        request: bytes,
        segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan | Awaitable[base.CallPlan]:
        self.handled += 1
        if self.on_handle is not None:
            self.on_handle()
        if method == ECHO:
            return base.CallPlan(reply=request)
        req = json.loads(request)
        if method == AWAIT:
            if "plan_wait" in req:
                return self._plan_later(req, segments)
            return self._awaited_plan(req, segments)
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

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def _wait(self, spec: dict[str, Any]) -> None:
        name = spec.get("gate", "sleep")
        self.waiting.append(name)
        try:
            if "gate" in spec:
                await self.gate(name).wait()
            else:
                await asyncio.sleep(spec["sleep_s"])
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise

    async def _plan_later(self, req: dict[str, Any], segments: Sequence[int]) -> base.CallPlan:
        """The handler awaits first (a stubborn one shrugs off its cancellation)."""
        try:
            await self._wait(req["plan_wait"])
        except asyncio.CancelledError:
            if not req.get("stubborn"):
                raise
        if "error" in req:
            raise _error(req["error"])
        return self._awaited_plan(req, segments)

    def _awaited_plan(self, req: dict[str, Any], segments: Sequence[int]) -> base.CallPlan:
        """Sinks at `offsets`, sources from `ranges`; with `recv_wait`, an on_received that
        awaits, then commits `tag` (or raises `recv_error`)."""
        sinks = [self._span(o, n) for o, n in zip(req.get("offsets", ()), segments, strict=True)]
        sources = [self._span(o, n) for o, n in req.get("ranges", ())]

        async def on_received() -> bytes:
            await self._wait(req["recv_wait"])
            if "recv_error" in req:
                raise _error(req["recv_error"])
            self.committed.append(req["tag"])
            return f"committed {req['tag']}".encode()

        return base.CallPlan(
            reply=req.get("reply", "planned").encode(),
            sinks=sinks,
            sources=sources,
            on_received=on_received if "recv_wait" in req else None,
            on_done=self.done.append,
        )


def _error(name: str) -> Exception:
    cls = getattr(errors, name, None) or getattr(base, name, None)
    return cls(f"the service says {name}") if cls is not None else ValueError(name)


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
        token, _ = plane.issuer.issue_token("client-a", transport=name)
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
            endpoint = node.plane.capabilities.endpoints[0]
            token, _ = node.plane.issuer.issue_token("client-a", transport=endpoint.name)
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


# Handlers and on_receiveds that return awaitables (the AWAIT method).


def _gated(name: str) -> dict[str, str]:
    return {"gate": name}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [0, 64 * KIB, 3 * MIB])
async def test_async_handler_awaits_then_sends_its_sources(setup: Setup, size: int) -> None:
    client = await setup.connect()
    rng = random.Random(size)
    blocks = [_random(size, rng) for _ in range(2)]
    for index, block in enumerate(blocks):
        setup.region.view[index * 4 * MIB : index * 4 * MIB + size] = block.tobytes()
    first, second = np.zeros(size, dtype=np.uint8), bytearray(size + 5)
    request = _req(plan_wait={"sleep_s": 0.05}, ranges=[[0, size], [4 * MIB, size]])
    result = await client.call(AWAIT, request, intos=[first, second])
    assert result.reply == b"planned"
    assert list(result.lengths) == [size, size]
    assert _digest(first) == _digest(blocks[0])
    assert _digest(memoryview(second)[:size]) == _digest(blocks[1])
    assert setup.service.waiting == ["sleep"]
    await _finished(setup, [True])


@pytest.mark.timeout(60)
async def test_async_handler_plans_a_put_whose_payload_waits_for_its_sinks(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    rng = random.Random(4)
    segments = [_random(3 * MIB, rng), _random(100, rng), _random(20 * KIB, rng)]
    offsets = [1 * MIB, -1, 8 * MIB]
    gate = setup.service.gate("plan")
    put = asyncio.create_task(
        client.call(AWAIT, _req(plan_wait=_gated("plan"), offsets=offsets), segments=segments)
    )
    await _until(lambda: setup.service.waiting == ["plan"])
    echo = asyncio.create_task(client.call(ECHO, b"behind the put"))
    await asyncio.sleep(0.05)
    if setup.name == "tcp":  # the payload follows on the stream: nothing after it is parsed
        assert setup.service.handled == 1
        assert not echo.done()
    gate.set()
    assert (await put).reply == b"planned"
    assert (await echo).reply == b"behind the put"
    for offset, segment in zip(offsets, segments, strict=True):
        if offset >= 0:
            assert _digest(setup.region.view[offset : offset + segment.size]) == _digest(segment)
    await _finished(setup, [True])


@pytest.mark.timeout(60)
async def test_async_on_received_holds_the_sinks_then_commits(setup: Setup) -> None:
    client = await setup.connect()
    rng = random.Random(6)
    segments = [_random(2 * MIB, rng), _random(64 * KIB, rng)]
    offsets = [0, 4 * MIB]
    put = asyncio.create_task(
        client.call(
            AWAIT,
            _req(offsets=offsets, recv_wait=_gated("commit"), tag=7),
            segments=segments,
        )
    )
    await _until(lambda: setup.service.waiting == ["commit"])
    assert len(setup.leases) == 2  # the sinks stay leased while on_received awaits
    assert setup.service.committed == []
    setup.service.gate("commit").set()
    assert (await put).reply == b"committed 7"
    assert setup.service.committed == [7]
    for offset, segment in zip(offsets, segments, strict=True):
        assert _digest(setup.region.view[offset : offset + segment.size]) == _digest(segment)
    await _finished(setup, [True])


@pytest.mark.timeout(60)
async def test_async_completions_out_of_order_on_one_connection(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    rng = random.Random(12)
    count, slot = 16, 1 * MIB
    datas = [_random(rng.choice([1, 4 * KIB, 64 * KIB, slot]), rng) for _ in range(count)]
    for index in range(0, count, 2):  # even calls get, odd calls put
        setup.region.view[index * slot : index * slot + datas[index].size] = datas[index].tobytes()

    async def one(index: int) -> None:
        data, offset = datas[index], index * slot
        wait = _gated(f"g{index}")
        if index % 2:
            request = _req(offsets=[offset], recv_wait=wait, tag=index)
            result = await client.call(AWAIT, request, segments=[data])
        else:
            out = np.zeros(data.size, dtype=np.uint8)
            request = _req(ranges=[[offset, data.size]], recv_wait=wait, tag=index)
            result = await client.call(AWAIT, request, intos=[out])
            assert list(result.lengths) == [data.size]
            assert _digest(out) == _digest(data), f"call {index}"
        assert result.reply == f"committed {index}".encode()

    calls = asyncio.gather(*(one(i) for i in range(count)))
    # Later calls are read and served while earlier on_receiveds are pending.
    await _until(lambda: len(setup.service.waiting) == count)
    order = list(range(count))
    rng.shuffle(order)
    for index in order:
        setup.service.gate(f"g{index}").set()
        await asyncio.sleep(0.002)
    await calls
    assert setup.service.committed == order  # they completed out of order
    for index in range(1, count, 2):
        landed = setup.region.view[index * slot : index * slot + datas[index].size]
        assert _digest(landed) == _digest(datas[index]), f"put {index}"
    await _finished(setup, [True] * count)


@pytest.mark.timeout(60)
async def test_sync_and_async_calls_mix_on_one_connection(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    slot = 1 * MIB

    async def one(index: int) -> None:
        rng = random.Random(index)
        offset, size = index * slot, rng.choice([1, 4 * KIB, 64 * KIB, slot])
        data = _random(size, rng)
        kind = index % 4
        if kind == 0:
            put = await client.call(PUT, _req(offsets=[offset]), segments=[data])
            assert put.reply == f"stored {size}".encode()
        elif kind == 1:
            request = _req(offsets=[offset], recv_wait={"sleep_s": 0.01}, tag=index)
            put = await client.call(AWAIT, request, segments=[data])
            assert put.reply == f"committed {index}".encode()
        elif kind == 2:
            request = _req(plan_wait={"sleep_s": 0.01}, offsets=[offset])
            assert (await client.call(AWAIT, request, segments=[data])).reply == b"planned"
        else:
            await client.write(setup.grant(offset, size), data)
        assert (await client.call(ECHO, f"echo {index}".encode())).reply == f"echo {index}".encode()
        out = np.zeros(size, dtype=np.uint8)
        if index % 3 == 0:
            got = await client.call(GET, _req(ranges=[[offset, size]]), intos=[out])
        elif index % 3 == 1:
            request = _req(plan_wait={"sleep_s": 0.005}, ranges=[[offset, size]])
            got = await client.call(AWAIT, request, intos=[out])
        else:
            request = _req(ranges=[[offset, size]], recv_wait={"sleep_s": 0.005}, tag=index)
            got = await client.call(AWAIT, request, intos=[out])
        assert list(got.lengths) == [size]
        assert _digest(out) == _digest(data), f"task {index}"

    await asyncio.gather(*(one(i) for i in range(40)))
    puts = sum(1 for i in range(40) if i % 4 != 3)
    await _finished(setup, [True] * (puts + 40))


@pytest.mark.timeout(60)
async def test_later_replies_wait_for_a_pending_async_one_on_tcp_only(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    setup.region.view[0:100] = bytes(range(100))
    slow = asyncio.create_task(
        client.call(
            AWAIT, _req(ranges=[[0, 100]], recv_wait=_gated("slow"), tag=1), intos=[bytearray(100)]
        )
    )
    await _until(lambda: setup.service.waiting == ["slow"])
    out = bytearray(100)
    fast = asyncio.create_task(client.call(GET, _req(ranges=[[0, 100]]), intos=[out]))
    await _until(lambda: setup.service.handled == 2)  # served while the first one awaits
    await asyncio.sleep(0.05)
    # tcp answers in request order; shm replies carry their request id.
    assert fast.done() is (setup.name == "shm")
    setup.service.gate("slow").set()
    assert (await slow).reply == b"committed 1"
    assert (await fast).reply == b"got"
    assert bytes(out) == bytes(range(100))
    await _finished(setup, [True, True])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
async def test_async_errors_reach_the_caller_as_the_same_class(
    setup: Setup, error: type[errors.KVTierError]
) -> None:
    client = await setup.connect(connections=1)
    wait = {"sleep_s": 0.01}
    with pytest.raises(error, match=f"the service says {error.__name__}") as raised:
        await client.call(
            AWAIT,
            _req(plan_wait=wait, error=error.__name__),
            segments=[bytes(1 * MIB)],
            intos=[bytearray(10)],
        )
    assert type(raised.value) is error
    assert setup.service.done == []  # no plan, no on_done
    await _usable(client)
    with pytest.raises(error, match=f"the service says {error.__name__}") as raised:
        await client.call(
            AWAIT,
            _req(offsets=[0], recv_wait=wait, recv_error=error.__name__, tag=1),
            segments=[bytes(1 * MIB)],
        )
    assert type(raised.value) is error
    await _finished(setup, [False])
    await _usable(client)


@pytest.mark.timeout(30)
async def test_sync_calls_take_no_task(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    awaited: list[object] = []
    run = calls.Awaits.run

    def counted(self: calls.Awaits, call: calls.ServerCall, *rest: Any) -> None:
        awaited.append(call)
        run(self, call, *rest)

    monkeypatch.setattr(calls.Awaits, "run", counted)
    client = await setup.connect()
    data = random.Random(8).randbytes(64 * KIB)
    await client.call(ECHO, b"x")
    await client.call(PUT, _req(offsets=[0]), segments=[data])
    out = bytearray(len(data))
    await client.call(GET, _req(ranges=[[0, len(data)]]), intos=[out])
    assert bytes(out) == data
    assert awaited == []
    await client.call(AWAIT, _req(ranges=[[0, 1]], recv_wait={"sleep_s": 0}, tag=1), intos=[out])
    assert len(awaited) == 1


@pytest.mark.timeout(30)
async def test_an_unexpected_async_error_is_internal(setup: Setup) -> None:
    client = await setup.connect()
    with pytest.raises(errors.Internal) as raised:
        await client.call(AWAIT, _req(plan_wait={"sleep_s": 0.01}, error="NoSuchError"))
    assert "NoSuchError" not in raised.value.message  # no traceback or text in the reply
    with pytest.raises(errors.Internal):
        await client.call(
            AWAIT, _req(ranges=[[0, 10]], recv_wait={"sleep_s": 0.01}, recv_error="Nope", tag=1),
            intos=[bytearray(10)],
        )  # fmt: skip
    await _finished(setup, [False])
    await _usable(client)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["handler", "stubborn handler", "on_received"])
async def test_connection_lost_while_awaiting_cancels_and_ends_the_plan(
    setup: Setup, stage: str
) -> None:
    victim = await setup.connect()
    # A get while the handler awaits (on tcp a put's payload would sit unread behind the call, so
    # the hang-up would only be noticed once the plan is in); a put while on_received awaits.
    segments: list[bytes] = []
    if stage == "on_received":
        segments = [bytes(2 * MIB), bytes(10)]
        request = _req(offsets=[0, 4 * MIB], recv_wait=_gated("g"), tag=1)
    else:
        stubborn = stage == "stubborn handler"
        request = _req(plan_wait=_gated("g"), stubborn=stubborn, ranges=[[0, 1 * MIB]])
    intos = [bytearray(1 * MIB)]
    call = asyncio.create_task(victim.call(AWAIT, request, segments=segments, intos=intos))
    await _until(lambda: setup.service.waiting == ["g"])
    await victim.close()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(call, 10)
    server = setup.plane.server(setup.name)
    await _until(lambda: server.connection_count() == 0)
    await _until(lambda: setup.service.cancelled == ["g"])  # the awaitable was cancelled
    # No plan (the handler was cancelled) means no on_done; a plan made anyway, or one whose
    # on_received was pending, ends with on_done(False), exactly once.
    await _finished(setup, [] if stage == "handler" else [False])
    setup.service.gate("g").set()
    await asyncio.sleep(0.02)
    assert setup.service.committed == []
    assert setup.service.done == ([] if stage == "handler" else [False])
    await _usable(await setup.connect())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["handler", "on_received"])
async def test_deadline_shorter_than_the_awaitable(setup: Setup, stage: str) -> None:
    client = await setup.connect(timeout_s=0.3, connections=1)
    setup.region.view[0 : 1 * MIB] = b"\xee" * MIB
    into = bytearray(1 * MIB)
    wait = {"sleep_s": 1.0}
    if stage == "handler":
        request = _req(plan_wait=wait, ranges=[[0, 1 * MIB]])
    else:
        request = _req(ranges=[[0, 1 * MIB]], recv_wait=wait, tag=1)
    with pytest.raises(errors.DeadlineExceeded):
        await client.call(AWAIT, request, intos=[into])
    assert setup.service.done == []  # raised while the service was still awaiting
    # tcp sends the late reply (the client drops it); on shm the client released the call, so
    # the server ends the plan without sending it.
    await _finished(setup, [setup.name == "tcp"])
    await _usable(client)  # on the same connection, after the late reply
    assert into == bytearray(1 * MIB)  # the late payload never touched the buffer


@pytest.mark.timeout(60)
async def test_too_many_pending_awaits_pause_the_connection(setup: Setup) -> None:
    client = await setup.connect(connections=1)
    count = calls.MAX_AWAITING + 16
    results = asyncio.gather(
        *(
            client.call(
                AWAIT, _req(ranges=[[i, 1]], recv_wait=_gated("all"), tag=i), intos=[bytearray(1)]
            )
            for i in range(count)
        )
    )
    await _until(lambda: len(setup.service.waiting) == calls.MAX_AWAITING)
    await asyncio.sleep(0.1)
    assert len(setup.service.waiting) == calls.MAX_AWAITING  # the rest wait unread
    setup.service.gate("all").set()
    replies = await results
    assert [r.reply for r in replies] == [f"committed {i}".encode() for i in range(count)]
    await _finished(setup, [True] * count)
