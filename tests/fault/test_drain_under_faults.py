"""A pool drain across a slow, lossy datanode under the steady mixed workload (issue 16).

Two pools of 4 drives each (4 datanodes x 2 drives, `pool_drives` 4). Services move bulk bytes
over the tcp data plane only (shm, their default between processes of one host, is a unix
socket that no network fault reaches). The workload writes into both pools; then one datanode
holding drives of pool 1 gets 100 ms delay and 1% loss on everything it sends
(tests/fault/netem.py) and `AdminService.DrainPool(1)` runs through gateway-1 while the
workload goes on. A drain that ends with the pool still DRAINING (objects it could not move
now, uploads in flight) is run again, as its reply says to (it is idempotent), until the pool
is DRAINED. Then the impairment is lifted, `RemovePool(1)` retires the pool (it lists the
pool again and refuses while anything is left) and every acknowledged object reads back
byte-exact, which now can only come from pool 0; pool 1's drives hold no object.

Asserted: the pool drained (within DRAIN_RUNS runs), progress came before the end, objects
moved, nothing left on pool 1's drives, 0 failed operations, 0 wrong bytes, 0 wrong listings,
0 lost acknowledged writes.
Full only (`-m fault_full`): the drain of a few hundred objects across a 100 ms link takes
longer than CI's budget for a scenario. KVTIER_FAULT_RESULTS=FILE appends the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from tests.fault import harness, workload

pytestmark = [pytest.mark.integration, pytest.mark.fault_full, pytest.mark.timeout(600)]

#: Seconds the workload runs before the drain (objects land in both pools).
WARM_S = 20.0
#: The fault lasts at least this long (the drain, and the workload beside it).
FAULT_S = 60.0
AFTER_S = 15.0
#: Drain runs at most (each resumes where the last left off).
DRAIN_RUNS = 5
DRAIN_TIMEOUT_S = 240.0
NAME = "pool 1 drained, datanode of pool 1 at 100 ms + 1% loss"
#: After the drain pool 0's 4 drives (2+2) take every write: the default 96 MiB drives filled up
#: (ENOSPC, 503 to PUTs) within two minutes of the workload.
DRIVE_BYTES = 256 << 20

Opener = Callable[..., harness.FaultCluster]


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.2)


def _cluster_map(cluster: harness.FaultCluster) -> common_pb2.ClusterMap:
    async def get() -> common_pb2.ClusterMap:
        async with metadata_client.MetadataClient(
            cluster.info["metadata"], timeout_s=10.0, security=cluster.operator_security()
        ) as meta:
            cmap = await meta.get_cluster_map()
        assert cmap is not None
        return cmap

    return asyncio.run(get())


def _pool_drives(cmap: common_pb2.ClusterMap, index: int) -> set[str]:
    return {s.drive_id for p in cmap.pools if p.index == index for es in p.sets for s in es.slots}


def _nodes_of(cmap: common_pb2.ClusterMap, drive_ids: set[str]) -> list[str]:
    return sorted(n.node_id for n in cmap.nodes if any(d.drive_id in drive_ids for d in n.drives))


def _drive_id(path: Path) -> str:
    return str(json.loads((path / ".kvtier" / "format.json").read_text())["drive_id"])


def _objects_on(cluster: harness.FaultCluster, drive_ids: set[str], bucket: str) -> list[str]:
    """Object meta files of bucket on the drives with these ids."""
    found = []
    for i in range(1, cluster.datanodes + 1):
        for d in range(cluster.drives_per_datanode):
            path = cluster.drive_path(f"datanode-{i}", d)
            if _drive_id(path) in drive_ids:
                found += [str(m) for m in path.glob(f"objects/{bucket}@*/*/*/meta")]
    return found


def _drain(cluster: harness.FaultCluster) -> list[admin_pb2.DrainProgress]:
    """DrainPool(1) through gateway-1, run again while it ends not drained; every message."""

    async def run() -> list[admin_pb2.DrainProgress]:
        seen: list[admin_pb2.DrainProgress] = []
        async with gateway_client.AdminServiceClient(
            f"{cluster.address('gateway-1')}:{harness.GRPC_PORT}",
            security=cluster.operator_security(), timeout_s=30,
        ) as admin:  # fmt: skip
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                for _ in range(DRAIN_RUNS):
                    seen += [p async for p in admin.drain_pool(1)]
                    if seen[-1].drained:
                        break
        return seen

    return asyncio.run(run())


def _remove(cluster: harness.FaultCluster) -> int:
    async def run() -> int:
        async with gateway_client.AdminServiceClient(
            f"{cluster.address('gateway-1')}:{harness.GRPC_PORT}",
            security=cluster.operator_security(), timeout_s=60,
        ) as admin:  # fmt: skip
            return await admin.remove_pool(1)

    return asyncio.run(run())


def test_pool_drain_across_slow_lossy_datanode(
    open_cluster: Opener, request: pytest.FixtureRequest
) -> None:
    cluster = open_cluster(pool_drives=4, dataplane_transports="tcp", drive_bytes=DRIVE_BYTES)
    _until(lambda: len(_cluster_map(cluster).pools) == 2, 60, "two pools formed")
    cluster.wait_ready()
    cmap = _cluster_map(cluster)
    pool1 = _pool_drives(cmap, 1)
    slow = _nodes_of(cmap, pool1)[0]
    seed = int(os.environ.get("KVTIER_TEST_SEED", "1"))
    load = workload.Workload(cluster.info, cluster.user_security(), seed=seed)
    load.start()
    try:
        time.sleep(WARM_S)  # the workload's length before the drain, not a readiness wait
        in_pool1 = len({Path(m).parent.name for m in _objects_on(cluster, pool1, load.bucket)})
        cluster.impair(slow, delay_ms=100, loss=0.01)
        load.fault_started()
        started = time.monotonic()
        before = sum(load.report.operations.values())
        progress = _drain(cluster)
        drain_s = time.monotonic() - started
        time.sleep(max(0.0, FAULT_S - drain_s))  # the workload goes on under the impairment
        during = sum(load.report.operations.values()) - before
        cluster.unimpair(slow)
        load.fault_ended()
        load.report.ready_s = cluster.wait_ready()
        epoch = _remove(cluster)
        time.sleep(AFTER_S)  # the workload runs on after the pool is gone
    finally:
        load.stop()
    load.verify()
    left = _objects_on(cluster, pool1, load.bucket)
    last = progress[-1]
    ends = [p for p in progress if p.done]  # each run's last message: its totals
    moved = sum(p.objects_moved for p in ends)
    report = load.report
    summary = {
        "slow_node": slow, "objects_in_pool1_at_start": in_pool1, "drain_s": round(drain_s, 1),
        "drain_runs": len(ends), "passes": sum(p.passes for p in ends), "objects_moved": moved,
        "bytes_moved": sum(p.bytes_moved for p in ends),
        "objects_dropped": sum(p.objects_dropped for p in ends),
        "errors": sum(p.errors for p in ends), "last_error": last.last_error,
        "removed_at_epoch": epoch, "objects_left_in_pool1": len(left),
    }  # fmt: skip
    request.node.user_properties.append(("fault_report", {**report.as_dict(), **summary}))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            line = {"scenario": NAME, "duration": "full", "fault_s": FAULT_S, "seed": seed,
                    "row": report.row(NAME), **report.as_dict(), **summary}  # fmt: skip
            results.write(json.dumps(line) + "\n")
    assert in_pool1 > 0, "nothing to drain: no object landed in pool 1"
    assert (last.done, last.drained) == (True, True), last
    assert any(not p.done for p in progress), "no progress before the end"
    assert moved > 0, ends
    assert left == []
    assert during > 0, "the workload made no progress during the fault"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert sum(report.failed.values()) == 0, report.failed  # as the slow datanode scenario
