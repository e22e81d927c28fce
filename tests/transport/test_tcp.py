"""What is particular to the tcp transport: connections, drained payloads, deadlines, dead peers.

The shared behaviour (byte-exact transfers, grants, rights, tokens) is in test_conformance.py.
Servers run in-process through DataPlane; where a peer must die or freeze for real, it runs in a
subprocess that is killed or SIGSTOPped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import uvloop

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, registry, tcp, tcp_server

KIB, MIB = 1024, 1024 * 1024
RW = base.Rights.READ | base.Rights.WRITE


@dataclass
class Node:
    plane: dataplane.DataPlane
    region: base.Region
    endpoint: common_pb2.TransportEndpoint
    clients: list[tcp.Client] = field(default_factory=list)

    @property
    def server(self) -> tcp.Server:
        server = self.plane.server("tcp")
        assert isinstance(server, tcp.Server)
        return server

    def grant(self, offset: int, length: int, ttl_s: float = 30.0) -> base.Descriptor:
        return self.plane.issuer.grant(self.region, offset, length, RW, "client", ttl_s)

    async def connect(
        self, *, connections: int = 4, max_inflight_bytes: int = 256 * MIB
    ) -> tcp.Client:
        token, _ = self.plane.issuer.issue_token("client", transport="tcp")
        settings = registry.ClientSettings(
            connections=connections, max_inflight_bytes=max_inflight_bytes, timeout_s=20
        )
        client = await tcp.connect(self.endpoint, token, settings)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.plane.stop()


async def start_node(region_bytes: int = 80 * MIB) -> Node:
    plane = dataplane.DataPlane("tcp-node", ["tcp"], registry.ServerSettings())
    region = plane.regions.create(region_bytes)
    caps = await plane.start()
    return Node(plane, region, caps.endpoints[0])


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    started = await start_node()
    yield started
    await started.stop()


async def eventually(
    condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01
) -> None:
    """Wait until condition() holds (polling: the server acts in loop callbacks, not awaitables)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(interval_s)


def digest(buf: object) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()  # type: ignore[arg-type]


def pattern(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


async def test_connection_count_follows_clients(node: Node) -> None:
    client = await node.connect(connections=3)
    assert node.server.connection_count() == 3
    other = await node.connect(connections=2)
    assert node.server.connection_count() == 5
    await client.close()
    await client.close()  # idempotent
    await eventually(lambda: node.server.connection_count() == 2)
    with pytest.raises(base.PeerLost):
        await client.read(node.grant(0, 8), bytearray(8))
    await other.close()
    await eventually(lambda: node.server.connection_count() == 0)


async def test_refused_and_foreign_connections_do_not_linger(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_server, "_HELLO_TIMEOUT_S", 0.2)
    impostor, _ = base.Issuer("elsewhere").issue_token("client", transport="tcp")
    with pytest.raises(errors.PermissionDenied):
        await tcp.connect(node.endpoint, impostor, registry.ClientSettings(timeout_s=5))
    host, port = node.endpoint.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as junk:
        junk.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not a kvtier client: dropped at once
        with socket.create_connection((host, int(port))):  # silent: dropped after the timeout
            await eventually(lambda: node.server.connection_count() == 0)


async def test_invalid_write_is_drained_and_the_connection_stays_usable(node: Node) -> None:
    client = await node.connect(connections=1)  # everything below shares one pipeline
    node.region.view[0 : 1 * MIB] = b"\x11" * MIB
    good, data = node.grant(2 * MIB, 1 * MIB), pattern(1 * MIB, 1)
    forged = replace(node.grant(0, 1 * MIB), mac=bytes(16))
    expired = node.grant(0, 1 * MIB, ttl_s=-1)
    read_only = node.plane.issuer.grant(node.region, 0, 1 * MIB, base.Rights.READ, "client")
    results = await asyncio.gather(
        client.write(forged, pattern(1 * MIB, 2)),
        client.write(good, data),
        client.write(expired, pattern(1 * MIB, 3)),
        client.write(read_only, pattern(1 * MIB, 4)),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [
        base.DescriptorRejected,
        type(None),
        base.DescriptorExpired,
        base.DescriptorRejected,
    ]
    assert bytes(node.region.view[0 : 1 * MIB]) == b"\x11" * MIB
    back = np.zeros(1 * MIB, dtype=np.uint8)
    await client.read(good, back)
    assert digest(back) == digest(data)
    # A batch raises its first error, and the valid writes in it still land.
    other = pattern(64 * KIB, 5)
    with pytest.raises(base.DescriptorRejected):
        await client.write_batch([forged, node.grant(4 * MIB, 64 * KIB)], [data, other])
    assert digest(node.region.view[4 * MIB : 4 * MIB + 64 * KIB]) == digest(other)
    assert len(node.plane.ctx.leases) == 0


async def test_zero_length_operations_round_trip(node: Node) -> None:
    client = await node.connect()
    empty = node.grant(5, 0)
    await client.write(empty, b"")
    await client.read(empty, bytearray())
    await client.read_batch([empty, node.grant(0, 3)], [bytearray(), bytearray(3)])
    with pytest.raises(base.DescriptorRejected):
        await client.read(replace(empty, mac=bytes(16)), bytearray())


async def test_byte_budget_bounds_the_bytes_in_flight(node: Node) -> None:
    client = await node.connect(max_inflight_bytes=1 * MIB, connections=2)
    blocks = [pattern(256 * KIB, i) for i in range(32)]
    descs = [node.grant(i * 256 * KIB, 256 * KIB) for i in range(32)]
    big = pattern(8 * MIB, 99)  # larger than the whole budget: runs alone
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, client._budget.used_bytes)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(
        client.write_batch(descs[:16], blocks[:16]), client.write_batch(descs[16:], blocks[16:])
    )
    assert 0 < peak <= 1 * MIB
    peak = 0
    await asyncio.gather(
        client.write(node.grant(40 * MIB, 8 * MIB), big),
        client.read_batch(descs[:8], [np.zeros(256 * KIB, dtype=np.uint8) for _ in range(8)]),
    )
    assert peak <= 8 * MIB
    sampler.cancel()
    outs = [np.zeros(256 * KIB, dtype=np.uint8) for _ in blocks]
    await client.read_batch(descs, outs)
    assert [digest(o) for o in outs] == [digest(b) for b in blocks]
    assert digest(node.region.view[40 * MIB : 48 * MIB]) == digest(big)
    assert client._budget.used_bytes == 0


async def test_server_stop_fails_pending_operations_with_peer_lost(node: Node) -> None:
    client = await node.connect()
    descs = [node.grant(i * 2 * MIB, 2 * MIB) for i in range(32)]
    outs = [np.zeros(2 * MIB, dtype=np.uint8) for _ in descs]
    transfer = asyncio.create_task(client.read_batch(descs, outs))
    await eventually(lambda: len(node.plane.ctx.leases) > 0, 5, interval_s=0)  # mid-transfer
    await node.server.stop()
    start = time.monotonic()
    with pytest.raises(base.PeerLost):
        await transfer
    assert time.monotonic() - start < 2
    assert node.server.connection_count() == 0
    assert len(node.plane.ctx.leases) == 0
    with pytest.raises(base.PeerLost):
        await client.read(descs[0], outs[0])
    await client.close()


# A client in its own process that writes 32 MiB blocks until it is killed.
_WRITER = """
import sys
import uvloop
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry

async def main() -> None:
    endpoint = common_pb2.TransportEndpoint(name="tcp", address=sys.argv[1])
    desc = base.Descriptor.from_proto(common_pb2.Descriptor.FromString(bytes.fromhex(sys.argv[3])))
    client = await registry.connect(endpoint, bytes.fromhex(sys.argv[2]), registry.ClientSettings())
    data = b"\\x5a" * desc.length
    print("writing", flush=True)
    while True:
        await client.write(desc, data)

uvloop.run(main())
"""


async def test_client_killed_mid_write_leaves_no_lease_and_others_are_served(node: Node) -> None:
    token, _ = node.plane.issuer.issue_token("victim", transport="tcp")
    desc = node.plane.issuer.grant(node.region, 0, 32 * MIB, RW, "victim")
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, node.endpoint.address, token.hex(),
        desc.to_proto().SerializeToString().hex(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert victim.stdout is not None
        async with asyncio.timeout(30):
            assert await victim.stdout.readline() == b"writing\n"
        await eventually(lambda: len(node.plane.ctx.leases) > 0, interval_s=0)  # mid-payload
        victim.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            victim.kill()
        await victim.wait()
    await eventually(lambda: node.server.connection_count() == 0 and not node.plane.ctx.leases)
    other = await node.connect()
    data = pattern(32 * MIB, 7)
    where = node.grant(40 * MIB, 32 * MIB)
    await other.write(where, data)
    back = np.zeros(32 * MIB, dtype=np.uint8)
    await other.read(where, back)
    assert digest(back) == digest(data)


# A server in its own process, so that the test can freeze it (SIGSTOP).
_SERVER = """
import asyncio, json, sys
import uvloop
from kvtier.transport import base, dataplane, registry

async def main() -> None:
    plane = dataplane.DataPlane("frozen", ["tcp"], registry.ServerSettings())
    region = plane.regions.create(64 * 1024 * 1024)
    caps = await plane.start()
    token, _ = plane.issuer.issue_token("client", ttl_s=600, transport="tcp")
    rw = base.Rights.READ | base.Rights.WRITE
    descs = [
        plane.issuer.grant(region, 0, n, rw, "client", 600).to_proto().SerializeToString().hex()
        for n in (4 * 1024 * 1024, 32 * 1024 * 1024)
    ]
    print(json.dumps({"address": caps.endpoints[0].address, "token": token.hex(), "descs": descs}))
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await plane.stop()

uvloop.run(main())
"""


@dataclass
class Frozen:
    endpoint: common_pb2.TransportEndpoint
    token: bytes
    descs: list[base.Descriptor]
    freeze: Callable[[], None]
    thaw: Callable[[], None]


@pytest.fixture
async def frozen_peer() -> AsyncIterator[Frozen]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            info = json.loads(await proc.stdout.readline())
        descs = [
            base.Descriptor.from_proto(common_pb2.Descriptor.FromString(bytes.fromhex(d)))
            for d in info["descs"]
        ]
        yield Frozen(
            common_pb2.TransportEndpoint(name="tcp", address=info["address"]),
            bytes.fromhex(info["token"]),
            descs,
            lambda: os.kill(proc.pid, signal.SIGSTOP),
            lambda: os.kill(proc.pid, signal.SIGCONT),
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.wait()


async def test_deadline_leaves_the_caller_buffers_alone_and_the_connection_usable(
    frozen_peer: Frozen,
) -> None:
    settings = registry.ClientSettings(connections=1, timeout_s=0.5)
    client = await tcp.connect(frozen_peer.endpoint, frozen_peer.token, settings)
    small, big = frozen_peer.descs
    first = pattern(big.length, 11)
    await client.write(big, first)
    frozen_peer.freeze()
    late_read = np.zeros(small.length, dtype=np.uint8)
    start = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await client.read(small, late_read)
    assert 0.4 < time.monotonic() - start < 3
    second = pattern(big.length, 12)
    with pytest.raises(errors.DeadlineExceeded):
        await client.write(big, second)  # 32 MiB: cannot all be in the socket buffers yet
    second[:] = 0  # the caller reuses its buffer at once; the late write must not see it
    frozen_peer.thaw()
    # The late read lands in the sink, the late write completes with the original bytes.
    back = np.zeros(big.length, dtype=np.uint8)
    for _ in range(20):
        try:
            await client.read(big, back)
            break
        except errors.DeadlineExceeded:
            continue
    assert digest(back) == digest(pattern(big.length, 12))
    assert not late_read.any()
    await client.close()


async def test_deadline_when_the_server_never_answers(frozen_peer: Frozen) -> None:
    settings = registry.ClientSettings(connections=2, timeout_s=0.3)
    client = await tcp.connect(frozen_peer.endpoint, frozen_peer.token, settings)
    small, _ = frozen_peer.descs
    frozen_peer.freeze()
    attempts: list[Callable[[], Awaitable[None]]] = [
        lambda: client.read(small, bytearray(small.length)),
        lambda: client.write(small, bytes(small.length)),
        lambda: client.read_batch([small] * 8, [bytearray(small.length) for _ in range(8)]),
    ]
    for attempt in attempts:
        with pytest.raises(errors.DeadlineExceeded):
            await attempt()
    await client.close()
    with pytest.raises(errors.DeadlineExceeded):
        await tcp.connect(frozen_peer.endpoint, frozen_peer.token, settings)


def test_under_uvloop() -> None:
    """The benchmarks and services run uvloop: the same transfers and failures there."""

    async def scenario() -> None:
        node = await start_node(64 * MIB)
        try:
            client = await node.connect()
            blocks = [pattern(2 * MIB, i) for i in range(16)]
            descs = [node.grant(i * 2 * MIB, 2 * MIB) for i in range(16)]
            await client.write_batch(descs, blocks)
            outs = [np.zeros(2 * MIB, dtype=np.uint8) for _ in blocks]
            await client.read_batch(descs, outs)
            assert [digest(o) for o in outs] == [digest(b) for b in blocks]
            with pytest.raises(base.DescriptorRejected):
                await client.read(replace(descs[0], offset=1), outs[0])
            await node.server.stop()
            with pytest.raises(base.PeerLost):
                await client.read_batch(descs, outs)
        finally:
            await node.stop()

    uvloop.run(scenario())


async def test_connections_without_hello_are_bounded(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_server, "_MAX_HANDSHAKING", 1)
    host, _, port = node.endpoint.address.rpartition(":")
    silent = socket.create_connection((host, int(port)))  # connects, never says HELLO
    try:
        await eventually(lambda: node.server.connection_count() == 1)
        with pytest.raises(errors.Unavailable):  # refused while the silent one is pending
            await node.connect(connections=1)
    finally:
        silent.close()
    await eventually(lambda: node.server.connection_count() == 0)
    client = await node.connect(connections=1)
    out = bytearray(16)
    await client.read(node.grant(0, 16), out)
