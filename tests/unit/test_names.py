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
