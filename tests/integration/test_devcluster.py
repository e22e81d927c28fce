"""The dev cluster end to end: `kvtier up`, status, a node killed and revived, clean stop."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

import kvtier
from kvtier import membership, rpc, security
from kvtier.proto.common.v1 import common_pb2
from tests.integration.conftest import (
    cli_env,
    cluster_security,
    kvtier_cmd,
    pid_alive,
    user_security,
    wait_file_json,
)

pytestmark = pytest.mark.integration

LEASE_TTL_S = 3
GRACE_S = 5.0
EXPECTED = {"metadata": 1, "datanode": 6, "kvcache": 2, "gateway": 1}


def _status(state_dir: Path, code: int = 0) -> dict[str, Any]:
    """`kvtier status --json`; code: its exit code, 1 when the cluster is degraded."""
    result = kvtier_cmd("status", "--state-dir", str(state_dir), "--json")
    assert result.returncode == code, result.stdout + result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def _etcd_map(info: dict[str, Any]) -> common_pb2.ClusterMap:
    """The cluster map in the dev cluster's etcd (mutual TLS as its operator)."""
    sec = cluster_security(Path(info["state_dir"]))

    async def read() -> common_pb2.ClusterMap:
        store = membership.EtcdMembership((info["etcd"],), "/kvtier", security=sec)
        await store.connect(wait_s=5)
        try:
            return (await store.get_map()).map
        finally:
            await store.close()

    return asyncio.run(read())


def _wait_map(
    info: dict[str, Any], predicate: Any, timeout_s: float
) -> tuple[common_pb2.ClusterMap, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        cmap = _etcd_map(info)
        if predicate(cmap):
            return cmap, time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"map condition not met within {timeout_s}s: {_etcd_map(info)}")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secrets(state_dir: Path, info: dict[str, Any]) -> list[str]:
    """What must never appear in a log or in `kvtier up`'s output: the admin's secret, the
    master key, and every base64 line of every private key of the PKI."""
    found = [info["s3_secret_key"], (state_dir / "master.key").read_text().strip()]
    for key in (state_dir / "pki").glob("*.key"):
        found += [line for line in key.read_text().splitlines() if not line.startswith("-----")]
    return found


def _check_no_secret_leaks(state_dir: Path, info: dict[str, Any], up_output: str) -> None:
    """No log file and no `kvtier up` output holds a secret or a private key."""
    secrets = _secrets(state_dir, info)
    texts = {"kvtier up": up_output}
    texts.update((p.name, p.read_text(errors="replace")) for p in (state_dir / "logs").iterdir())
    for name, text in texts.items():
        assert "PRIVATE KEY" not in text, name
        leaked = [i for i, secret in enumerate(secrets) if secret in text]
        assert not leaked, f"{name} holds secret #{leaked} (0: the admin's, 1: the master key)"


def _check_secure_by_default(state_dir: Path, info: dict[str, Any], up_output: str) -> None:
    """What a dev cluster promises without being asked (issue 13): private files and folders,
    no secret in a log or on the terminal, TLS on every port, no call without credentials."""
    for private in ("cluster.json", "credentials.json", "master.key"):
        assert _mode(state_dir / private) == 0o600, private
    for folder in (state_dir, state_dir / "pki", state_dir / "logs"):
        assert _mode(folder) == 0o700, folder
    keys = sorted((state_dir / "pki").glob("*.key"))
    assert {k.stem for k in keys} >= {"ca", "etcd", "operator", "metadata-1", "gateway-1"}
    assert [k.name for k in keys if _mode(k) != 0o600] == []
    logs = sorted((state_dir / "logs").iterdir())
    assert {p.name for p in logs} >= {"supervisor.log", "etcd.log", "gateway-1.log"}
    assert [p.name for p in logs if _mode(p) != 0o600] == []
    _check_no_secret_leaks(state_dir, info, up_output)
    assert info["ca_file"] == str(state_dir / "pki" / "ca.crt")
    # Nothing listens on a wildcard address: every endpoint is 127.0.0.1.
    endpoints = [info[k] for k in ("etcd", "metadata", "metadata_client", "gateway_grpc")]
    endpoints += [n["grpc_address"] for n in info["nodes"]]
    endpoints.append(urllib.parse.urlparse(info["gateway_s3"]).netloc)
    assert {e.rsplit(":", 1)[0] for e in endpoints} == {"127.0.0.1"}, endpoints
    # kvtier status authenticates with the operator certificate of cluster.json.
    status = _status(state_dir)
    assert {n["health"] for n in status["nodes"]} == {"SERVING"}, status
    # S3 is HTTPS only: plain HTTP gets no HTTP answer.
    s3 = urllib.parse.urlparse(info["gateway_s3"])
    assert s3.scheme == "https"
    plain = http.client.HTTPConnection(str(s3.hostname), s3.port, timeout=10)
    plain.request("GET", "/")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain.getresponse()
    plain.close()
    # etcd: TLS with client certificates only.
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"http://{info['etcd']}/health", timeout=10)
    no_cert = ssl.create_default_context(cafile=info["ca_file"])
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"https://{info['etcd']}/health", timeout=10, context=no_cert)
    ca_pem = Path(info["ca_file"]).read_bytes()
    asyncio.run(_check_grpc_ports(info, ca_pem, cluster_security(state_dir)))


async def _call_node_info(address: str, creds: grpc.ChannelCredentials, token: str = "") -> Any:
    """NodeService.GetNodeInfo (every node serves it; authenticated callers only)."""
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = channel.unary_unary(
            "/kvtier.common.v1.NodeService/GetNodeInfo",
            request_serializer=common_pb2.GetNodeInfoRequest.SerializeToString,
            response_deserializer=common_pb2.GetNodeInfoResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return await call(common_pb2.GetNodeInfoRequest(), metadata=metadata, timeout=10)


async def _check_grpc_ports(
    info: dict[str, Any], ca_pem: bytes, operator: security.ClientSecurity
) -> None:
    """Client ports: TLS, and UNAUTHENTICATED without a session token (or with a forged one).
    Service ports: the TLS handshake fails without a client certificate; the operator's works."""
    ca_only = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    for address in (info["metadata_client"], info["gateway_grpc"]):
        for token in ("", "forged.token"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _call_node_info(address, ca_only, token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (address, token)
        assert await rpc.check_health(address, security=security.ClientSecurity(
            ca_file=info["ca_file"])) == "SERVING"  # fmt: skip
    for address in (info["metadata"], info["gateway_grpc_service"]):
        with pytest.raises(grpc.aio.AioRpcError) as no_handshake:
            await _call_node_info(address, ca_only)
        assert no_handshake.value.code() == grpc.StatusCode.UNAVAILABLE, address
        assert await rpc.check_health(address, security=operator) == "SERVING"
        reply = await _call_node_info(address, operator.channel_credentials())
        assert reply.node.tls


def _start_cluster(state_dir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvtier.cli.main",
            "up",
            "--ports",
            "auto",
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
        cmap = _etcd_map(info)
        assert sorted(n.node_id for n in cmap.nodes) == sorted(
            n["node_id"] for n in status["nodes"]
        )
        assert len(cmap.pools) == 1
        assert len(cmap.pools[0].sets[0].slots) == 12
        # The KV tier works through the metadata client address in cluster.json with the
        # admin's keys (a user), and status shows each kvcache node's fill and hit rate.
        with kvtier.KVClient.connect(
            metadata=info["metadata_client"], namespace="devcluster",
            security=user_security(state_dir),
        ) as kv:  # fmt: skip
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
            info, lambda m: all(n.node_id != "datanode-3" for n in m.nodes), 30
        )
        assert elapsed <= LEASE_TTL_S + 1.5, f"left after {elapsed:.1f}s, lease is {LEASE_TTL_S}s"
        offline = [
            s for s in gone.pools[0].sets[0].slots if s.state == common_pb2.DRIVE_STATE_OFFLINE
        ]
        assert {s.node_id for s in offline} == {"datanode-3"}
        assert len(offline) == 2
        assert "datanode-3" in _status(state_dir, code=1)["down"]

        # Revived: it rejoins with the same identity and the same drives; its slots come back.
        result = kvtier_cmd("revive", "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        back, _ = _wait_map(
            info,
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
    assert info["s3_secret_key"] not in out  # the foreground `kvtier up` printed no secret
    assert "PRIVATE KEY" not in out
    assert "every process exited 0" in out
    assert elapsed < GRACE_S + 5, f"stop took {elapsed:.1f}s"
    assert not [pid for pid in live_pids if pid_alive(pid)]
    assert not (state_dir / "cluster.json").exists()


def _up_small_detached(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """`kvtier up --detach` with a small cluster (2 datanodes x 2 drives, 1 kvcache node),
    its services without the lame-duck linger on shutdown (drain_linger_s, covered by
    tests/fault/test_rolling.py and by test_dev_cluster_lifecycle's stop): `down` stops the
    roles one after another, and 1 s per data-plane role was most of its time."""
    roles = ("DATANODE", "KVCACHE", "GATEWAY")
    return kvtier_cmd(
        "up", "--state-dir", str(state_dir), "--detach", "--datanodes", "2",
        "--drives-per-datanode", "2", "--kvcache-nodes", "1", "--lease-ttl-s", "2",
        timeout_s=150, env=cli_env(**{f"KVTIER_{role}_DRAIN_LINGER_S": "0" for role in roles}),
    )  # fmt: skip


def test_detached_cluster_keeps_its_data_across_down_and_up(state_dir: Path) -> None:
    result = _up_small_detached(state_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gateway gRPC" in result.stdout
    assert "secret key" in result.stdout
    first = json.loads((state_dir / "cluster.json").read_text())
    first_map = _etcd_map(first)
    # The admin's access key is printed, its secret only kept in private files.
    assert first["s3_access_key"] in result.stdout
    _check_secure_by_default(state_dir, first, result.stdout + result.stderr)
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
        second_map = _etcd_map(second)
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
