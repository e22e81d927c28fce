"""Unit tests of kvtier.names: S3 bucket-name rules and object-key limits."""

from __future__ import annotations

import pytest

from kvtier import errors, names

VALID_BUCKETS = [
    "abc",
    "my-bucket",
    "my.bucket.name",
    "a1b2c3",
    "123",
    "0-0",
    "a" * 63,
    "weights.v2-llama",
    "1.2.3",  # three dotted numbers are not an IPv4 address
]

INVALID_BUCKETS = [
    "",
    "ab",
    "a" * 64,
    "MyBucket",
    "my_bucket",
    "-bucket",
    "bucket-",
    ".bucket",
    "bucket.",
    "my..bucket",
    "192.168.5.4",
    "10.0.0.1",
    "has space",
    "has/slash",
    "../etc",
    "...",
    "bücket",
    "xn--bucket",
    "sthree-bucket",
    "bucket-s3alias",
    "bucket--ol-s3",
    "nul\0byte",
]


@pytest.mark.parametrize("name", VALID_BUCKETS)
def test_valid_bucket_names_pass(name: str) -> None:
    names.check_bucket(name)


@pytest.mark.parametrize("name", INVALID_BUCKETS)
def test_invalid_bucket_names_raise(name: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="bucket name"):
        names.check_bucket(name)


VALID_KEYS = [
    "a",
    "/",
    ".",
    "..",
    "../../etc/passwd",
    "dir/sub/file.bin",
    "with space and ~!@#$%^&*()",
    "日本語/ключ/𝄞",
    "x" * 1024,
    "é" * 512,  # 1024 bytes of UTF-8
    "\x7f\x01control",
]

INVALID_KEYS = [
    "",
    "x" * 1025,
    "é" * 513,  # 513 characters, 1026 bytes
    "𝄞" * 257,  # 1028 bytes
    "nul\0inside",
    "\0",
    "lone \ud800 surrogate",
]


@pytest.mark.parametrize("key", VALID_KEYS)
def test_valid_keys_pass(key: str) -> None:
    names.check_key(key)


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_raise(key: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="object key"):
        names.check_key(key)


STORAGE_ID = "0123456789abcdef"


def test_storage_names_bind_objects_to_one_incarnation() -> None:
    first, second = names.new_storage_id(), names.new_storage_id()
    assert first != second
    assert len(first) == names.STORAGE_ID_CHARS
    stored = names.storage_name("weights", first)
    assert stored == f"weights@{first}"
    names.check_storage_bucket(stored)
    names.check_stored(stored, "k")
    names.check_stored_bucket(stored)
    assert names.user_bucket(stored) == "weights"
    # Buckets older than storage ids keep their plain name.
    assert names.storage_name("weights", "") == "weights"
    assert names.user_bucket("weights") == "weights"


@pytest.mark.parametrize(
    "bucket",
    [
        f"Bad@{STORAGE_ID}",
        "weights@",
        "weights@0123",
        f"weights@{STORAGE_ID.upper()}",
        f"weights@{STORAGE_ID}0",
        f"weights@{STORAGE_ID}@{STORAGE_ID}",
        f"weights@../{STORAGE_ID[3:]}",
        f"@{STORAGE_ID}",
        ".other-internal",
    ],
)
def test_bad_storage_names_are_refused(bucket: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        names.check_storage_bucket(bucket)
    with pytest.raises(errors.InvalidArgument):
        names.check_stored(bucket, "k")


def test_internal_buckets_are_stored_but_no_user_may_name_them() -> None:
    for bucket in (names.MULTIPART_BUCKET, names.KV_DURABLE_BUCKET):
        names.check_stored(bucket, "x" * names.INTERNAL_KEY_MAX_BYTES)
        names.check_storage_bucket(bucket)
        with pytest.raises(errors.InvalidArgument):
            names.check_bucket(bucket)
    for user_name in (f"weights@{STORAGE_ID}", names.KV_DURABLE_BUCKET):
        with pytest.raises(errors.InvalidArgument):
            names.check_bucket(user_name)  # what every user-facing entry point checks
