"""S3 CORS's pure parts: the CORSConfiguration document (parsed and validated as S3 does,
rendered back), origin and header patterns, rule matching, the response headers, the body's
required digest and the routes (`?cors`, OPTIONS with any parameters)."""

from __future__ import annotations

import base64
import hashlib
import zlib
from unittest import mock

import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import body, cors, kv_ops, object_ops, s3errors, server

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
MINIMAL = "<AllowedOrigin>https://a.example</AllowedOrigin><AllowedMethod>GET</AllowedMethod>"


def _doc(*rules: str, ns: bool = True) -> bytes:
    inner = "".join(f"<CORSRule>{r}</CORSRule>" for r in rules)
    return f"<CORSConfiguration {NS if ns else ''}>{inner}</CORSConfiguration>".encode()


def _code(raw: bytes) -> tuple[str, str]:
    with pytest.raises(s3errors.S3Error) as failed:
        cors.parse(raw)
    return failed.value.code, failed.value.message


def test_parse_keeps_every_member_in_order() -> None:
    rule = (
        "<ID>r1</ID><AllowedHeader>x-amz-*</AllowedHeader><AllowedHeader>Authorization"
        "</AllowedHeader><AllowedMethod>PUT</AllowedMethod><AllowedMethod>GET</AllowedMethod>"
        "<AllowedOrigin>http://*.example.com</AllowedOrigin><AllowedOrigin>http://test.com:80"
        "</AllowedOrigin><ExposeHeader>ETag</ExposeHeader><MaxAgeSeconds>3000</MaxAgeSeconds>"
    )
    config = cors.parse(_doc(rule, MINIMAL))
    first, second = config.rules
    assert first.id == "r1"
    assert list(first.allowed_headers) == ["x-amz-*", "Authorization"]
    assert list(first.allowed_methods) == ["PUT", "GET"]
    assert list(first.allowed_origins) == ["http://*.example.com", "http://test.com:80"]
    assert list(first.expose_headers) == ["ETag"]
    assert first.max_age_seconds == 3000
    assert not second.HasField("max_age_seconds")
    assert not second.id
    # No namespace (the user guide's samples) parses the same; MaxAgeSeconds 0 is kept.
    zero = cors.parse(_doc(MINIMAL + "<MaxAgeSeconds>0</MaxAgeSeconds>", ns=False)).rules[0]
    assert zero.HasField("max_age_seconds")
    assert zero.max_age_seconds == 0


def test_render_round_trips() -> None:
    rule = (
        "<ID>r1</ID><AllowedHeader>*</AllowedHeader>" + MINIMAL + "<AllowedMethod>HEAD"
        "</AllowedMethod><ExposeHeader>x-amz-request-id</ExposeHeader><MaxAgeSeconds>5"
        "</MaxAgeSeconds>"
    )
    config = cors.parse(
        _doc(rule, "<AllowedOrigin></AllowedOrigin><AllowedMethod>DELETE</AllowedMethod>")
    )
    rendered = cors.render(config)
    assert rendered.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<CORSConfiguration')
    assert (
        b"<ID>r1</ID><AllowedHeader>*</AllowedHeader><AllowedMethod>GET</AllowedMethod>" in rendered
    )
    assert cors.parse(rendered) == config


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (b"<CORSConfiguration", "MalformedXML", ""),
        (_doc(), "MalformedXML", "did not validate"),
        (b"<Other><CORSRule>" + MINIMAL.encode() + b"</CORSRule></Other>", "MalformedXML", ""),
        (_doc("<AllowedMethod>GET</AllowedMethod>"), "MalformedXML", ""),
        (_doc("<AllowedOrigin>*</AllowedOrigin>"), "MalformedXML", ""),
        (_doc(""), "MalformedXML", ""),
        (_doc(MINIMAL + "<Bogus>1</Bogus>"), "MalformedXML", ""),
        (_doc(MINIMAL + "<ID>a</ID><ID>b</ID>"), "MalformedXML", ""),
        (_doc(MINIMAL + "<MaxAgeSeconds>1</MaxAgeSeconds><MaxAgeSeconds>2</MaxAgeSeconds>"),
         "MalformedXML", ""),
        (_doc(MINIMAL + "<MaxAgeSeconds>soon</MaxAgeSeconds>"), "MalformedXML", ""),
        (_doc(MINIMAL + "<MaxAgeSeconds>4294967296</MaxAgeSeconds>"), "MalformedXML", ""),
        (_doc(MINIMAL + "<MaxAgeSeconds>-1</MaxAgeSeconds>"), "InvalidRequest", "non-negative"),
        (_doc(MINIMAL + "<AllowedOrigin><x/></AllowedOrigin>"), "MalformedXML", ""),
        (_doc("<AllowedOrigin>*</AllowedOrigin><AllowedMethod>MYMETHOD</AllowedMethod>"),
         "InvalidRequest",
         "Found unsupported HTTP method in CORS config. Unsupported method is MYMETHOD"),
        (_doc("<AllowedOrigin>*</AllowedOrigin><AllowedMethod>OPTIONS</AllowedMethod>"),
         "InvalidRequest", "Unsupported method is OPTIONS"),
        (_doc("<AllowedOrigin>*</AllowedOrigin><AllowedMethod>get</AllowedMethod>"),
         "InvalidRequest", "Unsupported method is get"),
        (_doc("<AllowedOrigin>*</AllowedOrigin><AllowedMethod></AllowedMethod>"),
         "InvalidRequest", "Unsupported method is "),
        (_doc("<AllowedOrigin>*example*.com</AllowedOrigin><AllowedMethod>GET</AllowedMethod>"),
         "InvalidRequest", 'AllowedOrigin "*example*.com" can not have more than one wildcard.'),
        (_doc(MINIMAL + "<AllowedHeader>**</AllowedHeader>"),
         "InvalidRequest", 'AllowedHeader "**" can not have more than one wildcard.'),
        (_doc(MINIMAL + "<ExposeHeader>x-amz-meta-*</ExposeHeader>"),
         "InvalidRequest",
         'ExposeHeader "x-amz-meta-*" contains wildcard. We currently do not support wildcard'),
        (_doc(MINIMAL + f"<ID>{'i' * 256}</ID>"), "InvalidArgument", "255"),
        (_doc(*[MINIMAL] * 101), "MalformedXML", "at most 100 rules"),
        (b'<!DOCTYPE x [<!ENTITY a "b">]>' + _doc(MINIMAL), "MalformedXML", "DTD"),
        (_doc(MINIMAL).decode().encode("utf-16"), "MalformedXML", ""),
        (_doc(MINIMAL + f"<ExposeHeader>{'h' * (64 << 10)}</ExposeHeader>"), "MalformedXML", ""),
    ],
)  # fmt: skip
def test_parse_refuses_what_s3_refuses(raw: bytes, code: str, message: str) -> None:
    got_code, got_message = _code(raw)
    assert got_code == code
    assert message in got_message


def test_parse_takes_100_rules_and_many_values_per_rule() -> None:
    assert len(cors.parse(_doc(*[MINIMAL] * 100)).rules) == 100
    origins = "".join(f"<AllowedOrigin>https://o{i}.example</AllowedOrigin>" for i in range(60))
    rule = cors.parse(_doc(origins + "<AllowedMethod>GET</AllowedMethod>")).rules[0]
    assert len(rule.allowed_origins) == 60


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("*", "anything", True),
        ("*suffix", "foo.suffix", True),
        ("*suffix", "foo.suffix.get", False),
        ("start*end", "startend", True),
        ("start*end", "start12end", True),
        ("start*end", "0start12end", False),
        ("start*end", "startnd", False),  # head and tail may not overlap
        ("prefix*", "prefix", True),
        ("prefix*", "bla.prefix", False),
        ("http://*.origin.com", "http://test.origin.com", True),
        ("http://*.origin.com", "http://test.origin.com/", False),
        ("http://www.example.com", "https://www.example.com", False),
        ("http://www.example.com", "http://www.example.com:80", False),
        ("http://www.example.com", "http://WWW.example.com", False),
    ],
)
def test_origin_patterns(pattern: str, value: str, expected: bool) -> None:
    assert cors.wildcard_match(pattern, value) is expected


def test_header_patterns_ignore_case() -> None:
    assert cors.wildcard_match(
        "x-AMZ-server-SIDE-encryption", "x-amz-server-side-encryption", fold_case=True
    )
    assert cors.wildcard_match("x-amz-*", "X-Amz-Meta-A", fold_case=True)
    assert not cors.wildcard_match("x-amz-*", "authorization", fold_case=True)


def test_request_headers_are_lowercased_in_order() -> None:
    assert cors.request_headers("x-AMZ-expected-BUCKET-owner, x-amz-server-side-encryption") == [
        "x-amz-expected-bucket-owner",
        "x-amz-server-side-encryption",
    ]
    assert cors.request_headers("b,a,,  ") == ["b", "a"]
    assert cors.request_headers("") == []


def _rules() -> list[metadata_pb2.CorsRule]:
    return list(
        cors.parse(
            _doc(
                "<ID>puts</ID><AllowedOrigin>*.put</AllowedOrigin><AllowedMethod>PUT</AllowedMethod>"
                "<AllowedHeader>x-amz-*</AllowedHeader><AllowedHeader>content-type</AllowedHeader>",
                "<ID>gets</ID><AllowedOrigin>https://app.example</AllowedOrigin>"
                "<AllowedMethod>GET</AllowedMethod><AllowedMethod>HEAD</AllowedMethod>"
                "<ExposeHeader>ETag</ExposeHeader><MaxAgeSeconds>600</MaxAgeSeconds>",
                "<ID>any</ID><AllowedOrigin>*</AllowedOrigin><AllowedMethod>GET</AllowedMethod>",
            )
        ).rules
    )


def test_the_first_matching_rule_answers() -> None:
    rules = _rules()

    def matched(origin: str, method: str, headers: tuple[str, ...] = ()) -> str | None:
        rule = cors.match(rules, origin, method, headers)
        return None if rule is None else rule.id

    assert matched("https://app.example", "GET") == "gets"
    assert matched("https://other.example", "GET") == "any"
    assert matched("https://other.example", "HEAD") is None
    assert matched("foo.put", "PUT", ("x-amz-meta-a", "content-type")) == "puts"
    assert matched("foo.put", "PUT", ("x-amz-meta-a", "authorization")) is None
    assert matched("foo.put", "DELETE") is None
    # A rule without AllowedHeader allows no requested header.
    assert matched("https://app.example", "GET", ("x-custom",)) is None
    assert cors.match([], "https://app.example", "GET") is None


def test_response_headers_echo_the_origin_or_a_wildcard() -> None:
    puts, gets, anyone = _rules()
    assert cors.response_headers(gets, "https://app.example") == {
        "Access-Control-Allow-Origin": "https://app.example",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, HEAD",
        "Access-Control-Expose-Headers": "ETag",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin, Access-Control-Request-Headers, Access-Control-Request-Method",
    }
    assert cors.response_headers(anyone, "https://x.example") == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET",
        "Vary": cors.VARY,
    }
    answered = cors.response_headers(puts, "a.put", ["x-amz-meta-a", "content-type"])
    assert answered["Access-Control-Allow-Headers"] == "x-amz-meta-a, content-type"
    assert answered["Access-Control-Allow-Origin"] == "a.put"


def _request(headers: dict[str, str], raw: bytes) -> server.S3Request:
    http = make_mocked_request("PUT", "/b?cors", headers=headers)
    payload = body.Payload(mock.Mock(spec=streams.StreamReader), size=len(raw))
    return server.S3Request(http, "RID", "b", "", {"cors": ""}, cors.NOBODY, payload)


def test_a_configuration_body_needs_a_matching_digest() -> None:
    raw = _doc(MINIMAL)
    md5 = base64.b64encode(hashlib.md5(raw).digest()).decode()
    crc32 = base64.b64encode(zlib.crc32(raw).to_bytes(4, "big")).decode()
    object_ops.check_body_digest(_request({"Content-MD5": md5}, raw), raw)
    object_ops.check_body_digest(_request({"x-amz-checksum-crc32": crc32}, raw), raw)
    announced = {"x-amz-checksum-algorithm": "CRC32", "x-amz-checksum-crc32": crc32}
    object_ops.check_body_digest(_request(announced, raw), raw)
    refused = [
        ({}, "InvalidRequest"),
        ({"Content-MD5": base64.b64encode(hashlib.md5(b"x").digest()).decode()}, "BadDigest"),
        ({"Content-MD5": "not base64!"}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": "AAAAAA=="}, "BadDigest"),
        ({"x-amz-checksum-md4": "AAAAAA=="}, "InvalidRequest"),
        ({"x-amz-checksum-crc32": "ü-not-ascii"}, "BadDigest"),
        ({"x-amz-checksum-algorithm": "CRC32"}, "InvalidRequest"),  # announced, not sent
    ]
    for headers, code in refused:
        with pytest.raises(s3errors.S3Error) as failed:
            object_ops.check_body_digest(_request(headers, raw), raw)
        assert failed.value.code == code, headers


@pytest.mark.parametrize(
    ("method", "key", "query", "op"),
    [
        ("GET", "", {"cors": ""}, "GetBucketCors"),
        ("PUT", "", {"cors": ""}, "PutBucketCors"),
        ("DELETE", "", {"cors": ""}, "DeleteBucketCors"),
        ("OPTIONS", "", {}, cors.PREFLIGHT),
        ("OPTIONS", "k", {}, cors.PREFLIGHT),
        # A preflight carries its actual request's parameters, even unimplemented ones.
        ("OPTIONS", "k", {"uploads": ""}, cors.PREFLIGHT),
        ("OPTIONS", "k", {"website": ""}, cors.PREFLIGHT),
    ],
)
def test_routes(method: str, key: str, query: dict[str, str], op: str) -> None:
    s3 = server.S3Server(mock.Mock(), mock.Mock())
    assert s3.route(method, "b", key, query)[0] == op
    # Bucket configuration: the same on KV buckets.
    assert op in kv_ops.SHARED


def test_options_on_the_service_is_not_a_preflight() -> None:
    with pytest.raises(s3errors.S3Error) as failed:
        server.S3Server(mock.Mock(), mock.Mock()).route("OPTIONS", "", "", {})
    assert failed.value.code == "MethodNotAllowed"
