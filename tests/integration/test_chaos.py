"""Chaos on real processes: a paused node loses its lease and comes back by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier import etcdserver, membership
from kvtier.proto.common.v1 import common_pb2
from tests.integration.conftest import EPHEMERAL_PORTS, service_tls_flags

pytestmark = pytest.mark.integration

TTL_S = 2


def _registered(endpoint: str) -> dict[str, common_pb2.NodeInfo]:
    async def read() -> dict[str, common_pb2.NodeInfo]:
        store = membership.EtcdMembership((endpoint,), "/kvtier")
        await store.connect(wait_s=5)
        try:
            return (await store.list_nodes())[0]
        finally:
            await store.close()

    return asyncio.run(read())


def _wait(endpoint: str, present: bool, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if ("kv-1" in _registered(endpoint)) == present:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"kv-1 {'never appeared' if present else 'never left'} in {timeout_s}s")


def test_sigstopped_node_leaves_and_reregisters_after_sigcont(
    private_etcd: etcdserver.EtcdServer, tmp_path: Path
) -> None:
    log = (tmp_path / "kv.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.kvcache",
            "--node-id=kv-1",
            f"--etcd-endpoints={private_etcd.endpoint}",
            f"--lease-ttl-s={TTL_S}",
            f"--data-dir={tmp_path / 'kv'}",
            "--arena-bytes=67108864",
            *EPHEMERAL_PORTS,
            *service_tls_flags("kvcache"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(private_etcd.endpoint, present=True, timeout_s=30)
        os.kill(proc.pid, signal.SIGSTOP)
        left_after = _wait(private_etcd.endpoint, present=False, timeout_s=TTL_S + 10)
        assert left_after <= TTL_S + 1.5
        os.kill(proc.pid, signal.SIGCONT)
        _wait(private_etcd.endpoint, present=True, timeout_s=15)
        info = _registered(private_etcd.endpoint)["kv-1"]
        assert info.pid == proc.pid  # the same process registered again, not a restart
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        log.close()
    text = (tmp_path / "kv.log").read_text()
    assert "registering again" in text, text
