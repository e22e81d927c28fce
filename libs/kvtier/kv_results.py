"""The outcomes of the KV SDK's puts and its namespace durability (`kvtier.kv` re-exports them).

`PutStatus` / `PutResult`: one key's outcome of a put; `Durability`: a namespace's durability
setting (`AsyncKVClient.set_durability`); and the tables that map the kvcache protocol's item
statuses to them and to the errors a single `put` raises.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from kvtier import errors
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb


class PutStatus(enum.StrEnum):
    """The outcome of one key of a put."""

    STORED = "stored"
    EXISTS = "exists"  # put-if-absent: a block is already there
    BUSY = "busy"  # another put of the key is in progress
    QUOTA_EXCEEDED = "quota_exceeded"
    NO_SPACE = "no_space"  # the node has nothing left to evict
    INVALID = "invalid"
    EXPIRED = "expired"  # the put outlived the node's put timeout
    CORRUPT = "corrupt"  # the bytes the node received did not match their checksum
    # No owner node answered, or (write-through namespace) the node's durable tier did not
    # commit the block's copy in time: the put is not acknowledged (reason: which).
    UNAVAILABLE = "unavailable"
    # Compare-and-swap (if_checksums): the present block is another one, or none is.
    MISMATCH = "mismatch"


@dataclasses.dataclass(frozen=True, slots=True)
class PutResult:
    """The outcome of one key of a put (`AsyncKVClient.put_batch_results`): its status and,
    when the key was refused, why: one line from the node that refused it (e.g. "key of 1041
    bytes: keys must be 1..1040 bytes") or from the SDK ("no owner node answered"). The reason
    is empty for STORED and EXISTS."""

    status: PutStatus
    reason: str = ""


NO_OWNER = PutResult(PutStatus.UNAVAILABLE, "no owner node answered")


class Durability(enum.StrEnum):
    """Whether a namespace's blocks also live in the durable tier (`set_durability`)."""

    NONE = "none"  # DRAM only: an evicted block is gone
    WRITE_BACK = "write_back"  # evicted blocks are spilled; misses read through
    WRITE_THROUGH = "write_through"  # every put is uploaded too; misses read through


DURABILITY = {
    Durability.NONE: pb.DURABILITY_NONE,
    Durability.WRITE_BACK: pb.DURABILITY_WRITE_BACK,
    Durability.WRITE_THROUGH: pb.DURABILITY_WRITE_THROUGH,
}

_PUT_STATUS = {
    pb.ITEM_STATUS_OK: PutStatus.STORED,
    pb.ITEM_STATUS_EXISTS: PutStatus.EXISTS,
    pb.ITEM_STATUS_BUSY: PutStatus.BUSY,
    pb.ITEM_STATUS_QUOTA_EXCEEDED: PutStatus.QUOTA_EXCEEDED,
    pb.ITEM_STATUS_NO_SPACE: PutStatus.NO_SPACE,
    pb.ITEM_STATUS_INVALID: PutStatus.INVALID,
    pb.ITEM_STATUS_EXPIRED: PutStatus.EXPIRED,
    pb.ITEM_STATUS_CORRUPT: PutStatus.CORRUPT,
    pb.ITEM_STATUS_UNAVAILABLE: PutStatus.UNAVAILABLE,
    pb.ITEM_STATUS_MISMATCH: PutStatus.MISMATCH,
}
PUT_ERRORS: dict[PutStatus, type[errors.KVTierError]] = {
    PutStatus.BUSY: errors.AlreadyExists,
    PutStatus.QUOTA_EXCEEDED: errors.QuotaExceeded,
    PutStatus.NO_SPACE: errors.Overloaded,
    PutStatus.INVALID: errors.InvalidArgument,
    PutStatus.EXPIRED: errors.DeadlineExceeded,
    PutStatus.CORRUPT: errors.Corrupt,
    PutStatus.UNAVAILABLE: errors.Unavailable,
    PutStatus.MISMATCH: errors.PreconditionFailed,
}
#: The reason of a refused key whose node sent none (older nodes; gRPC commits).
_PUT_MEANINGS = {
    PutStatus.BUSY: "another put of this key is in progress",
    PutStatus.QUOTA_EXCEEDED: "the tenant's quota on the node is full",
    PutStatus.NO_SPACE: "the node has nothing left to evict",
    PutStatus.INVALID: "bad key or size (the node gave no reason)",
    PutStatus.EXPIRED: "the put outlived the node's put timeout; nothing stored",
    PutStatus.CORRUPT: "the bytes the node received do not match their checksum; nothing stored",
    PutStatus.UNAVAILABLE: "write-through: the durable tier did not commit the block's copy",
    PutStatus.MISMATCH: "compare-and-swap: the present block is another one, or none is",
}


def first(results: Sequence[PutResult | None]) -> PutResult:
    """The outcome on the best-ranked owner that answered."""
    return next((r for r in results if r is not None), NO_OWNER)


def put_result(item: pb.PutGrant) -> PutResult:
    """One key's outcome from a node's reply (a status this SDK does not know: INVALID)."""
    status = _PUT_STATUS.get(item.status)
    if status is None:
        return PutResult(PutStatus.INVALID, f"the node answered status {item.status}")
    return PutResult(status, item.reason or _PUT_MEANINGS.get(status, ""))
