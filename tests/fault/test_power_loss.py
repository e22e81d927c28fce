"""Simulated power loss on a datanode under the steady mixed workload (issue 16).

datanode-1's two drives are ext4 filesystems on loop devices (tests/fault/powercut.py). Under
load, its power is cut: the process is frozen, its filesystems shut down without flushing (every
write not yet synced is discarded), the process SIGKILLed. After a while the drives come back
from their images (ext4 replays its own journal), the node starts with a new boot id (a
reboot) and the cluster goes on.

Asserted: the cut really discarded unsynced writes (meta files the process had written are gone
or empty on the image: not a mere SIGKILL); at start the datanode replayed its journal and
rebuilt each drive's listing index (the `index.clean` marker was absent and the boot id new);
0 wrong bytes, 0 wrong listings, 0 lost acknowledged writes (every acknowledged object read back
byte-exact and listed); after `AdminService.Heal` every object is healthy on every drive (a dry
run verifies each drive's copy and blocks) and each cut drive's index lists exactly the objects
whose meta files it holds. Short by default; `-m fault_full` runs longer before, during and
after the cut (the kernel's own writeback, 30 s, then has time to write some unsynced data).

The second scenario cuts every datanode at once (the whole storage tier): no copy is up to
heal from, so what survives is exactly what the datanodes synced before acknowledging.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtier.clients import gateway as gateway_client
from services.datanode import shards
from tests.fault import harness, powercut, workload

pytestmark = pytest.mark.integration

DURATIONS = [
    pytest.param("short", id="short", marks=pytest.mark.timeout(420)),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(600)]),
]
#: Load before the cut: unsynced state piles up. The drives never commit on a timer
#: (powercut.MOUNT_OPTIONS) and the kernel writes back nothing younger than 30 s, so in the
#: short run whatever the datanode did not sync itself is still unsynced at the cut, however
#: long the load ran: seconds more of it add objects, not a harder cut.
BEFORE_S = {"short": 4.0, "full": 40.0}
OFF_S = {"short": 4.0, "full": 20.0}  # twice the lease TTL: the node leaves the map meanwhile
AFTER_S = {"short": 2.0, "full": 15.0}
NODE = "datanode-1"
HEAL_COUNTS = ("scanned", "healthy", "healed", "unrecoverable", "skipped", "shards_healed")

Opener = Callable[..., harness.FaultCluster]


@pytest.fixture
def power_host(fault_host: None) -> None:
    """Skips where drives cannot lose power here (no loop devices, ext4, unshare)."""
    reason = powercut.missing()
    if reason:
        pytest.skip(f"power cut: {reason}")


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.1)


def heal(cluster: harness.FaultCluster, bucket: str, *, dry_run: bool) -> dict[str, int]:
    """AdminService.Heal of bucket through gateway-1; the last progress message's counts."""

    async def run() -> dict[str, int]:
        client = gateway_client.AdminServiceClient(
            f"{cluster.address('gateway-1')}:{harness.GRPC_PORT}",
            security=cluster.operator_security(), timeout_s=30,
        )  # fmt: skip
        try:
            async with asyncio.timeout(120):
                last = None
                async for progress in client.heal(bucket, dry_run=dry_run):
                    last = progress
        finally:
            await client.close()
        assert last is not None, "the heal sent nothing"
        assert last.done, "the heal did not finish"
        return {f: getattr(last, f) for f in HEAL_COUNTS}

    return asyncio.run(run())


def index_mismatch(drive: Path) -> list[str]:
    """Objects whose meta file the drive holds but its listing index lacks, and index entries
    without a meta file (bucket/key-hash), user buckets only."""
    on_disk = {
        (meta.parts[-4], meta.parts[-2])
        for meta in (drive / "objects").glob("*/*/*/meta")
        if not meta.parts[-4].startswith(".")
    }
    db = sqlite3.connect(f"file:{drive / shards.INDEX_FILE}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT bucket, key FROM objects").fetchall()
    finally:
        db.close()
    indexed = {
        (bucket, hashlib.sha256(bytes(key)).hexdigest())
        for bucket, key in rows
        if not bucket.startswith(".")
    }
    return [f"not indexed {b}/{h}" for b, h in sorted(on_disk - indexed)] + [
        f"indexed without meta {b}/{h}" for b, h in sorted(indexed - on_disk)
    ]


def _warm_up(load: workload.Workload, duration: str) -> int:
    """Until the workload has acknowledged writes and KV keys, then BEFORE_S of load; the
    acknowledged count then."""
    _until(lambda: load.report.acknowledged >= 5 and len(load.kv_keys) >= 8, 60, "warm-up")
    time.sleep(BEFORE_S[duration])  # load before the cut, not a readiness wait
    return load.report.acknowledged


def _record(
    request: pytest.FixtureRequest, name: str, duration: str, report: workload.Report,
    extra: dict[str, object],
) -> None:  # fmt: skip
    """Attach the run's report to the test and append it to KVTIER_FAULT_RESULTS when set."""
    line = {"scenario": name, "duration": duration, "row": report.row(name),
            **report.as_dict(), **extra}  # fmt: skip
    request.node.user_properties.append(("fault_report", line))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            results.write(json.dumps(line) + "\n")


@pytest.mark.parametrize("duration", DURATIONS)
def test_datanode_power_loss(
    power_host: None, open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Power cut on datanode-1 under load: nothing acknowledged is lost or changed; the node
    recovers its journal and index and heals back to whole."""
    cluster = open_cluster(power_nodes=(NODE,), dataplane_transports=harness.SAME_HOST_DATAPLANE)
    seed = int(os.environ.get("KVTIER_TEST_SEED", "1"))
    load = workload.Workload(cluster.info, cluster.user_security(), seed=seed)
    log = cluster.state / "logs" / f"{NODE}.log"
    load.start()
    try:
        acknowledged_before = _warm_up(load, duration)
        load.fault_started()
        cut = powercut.cut(cluster, NODE)
        offset = log.stat().st_size
        before = sum(load.report.operations.values())
        time.sleep(OFF_S[duration])  # the node stays off this long
        during = sum(load.report.operations.values()) - before
        started = time.monotonic()
        powercut.power_on(cluster, NODE, cut)
        load.fault_ended()
        load.report.ready_s = time.monotonic() - started
        time.sleep(AFTER_S[duration])  # the workload runs on after the restart
    finally:
        load.stop()
    load.verify()
    healed = heal(cluster, load.bucket, dry_run=False)
    checked = heal(cluster, load.bucket, dry_run=True)
    boot = log.read_text(errors="replace")[offset:]
    replayed = [int(n) for n in re.findall(r"(\d+) journal records replayed", boot)]
    rebuilt = re.findall(r"index rebuilt, (\d+) objects", boot)
    mismatches = {str(d.mountpoint): index_mismatch(d.mountpoint)
                  for d in cluster.power_drives[NODE]}  # fmt: skip
    report = load.report
    extra = {
        "acknowledged_before_cut": acknowledged_before,
        "metas_before_cut": cut.count(),
        "metas_discarded": cut.discarded(),
        "files_discarded": cut.discarded(r"."),
        "journal_records_replayed": replayed,
        "index_rebuilt_objects": [int(n) for n in rebuilt],
        "heal": healed,
        "heal_check": checked,
    }
    _record(request, f"{NODE} power loss", duration, report, extra)
    assert during > 0, "the workload made no progress while the node was off"
    assert cut.discarded() > 0, f"the power cut discarded no meta file: {extra}"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert report.acknowledged > acknowledged_before > 5
    assert len(rebuilt) == cluster.drives_per_datanode, f"index rebuilt per drive: {boot[-3000:]}"
    assert sum(replayed) > 0, f"no journal replayed: {boot[-3000:]}"
    assert healed["unrecoverable"] == 0, healed
    assert checked["unrecoverable"] == 0, checked
    assert checked["healthy"] == checked["scanned"] >= len(load.objects), (healed, checked)
    assert mismatches == {d: [] for d in mismatches}


@pytest.mark.parametrize("duration", DURATIONS)
def test_every_datanode_loses_power(
    power_host: None, open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Power cut on every datanode at once under load (the whole storage tier: a rack, a
    building): nothing acknowledged is lost or changed, though no drive kept anything unsynced
    and no other copy was up to heal from; writes fail while the tier is off and work again
    once it is back; every drive recovers its journal and index and the heal finds nothing
    to repair that it cannot."""
    nodes = [f"datanode-{i}" for i in range(1, 5)]
    cluster = open_cluster(power_nodes=tuple(nodes),
                           dataplane_transports=harness.SAME_HOST_DATAPLANE)  # fmt: skip
    seed = int(os.environ.get("KVTIER_TEST_SEED", "1"))
    load = workload.Workload(cluster.info, cluster.user_security(), seed=seed)
    logs = {n: cluster.state / "logs" / f"{n}.log" for n in nodes}
    load.start()
    try:
        acknowledged_before = _warm_up(load, duration)
        load.fault_started()
        cuts = powercut.cut_all(cluster, nodes)
        offsets = {n: log.stat().st_size for n, log in logs.items()}
        time.sleep(OFF_S[duration])  # the tier stays off this long
        started = time.monotonic()
        powercut.power_on_all(cluster, cuts)
        load.fault_ended()
        load.report.ready_s = time.monotonic() - started
        time.sleep(AFTER_S[duration] + 3)  # the workload runs on after the restart
    finally:
        load.stop()
    load.verify()
    healed = heal(cluster, load.bucket, dry_run=False)
    checked = heal(cluster, load.bucket, dry_run=True)
    boots = {n: log.read_text(errors="replace")[offsets[n] :] for n, log in logs.items()}
    replayed = {n: sum(int(x) for x in re.findall(r"(\d+) journal records replayed", b))
                for n, b in boots.items()}  # fmt: skip
    rebuilt = {n: len(re.findall(r"index rebuilt, (\d+) objects", b)) for n, b in boots.items()}
    mismatches = {str(d.mountpoint): index_mismatch(d.mountpoint)
                  for n in nodes for d in cluster.power_drives[n]}  # fmt: skip
    report = load.report
    name = "every datanode loses power"
    extra = {
        "acknowledged_before_cut": acknowledged_before,
        "metas_before_cut": sum(c.count() for c in cuts.values()),
        "metas_discarded": sum(c.discarded() for c in cuts.values()),
        "journal_records_replayed": replayed,
        "heal": healed,
        "heal_check": checked,
    }
    _record(request, name, duration, report, extra)
    assert sum(c.discarded() for c in cuts.values()) > 0, f"the cut discarded nothing: {extra}"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert report.acknowledged > acknowledged_before > 5, "no acknowledged write after power-on"
    # Failures only while the tier was off or coming back (boto3's retries end within that).
    assert report.recovery_s < 10, f"writes still failed {report.recovery_s:.1f}s after ready"
    assert rebuilt == {n: cluster.drives_per_datanode for n in nodes}, boots
    assert sum(replayed.values()) > 0, f"no journal replayed: {extra}"
    assert healed["unrecoverable"] == 0, healed
    assert checked["unrecoverable"] == 0, checked
    assert checked["healthy"] == checked["scanned"] >= len(load.objects), (healed, checked)
    assert mismatches == {d: [] for d in mismatches}
