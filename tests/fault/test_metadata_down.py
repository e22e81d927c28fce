"""The metadata service down under the steady mixed workload (issue 16).

metadata-1 (the only metadata node) is SIGKILLed for the outage and started again after it.
Nothing on the data path needs it: gateways serve bucket records from their watched copy
(`front.ObjectFront.bucket_info` falls back to it when the metadata service is away), users from
their watched user records, the map from their watch of etcd; kvcache nodes and datanodes never
call it; the KV SDK keeps its map when a refresh fails and its session token (15 min) until it
must renew it. What needs it fails with a typed error and works again once it is back: creating
a bucket (S3 503 ServiceUnavailable, nothing created), creating a user (UNAVAILABLE), a session
token from the metadata node (UNAVAILABLE; gateways issue tokens too and go on doing so).
What must go on without it is probed too: a KV client started during the outage (its map
endpoints the metadata node, then the gateway) puts and gets byte-exact, a heal of every bucket
completes (the gateway lists buckets from its watched records), S3 ListBuckets answers.

Asserted: 0 wrong bytes, 0 wrong listings, 0 lost acknowledged writes, 0 failed client
operations (reads, writes to the existing bucket, multipart, KV); the metadata operations fail
during the outage with those errors, and succeed after the restart: a bucket can be created
again within RECOVER_S of the cluster being ready (the gateway reconnects to the new
incarnation at once). Short (15 s outage) by default; `-m fault_full`: 60 s.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

import kvtier
from kvtier import errors, security
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from tests.fault import harness, workload

pytestmark = pytest.mark.integration

DURATIONS = [
    pytest.param("short", id="short", marks=pytest.mark.timeout(420)),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(600)]),
]
DOWN_S = {"short": 15.0, "full": 60.0}
#: Seconds after the cluster is ready again within which a bucket can be created.
RECOVER_S = 5.0
AFTER_S = {"short": 4.0, "full": 15.0}
NODE = "metadata-1"

Opener = Callable[..., harness.FaultCluster]


def _code(exc: BaseException) -> str:
    """The S3 error code, or the kvtier error's class name."""
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
    return str(code) if code else type(exc).__name__


class Probes:
    """The operations that need the metadata service, each tried and its outcome counted."""

    def __init__(self, cluster: harness.FaultCluster, s3: Any) -> None:
        self.cluster = cluster
        self.s3 = s3
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.serial = 0

    def run(self, phase: str) -> dict[str, str]:
        """Try each operation once; returns operation -> "ok" or its error."""
        self.serial += 1
        bucket = f"md-{phase}-{self.serial}"
        results = {
            "create_bucket": self._try(lambda: self.s3.create_bucket(Bucket=bucket)),
            "create_user": self._try(lambda: asyncio.run(self._create_user())),
            "token_from_metadata": self._try(
                lambda: asyncio.run(self._token(self.cluster.info["metadata_client"]))
            ),
            "token_from_gateway": self._try(
                lambda: asyncio.run(self._token(self.cluster.info["gateway_grpc"]))
            ),
            "kv_client_started": self._try(lambda: asyncio.run(self._kv_client())),
            "heal_every_bucket": self._try(lambda: asyncio.run(self._heal())),
            "list_buckets": self._try(self.s3.list_buckets),
        }
        for op, outcome in results.items():
            self.outcomes[f"{phase}:{op}"][outcome] += 1
        return results

    def _try(self, call: Callable[[], object]) -> str:
        try:
            call()
        except Exception as exc:
            return _code(exc)
        return "ok"

    async def _create_user(self) -> None:
        client = metadata_client.MetadataClient(
            self.cluster.info["metadata"], security=self.cluster.operator_security(),
            timeout_s=5,
        )  # fmt: skip
        try:
            await client.create_user(tenant="mdprobe", display_name=f"probe {self.serial}")
        finally:
            await client.close()

    async def _kv_client(self) -> None:
        """A KV client started now, its map endpoints the metadata node, then the gateway:
        a put and a byte-exact get."""
        info = self.cluster.info
        key, block = b"md-probe-%d" % self.serial, os.urandom(4096)
        async with await kvtier.AsyncKVClient.connect(
            namespace="md-probe", metadata=[info["metadata_client"], info["gateway_grpc"]],
            security=self.cluster.user_security(), timeout_s=5.0,
        ) as client:  # fmt: skip
            assert await client.put_batch([key], [block]) == [kvtier.PutStatus.STORED]
            out = bytearray(len(block))
            assert await client.get_batch([key], [out]) == [len(block)]
            assert bytes(out) == block

    async def _heal(self) -> None:
        """A heal of every bucket (the admin user; a prefix no object has: the walk over every
        bucket's listing, no object read)."""
        async with gateway_client.AdminServiceClient(
            self.cluster.info["gateway_grpc"], security=self.cluster.user_security()
        ) as admin:
            last = [p async for p in admin.heal(prefix="md-probe-none/", dry_run=True)]
        assert last
        assert last[-1].done

    async def _token(self, address: str) -> None:
        # A source of its own: the process's shared one caches its token.
        await security.TokenSource(self.cluster.user_security(), address, timeout_s=5).token()


@pytest.mark.parametrize("duration", DURATIONS)
def test_metadata_service_down(
    open_cluster: Opener, duration: str, request: pytest.FixtureRequest
) -> None:
    """Object and KV traffic goes on without the metadata service; metadata operations fail
    typed and recover."""
    cluster = open_cluster(dataplane_transports=harness.SAME_HOST_DATAPLANE)
    seed = int(os.environ.get("KVTIER_TEST_SEED", "1"))
    load = workload.Workload(cluster.info, cluster.user_security(), seed=seed)
    probes = Probes(cluster, load.s3_client())
    load.start()
    try:
        deadline = time.monotonic() + 60
        while not (load.report.acknowledged >= 5 and len(load.kv_keys) >= 8):
            assert time.monotonic() < deadline, "warm-up: not within 60s"
            time.sleep(0.1)
        assert set(probes.run("before").values()) == {"ok"}, probes.outcomes
        cluster.signal(NODE, signal.SIGKILL)
        load.fault_started()
        down_at = time.monotonic()
        before = sum(load.report.operations.values())
        during_probes = probes.run("down")
        time.sleep(max(0.0, DOWN_S[duration] - (time.monotonic() - down_at)))  # the outage
        during_probes_late = probes.run("down")
        during = sum(load.report.operations.values()) - before
        restarted = time.monotonic()
        cluster.restart(NODE)
        load.fault_ended()
        load.report.ready_s = time.monotonic() - restarted
        ready_at = time.monotonic()
        while (after := probes.run("after"))["create_bucket"] != "ok":  # time to recover
            assert time.monotonic() - restarted < 60, f"metadata ops did not recover: {after}"
            time.sleep(0.2)
        metadata_recovery_s = time.monotonic() - restarted
        after_ready_s = time.monotonic() - ready_at
        time.sleep(AFTER_S[duration])  # the workload runs on after the restart
    finally:
        load.stop()
    load.verify()
    refused_bucket = probes.s3.list_buckets()["Buckets"]
    report = load.report
    name = "metadata service SIGKILL, restarted after the fault"
    line = {"scenario": name, "duration": duration, "fault_s": DOWN_S[duration],
            "row": report.row(name), **report.as_dict(),
            "metadata_ops": {k: dict(v) for k, v in probes.outcomes.items()},
            "metadata_recovery_s": round(metadata_recovery_s, 2),
            "metadata_recovery_after_ready_s": round(after_ready_s, 2)}  # fmt: skip
    request.node.user_properties.append(("fault_report", line))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            results.write(json.dumps(line) + "\n")
    assert during > 0, "the workload made no progress during the outage"
    assert report.wrong_bytes == []
    assert report.wrong_listings == []
    assert report.lost_acknowledged == []
    assert report.acknowledged > 5
    assert dict(report.failed) == {}, f"failed client operations: {dict(report.failed)}"
    for probe in (during_probes, during_probes_late):
        assert probe == {
            "create_bucket": "ServiceUnavailable",
            "create_user": errors.Unavailable.__name__,
            "token_from_metadata": errors.Unavailable.__name__,
            "token_from_gateway": "ok",
            "kv_client_started": "ok",
            "heal_every_bucket": "ok",
            "list_buckets": "ok",
        }, probes.outcomes
    assert set(after.values()) == {"ok"}, after
    # The gateway's channel to the dead incarnation sits in gRPC's reconnect backoff (~15 s
    # after a minute of refused connects): a restarted metadata node must get a new one.
    assert after_ready_s < RECOVER_S, probes.outcomes
    names = {b["Name"] for b in refused_bucket}
    assert not any(n.startswith("md-down-") for n in names), f"a refused create left {names}"
