"""The dev cluster end to end: `kvtier up`, status, a node killed and revived, clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier import membership
from kvtier.proto.common.v1 import common_pb2
from tests.integration.conftest import kvtier_cmd, pid_alive, wait_file_json

pytestmark = pytest.mark.integration

LEASE_TTL_S = 3
GRACE_S = 5.0
EXPECTED = {"metadata": 1, "datanode": 6, "kvcache": 2, "gateway": 1}


def _status(state_dir: Path) -> dict[str, Any]:
    result = kvtier_cmd("status", "--state-dir", str(state_dir), "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def _etcd_map(endpoint: str) -> common_pb2.ClusterMap:
    async def read() -> common_pb2.ClusterMap:
        store = membership.EtcdMembership((endpoint,), "/kvtier")
        await store.connect(wait_s=5)
        try:
            return (await store.get_map()).map
        finally:
            await store.close()

    return asyncio.run(read())


def _wait_map(
    endpoint: str, predicate: Any, timeout_s: float
) -> tuple[common_pb2.ClusterMap, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        cmap = _etcd_map(endpoint)
        if predicate(cmap):
            return cmap, time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"map condition not met within {timeout_s}s: {_etcd_map(endpoint)}")


def _start_cluster(state_dir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvtier.cli.main",
            "up",
            "--state-dir",
            str(state_dir),
            "--lease-ttl-s",
            str(LEASE_TTL_S),
            "--shutdown-grace-s",
            str(GRACE_S),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    info = wait_file_json(state_dir / "cluster.json", proc, timeout_s=120)
    return proc, info


def _stop_cluster(proc: subprocess.Popen[str]) -> tuple[int, float, str]:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=GRACE_S * 4 + 20)
    return proc.returncode, time.monotonic() - start, out


def test_dev_cluster_lifecycle(state_dir: Path) -> None:
    proc, info = _start_cluster(state_dir)
    try:
        for key in ("gateway_grpc", "gateway_s3", "etcd", "metadata", "access_key", "secret_key"):
            assert key in info
        assert info["state_dir"] == str(state_dir.resolve())
        assert info["access_key"]
        assert info["secret_key"]

        # kvtier status and the map in etcd agree: 1 + 6 + 2 + 1 nodes, all SERVING.
        status = _status(state_dir)
        roles: dict[str, int] = {}
        for node in status["nodes"]:
            roles[node["role"]] = roles.get(node["role"], 0) + 1
            assert node["health"] == "SERVING", node
            assert node["epoch"] == status["epoch"] or node["epoch"] >= 1
        assert roles == EXPECTED
        # Nodes that own bulk bytes offer a data plane; on one host this client would use shm.
        for node in status["nodes"]:
            if node["role"] in {"datanode", "kvcache", "gateway"}:
                assert {"shm", "tcp"} <= set(node["dataplane_offered"]), node
                assert node["dataplane"] == "shm"
            else:
                assert node["dataplane"] is None
        cmap = _etcd_map(info["etcd"])
        assert sorted(n.node_id for n in cmap.nodes) == sorted(
            n["node_id"] for n in status["nodes"]
        )
        assert len(cmap.pools) == 1
        assert len(cmap.pools[0].sets[0].slots) == 12
        # The KV tier works through the metadata address in cluster.json, and status shows
        # each kvcache node's fill and hit rate.
        with kvtier.KVClient.connect(metadata=info["metadata"], namespace="devcluster") as kv:
            keys = [f"dev-{i}".encode() for i in range(32)]
            blocks = [bytes([i]) * 65536 for i in range(32)]
            assert kv.put_batch(keys, blocks) == [kvtier.PutStatus.STORED] * 32
            outs = [bytearray(65536) for _ in keys]
            assert kv.get_batch([*keys, b"absent"], [*outs, bytearray(8)]) == [65536] * 32 + [None]
            assert outs == blocks
        status = _status(state_dir)
        kv_nodes = [n["kvcache"] for n in status["nodes"] if n["role"] == "kvcache"]
        assert sum(s["blocks"] for s in kv_nodes) == 32
        assert sum(s["hits"] for s in kv_nodes) == 32
        assert sum(s["misses"] for s in kv_nodes) == 1
        assert all(0 < s["fill"] < 1 for s in kv_nodes)
        human = kvtier_cmd("status", "--state-dir", str(state_dir))
        assert "datanode-6" in human.stdout
        assert "SERVING" in human.stdout
        assert "blocks" in human.stdout

        # SIGKILL datanode-3: it leaves the map within its lease TTL (plus scheduling slack).
        victim = next(n for n in info["nodes"] if n["name"] == "datanode-3")
        drives_before = next(n.drives for n in cmap.nodes if n.node_id == "datanode-3")
        os.kill(victim["pid"], signal.SIGKILL)
        gone, elapsed = _wait_map(
            info["etcd"], lambda m: all(n.node_id != "datanode-3" for n in m.nodes), 30
        )
        assert elapsed <= LEASE_TTL_S + 1.5, f"left after {elapsed:.1f}s, lease is {LEASE_TTL_S}s"
        offline = [
            s for s in gone.pools[0].sets[0].slots if s.state == common_pb2.DRIVE_STATE_OFFLINE
        ]
        assert {s.node_id for s in offline} == {"datanode-3"}
        assert len(offline) == 2
        assert "datanode-3" in _status(state_dir)["down"]

        # Revived: it rejoins with the same identity and the same drives; its slots come back.
        result = kvtier_cmd("revive", "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        back, _ = _wait_map(
            info["etcd"],
            lambda m: (
                any(n.node_id == "datanode-3" for n in m.nodes)
                and all(s.state == common_pb2.DRIVE_STATE_ONLINE for s in m.pools[0].sets[0].slots)
            ),
            30,
        )
        rejoined = next(n for n in back.nodes if n.node_id == "datanode-3")
        assert [d.drive_id for d in rejoined.drives] == [d.drive_id for d in drives_before]
        assert rejoined.pid != victim["pid"]
        assert back.epoch > gone.epoch > cmap.epoch
        assert back.pools[0].sets[0].slots[0].drive_id == cmap.pools[0].sets[0].slots[0].drive_id
    except BaseException:
        proc.kill()
        raise

    # SIGTERM the whole cluster: every process exits 0 within the grace period.
    live_pids = [n["pid"] for n in info["nodes"] if n["name"] != "datanode-3"] + [info["etcd_pid"]]
    code, elapsed, out = _stop_cluster(proc)
    assert code == 0, out
    assert "every process exited 0" in out
    assert elapsed < GRACE_S + 5, f"stop took {elapsed:.1f}s"
    assert not [pid for pid in live_pids if pid_alive(pid)]
    assert not (state_dir / "cluster.json").exists()


def _up_small_detached(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """`kvtier up --detach` with a small cluster (2 datanodes x 2 drives, 1 kvcache node)."""
    return kvtier_cmd(
        "up", "--state-dir", str(state_dir), "--detach", "--datanodes", "2",
        "--drives-per-datanode", "2", "--kvcache-nodes", "1", "--lease-ttl-s", "2",
        timeout_s=150,
    )  # fmt: skip


def test_detached_cluster_keeps_its_data_across_down_and_up(state_dir: Path) -> None:
    result = _up_small_detached(state_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gateway gRPC" in result.stdout
    assert "secret key" in result.stdout
    first = json.loads((state_dir / "cluster.json").read_text())
    first_map = _etcd_map(first["etcd"])
    # The admin's keys are printed once at start and kept in private files.
    assert first["s3_access_key"] in result.stdout
    assert first["s3_secret_key"] in result.stdout
    for private in ("cluster.json", "credentials.json", "master.key"):
        assert stat.S_IMODE((state_dir / private).stat().st_mode) == 0o600, private
    listed = kvtier_cmd("admin", "user", "list", "--json", "--state-dir", str(state_dir))
    assert listed.returncode == 0, listed.stderr
    admins = [u for u in json.loads(listed.stdout) if u["access_key"] == first["s3_access_key"]]
    assert [(u["tenant"], u["is_admin"]) for u in admins] == [("default", True)]
    assert first["s3_secret_key"] not in listed.stdout
    again = kvtier_cmd("up", "--state-dir", str(state_dir), timeout_s=30)
    assert again.returncode == 1
    assert "already running" in again.stdout + again.stderr

    down = kvtier_cmd("down", "--state-dir", str(state_dir), timeout_s=60)
    assert down.returncode == 0, down.stderr
    assert not pid_alive(first["supervisor_pid"])
    assert not [n for n in first["nodes"] if pid_alive(n["pid"])]

    result = _up_small_detached(state_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    second = json.loads((state_dir / "cluster.json").read_text())
    try:
        second_map = _etcd_map(second["etcd"])
        assert second["access_key"] == first["access_key"]
        # The same admin user across restarts, not a second one.
        assert (second["s3_access_key"], second["s3_secret_key"]) == (
            first["s3_access_key"],
            first["s3_secret_key"],
        )
        listed = kvtier_cmd("admin", "user", "list", "--json", "--state-dir", str(state_dir))
        assert [u["access_key"] for u in json.loads(listed.stdout)] == [first["s3_access_key"]]
        assert second_map.deployment_id == first_map.deployment_id
        assert second_map.epoch > first_map.epoch
        assert second_map.pools == first_map.pools  # same drives in the same slots
    finally:
        assert kvtier_cmd("down", "--state-dir", str(state_dir), timeout_s=60).returncode == 0
    assert "no dev cluster is running" in kvtier_cmd("down", "--state-dir", str(state_dir)).stdout
