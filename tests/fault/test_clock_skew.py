"""±10 min clock skew between two gateways (issue 16): versions are ordered by the gateways'
hybrid logical clocks (kvtier.hlc, services/gateway/commits.py), so every acknowledged write
and DELETE is what later reads see, whichever gateway served each.

gateway-1's wall clock runs 10 min ahead, gateway-2's 10 min behind (tests/fault/skewclock.py:
the process's `time.time_ns()`, whatever code it runs). A few keys are written, copied,
deleted and completed as multipart uploads, each operation through the gateway that did not
serve the key's previous one, and each is read back at once through the other gateway. The
checker knows every key's acknowledged state (bodies are unique, so a digest names the write):
a read of another write's bytes of that key, or of nothing, where a later acknowledged write
should be is a lost acknowledged write; bytes never written to the key are wrong bytes. An
operation that failed leaves both outcomes possible until a read settles it.

Before the hybrid clock, versions were stamped with the serving gateway's wall clock
(measured, docs/reliability.md): at ±10 min every write through gateway-1 was refused (the
datanodes' old 5 min bound), at ±4 min writes through gateway-2 after one through gateway-1
answered 200 and stayed invisible. Short by default (in CI), `-m fault_full` for 2 minutes of
operations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.fault import harness, workload

pytestmark = pytest.mark.integration

SKEW_S = 600.0
DURATIONS = [
    pytest.param("short", id="short", marks=[pytest.mark.timeout(240)]),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(600)]),
]
RUN_S = {"short": 12.0, "full": 120.0}
KEYS = 5  # prime to the 9 operation kinds: every key gets every kind, via both gateways
#: Sizes by the path they take: small (WRITE_SMALL, one call per datanode) and staged
#: (WRITE_SHARD, then a commit): 4 data shards here, 512 KiB inline shards at most.
SIZES = (1 << 10, 40 << 10, 300 << 10, 2560 << 10)
GONE = b"deleted"


@dataclasses.dataclass(slots=True)
class SkewReport:
    """What the scenario measured."""

    operations: Counter[str] = dataclasses.field(default_factory=Counter)
    failed: Counter[str] = dataclasses.field(default_factory=Counter)
    acknowledged: int = 0
    wrong_bytes: list[str] = dataclasses.field(default_factory=list)
    lost_acknowledged: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """The report as JSON-able values."""
        return {
            "operations": dict(self.operations), "acknowledged": self.acknowledged,
            "failed": dict(self.failed), "wrong_bytes": self.wrong_bytes,
            "lost_acknowledged": self.lost_acknowledged,
        }  # fmt: skip

    def row(self, name: str) -> str:
        """The docs/reliability.md table row."""
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()))
        return (
            f"| {name} | {sum(self.operations.values())} | {self.acknowledged}"
            f" | {sum(self.failed.values())}{f' ({failed})' if failed else ''}"
            f" | {len(self.wrong_bytes)} | {len(self.lost_acknowledged)} |"
        )


class SkewChecker:
    """Sequential operations on KEYS keys through two gateways, checked as they go."""

    def __init__(self, info: dict[str, Any], seed: int) -> None:
        self.clients = [_s3(info, address) for address in info["gateways_s3"]]
        self.base = seed * 1_000_000  # bodies differ per seed
        self.report = SkewReport()
        #: key -> the digests a read may see (GONE: absent); one once an operation is acknowledged.
        self.possible: dict[str, set[bytes]] = {f"key-{i}": {GONE} for i in range(KEYS)}
        #: key -> every digest ever written to it (to tell a lost write from wrong bytes).
        self.written: dict[str, set[bytes]] = {k: set() for k in self.possible}
        self.turn: dict[str, int] = dict.fromkeys(self.possible, 0)
        #: key -> (digest, bytes) of its last write attempted (what a copy of it copies).
        self.last: dict[str, tuple[bytes, bytes]] = {k: (GONE, b"") for k in self.possible}
        self.serial = 0

    def run(self, seconds: float) -> None:
        """Operate until `seconds` have passed (at least one round over every key)."""
        self.clients[0].create_bucket(Bucket="skew")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or self.serial < 2 * KEYS:
            key = f"key-{self.serial % KEYS}"
            self.serial += 1
            side = self.turn[key] % 2  # alternate gateways per key: ahead, behind, ahead...
            self.turn[key] += 1
            self.operate(key, side)
            self.read(key, 1 - side)

    def operate(self, key: str, side: int) -> None:
        """One write-side operation on key through gateway `side`: PUT (small or staged),
        DELETE, CopyObject from a settled key, or a multipart upload."""
        s3, n = self.clients[side], self.serial
        source = f"key-{(n + 1) % KEYS}"
        if n % 9 in (2, 6):
            self._attempt(key, "delete", GONE, lambda: s3.delete_object(Bucket="skew", Key=key))
        elif n % 9 == 4 and self.possible[source] == {self.last[source][0]} - {GONE}:
            digest, data = self.last[source]
            self.last[key] = (digest, data)
            self._attempt(key, "copy", digest, lambda: s3.copy_object(
                Bucket="skew", Key=key, CopySource={"Bucket": "skew", "Key": source}))  # fmt: skip
        elif n % 18 == 8:
            parts = [workload.body(self.base + n, workload.PART_BYTES),
                     workload.body(self.base + n + 1, 7 << 10)]  # fmt: skip
            self._remember(key, b"".join(parts))
            self._attempt(key, "multipart", self.last[key][0], lambda: _multipart(s3, key, parts))
        else:
            data = workload.body(self.base + n, SIZES[n % len(SIZES)])
            self._remember(key, data)
            self._attempt(key, "put", self.last[key][0],
                          lambda: s3.put_object(Bucket="skew", Key=key, Body=data))  # fmt: skip

    def _remember(self, key: str, data: bytes) -> None:
        self.last[key] = (_digest(data), data)

    def _attempt(self, key: str, kind: str, outcome: bytes, call: Any) -> None:
        self.report.operations[kind] += 1
        if outcome != GONE:
            self.written[key].add(outcome)
        try:
            call()
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
            self.report.failed[f"{kind}:{code or type(exc).__name__}"] += 1
            self.possible[key].add(outcome)  # it may or may not have happened
            return
        self.report.acknowledged += 1
        self.possible[key] = {outcome}

    def read(self, key: str, side: int, *, final: bool = False) -> None:
        """GET key through gateway `side` and check it against the acknowledged state."""
        self.report.operations["get"] += 1
        try:
            data = self.clients[side].get_object(Bucket="skew", Key=key)["Body"].read()
            seen = _digest(data)
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
            if code != "NoSuchKey":
                self.report.failed[f"get:{code or type(exc).__name__}"] += 1
                return
            seen = GONE
        where = f"{'final ' if final else ''}GET {key} via gateway-{side + 1}"
        if seen in self.possible[key]:
            self.possible[key] = {seen}  # a read settles what a failed operation left open
        elif seen == GONE or seen in self.written[key]:
            self.report.lost_acknowledged.append(f"{where}: an earlier state is visible")
        else:
            self.report.wrong_bytes.append(f"{where}: bytes never written to it")

    def verify(self) -> None:
        """Every key read back through both gateways."""
        for key in sorted(self.possible):
            for side in (0, 1):
                self.read(key, side, final=True)


def _multipart(s3: Any, key: str, parts: list[bytes]) -> None:
    upload_id = s3.create_multipart_upload(Bucket="skew", Key=key)["UploadId"]
    done = []
    for number, part in enumerate(parts, 1):
        etag = s3.upload_part(
            Bucket="skew", Key=key, UploadId=upload_id, PartNumber=number, Body=part
        )["ETag"]
        done.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket="skew", Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )


def _s3(info: dict[str, Any], address: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=f"https://{address}", region_name="us-east-1",
        aws_access_key_id=info["s3_access_key"], aws_secret_access_key=info["s3_secret_key"],
        verify=info["ca_file"],
        config=Config(s3={"addressing_style": "path"},
                      retries={"mode": "standard", "max_attempts": 3},
                      connect_timeout=5, read_timeout=30),
    )  # fmt: skip


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.mark.parametrize("duration", DURATIONS)
def test_gateways_ten_minutes_apart(
    open_cluster: Any, duration: str, request: pytest.FixtureRequest
) -> None:
    cluster: harness.FaultCluster = open_cluster(
        gateways=2, clock_offsets={"gateway-1": SKEW_S, "gateway-2": -SKEW_S},
        dataplane_transports=harness.SAME_HOST_DATAPLANE,
    )  # fmt: skip
    checker = SkewChecker(cluster.info, seed=int(os.environ.get("KVTIER_TEST_SEED", "1")))
    checker.run(RUN_S[duration])
    checker.verify()
    report = checker.report
    name = "gateway-1 at +10 min, gateway-2 at -10 min"
    request.node.user_properties.append(("fault_report", report.as_dict()))
    out = os.environ.get("KVTIER_FAULT_RESULTS")
    if out:
        with open(out, "a") as results:
            line = {"scenario": name, "duration": duration, "run_s": RUN_S[duration],
                    "row": report.row(name), **report.as_dict()}  # fmt: skip
            results.write(json.dumps(line) + "\n")
    assert report.wrong_bytes == []
    assert report.lost_acknowledged == []
    assert report.acknowledged >= 2 * KEYS
    assert sum(report.failed.values()) == 0, report.failed
