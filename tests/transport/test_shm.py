"""What is particular to the shm transport: fd hand-over, mappings, leases, dying or frozen peers.

The shared behaviour (byte-exact transfers, grants, rights, tokens) is in test_conformance.py.
Servers run in-process through DataPlane; where a peer must die, freeze or change uid for real, it
runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
import uvloop

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, registry, shm, shm_server, shm_wire

KIB, MIB = 1024, 1024 * 1024
RW = base.Rights.READ | base.Rights.WRITE


@dataclass
class Node:
    plane: dataplane.DataPlane
    region: base.Region
    endpoint: common_pb2.TransportEndpoint
    clients: list[shm.Client] = field(default_factory=list)

    @property
    def server(self) -> shm.Server:
        server = self.plane.server("shm")
        assert isinstance(server, shm.Server)
        return server

    def grant(
        self, offset: int, length: int, rights: base.Rights = RW, ttl_s: float = 30.0
    ) -> base.Descriptor:
        return self.plane.issuer.grant(self.region, offset, length, rights, "client", ttl_s)

    async def connect(self, *, max_inflight_bytes: int = 256 * MIB) -> shm.Client:
        token, _ = self.plane.issuer.issue_token("client", transport="shm")
        settings = registry.ClientSettings(max_inflight_bytes=max_inflight_bytes, timeout_s=20)
        client = await shm.connect(self.endpoint, token, settings)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.plane.stop()


async def start_node(
    region_bytes: int = 80 * MIB, settings: registry.ServerSettings | None = None
) -> Node:
    plane = dataplane.DataPlane("shm-node", ["shm"], settings or registry.ServerSettings())
    region = plane.regions.create(region_bytes, name="shm-test")
    caps = await plane.start()
    return Node(plane, region, caps.endpoints[0])


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    started = await start_node()
    yield started
    await started.stop()


def pattern(size: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(buf: Any) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()


async def eventually(
    predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01
) -> None:
    """Wait until predicate() holds (polling: the server acts in loop callbacks, not awaitables)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(interval_s)


def mappings_of(memfd_name: str) -> list[str]:
    """Permissions ("rw-s", "r--s") of this process's mappings of a memfd."""
    with open("/proc/self/maps") as maps:
        return [line.split()[1] for line in maps if f"/memfd:{memfd_name} " in line]


async def test_listens_on_an_unguessable_socket_in_a_private_directory(node: Node) -> None:
    path = node.endpoint.address
    assert re.fullmatch(r"shm-[0-9a-f]{16}\.sock", os.path.basename(path))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    await node.plane.stop()
    assert not os.path.exists(path)  # noqa: ASYNC240 (a test's check, not a server path)


async def test_region_fd_is_handed_over_once_per_region_and_access(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[tuple[int, bool]] = []
    real = shm_wire.handover_fd

    def counting(region: base.Region, writable: bool) -> int:
        handed.append((region.region_id, writable))
        return real(region, writable)

    monkeypatch.setattr(shm_wire, "handover_fd", counting)
    other = node.plane.regions.create(8 * MIB, name="shm-test-other")
    a, b = node.region.region_id, other.region_id
    grant_b = node.plane.issuer.grant(other, 0, 64 * KIB, RW, "client")
    client = await node.connect()
    for i in range(3):
        await client.read(node.grant(i * MIB, 64 * KIB), bytearray(64 * KIB))
    await client.read_batch(
        [node.grant(0, 4 * KIB), grant_b], [bytearray(4 * KIB), bytearray(64 * KIB)]
    )
    assert handed == [(a, False), (b, False)]  # readers get read-only fds
    data = pattern(64 * KIB, 1)
    await client.write(node.grant(0, 64 * KIB), data)
    await client.write(node.grant(MIB, 64 * KIB), data)
    await client.read(node.grant(0, 64 * KIB), bytearray(64 * KIB))
    await client.write(grant_b, data)
    assert handed == [(a, False), (b, False), (a, True), (b, True)]
    second = await node.connect()  # every connection gets its own
    await second.read(node.grant(0, 64 * KIB), bytearray(64 * KIB))
    assert handed[4:] == [(a, False)]


async def test_a_reader_maps_the_region_read_only(node: Node) -> None:
    name = f"shm-test-{node.region.region_id}"
    assert mappings_of(name) == ["rw-s"]  # the server's own
    client = await node.connect()
    await client.read(node.grant(0, 4 * KIB, base.Rights.READ), bytearray(4 * KIB))
    assert sorted(mappings_of(name)) == ["r--s", "rw-s"]
    await client.write(node.grant(0, 4 * KIB), bytes(4 * KIB))
    assert sorted(mappings_of(name)) == ["r--s", "rw-s", "rw-s"]
    await client.close()
    assert mappings_of(name) == ["rw-s"]  # closing a client unmaps


async def test_a_read_holds_its_lease_exactly_while_bytes_move(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = shm.Client._copy

    async def observing(self: shm.Client, need: base.Rights, window: Any, statuses: bytes) -> None:
        seen.append(node.plane.ctx.leases.overlaps(node.region.region_id, MIB, 64 * KIB))
        await real(self, need, window, statuses)

    monkeypatch.setattr(shm.Client, "_copy", observing)
    client = await node.connect()
    node.region.view[MIB : MIB + 64 * KIB] = pattern(64 * KIB, 2).tobytes()
    out = bytearray(64 * KIB)
    await client.read(node.grant(MIB, 64 * KIB), out)
    assert seen == [True]
    assert digest(out) == digest(node.region.view[MIB : MIB + 64 * KIB])
    await eventually(lambda: len(node.plane.ctx.leases) == 0)  # RELEASE is not awaited


@pytest.mark.parametrize("count", [1, 40])
async def test_a_write_is_committed_and_visible_when_it_returns(node: Node, count: int) -> None:
    client = await node.connect()
    descs = [node.grant(i * MIB + 3, MIB) for i in range(count)]  # 40 MiB: several windows
    datas = [pattern(MIB, i) for i in range(count)]
    await client.write_batch(descs, datas)
    assert len(node.plane.ctx.leases) == 0  # the server handled COMMIT before write returned
    for desc, data in zip(descs, datas, strict=True):
        assert digest(node.region.view[desc.offset : desc.offset + MIB]) == digest(data)


async def test_a_mixed_batch_raises_the_first_error_and_the_connection_stays(node: Node) -> None:
    client = await node.connect()
    good = [node.grant(0, 4 * KIB), node.grant(8 * KIB, 4 * KIB)]
    expired = node.grant(16 * KIB, 4 * KIB, ttl_s=-1)
    forged = replace(node.grant(32 * KIB, 4 * KIB), offset=0)
    datas = [pattern(4 * KIB, i) for i in range(4)]
    with pytest.raises(base.DescriptorExpired):
        await client.write_batch([good[0], expired, good[1], forged], datas)
    assert digest(node.region.view[0 : 4 * KIB]) == digest(datas[0])
    assert digest(node.region.view[8 * KIB : 12 * KIB]) == digest(datas[2])
    assert len(node.plane.ctx.leases) == 0
    with pytest.raises(base.DescriptorRejected):
        await client.read(replace(good[0], offset=-1), bytearray(4 * KIB))  # not even sent
    out = bytearray(4 * KIB)
    await client.read(good[1], out)
    assert digest(out) == digest(datas[2])


async def test_the_first_error_wins_across_windows(node: Node) -> None:
    client = await node.connect()
    descs = [node.grant(i * 8 * MIB, 8 * MIB) for i in range(6)]  # 16 MiB windows: three
    descs[1] = node.grant(8 * MIB, 8 * MIB, ttl_s=-1)  # second item, first window
    descs[4] = replace(descs[4], mac=bytes(16))  # third window
    with pytest.raises(base.DescriptorExpired):
        await client.read_batch(descs, [np.zeros(8 * MIB, dtype=np.uint8) for _ in descs])
    await eventually(lambda: len(node.plane.ctx.leases) == 0)


async def test_byte_budget_bounds_the_leased_bytes(node: Node) -> None:
    peak = 0

    class Tracking(base.LeaseTable):
        def __init__(self) -> None:
            super().__init__()
            self.bytes: dict[int, int] = {}

        def acquire(
            self, region_id: int, offset: int, length: int, owner: object, until_ms: int
        ) -> int:
            nonlocal peak
            lease_id = super().acquire(region_id, offset, length, owner, until_ms)
            self.bytes[lease_id] = length
            peak = max(peak, sum(self.bytes.values()))
            return lease_id

        def release(self, lease_id: int) -> None:
            self.bytes.pop(lease_id, None)
            super().release(lease_id)

    node.plane.ctx.leases = Tracking()
    client = await node.connect(max_inflight_bytes=4 * MIB)
    descs = [node.grant(i * MIB, MIB) for i in range(48)]
    await client.write_batch(descs, [pattern(MIB, i) for i in range(48)])
    outs = [np.zeros(MIB, dtype=np.uint8) for _ in descs]
    await client.read_batch(descs, outs)
    assert 0 < peak <= 4 * MIB
    assert [digest(o) for o in outs] == [digest(pattern(MIB, i)) for i in range(48)]


async def test_server_stop_fails_pending_operations_with_peer_lost(node: Node) -> None:
    client = await node.connect()
    server = node.server
    descs = [node.grant(i * MIB, MIB) for i in range(64)]
    outs = [np.zeros(MIB, dtype=np.uint8) for _ in descs]
    transfer = asyncio.create_task(client.read_batch(descs, outs))
    await asyncio.sleep(0.002)
    await node.plane.stop()
    with pytest.raises(base.PeerLost):
        await asyncio.wait_for(transfer, 10)
    assert len(node.plane.ctx.leases) == 0
    assert server.connection_count() == 0
    started = time.monotonic()
    with pytest.raises(base.PeerLost):
        await client.read(descs[0], bytearray(MIB))
    assert time.monotonic() - started < 0.1


async def test_a_cancelled_large_read_lets_go_and_the_connection_stays(node: Node) -> None:
    client = await node.connect()
    desc = node.grant(0, 64 * MIB)  # over the threaded-copy threshold
    task = asyncio.create_task(client.read(desc, np.zeros(64 * MIB, dtype=np.uint8)))
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: len(node.plane.ctx.leases) == 0)
    node.region.view[0 : 4 * KIB] = pattern(4 * KIB, 3).tobytes()
    out = bytearray(4 * KIB)
    await client.read(node.grant(0, 4 * KIB), out)
    assert digest(out) == digest(pattern(4 * KIB, 3))


async def test_protocol_violations_drop_only_that_connection(node: Node) -> None:
    client = await node.connect()
    loop = asyncio.get_running_loop()
    lease_before_hello = shm_wire.HEADER.pack(shm_wire.LEASE, 1, 1, 1) + bytes(64)
    for garbage in (b"x", lease_before_hello):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.setblocking(False)
        await loop.sock_connect(raw, node.endpoint.address)
        await eventually(lambda: node.server.connection_count() == 2)
        await loop.sock_sendall(raw, garbage)
        async with asyncio.timeout(5):
            assert await loop.sock_recv(raw, 100) == b""  # hung up on
        raw.close()
        await eventually(lambda: node.server.connection_count() == 1)
    out = bytearray(100)
    await client.read(node.grant(0, 100), out)


async def test_connecting_where_nobody_listens_is_unavailable(tmp_path: Any) -> None:
    endpoint = common_pb2.TransportEndpoint(name="shm", address=str(tmp_path / "none.sock"))
    with pytest.raises(errors.Unavailable):
        await shm.connect(endpoint, b"token", registry.ClientSettings(timeout_s=5))


# A client in its own process that copies until it is killed.
_VICTIM = """
import sys
import numpy as np, uvloop
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, registry, shm

async def main() -> None:
    endpoint = common_pb2.TransportEndpoint(name="shm", address=sys.argv[1])
    client = await shm.connect(endpoint, bytes.fromhex(sys.argv[2]), registry.ClientSettings())
    descs = [
        base.Descriptor.from_proto(common_pb2.Descriptor.FromString(bytes.fromhex(d)))
        for d in sys.argv[3:]
    ]
    bufs = [np.ones(d.length, dtype=np.uint8) for d in descs]
    print("copying", flush=True)
    while True:
        await client.write_batch(descs, bufs)
        await client.read_batch(descs, bufs)

uvloop.run(main())
"""


async def test_client_killed_mid_batch_leaves_no_lease_and_others_are_served(node: Node) -> None:
    token, _ = node.plane.issuer.issue_token("victim", transport="shm")
    descs = [node.plane.issuer.grant(node.region, i * MIB, MIB, RW, "victim") for i in range(64)]
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VICTIM, node.endpoint.address, token.hex(),
        *(d.to_proto().SerializeToString().hex() for d in descs), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert victim.stdout is not None
        async with asyncio.timeout(30):
            assert await victim.stdout.readline() == b"copying\n"
        await eventually(lambda: len(node.plane.ctx.leases) > 0, interval_s=0)  # mid-batch
        victim.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            victim.kill()
        await victim.wait()
    await eventually(lambda: node.server.connection_count() == 0 and not node.plane.ctx.leases)
    other = await node.connect()
    data = pattern(2 * MIB, 7)
    await other.write(node.grant(70 * MIB, 2 * MIB), data)
    out = np.zeros(2 * MIB, dtype=np.uint8)
    await other.read(node.grant(70 * MIB, 2 * MIB), out)
    assert digest(out) == digest(data)


# A client that becomes another user after importing everything (root's files stay unreadable).
_STRANGER = """
import asyncio, os, sys
from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import registry, shm

async def main() -> None:
    endpoint = common_pb2.TransportEndpoint(name="shm", address=sys.argv[1])
    settings = registry.ClientSettings(timeout_s=10)
    try:
        await shm.connect(endpoint, bytes.fromhex(sys.argv[2]), settings)
    except errors.KVTierError as exc:
        print(type(exc).__name__, exc.message, flush=True)
    else:
        print("connected", flush=True)

os.setgid(65534)
os.setuid(65534)
asyncio.run(main())
"""


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory others may traverse, so that only SO_PEERCRED stands in a stranger's way."""
    path = tempfile.mkdtemp(prefix="kvtier-shm-test-", dir="/tmp")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
async def test_a_client_of_another_uid_is_refused(open_dir: str) -> None:
    started = await start_node(4 * MIB, registry.ServerSettings(shm_dir=open_dir))
    try:
        os.chmod(started.endpoint.address, 0o666)
        token, _ = started.plane.issuer.issue_token("client", transport="shm")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _STRANGER, started.endpoint.address, token.hex(),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
        assert out.decode().startswith("PermissionDenied peer uid 65534"), out
        await eventually(lambda: started.server.connection_count() == 0)
    finally:
        await started.stop()


# A server in its own process, so that the test can freeze it (SIGSTOP).
_SERVER = """
import asyncio, json, sys
import uvloop
from kvtier.transport import base, dataplane, registry

async def main() -> None:
    plane = dataplane.DataPlane("frozen", ["shm"], registry.ServerSettings())
    region = plane.regions.create(8 * 1024 * 1024)
    region.view[:4096] = bytes(range(256)) * 16
    caps = await plane.start()
    token, _ = plane.issuer.issue_token("client", ttl_s=600, transport="shm")
    desc = plane.issuer.grant(region, 0, 4096, base.Rights.READ, "client", 600)
    print(json.dumps({
        "address": caps.endpoints[0].address, "token": token.hex(),
        "desc": desc.to_proto().SerializeToString().hex(),
    }), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await plane.stop()

uvloop.run(main())
"""


async def test_deadline_when_the_server_is_frozen_and_recovery_after(tmp_path: Any) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            info = json.loads(await proc.stdout.readline())
        endpoint = common_pb2.TransportEndpoint(name="shm", address=info["address"])
        desc = base.Descriptor.from_proto(
            common_pb2.Descriptor.FromString(bytes.fromhex(info["desc"]))
        )
        settings = registry.ClientSettings(timeout_s=0.5)
        client = await shm.connect(endpoint, bytes.fromhex(info["token"]), settings)
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await client.read(desc, bytearray(4096))
        assert 0.4 < time.monotonic() - started < 2.0
        os.kill(proc.pid, signal.SIGCONT)
        out = bytearray(4096)
        await client.read(desc, out)
        assert bytes(out) == bytes(range(256)) * 16
        await client.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.wait()


def test_under_uvloop() -> None:
    async def scenario() -> None:
        started = await start_node(64 * MIB)
        try:
            client = await started.connect()
            descs = [started.grant(i * 2 * MIB, 2 * MIB) for i in range(16)]
            datas = [pattern(2 * MIB, i) for i in range(16)]
            await client.write_batch(descs, datas)
            outs = [np.zeros(2 * MIB, dtype=np.uint8) for _ in descs]
            await client.read_batch(descs, outs)
            assert [digest(o) for o in outs] == [digest(d) for d in datas]
            big = np.zeros(32 * MIB, dtype=np.uint8)
            await client.read(started.grant(0, 32 * MIB), big)
            assert digest(big[: 2 * MIB]) == digest(datas[0])
        finally:
            await started.stop()

    uvloop.run(scenario())


async def test_a_connection_holds_a_bounded_number_of_leases_and_calls(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await node.connect()
    monkeypatch.setattr(shm_server, "_MAX_HELD_ITEMS", 2)
    outs = [bytearray(4 * KIB) for _ in range(3)]
    with pytest.raises(errors.Overloaded, match="ranges leased on this connection"):
        await client.read_batch([node.grant(i * 4 * KIB, 4 * KIB) for i in range(3)], outs)
    await client.read_batch([node.grant(0, 4 * KIB)] * 2, outs[:2])  # within the bound: fine
    monkeypatch.setattr(shm_server, "_MAX_OPEN_CALLS", 0)
    with pytest.raises(errors.Overloaded, match="calls open on this connection"):
        await client.call(1, b"hello")
