"""The tcp data plane over TLS (`ServerSettings.tls`): same bytes and errors, checked certificates.

Certificates come from a throwaway cluster CA (`kvtier.pki`). Every read is compared by hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import errors, pki
from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, registry, tcp, tcp_tls

KIB, MIB = 1024, 1024 * 1024
RW = base.Rights.READ | base.Rights.WRITE
PUT, GET = 1, 2


@dataclass
class Pki:
    ca_file: str
    cert_file: str
    key_file: str
    authority: pki.Authority
    directory: Path

    def reissue(self, name: str) -> None:
        """A new certificate into the same files (rotation), with a later mtime even where the
        file system's clock is coarse."""
        pair = self.authority.issue("kvcache", name, hosts=["127.0.0.1"])
        for path in pki.write_pair(self.directory, "node", pair):
            later = os.stat(path).st_mtime_ns + 2_000_000_000
            os.utime(path, ns=(later, later))


def _make_pki(directory: Path, cluster: str = "test") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    authority = pki.new_authority(cluster)
    (directory / "ca.crt").write_bytes(authority.cert_pem)
    cert, key = pki.write_pair(
        directory, "node", authority.issue("kvcache", "n1", hosts=["127.0.0.1"])
    )
    return Pki(str(directory / "ca.crt"), str(cert), str(key), authority, directory)


@dataclass
class Node:
    plane: dataplane.DataPlane
    region: base.Region
    endpoint: common_pb2.TransportEndpoint
    pki: Pki
    clients: list[tcp.Client] = field(default_factory=list)

    def grant(self, offset: int, length: int) -> base.Descriptor:
        return self.plane.issuer.grant(self.region, offset, length, RW, "client")

    async def connect(self, ca_file: str | None = None, connections: int = 2) -> tcp.Client:
        token, _ = self.plane.issuer.issue_token("client", transport="tcp")
        settings = registry.ClientSettings(
            connections=connections, timeout_s=20,
            tls_ca_file=self.pki.ca_file if ca_file is None else ca_file,
        )  # fmt: skip
        client = await tcp.connect(self.endpoint, token, settings)
        self.clients.append(client)
        return client


class _Service:
    """PUT: segments land at the offsets named in the request; GET: sources from them."""

    def __init__(self, region: base.Region) -> None:
        self.region = region

    def __call__(
        self, principal: str, method: int, request: bytes, segments: Sequence[int],
        capacities: Sequence[int],
    ) -> base.CallPlan:  # fmt: skip
        offset = int(request)
        if method == PUT:
            sinks, at = [], offset
            for n in segments:
                sinks.append(base.Span(self.region, at, n))
                at += n
            return base.CallPlan(sinks=sinks, on_received=lambda: b"stored")
        sources, at = [], offset
        for n in capacities:
            sources.append(base.Span(self.region, at, n))
            at += n
        return base.CallPlan(reply=b"got", sources=sources)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    material = _make_pki(tmp_path / "pki")
    settings = registry.ServerSettings(
        tls=True, tls_cert_file=material.cert_file, tls_key_file=material.key_file
    )
    plane = dataplane.DataPlane("tls-node", ["tcp"], settings)
    region = plane.regions.create(64 * MIB)
    plane.ctx.call_handler = _Service(region)
    (endpoint,) = (await plane.start()).endpoints
    started = Node(plane, region, endpoint, material)
    yield started
    for client in started.clients:
        await client.close()
    await plane.stop()


def _digest(buf: object) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()  # type: ignore[arg-type]


async def test_the_endpoint_says_tls_and_bytes_round_trip(node: Node) -> None:
    assert node.endpoint.address.startswith(tcp_tls.SCHEME)
    client = await node.connect()
    for size in (0, 1, 4 * KIB, 64 * KIB, 4 * MIB + 3, 32 * MIB):
        data = os.urandom(size)
        desc = node.grant(MIB, size)
        await client.write(desc, data)
        assert _digest(node.region.view[MIB : MIB + size]) == _digest(data)
        out = bytearray(size)
        await client.read(desc, out)
        assert _digest(out) == _digest(data)


async def test_pipelined_batches_and_calls_are_byte_exact(node: Node) -> None:
    client = await node.connect(connections=4)
    blocks = [
        np.random.default_rng(i).integers(0, 256, 64 * KIB, dtype=np.uint8) for i in range(256)
    ]
    descs = [node.grant(i * 64 * KIB, 64 * KIB) for i in range(256)]
    await client.write_batch(descs, blocks)
    outs = [np.zeros(64 * KIB, dtype=np.uint8) for _ in descs]
    await client.read_batch(descs, outs)
    assert [_digest(o) for o in outs] == [_digest(b) for b in blocks]
    segments = [os.urandom(n) for n in (1, 5000, 300 * KIB, 2 * MIB)]
    put = await client.call(PUT, b"%d" % (40 * MIB), segments)
    assert put.reply == b"stored"
    intos = [bytearray(len(s)) for s in segments]
    got = await client.call(GET, b"%d" % (40 * MIB), intos=intos)
    assert got.reply == b"got"
    assert [_digest(i) for i in intos] == [_digest(s) for s in segments]

    async def one(i: int) -> None:
        data = os.urandom(100 + i)
        desc = node.grant(50 * MIB + i * KIB, len(data))
        await client.write(desc, data)
        out = bytearray(len(data))
        await client.read(desc, out)
        assert out == data

    await asyncio.gather(*(one(i) for i in range(200)))


async def test_errors_and_refusals_travel_over_tls(node: Node) -> None:
    client = await node.connect()
    stale = node.grant(0, 16)
    node.plane.issuer.revoke(stale.grant_id)
    with pytest.raises(base.DescriptorRejected, match="revoked"):
        await client.write(stale, b"x" * 16)
    out = bytearray(16)
    await client.read(node.grant(0, 16), out)  # the connection stays usable
    token, _ = node.plane.issuer.issue_token("client", transport="shm")
    settings = registry.ClientSettings(tls_ca_file=node.pki.ca_file, timeout_s=5)
    with pytest.raises(errors.PermissionDenied, match="issued for shm"):
        await tcp.connect(node.endpoint, token, settings)


async def test_a_certificate_of_another_ca_or_no_ca_is_refused(node: Node, tmp_path: Path) -> None:
    other = _make_pki(tmp_path / "other", cluster="other")
    with pytest.raises(errors.PermissionDenied, match="TLS certificate refused"):
        await node.connect(ca_file=other.ca_file)
    with pytest.raises(errors.InvalidArgument, match="tls_ca_file"):
        await node.connect(ca_file="")
    # A client that ignores the scheme and speaks cleartext is dropped, never served.
    plain = common_pb2.TransportEndpoint(name="tcp", address=node.endpoint.address.split("//")[1])
    token, _ = node.plane.issuer.issue_token("client", transport="tcp")
    with pytest.raises(errors.Unavailable):
        await tcp.connect(plain, token, registry.ClientSettings(timeout_s=5))


def _peer_names(client: tcp.Client) -> set[str]:
    """The URI SANs of the certificates the client's connections were served."""
    names: set[str] = set()
    for conn in client._conns:
        assert conn._tls is not None
        cert: dict[str, Any] = dict(conn._tls.obj.getpeercert() or {})
        names |= {str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "URI"}
    return names


async def test_a_rotated_certificate_serves_new_connections(node: Node) -> None:
    first = await node.connect()
    node.pki.reissue("n1-rotated")
    second = await node.connect()
    assert _peer_names(first) == {"spiffe://test/kvcache/n1"}
    assert _peer_names(second) == {"spiffe://test/kvcache/n1-rotated"}
    for client in (first, second):  # the old connections go on with the old certificate
        out = bytearray(8)
        await client.read(node.grant(0, 8), out)
