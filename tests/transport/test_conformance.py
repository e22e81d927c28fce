"""One conformance suite for every data-plane transport available here (rdma only on a device).

Each test starts a real DataPlane server with one transport and connects real clients to it.
Every read is checked byte for byte (hashes of random data).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import errors
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, registry

KIB, MIB = 1024, 1024 * 1024
REGION_BYTES = 160 * MIB


def _transports() -> list[str]:
    """Transports to test; "tcp+tls" is tcp with `ServerSettings.tls`."""
    names = ["tcp", "tcp+tls", "shm"]
    if os.environ.get("KVTIER_RDMA_DEVICE"):
        names.insert(0, "rdma")
    return [n for n in names if n.split("+")[0] in registry.available()]


@dataclass
class Setup:
    name: str
    plane: dataplane.DataPlane
    region: base.Region
    endpoint: object
    connect: Callable[[str], Awaitable[base.Transport]]
    #: How the node under test serves (tcp+tls: with its certificate).
    server_settings: registry.ServerSettings = field(default_factory=registry.ServerSettings)
    #: The cluster CA a client needs (tcp+tls only).
    ca_file: str = ""

    def client_settings(self, **kwargs: Any) -> registry.ClientSettings:
        return registry.ClientSettings(tls_ca_file=self.ca_file, **kwargs)

    def grant(
        self,
        offset: int,
        length: int,
        rights: base.Rights = base.Rights.READ | base.Rights.WRITE,
        principal: str = "client-a",
        ttl_s: float = 30.0,
    ) -> base.Descriptor:
        return _grant(self.plane, self.name, self.region, offset, length, rights, principal, ttl_s)


def _grant(
    plane: dataplane.DataPlane,
    name: str,
    region: base.Region,
    offset: int,
    length: int,
    rights: base.Rights,
    principal: str,
    ttl_s: float = 30.0,
) -> base.Descriptor:
    if name == "rdma":  # rdma descriptors carry the MR's rkey
        server: Any = plane.server("rdma")
        grant: base.Descriptor = server.grant(region, offset, length, rights, principal, ttl_s)
        return grant
    return plane.issuer.grant(region, offset, length, rights, principal, ttl_s)


def _settings(
    plane: dataplane.DataPlane, name: str, principal: str, timeout_s: float = 20.0,
    ca_file: str = "",
) -> registry.ClientSettings:  # fmt: skip
    if name != "rdma":
        return registry.ClientSettings(timeout_s=timeout_s, tls_ca_file=ca_file)
    server: Any = plane.server("rdma")

    async def exchange(mine: common_pb2.RdmaQueuePair) -> common_pb2.RdmaQueuePair:
        accepted: common_pb2.RdmaQueuePair = await server.accept(mine, principal)
        return accepted

    return registry.ClientSettings(timeout_s=timeout_s, rdma_exchange=exchange)


def _skip_on_rdma(setup: Setup, why: str) -> None:
    if setup.name == "rdma":
        pytest.skip(f"rdma: {why} (docs/transports.md, 'What the hardware enforces')")


def _tls_files(directory: Path) -> tuple[str, str, str]:
    """A throwaway cluster CA and a certificate for 127.0.0.1: (ca, cert, key) paths."""
    from kvtier import pki

    directory.mkdir(parents=True, exist_ok=True)
    authority = pki.new_authority("conformance")
    (directory / "ca.crt").write_bytes(authority.cert_pem)
    pair = authority.issue("kvcache", "node-under-test", hosts=["127.0.0.1"])
    cert, key = pki.write_pair(directory, "node", pair)
    return str(directory / "ca.crt"), str(cert), str(key)


@pytest.fixture(params=_transports())
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    name, _, variant = request.param.partition("+")
    server_settings, ca_file = registry.ServerSettings(), ""
    if variant == "tls":
        ca_file, cert, key = _tls_files(tmp_path / "pki")
        server_settings = registry.ServerSettings(tls=True, tls_cert_file=cert, tls_key_file=key)
    plane = dataplane.DataPlane("node-under-test", [name], server_settings)
    region = plane.regions.create(REGION_BYTES)
    caps = await plane.start()
    (endpoint,) = [e for e in caps.endpoints if e.name == name]
    clients: list[base.Transport] = []

    async def connect(principal: str) -> base.Transport:
        token, _ = plane.issuer.issue_token(principal, transport=name)
        client: base.Transport = await registry.connect(
            endpoint, token, _settings(plane, name, principal, ca_file=ca_file)
        )
        clients.append(client)
        return client

    yield Setup(name, plane, region, endpoint, connect, server_settings, ca_file)
    for client in clients:
        await client.close()
    await plane.stop()


def _random(n: int, rng: random.Random) -> np.ndarray:
    return np.frombuffer(rng.randbytes(n), dtype=np.uint8).copy()


def _digest(buf: object) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 7, 4 * KIB, 64 * KIB, 2 * MIB, 32 * MIB, 64 * MIB])
async def test_write_then_read_is_byte_exact(setup: Setup, size: int) -> None:
    rng = random.Random(size)
    client = await setup.connect("client-a")
    offset = 3 * MIB + 5  # unaligned on purpose
    data = _random(size, rng)
    desc = setup.grant(offset, size)
    await client.write(desc, data)
    assert _digest(setup.region.view[offset : offset + size]) == _digest(data)
    out = np.zeros(size, dtype=np.uint8)
    await client.read(desc, out)
    assert _digest(out) == _digest(data)


async def test_read_sees_what_the_owner_wrote(setup: Setup) -> None:
    client = await setup.connect("client-a")
    payload = os.urandom(300 * KIB)
    setup.region.view[10 * MIB : 10 * MIB + len(payload)] = payload
    into = bytearray(len(payload))
    await client.read(setup.grant(10 * MIB, len(payload), base.Rights.READ), into)
    assert bytes(into) == payload


@pytest.mark.parametrize("count", [1, 16, 1024])
async def test_batches_are_byte_exact(setup: Setup, count: int) -> None:
    rng = random.Random(count)
    client = await setup.connect("client-a")
    sizes = [rng.choice([1, 100, 4 * KIB, 16 * KIB, 64 * KIB]) for _ in range(count)]
    offsets, cursor = [], 0
    for size in sizes:
        offsets.append(cursor)
        cursor += size + rng.randrange(0, 64)
    descs = [setup.grant(o, s) for o, s in zip(offsets, sizes, strict=True)]
    datas = [_random(s, rng) for s in sizes]
    await client.write_batch(descs, datas)
    outs = [np.zeros(s, dtype=np.uint8) for s in sizes]
    await client.read_batch(descs, outs)
    for data, out, offset in zip(datas, outs, offsets, strict=True):
        assert _digest(out) == _digest(data)
        assert _digest(setup.region.view[offset : offset + data.size]) == _digest(data)


async def test_concurrent_clients_keep_their_bytes_apart(setup: Setup) -> None:
    async def one(index: int) -> None:
        rng = random.Random(index)
        client = await setup.connect(f"client-{index}")
        base_offset = index * 8 * MIB
        for round_ in range(4):
            size = rng.choice([64 * KIB, 1 * MIB, 2 * MIB])
            desc = setup.grant(base_offset, size, principal=f"client-{index}")
            data = _random(size, rng)
            await client.write(desc, data)
            out = np.zeros(size, dtype=np.uint8)
            await client.read(desc, out)
            assert _digest(out) == _digest(data), f"client {index} round {round_}"

    await asyncio.gather(*(one(i) for i in range(8)))


async def test_expired_descriptor_is_rejected_and_nothing_is_written(setup: Setup) -> None:
    client = await setup.connect("client-a")
    setup.region.view[0:4] = b"keep"
    desc = setup.grant(0, 4, ttl_s=-1)
    with pytest.raises(base.DescriptorExpired):
        await client.write(desc, b"evil")
    assert bytes(setup.region.view[0:4]) == b"keep"
    # The connection is still usable.
    good = setup.grant(0, 4)
    out = bytearray(4)
    await client.read(good, out)
    assert bytes(out) == b"keep"


@pytest.mark.parametrize(
    "forge",
    [
        lambda d: replace(d, offset=d.offset + 4096),
        lambda d: replace(d, length=d.length * 2),
        lambda d: replace(d, rights=base.Rights.READ | base.Rights.WRITE),
        lambda d: replace(d, expires_at_ms=d.expires_at_ms + 3_600_000),
        lambda d: replace(d, mac=bytes(16)),
        lambda d: replace(d, region_id=d.region_id + 7),
        lambda d: replace(d, grant_id=d.grant_id + 1),
    ],
    ids=["offset", "length", "rights", "expiry", "mac", "region", "grant"],
)
async def test_forged_descriptors_are_rejected(
    setup: Setup, forge: Callable[[base.Descriptor], base.Descriptor]
) -> None:
    _skip_on_rdma(setup, "one-sided operations are checked by the HCA against the rkey only")
    client = await setup.connect("client-a")
    setup.region.view[8192 : 8192 + 4096] = b"\xaa" * 4096
    desc = forge(setup.grant(8192 - 4096, 4096, base.Rights.READ))
    with pytest.raises(base.DescriptorRejected):
        await client.write(desc, bytes(desc.length))
    assert bytes(setup.region.view[8192 : 8192 + 4096]) == b"\xaa" * 4096


async def test_descriptor_of_another_client_is_rejected(setup: Setup) -> None:
    _skip_on_rdma(setup, "the HCA does not see the principal a descriptor was granted to")
    mallory = await setup.connect("mallory")
    desc = setup.grant(0, 16, principal="alice")
    with pytest.raises(base.DescriptorRejected):
        await mallory.read(desc, bytearray(16))


async def test_rights_are_enforced(setup: Setup) -> None:
    client = await setup.connect("client-a")
    with pytest.raises(base.DescriptorRejected):
        await client.write(setup.grant(0, 8, base.Rights.READ), b"12345678")
    with pytest.raises(base.DescriptorRejected):
        await client.read(setup.grant(0, 8, base.Rights.WRITE), bytearray(8))


async def test_bad_tokens_are_refused_at_connect(setup: Setup) -> None:
    _skip_on_rdma(setup, "the token is checked by the ConnectRdma RPC, before the transport")
    other = base.Issuer("impostor")
    forged, _ = other.issue_token("client-a", transport=setup.name)
    with pytest.raises(errors.PermissionDenied):
        await registry.connect(setup.endpoint, forged, setup.client_settings(timeout_s=5))  # type: ignore[arg-type]
    expired, _ = setup.plane.issuer.issue_token("client-a", ttl_s=-1, transport=setup.name)
    with pytest.raises(errors.PermissionDenied):
        await registry.connect(setup.endpoint, expired, setup.client_settings(timeout_s=5))  # type: ignore[arg-type]


async def test_a_token_for_another_transport_is_refused(setup: Setup) -> None:
    _skip_on_rdma(setup, "the token is checked by the ConnectRdma RPC, before the transport")
    for other in {"tcp", "shm", "rdma"} - {setup.name}:
        token, _ = setup.plane.issuer.issue_token("client-a", transport=other)
        with pytest.raises(errors.PermissionDenied, match=f"issued for {other}"):
            await registry.connect(setup.endpoint, token, setup.client_settings(timeout_s=5))  # type: ignore[arg-type]


async def test_revoked_descriptors_are_refused_and_nothing_moves(setup: Setup) -> None:
    _skip_on_rdma(setup, "the HCA checks the region's rkey, not grants (docs/transports.md)")
    client = await setup.connect("client-a")
    writable, readable = setup.grant(0, 4096), setup.grant(0, 4096, base.Rights.READ)
    await client.write(writable, b"\x11" * 4096)
    assert setup.plane.issuer.revoke(writable.grant_id)
    assert setup.plane.issuer.revoke(readable.grant_id)
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        await client.write(writable, b"\x22" * 4096)
    out = bytearray(4096)
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        await client.read(readable, out)
    assert bytes(out) == bytes(4096)
    assert bytes(setup.region.view[:4096]) == b"\x11" * 4096
    # The connection stays usable with a live grant.
    await client.read(setup.grant(0, 4096, base.Rights.READ), out)
    assert bytes(out) == b"\x11" * 4096


async def test_connections_per_identity_are_bounded(setup: Setup) -> None:
    _skip_on_rdma(setup, "rdma drops an identity's oldest queue pairs instead (unit-tested)")
    settings = replace(setup.server_settings, max_connections_per_principal=2)
    plane = dataplane.DataPlane("bounded", [setup.name], settings)
    plane.regions.create(MIB)
    (endpoint,) = (await plane.start()).endpoints
    one = setup.client_settings(connections=1, timeout_s=5)
    clients: list[base.Transport] = []

    async def connect(principal: str) -> base.Transport:
        token, _ = plane.issuer.issue_token(principal, transport=setup.name)
        client: base.Transport = await registry.connect(endpoint, token, one)
        clients.append(client)
        return client

    try:
        first = await connect("acme/AKID/s1")
        await connect("acme/AKID/s2")
        with pytest.raises(errors.Overloaded, match="acme/AKID already has 2"):
            await connect("acme/AKID/s3")  # another session of the same identity
        await connect("acme/OTHER/s1")  # other identities are not affected
        await first.close()
        for _ in range(200):
            if plane.ctx.connections.count("acme/AKID/x") < 2:
                break
            await asyncio.sleep(0.01)
        await connect("acme/AKID/s4")
    finally:
        for client in clients:
            await client.close()
        await plane.stop()


async def test_buffer_size_mismatch_is_invalid_argument(setup: Setup) -> None:
    client = await setup.connect("client-a")
    with pytest.raises(errors.InvalidArgument):
        await client.read(setup.grant(0, 100), bytearray(99))
    with pytest.raises(errors.InvalidArgument):
        await client.write_batch([setup.grant(0, 10)], [b"x" * 10, b"y" * 10])


async def test_server_dying_mid_transfer_gives_a_typed_error_and_recovery(setup: Setup) -> None:
    client = await setup.connect("client-a")
    descs = [setup.grant(i * 2 * MIB, 2 * MIB) for i in range(64)]
    outs = [np.zeros(2 * MIB, dtype=np.uint8) for _ in descs]
    transfer = asyncio.create_task(client.read_batch(descs, outs))
    await asyncio.sleep(0.005)
    await setup.plane.stop()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(transfer, 20)
    # Nothing is leaked on the server and a new server takes clients again.
    assert len(setup.plane.ctx.leases) == 0
    plane = dataplane.DataPlane("node-under-test", [setup.name], setup.server_settings)
    region = plane.regions.create(4 * MIB)
    caps = await plane.start()
    try:
        token, _ = plane.issuer.issue_token("client-a", transport=setup.name)
        fresh = await registry.connect(
            caps.endpoints[0],
            token,
            _settings(plane, setup.name, "client-a", ca_file=setup.ca_file),
        )
        desc = _grant(
            plane, setup.name, region, 0, 1 * MIB, base.Rights.READ | base.Rights.WRITE, "client-a"
        )
        data = os.urandom(1 * MIB)
        await fresh.write(desc, data)
        out = bytearray(1 * MIB)
        await fresh.read(desc, out)
        assert bytes(out) == data
        await fresh.close()
    finally:
        await plane.stop()


async def test_client_dying_mid_transfer_leaks_nothing(setup: Setup) -> None:
    victim = await setup.connect("victim")
    descs = [setup.grant(i * 2 * MIB, 2 * MIB, principal="victim") for i in range(64)]
    datas = [np.ones(2 * MIB, dtype=np.uint8) for _ in descs]
    transfer = asyncio.create_task(victim.write_batch(descs, datas))
    await asyncio.sleep(0.005)
    await victim.close()
    with pytest.raises((errors.Unavailable, asyncio.CancelledError)):
        await asyncio.wait_for(transfer, 20)
    server = setup.plane.server(setup.name)
    async with asyncio.timeout(10):
        while server.connection_count() or len(setup.plane.ctx.leases):  # noqa: ASYNC110 - polls server state
            await asyncio.sleep(0.02)
    # Others are still served.
    other = await setup.connect("client-a")
    data = os.urandom(64 * KIB)
    desc = setup.grant(100 * MIB, len(data))
    await other.write(desc, data)
    out = bytearray(len(data))
    await other.read(desc, out)
    assert bytes(out) == data


async def test_numpy_and_memoryview_buffers_without_copies(setup: Setup) -> None:
    client = await setup.connect("client-a")
    matrix = np.arange(256 * 64, dtype=np.float32).reshape(256, 64)
    desc = setup.grant(0, matrix.nbytes)
    await client.write(desc, matrix)
    back = np.empty_like(matrix)
    await client.read(desc, back)
    assert np.array_equal(back, matrix)
    with pytest.raises(errors.InvalidArgument):
        await client.read(desc, matrix[:, ::2].copy(order="F")[:, :64])  # not C-contiguous


async def test_leases_cover_ranges_only_while_bytes_move(setup: Setup) -> None:
    client = await setup.connect("client-a")
    desc = setup.grant(0, 1 * MIB)
    await client.write(desc, bytes(1 * MIB))
    await client.read(desc, bytearray(1 * MIB))
    async with asyncio.timeout(5):
        while setup.plane.ctx.leases.overlaps(setup.region.region_id, 0, 1 * MIB):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
