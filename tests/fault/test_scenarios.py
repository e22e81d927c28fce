"""Fault scenarios under a steady mixed workload (issue 16): 0 wrong bytes, 0 lost acknowledged
writes, each scenario's numbers recorded.

Each scenario runs short by default (a 6 s fault, in CI) and full behind `-m fault_full`
(a 60 s fault). KVTIER_FAULT_RESULTS=FILE appends each run's report as a JSON line (what
docs/reliability.md's table is made from). KVTIER_FAULT_KV_DURABILITY=none (or write_back) runs
the write-through scenario's strict check over another durability: it must then fail (lost
acknowledged blocks), the check's negative control.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.fault import harness, test_power_loss, workload

pytestmark = pytest.mark.integration

DURATIONS = [
    pytest.param("short", id="short"),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(480)]),
]
FAULT_S = {"short": 6.0, "full": 60.0}
AFTER_S = {"short": 3.0, "full": 15.0}

Opener = Callable[..., harness.FaultCluster]


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.1)


def _scenario(
    name: str,
    duration: str,
    cluster: harness.FaultCluster,
    inject: Callable[[], None],
    heal: Callable[[], None],
    request: pytest.FixtureRequest,
    *,
    kv_write_through: bool = False,
    on_heal: Callable[[int], None] | None = None,
) -> workload.Report:
    """Workload, warm-up, fault for FAULT_S, heal, ready, AFTER_S more, verify; the report.
    on_heal gets the count of acknowledged writes right after heal()."""
    control = os.environ.get("KVTIER_FAULT_KV_DURABILITY", "") if kv_write_through else ""
    load = workload.Workload(
        cluster.info, cluster.user_security(), seed=int(os.environ.get("KVTIER_TEST_SEED", "1")),
        kv_write_through=kv_write_through, kv_durability=control,
    )  # fmt: skip
    load.start()
    try:
        _until(lambda: load.report.acknowledged >= 5 and len(load.kv_keys) >= 8, 60, "warm-up")
        inject()
        load.fault_started()
        before = sum(load.report.operations.values())
        time.sleep(FAULT_S[duration])  # the fault's length, not a readiness wait
        during = sum(load.report.operations.values()) - before
        heal()
        if on_heal is not None:
            on_heal(load.report.acknowledged)  # what was acknowledged up to the heal
        load.fault_ended()
        load.report.ready_s = cluster.wait_ready()
        time.sleep(AFTER_S[duration])  # the workload runs on after the heal: recovery is measured
    finally:
        load.stop()
    load.verify()
    report = load.report
    request.node.user_properties.append(("fault_report", report.as_dict()))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            line = {"scenario": name, "duration": duration, "fault_s": FAULT_S[duration],
                    "seed": os.environ.get("KVTIER_TEST_SEED", ""),
                    "row": report.row(name), **report.as_dict()}  # fmt: skip
            results.write(json.dumps(line) + "\n")
    assert during > 0, "the workload made no progress during the fault"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert report.acknowledged > 5
    if kv_write_through:
        assert load.kv_settled_verified >= 8, "too few write-through blocks to mean anything"
    return report


@pytest.mark.parametrize("duration", DURATIONS)
def test_datanode_partitioned_from_gateway(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Reads decode from the other shards, writes reach their quorum without it."""
    cluster = open_cluster()
    report = _scenario(
        "datanode-2 partitioned from the gateway", duration, cluster,
        lambda: cluster.partition("gateway-1", "datanode-2"),
        lambda: cluster.heal("gateway-1", "datanode-2"), request,
    )  # fmt: skip
    assert sum(v for k, v in report.failed.items() if k.startswith("get:")) == 0


@pytest.mark.parametrize("duration", DURATIONS)
def test_slow_lossy_datanode(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """100 ms (± 10 ms, so packets reorder) and 1% loss on everything one datanode sends."""
    cluster = open_cluster()
    report = _scenario(
        "100 ms ± 10 ms + 1% loss on datanode-1", duration, cluster,
        lambda: cluster.impair("datanode-1", delay_ms=100, jitter_ms=10, loss=0.01),
        lambda: cluster.unimpair("datanode-1"), request,
    )  # fmt: skip
    assert sum(report.failed.values()) == 0


@pytest.mark.parametrize("duration", DURATIONS)
def test_kvcache_killed_under_load(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """SIGKILL one of two kvcache nodes: its blocks become misses (memory durability), never
    other bytes; objects are untouched; the node restarts with the same identity."""
    cluster = open_cluster(kvcache_nodes=2, dataplane_transports=harness.SAME_HOST_DATAPLANE)
    _scenario(
        "kvcache-1 SIGKILL, restarted after the fault", duration, cluster,
        lambda: cluster.signal("kvcache-1", signal.SIGKILL),
        lambda: cluster.restart("kvcache-1"), request,
    )  # fmt: skip


@pytest.mark.parametrize("duration", DURATIONS)
def test_kvcache_killed_under_write_through(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """SIGKILL one of two kvcache nodes while its namespace is write-through (every put is
    durable before it is acknowledged): no acknowledged block is lost, up to the instant of
    the kill — each reads back exact, through the surviving node (read-through) and after the
    restart."""
    cluster = open_cluster(kvcache_nodes=2, dataplane_transports=harness.SAME_HOST_DATAPLANE)
    _scenario(
        "kvcache-1 SIGKILL under write-through, restarted after the fault", duration, cluster,
        lambda: cluster.signal("kvcache-1", signal.SIGKILL),
        lambda: cluster.restart("kvcache-1"), request, kv_write_through=True,
    )  # fmt: skip


@pytest.mark.parametrize("duration", DURATIONS)
def test_gateway_partitioned_from_etcd(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """The gateway keeps its map and serves bucket records from its watch cache: object
    traffic continues."""
    cluster = open_cluster()
    report = _scenario(
        "gateway partitioned from etcd", duration, cluster,
        lambda: cluster.partition("gateway-1", "etcd"),
        lambda: cluster.heal("gateway-1", "etcd"), request,
    )  # fmt: skip
    assert sum(v for k, v in report.failed.items() if k.startswith(("get:", "list:"))) == 0


@pytest.mark.parametrize("duration", DURATIONS)
def test_etcd_stopped(open_cluster: Opener, duration: str, request: pytest.FixtureRequest) -> None:
    """etcd SIGSTOPped (it neither answers nor closes connections) for the outage: 0 failed
    reads (object GET and LIST, KV get and lookup) throughout."""
    cluster = open_cluster(dataplane_transports=harness.SAME_HOST_DATAPLANE)
    report = _scenario(
        "etcd SIGSTOP", duration, cluster,
        lambda: cluster.signal("etcd", signal.SIGSTOP),
        lambda: cluster.signal("etcd", signal.SIGCONT), request,
    )  # fmt: skip
    assert (
        sum(
            v
            for k, v in report.failed.items()
            if k.startswith(("get:", "list:", "kv_get:", "kv_lookup:"))
        )
        == 0
    )


@pytest.mark.parametrize("duration", DURATIONS)
def test_every_drive_full(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Every drive of every datanode filled to a real ENOSPC for the fault, then freed: writes
    fail with a typed error and store nothing half-way (no wrong listing, no lost or changed
    acknowledged object), reads and listings go on, no node exits (each drive's index flush,
    journal and sweeps fail and retry), writes work again once space is back, and after a heal
    (writes acknowledged while some drives were still full are short of their shards there) a
    dry-run heal finds every acknowledged object whole on every drive."""
    cluster = open_cluster(dataplane_transports=harness.SAME_HOST_DATAPLANE)
    datanodes = [n for n in cluster.node_names() if n.startswith("datanode-")]
    drives = [(n, i) for n in datanodes for i in range(cluster.drives_per_datanode)]
    acknowledged_at_heal: list[int] = []
    report = _scenario(
        "every drive full (ENOSPC), then freed", duration, cluster,
        lambda: _each(cluster.fill_drive, drives), lambda: _each(cluster.free_drive, drives),
        request,
        on_heal=acknowledged_at_heal.append,
    )  # fmt: skip
    exited = [n for n in cluster.node_names() if n != "etcd" and not cluster.children[n].running()]
    assert exited == [], "a node exited while its drives were full"
    writes = ("put:", "multipart:")
    assert any(k.startswith(writes) for k in report.failed), (
        f"no write failed while every drive was full: {dict(report.failed)}"
    )
    assert {k for k in report.failed if not k.startswith(writes)} == set(), dict(report.failed)
    assert all(k.endswith(":ServiceUnavailable") for k in report.failed), dict(report.failed)
    assert report.acknowledged > acknowledged_at_heal[0], "no write acknowledged after the fault"
    # Writes acknowledged while some drives were still full are queued for healing: heal
    # the bucket (the workload's), then a dry run finds every object whole.
    healed = test_power_loss.heal(cluster, "fault", dry_run=False)
    assert healed["unrecoverable"] == 0, healed
    checked = test_power_loss.heal(cluster, "fault", dry_run=True)
    assert checked["unrecoverable"] == 0, checked
    assert checked["healthy"] == checked["scanned"], checked


def _each(action: Callable[[str, int], object], drives: list[tuple[str, int]]) -> None:
    for node, index in drives:
        action(node, index)
