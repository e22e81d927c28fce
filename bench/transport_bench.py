"""Data-plane transports against this machine's ceilings, in one run.

The transport server runs in its own process (as on a real node); the client grants itself
nothing: the server process grants descriptors and hands them over with the connection token.
Reads are measured (a KV fetch is a read); writes behave alike. See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import uvloop

from kvtier.proto.common.v1 import common_pb2
from kvtier.transport import base, dataplane, registry

KIB, MIB = 1024, 1024 * 1024
BLOCKS = [64 * KIB, 256 * KIB, 2 * MIB, 32 * MIB]
BATCHES = [1, 64]
REGION_BYTES = 512 * MIB
CLIENT_BYTES = 512 * MIB  # destinations beyond this alias (fine for throughput)


def _serve(name: str, pipe: Connection) -> None:
    async def main() -> None:
        plane = dataplane.DataPlane("bench-node", [name], registry.ServerSettings())
        plane.regions.create(REGION_BYTES)
        caps = await plane.start()
        token, _ = plane.issuer.issue_token("bench", ttl_s=3600)
        pipe.send((caps.endpoints[0].SerializeToString(), token))
        loop = asyncio.get_running_loop()
        while True:
            request = await loop.run_in_executor(None, pipe.recv)
            if request is None:
                break
            block, count = request
            region = plane.regions.get(1)
            rights = base.Rights.READ | base.Rights.WRITE
            descs = [
                plane.issuer.grant(
                    region, (i * block) % (REGION_BYTES - block + 1), block, rights, "bench", 3600
                )
                for i in range(count)
            ]
            pipe.send([d.to_proto().SerializeToString() for d in descs])
        await plane.stop()

    uvloop.run(main())


class Peer:
    """A transport server in a child process."""

    def __init__(self, name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(name, child), daemon=True)
        self._proc.start()
        raw_endpoint, self.token = self._pipe.recv()
        self.endpoint = common_pb2.TransportEndpoint.FromString(raw_endpoint)

    def grant(self, block: int, count: int) -> list[base.Descriptor]:
        self._pipe.send((block, count))
        return [
            base.Descriptor.from_proto(common_pb2.Descriptor.FromString(b))
            for b in self._pipe.recv()
        ]

    def close(self) -> None:
        self._pipe.send(None)
        self._proc.join(10)


async def _throughput(
    client: Any, descs: list[base.Descriptor], dests: list[Any], batch: int, seconds: float
) -> float:
    """Read `batch` descriptors at a time, walking all of descs (a cache-cold working set)."""
    groups = [(descs[i : i + batch], dests[i : i + batch]) for i in range(0, len(descs), batch)]

    async def once(group: tuple[list[base.Descriptor], list[Any]]) -> int:
        if batch == 1:
            await client.read(group[0][0], group[1][0])
        else:
            await client.read_batch(group[0], group[1])
        return sum(d.length for d in group[0])

    await once(groups[0])
    moved, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        moved += await once(groups[i % len(groups)])
        i += 1
    return moved / (time.perf_counter() - start) / 1e9


async def _latency(
    client: Any, desc: base.Descriptor, dest: Any, samples: int
) -> tuple[float, float]:
    for _ in range(100):
        await client.read(desc, dest)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        await client.read(desc, dest)
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def measure(name: str, seconds: float = 0.6) -> dict[str, Any]:
    """Read throughput per block size and batch, and 64 KiB read latency, for one transport."""
    peer = Peer(name)
    pool = np.ones(CLIENT_BYTES, dtype=np.uint8)  # pre-faulted destinations

    async def main() -> dict[str, Any]:
        client = await registry.connect(peer.endpoint, peer.token, registry.ClientSettings())
        result: dict[str, Any] = {"throughput_gbps": {}, "latency_us": {}}
        try:
            for block in BLOCKS:
                for batch in BATCHES:
                    # At least 256 MiB of distinct source and destination ranges per case.
                    count = max(batch, (256 * MIB) // block)
                    count -= count % batch
                    descs = peer.grant(block, count)
                    per = max(1, CLIENT_BYTES // block)
                    dests = [
                        pool[(i % per) * block : (i % per) * block + block] for i in range(count)
                    ]
                    gbps = await _throughput(client, descs, dests, batch, seconds)
                    result["throughput_gbps"][f"{block}x{batch}"] = gbps
            (desc,) = peer.grant(64 * KIB, 1)
            p50, p99 = await _latency(client, desc, pool[: 64 * KIB], 3000)
            result["latency_us"] = {"p50": p50, "p99": p99}
        finally:
            await client.close()
        return result

    try:
        return uvloop.run(main())
    finally:
        peer.close()
