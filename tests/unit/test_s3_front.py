"""The S3 front's pure parts: addressing (path and virtual-host style), routing, ranges,
conditional requests and the XML bodies (SigV4 and aws-chunked: test_sigv4.py, test_chunked.py)."""

from __future__ import annotations

import datetime
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from services.gateway.s3 import object_ops, s3errors, server, xmlio


def _server(domain: str = "") -> server.S3Server:
    return server.S3Server(mock.Mock(), mock.Mock(), domain=domain)


@pytest.mark.parametrize(
    ("path", "host", "expected"),
    [
        ("/", "localhost", ("", "")),
        ("/bucket", "localhost", ("bucket", "")),
        ("/bucket/", "localhost", ("bucket", "")),
        ("/bucket/a/b%20c/%C3%BC", "localhost", ("bucket", "a/b c/ü")),
        ("/bucket/a/../../b", "localhost", ("bucket", "a/../../b")),
        ("/bucket/x%2Fy", "localhost", ("bucket", "x/y")),
        ("/k/ey", "bkt.s3.example.com:9000", ("bkt", "k/ey")),
        ("/", "bkt.s3.example.com", ("bkt", "")),
        ("/other/k", "s3.example.com", ("other", "k")),
    ],
)
def test_addressing(path: str, host: str, expected: tuple[str, str]) -> None:
    request = make_mocked_request("GET", path, headers={"Host": host})
    assert _server("s3.example.com").target(request) == expected


def test_invalid_utf8_path_is_refused() -> None:
    request = make_mocked_request("GET", "/bucket/%FF%FE", headers={"Host": "h"})
    with pytest.raises(s3errors.S3Error, match="parse"):
        _server().target(request)


@pytest.mark.parametrize(
    ("method", "bucket", "key", "query", "op"),
    [
        ("GET", "", "", {}, "ListBuckets"),
        ("PUT", "b", "", {}, "CreateBucket"),
        ("GET", "b", "", {"list-type": "2"}, "ListObjects"),
        ("GET", "b", "", {"uploads": ""}, "ListMultipartUploads"),
        ("GET", "b", "", {"versions": ""}, "ListObjectVersions"),
        ("POST", "b", "", {"delete": ""}, "DeleteObjects"),
        ("PUT", "b", "k", {"partNumber": "1", "uploadId": "u"}, "UploadPart"),
        ("PUT", "b", "k", {}, "PutObject"),
        ("POST", "b", "k", {"uploads": ""}, "CreateMultipartUpload"),
        ("POST", "b", "k", {"uploadId": "u"}, "CompleteMultipartUpload"),
        ("DELETE", "b", "k", {"uploadId": "u"}, "AbortMultipartUpload"),
        ("GET", "b", "k", {"uploadId": "u"}, "ListParts"),
        ("HEAD", "b", "k", {}, "HeadObject"),
    ],
)
def test_routing(method: str, bucket: str, key: str, query: dict[str, str], op: str) -> None:
    assert _server().route(method, bucket, key, query)[0] == op


def test_unsupported_subresources_and_methods() -> None:
    with pytest.raises(s3errors.S3Error) as acl:
        _server().route("GET", "b", "k", {"acl": ""})
    assert (acl.value.code, acl.value.status) == ("NotImplemented", 501)
    with pytest.raises(s3errors.S3Error) as method:
        _server().route("POST", "", "", {})
    assert (method.value.code, method.value.status) == ("MethodNotAllowed", 405)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("", 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-200", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes=50-", 100, (50, 99)),
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole object, as S3 does
        ("items=0-1", 100, None),
        ("bytes=9-3", 100, None),
    ],
)
def test_ranges(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert object_ops.parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(s3errors.S3Error) as error:
        object_ops.parse_range(header, 100)
    assert (error.value.code, error.value.status) == ("InvalidRange", 416)


def _conditions(headers: dict[str, str], *, for_read: bool = True) -> int:
    mtime_ms = int(datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC).timestamp() * 1000)
    try:
        object_ops.check_conditions(
            lambda n: headers.get(n, ""), "abc", mtime_ms, for_read=for_read
        )
    except s3errors.S3Error as exc:
        return exc.status
    return 200


def test_conditional_requests() -> None:
    before, after = "Sun, 31 May 2026 00:00:00 GMT", "Tue, 02 Jun 2026 00:00:00 GMT"
    assert _conditions({"If-Match": '"abc"'}) == 200
    assert _conditions({"If-Match": '"xyz", "abc"'}) == 200
    assert _conditions({"If-Match": '"xyz"'}) == 412
    assert _conditions({"If-None-Match": '"abc"'}) == 304
    assert _conditions({"If-None-Match": '"abc"'}, for_read=False) == 412
    assert _conditions({"If-None-Match": "*"}) == 304
    assert _conditions({"If-Modified-Since": after}) == 304
    assert _conditions({"If-Modified-Since": before}) == 200
    assert _conditions({"If-Unmodified-Since": before}) == 412
    assert _conditions({"If-Unmodified-Since": after}) == 200
    # If-Match true wins over If-Unmodified-Since false; If-None-Match over If-Modified-Since.
    assert _conditions({"If-Match": '"abc"', "If-Unmodified-Since": before}) == 200
    assert _conditions({"If-None-Match": '"xyz"', "If-Modified-Since": after}) == 200
    assert _conditions({"If-Modified-Since": "not a date"}) == 200


def test_xml_bodies_parse_and_refuse_garbage() -> None:
    complete = (
        b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b'<Part><PartNumber>1</PartNumber><ETag>"aa"</ETag><ChecksumCRC32>x==</ChecksumCRC32>'
        b"</Part><Part><PartNumber>2</PartNumber><ETag>bb</ETag></Part>"
        b"</CompleteMultipartUpload>"
    )
    assert xmlio.parse_complete(complete) == [(1, "aa", {"CRC32": "x=="}), (2, "bb", {})]
    quiet, keys = xmlio.parse_delete(
        b"<Delete><Quiet>true</Quiet><Object><Key>a&amp;b</Key></Object></Delete>"
    )
    assert (quiet, keys) == (True, ["a&b"])
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><Delete><Quiet>&b;</Quiet></Delete>'
    )
    for bad in (b"<Delete><Object></Object></Delete>", b"<nope", b"<Other/>", bomb):
        with pytest.raises(s3errors.S3Error) as error:
            xmlio.parse_delete(bad)
        assert error.value.code == "MalformedXML"
    with pytest.raises(s3errors.S3Error):
        xmlio.parse_complete(b"<CompleteMultipartUpload></CompleteMultipartUpload>")
