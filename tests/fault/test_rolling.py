"""Rolling restart of every service under the steady mixed workload (issue 16): each node is
stopped as an operator stops it (SIGTERM: it leaves the map, drains, exits 0), started again
with the same identity and data, and the next one waits until the whole cluster is SERVING.

The cluster has what a rolling restart needs to stay up: 2 gateways behind a TCP load balancer
(tests/fault/balancer.py; S3 clients never see a gateway's address), 2 kvcache nodes, 4
datanodes in one 4+4 erasure set (one datanode down costs each stripe 2 shards), one metadata
node (gateways keep serving from their watched map and bucket records while it restarts).
etcd is not restarted: it is one member here, so restarting it is an etcd outage (the etcd
scenario in test_scenarios.py); a real etcd cluster is rolled member by member by its own
procedure, keeping its quorum.

Asserted: 0 wrong bytes, 0 wrong listings, 0 lost acknowledged writes, 0 failed client
operations (S3 after boto3's standard retries, KV calls and every key of every KV put), and
every node exited 0 from its drain. KV blocks of a restarted kvcache node are gone (memory
durability): reads of them are misses, counted, not failures. Short (one round) by default;
`-m fault_full` rolls the cluster three times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest

from kvtier import errors
from kvtier.clients import gateway as gateway_client
from tests.fault import balancer, harness, workload

pytestmark = pytest.mark.integration

DURATIONS = [
    pytest.param("short", id="short", marks=pytest.mark.timeout(600)),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(1500)]),
]
ROUNDS = {"short": 1, "full": 3}
AFTER_S = {"short": 3.0, "full": 15.0}

Opener = Callable[..., harness.FaultCluster]


@dataclasses.dataclass(slots=True)
class Step:
    """One node's restart: its drain's exit code and seconds, and seconds until ready."""

    node: str
    exit_code: int | None
    drain_s: float
    ready_s: float
    operations: int  # workload operations made while this node was restarted
    started_at: float = 0.0  # wall clock (time.time()), to place failures
    ended_at: float = 0.0


def roll_order(cluster: harness.FaultCluster) -> list[str]:
    """The order the upgrade policy names (docs/upgrades.md): metadata, datanodes, kvcache
    nodes, gateways."""
    return [n for n in cluster.node_names() if n != "etcd"]


PROBE_BUCKET, PROBE_KEY = "probe", "probe"


def write_probe(cluster: harness.FaultCluster, s3: Any) -> None:
    """The object `gateways_reach_every_drive` heals (dry run): one shard on every drive."""
    s3.create_bucket(Bucket=PROBE_BUCKET)
    s3.put_object(Bucket=PROBE_BUCKET, Key=PROBE_KEY, Body=workload.body(7, 4096))


def gateways_reach_every_drive(cluster: harness.FaultCluster, timeout_s: float = 60) -> None:
    """Wait until every gateway writes to every drive: the probe object written again through
    each gateway, then a dry-run heal through the same gateway, which asks each drive of the
    set for its copy, finds the new version healthy everywhere. The map can say SERVING while
    a gateway's channel to a node that just restarted at the same address still waits out
    gRPC's reconnect backoff (the previous release's gateways: up to seconds; its reads may
    already pass over the data plane while its writes, over gRPC, do not); writes through it
    would then miss that node's drives, and stopping the next datanode would leave fewer than
    the write quorum."""

    async def clean(address: str) -> bool:
        client = gateway_client.AdminServiceClient(
            address, security=cluster.operator_security(), timeout_s=10
        )
        try:
            async with asyncio.timeout(15):  # Heal has no deadline of its own
                progress = [p async for p in client.heal(PROBE_BUCKET, PROBE_KEY, dry_run=True)]
            # healthy: every drive answered with the current version and verified blocks (a
            # drive that cannot be reached counts as skipped, or as "would heal" in a dry run).
            return bool(progress) and progress[-1].healthy == 1
        except (errors.KVTierError, TimeoutError):
            return False
        finally:
            await client.close()

    def written(s3_address: str) -> bool:
        try:
            s3_client(cluster, s3_address).put_object(
                Bucket=PROBE_BUCKET, Key=PROBE_KEY, Body=workload.body(7, 4096)
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False
        return True

    gateways = [n for n in cluster.node_names() if n.startswith("gateway-")]
    deadline = time.monotonic() + timeout_s
    for name, s3_address in zip(gateways, cluster.info["gateways_s3"], strict=True):
        address = f"{cluster.address(name)}:{harness.GRPC_PORT}"
        while not (written(s3_address) and asyncio.run(clean(address))):
            assert time.monotonic() < deadline, f"{name} does not write to every drive"
            time.sleep(0.2)


def s3_client(cluster: harness.FaultCluster, s3_address: str, attempts: int = 1) -> Any:
    """A boto3 client of one gateway's S3 endpoint (host:port; no balancer; attempts: boto3's
    standard retries, 1 for none)."""
    return boto3.client(
        "s3", endpoint_url=f"https://{s3_address}", region_name="us-east-1",
        aws_access_key_id=cluster.info["s3_access_key"],
        aws_secret_access_key=cluster.info["s3_secret_key"], verify=cluster.info["ca_file"],
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      retries={"mode": "standard", "max_attempts": attempts}),
    )  # fmt: skip


def restart_one(cluster: harness.FaultCluster, node: str, load: workload.Workload) -> Step:
    """Stop node (SIGTERM, its drain), start it again, wait until every node is SERVING and
    every gateway reaches every drive."""
    before = sum(load.report.operations.values())
    started_at = time.time()
    started = time.monotonic()
    code = cluster.stop(node, grace_s=30)
    drained = time.monotonic()
    cluster.restart(node)  # starts it and waits for the whole cluster to be ready
    gateways_reach_every_drive(cluster)
    return Step(
        node=node,
        exit_code=code,
        drain_s=drained - started,
        ready_s=time.monotonic() - drained,
        operations=sum(load.report.operations.values()) - before,
        started_at=started_at,
        ended_at=time.time(),
    )


def assert_clean(report: workload.Report, steps: list[Step], *, drained: bool = True) -> None:
    """Every node drained cleanly (unless not drained: killed); no wrong byte or listing, no
    lost write, no failure."""
    if drained:
        assert [s.node for s in steps if s.exit_code != 0] == [], "a node did not drain cleanly"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert dict(report.failed) == {}, (
        f"failed client operations: {dict(report.failed)}, by step "
        f"{failures_by_step(report, steps)}"
    )
    assert report.acknowledged > 5


def failures_by_step(report: workload.Report, steps: list[Step]) -> dict[str, int]:
    """How many failed operations ended during each step (or between/after them)."""
    where: dict[str, int] = {}
    for at in report.failures_at:
        step = next((s.node for s in steps if s.started_at <= at <= s.ended_at), "between")
        where[step] = where.get(step, 0) + 1
    return where


def run_rolling(
    cluster: harness.FaultCluster,
    roll: Callable[[workload.Workload], list[Step]],
    *,
    after_s: float,
) -> tuple[workload.Report, list[Step], dict[str, int]]:
    """The workload through the balancer, warm-up, roll(), after_s more, verify."""
    lb = balancer.Balancer(cluster.info["gateways_s3"])
    lb.start()
    info = dict(cluster.info, gateway_s3=f"https://127.0.0.1:{lb.port}")
    seed = int(os.environ.get("KVTIER_TEST_SEED", "1"))
    load = workload.Workload(info, cluster.user_security(), seed=seed)
    try:
        write_probe(cluster, load.s3)
        load.start()
        try:
            deadline = time.monotonic() + 60
            while not (load.report.acknowledged >= 5 and len(load.kv_keys) >= 8):
                assert time.monotonic() < deadline, "warm-up: not within 60s"
                time.sleep(0.1)
            load.fault_started()
            steps = roll(load)
            load.fault_ended()
            time.sleep(after_s)  # the workload runs on after the last restart
        finally:
            load.stop()
        load.verify()
    finally:
        lb.close()
    return load.report, steps, dict(lb.connections)


def record(name: str, duration: str, report: workload.Report, steps: list[Step],
           request: pytest.FixtureRequest) -> None:  # fmt: skip
    """Attach the report to the test and append it to KVTIER_FAULT_RESULTS when set."""
    line = {"scenario": name, "duration": duration, "row": report.row(name),
            "steps": [dataclasses.asdict(s) for s in steps], **report.as_dict()}  # fmt: skip
    request.node.user_properties.append(("fault_report", line))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            results.write(json.dumps(line) + "\n")


@pytest.mark.parametrize("duration", DURATIONS)
def test_rolling_restart(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Every service restarted one at a time under load: 0 failed client operations."""
    cluster = open_cluster(
        kvcache_nodes=2, gateways=2, dataplane_transports=harness.SAME_HOST_DATAPLANE
    )

    def roll(load: workload.Workload) -> list[Step]:
        return [
            restart_one(cluster, node, load)
            for _ in range(ROUNDS[duration])
            for node in roll_order(cluster)
        ]

    report, steps, connections = run_rolling(cluster, roll, after_s=AFTER_S[duration])
    record("rolling restart of every service", duration, report, steps, request)
    assert_clean(report, steps)
    assert all(connections.values()), f"the balancer used every gateway: {connections}"


CRASH_S = {"short": 6.0, "full": 30.0}


@pytest.mark.parametrize("duration", DURATIONS)
def test_a_gateway_killed_under_load(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """gateway-1 SIGKILLed under load (a crash: no drain, requests cut mid-way), started again
    after CRASH_S: the front door is stateless, so what boto3 retries the other gateway serves
    (uploads begun through the dead one complete through the other, kvcache nodes spill through
    it): 0 failed client operations, nothing lost or wrong."""
    cluster = open_cluster(
        kvcache_nodes=2, gateways=2, dataplane_transports=harness.SAME_HOST_DATAPLANE
    )

    def crash(load: workload.Workload) -> list[Step]:
        before = sum(load.report.operations.values())
        started_at, started = time.time(), time.monotonic()
        cluster.signal("gateway-1", signal.SIGKILL)
        time.sleep(CRASH_S[duration])  # the crash's length, not a readiness wait
        killed = time.monotonic()
        cluster.restart("gateway-1")
        gateways_reach_every_drive(cluster)
        return [
            Step(
                node="gateway-1", exit_code=None, drain_s=killed - started,
                ready_s=time.monotonic() - killed,
                operations=sum(load.report.operations.values()) - before,
                started_at=started_at, ended_at=time.time(),
            )
        ]  # fmt: skip

    report, steps, connections = run_rolling(cluster, crash, after_s=AFTER_S[duration])
    record("gateway-1 SIGKILL, restarted after the fault", duration, report, steps, request)
    assert steps[0].operations > 0, "the workload made no progress while the gateway was down"
    assert_clean(report, steps, drained=False)
    assert all(connections.values()), f"the balancer used every gateway: {connections}"
