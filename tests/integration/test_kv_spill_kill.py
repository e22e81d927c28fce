"""Issue 5's acceptance: fill a write-back namespace past the DRAM of two kvcache nodes, SIGKILL
both, restart them: every spilled block reads back byte-exact (through the durable tier), and
the nodes report hits per tier. Real processes: metadata, 6 datanodes, a gateway, 2 kvcache."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier import errors, etcdserver, kv, kv_stats
from kvtier.clients import kvcache as kvcache_client
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb
from tests.integration.conftest import EPHEMERAL_PORTS, service_tls_flags

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BLOCK = 128 * 1024
ARENA = 8 * MIB
NAMESPACE = "acceptance"
KVCACHE = ("kv-1", "kv-2")


def _block(key: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8)


class _Cluster:
    def __init__(self, etcd: etcdserver.EtcdServer, tmp: Path) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metadata = f"127.0.0.1:{etcdserver.free_port()}"

    def start(self, role: str, name: str, *extra: str) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [
                sys.executable, "-m", f"services.{role}", f"--node-id={name}",
                f"--etcd-endpoints={self.etcd.endpoint}", "--lease-ttl-s=2",
                *EPHEMERAL_PORTS, "--metrics-port=-1", "--shutdown-grace-s=1",
                *service_tls_flags(role), *extra,
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def start_kvcache(self, name: str) -> None:
        self.start(
            "kvcache", name, f"--data-dir={self.tmp / name}", f"--arena-bytes={ARENA}",
            "--page-bytes=1048576", f"--spill-buffer-bytes={ARENA}",
            f"--durable-namespaces=default/{NAMESPACE}=write_back",
        )  # fmt: skip

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.tmp.glob("*.log"))
        )


@pytest.fixture
def cluster(
    private_etcd: etcdserver.EtcdServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[_Cluster]:
    c = _Cluster(private_etcd, tmp_path)
    port = c.metadata.rsplit(":", 1)[1]
    c.start("metadata", "meta-1", f"--grpc-port={port}", "--pool-drives=12")
    for i in range(1, 7):
        c.start("datanode", f"dn-{i}", f"--data-dir={tmp_path / f'dn-{i}'}", "--drive-count=2")
    c.start("gateway", "gw-1")
    for name in KVCACHE:
        c.start_kvcache(name)
    try:
        yield c
    finally:
        c.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(c.logs())


async def _connect(cluster: _Cluster) -> kv.AsyncKVClient:
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(errors.KVTierError):
                client = await kv.AsyncKVClient.connect(
                    metadata=cluster.metadata, namespace=NAMESPACE, transports=["tcp"],
                    timeout_s=5.0, refresh_s=0.5,
                )  # fmt: skip
                if sorted(client.node_ids) == sorted(KVCACHE):
                    return client
                await client.close()
            await asyncio.sleep(0.2)


async def _stats(client: kv.AsyncKVClient, ready: bool = False) -> dict[str, kv_stats.KVStats]:
    """Both nodes' stats; with ready, once both see the durable tier and queue nothing."""
    async with asyncio.timeout(120):
        while True:
            stats = await client.stats()
            done = all(s.durable_available and s.spill_queue_bytes == 0 for s in stats.values())
            if len(stats) == len(KVCACHE) and (done or not ready):
                return stats
            await asyncio.sleep(0.1)


async def _put_all(client: kv.AsyncKVClient, keys: list[bytes]) -> None:
    todo = list(keys)
    while todo:
        chunk, todo = todo[:32], todo[32:]
        statuses = await client.put_batch(chunk, [_block(k) for k in chunk])
        again = [k for k, s in zip(chunk, statuses, strict=True) if s is kv.PutStatus.NO_SPACE]
        assert set(statuses) <= {kv.PutStatus.STORED, kv.PutStatus.NO_SPACE}, statuses
        if again:  # a spill buffer is full: back off while it uploads
            todo = again + todo
            await asyncio.sleep(0.05)


async def _spilled(client: kv.AsyncKVClient, keys: list[bytes]) -> list[bytes]:
    """The keys no longer in their owner's DRAM."""
    spilled = []
    for node in client._set.nodes():
        mine = [k for k in keys if client.owners(k) == [node.node_id]]
        request = pb.BatchExistsRequest(namespace=pb.Namespace(name=NAMESPACE), keys=mine)
        async with kvcache_client.KVCacheClient(node.address) as grpc_client:
            reply = await grpc_client.batch_exists(request)
        assert all(reply.present)
        spilled += [k for k, hit in zip(mine, reply.in_dram, strict=True) if not hit]
    return spilled


async def test_spilled_blocks_survive_sigkill_of_every_kvcache_node(cluster: _Cluster) -> None:
    client = await _connect(cluster)
    try:
        await _stats(client, ready=True)  # both nodes see the gateway
        keys = [b"chain-%d" % i for i in range(3 * len(KVCACHE) * ARENA // BLOCK)]
        await _put_all(client, keys)
        await _stats(client, ready=True)  # every spill is durable now
        spilled = await _spilled(client, keys)
        assert len(spilled) > len(keys) // 2

        for name in KVCACHE:
            cluster.kill(name)
        for name in KVCACHE:
            cluster.start_kvcache(name)  # same node id and state dir: empty DRAM
        await client.close()
        client = await _connect(cluster)
        await _stats(client, ready=True)
        for at in range(0, len(spilled), 16):
            chunk = spilled[at : at + 16]
            outs = [np.zeros(BLOCK, np.uint8) for _ in chunk]
            assert await client.get_batch(chunk, outs) == [BLOCK] * len(chunk)
            for key, out in zip(chunk, outs, strict=True):
                assert np.array_equal(out, _block(key)), key
        stats = await _stats(client)
        assert sum(s.durable_hits for s in stats.values()) == len(spilled)
        assert sum(s.hits for s in stats.values()) == 0
        assert sum(s.misses for s in stats.values()) == 0
        for node_id, s in stats.items():  # hit rates per tier, as operators see them
            sys.stderr.write(
                f"{node_id}: dram {s.dram_hit_rate:.1%}, both tiers {s.hit_rate:.1%}, "
                f"{s.durable_hits} read through\n"
            )
    finally:
        await client.close()
