"""A drive's meta files: their format, and the rules that stamp and name a version.

A meta file (`<h>/meta`, `<h>/versions/<version id>.meta`; layout in services.datanode.shards) is a
deterministically encoded `ShardMeta` followed by its xxh3-64 (8 bytes LE). A shard of at most
INLINE_MAX_BYTES in total (all parts) lives in the meta (`inline_data`, framed blocks in part
order) and has no data directory; so does a small write's (`seal_small`) of at most
SMALL_WRITE_MAX_BYTES: a meta whose inline_data is not empty is inline whatever its size. A
committed meta carries FORMAT_VERSION, its block size, a stamp (`mtime_unix_ns`, at most
MAX_FUTURE_MTIME_NS ahead of this node's clock) and a `data_id` that is a safe name in the key's
directory. Pure functions: nothing here does I/O.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import NamedTuple

from google.protobuf import message as pb_message

from kvtier import errors, names, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from services.datanode import framing, index, versionstore

FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 20
MAX_BLOCK_BYTES = 16 << 20
INLINE_MAX_BYTES = 128 << 10
#: The largest shard of a small write (WRITE_SMALL: stored inline through the journal). Above
#: INLINE_MAX_BYTES only for gateways that see features.DATANODE_SMALL_WRITES_512K: a 2 MiB
#: object is 256 KiB shards on RS 8+4, 512 KiB on 4+2 (docs/benchmarks.md, issue 14).
SMALL_WRITE_MAX_BYTES = 512 << 10
MAX_PART_NUMBER = 10_000
META_FILE = "meta"
#: The meta of the version an overwrite replaced, kept a while (services.datanode.supersede).
PREV_FILE = "meta.prev"
#: The kept (superseded) versions' metas of a key, newest first: PREV_FILE, then PREV_FILE.1 ...
PREV_FILES = (PREV_FILE, *(f"{PREV_FILE}.{n}" for n in range(1, 4)))

#: A small write's meta before it is renamed over META_FILE (services.datanode.shards).
STAGED_META_FILE = "meta.new"

#: Write ids and data_ids: names safe in a directory.
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Names in a key's directory that no data dir may take.
_RESERVED_IDS = frozenset(
    {META_FILE, STAGED_META_FILE, *PREV_FILES, versionstore.VERSIONS_DIR, objversions.NULL}
)

ShardMeta = datanode_pb2.ShardMeta


def fits_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a staged write's shard is kept in its meta (at most INLINE_MAX_BYTES, all parts)."""
    return sum(p.shard_bytes for p in meta.parts) <= INLINE_MAX_BYTES


def is_inline(meta: datanode_pb2.ShardMeta) -> bool:
    """Whether a stored version's shard lives in its meta (small shards, small writes' up to
    SMALL_WRITE_MAX_BYTES, pool records) or in files. A stored meta holds inline_data only when
    its shard is there (a staged write's commit clears what the request carried)."""
    return fits_inline(meta) or bool(meta.inline_data)


def encode_meta(meta: datanode_pb2.ShardMeta) -> bytes:
    """The bytes of a meta file: the message and its checksum."""
    body = meta.SerializeToString(deterministic=True)
    return body + framing.digest(body)


def decode_meta(raw: bytes, where: str) -> datanode_pb2.ShardMeta:
    """Parse a meta file; raises Corrupt when its checksum, encoding or version is wrong."""
    body = raw[: -framing.HASH_BYTES]
    if len(raw) < framing.HASH_BYTES or framing.digest(body) != raw[-framing.HASH_BYTES :]:
        raise errors.Corrupt(f"{where}: meta checksum mismatch")
    meta = ShardMeta()
    try:
        meta.ParseFromString(body)
    except pb_message.DecodeError:
        raise errors.Corrupt(f"{where}: meta does not parse") from None
    if meta.format_version != FORMAT_VERSION:
        raise errors.Corrupt(f"{where}: unknown meta format version {meta.format_version}")
    if not 0 < meta.block_bytes <= MAX_BLOCK_BYTES:
        raise errors.Corrupt(f"{where}: meta has block_bytes {meta.block_bytes}")
    return meta


def list_entry(meta: datanode_pb2.ShardMeta) -> index.ListEntry:
    """The listing index's entry of a key whose current version is meta."""
    return index.ListEntry(
        meta.key, meta.size, meta.etag, meta.mtime_unix_ns, meta.is_pointer, meta.delete_marker,
        meta.acl.owner, meta.upload_initiator,
    )  # fmt: skip


#: How far ahead of this node's clock a version's stamp may be. Stamps come from the gateways'
#: hybrid logical clocks (kvtier.hlc), which run ahead of real time by at most the largest
#: clock skew among the gateways: 30 min tolerates gateways skewed ±10 min (the fault suite's
#: scenario) with room to spare, and still refuses a stamp that would win every later write
#: for hours.
MAX_FUTURE_MTIME_NS = 1800 * 1_000_000_000


def stamp(stored: datanode_pb2.ShardMeta, where: str) -> None:
    """Set the format version, a missing mtime (now) and when this drive stores the version
    (stored_unix_ns: this node's clock; stored_age_ms is for replies only); ClockSkew for an
    mtime more than MAX_FUTURE_MTIME_NS ahead of this node's clock."""
    stored.format_version = FORMAT_VERSION
    now = time.time_ns()
    if stored.mtime_unix_ns > now + MAX_FUTURE_MTIME_NS:
        # A version stamped far in the future would win every later write (commits keep the
        # newest stamp): refused, whoever sent it.
        ahead_s = (stored.mtime_unix_ns - now) // 1_000_000_000
        raise errors.ClockSkew(
            f"{where}: mtime is {ahead_s} s ahead of this datanode's clock (at most "
            f"{MAX_FUTURE_MTIME_NS // 1_000_000_000} s): the writer's clock is skewed"
        )
    stored.mtime_unix_ns = stored.mtime_unix_ns or now
    stored.stored_unix_ns, stored.stored_age_ms = now, 0


def stored_age_ms(meta: datanode_pb2.ShardMeta, file_mtime_ns: int, now_ns: int) -> int:
    """How long ago (ms, at least 1) this drive stored meta, by this node's clock at both ends:
    its stored_unix_ns, or file_mtime_ns (its meta file's) for a version stored before the
    field existed (0: not known, nor the age). No gateway's clock takes part (a pool drain ages
    orphaned copies by it)."""
    since_ns = meta.stored_unix_ns or file_mtime_ns
    return max(1, (now_ns - since_ns) // 1_000_000) if since_ns else 0


class Condition(NamedTuple):
    """What a conditional write needs of the drive's current version of its key (S3
    If-None-Match: * and If-Match, made atomic per drive: checked under the key's lock)."""

    #: none, or a delete marker
    absent: bool
    #: the version with this data_id ("": any)
    data_id: str


def take_condition(stored: datanode_pb2.ShardMeta) -> Condition | None:
    """The write's condition (ShardMeta.commit_if_absent, commit_if_data_id), cleared from
    stored (never stored); None: an unconditional write."""
    if not (stored.commit_if_absent or stored.commit_if_data_id):
        return None
    condition = Condition(stored.commit_if_absent, stored.commit_if_data_id)
    stored.ClearField("commit_if_absent")
    stored.ClearField("commit_if_data_id")
    return condition


def check_condition(
    condition: Condition | None,
    current: datanode_pb2.ShardMeta | None,
    stored: datanode_pb2.ShardMeta,
) -> None:
    """PreconditionFailed unless the drive's current version of the key (current; None: none)
    meets the write's condition. A current version with stored's own data_id meets it (the
    same write sent again: restamped, or a retry)."""
    if condition is None or (current is not None and current.data_id == stored.data_id):
        return
    where = f"{stored.bucket}/{stored.key}"
    live = current is not None and not current.delete_marker
    if condition.absent and live:
        raise errors.PreconditionFailed(f"{where}: a version is here (commit only if absent)")
    if condition.data_id and (current is None or not live or current.data_id != condition.data_id):
        held = current.data_id if live and current is not None else "none"
        raise errors.PreconditionFailed(
            f"{where}: the version here is {held}, not {condition.data_id}"
        )


def name_version(stored: datanode_pb2.ShardMeta, where: str) -> None:
    """Set a missing data_id (a new uuid); InvalidArgument for one that is no safe name."""
    stored.data_id = stored.data_id or uuid.uuid4().hex
    if not SAFE_ID.fullmatch(stored.data_id) or stored.data_id in _RESERVED_IDS:
        raise errors.InvalidArgument(f"{where}: data_id {stored.data_id!r} is not a safe name")


def seal_small(meta: datanode_pb2.ShardMeta, shard: framing.Buffer) -> datanode_pb2.ShardMeta:
    """The meta to store for a small write: meta completed (as a commit does) with the shard's
    framed blocks inline. InvalidArgument unless meta has one part whose shard_bytes is
    len(shard), at most SMALL_WRITE_MAX_BYTES."""
    names.check_stored(meta.bucket, meta.key)
    where = f"{meta.bucket}/{meta.key}"
    view = memoryview(shard).cast("B")
    if len(meta.parts) != 1 or meta.parts[0].shard_bytes != len(view):
        raise errors.InvalidArgument(f"{where}: a small write has one part of the shard's bytes")
    if len(view) > SMALL_WRITE_MAX_BYTES or not 1 <= meta.parts[0].number <= MAX_PART_NUMBER:
        raise errors.InvalidArgument(f"{where}: not a small write ({len(view)} shard bytes)")
    stored = ShardMeta()
    stored.CopyFrom(meta)
    size = stored.block_bytes = stored.block_bytes or BLOCK_BYTES
    if not 0 < size <= MAX_BLOCK_BYTES:
        raise errors.InvalidArgument(f"{where}: block_bytes {size}: 1-{MAX_BLOCK_BYTES}")
    stamp(stored, where)
    name_version(stored, where)
    blocks = (view[at : at + size] for at in range(0, len(view), size))
    stored.inline_data = b"".join(bytes(b) + framing.digest(b) for b in blocks)
    return stored
