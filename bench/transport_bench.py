"""Data-plane transports against this machine's ceilings, in one run.

The transport server runs in its own process (as on a real node); the client grants itself
nothing: the server process grants descriptors and hands them over with the connection token.
Reads are measured (a KV fetch is a read); writes behave alike. See docs/benchmarks.md.

`tls_cost()` (also `python -m bench.transport_bench --tls`) measures what TLS costs the tcp data
plane: a cleartext and a TLS server side by side, cases alternated between them in one run, and
reported as TLS / cleartext ratios (docs/transports.md, "TLS").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
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


def _serve(name: str, pipe: Connection, tls_files: tuple[str, str] | None = None) -> None:
    async def main() -> None:
        settings = registry.ServerSettings()
        if tls_files is not None:
            cert, key = tls_files
            settings = registry.ServerSettings(tls=True, tls_cert_file=cert, tls_key_file=key)
        plane = dataplane.DataPlane("bench-node", [name], settings)
        plane.regions.create(REGION_BYTES)
        caps = await plane.start()
        token, _ = plane.issuer.issue_token("bench", ttl_s=3600, transport=name)
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

    def __init__(self, name: str, tls_files: tuple[str, str] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(name, child, tls_files), daemon=True)
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


#: The block sizes and batches of the TLS comparison: a KV block and a large shard-sized read.
TLS_CASES = [(64 * KIB, 1), (64 * KIB, 64), (4 * MIB, 1), (4 * MIB, 8)]


async def _write_throughput(
    client: Any, descs: list[base.Descriptor], srcs: list[Any], batch: int, seconds: float
) -> float:
    """Write `batch` descriptors at a time, walking all of descs."""
    groups = [(descs[i : i + batch], srcs[i : i + batch]) for i in range(0, len(descs), batch)]
    await client.write_batch(*groups[0])
    moved, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        group = groups[i % len(groups)]
        await client.write_batch(*group)
        moved += sum(d.length for d in group[0])
        i += 1
    return moved / (time.perf_counter() - start) / 1e9


def _bench_pki(directory: Path) -> tuple[str, str, str]:
    """A throwaway CA and a node certificate for 127.0.0.1: (ca, cert, key) paths."""
    from kvtier import pki  # only the TLS comparison needs the cryptography package

    authority = pki.new_authority("bench")
    (directory / "ca.crt").write_bytes(authority.cert_pem)
    cert, key = pki.write_pair(
        directory, "node", authority.issue("kvcache", "bench", hosts=["127.0.0.1"])
    )
    return str(directory / "ca.crt"), str(cert), str(key)


def tls_cost(seconds: float = 0.4, rounds: int = 5) -> dict[str, Any]:
    """tcp with and without TLS in one run: throughput of reads and writes per case and 64 KiB
    read latency, each case alternated between the two servers `rounds` times; medians, and
    TLS / cleartext ratios (throughput: below 1 is slower; latency: above 1 is slower)."""
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-tls-") as tmp:
        ca, cert, key = _bench_pki(Path(tmp))
        peers = {"tcp": Peer("tcp"), "tcp+tls": Peer("tcp", (cert, key))}
        pool = np.ones(CLIENT_BYTES, dtype=np.uint8)

        async def main() -> dict[str, Any]:
            settings = registry.ClientSettings(tls_ca_file=ca)
            clients = {
                kind: await registry.connect(peer.endpoint, peer.token, settings)
                for kind, peer in peers.items()
            }
            samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in peers}
            try:
                for block, batch in TLS_CASES:
                    count = max(batch, (256 * MIB) // block)
                    count -= count % batch
                    per = max(1, CLIENT_BYTES // block)
                    bufs = [pool[(i % per) * block : (i % per + 1) * block] for i in range(count)]
                    grants = {kind: peer.grant(block, count) for kind, peer in peers.items()}
                    for _ in range(rounds):
                        for kind, client in clients.items():
                            descs = grants[kind]
                            read = await _throughput(client, descs, bufs, batch, seconds)
                            write = await _write_throughput(client, descs, bufs, batch, seconds)
                            case = samples[kind]
                            case.setdefault(f"read {block}x{batch} GB/s", []).append(read)
                            case.setdefault(f"write {block}x{batch} GB/s", []).append(write)
                one = {kind: peer.grant(64 * KIB, 1)[0] for kind, peer in peers.items()}
                for _ in range(rounds):
                    for kind, client in clients.items():
                        p50, p99 = await _latency(client, one[kind], pool[: 64 * KIB], 1000)
                        samples[kind].setdefault("read 64 KiB p50 us", []).append(p50)
                        samples[kind].setdefault("read 64 KiB p99 us", []).append(p99)
            finally:
                for client in clients.values():
                    await client.close()
            medians = {
                kind: {name: statistics.median(v) for name, v in case.items()}
                for kind, case in samples.items()
            }
            ratios = {
                name: medians["tcp+tls"][name] / medians["tcp"][name] for name in medians["tcp"]
            }
            return {"median": medians, "tls_over_plain": ratios, "rounds": rounds}

        try:
            return uvloop.run(main())
        finally:
            for peer in peers.values():
                peer.close()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", action="store_true", help="tcp vs tcp+TLS ratios (tls_cost)")
    parser.add_argument("--seconds", type=float, default=0.4, help="per case and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternations per case")
    args = parser.parse_args()
    if args.tls:
        result = tls_cost(args.seconds, args.rounds)
    else:
        result = {name: measure(name, args.seconds) for name in registry.available()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    _main()
