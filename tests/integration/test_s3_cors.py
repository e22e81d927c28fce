"""S3 CORS against a real secure dev cluster, as AWS S3 documents and answers it: Put/Get/Delete
BucketCors with boto3 and awscli (minio-py 7.2 has no CORS call), on an ordinary and a KV
bucket, with the other-tenant denial next to each; the configurations S3 refuses, with nothing
stored; unsigned OPTIONS preflights (http.client over the cluster's TLS) for every answer S3
gives; and the CORS headers of actual requests, errors included. Every read compares bytes."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
APP = "https://app.example"
VARY = "Origin, Access-Control-Request-Headers, Access-Control-Request-Method"
RULES: list[dict[str, Any]] = [
    {
        "ID": "app",
        "AllowedHeaders": ["x-amz-*", "Content-Type"],
        "AllowedMethods": ["GET", "PUT", "HEAD"],
        "AllowedOrigins": [APP, "http://*.example.org"],
        "ExposeHeaders": ["ETag", "x-amz-request-id"],
        "MaxAgeSeconds": 600,
    },
    {"AllowedMethods": ["GET"], "AllowedOrigins": ["*"]},
]
ACAO = "access-control-allow-origin"


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    return _code(failed)


@pytest.fixture(scope="module")
def alice(s3_cluster_fixture: Info) -> tuple[str, str]:  # noqa: F811
    """A plain (not admin) user of tenant cors-a."""
    return s3_cluster.add_user(s3_cluster_fixture, "cors-a")


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: Info, alice: tuple[str, str]) -> Any:  # noqa: F811
    return s3_cluster.client(s3_cluster_fixture, *alice)


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of another tenant."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, "cors-b"))


def _create(s3: Any, bucket: str, kind: str) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = kind

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket=bucket)
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)


def _connection(info: Info) -> http.client.HTTPSConnection:
    url = urllib.parse.urlsplit(info["gateway_s3"])
    assert url.hostname
    assert url.port
    return http.client.HTTPSConnection(
        url.hostname, url.port, context=s3_cluster.tls_context(info), timeout=60
    )


def _raw(
    info: Info, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """An unsigned request: (status, lowercase headers, body)."""
    conn = _connection(info)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _signed_put(
    info: Info, path: str, body: bytes, headers: dict[str, str], keys: tuple[str, str]
) -> tuple[int, bytes]:
    """A PUT signed with SigV4 (botocore's signer, no SDK checksum added)."""
    url = info["gateway_s3"].rstrip("/") + path
    request = AWSRequest(method="PUT", url=url, data=body, headers=headers)
    S3SigV4Auth(Credentials(*keys), "s3", "us-east-1").add_auth(request)
    conn = _connection(info)
    try:
        conn.request("PUT", path, body=body, headers=dict(request.headers.items()))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _document(rule: str) -> bytes:
    return f"<CORSConfiguration><CORSRule>{rule}</CORSRule></CORSConfiguration>".encode()


def _error_code(body: bytes) -> str:
    return body.partition(b"<Code>")[2].partition(b"</Code>")[0].decode()


def _preflight(
    info: Info, path: str, origin: str | None, method: str | None, headers: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    sent = {}
    if origin is not None:
        sent["Origin"] = origin
    if method is not None:
        sent["Access-Control-Request-Method"] = method
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return _raw(info, "OPTIONS", path, sent)


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_put_get_delete_bucket_cors_with_boto3(s3: Any, other: Any, kind: str) -> None:
    bucket = f"cors-boto3-{kind}"
    _create(s3, bucket, kind)
    assert _fails(lambda: s3.get_bucket_cors(Bucket=bucket)) == ("NoSuchCORSConfiguration", 404)
    put = s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": RULES})
    assert put["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == RULES
    # Another tenant may neither read, replace nor delete it; it stays as it was.
    other_rules = {"CORSRules": [{"AllowedMethods": ["PUT"], "AllowedOrigins": ["*"]}]}
    assert _fails(lambda: other.get_bucket_cors(Bucket=bucket)) == ("AccessDenied", 403)
    assert _fails(lambda: other.put_bucket_cors(Bucket=bucket, CORSConfiguration=other_rules)) == (
        "AccessDenied",
        403,
    )
    assert _fails(lambda: other.delete_bucket_cors(Bucket=bucket)) == ("AccessDenied", 403)
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == RULES
    # Replaced whole, then deleted (twice: 204 without a configuration too).
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=other_rules)
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == other_rules["CORSRules"]
    for _ in range(2):
        deleted = s3.delete_bucket_cors(Bucket=bucket)
        assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert _fails(lambda: s3.get_bucket_cors(Bucket=bucket)) == ("NoSuchCORSConfiguration", 404)
    s3.delete_bucket(Bucket=bucket)
    assert _fails(lambda: s3.get_bucket_cors(Bucket=bucket)) == ("NoSuchBucket", 404)


def test_put_bucket_cors_refuses_what_s3_refuses_and_stores_nothing(
    s3: Any,
    alice: tuple[str, str],
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    bucket = "cors-refused"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": RULES})
    one = {"AllowedMethods": ["GET"], "AllowedOrigins": ["*"]}
    refused = [
        ({**one, "AllowedMethods": ["MYMETHOD"]}, "InvalidRequest"),
        ({**one, "AllowedOrigins": ["*example*.com"]}, "InvalidRequest"),
        ({**one, "AllowedHeaders": ["x-*-*"]}, "InvalidRequest"),
        ({**one, "ExposeHeaders": ["x-amz-meta-*"]}, "InvalidRequest"),
        ({**one, "ID": "i" * 256}, "InvalidArgument"),
    ]
    for rule, code in refused:
        config = {"CORSRules": [rule]}
        put = lambda c=config: s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=c)  # noqa: E731
        assert _fails(put) == (code, 400), rule
    too_many = {"CORSRules": [one] * 101}
    assert _fails(lambda: s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=too_many)) == (
        "MalformedXML",
        400,
    )
    # Raw bodies: the digest S3 requires (boto3 sends a CRC32), and malformed documents.
    info = s3_cluster_fixture
    good = _document("<AllowedOrigin>*</AllowedOrigin><AllowedMethod>PUT</AllowedMethod>")
    md5 = base64.b64encode(hashlib.md5(good).digest()).decode()
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    cases = [
        (good, {}, "InvalidRequest"),
        (good, {"Content-MD5": wrong}, "BadDigest"),
        (good, {"x-amz-checksum-crc32": "AAAAAA=="}, "BadDigest"),
        (b"<CORSConfiguration>", {"Content-MD5": "x"}, "InvalidDigest"),
        (b"<CORSConfiguration/>", {}, "MalformedXML"),
        (b"<CORSConfiguration><CORSRule/></CORSConfiguration>", {}, "MalformedXML"),
        (b"<CORSConfiguration", {}, "MalformedXML"),
    ]
    for body, headers, code in cases:
        if code == "MalformedXML":
            headers = {"Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()}
        status, answer = _signed_put(info, f"/{bucket}?cors", body, headers, alice)
        assert (status, _error_code(answer)) == (400, code), (body, headers)
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == RULES, "nothing stored"
    # The same body with its Content-MD5 is taken.
    assert _signed_put(info, f"/{bucket}?cors", good, {"Content-MD5": md5}, alice)[0] == 200
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == [
        {"AllowedMethods": ["PUT"], "AllowedOrigins": ["*"]}
    ]
    s3.delete_bucket(Bucket=bucket)


def test_awscli_put_get_delete_bucket_cors(
    s3_cluster_fixture: Info,  # noqa: F811
    tmp_path: Path,
) -> None:
    info = s3_cluster_fixture
    s3_cluster.aws_cli(info, "s3api", "create-bucket", "--bucket", "cors-cli")
    config = tmp_path / "cors.json"
    config.write_text(json.dumps({"CORSRules": RULES}))
    s3_cluster.aws_cli(
        info, "s3api", "put-bucket-cors", "--bucket", "cors-cli",
        "--cors-configuration", f"file://{config}",
    )  # fmt: skip
    got = s3_cluster.aws_cli(info, "s3api", "get-bucket-cors", "--bucket", "cors-cli")
    assert json.loads(got.stdout)["CORSRules"] == RULES
    s3_cluster.aws_cli(info, "s3api", "delete-bucket-cors", "--bucket", "cors-cli")
    missing = s3_cluster.aws_cli(
        info, "s3api", "get-bucket-cors", "--bucket", "cors-cli", check=False
    )
    assert missing.returncode != 0
    assert "NoSuchCORSConfiguration" in missing.stderr
    s3_cluster.aws_cli(info, "s3api", "delete-bucket", "--bucket", "cors-cli")


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_preflights_answer_as_s3(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    kind: str,
) -> None:
    info, bucket = s3_cluster_fixture, f"cors-pre-{kind}"
    assert _preflight(info, "/cors-pre-none/k", APP, "GET")[0] == 403
    status, _, answer = _preflight(info, "/cors-pre-none/k", APP, "GET")
    assert b"<Code>AccessForbidden</Code>" in answer
    assert b"CORSResponse: Bucket not found" in answer
    _create(s3, bucket, kind)
    secret = b"never in a preflight's answer"
    s3.put_object(Bucket=bucket, Key="k", Body=secret, Metadata={"m": "private-meta"})
    # No configuration: 403 for every origin; without Origin: 400.
    status, _, answer = _preflight(info, f"/{bucket}/k", APP, "PUT")
    assert status == 403
    assert b"CORSResponse: CORS is not enabled for this bucket." in answer
    assert b"<Method>PUT</Method><ResourceType>BUCKET</ResourceType>" in answer
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": RULES})
    for path in (f"/{bucket}", f"/{bucket}/k", f"/{bucket}/missing-key?uploads"):
        status, headers, answer = _preflight(info, path, APP, "PUT", "X-Amz-Meta-A,content-type")
        assert status == 200, answer
        assert answer == b""
        assert headers[ACAO] == APP
        assert headers["access-control-allow-credentials"] == "true"
        assert headers["access-control-allow-methods"] == "GET, PUT, HEAD"
        assert headers["access-control-allow-headers"] == "x-amz-meta-a, content-type"
        assert headers["access-control-expose-headers"] == "ETag, x-amz-request-id"
        assert headers["access-control-max-age"] == "600"
        assert headers["vary"] == VARY
        assert "etag" not in headers
        assert "x-amz-meta-m" not in headers
    # A pattern origin is echoed; any other origin falls to the `*` rule for GET only.
    status, headers, _ = _preflight(info, f"/{bucket}/k", "http://a.example.org", "HEAD")
    assert (status, headers[ACAO]) == (200, "http://a.example.org")
    status, headers, _ = _preflight(info, f"/{bucket}/k", "https://else.example", "GET")
    assert (status, headers[ACAO]) == (200, "*")
    assert "access-control-allow-credentials" not in headers
    refused = [
        ("https://else.example", "PUT", None),  # the `*` rule allows GET only
        (APP, "DELETE", None),
        (APP, "PUT", "authorization"),  # not an allowed header
        ("https://else.example", "GET", "x-amz-meta-a"),  # the `*` rule allows no header
        ("http://a.example.org/", "HEAD", None),  # a trailing slash is another origin
        (APP, "PUT", ",".join(f"x-amz-{n}" for n in range(129))),  # more than asked ever
    ]
    for origin, method, asked in refused:
        status, headers, answer = _preflight(info, f"/{bucket}/k", origin, method, asked)
        assert status == 403, (origin, method, asked)
        assert b"<Code>AccessForbidden</Code>" in answer
        assert b"This CORS request is not allowed" in answer
        assert ACAO not in headers
    most = ",".join(f"x-amz-{n}" for n in range(128))
    assert _preflight(info, f"/{bucket}/k", APP, "PUT", most)[0] == 200
    assert _preflight(info, f"/{bucket}/k", None, "GET")[0] == 400
    assert _preflight(info, f"/{bucket}/k", APP, None)[0] == 400
    # Nothing of the object in any answer.
    for method in ("GET", "PUT"):
        assert secret not in _preflight(info, f"/{bucket}/k", APP, method)[2]
    s3.delete_object(Bucket=bucket, Key="k")
    s3.delete_bucket(Bucket=bucket)


def test_a_preflight_reads_and_changes_nothing(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    info, bucket = s3_cluster_fixture, "cors-inert"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": RULES})
    data = b"the object stays as it was"
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    origin = {"Origin": APP, "Access-Control-Request-Method": "PUT"}
    forged = _document("<AllowedOrigin>*</AllowedOrigin><AllowedMethod>DELETE</AllowedMethod>")
    attempts = [
        (f"/{bucket}?cors", forged),
        (f"/{bucket}/k", b"overwritten by a preflight"),
        (f"/{bucket}/k?uploads", b""),
        (f"/{bucket}?delete", b"<Delete><Object><Key>k</Key></Object></Delete>"),
        (f"/{bucket}?acl", b""),
    ]
    for path, body in attempts:
        status, _, answer = _raw(info, "OPTIONS", path, origin, body)
        assert status == 200, (path, answer)
        assert answer == b""
    # Unsigned Get/Put/DeleteBucketCors: 403, the rules unread and unchanged.
    md5 = base64.b64encode(hashlib.md5(forged).digest()).decode()
    for method, body in (("GET", b""), ("PUT", forged), ("DELETE", b"")):
        status, _, answer = _raw(info, method, f"/{bucket}?cors", {"Content-MD5": md5}, body)
        assert (status, _error_code(answer)) == (403, "AccessDenied"), method
        assert APP.encode() not in answer
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"] == RULES
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    s3.delete_object(Bucket=bucket, Key="k")
    s3.delete_bucket(Bucket=bucket)


def _with_origin(client: Any, origin: str, method: str = "") -> None:
    def add(request: Any, **_: Any) -> None:
        request.headers["Origin"] = origin
        if method:
            request.headers["Access-Control-Request-Method"] = method

    client.meta.events.register("before-sign.s3.*", add)


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_actual_requests_carry_the_matching_rule_s_headers(
    s3: Any,
    alice: tuple[str, str],
    s3_cluster_fixture: Info,  # noqa: F811
    kind: str,
) -> None:
    info, bucket = s3_cluster_fixture, f"cors-actual-{kind}"
    _create(s3, bucket, kind)
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": RULES})
    data = hashlib.sha256(kind.encode()).digest() * 1000
    app = s3_cluster.client(info, *alice)
    _with_origin(app, APP)
    put = app.put_object(Bucket=bucket, Key="k", Body=data)
    assert put["ResponseMetadata"]["HTTPHeaders"][ACAO] == APP
    got = app.get_object(Bucket=bucket, Key="k")
    assert got["Body"].read() == data
    headers = got["ResponseMetadata"]["HTTPHeaders"]
    assert headers[ACAO] == APP
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-allow-methods"] == "GET, PUT, HEAD"
    assert headers["access-control-expose-headers"] == "ETag, x-amz-request-id"
    assert headers["access-control-max-age"] == "600"
    assert headers["vary"] == VARY
    assert "access-control-allow-headers" not in headers
    # Errors carry them too: a missing key, and an unsigned (anonymous) request.
    with pytest.raises(ClientError) as missing:
        app.get_object(Bucket=bucket, Key="missing")
    assert _code(missing) == ("NoSuchKey", 404)
    assert missing.value.response["ResponseMetadata"]["HTTPHeaders"][ACAO] == APP
    status, raw_headers, _ = _raw(info, "GET", f"/{bucket}/k", {"Origin": APP})
    assert status == 403
    assert raw_headers[ACAO] == APP
    # Any origin: the `*` rule (GET only); DELETE from there matches no rule.
    anyone = s3_cluster.client(info, *alice)
    _with_origin(anyone, "https://else.example")
    got = anyone.get_object(Bucket=bucket, Key="k")
    assert got["Body"].read() == data
    assert got["ResponseMetadata"]["HTTPHeaders"][ACAO] == "*"
    unmatched = anyone.head_object(Bucket=bucket, Key="k")["ResponseMetadata"]["HTTPHeaders"]
    assert ACAO not in unmatched
    assert "vary" not in unmatched
    # Access-Control-Request-Method on an actual request decides the match, as in S3.
    asking = s3_cluster.client(info, *alice)
    _with_origin(asking, "https://else.example", "PUT")
    asked = asking.get_object(Bucket=bucket, Key="k")
    assert asked["Body"].read() == data
    assert ACAO not in asked["ResponseMetadata"]["HTTPHeaders"]
    # Without an Origin header nothing is added.
    plain = s3.get_object(Bucket=bucket, Key="k")["ResponseMetadata"]["HTTPHeaders"]
    assert ACAO not in plain
    s3.delete_object(Bucket=bucket, Key="k")
    s3.delete_bucket(Bucket=bucket)
