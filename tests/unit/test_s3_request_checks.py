"""What s3-tests (bench/s3_conformance.py) found in request checks, fixed as AWS S3 answers:
an `Expect` other than 100-continue is ignored, a tag without `=` in x-amz-tagging is a key
with an empty value, an empty Content-MD5 is InvalidDigest (not an absent one), and a write
of the null version (a Suspended bucket) answers no x-amz-version-id while a delete does."""

from __future__ import annotations

import types
from typing import cast
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway.s3 import object_ops, s3errors, s3request, server, tags, versioning_ops


@pytest.mark.parametrize("expect", ["200", "foo", "100-continue-please"])
async def test_an_unknown_expectation_is_ignored(expect: str) -> None:
    s3 = server.S3Server(mock.Mock(), mock.Mock())
    http = make_mocked_request("PUT", "/b/k", headers={"Expect": expect})
    # None: no 417, no 100 Continue; the request goes on to its handler.
    assert await s3.expect(http) is None


def test_a_tag_without_equals_has_an_empty_value() -> None:
    assert tags.parse_header("foo=bar&bar") == {"foo": "bar", "bar": ""}
    assert tags.parse_header("a=1&&b=") == {"a": "1", "b": ""}


@pytest.mark.parametrize("header", ["k=%ff", "=v", "a=1&a=2"])
def test_bad_tag_headers_stay_refused(header: str) -> None:
    with pytest.raises(s3errors.S3Error) as error:
        tags.parse_header(header)
    assert error.value.code == "InvalidTag"


def _req(headers: dict[str, str]) -> s3request.S3Request:
    proxy = CIMultiDictProxy(CIMultiDict(headers))
    req = types.SimpleNamespace(
        http=types.SimpleNamespace(headers=proxy), header=lambda n, d="": proxy.get(n, d)
    )
    return cast(s3request.S3Request, req)


def test_an_empty_content_md5_is_invalid_not_absent() -> None:
    assert object_ops.content_md5(_req({})) == ""
    assert object_ops.content_md5(_req({"Content-MD5": "XrY7u+Ae7tCTyyK7j1rNww=="})) == (
        "5eb63bbbe01eeed093cb22bb8f5acdc3"
    )
    with pytest.raises(s3errors.S3Error) as error:
        object_ops.content_md5(_req({"Content-MD5": ""}))
    assert (error.value.code, error.value.status) == ("InvalidDigest", 400)


def _stamped(info: pb.ObjectInfo, versioned: bool) -> dict[str, str]:
    response = web.Response()
    versioning_ops.stamp(response, info, versioned)
    return dict(response.headers)


def test_a_null_version_write_answers_no_version_id() -> None:
    null = pb.ObjectInfo(
        version_id="null", headers=pb.ObjectHeaders(keep_versions=True, null_version=True)
    )
    assert versioning_ops.VERSION_HEADER not in _stamped(null, False)  # PUT into Suspended
    assert _stamped(null, True)[versioning_ops.VERSION_HEADER] == "null"  # its DELETE
    enabled = pb.ObjectInfo(version_id="v1", headers=pb.ObjectHeaders(keep_versions=True))
    assert _stamped(enabled, False)[versioning_ops.VERSION_HEADER] == "v1"
    assert versioning_ops.VERSION_HEADER not in _stamped(pb.ObjectInfo(), False)  # unversioned
