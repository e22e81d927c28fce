"""S3 version ids of stored object versions, shared by the datanodes and the gateways.

A version written in a bucket with versioning Enabled has its data_id as its version id; one
written while versioning was Suspended, or in a bucket never versioned (`keep_versions`
unset), is the "null" version. Versions of a key are ordered by (mtime_unix_ns, data_id): the
largest is the current one.
"""

from __future__ import annotations

import re

from kvtier import errors
from kvtier.proto.datanode.v1 import datanode_pb2

NULL = "null"
#: What a version id may be (a data_id's alphabet, as the datanodes check it, or "null").
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def version_id(meta: datanode_pb2.ShardMeta) -> str:
    """The S3 version id of a stored version."""
    return meta.data_id if meta.keep_versions and not meta.null_version else NULL


def order(meta: datanode_pb2.ShardMeta) -> tuple[int, str]:
    """The version's place among the key's versions (larger: newer)."""
    return meta.mtime_unix_ns, meta.data_id


def check(version: str) -> str:
    """version when it can be a version id; InvalidArgument otherwise (never a path)."""
    if version != NULL and (not _SAFE.fullmatch(version) or version in ("meta", "versions")):
        raise errors.InvalidArgument(f"version id {version!r} is invalid", reason="InvalidArgument")
    return version
