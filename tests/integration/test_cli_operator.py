"""The operator's view of a dev cluster on fixed ports: the same ports after a restart, the S3
port's unauthenticated probes, `status`/`health` that fail on a degraded cluster, `revive` that
records the new pid, and a second `up` that leaves the running cluster alone."""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier import devports, security
from tests.integration.conftest import cli_env, dump_logs, kvtier_cmd, pid_alive

pytestmark = pytest.mark.integration

SMALL = {"metadata": 1, "datanode": 2, "kvcache": 1, "gateway": 1}


def _no_linger_env() -> dict[str, str]:
    """`kvtier up`'s environment, its services without the lame-duck linger on shutdown
    (drain_linger_s; tests/fault/test_rolling.py covers it): a `down` stops the roles one
    after another, and waiting out 1 s per data-plane role was 3 s of its 5.5 here."""
    roles = ("DATANODE", "KVCACHE", "GATEWAY")
    return cli_env(**{f"KVTIER_{role}_DRAIN_LINGER_S": "0" for role in roles})


def _free_offset() -> int:
    """A --port-offset whose whole plan is free, below the ephemeral range (where the other
    tests' clusters bind), so that no test's port 0 can take it meanwhile."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(50):
        offset = rng.randrange(10_000, 20_000, 10)
        try:
            devports.PortPlan(offset=offset).check(SMALL)
        except devports.PortError:
            continue
        return offset
    raise AssertionError("no free port plan found")


def _up(state_dir: Path, offset: int) -> Any:
    return kvtier_cmd(
        "up", "--ports", "fixed", "--port-offset", str(offset), "--state-dir", str(state_dir),
        "--detach", "--datanodes", "2", "--drives-per-datanode", "2", "--kvcache-nodes", "1",
        "--lease-ttl-s", "2", "--shutdown-grace-s", "2", timeout_s=150, env=_no_linger_env(),
    )  # fmt: skip


def _get(url: str, ca_file: str, method: str = "GET") -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _check_fixed_ports(info: dict[str, Any], offset: int) -> None:
    assert info["gateway_s3"] == f"https://127.0.0.1:{9000 + offset}"
    assert _port(info["etcd"]) == 7379 + offset
    assert _port(info["gateway_grpc_service"]) == 7000 + offset
    assert _port(info["gateway_grpc"]) == 7443 + offset
    assert _port(info["metadata"]) == 7001 + offset
    assert _port(info["metadata_client"]) == 7444 + offset
    nodes = {n["name"]: n for n in info["nodes"]}
    assert _port(nodes["datanode-2"]["grpc_address"]) == 7102 + offset
    assert _port(nodes["kvcache-1"]["grpc_address"]) == 7201 + offset
    for node in info["nodes"]:  # scrape targets: gRPC + 50
        assert _port(node["metrics_address"]) == _port(node["grpc_address"]) + 50, node


def _probes(info: dict[str, Any]) -> None:
    """Live and ready without credentials; they say nothing else, and S3 still authenticates."""
    s3, ca = info["gateway_s3"], info["ca_file"]
    for path in ("/_kvtier/health/live", "/_kvtier/health/ready"):
        assert _get(s3 + path, ca) == (200, b"ok\n")
        assert _get(s3 + path, ca, method="HEAD") == (200, b"")
    status, body = _get(s3 + "/", ca)  # ListBuckets, anonymous: refused as before
    assert status == 403
    assert b"AccessDenied" in body
    status, body = _get(s3 + "/_kvtier/health/other", ca)
    assert status != 200
    assert b"ok" not in body


@pytest.mark.timeout(420)  # two `up`s and some twenty commands on a shared machine
def test_fixed_ports_probes_degraded_status_and_revive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    offset = _free_offset()
    up = _up(state, offset)
    assert up.returncode == 0, up.stdout + up.stderr + dump_logs(state)
    try:
        info = json.loads((state / "cluster.json").read_text())
        _check_fixed_ports(info, offset)
        _probes(info)
        _operate(state, info, offset)
        down = kvtier_cmd("down", "--state-dir", str(state), timeout_s=60)
        assert down.returncode == 0, down.stderr
        # Up again: the same ports, so profiles and scrape targets stay right.
        up = _up(state, offset)
        assert up.returncode == 0, up.stdout + up.stderr + dump_logs(state)
        again = json.loads((state / "cluster.json").read_text())
        _check_fixed_ports(again, offset)
        assert again["supervisor_pid"] != info["supervisor_pid"]
    except BaseException:
        print(dump_logs(state))  # noqa: T201
        raise
    finally:
        kvtier_cmd("down", "--state-dir", str(state), timeout_s=60)


def _operate(state: Path, info: dict[str, Any], offset: int) -> None:
    where = ("--state-dir", str(state))
    status = kvtier_cmd("status", *where)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"S3 endpoint: https://127.0.0.1:{9000 + offset}" in status.stdout
    assert "METRICS" in status.stdout
    assert f"127.0.0.1:{7050 + offset}" in status.stdout  # the gateway's metrics
    assert status.stdout.rstrip().endswith("cluster healthy")
    health = kvtier_cmd("health", *where)
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.rstrip().endswith("cluster healthy")
    assert len(health.stdout.splitlines()) == sum(SMALL.values()) + 1

    users = kvtier_cmd("admin", "user", "list", *where)
    assert users.returncode == 0, users.stderr
    assert users.stdout.splitlines()[0].split() == ["ACCESS", "KEY", "TENANT", "NAME", "RIGHTS"]
    assert info["s3_access_key"] in users.stdout.splitlines()[1]

    _kv_settings(state, info)

    # A second `up` of the running state dir: refused, and the running cluster's log untouched.
    log = state / "logs" / "supervisor.log"
    before = log.read_bytes()
    second = _up(state, offset)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert log.read_bytes() == before
    # Another state dir on the same ports: one line, exit 2, nothing started.
    other = kvtier_cmd(
        "up", "--ports", "fixed", "--port-offset", str(offset), "--state-dir",
        str(state.parent / "other"), "--detach", timeout_s=30,
    )  # fmt: skip
    assert other.returncode == 2, other.stdout + other.stderr
    assert other.stderr.count("\n") == 1
    assert "is in use on 127.0.0.1" in other.stderr
    assert not (state.parent / "other" / "logs").exists()

    # datanode-2 killed: status and health fail, naming it and the offline drives.
    victim = next(n for n in info["nodes"] if n["name"] == "datanode-2")
    os.kill(victim["pid"], signal.SIGKILL)

    def down() -> bool:  # out of the map once its lease expires (UNREACHABLE before)
        found = kvtier_cmd("status", *where, "--json")
        return "datanode-2 is DOWN" in json.loads(found.stdout)["problems"]

    _wait(down, 30, "datanode-2 DOWN")
    status = kvtier_cmd("status", *where, "--json")
    assert status.returncode == 1
    state_json = json.loads(status.stdout)
    assert state_json["healthy"] is False
    assert "pool 0 set 0: 2/4 drives online" in state_json["problems"]
    text = kvtier_cmd("status", *where)
    assert text.returncode == 1
    assert "cluster DEGRADED: datanode-2 is DOWN" in text.stdout
    health = kvtier_cmd("health", *where)
    assert health.returncode == 1
    assert "DOWN" in health.stdout

    # Revived: cluster.json names the new process, and the cluster is healthy again.
    assert kvtier_cmd("revive", *where).returncode == 0

    def recorded() -> bool:
        nodes = json.loads((state / "cluster.json").read_text())["nodes"]
        pid = next(n["pid"] for n in nodes if n["name"] == "datanode-2")
        return bool(pid != victim["pid"] and pid_alive(pid))

    _wait(recorded, 10, "cluster.json has datanode-2's new pid")
    _wait(lambda: kvtier_cmd("status", *where).returncode == 0, 30, "healthy after revive")


def _kv_settings(state: Path, info: dict[str, Any]) -> None:
    """`admin kv quota` reaches every kvcache node: a tenant's put over it is refused."""
    where = ("--state-dir", str(state))
    added = kvtier_cmd("admin", "user", "add", "--tenant", "team-q", "--json", *where)
    assert added.returncode == 0, added.stderr
    keys = json.loads(added.stdout)
    quota = kvtier_cmd("admin", "kv", "quota", "team-q", "64KiB", *where)
    assert (quota.returncode, quota.stdout) == (0, "kvcache-1: set\n"), quota.stderr
    for argv in (["ttl", "team-q", "q", "3600"], ["durability", "team-q", "q", "none"]):
        done = kvtier_cmd("admin", "kv", *argv, *where)
        assert (done.returncode, done.stdout) == (0, "kvcache-1: set\n"), done.stderr
    bad = kvtier_cmd("admin", "kv", "quota", "team-q", "lots", *where)
    assert bad.returncode == 2
    assert "not a size" in bad.stderr
    user = security.ClientSecurity(
        ca_file=info["ca_file"], access_key=keys["access_key"], secret_key=keys["secret_key"],
        token_address=info["metadata_client"],
    )  # fmt: skip
    with kvtier.KVClient.connect(
        metadata=info["metadata_client"], namespace="q", security=user
    ) as kv:
        block = bytes(range(256)) * 256  # 64 KiB: the whole quota
        assert kv.put_batch([b"first"], [block]) == [kvtier.PutStatus.STORED]
        assert kv.put_batch([b"second"], [block]) == [kvtier.PutStatus.QUOTA_EXCEEDED]
        out = bytearray(len(block))
        assert kv.get_batch([b"first", b"second"], [out, bytearray(8)]) == [len(block), None]
        assert out == block
        # Refusals name their cause (issue 17: INVALID / QUOTA_EXCEEDED said nothing).
        assert kv.put_batch_results([b"second", b"k" * 1041], [block, b"x"]) == [
            kvtier.PutResult(
                kvtier.PutStatus.QUOTA_EXCEEDED,
                "tenant quota 65536 B: 65536 B held, 65536 B asked",
            ),
            kvtier.PutResult(
                kvtier.PutStatus.INVALID, "key of 1041 bytes: keys must be 1..1040 bytes"
            ),
        ]
        (mine,) = kv.stats().values()  # typed: the tenant's own figures
        assert (mine.tenant, mine.blocks, mine.requested_bytes) == ("team-q", 1, len(block))
    _kv_stats(state)


def _kv_stats(state: Path) -> None:
    """`admin kv stats`: every kvcache node's figures, as text or JSON (not protobuf text)."""
    where = ("--state-dir", str(state))
    found = kvtier_cmd("admin", "kv", "stats", "--tenant", "team-q", "--json", *where)
    assert found.returncode == 0, found.stderr
    shown = json.loads(found.stdout)
    assert shown["failed"] == {}
    node = shown["nodes"]["kvcache-1"]
    assert (node["tenant"], node["blocks"], node["requested_bytes"]) == ("team-q", 1, 65536)
    assert node["quota_rejections"] == 2  # "second", twice
    text = kvtier_cmd("admin", "kv", "stats", "--tenant", "team-q", *where)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "kvcache-1 (tenant team-q)"
    assert lines[1] == "  blocks          1 (pending puts 0)"
    assert "requested 64.0 KiB; node: arena " in lines[2]
    whole = kvtier_cmd("admin", "kv", "stats", *where)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.splitlines()[0] == "kvcache-1 (whole node)"
