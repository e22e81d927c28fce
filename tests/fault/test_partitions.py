"""Partitions that cut one service off from some of its peers only (issue 16), under the steady
mixed workload: 0 wrong bytes, 0 lost acknowledged writes, and each side's documented policy.

- A kvcache node partitioned from the gateway (the durable tier), not from clients or etcd,
  with one KV namespace write-back and one write-through (a 2 MiB arena: blocks are evicted,
  hence spilled, within seconds). KV puts and gets on DRAM go on; spills and uploads fail and
  are retried (a write-back victim's until the gateway answers again: its only copy); a DRAM
  miss of a block that lives only in the durable tier reads as a clean miss
  (`read_through_timeout_s` 1 s, under the clients' 2 s); after the heal the queued spills
  drain and every acknowledged block reads back exact. *Acknowledged* is a put that answered
  STORED for the key: in write-back that means the block is in the node's DRAM (the durable
  copy comes only when it is evicted); in write-through the block is in DRAM and its upload
  queued, or, once puts wait for their upload, the upload committed. The check holds under
  either: no node is lost here, so every acknowledged block of both namespaces must read back
  exact after the heal (from DRAM, the spill buffer or the durable tier); a put refused or
  timed out during the partition is not acknowledged and never read back.
- Two gateways: gateway-1 partitioned from etcd and the metadata service, gateway-2 from one
  datanode, an S3 workload through each. The policy (ARCHITECTURE.md, "Failure model": etcd
  and the metadata service down): the cut-off gateway serves object reads, writes and listings
  of the buckets it knows (its watched records) and refuses what needs etcd or the metadata
  service with 503 ServiceUnavailable, nothing created: creating a bucket, and any request to a
  bucket created after it was cut off (it cannot tell that bucket from a missing one, so it
  never answers NoSuchBucket for it). Every object acknowledged through one gateway reads back
  exact through the other.

Short (6 s faults) by default, in CI; `-m fault_full` for 60 s faults. The two-gateway short
version is over CI's time budget: it runs with `-m slow`.
KVTIER_FAULT_RESULTS=FILE appends each run's reports as JSON lines (docs/reliability.md).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config

import kvtier
from kvtier import kv_stats
from tests.fault import harness, workload

pytestmark = pytest.mark.integration

DURATIONS = [
    pytest.param("short", id="short", marks=pytest.mark.timeout(300)),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(480)]),
]
FAULT_S = {"short": 6.0, "full": 60.0}
AFTER_S = {"short": 3.0, "full": 15.0}
#: A 2 MiB arena (128 blocks of 16 KiB) of 256 KiB pages: the puts (12 blocks each, write-back;
#: 4, write-through) fill it within seconds, so blocks are evicted (write-back: spilled) all
#: along. A read-through gives up after 1 s, under the clients' 2 s deadline
#: (docs/kvcache.md), so a sick durable tier costs misses only.
KV_ARGS = ("--arena-bytes=2097152", "--page-bytes=262144", "--read-through-timeout-s=1")
KV_PUT_BLOCKS = 12
#: Write-back blocks put before the fault: 1.5 arenas, so many were evicted (and spilled) already.
WARM_BLOCKS = 192
#: Every block is an object in the durable tier (8 shards, each a file of 2 tmpfs pages): the
#: full run writes about 6000 beside the S3 workload, more than the default 96 MiB drives hold.
DRIVE_BYTES = 192 << 20
#: Seconds after the heal within which what the cut-off gateway refused works again.
RECOVER_S = 30.0
#: Seconds after the workload stopped (after the heal) within which the spill buffer empties.
DRAIN_S = 180.0

#: The two-gateway scenario's short version is over CI's budget (two gateways to start, and
#: the refusals it checks each wait out a 10 s metadata deadline): `-m slow` runs it.
GATEWAY_DURATIONS = [
    pytest.param("short", id="short", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
    DURATIONS[1],
]

Opener = Callable[..., harness.FaultCluster]


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.1)


def _seed() -> int:
    return int(os.environ.get("KVTIER_TEST_SEED", "1"))


def _record(
    request: pytest.FixtureRequest, name: str, duration: str, report: workload.Report,
    **extra: object,
) -> None:  # fmt: skip
    """The report on the test item and, with KVTIER_FAULT_RESULTS, as a JSON line."""
    request.node.user_properties.append(("fault_report", {name: report.as_dict(), **extra}))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            line = {"scenario": name, "duration": duration, "fault_s": FAULT_S[duration],
                    "seed": _seed(), "row": report.row(name), **report.as_dict(),
                    **extra}  # fmt: skip
            results.write(json.dumps(line) + "\n")


def _ops(load: workload.Workload) -> int:
    return sum(load.report.operations.values())


def _failed(report: workload.Report, *prefixes: str) -> int:
    return sum(v for k, v in report.failed.items() if k.startswith(prefixes))


# -- a kvcache node partitioned from the gateway ----------------------------------------------


class NodeStats:
    """The kvcache node's durable-tier counters for the workloads' tenant (the admin's)."""

    def __init__(self, cluster: harness.FaultCluster) -> None:
        self.kv = kvtier.KVClient.connect(
            metadata=cluster.info["metadata_client"], namespace="fault-stats",
            transports=["tcp"], timeout_s=5.0, security=cluster.user_security(),
        )  # fmt: skip

    def get(self) -> kv_stats.KVStats:
        (stats,) = self.kv.stats().values()  # one kvcache node
        return stats

    def close(self) -> None:
        self.kv.close()


@pytest.mark.parametrize("duration", DURATIONS)
def test_kvcache_partitioned_from_gateway(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """kvcache-1 cut off from gateway-1 (the durable tier), not from clients or etcd, with a
    write-back and a write-through namespace under load: see the module docstring."""
    began = time.monotonic()
    cluster = open_cluster(kvcache_args=KV_ARGS, drive_bytes=DRIVE_BYTES)
    phases = {"started": round(time.monotonic() - began, 1)}
    info, user = cluster.info, cluster.user_security()
    back = workload.Workload(info, user, seed=_seed(), kv_durability="write_back",
                             kv_kept=True, kv_put_blocks=KV_PUT_BLOCKS)  # fmt: skip
    through = workload.Workload(info, user, seed=_seed() + 1, kv_durability="write_through",
                                kv_kept=True, s3=False)  # fmt: skip
    stats = NodeStats(cluster)
    loads = (back, through)
    for load in loads:
        load.start()
    try:
        # Warm: blocks already spilled (write-back victims) live only in the durable tier.
        _until(lambda: back.report.acknowledged >= 5 and len(through.kv_keys) >= 8
               and len(back.kv_keys) >= WARM_BLOCKS and stats.get().spilled >= 32, 60,
               "warm-up")  # fmt: skip
        spilled_before = stats.get().spilled
        phases["warm"] = round(time.monotonic() - began, 1)
        cluster.partition("kvcache-1", "gateway-1")
        for load in loads:
            load.fault_started()
        before = [_ops(load) for load in loads]
        misses_before = back.report.kv_misses
        time.sleep(FAULT_S[duration])  # the fault's length, not a readiness wait
        during = [_ops(load) - b for load, b in zip(loads, before, strict=True)]
        misses_during = back.report.kv_misses - misses_before
        at_heal = stats.get()
        cluster.heal("kvcache-1", "gateway-1")
        for load in loads:
            load.fault_ended()
        back.report.ready_s = through.report.ready_s = cluster.wait_ready()
        time.sleep(AFTER_S[duration])  # the workload runs on after the heal
    finally:
        for load in loads:
            load.stop()
    # Evictions and uploads go on while the workload runs: the buffer empties once it stops.
    stopped = time.monotonic()
    _until(lambda: stats.get().spill_queue_bytes == 0, DRAIN_S, "the spill buffer drained")
    drained_s = time.monotonic() - stopped
    phases["drained"] = round(time.monotonic() - began, 1)
    for load in loads:
        load.verify()
    after = stats.get()
    stats.close()
    phases["verified"] = round(time.monotonic() - began, 1)
    extra = {"spill_queue_bytes_at_heal": at_heal.spill_queue_bytes, "drained_s": drained_s,
             "spilled": after.spilled, "spill_failures": after.spill_failures,
             "read_through_misses_during_fault": misses_during, "phases": phases}  # fmt: skip
    _record(request, "kvcache-1 partitioned from the gateway, write-back", duration,
            back.report, **extra)  # fmt: skip
    _record(request, "kvcache-1 partitioned from the gateway, write-through (KV only)",
            duration, through.report, **extra)  # fmt: skip
    assert min(during) > 0, "the workload made no progress during the fault"
    assert at_heal.spill_queue_bytes > 0, "nothing was waiting for the durable tier: no fault?"
    assert misses_during > 0, "no DRAM miss asked the unreachable durable tier"
    for load in loads:
        assert load.report.wrong_bytes == []
        assert load.report.wrong_listings == []
        assert load.report.lost_acknowledged == []
        assert load.kv_settled_verified >= 8
    # Write-back: DRAM puts, gets and lookups go on; a durable-only block reads as a clean miss.
    assert _failed(back.report, "kv_") == 0, back.report.failed
    assert sum(back.report.failed.values()) == 0, back.report.failed  # S3 is not affected
    # Write-through uploads are given up (their puts refused); a write-back victim's never is.
    log = (cluster.state / "logs" / "kvcache-1.log").read_text(errors="replace")
    assert re.findall(r"gave up the put of .*, capacity\)", log) == []
    assert after.spilled >= spilled_before + at_heal.spill_queue_bytes // workload.KV_BLOCK_BYTES


# -- two gateways, one cut off from etcd and the metadata service ------------------------------


def _s3(info: dict[str, Any], address: str, attempts: int = 3) -> Any:
    return boto3.client(
        "s3", endpoint_url=f"https://{address}", region_name="us-east-1",
        aws_access_key_id=info["s3_access_key"], aws_secret_access_key=info["s3_secret_key"],
        verify=info["ca_file"],
        config=Config(s3={"addressing_style": "path"},
                      retries={"mode": "standard", "max_attempts": attempts},
                      connect_timeout=5, read_timeout=15),
    )  # fmt: skip


def _code(call: Callable[[], object]) -> str:
    """The S3 error code call raised ("" when it succeeded)."""
    try:
        call()
    except Exception as exc:
        return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", repr(exc)))
    return ""


class GatewayPolicy:
    """What the cut-off gateway refuses and serves, tried during the fault and after the heal."""

    def __init__(self, info: dict[str, Any]) -> None:
        cut_off, other = info["gateways_s3"]
        self.cut_off = _s3(info, cut_off, attempts=1)
        self.other = _s3(info, other)
        self.during: dict[str, str] = {}
        self.after: dict[str, str] = {}
        self.probe_s = 0.0
        self.recovered_s: dict[str, float] = {}

    def probe(self) -> None:
        """During the fault: a bucket cannot be created through the cut-off gateway; one
        created through the other is unknown to it (503, not NoSuchBucket)."""
        cut_off, other, new = self.cut_off, self.other, "made-during"
        started = time.monotonic()
        self.during = {"create through the other": _code(lambda: other.create_bucket(Bucket=new))}
        calls: dict[str, Callable[[], object]] = {
            "create through the cut-off gateway": lambda: cut_off.create_bucket(
                Bucket="made-cut-off"
            ),
            "put to the new bucket through the cut-off gateway": lambda: cut_off.put_object(
                Bucket=new, Key="k", Body=b"cut off"
            ),
            "put to the new bucket through the other": lambda: other.put_object(
                Bucket=new, Key="k", Body=b"other"
            ),
        }
        # At once: each call through the cut-off gateway waits out its metadata deadline.
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            codes = {name: pool.submit(_code, call) for name, call in calls.items()}
            self.during |= {name: code.result() for name, code in codes.items()}
        self.probe_s = time.monotonic() - started

    def check_after(self) -> None:
        """After the heal: nothing was created by the refused calls; the new bucket works
        through both. Each is tried until it answers as expected or RECOVER_S pass (the
        seconds it took are recorded)."""
        cut_off, other, new = self.cut_off, self.other, "made-during"

        def put() -> None:
            cut_off.put_object(Bucket=new, Key="k2", Body=b"healed")

        def read_back() -> None:
            assert other.get_object(Bucket=new, Key="k2")["Body"].read() == b"healed"
            assert cut_off.get_object(Bucket=new, Key="k")["Body"].read() == b"other"

        started = time.monotonic()
        checks: list[tuple[str, Callable[[], object], str]] = [
            ("refused bucket absent", lambda: other.head_bucket(Bucket="made-cut-off"), "404"),
            ("put to the new bucket through the cut-off gateway", put, ""),
            ("read back through both", read_back, ""),
        ]
        for name, call, expected in checks:
            code = _code(call)
            while code != expected and time.monotonic() - started < RECOVER_S:
                time.sleep(0.5)
                code = _code(call)
            self.after[name] = code
            self.recovered_s[name] = round(time.monotonic() - started, 1)


@pytest.mark.parametrize("duration", GATEWAY_DURATIONS)
def test_gateway_cut_off_from_etcd_and_metadata(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """gateway-1 partitioned from etcd and metadata-1, gateway-2 from datanode-4; S3 through
    both: see the module docstring."""
    began = time.monotonic()
    # Over tcp (the harness's default), so gateway-2's shard calls really cross the cut to
    # datanode-4: it leaves datanode-4 behind once the rest decide (fanout.until_decided).
    cluster = open_cluster(gateways=2)
    info = cluster.info
    through = [{**info, "gateway_s3": f"https://{a}"} for a in info["gateways_s3"]]
    loads = [
        workload.Workload(through[0], cluster.user_security(), seed=_seed(), bucket="fault-1"),
        workload.Workload(through[1], cluster.user_security(), seed=_seed() + 1,
                          bucket="fault-2"),
    ]  # fmt: skip
    cuts = [("gateway-1", "etcd"), ("gateway-1", "metadata-1"), ("gateway-2", "datanode-4")]
    policy = GatewayPolicy(info)
    phases = {"started": round(time.monotonic() - began, 1)}
    for load in loads:
        load.start()
    try:
        _until(lambda: all(x.report.acknowledged >= 5 and len(x.kv_keys) >= 8 for x in loads),
               60, "warm-up")  # fmt: skip
        phases["warm"] = round(time.monotonic() - began, 1)
        for a, b in cuts:
            cluster.partition(a, b)
        for load in loads:
            load.fault_started()
        before = [_ops(load) for load in loads]
        started = time.monotonic()
        policy.probe()  # its calls through gateway-1 outlast its lease (2 s): out of the map
        time.sleep(max(0.0, FAULT_S[duration] - (time.monotonic() - started)))
        during = [_ops(load) - b for load, b in zip(loads, before, strict=True)]
        for a, b in cuts:
            cluster.heal(a, b)
        for load in loads:
            load.fault_ended()
        ready_s = cluster.wait_ready()
        phases["ready"] = round(time.monotonic() - began, 1)
        policy.check_after()
        time.sleep(AFTER_S[duration])  # the workload runs on after the heal
    finally:
        for load in loads:
            load.stop()
    phases["stopped"] = round(time.monotonic() - began, 1)
    deadline = time.monotonic() + 60
    for i, load in enumerate(loads):
        load.report.ready_s = ready_s
        load.verify()
        load.verify_objects(loads[1 - i].s3, deadline)  # written through one, read through other
    names = ["gateway-1 cut off from etcd and metadata-1", "gateway-2 cut off from datanode-4"]
    for name, load in zip(names, loads, strict=True):
        _record(request, name, duration, load.report, policy_during=policy.during,
                policy_after=policy.after, probe_s=round(policy.probe_s, 1), phases=phases,
                recovered_s=policy.recovered_s,
                test_s=round(time.monotonic() - began, 1))  # fmt: skip
    assert min(during) > 0, "the workload made no progress during the fault"
    for load in loads:
        assert load.report.wrong_bytes == []
        assert load.report.wrong_listings == []
        assert load.report.lost_acknowledged == []
        assert _failed(load.report, "get:", "list:") == 0, load.report.failed
    # The cut-off gateway writes into the buckets it knows (its watched records).
    assert _failed(loads[0].report, "put:", "multipart:") == 0, loads[0].report.failed
    assert policy.during == {
        "create through the cut-off gateway": "ServiceUnavailable",
        "create through the other": "",
        "put to the new bucket through the cut-off gateway": "ServiceUnavailable",
        "put to the new bucket through the other": "",
    }
    assert policy.after == {
        "refused bucket absent": "404",
        "put to the new bucket through the cut-off gateway": "",
        "read back through both": "",
    }
