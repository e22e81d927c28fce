"""The fault harness's own faults are real: a partition drops packets, netem delays them, a
filled drive says ENOSPC, SIGSTOP stops; stale namespaces of dead runs are removed."""

from __future__ import annotations

import hashlib
import re
import signal
from collections.abc import Callable

import boto3
import pytest
from botocore.config import Config

from tests.fault import harness, netns

pytestmark = pytest.mark.integration


def test_faults_take_effect_and_are_undone(
    open_cluster: Callable[..., harness.FaultCluster],
) -> None:
    cluster = open_cluster()
    etcd_port = harness.ETCD_CLIENT_PORT
    assert cluster.connect_s("gateway-1", "etcd", etcd_port) is not None

    cluster.partition("gateway-1", "etcd")
    assert cluster.connect_s("gateway-1", "etcd", etcd_port) is None
    assert cluster.connect_s("metadata-1", "etcd", etcd_port) is not None  # only that pair
    cluster.heal("gateway-1", "etcd")
    assert cluster.connect_s("gateway-1", "etcd", etcd_port) is not None

    cluster.impair("datanode-1", delay_ms=300)
    delayed = cluster.connect_s("datanode-1", "etcd", etcd_port)
    assert delayed is not None
    assert delayed >= 0.29
    cluster.unimpair("datanode-1")
    undelayed = cluster.connect_s("datanode-1", "etcd", etcd_port)
    assert undelayed is not None
    assert undelayed < 0.2

    written = cluster.fill_drive("datanode-1", 0)
    assert cluster.drive_bytes - (8 << 20) <= written <= cluster.drive_bytes
    s3 = boto3.client(
        "s3", endpoint_url=cluster.info["gateway_s3"], region_name="us-east-1",
        aws_access_key_id=cluster.info["s3_access_key"],
        aws_secret_access_key=cluster.info["s3_secret_key"], verify=cluster.info["ca_file"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )  # fmt: skip
    s3.create_bucket(Bucket="full")
    data = hashlib.sha256(b"one drive full").digest() * 4096
    s3.put_object(Bucket="full", Key="k", Body=data)  # a write quorum without the full drive
    assert s3.get_object(Bucket="full", Key="k")["Body"].read() == data
    cluster.free_drive("datanode-1", 0)
    # The shards crossed the faulted network: the gateway's data plane to the datanodes is tcp
    # (the harness's default), not shm, which no partition or netem reaches.
    gateway_log = (cluster.state / "logs" / "gateway-1.log").read_text(errors="replace")
    transports = re.findall(r"data plane to \S+ over (\w+)", gateway_log)
    assert transports, gateway_log
    assert set(transports) == {"tcp"}, transports

    cluster.signal("datanode-2", signal.SIGSTOP)
    assert cluster.process_state("datanode-2") == "T"
    cluster.signal("datanode-2", signal.SIGCONT)
    assert cluster.process_state("datanode-2") != "T"


def test_stale_namespaces_of_dead_runs_are_removed(fault_host: None) -> None:
    dead = 4_000_000  # above pid_max's default: no process has it
    name = f"{netns.PREFIX}{dead}-node"
    try:
        netns.ip("netns", "add", name)
    except netns.NetError as exc:
        pytest.skip(f"cannot create namespaces: {exc}")
    try:
        assert name in netns.cleanup_stale()
        assert not (netns.NETNS_DIR / name).exists()
    finally:
        netns.ip("netns", "delete", name, check=False)
