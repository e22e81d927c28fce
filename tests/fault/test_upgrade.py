"""Mixed-version rolling upgrade from the previous release tag to this checkout (issue 16).

The cluster starts entirely on the release `PREVIOUS_RELEASE` (its tree exported with `git
archive` and run with PYTHONPATH pointing at it, from this venv), data is written, then every
node is replaced, one at a time and in the order docs/upgrades.md gives (metadata, datanodes,
kvcache nodes, gateways), by this checkout's code, under the steady mixed workload with its
byte-exact checker (tests/fault/test_rolling.py's machinery: S3 through a load balancer in
front of two gateways). While old and new nodes run side by side, an object written through
each gateway is read back through the other. At the end every object written before the
upgrade and every acknowledged write made during it reads back byte-exact.

It compares whatever this checkout is with the tag, so a change that breaks the compatibility
policy (a renumbered proto field, a datanode format_version the old code refuses, a cluster
map an old node cannot read, a flag the old services do not know) fails here.

The rollback runs the other way (docs/upgrades.md, "Rolling back"): a cluster of this checkout
holds objects written the ways this checkout writes them (small objects inline in their metas
through the journal, staged ones, multipart, overwritten and deleted keys with their kept
superseded versions, tags), then every node is replaced by the previous release in the reverse
order (gateways first, metadata last) under the same workload, and everything reads back
byte-exact through the old code.

The previous release is the tag when the clone has it, else its commit (`PREVIOUS_RELEASE_COMMIT`:
any full clone has it). A shallow clone has neither: the tests skip and say so; without git too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fault import harness, test_rolling, workload

pytestmark = pytest.mark.integration

PREVIOUS_RELEASE = "v0.1.0"
#: The commit the tag names (docs/upgrades.md): the last one before the graceful drain (9a9324b).
PREVIOUS_RELEASE_COMMIT = "69ab5db0be48dba819a558ecfe5b1621de1decd8"
REPO = Path(__file__).resolve().parents[2]
DURATIONS = [
    pytest.param("short", id="short", marks=pytest.mark.timeout(600)),
    pytest.param("full", id="full", marks=[pytest.mark.fault_full, pytest.mark.timeout(900)]),
]
BEFORE_OBJECTS = {"short": 6, "full": 40}

Opener = Callable[..., harness.FaultCluster]


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's tree (libs/, services/), exported from its tag or commit."""
    if shutil.which("git") is None:
        pytest.skip(f"upgrade test: needs git to export {PREVIOUS_RELEASE}")
    revision = release_revision()
    if revision is None:
        pytest.skip(
            f"upgrade test: neither tag {PREVIOUS_RELEASE} nor commit {PREVIOUS_RELEASE_COMMIT} "
            "is in this clone (a shallow clone? run `git fetch --tags --unshallow`)"
        )
    tree = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=120)
    return tree


def release_revision() -> str | None:
    """The tag when this clone has it (it must name PREVIOUS_RELEASE_COMMIT), else the commit
    when the clone has it, else None."""

    def commit_of(ref: str) -> str | None:
        found = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "-q", "--verify", f"{ref}^{{commit}}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return found.stdout.strip() if found.returncode == 0 else None

    tagged, pinned = commit_of(f"refs/tags/{PREVIOUS_RELEASE}"), commit_of(PREVIOUS_RELEASE_COMMIT)
    if tagged is not None:
        assert pinned is None or tagged == pinned, (
            f"tag {PREVIOUS_RELEASE} names {tagged}, not {PREVIOUS_RELEASE_COMMIT}: "
            "move PREVIOUS_RELEASE_COMMIT with the tag"
        )
        return f"refs/tags/{PREVIOUS_RELEASE}"
    return pinned


def s3_direct(cluster: harness.FaultCluster, address: str) -> Any:
    """A boto3 client of one gateway (no balancer), with boto3's standard retries."""
    return test_rolling.s3_client(cluster, address, attempts=3)


def runs_tree(cluster: harness.FaultCluster, node: str) -> Path:
    """The source tree node's process runs (its working directory: the harness starts a node
    of another tree there)."""
    proc = cluster.children[node].proc
    assert proc is not None
    return Path(os.readlink(f"/proc/{proc.pid}/cwd")).resolve()


def cross_check(cluster: harness.FaultCluster, n: int) -> None:
    """Write an object through each gateway and read it back through the other (old and new
    gateways side by side)."""
    gateways = cluster.info["gateways_s3"]
    for i, (writer, reader) in enumerate([(gateways[0], gateways[1]), (gateways[1], gateways[0])]):
        key, data = f"mixed-{n}-{i}", workload.body(10_000 + 10 * n + i, 200_000)
        s3_direct(cluster, writer).put_object(Bucket="before", Key=key, Body=data)
        got = s3_direct(cluster, reader).get_object(Bucket="before", Key=key)["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), key


def roll(
    cluster: harness.FaultCluster, order: list[str], tree: Path | None, *,
    mixed_after: tuple[str, ...],
) -> Callable[[workload.Workload], list[test_rolling.Step]]:  # fmt: skip
    """The roll for `test_rolling.run_rolling`: each node of order restarted from tree (None:
    this checkout), checked to run it, and after each node of mixed_after (old and new nodes
    side by side) an object written through each gateway and read through the other."""
    expected = (tree or REPO).resolve()

    def run(load: workload.Workload) -> list[test_rolling.Step]:
        steps = []
        for node in order:
            cluster.set_tree(node, tree)
            steps.append(test_rolling.restart_one(cluster, node, load))
            assert runs_tree(cluster, node) == expected, node
            if node in mixed_after:
                cross_check(cluster, len(steps))
        return steps

    return run


@pytest.mark.parametrize("duration", DURATIONS)
def test_rolling_upgrade_from_previous_release(
    open_cluster: Opener,
    previous_release: Path,
    duration: str,
    request: pytest.FixtureRequest,
) -> None:
    """v0.1.0 cluster → this checkout, node by node, under load: 0 wrong bytes, 0 lost
    acknowledged writes, 0 failed client operations; new writes work mid-upgrade."""
    cluster = open_cluster(
        kvcache_nodes=2, gateways=2, tree=previous_release,
        dataplane_transports=harness.SAME_HOST_DATAPLANE,
    )  # fmt: skip
    order = test_rolling.roll_order(cluster)
    assert {runs_tree(cluster, n) for n in order} == {previous_release.resolve()}
    s3 = s3_direct(cluster, cluster.info["gateways_s3"][0])
    s3.create_bucket(Bucket="before")
    before: dict[str, bytes] = {}
    for n in range(BEFORE_OBJECTS[duration]):
        key, data = f"old-{n}", workload.body(1000 + n, (1 << 10, 40 << 10, 300 << 10)[n % 3])
        s3.put_object(Bucket="before", Key=key, Body=data)
        before[key] = hashlib.sha256(data).digest()

    upgrade = roll(cluster, order, None, mixed_after=("datanode-2", "gateway-1"))
    report, steps, _ = test_rolling.run_rolling(cluster, upgrade, after_s=3.0)
    test_rolling.record(f"rolling upgrade {PREVIOUS_RELEASE} -> this checkout", duration,
                        report, steps, request)  # fmt: skip
    for key, digest in before.items():
        got = s3.get_object(Bucket="before", Key=key)["Body"].read()
        assert hashlib.sha256(got).digest() == digest, f"{key} written by {PREVIOUS_RELEASE}"
    cross_check(cluster, 0)
    test_rolling.assert_clean(report, steps)


def write_mix(s3: Any, bucket: str, objects: int) -> dict[str, bytes]:
    """Objects of bucket as this checkout writes them: inline small ones (journaled), staged
    ones, a multipart one, a tagged one, an overwritten key (its superseded version kept on the
    drives) and a deleted one; what each key must read back (the deleted key: absent)."""
    s3.create_bucket(Bucket=bucket)
    expected: dict[str, bytes] = {}
    for n in range(objects):
        key, data = f"new-{n}", workload.body(5000 + n, (1 << 10, 40 << 10, 300 << 10)[n % 3])
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        expected[key] = data
    s3.put_object(Bucket=bucket, Key="overwritten", Body=workload.body(6001, 2000))
    expected["overwritten"] = workload.body(6002, 3000)
    s3.put_object(Bucket=bucket, Key="overwritten", Body=expected["overwritten"])
    s3.put_object(Bucket=bucket, Key="deleted", Body=workload.body(6003, 2000))
    s3.delete_object(Bucket=bucket, Key="deleted")
    expected["tagged"] = workload.body(6004, 5000)
    s3.put_object(Bucket=bucket, Key="tagged", Body=expected["tagged"], Tagging="kind=rollback")
    parts = [workload.body(6005, workload.PART_BYTES), workload.body(6006, 1000)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="multipart")["UploadId"]
    done = [
        {"PartNumber": i, "ETag": s3.upload_part(Bucket=bucket, Key="multipart", UploadId=upload,
                                                 PartNumber=i, Body=part)["ETag"]}
        for i, part in enumerate(parts, 1)
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=bucket, Key="multipart", UploadId=upload, MultipartUpload={"Parts": done}
    )
    expected["multipart"] = b"".join(parts)
    return expected


def check_mix(s3: Any, bucket: str, expected: dict[str, bytes], who: str) -> None:
    """Every key of write_mix reads back exact through s3, the listing is exactly them, and the
    tag is kept."""
    for key, data in expected.items():
        got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), f"{key} ({who})"
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert {k for k in listed if not k.startswith("mixed-")} == set(expected), f"listing ({who})"
    tags = s3.get_object_tagging(Bucket=bucket, Key="tagged")["TagSet"]
    assert tags == [{"Key": "kind", "Value": "rollback"}], who


@pytest.mark.parametrize("duration", DURATIONS)
def test_rolling_rollback_to_previous_release(
    open_cluster: Opener,
    previous_release: Path,
    duration: str,
    request: pytest.FixtureRequest,
) -> None:
    """This checkout's cluster → the previous release, node by node in the reverse order, under
    load: what this checkout wrote reads back exact through the old code, 0 failed client
    operations, 0 lost acknowledged writes."""
    cluster = open_cluster(
        kvcache_nodes=2, gateways=2, dataplane_transports=harness.SAME_HOST_DATAPLANE
    )
    order = list(reversed(test_rolling.roll_order(cluster)))
    assert order[0].startswith("gateway"), order
    assert order[-1].startswith("metadata"), order
    assert {runs_tree(cluster, n) for n in order} == {REPO.resolve()}
    s3 = s3_direct(cluster, cluster.info["gateways_s3"][0])
    expected = write_mix(s3, "before", BEFORE_OBJECTS[duration])
    check_mix(s3, "before", expected, "this checkout")

    rollback = roll(cluster, order, previous_release, mixed_after=("gateway-1", "datanode-2"))
    report, steps, _ = test_rolling.run_rolling(cluster, rollback, after_s=3.0)
    test_rolling.record(f"rolling rollback this checkout -> {PREVIOUS_RELEASE}", duration,
                        report, steps, request)  # fmt: skip
    for address in cluster.info["gateways_s3"]:
        check_mix(s3_direct(cluster, address), "before", expected, f"{PREVIOUS_RELEASE} {address}")
    cross_check(cluster, 0)
    test_rolling.assert_clean(report, steps)
