"""Conditional writes (S3 If-None-Match: * and If-Match on PUT and CompleteMultipartUpload),
made atomic on the drives.

A gateway alone can only check a condition and then write, and another writer may commit in
between: 8 of 8 concurrent If-None-Match: * PUTs of one key all succeeded that way. So the
condition travels with the commit. The gateway reads the key's current version at read quorum
first (`prepare`: the early answer, 412 or 404, without writing anything), then sends each
drive's commit with `ShardMeta.commit_if_absent`, or `commit_if_data_id` naming the version
whose ETag matched; each drive checks it under the key's lock against its own current version
and refuses (FailedPrecondition) or commits, in one step (services/datanode/shards.py). The
write stands only where a write quorum committed it (commits.commit_version); otherwise the
drives that took it undo it, as for any commit short of its quorum, and the write fails
(`refusal`):
- PreconditionFailed (412) when more drives refused it than took it: another version was there;
- PreconditionFailed with reason ConditionalRequestConflict (S3's 409) otherwise: concurrent
  conditional writes split the drives, none of them stands, and the client may try again.

Two writes whose conditions exclude each other cannot both succeed: a drive takes at most one
of them (the second sees the first under the key's lock), and two write quorums of a set share
a drive.

Several pools: every key has its entry in pool 0 (the object, or a pool record naming the pool
it lives in, with its ETag), so a conditional PUT goes to pool 0, as every write of a versioned
bucket does (pool 0 is never drained), and its drives check the condition against that entry:
absent there is absent everywhere, and If-Match names the entry's data_id.

Limits: the drives check conditions only in a set of pool 0 whose datanodes all advertise
`datanode.conditional-commit` (kvtier.features). Otherwise (an older datanode during a rolling
upgrade; a CompleteMultipartUpload whose upload was placed in another pool when it was created,
before any condition was known) the gateway checks and then writes, which is not atomic
against a concurrent writer.
"""

from __future__ import annotations

import prometheus_client

from kvtier import errors, features
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from services.gateway import placement

#: The S3 error code (and gRPC reason) of conditional writes that raced and all failed.
CONFLICT = "ConditionalRequestConflict"

CONDITIONAL = prometheus_client.Counter(
    "kvtier_gateway_conditional_writes_total",
    "Conditional writes (If-None-Match: *, If-Match) by how the condition was held: atomic "
    "(each drive checked it under the key's lock) or checked (read first, then written: "
    "several pools, or an older datanode)",
    ["held"],
)
REFUSED = prometheus_client.Counter(
    "kvtier_gateway_conditional_refusals_total",
    "Conditional writes the drives refused at commit, by outcome: precondition (another "
    "version was there) or conflict (concurrent conditional writes split the drives)",
    ["outcome"],
)


def etag_named(header: str, etag: str) -> bool:
    """Whether an If-Match / If-None-Match value (a list of ETags, quoted or not, or *)
    names etag."""
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return "*" in tags or etag in tags


def check(
    bucket: str, key: str, current: datanode_pb2.ShardMeta | None, *, absent: bool, if_match: str
) -> None:
    """PreconditionFailed (or NotFound for If-Match on no object) unless the key's current
    version (current; None: none) meets the write's condition."""
    if absent and current is not None:
        raise errors.PreconditionFailed(f"{bucket}/{key} exists (If-None-Match)")
    if if_match:
        if current is None:
            raise errors.NotFound(f"{bucket}/{key}: no such object (If-Match)")
        if not etag_named(if_match, current.etag):
            raise errors.PreconditionFailed(f"{bucket}/{key}: If-Match does not match")


def atomic(cmap: common_pb2.ClusterMap, where: placement.Placement) -> bool:
    """Whether the drives of where (a set of cmap) can check a condition at commit: a set of
    pool 0, every datanode advertising it (module docstring)."""
    return where.pool_index == placement.FIRST_POOL and all(
        features.advertised(cmap, slot.node_id, features.DATANODE_CONDITIONAL_COMMIT)
        for slot in where.slots
    )


def attach(
    meta: datanode_pb2.ShardMeta, current: datanode_pb2.ShardMeta | None, *, absent: bool,
    if_match: str,
) -> None:  # fmt: skip
    """Make meta's commit conditional on the drives: on the key's absence, or on its current
    version (current, which `check` found matching) still being there."""
    meta.commit_if_absent = absent
    meta.commit_if_data_id = current.data_id if if_match and current is not None else ""
    CONDITIONAL.labels("atomic").inc()


def conditional(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether meta's commit is conditional on the drives."""
    return bool(meta.commit_if_absent or meta.commit_if_data_id)


def clear(meta: datanode_pb2.ShardMeta) -> None:
    """Drop the condition from meta once committed (it is never stored)."""
    meta.ClearField("commit_if_absent")
    meta.ClearField("commit_if_data_id")


def refusal(meta: datanode_pb2.ShardMeta, took: int, refused: int) -> errors.PreconditionFailed:
    """The error of a conditional commit that missed its write quorum with `refused` drives
    refusing the condition and `took` taking it (module docstring)."""
    where = f"{meta.bucket}/{meta.key}"
    if refused > took:
        REFUSED.labels("precondition").inc()
        return errors.PreconditionFailed(
            f"{where}: the condition failed on {refused} drives (another version is there)"
        )
    REFUSED.labels("conflict").inc()
    return errors.PreconditionFailed(
        f"{where}: a concurrent conditional write split the drives ({took} took this one, "
        f"{refused} refused it); nothing was written, try again",
        reason=CONFLICT,
    )
