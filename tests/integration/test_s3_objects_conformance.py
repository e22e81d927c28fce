"""S3 object-level behaviours against a real dev cluster, as AWS S3 documents them: 304s that
carry the validators, ranges on empty objects, PUT bodies of unknown length (plain HTTP chunked),
`Expect: 100-continue` authenticated before the body, copies that stay inside the caller's
tenant, and GET / HEAD / PUT behaving the same on both bucket kinds (one handler each, through
the bucket's object layer: partNumber, checksum mode, If-Match on a PUT, versionId). boto3
where it can say it; http.client or a raw TLS socket, signed with botocore's SigV4Auth, where it
cannot. Every read compares bytes."""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
Info = dict[str, Any]


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture(scope="module")
def alice(s3_cluster_fixture: Info) -> tuple[str, str]:  # noqa: F811
    """A plain (not admin) user of tenant conf-a."""
    return s3_cluster.add_user(s3_cluster_fixture, "conf-a")


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: Info, alice: tuple[str, str]) -> Any:  # noqa: F811
    return s3_cluster.client(s3_cluster_fixture, *alice)


@pytest.fixture(scope="module")
def kv_bucket(s3: Any) -> str:
    """A KV bucket of alice's."""

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket="conf-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    return "conf-kv"


def _signed(
    info: Info,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    keys: tuple[str, str],
) -> dict[str, str]:
    """headers plus Host, X-Amz-Date and a SigV4 Authorization for keys (access, secret)."""
    url = info["gateway_s3"].rstrip("/") + path
    request = AWSRequest(method=method, url=url, headers=headers)
    SigV4Auth(Credentials(*keys), "s3", "us-east-1").add_auth(request)
    signed = dict(request.headers.items())
    signed["Host"] = urllib.parse.urlsplit(url).netloc
    return signed


def _connection(info: Info) -> http.client.HTTPSConnection:
    url = urllib.parse.urlsplit(info["gateway_s3"])
    assert url.hostname
    assert url.port
    return http.client.HTTPSConnection(
        url.hostname, url.port, context=s3_cluster.tls_context(info), timeout=60
    )


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


# 1. 304 Not Modified carries ETag and Last-Modified.


def _assert_not_modified(exc: pytest.ExceptionInfo[ClientError], etag: str, modified: str) -> None:
    assert _code(exc)[1] == 304
    headers = exc.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert headers.get("etag") == etag
    assert headers.get("last-modified") == modified


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_not_modified_carries_etag_and_last_modified(s3: Any, kv_bucket: str, kind: str) -> None:
    bucket = kv_bucket if kind == "kv" else "conf-304"
    if kind == "objects":
        s3.create_bucket(Bucket=bucket)
    data = _data(1, 3 * MIB + 5)
    put = s3.put_object(Bucket=bucket, Key="k", Body=data)
    head = s3.head_object(Bucket=bucket, Key="k")
    etag = head["ResponseMetadata"]["HTTPHeaders"]["etag"]
    modified = head["ResponseMetadata"]["HTTPHeaders"]["last-modified"]
    # The MD5, except a KV bucket's PUT vouched for by a trailing checksum (boto3's default over
    # HTTPS): its version id (docs/s3.md, KV buckets → ETags).
    assert etag == put["ETag"]
    if kind == "objects":
        assert etag == f'"{hashlib.md5(data).hexdigest()}"'
    later = head["LastModified"] + datetime.timedelta(seconds=1)
    for call in (s3.get_object, s3.head_object):
        with pytest.raises(ClientError) as matched:
            call(Bucket=bucket, Key="k", IfNoneMatch=etag)
        _assert_not_modified(matched, etag, modified)
        with pytest.raises(ClientError) as unmodified:
            call(Bucket=bucket, Key="k", IfModifiedSince=later)
        _assert_not_modified(unmodified, etag, modified)
    assert s3.get_object(Bucket=bucket, Key="k", IfNoneMatch='"other"')["Body"].read() == data


# 2. A range on an empty object is InvalidRange.


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_range_on_empty_object_is_invalid_range(s3: Any, kv_bucket: str, kind: str) -> None:
    bucket = kv_bucket if kind == "kv" else "conf-empty"
    if kind == "objects":
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    for spec in ("bytes=0-", "bytes=0-0", "bytes=5-10"):
        with pytest.raises(ClientError) as get:
            s3.get_object(Bucket=bucket, Key="empty", Range=spec)
        assert _code(get) == ("InvalidRange", 416), spec
        with pytest.raises(ClientError) as head:
            s3.head_object(Bucket=bucket, Key="empty", Range=spec)
        assert _code(head)[1] == 416, spec
    # A suffix range on an empty object is the whole (empty) object: never `bytes 0--1/0`.
    tail = s3.get_object(Bucket=bucket, Key="empty", Range="bytes=-5")
    assert tail["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert "ContentRange" not in tail
    assert tail["Body"].read() == b""
    whole = s3.get_object(Bucket=bucket, Key="empty")
    assert whole["ContentLength"] == 0
    assert whole["Body"].read() == b""


# 3. PUT with Transfer-Encoding: chunked and no Content-Length.


def _chunked_put(
    info: Info, keys: tuple[str, str], path: str, data: bytes, payload_hash: str
) -> tuple[int, bytes]:
    headers = _signed(info, "PUT", path, {"x-amz-content-sha256": payload_hash}, keys=keys)
    conn = _connection(info)
    try:
        # An iterable body and no Content-Length: http.client sends Transfer-Encoding: chunked.
        conn.request("PUT", path, body=_pieces(data, 3 * MIB + 7), headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_put_with_plain_chunked_body(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    alice: tuple[str, str],
) -> None:
    info = s3_cluster_fixture
    s3.create_bucket(Bucket="conf-chunked")
    # Larger than one engine call (whole stripes of a 64 MiB staging slot), ending mid-stripe.
    big = _data(2, 45 * MIB + 123)
    status, body = _chunked_put(info, alice, "/conf-chunked/big", big, "UNSIGNED-PAYLOAD")
    assert status == 200, body
    got = s3.get_object(Bucket="conf-chunked", Key="big")
    assert got["ETag"] == f'"{hashlib.md5(big).hexdigest()}"'
    assert got["Body"].read() == big
    small = _data(3, 1000)
    signed = hashlib.sha256(small).hexdigest()
    status, body = _chunked_put(info, alice, "/conf-chunked/small", small, signed)
    assert status == 200, body
    assert s3.get_object(Bucket="conf-chunked", Key="small")["Body"].read() == small
    status, _ = _chunked_put(info, alice, "/conf-chunked/empty", b"", "UNSIGNED-PAYLOAD")
    assert status == 200
    assert s3.get_object(Bucket="conf-chunked", Key="empty")["Body"].read() == b""
    # The signed hash is checked once the body is in: a mismatch stores nothing.
    status, body = _chunked_put(info, alice, "/conf-chunked/small", _data(4, 1000), signed)
    assert status == 400
    assert b"<Code>XAmzContentSHA256Mismatch</Code>" in body
    assert s3.get_object(Bucket="conf-chunked", Key="small")["Body"].read() == small


def test_put_without_length_or_chunked_is_missing_content_length(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    alice: tuple[str, str],
) -> None:
    info = s3_cluster_fixture
    s3.create_bucket(Bucket="conf-nolength")
    path = "/conf-nolength/k"
    headers = _signed(info, "PUT", path, {"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}, keys=alice)
    conn = _connection(info)
    try:
        conn.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 411
    assert b"<Code>MissingContentLength</Code>" in body


def test_chunked_put_into_another_tenants_bucket_is_denied(
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    info = s3_cluster_fixture
    owner = s3_cluster.client(info, *s3_cluster.add_user(info, "conf-owner"))
    owner.create_bucket(Bucket="conf-owned")
    intruder = s3_cluster.add_user(info, "conf-intruder")
    status, body = _chunked_put(info, intruder, "/conf-owned/k", b"x" * 100, "UNSIGNED-PAYLOAD")
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body
    with pytest.raises(ClientError) as missing:
        owner.head_object(Bucket="conf-owned", Key="k")
    assert _code(missing)[1] == 404


#: The largest KV object (services/gateway/s3/kv_layout.py MAX_KV_OBJECT_BYTES).
MAX_KV_OBJECT = 64 * MIB


def test_put_with_plain_chunked_body_into_a_kv_bucket(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    alice: tuple[str, str],
    kv_bucket: str,
) -> None:
    """The body streams into the object's blocks as it comes: exactly the maximum is stored,
    one byte more is EntityTooLarge (counted while streaming) and stores nothing."""
    info = s3_cluster_fixture
    biggest = _data(5, MAX_KV_OBJECT + 1)
    most = biggest[:MAX_KV_OBJECT]
    status, body = _chunked_put(info, alice, f"/{kv_bucket}/chunked-max", most, "UNSIGNED-PAYLOAD")
    assert status == 200, body
    got = s3.get_object(Bucket=kv_bucket, Key="chunked-max")
    assert got["ETag"] == f'"{hashlib.md5(most).hexdigest()}"'
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(most).digest()
    for key in ("chunked-max", "chunked-over"):  # an overwrite, a new key: nothing stored
        status, body = _chunked_put(info, alice, f"/{kv_bucket}/{key}", biggest, "UNSIGNED-PAYLOAD")
        assert status == 400
        assert b"<Code>EntityTooLarge</Code>" in body
    again = s3.get_object(Bucket=kv_bucket, Key="chunked-max", Range="bytes=-100")
    assert again["Body"].read() == most[-100:]
    with pytest.raises(ClientError) as absent:
        s3.head_object(Bucket=kv_bucket, Key="chunked-over")
    assert _code(absent)[1] == 404
    small = _data(6, 3 * MIB + 11)  # more than the first read, across the pieces
    signed = hashlib.sha256(small).hexdigest()
    status, body = _chunked_put(info, alice, f"/{kv_bucket}/chunked-small", small, signed)
    assert status == 200, body
    assert s3.get_object(Bucket=kv_bucket, Key="chunked-small")["Body"].read() == small
    status, body = _chunked_put(info, alice, f"/{kv_bucket}/chunked-small", small[1:], signed)
    assert status == 400
    assert b"<Code>XAmzContentSHA256Mismatch</Code>" in body
    assert s3.get_object(Bucket=kv_bucket, Key="chunked-small")["Body"].read() == small
    status, _ = _chunked_put(info, alice, f"/{kv_bucket}/chunked-empty", b"", "UNSIGNED-PAYLOAD")
    assert status == 200
    assert s3.get_object(Bucket=kv_bucket, Key="chunked-empty")["Body"].read() == b""


def test_chunked_put_into_another_tenants_kv_bucket_is_denied(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    kv_bucket: str,
) -> None:
    info = s3_cluster_fixture
    intruder = s3_cluster.add_user(info, "conf-kv-intruder")
    path = f"/{kv_bucket}/theirs"
    status, body = _chunked_put(info, intruder, path, b"x" * 100, "UNSIGNED-PAYLOAD")
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=kv_bucket, Key="theirs")
    assert _code(missing)[1] == 404


# 4. Expect: 100-continue is answered only once the signature holds.


def _expect_request(info: Info, keys: tuple[str, str], path: str, data: bytes) -> bytes:
    """The request line and headers of a PUT of data announcing Expect: 100-continue."""
    headers = _signed(
        info, "PUT", path,
        {"x-amz-content-sha256": hashlib.sha256(data).hexdigest(),
         "Content-Length": str(len(data))},
        keys=keys,
    )  # fmt: skip
    headers["Expect"] = "100-continue"
    lines = [f"PUT {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def _tls_socket(info: Info) -> Any:
    url = urllib.parse.urlsplit(info["gateway_s3"])
    assert url.hostname
    assert url.port
    raw = socket.create_connection((url.hostname, url.port), timeout=30)
    return s3_cluster.tls_context(info).wrap_socket(raw, server_hostname=url.hostname)


def _read_response(sock: Any) -> tuple[str, bytes]:
    """(status line, the rest) of one response: read until the connection closes or a
    Content-Length's worth of body is in."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    return status_line, head + b"\r\n\r\n" + rest


@pytest.mark.parametrize("failure", ["SignatureDoesNotMatch", "InvalidAccessKeyId"])
def test_expect_continue_with_a_bad_signature_is_refused_first(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    alice: tuple[str, str],
    failure: str,
) -> None:
    info = s3_cluster_fixture
    s3.create_bucket(Bucket="conf-expect")
    wrong = {
        "SignatureDoesNotMatch": (alice[0], "wrong" + alice[1]),
        "InvalidAccessKeyId": ("AKIANOSUCHUSER000000", alice[1]),
    }
    keys = wrong[failure]
    data = _data(5, MIB)
    with _tls_socket(info) as sock:
        sock.sendall(_expect_request(info, keys, f"/conf-expect/{failure}", data))
        status, response = _read_response(sock)
    assert status.startswith("HTTP/1.1 403"), status
    assert f"<Code>{failure}</Code>".encode() in response
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket="conf-expect", Key=failure)
    assert _code(missing)[1] == 404


def test_expect_continue_with_a_good_signature_continues(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    alice: tuple[str, str],
) -> None:
    info = s3_cluster_fixture
    s3.create_bucket(Bucket="conf-expect-ok")
    data = _data(6, MIB + 1)
    with _tls_socket(info) as sock:
        sock.sendall(_expect_request(info, alice, "/conf-expect-ok/k", data))
        first, _ = _read_response(sock)
        assert first.startswith("HTTP/1.1 100"), first
        sock.sendall(data)
        status, response = _read_response(sock)
    assert status.startswith("HTTP/1.1 200"), response
    got = s3.get_object(Bucket="conf-expect-ok", Key="k")
    assert got["Body"].read() == data


# 5. Copies never read another tenant's bucket.


def test_copy_from_another_tenants_bucket_is_denied(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    info = s3_cluster_fixture
    other = s3_cluster.client(info, *s3_cluster.add_user(info, "conf-b"))
    other.create_bucket(Bucket="conf-b-src")
    secret = _data(7, 6 * MIB)
    other.put_object(Bucket="conf-b-src", Key="secret", Body=secret)
    s3.create_bucket(Bucket="conf-a-dst")
    with pytest.raises(ClientError) as copy:
        s3.copy_object(Bucket="conf-a-dst", Key="stolen", CopySource="conf-b-src/secret")
    assert _code(copy) == ("AccessDenied", 403)
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket="conf-a-dst", Key="stolen")
    assert _code(missing)[1] == 404
    upload = s3.create_multipart_upload(Bucket="conf-a-dst", Key="parts")["UploadId"]
    try:
        for ranged in ({}, {"CopySourceRange": f"bytes=0-{5 * MIB - 1}"}):
            with pytest.raises(ClientError) as part_copy:
                s3.upload_part_copy(
                    Bucket="conf-a-dst", Key="parts", UploadId=upload, PartNumber=1,
                    CopySource={"Bucket": "conf-b-src", "Key": "secret"}, **ranged,
                )  # fmt: skip
            assert _code(part_copy) == ("AccessDenied", 403)
        assert s3.list_parts(Bucket="conf-a-dst", Key="parts", UploadId=upload).get("Parts") in (
            None,
            [],
        )
    finally:
        s3.abort_multipart_upload(Bucket="conf-a-dst", Key="parts", UploadId=upload)
    # The owner copies within its tenant as ever.
    other.copy_object(Bucket="conf-b-src", Key="copy", CopySource="conf-b-src/secret")
    assert other.get_object(Bucket="conf-b-src", Key="copy")["Body"].read() == secret


# 6. GetObject, HeadObject and PutObject are one handler for both bucket kinds (through the
# bucket's object layer): what was once served on erasure-coded buckets only now holds on KV
# buckets too.


def _bucket(s3: Any, kv_bucket: str, kind: str, name: str) -> str:
    if kind == "kv":
        return kv_bucket
    s3.create_bucket(Bucket=name)
    return name


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_part_number_reads_one_part(s3: Any, kv_bucket: str, kind: str) -> None:
    bucket = _bucket(s3, kv_bucket, kind, "conf-parts")
    plain = _data(11, 1000)
    s3.put_object(Bucket=bucket, Key="plain", Body=plain)
    for call in (s3.get_object, s3.head_object):
        one = call(Bucket=bucket, Key="plain", PartNumber=1)  # a plain object: one part
        assert one["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert one["ContentRange"] == "bytes 0-999/1000"
        with pytest.raises(ClientError) as past:
            call(Bucket=bucket, Key="plain", PartNumber=2)
        assert _code(past)[1] == 416
        with pytest.raises(ClientError) as both:
            call(Bucket=bucket, Key="plain", PartNumber=1, Range="bytes=0-1")
        assert _code(both)[1] == 400
    with pytest.raises(ClientError) as past:
        s3.get_object(Bucket=bucket, Key="plain", PartNumber=2)
    assert _code(past) == ("InvalidPartNumber", 416)
    assert s3.get_object(Bucket=bucket, Key="plain", PartNumber=1)["Body"].read() == plain
    parts = [_data(12, 5 * MIB), _data(13, MIB + 3)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    done = [
        {"PartNumber": n, "ETag": s3.upload_part(
            Bucket=bucket, Key="mp", UploadId=upload, PartNumber=n, Body=body
        )["ETag"]}
        for n, body in enumerate(parts, 1)
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload, MultipartUpload={"Parts": done}
    )
    second = s3.get_object(Bucket=bucket, Key="mp", PartNumber=2)
    total = 6 * MIB + 3
    assert second["ContentRange"] == f"bytes {5 * MIB}-{total - 1}/{total}"
    assert second["PartsCount"] == 2
    assert hashlib.sha256(second["Body"].read()).digest() == hashlib.sha256(parts[1]).digest()
    first = s3.head_object(Bucket=bucket, Key="mp", PartNumber=1)
    assert (first["ContentLength"], first["PartsCount"]) == (5 * MIB, 2)


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_checksum_mode_returns_the_stored_checksum(s3: Any, kv_bucket: str, kind: str) -> None:
    bucket = _bucket(s3, kv_bucket, kind, "conf-sums")
    data = _data(14, 100_000)
    want = base64.b64encode(hashlib.sha256(data).digest()).decode()
    put = s3.put_object(Bucket=bucket, Key="k", Body=data, ChecksumAlgorithm="SHA256")
    assert put["ChecksumSHA256"] == want
    for call in (s3.get_object, s3.head_object):
        assert call(Bucket=bucket, Key="k", ChecksumMode="ENABLED")["ChecksumSHA256"] == want
        # A range is not the whole object: no whole-object checksum.
        ranged = call(Bucket=bucket, Key="k", ChecksumMode="ENABLED", Range="bytes=0-9")
        assert "ChecksumSHA256" not in ranged
    assert "ChecksumSHA256" not in s3.head_object(Bucket=bucket, Key="k")  # not asked for
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_put_conditions_and_version_ids(s3: Any, kv_bucket: str, kind: str) -> None:
    bucket = _bucket(s3, kv_bucket, kind, "conf-put-if")
    old, new = _data(15, 2000), _data(16, 3000)
    etag = s3.put_object(Bucket=bucket, Key="k", Body=old)["ETag"]
    with pytest.raises(ClientError) as stale:
        s3.put_object(Bucket=bucket, Key="k", Body=new, IfMatch='"0123"')
    assert _code(stale) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as absent:
        s3.put_object(Bucket=bucket, Key="absent", Body=new, IfMatch=etag)
    assert _code(absent)[1] == 404
    with pytest.raises(ClientError) as unsupported:
        s3.put_object(Bucket=bucket, Key="k", Body=new, IfNoneMatch=etag)
    assert _code(unsupported) == ("NotImplemented", 501)
    with pytest.raises(ClientError) as both:  # S3 takes one condition at a time
        s3.put_object(Bucket=bucket, Key="k", Body=new, IfNoneMatch="*", IfMatch=etag)
    assert _code(both) == ("NotImplemented", 501)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == old  # nothing replaced
    s3.put_object(Bucket=bucket, Key="k", Body=new, IfMatch=etag)
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == new
    with pytest.raises(ClientError) as malformed:
        s3.get_object(Bucket=bucket, Key="k", VersionId="not/a-version")
    assert _code(malformed) == ("InvalidArgument", 400)
    with pytest.raises(ClientError) as other:
        s3.get_object(Bucket=bucket, Key="k", VersionId="0123abc")
    assert _code(other) == ("NoSuchVersion", 404)
