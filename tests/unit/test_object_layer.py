"""Unit tests of the gateway's object-layer seam (services/gateway/objectlayer.py): both
implementations offer every operation of the Protocol with its parameters, and the S3 front
tells errors apart by their type and reason, never by their text."""

from __future__ import annotations

import inspect
from typing import Any
from unittest import mock

import pytest

from kvtier import errors
from services.gateway import objectlayer
from services.gateway.s3 import kv_layer, object_ops, s3errors

_OPERATIONS = [
    name
    for name, member in vars(objectlayer.ObjectLayer).items()
    if inspect.iscoroutinefunction(member)
]


def test_the_seam_names_the_domain_operations() -> None:
    assert {"head", "open_read", "put", "delete", "copy", "list"} <= set(_OPERATIONS)
    assert {"create_multipart", "abort_multipart", "list_uploads"} <= set(_OPERATIONS)
    assert {"set_acl", "list_versions", "set_tags"} <= set(_OPERATIONS)
    assert {"delete_bucket", "set_versioning"} <= set(_OPERATIONS)


@pytest.mark.parametrize("implementation", [objectlayer.ErasureLayer, kv_layer.KVLayer])
@pytest.mark.parametrize("operation", _OPERATIONS)
def test_both_layers_implement_every_operation(implementation: type, operation: str) -> None:
    wanted = inspect.signature(getattr(objectlayer.ObjectLayer, operation))
    found = inspect.signature(getattr(implementation, operation))
    assert inspect.iscoroutinefunction(getattr(implementation, operation))
    # Every parameter of the Protocol, in its place and kind (an implementation may add
    # keyword-only ones with defaults).
    for (name, param), (got_name, got) in zip(
        wanted.parameters.items(), found.parameters.items(), strict=False
    ):
        assert (got_name, got.kind, got.default) == (name, param.kind, param.default)
    extra = list(found.parameters.values())[len(wanted.parameters) :]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra)


def _request(*, signed: bool, sha256_header: str = "") -> Any:
    headers = {"x-amz-checksum-sha256": sha256_header} if sha256_header else {}
    return mock.Mock(
        payload=mock.Mock(sha256_hex="ab" * 32 if signed else ""),
        header=lambda name, default="": headers.get(name, default),
    )


def test_a_signed_payload_mismatch_is_told_by_the_error_type() -> None:
    typed = errors.DigestMismatch("checksums differ", algorithm="SHA256")
    mapped = object_ops.translate_digest_error(_request(signed=True), typed)
    assert isinstance(mapped, s3errors.S3Error)
    assert mapped.code == "XAmzContentSHA256Mismatch"
    # The client's own x-amz-checksum-sha256 did not match: BadDigest, as sent.
    own = _request(signed=True, sha256_header="x")
    assert object_ops.translate_digest_error(own, typed) is typed
    # Another algorithm, or no signed payload hash: unchanged.
    md5 = errors.DigestMismatch("SHA256 looks like this", algorithm="MD5")
    assert object_ops.translate_digest_error(_request(signed=True), md5) is md5
    assert object_ops.translate_digest_error(_request(signed=False), typed) is typed


def test_an_error_text_is_never_parsed() -> None:
    by_text = errors.InvalidArgument("SHA256 is x, not y", reason="BadDigest")
    assert object_ops.translate_digest_error(_request(signed=True), by_text) is by_text
    assert s3errors.from_domain(by_text).code == "BadDigest"
    assert s3errors.from_domain(errors.DigestMismatch("x", algorithm="CRC32")).code == "BadDigest"


@pytest.mark.parametrize(
    ("key", "code"),
    [("k" * 1025, "KeyTooLongError"), ("", "InvalidArgument"), ("a\0b", "InvalidArgument")],
)
def test_a_bad_key_is_told_by_the_reason(key: str, code: str) -> None:
    with pytest.raises(s3errors.S3Error) as refused:
        object_ops.check_key(key)
    assert refused.value.code == code
