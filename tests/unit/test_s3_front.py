"""The S3 front's pure parts: addressing (path and virtual-host style), routing, ranges,
conditional requests and the XML bodies (SigV4 and aws-chunked: test_sigv4.py, test_chunked.py)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from kvtier import errors, names
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway.s3 import (
    bucket_ops,
    kv_layer,
    multipart_ops,
    object_ops,
    params,
    s3errors,
    server,
    xmlio,
)


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
        ("POST", "b", "", {}, "PostObject"),
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
    with pytest.raises(s3errors.S3Error) as website:
        _server().route("GET", "b", "", {"website": ""})
    assert (website.value.code, website.value.status) == ("NotImplemented", 501)
    # ?policy is a bucket's GET, PUT and DELETE (?policyStatus a GET): elsewhere never routed
    # as the plain operation (POST Object, PutObject, CreateBucket...).
    assert _server().route("GET", "b", "", {"policy": ""})[0] == "GetBucketPolicy"
    assert _server().route("GET", "b", "", {"policyStatus": ""})[0] == "GetBucketPolicyStatus"
    for method, key, sub in [("POST", "", "policy"), ("PUT", "k", "policy"),
                             ("PUT", "", "policyStatus"), ("DELETE", "k", "policy")]:  # fmt: skip
        with pytest.raises(s3errors.S3Error) as elsewhere:
            _server().route(method, "b", key, {sub: ""})
        assert elsewhere.value.code == "NotImplemented", (method, key, sub)
    with pytest.raises(s3errors.S3Error) as refused:
        _server().route("POST", "", "", {})
    assert (refused.value.code, refused.value.status) == ("MethodNotAllowed", 405)


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


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-0", "bytes=3-9", "bytes=-0"])
def test_ranges_of_an_empty_object_are_unsatisfiable(header: str) -> None:
    with pytest.raises(s3errors.S3Error) as error:
        object_ops.parse_range(header, 0)
    assert (error.value.code, error.value.status) == ("InvalidRange", 416)
    assert object_ops.parse_range("bytes=-5", 0) is None  # a suffix: all of it (nothing)


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


# --- found by fuzzing (tests/fuzz/): typed refusals, never a 500 ---


@pytest.mark.parametrize(
    "header", ["bytes=²-5", "bytes=٣-", "bytes=-٣", "bytes=1_0-20", "bytes=+1-2", "bytes=--5"]
)
def test_ranges_of_anything_but_ascii_digits_are_ignored(header: str) -> None:
    assert object_ops.parse_range(header, 100) is None
    assert object_ops.parse_range("bytes= 1 - 2 ", 100) == (1, 2)


def test_conditions_with_dates_datetime_cannot_hold_are_ignored() -> None:
    for date in ("1 Jan 99999999999 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 -2359"):
        assert _conditions({"If-Modified-Since": date}) == 200
        assert _conditions({"If-Unmodified-Since": date}) == 200


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 10, (0, 9)),
        ("bytes=3-3", 10, (3, 3)),
        ("bytes=0-10", 10, "InvalidRange"),
        ("bytes=5-4", 10, "InvalidArgument"),
        ("bytes=²-5", 10, "InvalidArgument"),
        ("bytes=0-٣", 10, "InvalidArgument"),
        ("bytes=0-" + "9" * 5000, 10, "InvalidArgument"),
        ("bytes=-5", 10, "InvalidArgument"),
        ("items=0-1", 10, "InvalidArgument"),
        ("0-2", 10, "InvalidArgument"),  # no unit (s3-tests' improper ranges)
        ("bytes=0", 10, "InvalidArgument"),
        ("bytes=0-2,3-5", 10, "InvalidArgument"),
    ],
)
def test_copy_source_ranges(header: str, size: int, expected: tuple[int, int] | str) -> None:
    if isinstance(expected, tuple):
        assert object_ops.parse_copy_range(header, size) == expected
        return
    with pytest.raises(s3errors.S3Error) as error:
        object_ops.parse_copy_range(header, size)
    assert error.value.code == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("007", 7), ("9" * 19, 10**19 - 1), ("9" * 20, None), ("", None), ("²", None),
     ("٣", None), ("1_0", None), (" 1", None), ("+1", None), ("-1", None), ("1.0", None)],
)  # fmt: skip
def test_numbers_are_ascii_digits(text: str, value: int | None) -> None:
    assert params.uint(text) == value


def _refused(code: str, call: Callable[[], object]) -> None:
    with pytest.raises(s3errors.S3Error) as error:
        call()
    assert error.value.code == code


@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, "99999999999", "-1"])
def test_number_parameters_are_ascii_digits(value: str) -> None:
    req: Any = mock.Mock(query={"partNumber": value, "max-keys": value, "max-parts": value})
    _refused("InvalidArgument", lambda: multipart_ops._part_number(req))
    if value != "99999999999":  # max-keys: at most 1000 are listed anyway
        _refused("InvalidArgument", lambda: bucket_ops._max_keys(req))
    _refused("InvalidArgument", lambda: multipart_ops._int(req, "max-parts", 1000))


def test_a_bad_kv_continuation_token_is_an_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        kv_layer.start_after(pb.ListObjectsRequest(continuation_token="not hex"))
    assert s3errors.from_domain(refused.value).code == "InvalidArgument"
    assert kv_layer.start_after(pb.ListObjectsRequest(continuation_token=b"k".hex())) == b"k"
    assert kv_layer.start_after(pb.ListObjectsRequest(start_after="a")) == b"a"


def _complete(number: str) -> bytes:
    return (
        b"<CompleteMultipartUpload><Part><PartNumber>%s</PartNumber><ETag>e</ETag></Part>"
        b"</CompleteMultipartUpload>" % number.encode()
    )


@pytest.mark.parametrize(
    ("number", "code"),
    [("²", "MalformedXML"), ("٣", "MalformedXML"), ("9" * 5000, "MalformedXML"),
     ("0", "InvalidArgument"), ("10001", "InvalidArgument"), ("4294967296", "InvalidArgument")],
)  # fmt: skip
def test_part_numbers_are_ascii_digits_from_1_to_10000(number: str, code: str) -> None:
    _refused(code, lambda: xmlio.parse_complete(_complete(number)))
    assert xmlio.parse_complete(_complete(" 10000 ")) == [(10000, "e", {})]


BOMB = (
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">]>'
    "<Delete><Quiet>&a;</Quiet><Object><Key>&a;</Key></Object></Delete>"
)


@pytest.mark.parametrize(
    "body",
    [BOMB.encode("utf-16"), BOMB.encode("utf-16-le"), BOMB.encode("utf-32"), b"<a>\x00</a>"],
    ids=["utf-16", "utf-16-without-bom", "utf-32", "nul"],
)
def test_dtds_in_other_encodings_are_refused(body: bytes) -> None:
    _refused("MalformedXML", lambda: xmlio.parse_delete(body))


@pytest.mark.parametrize("encoding", ["no-such", "rot13", "idna", "utf-7", "UTF-32", "punycode"])
def test_declared_encodings_are_ignored(encoding: str) -> None:
    body = (
        f'<?xml version="1.0" encoding="{encoding}"?><Delete><Object><Key>k</Key></Object></Delete>'
    ).encode()
    assert xmlio.parse_delete(body) == (False, ["k"])


def test_domain_errors_map_by_reason_not_by_message() -> None:
    """The S3 code comes from the error's typed reason; a message that happens to start with
    an S3 code changes nothing."""
    by_reason = s3errors.from_domain(errors.NotFound("upload u", reason="NoSuchUpload"))
    assert (by_reason.code, by_reason.status, by_reason.message) == (
        "NoSuchUpload",
        404,
        "upload u",
    )
    spoofed = s3errors.from_domain(errors.InvalidArgument("BucketNotEmpty: a user's text"))
    assert (spoofed.code, spoofed.status) == ("InvalidArgument", 400)
    unknown = s3errors.from_domain(
        errors.NotFound("k", reason="NotAnS3Code"), default_not_found="NoSuchBucket"
    )
    assert unknown.code == "NoSuchBucket"
    with pytest.raises(errors.InvalidArgument) as caught:
        names.check_bucket("Bad_Name")
    assert s3errors.from_domain(caught.value).code == "InvalidBucketName"
