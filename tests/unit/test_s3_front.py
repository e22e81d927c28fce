"""The S3 front's pure parts: addressing (path and virtual-host style), routing, ranges,
conditional requests, the XML bodies, SigV4 against AWS's documented example and botocore's
signer, and aws-chunked decoding of bodies botocore builds."""

from __future__ import annotations

import datetime
import hashlib
import io
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from services.gateway.s3 import awschunked, object_ops, s3errors, server, signing, xmlio


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


# SigV4.


def _headers(request: AWSRequest) -> Any:
    from multidict import CIMultiDict

    return CIMultiDict(request.headers.items())


def test_aws_documented_get_object_example() -> None:
    # AWS's "Signature Calculations for the Authorization Header" example (GET Object, with a
    # range), secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, 20130524T000000Z.
    from multidict import CIMultiDict

    headers = CIMultiDict(
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Range": "bytes=0-9",
            "x-amz-content-sha256": signing.EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/"
            "us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;"
            "x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        }
    )
    signed = signing.parse({}, headers)
    assert signed is not None
    signing.verify(
        signed, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", method="GET", raw_path="/test.txt",
        raw_query="", headers=headers, getall=headers.getall,
    )  # fmt: skip
    when = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC).timestamp()
    signing.check_time(signed, when + 60, "us-east-1")
    with pytest.raises(s3errors.S3Error) as skew:
        signing.check_time(signed, when + 16 * 60, "us-east-1")
    assert skew.value.code == "RequestTimeTooSkewed"
    with pytest.raises(s3errors.S3Error) as region:
        signing.check_time(signed, when, "eu-west-1")
    assert region.value.code == "AuthorizationHeaderMalformed"
    with pytest.raises(s3errors.S3Error) as wrong:
        signing.verify(
            signed, "wrong", method="GET", raw_path="/test.txt", raw_query="", headers=headers,
            getall=headers.getall,
        )  # fmt: skip
    assert wrong.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    "query",
    ["", "prefix=a%20b&delimiter=%2F", "list-type=2&prefix=%E2%9C%93&start-after=x%2By", "acl"],
)
def test_botocore_signatures_verify_and_tampering_is_caught(query: str) -> None:
    url = "http://127.0.0.1:9000/bkt/a%20b%2Bc/%C3%BC" + (f"?{query}" if query else "")
    request = AWSRequest(method="GET", url=url)
    request.headers["x-amz-content-sha256"] = signing.EMPTY_SHA256
    S3SigV4Auth(Credentials("AK", "SK"), "s3", "us-east-1").add_auth(request)
    headers = _headers(request)
    headers["Host"] = "127.0.0.1:9000"
    signed = signing.parse({}, headers)
    assert signed is not None
    raw_path = "/bkt/a%20b%2Bc/%C3%BC"
    signing.verify(
        signed, "SK", method="GET", raw_path=raw_path, raw_query=query, headers=headers,
        getall=headers.getall,
    )  # fmt: skip
    for method, path, q in (("PUT", raw_path, query), ("GET", "/bkt/other", query),
                            ("GET", raw_path, query + "&x=1")):  # fmt: skip
        with pytest.raises(s3errors.S3Error, match="signature"):
            signing.verify(
                signed, "SK", method=method, raw_path=path, raw_query=q, headers=headers,
                getall=headers.getall,
            )  # fmt: skip


def _chunked(chunks: list[bytes], trailer: dict[str, str] | None = None) -> bytes:
    out = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n"
    for name, value in (trailer or {}).items():
        out += f"{name}:{value}\r\n".encode()
    return out + b"\r\n"


def _decode(raw: bytes, pieces: int, **kw: Any) -> tuple[bytes, dict[str, str]]:
    decoder = awschunked.ChunkDecoder(**kw)
    out = io.BytesIO()
    step = max(1, len(raw) // pieces)
    for at in range(0, len(raw), step):
        for piece in decoder.feed(raw[at : at + step]):
            out.write(piece)
    return out.getvalue(), decoder.finish()


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_unsigned_chunked_body_with_trailer(pieces: int) -> None:
    data = hashlib.sha256(b"x").digest() * 5000
    raw = _chunked([data[:65536], data[65536:]], {"x-amz-checksum-crc32": "AAAAAA=="})
    got, trailers = _decode(raw, pieces, signed=False, trailer=True)
    assert got == data
    assert trailers == {"x-amz-checksum-crc32": "AAAAAA=="}


def test_signed_chunks_verify_and_a_flipped_byte_fails() -> None:
    key = signing.signing_key("SK", "20260101", "us-east-1")
    scope, date, seed = "20260101/us-east-1/s3/aws4_request", "20260101T000000Z", "ab" * 32
    chunks, previous, raw = [b"a" * 70000, b"b" * 5], seed, b""
    for chunk in [*chunks, b""]:
        to_sign = "\n".join(
            ("AWS4-HMAC-SHA256-PAYLOAD", date, scope, previous, signing.EMPTY_SHA256,
             hashlib.sha256(chunk).hexdigest())
        )  # fmt: skip
        previous = signing.sign(key, to_sign)
        raw += f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + chunk + b"\r\n"
    kw = {"signed": True, "trailer": False, "key": key, "seed": seed, "amz_date": date,
          "scope": scope}  # fmt: skip
    got, _ = _decode(raw, 13, **kw)
    assert got == b"".join(chunks)
    flipped = raw.replace(b"bbbbb", b"bbbbc")
    with pytest.raises(s3errors.S3Error) as bad:
        _decode(flipped, 3, **kw)
    assert bad.value.code == "SignatureDoesNotMatch"
    with pytest.raises(s3errors.S3Error) as short:
        _decode(raw[: len(raw) // 2], 3, **kw)
    assert short.value.code == "IncompleteBody"
