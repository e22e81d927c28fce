"""The tcp client's synchronous calls (`tcp.Client.begin_call_now`, `wait_now`, `end_call_now`:
the sync KV client's short path) against a real data plane served on its own thread.

The caller's thread sends and receives on the socket itself, outside the loop: a request that
the socket takes in part waits for the loop (`finish_call`), a reply whose payload comes in many
receives lands whole in the caller's buffer, and the connection stays in step for the calls that
follow, synchronous or not. Every payload is compared byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from typing import Any

import numpy as np
import pytest

from kvtier import errors
from kvtier.transport import base, tcp
from tests.transport import test_calls as calls_tests

KIB, MIB = 1024, 1024 * 1024
GET, ECHO, SLOW = calls_tests.GET, calls_tests.ECHO, calls_tests.SLOW


def _digest(buf: Any) -> str:
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def _sync_call(client: tcp.Client, method: int, request: bytes, intos: list[Any]) -> Any:
    op = client.begin_call_now(method, request, intos)
    assert op is not None  # nothing else in flight: the short path takes it
    assert client.wait_now(op, 0.0)  # no spin: sleep on the socket until the reply is in
    return client.end_call_now(op)


@pytest.mark.timeout(60)
async def test_sync_calls_take_large_and_small_payloads_whole() -> None:
    async with calls_tests._node_on_a_thread("tcp") as setup:
        client = await setup.connect(connections=1)
        assert isinstance(client, tcp.Client)
        try:
            rng = random.Random(5)
            # 8 MiB: more than one receive (and than the socket buffer); then a single get's size.
            for offset, size in ((3, 8 * MIB), (40 * MIB + 1, 64 * KIB), (7, 1)):
                data = rng.randbytes(size)
                setup.region.view[offset : offset + size] = data
                into = np.zeros(size + 9, dtype=np.uint8)  # longer than its source
                request = calls_tests._req(ranges=[[offset, size]])
                result = _sync_call(client, GET, request, [into])
                assert (result.reply, list(result.lengths)) == (b"got", [size])
                assert _digest(into[:size]) == _digest(data)
                assert not into[size:].any()
            await calls_tests._usable(client)  # the connection is still in step
            await calls_tests._finished(setup, [True, True, True])
        finally:
            await client.close()


@pytest.mark.timeout(60)
async def test_a_sync_request_longer_than_the_socket_takes_finishes_on_the_loop() -> None:
    async with calls_tests._node_on_a_thread("tcp") as setup:
        client = await setup.connect(connections=2)
        assert isinstance(client, tcp.Client)
        try:
            for conn in client._conns:  # small send buffers: the socket takes the request in part
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KIB)
            # A stuck handler holds the node's loop: it reads nothing while the request is sent.
            stuck = asyncio.ensure_future(
                client.call(SLOW, calls_tests._req(sleep_s=0.5, length=0), intos=[bytearray(0)])
            )
            await calls_tests._until(lambda: setup.service.handled == 1)
            message = random.Random(9).randbytes(base.MAX_CALL_MESSAGE_BYTES)
            op = client.begin_call_now(ECHO, message)  # on the other connection
            assert op is not None
            assert not client.wait_now(op, 0.0)  # the rest of the request waits for the loop
            result = await client.finish_call(op)
            assert result.reply == message
            assert (await stuck).reply == b""
            # The budget is back and nothing is left queued: the next one goes the short way.
            assert _sync_call(client, ECHO, b"next", []).reply == b"next"
            await calls_tests._usable(client)
        finally:
            await client.close()


@pytest.mark.timeout(60)
async def test_a_sync_call_past_its_deadline_leaves_the_connection_in_step() -> None:
    async with calls_tests._node_on_a_thread("tcp") as setup:
        client = await setup.connect(timeout_s=0.3, connections=1)
        assert isinstance(client, tcp.Client)
        try:
            setup.region.view[0 : 1 * MIB] = b"\xee" * MIB
            into = bytearray(1 * MIB)
            request = calls_tests._req(sleep_s=1.0, length=1 * MIB)
            op = client.begin_call_now(SLOW, request, [into])
            assert op is not None
            assert client.wait_now(op, 0.0)  # done: by its deadline, the node still stuck
            with pytest.raises(errors.DeadlineExceeded):
                client.end_call_now(op)
            await calls_tests._until(lambda: setup.service.done == [True])  # came unstuck
            assert _sync_call(client, ECHO, b"after", []).reply == b"after"  # late reply dropped
            assert into == bytearray(1 * MIB)  # the late payload never touched the buffer
        finally:
            await client.close()
