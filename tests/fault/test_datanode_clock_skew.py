"""Clock skew on the datanodes (issue 16): datanode-1's wall clock 10 min ahead, datanode-2's
10 min behind, under the steady mixed workload, with 2 gateways overwriting keys as well.

What a datanode's own clock is used for (docs/reliability.md, "Clock skew on the datanodes"):
`time.time_ns()` only bounds how far ahead of it a version's stamp may be (30 min,
services.datanode.shardmeta.stamp; stamps come from the gateways' hybrid clocks), and ages the
staged writes a dead process left (`sweep_tmp`: file mtimes against the same clock, writes in
progress skipped). Nothing it stores, lists, heals or expires is stamped by it. (Its TLS stack
checks certificates against its clock too: tests/unit/test_pki_clock_skew.py; this harness skews
`time.time_ns()` only.) So the checks:
  - ±10 min: the workload (fresh keys: S3 PUT, GET, LIST, multipart; KV) and the two-gateway
    checker of tests/fault/test_clock_skew.py (each key overwritten, deleted, copied through
    alternate gateways and read back through the other) together: 0 failed operations, 0 wrong
    bytes, 0 lost acknowledged writes, and a dry-run heal afterwards finds every object whole on
    every drive (no skewed datanode silently refused a shard).
  - past the bound: datanode-1 40 min behind refuses every stamp (ClockSkew) yet writes meet
    their quorum on the other drives, and the heal says which objects lack its shards; with
    datanode-2 40 min behind too, a PUT misses the write quorum and answers 503
    ServiceUnavailable naming the refusal, earlier objects still byte-exact. (The refused
    version stays on the 4 drives that took it and reads back: recorded, not asserted; an open
    item in docs/reliability.md.)
Short by default (in CI), `-m fault_full` for 2 minutes of operations.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from tests.fault import harness, test_clock_skew, test_power_loss, workload

pytestmark = pytest.mark.integration

SKEW_S = 600.0
#: Past the datanodes' 30 min bound (services.datanode.shardmeta.MAX_FUTURE_MTIME_NS).
BEYOND_S = 2400.0
DURATIONS = [
    pytest.param("short", id="short", marks=[pytest.mark.timeout(300)]),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(600)]),
]
RUN_S = {"short": 10.0, "full": 120.0}
#: Every write of the workload is a new key: 2 minutes of it (about 250 MiB of objects, 2x on
#: the drives) fill the harness's default 96 MiB drives (ENOSPC, measured).
DRIVE_BYTES = {"short": 96 << 20, "full": 256 << 20}
SEED = int(os.environ.get("KVTIER_TEST_SEED", "1"))


def _record(name: str, duration: str, line: dict[str, Any]) -> None:
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            results.write(json.dumps({"scenario": name, "duration": duration, **line}) + "\n")


@pytest.mark.parametrize("duration", DURATIONS)
def test_datanodes_ten_minutes_apart(
    open_cluster: Any, duration: str, request: pytest.FixtureRequest
) -> None:
    cluster: harness.FaultCluster = open_cluster(
        gateways=2,
        clock_offsets={"datanode-1": SKEW_S, "datanode-2": -SKEW_S},
        drive_bytes=DRIVE_BYTES[duration],
        dataplane_transports=harness.SAME_HOST_DATAPLANE,
    )
    load = workload.Workload(cluster.info, cluster.user_security(), seed=SEED)
    checker = test_clock_skew.SkewChecker(cluster.info, seed=SEED)
    started = time.monotonic()
    load.start()
    try:
        load.fault_started()  # skewed from the start: the whole run is "during the fault"
        checker.run(RUN_S[duration])
        load.fault_ended()
    finally:
        load.stop()
    run_s = time.monotonic() - started
    checker.verify()
    load.verify()
    buckets = (load.bucket, "skew")
    heals = {b: test_power_loss.heal(cluster, b, dry_run=True) for b in buckets}
    name = "datanode-1 at +10 min, datanode-2 at -10 min"
    report, versions = load.report, checker.report
    request.node.user_properties.append(
        ("fault_report", {"workload": report.as_dict(), "overwrites": versions.as_dict()})
    )
    _record(name, duration, {
        "run_s": round(run_s, 1), "row": report.row(name), "overwrites_row": versions.row(name),
        "workload": report.as_dict(), "overwrites": versions.as_dict(), "heal_check": heals,
    })  # fmt: skip
    assert report.wrong_bytes == versions.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == versions.lost_acknowledged == []
    assert sum(report.failed.values()) == 0, report.failed
    assert sum(versions.failed.values()) == 0, versions.failed
    assert report.acknowledged > 5
    assert versions.acknowledged >= 2 * test_clock_skew.KEYS
    for bucket, counts in heals.items():  # every shard on every drive, skewed ones included
        assert counts["healthy"] == counts["scanned"] > 0, (bucket, counts)


@pytest.mark.timeout(240)
def test_datanodes_past_the_bound(open_cluster: Any, request: pytest.FixtureRequest) -> None:
    """One datanode 40 min behind: its drives refuse every stamp, writes still meet their
    quorum (and the heal finds them short of its shards); two: every PUT answers a typed 503
    (ServiceUnavailable, naming the refused stamp), what was stored before reads byte-exact."""
    cluster: harness.FaultCluster = open_cluster(
        clock_offsets={"datanode-1": -BEYOND_S}, dataplane_transports=harness.SAME_HOST_DATAPLANE
    )
    s3 = _s3_once(cluster.info)
    s3.create_bucket(Bucket="beyond")
    small, staged = workload.body(1, 40 << 10), workload.body(2, 1536 << 10)
    s3.put_object(Bucket="beyond", Key="small", Body=small)
    s3.put_object(Bucket="beyond", Key="staged", Body=staged)
    one_behind = test_power_loss.heal(cluster, "beyond", dry_run=True)
    assert one_behind["scanned"] == 2, one_behind
    assert one_behind["healthy"] == 0, one_behind  # both short of datanode-1's shards
    assert "ahead of this datanode's clock" in _log(cluster, "gateway-1")  # which drive, how far

    cluster.clock_offsets["datanode-2"] = -BEYOND_S
    cluster.restart("datanode-2")  # waits until the cluster is ready
    refused, readable = [], []
    for key, data in (("new-small", small), ("new-staged", staged)):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            s3.put_object(Bucket="beyond", Key=key, Body=data)
        error = caught.value.response["Error"]
        refused.append(error["Code"])
        assert "refused the stamp" in error["Message"], error
        # The 4 drives whose clocks took the stamp (the data-shard count: readable) had it
        # removed again when the commit missed its quorum (services/gateway/commits.py).
        readable += [key] if _readable(s3, "beyond", key) else []
    assert refused == ["ServiceUnavailable"] * 2, refused
    assert readable == [], readable
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket="beyond").get("Contents", [])}
    assert listed == {"small", "staged"}, listed
    for key, data in (("small", small), ("staged", staged)):
        got = s3.get_object(Bucket="beyond", Key=key)["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), key
    line = {"one_behind_heal_check": one_behind, "two_behind_put": refused,
            "refused_but_readable": readable}  # fmt: skip
    request.node.user_properties.append(("fault_report", line))
    _record("datanode-1 and datanode-2 at -40 min (past the bound)", "short", line)


def _s3_once(info: dict[str, Any]) -> Any:
    """A boto3 client that makes one attempt per call: each refusal is the gateway's own."""
    return boto3.client(
        "s3", endpoint_url=info["gateway_s3"], region_name="us-east-1",
        aws_access_key_id=info["s3_access_key"], aws_secret_access_key=info["s3_secret_key"],
        verify=info["ca_file"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=5, read_timeout=30),
    )  # fmt: skip


def _readable(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchKey":
            raise
        return False
    return True


def _log(cluster: harness.FaultCluster, node: str) -> str:
    return (cluster.state / "logs" / f"{node}.log").read_text(errors="replace")
