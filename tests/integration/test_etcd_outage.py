"""etcd away (issue 16's first scenario, the short version): object reads, writes and listings
of the buckets a gateway knows go on, byte-exact, while etcd is stopped (SIGSTOP: it neither
answers nor closes connections, the worst case), and everything works after it resumes.

KVTIER_ETCD_OUTAGE_S sets the outage (default 8 s here; the fault suite's full run uses 60).
Before the gateway served bucket records from its etcd watch, each request asked the metadata
service (through a 2 s cache), so object traffic stopped about 2 s into an outage.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

import pytest

from tests.integration import s3_cluster
from tests.integration.s3_cluster import own_s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("KVTIER_ETCD_OUTAGE_S", "8"))


def _body(i: int, size: int) -> bytes:
    seed = hashlib.sha256(b"outage %d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


def test_object_traffic_goes_on_while_etcd_is_stopped(
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
) -> None:
    info = s3_cluster_fixture
    s3 = s3_cluster.client(info, read_timeout=30, connect_timeout=10)
    s3.create_bucket(Bucket="outage")
    before = {f"before-{i}": _body(i, size) for i, size in enumerate((4096, 300_000, 2 << 20))}
    for key, data in before.items():
        s3.put_object(Bucket="outage", Key=key, Body=data)
    etcd = int(info["etcd_pid"])
    written: dict[str, bytes] = {}
    failures: list[str] = []
    os.kill(etcd, signal.SIGSTOP)
    try:
        started = time.monotonic()
        round_ = 0
        while time.monotonic() - started < OUTAGE_S:
            for key, data in before.items():
                got = s3.get_object(Bucket="outage", Key=key)["Body"].read()
                if got != data:
                    failures.append(f"{key}: other bytes during the outage")
            key = f"during-{round_}"
            written[key] = _body(100 + round_, 64 << 10)
            s3.put_object(Bucket="outage", Key=key, Body=written[key])
            listed = s3.list_objects_v2(Bucket="outage")
            if {o["Key"] for o in listed.get("Contents", [])} != set(before) | set(written):
                failures.append(f"round {round_}: the listing missed objects")
            s3.head_object(Bucket="outage", Key="before-0")
            round_ += 1
        assert round_ >= 2, "too few rounds to mean anything"
    finally:
        os.kill(etcd, signal.SIGCONT)
    assert failures == []
    # Right after etcd resumes it expires every lease that lapsed while it was stopped (lease
    # TTL 2 s here), so the map drops the nodes until they register again: reads go on
    # meanwhile (the gateway still tries a node it knows at its last address).
    resumed = time.monotonic()
    while time.monotonic() - resumed < 6:
        for key, data in before.items():
            assert s3.get_object(Bucket="outage", Key=key)["Body"].read() == data, key
    # After etcd is back: everything written before and during the outage, byte for byte, and
    # buckets can be made again.
    deadline = time.monotonic() + 60
    while True:
        try:
            s3.create_bucket(Bucket="after-outage")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    for key, data in {**before, **written}.items():
        assert s3.get_object(Bucket="outage", Key=key)["Body"].read() == data, key
    s3.put_object(Bucket="after-outage", Key="k", Body=b"fine")
    assert s3.get_object(Bucket="after-outage", Key="k")["Body"].read() == b"fine"
