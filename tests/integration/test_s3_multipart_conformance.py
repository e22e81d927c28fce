"""Multipart behaviours as S3 has them, with boto3 against a real dev cluster: Complete sent
again answers the completed object (on both bucket kinds), GetObject/HeadObject of one part
(`partNumber`), the pagination of ListParts and ListMultipartUploads, and UploadPart with a
plain `Transfer-Encoding: chunked` body (http.client, signed with botocore's SigV4Auth). Every
read compares bytes."""

from __future__ import annotations

import base64
import hashlib
import http.client
import urllib.parse
import zlib
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


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: dict[str, Any]) -> Any:  # noqa: F811
    return s3_cluster.client(s3_cluster_fixture)


@pytest.fixture(scope="module")
def other_keys(s3_cluster_fixture: dict[str, Any]) -> tuple[str, str]:  # noqa: F811
    """(access key, secret) of a user of another tenant."""
    return s3_cluster.add_user(s3_cluster_fixture, "t-mp-other")


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: dict[str, Any], other_keys: tuple[str, str]) -> Any:  # noqa: F811
    """A user of another tenant."""
    return s3_cluster.client(s3_cluster_fixture, *other_keys)


def _upload(
    s3: Any, bucket: str, key: str, parts: dict[int, bytes], **checksum: str
) -> tuple[str, list[Any]]:
    """An upload with parts {number: bytes} (ChecksumAlgorithm=... for the upload and its
    parts): (upload id, the CompletedPart list)."""
    uid = s3.create_multipart_upload(Bucket=bucket, Key=key, **checksum)["UploadId"]
    done = []
    for number, body in parts.items():
        etag = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=number, Body=body, **checksum
        )["ETag"]
        done.append({"PartNumber": number, "ETag": etag})
    return uid, done


def _create_bucket(s3: Any, bucket: str, kind: str) -> None:
    """An erasure-coded bucket, or a KV bucket (CreateBucket with x-kvtier-bucket-kind: kv)."""

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    if kind == "kv":
        s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket=bucket)
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)


def _complete(s3: Any, bucket: str, key: str, uid: str, parts: list[Any]) -> Any:
    return s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
    )


# 1. CompleteMultipartUpload sent again.


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_complete_again_answers_the_completed_object(s3: Any, other: Any, kind: str) -> None:
    """The same on both bucket kinds (one handler, through the bucket's object layer)."""
    bucket = "mp-again" if kind == "objects" else "mp-again-kv"
    _create_bucket(s3, bucket, kind)
    first, last = _data(1, 5 * MIB), _data(2, 1000)
    uid, parts = _upload(s3, bucket, "k", {1: first, 2: last})
    done = _complete(s3, bucket, "k", uid, parts)
    assert done["ETag"].endswith('-2"')
    fields = ("ETag", "Location", "Bucket", "Key")

    # A retry (the reply was lost): 200 and the same answer, the object untouched.
    again = _complete(s3, bucket, "k", uid, parts)
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert {f: again[f] for f in fields} == {f: done[f] for f in fields}
    # Another parts list on the retry: S3 still answers the completed upload.
    fewer = _complete(s3, bucket, "k", uid, parts[:1])
    assert {f: fewer[f] for f in fields} == {f: done[f] for f in fields}
    got = s3.get_object(Bucket=bucket, Key="k")
    assert (got["ETag"], _sha(got["Body"].read())) == (done["ETag"], _sha(first + last))
    # The upload itself is gone: ListParts and Abort know nothing of it.
    with pytest.raises(ClientError) as listed:
        s3.list_parts(Bucket=bucket, Key="k", UploadId=uid)
    assert _code(listed) == ("NoSuchUpload", 404)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # Another tenant may not learn anything from a retry.
    with pytest.raises(ClientError) as denied:
        _complete(other, bucket, "k", uid, parts)
    assert _code(denied) == ("AccessDenied", 403)

    # A later upload of the key completes: the first one's retry is NoSuchUpload now.
    uid2, parts2 = _upload(s3, bucket, "k", {1: last})
    done2 = _complete(s3, bucket, "k", uid2, parts2)
    with pytest.raises(ClientError) as replaced:
        _complete(s3, bucket, "k", uid, parts)
    assert _code(replaced) == ("NoSuchUpload", 404)
    assert _complete(s3, bucket, "k", uid2, parts2)["ETag"] == done2["ETag"]

    # Overwritten by a PUT, or deleted: NoSuchUpload.
    s3.put_object(Bucket=bucket, Key="k", Body=b"plain")
    with pytest.raises(ClientError) as overwritten:
        _complete(s3, bucket, "k", uid2, parts2)
    assert _code(overwritten) == ("NoSuchUpload", 404)
    uid3, parts3 = _upload(s3, bucket, "gone", {1: last})
    _complete(s3, bucket, "gone", uid3, parts3)
    s3.delete_object(Bucket=bucket, Key="gone")
    with pytest.raises(ClientError) as deleted:
        _complete(s3, bucket, "gone", uid3, parts3)
    assert _code(deleted) == ("NoSuchUpload", 404)
    # The upload id names one key: the same id on another key is no upload.
    with pytest.raises(ClientError) as elsewhere:
        _complete(s3, bucket, "other-key", uid, parts)
    assert _code(elsewhere) == ("NoSuchUpload", 404)
    # An aborted upload stays unknown.
    uid4, parts4 = _upload(s3, bucket, "aborted", {1: last})
    s3.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=uid4)
    with pytest.raises(ClientError) as aborted:
        _complete(s3, bucket, "aborted", uid4, parts4)
    assert _code(aborted) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=bucket, Key="aborted")
    assert _code(missing)[1] == 404


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_complete_conditions(s3: Any, kind: str) -> None:
    """Complete with If-Match / If-None-Match: * as PutObject: 404 for If-Match on no object,
    412 when the condition fails (nothing completed, the upload still usable), the object
    when it holds; an If-None-Match other than `*` is 501 NotImplemented, not ignored
    (docs/s3.md, "Conditional writes")."""
    bucket = f"mp-conditions-{kind}"
    _create_bucket(s3, bucket, kind)
    uid, parts = _upload(s3, bucket, "k", {1: b"abc"})

    def complete(**condition: str) -> Any:
        return s3.complete_multipart_upload(
            Bucket=bucket, Key="k", UploadId=uid, MultipartUpload={"Parts": parts}, **condition
        )

    with pytest.raises(ClientError) as unsupported:
        complete(IfNoneMatch='"0123"')
    assert _code(unsupported) == ("NotImplemented", 501)
    with pytest.raises(ClientError) as both:
        complete(IfNoneMatch="*", IfMatch='"0123"')
    assert _code(both) == ("NotImplemented", 501)
    with pytest.raises(ClientError) as absent:
        complete(IfMatch='"0123"')
    assert _code(absent) == ("NoSuchKey", 404)
    first = s3.put_object(Bucket=bucket, Key="k", Body=b"first")["ETag"]
    with pytest.raises(ClientError) as exists:
        complete(IfNoneMatch="*")
    assert _code(exists) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as stale:
        complete(IfMatch='"0123"')
    assert _code(stale) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"  # nothing completed
    complete(IfMatch=first)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"abc"


# 2. GetObject / HeadObject with partNumber.


def test_get_and_head_one_part(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="mp-parts")
    # Part numbers with gaps: the object's parts are 1..3 in order, as S3 counts them.
    bodies = {1: _data(3, 5 * MIB), 3: _data(4, 5 * MIB + 3), 7: _data(5, 1234)}
    uid, parts = _upload(s3, "mp-parts", "obj", bodies, ChecksumAlgorithm="CRC32")
    etag = _complete(s3, "mp-parts", "obj", uid, parts)["ETag"]
    whole = b"".join(bodies.values())
    offset = 0
    for index, body in enumerate(bodies.values(), start=1):
        span = f"bytes {offset}-{offset + len(body) - 1}/{len(whole)}"
        head = s3.head_object(Bucket="mp-parts", Key="obj", PartNumber=index)
        got = s3.get_object(Bucket="mp-parts", Key="obj", PartNumber=index)
        for answer in (head, got):
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 206
            assert answer["ContentLength"] == len(body)
            assert answer["ContentRange"] == span
            assert answer["PartsCount"] == 3
            assert answer["ETag"] == etag  # the whole object's
        assert _sha(got["Body"].read()) == _sha(body)
        offset += len(body)
    # A part's bytes do not have the whole object's checksum: the part's own is sent instead.
    composite = s3.head_object(Bucket="mp-parts", Key="obj", ChecksumMode="ENABLED")
    assert composite["ChecksumCRC32"].endswith("-3")
    got = s3.get_object(Bucket="mp-parts", Key="obj", PartNumber=2, ChecksumMode="ENABLED")
    own = base64.b64encode(zlib.crc32(bodies[3]).to_bytes(4, "big")).decode()
    assert {k: v for k, v in got.items() if k.startswith("Checksum")} == {
        "ChecksumCRC32": own,
        "ChecksumType": "COMPOSITE",
    }
    assert _sha(got["Body"].read()) == _sha(bodies[3])
    # Past the last part: 416 InvalidPartNumber (HEAD: the status alone).
    with pytest.raises(ClientError) as past:
        s3.get_object(Bucket="mp-parts", Key="obj", PartNumber=4)
    assert _code(past) == ("InvalidPartNumber", 416)
    with pytest.raises(ClientError) as past_head:
        s3.head_object(Bucket="mp-parts", Key="obj", PartNumber=4)
    assert _code(past_head)[1] == 416
    with pytest.raises(ClientError) as too_big:
        s3.get_object(Bucket="mp-parts", Key="obj", PartNumber=10001)
    assert _code(too_big) == ("InvalidArgument", 400)
    with pytest.raises(ClientError) as both:
        s3.get_object(Bucket="mp-parts", Key="obj", PartNumber=1, Range="bytes=0-9")
    assert _code(both) == ("InvalidRequest", 400)
    with pytest.raises(ClientError) as denied:
        other.get_object(Bucket="mp-parts", Key="obj", PartNumber=1)
    assert _code(denied) == ("AccessDenied", 403)
    # The whole object is as before.
    got = s3.get_object(Bucket="mp-parts", Key="obj")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert _sha(got["Body"].read()) == _sha(whole)


def test_part_number_of_plain_and_one_part_objects(s3: Any) -> None:
    s3.create_bucket(Bucket="mp-plain")
    data = _data(6, 3 * MIB + 1)
    etag = s3.put_object(Bucket="mp-plain", Key="plain", Body=data)["ETag"]
    # Part 1 of an object not uploaded in parts is all of it, as a range (S3: 206).
    for call in (s3.get_object, s3.head_object):
        answer = call(Bucket="mp-plain", Key="plain", PartNumber=1)
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert answer["ContentRange"] == f"bytes 0-{len(data) - 1}/{len(data)}"
        assert (answer["ContentLength"], answer["ETag"]) == (len(data), etag)
        assert "PartsCount" not in answer
        if call is s3.get_object:
            assert _sha(answer["Body"].read()) == _sha(data)
    with pytest.raises(ClientError) as second:
        s3.get_object(Bucket="mp-plain", Key="plain", PartNumber=2)
    assert _code(second) == ("InvalidPartNumber", 416)
    # An empty object: part 1 is empty.
    s3.put_object(Bucket="mp-plain", Key="empty", Body=b"")
    empty = s3.get_object(Bucket="mp-plain", Key="empty", PartNumber=1)
    assert (empty["ContentLength"], empty["Body"].read()) == (0, b"")
    # A multipart object of one part says so.
    uid, parts = _upload(s3, "mp-plain", "one", {5: data})
    _complete(s3, "mp-plain", "one", uid, parts)
    one = s3.head_object(Bucket="mp-plain", Key="one", PartNumber=1)
    assert (one["PartsCount"], one["ContentLength"]) == (1, len(data))
    got = s3.get_object(Bucket="mp-plain", Key="one", PartNumber=1)
    assert _sha(got["Body"].read()) == _sha(data)


# 3. Pagination of ListParts and ListMultipartUploads.


def test_list_parts_pages(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="mp-lp")
    numbers = [1, 2, 3, 5, 8]
    bodies = {n: _data(10 + n, 100 + n) for n in numbers}
    uid, _ = _upload(s3, "mp-lp", "k", bodies)

    def page(**kwargs: Any) -> Any:
        return s3.list_parts(Bucket="mp-lp", Key="k", UploadId=uid, **kwargs)

    first = page(MaxParts=2)
    assert [p["PartNumber"] for p in first["Parts"]] == [1, 2]
    assert [p["Size"] for p in first["Parts"]] == [101, 102]
    assert (first["IsTruncated"], first["NextPartNumberMarker"], first["MaxParts"]) == (True, 2, 2)
    assert first["PartNumberMarker"] == 0
    second = page(MaxParts=2, PartNumberMarker=2)
    assert [p["PartNumber"] for p in second["Parts"]] == [3, 5]
    assert (second["IsTruncated"], second["NextPartNumberMarker"]) == (True, 5)
    third = page(MaxParts=2, PartNumberMarker=5)
    assert [p["PartNumber"] for p in third["Parts"]] == [8]
    assert third["IsTruncated"] is False
    # A marker that is no part: the parts above it.
    assert [p["PartNumber"] for p in page(PartNumberMarker=4)["Parts"]] == [5, 8]
    assert page(PartNumberMarker=8).get("Parts", []) == []
    # Exactly a page's worth left: not truncated.
    exact = page(MaxParts=2, PartNumberMarker=3)
    assert ([p["PartNumber"] for p in exact["Parts"]], exact["IsTruncated"]) == ([5, 8], False)
    everything = page()
    assert (everything["MaxParts"], everything["IsTruncated"]) == (1000, False)
    paged = s3.get_paginator("list_parts").paginate(
        Bucket="mp-lp", Key="k", UploadId=uid, PaginationConfig={"PageSize": 2}
    )
    listed = [(p["PartNumber"], p["ETag"]) for r in paged for p in r.get("Parts", [])]
    assert listed == [(p["PartNumber"], p["ETag"]) for p in everything["Parts"]]
    assert [n for n, _ in listed] == numbers
    with pytest.raises(ClientError) as denied:
        other.list_parts(Bucket="mp-lp", Key="k", UploadId=uid)
    assert _code(denied) == ("AccessDenied", 403)


def test_list_multipart_uploads_pages(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="mp-lu")

    def create(key: str) -> str:
        return str(s3.create_multipart_upload(Bucket="mp-lu", Key=key)["UploadId"])

    a1, a2 = create("a"), create("a")  # one key's uploads: listed by initiation
    b1, b2, c1, d1 = create("b/1"), create("b/2"), create("c"), create("d/x")
    order = [("a", a1), ("a", a2), ("b/1", b1), ("b/2", b2), ("c", c1), ("d/x", d1)]

    def page(**kwargs: Any) -> Any:
        return s3.list_multipart_uploads(Bucket="mp-lu", **kwargs)

    def uploads(reply: Any) -> list[tuple[str, str]]:
        return [(u["Key"], u["UploadId"]) for u in reply.get("Uploads", [])]

    assert uploads(page()) == order
    first = page(MaxUploads=2)
    assert uploads(first) == order[:2]
    assert (first["IsTruncated"], first["MaxUploads"]) == (True, 2)
    assert (first["NextKeyMarker"], first["NextUploadIdMarker"]) == ("a", a2)
    second = page(MaxUploads=2, KeyMarker="a", UploadIdMarker=a2)
    assert uploads(second) == order[2:4]
    assert (second["NextKeyMarker"], second["NextUploadIdMarker"]) == ("b/2", b2)
    third = page(MaxUploads=2, KeyMarker="b/2", UploadIdMarker=b2)
    assert (uploads(third), third["IsTruncated"]) == (order[4:], False)
    # key-marker alone: the keys after it; with upload-id-marker: that key's later uploads too.
    assert uploads(page(KeyMarker="a")) == order[2:]
    assert uploads(page(KeyMarker="a", UploadIdMarker=a1)) == order[1:]
    # upload-id-marker without key-marker is ignored.
    assert uploads(page(UploadIdMarker=a1)) == order
    paged = s3.get_paginator("list_multipart_uploads").paginate(
        Bucket="mp-lu", PaginationConfig={"PageSize": 4}
    )
    assert [x for r in paged for x in uploads(r)] == order

    # With a delimiter a page ending in a common prefix continues after all of it.
    one = page(Delimiter="/", MaxUploads=3)
    assert uploads(one) == order[:2]
    assert [p["Prefix"] for p in one["CommonPrefixes"]] == ["b/"]
    assert (one["IsTruncated"], one["NextKeyMarker"]) == (True, "b/")
    two = page(Delimiter="/", MaxUploads=3, KeyMarker=one["NextKeyMarker"])
    assert uploads(two) == [("c", c1)]
    assert [p["Prefix"] for p in two["CommonPrefixes"]] == ["d/"]
    assert two["IsTruncated"] is False
    folded = s3.get_paginator("list_multipart_uploads").paginate(
        Bucket="mp-lu", Delimiter="/", PaginationConfig={"PageSize": 1}
    )
    seen = [
        x
        for r in folded
        for x in uploads(r) + [(p["Prefix"], "") for p in r.get("CommonPrefixes", [])]
    ]
    assert seen == [("a", a1), ("a", a2), ("b/", ""), ("c", c1), ("d/", "")]

    # The upload a marker names was aborted: that key's uploads whose id sorts after it.
    s3.abort_multipart_upload(Bucket="mp-lu", Key="a", UploadId=a1)
    after = page(KeyMarker="a", UploadIdMarker=a1)
    assert uploads(after) == ([("a", a2)] if a2 > a1 else []) + order[2:]

    with pytest.raises(ClientError) as denied:
        other.list_multipart_uploads(Bucket="mp-lu")
    assert _code(denied) == ("AccessDenied", 403)


# 6. UploadPart with a plain chunked body (Transfer-Encoding: chunked, no Content-Length).

#: The largest KV part (services/gateway/s3/kv_layout.py MAX_KV_OBJECT_BYTES).
MAX_KV_PART = 64 * MIB


def _chunked_part(
    info: dict[str, Any],
    keys: tuple[str, str],
    where: tuple[str, str, str, int],
    data: bytes,
    payload_hash: str,
    extra: dict[str, str] | None = None,
) -> tuple[int, bytes, str]:
    """An UploadPart of data to where (bucket, key, upload id, part number) with a chunked
    body, signed for keys with payload_hash: (status, body, ETag header)."""
    bucket, key, uid, number = where
    path = f"/{bucket}/{key}?partNumber={number}&uploadId={urllib.parse.quote(uid, safe='')}"
    url = info["gateway_s3"].rstrip("/") + path
    request = AWSRequest(
        method="PUT", url=url, headers={"x-amz-content-sha256": payload_hash, **(extra or {})}
    )
    SigV4Auth(Credentials(*keys), "s3", "us-east-1").add_auth(request)
    split = urllib.parse.urlsplit(url)
    headers = {**dict(request.headers.items()), "Host": split.netloc}
    assert split.hostname
    conn = http.client.HTTPSConnection(
        split.hostname, split.port, context=s3_cluster.tls_context(info), timeout=60
    )
    step = 3 * MIB + 7

    def pieces() -> Iterator[bytes]:
        for at in range(0, len(data), step):
            yield data[at : at + step]

    try:
        # An iterable body and no Content-Length: http.client sends Transfer-Encoding: chunked.
        conn.request("PUT", path, body=pieces(), headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("ETag", "")
    finally:
        conn.close()


def _listed(s3: Any, bucket: str, key: str, uid: str) -> list[tuple[int, int, str]]:
    parts = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid).get("Parts", [])
    return [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts]


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_upload_part_with_plain_chunked_body(
    s3: Any,
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
    other_keys: tuple[str, str],
    kind: str,
) -> None:
    """A part streamed without Content-Length is stored as it comes (S3 takes it when the
    request is signed, UNSIGNED-PAYLOAD or the body's hash), its digests checked as a PUT's,
    its ETag the MD5; on a KV bucket past the KV bound it is EntityTooLarge, counted while
    streaming, and nothing is stored. (An erasure-coded part's bound is S3's 5 GiB, which has
    no smaller setting: too big to send here.)"""
    info = s3_cluster_fixture
    admin = (info["s3_access_key"], info["s3_secret_key"])
    bucket = "mp-chunked" if kind == "objects" else "mp-chunked-kv"
    _create_bucket(s3, bucket, kind)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    first, last = _data(20, 5 * MIB + 321), _data(21, 1000)
    status, body, etag1 = _chunked_part(
        info, admin, (bucket, "k", uid, 1), first, "UNSIGNED-PAYLOAD"
    )
    assert status == 200, body
    assert etag1 == f'"{hashlib.md5(first).hexdigest()}"'
    signed = _sha(last)
    status, body, etag2 = _chunked_part(info, admin, (bucket, "k", uid, 2), last, signed)
    assert status == 200, body
    assert etag2 == f'"{hashlib.md5(last).hexdigest()}"'
    stored = [(1, len(first), etag1), (2, len(last), etag2)]
    assert _listed(s3, bucket, "k", uid) == stored

    # Digests are checked once the body is in; a failed part is not stored.
    status, body, _ = _chunked_part(info, admin, (bucket, "k", uid, 3), last[1:], signed)
    assert (status, b"<Code>XAmzContentSHA256Mismatch</Code>" in body) == (400, True), body
    wrong_md5 = {"Content-MD5": base64.b64encode(hashlib.md5(first).digest()).decode()}
    status, body, _ = _chunked_part(
        info, admin, (bucket, "k", uid, 2), last, "UNSIGNED-PAYLOAD", wrong_md5
    )
    assert (status, b"<Code>BadDigest</Code>" in body) == (400, True), body
    if kind == "kv":  # one byte over the bound, over part 1: refused, part 1 stays as it was
        over = _data(22, MAX_KV_PART + 1)
        status, body, _ = _chunked_part(
            info, admin, (bucket, "k", uid, 1), over, "UNSIGNED-PAYLOAD"
        )
        assert (status, b"<Code>EntityTooLarge</Code>" in body) == (400, True), body
    # Another tenant's chunked UploadPart is denied.
    status, body, _ = _chunked_part(
        info, other_keys, (bucket, "k", uid, 3), last, "UNSIGNED-PAYLOAD"
    )
    assert (status, b"<Code>AccessDenied</Code>" in body) == (403, True), body
    assert _listed(s3, bucket, "k", uid) == stored

    parts = [{"PartNumber": 1, "ETag": etag1}, {"PartNumber": 2, "ETag": etag2}]
    done = _complete(s3, bucket, "k", uid, parts)
    assert done["ETag"].endswith('-2"')
    got = s3.get_object(Bucket=bucket, Key="k")
    assert (got["ETag"], _sha(got["Body"].read())) == (done["ETag"], _sha(first + last))


# 5. GetObjectAttributes.

_ATTRIBUTES = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]


def _b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_get_object_attributes(
    s3: Any,
    other: Any,
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
    kind: str,
) -> None:
    """A plain object's and a multipart object's attributes, a page of parts, and the same
    authorization as HeadObject (another tenant, anonymous: 403 on a private object)."""
    bucket = "mp-attrs" if kind == "objects" else "mp-attrs-kv"
    _create_bucket(s3, bucket, kind)
    small = b"attributes"
    put = s3.put_object(Bucket=bucket, Key="plain", Body=small, ChecksumAlgorithm="SHA256")
    got = s3.get_object_attributes(Bucket=bucket, Key="plain", ObjectAttributes=_ATTRIBUTES)
    assert (got["ETag"], got["ObjectSize"], got["StorageClass"]) == (
        put["ETag"].strip('"'),
        len(small),
        "STANDARD",
    )
    assert got["Checksum"] == {"ChecksumSHA256": _b64sha(small), "ChecksumType": "FULL_OBJECT"}
    assert "ObjectParts" not in got
    assert "VersionId" not in got
    assert got["LastModified"]
    only = s3.get_object_attributes(Bucket=bucket, Key="plain", ObjectAttributes=["ObjectSize"])
    assert [k for k in only if k != "ResponseMetadata"] == ["LastModified", "ObjectSize"]

    bodies = {1: _data(30, 5 * MIB), 2: _data(31, 5 * MIB), 3: _data(32, 1000)}
    uid, parts = _upload(s3, bucket, "mp", bodies, ChecksumAlgorithm="SHA256")
    done = _complete(s3, bucket, "mp", uid, parts)
    got = s3.get_object_attributes(Bucket=bucket, Key="mp", ObjectAttributes=_ATTRIBUTES)
    assert (got["ETag"], got["ObjectSize"]) == (done["ETag"].strip('"'), 10 * MIB + 1000)
    listed = got["ObjectParts"]
    assert (listed["TotalPartsCount"], listed["IsTruncated"]) == (3, False)
    assert [(p["PartNumber"], p["Size"]) for p in listed["Parts"]] == [
        (n, len(b)) for n, b in bodies.items()
    ]
    assert got["Checksum"]["ChecksumType"] == "COMPOSITE"
    assert got["Checksum"]["ChecksumSHA256"] == done["ChecksumSHA256"]
    assert [p["ChecksumSHA256"] for p in listed["Parts"]] == [_b64sha(b) for b in bodies.values()]
    page = s3.get_object_attributes(
        Bucket=bucket, Key="mp", ObjectAttributes=["ObjectParts"], MaxParts=1, PartNumberMarker=1
    )["ObjectParts"]
    assert (page["PartNumberMarker"], page["NextPartNumberMarker"], page["MaxParts"]) == (1, 2, 1)
    assert page["IsTruncated"] is True
    assert [(p["PartNumber"], p["Size"]) for p in page["Parts"]] == [(2, 5 * MIB)]

    with pytest.raises(ClientError) as unknown:
        s3.get_object_attributes(Bucket=bucket, Key="plain", ObjectAttributes=["Owner"])
    assert _code(unknown) == ("InvalidArgument", 400)
    with pytest.raises(ClientError) as missing:
        s3.get_object_attributes(Bucket=bucket, Key="nope", ObjectAttributes=_ATTRIBUTES)
    assert _code(missing) == ("NoSuchKey", 404)
    # Authorized as HeadObject: a private object is nobody else's to see.
    anon = s3_cluster.anonymous(s3_cluster_fixture)
    for stranger in (other, anon):
        with pytest.raises(ClientError) as denied:
            stranger.get_object_attributes(Bucket=bucket, Key="mp", ObjectAttributes=_ATTRIBUTES)
        assert _code(denied) == ("AccessDenied", 403)


def test_get_object_attributes_of_versions(s3: Any) -> None:
    """versionId picks a version; a delete marker is 404 (current) or 405 (by id), with
    x-amz-delete-marker, as HeadObject answers."""
    s3.create_bucket(Bucket="mp-attrs-ver")
    s3.put_bucket_versioning(Bucket="mp-attrs-ver", VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket="mp-attrs-ver", Key="k", Body=b"one")
    s3.put_object(Bucket="mp-attrs-ver", Key="k", Body=b"second")
    current = s3.get_object_attributes(Bucket="mp-attrs-ver", Key="k", ObjectAttributes=_ATTRIBUTES)
    assert current["ObjectSize"] == 6
    assert current["VersionId"] != first["VersionId"]
    old = s3.get_object_attributes(
        Bucket="mp-attrs-ver", Key="k", VersionId=first["VersionId"], ObjectAttributes=_ATTRIBUTES
    )
    assert (old["VersionId"], old["ObjectSize"], old["ETag"]) == (
        first["VersionId"],
        3,
        first["ETag"].strip('"'),
    )
    marker = s3.delete_object(Bucket="mp-attrs-ver", Key="k")["VersionId"]
    with pytest.raises(ClientError) as gone:
        s3.get_object_attributes(Bucket="mp-attrs-ver", Key="k", ObjectAttributes=["ETag"])
    assert _code(gone) == ("NoSuchKey", 404)
    assert gone.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amz-delete-marker"] == "true"
    with pytest.raises(ClientError) as by_id:
        s3.get_object_attributes(
            Bucket="mp-attrs-ver", Key="k", VersionId=marker, ObjectAttributes=["ETag"]
        )
    assert _code(by_id) == ("MethodNotAllowed", 405)


# 7. Checksum types (x-amz-checksum-type): COMPOSITE and FULL_OBJECT.


@pytest.mark.parametrize("kind", ["objects", "kv"])
def test_multipart_checksum_types(s3: Any, kind: str) -> None:
    """A FULL_OBJECT CRC32 upload gets the CRC32 of its whole body (combined from the part
    CRCs), a SHA256 one the COMPOSITE "-N"; a claimed object checksum that differs is BadDigest;
    SHA256 has no FULL_OBJECT type."""
    bucket = "mp-cktype" if kind == "objects" else "mp-cktype-kv"
    _create_bucket(s3, bucket, kind)
    bodies = {1: _data(71, 5 * MIB), 2: _data(72, 1000)}
    crc = base64.b64encode(zlib.crc32(bodies[1] + bodies[2]).to_bytes(4, "big")).decode()

    def upload(key: str, algorithm: str, **kind_arg: str) -> tuple[str, list[Any]]:
        made = s3.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm=algorithm, **kind_arg
        )
        uid, parts = made["UploadId"], []
        for number, body in bodies.items():
            sent = s3.upload_part(
                Bucket=bucket, Key=key, UploadId=uid, PartNumber=number, Body=body,
                ChecksumAlgorithm=algorithm,
            )  # fmt: skip
            name = f"Checksum{algorithm}"
            parts.append({"PartNumber": number, "ETag": sent["ETag"], name: sent[name]})
        return uid, parts

    uid, parts = upload("full", "CRC32", ChecksumType="FULL_OBJECT")
    with pytest.raises(ClientError) as bad:  # the claimed checksum is checked
        s3.complete_multipart_upload(
            Bucket=bucket, Key="full", UploadId=uid, MultipartUpload={"Parts": parts},
            ChecksumCRC32="AAAAAA==",
        )  # fmt: skip
    assert _code(bad) == ("BadDigest", 400)
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key="full", UploadId=uid, MultipartUpload={"Parts": parts},
        ChecksumCRC32=crc,
    )  # fmt: skip
    assert (done["ChecksumType"], done["ChecksumCRC32"]) == ("FULL_OBJECT", crc)
    head = s3.head_object(Bucket=bucket, Key="full", ChecksumMode="ENABLED")
    assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", crc)
    part = s3.get_object(Bucket=bucket, Key="full", PartNumber=2)
    assert (part["ChecksumType"], part["ChecksumCRC32"]) == (
        "FULL_OBJECT",
        parts[1]["ChecksumCRC32"],
    )

    uid, parts = upload("composite", "SHA256")  # SHA256: COMPOSITE, its only type
    done = _complete(s3, bucket, "composite", uid, parts)
    assert done["ChecksumType"] == "COMPOSITE"
    assert done["ChecksumSHA256"].endswith("-2")
    head = s3.head_object(Bucket=bucket, Key="composite", ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "COMPOSITE"

    with pytest.raises(ClientError) as refused:
        s3.create_multipart_upload(
            Bucket=bucket, Key="x", ChecksumAlgorithm="SHA256", ChecksumType="FULL_OBJECT"
        )
    assert _code(refused) == ("InvalidRequest", 400)
