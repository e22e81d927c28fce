"""Bucket and object-key names: the one check shared by gateway, metadata, datanodes and the SDK.

Buckets follow S3's naming rules for general-purpose buckets, so a bucket name is always a safe,
DNS-compatible path component; object keys are 1-1024 bytes of UTF-8 without NUL (keys never
become paths: the datanode hashes them).

On the datanodes a bucket's objects live under its *storage name*: `<name>@<storage_id>`, the
storage id being random per incarnation of the bucket (`BucketInfo.storage_id`), so a bucket
deleted and created again (by anyone) never sees the earlier one's objects. '@' is not valid in
an S3 name, so no user bucket names a storage name, and the gateway's internal buckets (names
starting with '.') collide with neither. Buckets created before storage ids existed have none:
their storage name is the plain name.
"""

from __future__ import annotations

import functools
import re
import secrets

from kvtier import errors

BUCKET_MIN_CHARS = 3
BUCKET_MAX_CHARS = 63
KEY_MAX_BYTES = 1024

#: The bucket of the gateway's own multipart-upload records and parts. Not a valid S3 name
#: (it starts with '.'), so no user bucket can ever collide with it.
MULTIPART_BUCKET = ".multipart"
#: The kvcache nodes' durable KV bucket (spilled and written-through blocks of every tenant).
#: Not a valid S3 name and never recorded at the metadata service: gateways serve it to kvcache
#: nodes only, and no user can create, list, read or write it.
KV_DURABLE_BUCKET = ".kvtier-kv"
#: Keys in internal buckets embed a user's bucket and key, so they may be a little longer.
INTERNAL_KEY_MAX_BYTES = 1200
INTERNAL_BUCKETS = frozenset({MULTIPART_BUCKET, KV_DURABLE_BUCKET})
#: Separates a bucket's name from its storage id in its storage name (not valid in S3 names).
STORAGE_MARK = "@"
STORAGE_ID_CHARS = 16
_STORAGE_ID = re.compile(rf"[0-9a-f]{{{STORAGE_ID_CHARS}}}")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
# Prefixes and suffixes S3 reserves for its own features (access points, aliases, IDNs).
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def check_bucket(name: str) -> None:
    """Raise InvalidArgument unless name is a valid S3 bucket name.

    3-63 characters of lowercase letters, digits, '.' and '-'; starts and ends with a letter or
    digit; no '..'; not formatted as an IPv4 address; none of S3's reserved prefixes or suffixes.
    """
    bad = functools.partial(errors.InvalidArgument, reason="InvalidBucketName")
    if not BUCKET_MIN_CHARS <= len(name) <= BUCKET_MAX_CHARS:
        raise bad(f"bucket name {name!r}: must be {BUCKET_MIN_CHARS}-{BUCKET_MAX_CHARS} characters")
    if not _BUCKET.fullmatch(name):
        raise bad(
            f"bucket name {name!r}: only lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in name:
        raise bad(f"bucket name {name!r}: must not contain '..'")
    if _IP_ADDRESS.fullmatch(name):
        raise bad(f"bucket name {name!r}: must not be an IP address")
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        raise bad(f"bucket name {name!r}: uses a prefix or suffix S3 reserves")


def check_key(key: str) -> None:
    """Raise InvalidArgument unless key is 1-1024 bytes of UTF-8 without NUL."""
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument("object key: not valid UTF-8") from None
    if not 1 <= len(encoded) <= KEY_MAX_BYTES:
        raise errors.InvalidArgument(
            f"object key: must be 1-{KEY_MAX_BYTES} bytes of UTF-8, got {len(encoded)}",
            reason="KeyTooLongError",
        )
    if "\0" in key:
        raise errors.InvalidArgument("object key: must not contain NUL")


def new_storage_id() -> str:
    """A random storage id for a new bucket (16 hex digits, 64 bits)."""
    return secrets.token_hex(STORAGE_ID_CHARS // 2)


def storage_name(bucket: str, storage_id: str) -> str:
    """The name a bucket's objects are stored under: `<bucket>@<storage_id>`, or the plain
    name for a bucket without a storage id (created before they existed)."""
    return f"{bucket}{STORAGE_MARK}{storage_id}" if storage_id else bucket


def user_bucket(stored: str) -> str:
    """The user-facing name of a storage name (internal names are their own)."""
    return stored.partition(STORAGE_MARK)[0]


def check_storage_bucket(bucket: str) -> None:
    """What the object tier stores under: a valid S3 name, optionally followed by '@' and a
    storage id (16 lowercase hex digits), or an internal bucket. Raises InvalidArgument."""
    if bucket in INTERNAL_BUCKETS:
        return
    name, mark, storage_id = bucket.partition(STORAGE_MARK)
    check_bucket(name)
    if mark and not _STORAGE_ID.fullmatch(storage_id):
        raise errors.InvalidArgument(
            f"bucket {bucket!r}: a storage id is {STORAGE_ID_CHARS} lowercase hex digits"
        )


def check_stored(bucket: str, key: str) -> None:
    """What a datanode accepts: a storage name (`check_storage_bucket`) and a valid key, or a
    key of an internal bucket (1-INTERNAL_KEY_MAX_BYTES bytes of UTF-8 without NUL). Raises
    InvalidArgument."""
    if bucket not in INTERNAL_BUCKETS:
        check_storage_bucket(bucket)
        check_key(key)
        return
    encoded = key.encode("utf-8", "surrogatepass")
    if not 1 <= len(encoded) <= INTERNAL_KEY_MAX_BYTES or "\0" in key:
        raise errors.InvalidArgument(f"internal key of {len(encoded)} bytes is not valid")


def check_stored_bucket(bucket: str) -> None:
    """A storage name or an internal bucket's (`check_storage_bucket`). Raises InvalidArgument."""
    check_storage_bucket(bucket)
