"""A kvcache node SIGKILLed under load: its keys become misses, the engine carries on; rejoin."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kvtier
from kvtier import errors, etcdserver
from tests.integration.conftest import EPHEMERAL_PORTS, service_tls_flags

pytestmark = pytest.mark.integration

TTL_S = 2
BLOCK = 64 * 1024


def _block(key: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8)


class _Cluster:
    def __init__(self, etcd: etcdserver.EtcdServer, tmp: Path) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metadata_port = etcdserver.free_port()

    def start(self, role: str, name: str, *extra: str) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [
                sys.executable, "-m", f"services.{role}", f"--node-id={name}",
                f"--etcd-endpoints={self.etcd.endpoint}", f"--lease-ttl-s={TTL_S}",
                *EPHEMERAL_PORTS, "--metrics-port=-1", "--shutdown-grace-s=1",
                *service_tls_flags(role), *extra,
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def start_kvcache(self, name: str) -> None:
        self.start(
            "kvcache", name, f"--data-dir={self.tmp / name}", "--arena-bytes=67108864",
            "--page-bytes=4194304",
        )  # fmt: skip

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
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
    c.start("metadata", "meta-1", f"--grpc-port={c.metadata_port}")
    for i in range(1, 4):
        c.start_kvcache(f"kv-{i}")
    try:
        yield c
    finally:
        c.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(c.logs())


def _wait_nodes(client: kvtier.KVClient, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(errors.Unavailable):
            client.refresh()
        if len(client.node_ids) == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the client never saw {count} kvcache nodes: {client.node_ids}")


def _connect(cluster: _Cluster) -> kvtier.KVClient:
    deadline = time.monotonic() + 30
    while True:
        try:
            return kvtier.KVClient.connect(
                metadata=f"127.0.0.1:{cluster.metadata_port}", namespace="failover",
                transports=["tcp"], timeout_s=2.0, refresh_s=0.5,
            )  # fmt: skip
        except errors.KVTierError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_killed_node_turns_into_misses_and_rejoins(cluster: _Cluster) -> None:
    client = _connect(cluster)
    loader = _connect(cluster)
    try:
        _wait_nodes(client, 3)
        _wait_nodes(loader, 3)
        keys = [f"block-{i}".encode() for i in range(240)]
        assert client.put_batch(keys, [_block(k) for k in keys]) == [kvtier.PutStatus.STORED] * 240
        victim = client.owners(keys[0])[0]
        lost = [k for k in keys if client.owners(k)[0] == victim]
        kept = [k for k in keys if k not in set(lost)]
        assert 40 < len(lost) < 120

        # Load from another client while the node dies: no exception, never wrong bytes.
        stop = threading.Event()
        seen: dict[str, Any] = {"hits": 0, "misses": 0, "errors": []}

        def load() -> None:
            outs = [np.zeros(BLOCK, np.uint8) for _ in range(16)]
            i = 0
            while not stop.is_set():
                batch = [keys[(i + j) % len(keys)] for j in range(16)]
                i += 16
                try:
                    sizes = loader.get_batch(batch, outs)
                except Exception as exc:
                    seen["errors"].append(repr(exc))
                    continue
                for key, size, out in zip(batch, sizes, outs, strict=True):
                    if size is None:
                        seen["misses"] += 1
                    else:
                        assert np.array_equal(out, _block(key)), key
                        seen["hits"] += 1

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(0.3)
        cluster.procs[victim].send_signal(signal.SIGKILL)
        cluster.procs[victim].wait()

        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        started = time.monotonic()
        sizes = client.get_batch(keys, outs)
        assert time.monotonic() - started < 5  # bounded by the client's deadline
        for key, size, out in zip(keys, sizes, outs, strict=True):
            if key in set(lost):
                assert size is None
            else:
                assert size == BLOCK
                assert np.array_equal(out, _block(key))

        _wait_nodes(client, 2)  # the lease expired: the map dropped it
        assert client.put_batch(lost, [_block(k) for k in lost]) == [kvtier.PutStatus.STORED] * len(
            lost
        )
        sizes = client.get_batch(lost, [np.zeros(BLOCK, np.uint8) for _ in lost])
        assert sizes == [BLOCK] * len(lost)  # now on the survivors

        cluster.start_kvcache(victim)  # the same node id and state dir
        _wait_nodes(client, 3)
        assert client.owners(lost[0])[0] == victim
        assert client.get_batch(lost, [np.zeros(BLOCK, np.uint8) for _ in lost]) == [None] * len(
            lost
        )
        client.put_batch(lost, [_block(k) for k in lost])
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        sizes = client.get_batch(keys, outs)
        assert sizes == [BLOCK] * len(keys)
        assert all(np.array_equal(o, _block(k)) for k, o in zip(keys, outs, strict=True))
        assert set(client.owners(k)[0] for k in kept) <= set(client.node_ids)

        stop.set()
        thread.join(timeout=30)
        assert not seen["errors"], seen["errors"][:3]
        assert seen["hits"] > 0
        assert seen["misses"] > 0
    finally:
        client.close()
        loader.close()


def test_a_paused_node_misses_a_per_call_deadline_without_being_marked_down(
    cluster: _Cluster,
) -> None:
    client = _connect(cluster)
    try:
        _wait_nodes(client, 3)
        keys = [f"pause-{i}".encode() for i in range(90)]
        client.put_batch(keys, [_block(k) for k in keys])
        victim = client.owners(keys[0])[0]
        paused = {k for k in keys if client.owners(k)[0] == victim}
        cluster.procs[victim].send_signal(signal.SIGSTOP)
        try:
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            started = time.monotonic()
            sizes = client.get_batch(keys, outs, timeout_s=0.3)
            assert time.monotonic() - started < 1.5
            assert [s is None for s in sizes] == [k in paused for k in keys]
        finally:
            cluster.procs[victim].send_signal(signal.SIGCONT)
        # Not marked down: once it runs again (before its lease ends) its keys hit at once.
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        assert client.get_batch(keys, outs) == [BLOCK] * len(keys)
        assert all(np.array_equal(o, _block(k)) for k, o in zip(keys, outs, strict=True))
    finally:
        client.close()
