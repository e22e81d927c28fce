"""Issue 6's acceptance with boto3, unmodified, against a real dev cluster: every S3 operation
we serve, SigV4 in headers and presigned URLs, a 100 MiB multipart upload with the SDK's
default checksums, and the errors S3 gives. Every read compares bytes."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
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


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: dict[str, Any]) -> Any:  # noqa: F811
    return s3_cluster.client(s3_cluster_fixture)


def test_buckets(s3: Any, s3_cluster_fixture: dict[str, Any]) -> None:  # noqa: F811
    s3.create_bucket(Bucket="bk-one")
    s3.create_bucket(Bucket="bk-one")  # the owner again: 200 in us-east-1
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert "bk-one" in names
    s3.head_bucket(Bucket="bk-one")
    assert s3.get_bucket_location(Bucket="bk-one")["LocationConstraint"] is None
    other = s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, "t-b"))
    with pytest.raises(ClientError) as taken:
        other.create_bucket(Bucket="bk-one")
    assert _code(taken) == ("BucketAlreadyExists", 409)
    for bad in ("Bad_Name", "ab", "a..b", "192.168.1.1"):
        with pytest.raises(ClientError) as invalid:
            s3.create_bucket(Bucket=bad)
        assert _code(invalid)[0] == "InvalidBucketName", bad
    s3.put_object(Bucket="bk-one", Key="k", Body=b"x")
    with pytest.raises(ClientError) as full:
        s3.delete_bucket(Bucket="bk-one")
    assert _code(full) == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket="bk-one", Key="k")
    s3.delete_bucket(Bucket="bk-one")
    with pytest.raises(ClientError) as gone:
        s3.head_bucket(Bucket="bk-one")
    assert _code(gone)[1] == 404
    with pytest.raises(ClientError) as missing:
        s3.list_objects_v2(Bucket="bk-one")
    assert _code(missing) == ("NoSuchBucket", 404)


def test_put_get_head_with_headers_ranges_and_conditions(s3: Any) -> None:
    s3.create_bucket(Bucket="objs")
    data = _data(1, 9 * MIB + 17)
    put = s3.put_object(
        Bucket="objs", Key="dir/obj.bin", Body=data, ContentType="application/x-test",
        ContentEncoding="identity", ContentDisposition="attachment", ContentLanguage="en",
        CacheControl="max-age=60", Expires=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
        Metadata={"model": "llama", "run": "7"}, ChecksumAlgorithm="SHA256",
    )  # fmt: skip
    etag = hashlib.md5(data).hexdigest()
    assert put["ETag"] == f'"{etag}"'
    head = s3.head_object(Bucket="objs", Key="dir/obj.bin", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "application/x-test"
    assert head["ContentDisposition"] == "attachment"
    assert head["ContentLanguage"] == "en"
    assert head["CacheControl"] == "max-age=60"
    assert head["Metadata"] == {"model": "llama", "run": "7"}
    assert head["ChecksumSHA256"] == put["ChecksumSHA256"]
    got = s3.get_object(Bucket="objs", Key="dir/obj.bin")
    assert got["Body"].read() == data
    rng = random.Random(int(os.environ.get("KVTIER_TEST_SEED", "6")))
    for _ in range(5):
        first = rng.randrange(len(data))
        last = rng.randrange(first, len(data))
        part = s3.get_object(Bucket="objs", Key="dir/obj.bin", Range=f"bytes={first}-{last}")
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert part["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
        assert part["Body"].read() == data[first : last + 1]
    tail = s3.get_object(Bucket="objs", Key="dir/obj.bin", Range="bytes=-100")
    assert tail["Body"].read() == data[-100:]
    with pytest.raises(ClientError) as bad_range:
        s3.get_object(Bucket="objs", Key="dir/obj.bin", Range=f"bytes={len(data)}-")
    assert _code(bad_range) == ("InvalidRange", 416)
    with pytest.raises(ClientError) as not_modified:
        s3.get_object(Bucket="objs", Key="dir/obj.bin", IfNoneMatch=f'"{etag}"')
    assert _code(not_modified)[1] == 304
    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket="objs", Key="dir/obj.bin", IfMatch='"0000"')
    assert _code(failed) == ("PreconditionFailed", 412)
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    with pytest.raises(ClientError) as unmodified:
        s3.get_object(Bucket="objs", Key="dir/obj.bin", IfModifiedSince=future)
    assert _code(unmodified)[1] == 304
    with pytest.raises(ClientError) as modified:
        s3.get_object(Bucket="objs", Key="dir/obj.bin", IfUnmodifiedSince=past)
    assert _code(modified)[1] == 412
    assert s3.get_object(Bucket="objs", Key="dir/obj.bin", IfMatch=etag)["ContentLength"] == len(
        data
    )
    # Put-if-absent, and If-Match on PUT.
    with pytest.raises(ClientError) as exists:
        s3.put_object(Bucket="objs", Key="dir/obj.bin", Body=b"new", IfNoneMatch="*")
    assert _code(exists) == ("PreconditionFailed", 412)
    s3.put_object(Bucket="objs", Key="fresh", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as mismatch:
        s3.put_object(Bucket="objs", Key="fresh", Body=b"second", IfMatch='"bogus"')
    assert _code(mismatch)[1] == 412
    assert s3.get_object(Bucket="objs", Key="fresh")["Body"].read() == b"first"
    s3.put_object(Bucket="objs", Key="empty", Body=b"")
    assert s3.get_object(Bucket="objs", Key="empty")["Body"].read() == b""
    with pytest.raises(ClientError) as no_key:
        s3.get_object(Bucket="objs", Key="nope")
    assert _code(no_key) == ("NoSuchKey", 404)


def test_listing_v1_v2_versions_and_delete_objects(s3: Any) -> None:
    s3.create_bucket(Bucket="lists")
    keys = sorted(
        {"a/1", "a/2", "a/b/3", "b", "c d", "ü/x", "e+f", "g%h", *[f"m/{i:02d}" for i in range(15)]}
    )
    for key in keys:
        s3.put_object(Bucket="lists", Key=key, Body=key.encode())
    listed: list[str] = []
    token: dict[str, str] = {}
    while True:
        page = s3.list_objects_v2(Bucket="lists", MaxKeys=4, FetchOwner=True, **token)
        listed += [o["Key"] for o in page.get("Contents", [])]
        assert all("Owner" in o for o in page.get("Contents", []))
        if not page["IsTruncated"]:
            break
        token = {"ContinuationToken": page["NextContinuationToken"]}
    assert listed == keys
    top = s3.list_objects_v2(Bucket="lists", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["a/", "m/", "ü/"]
    assert [o["Key"] for o in top["Contents"]] == ["b", "c d", "e+f", "g%h"]
    after = s3.list_objects_v2(Bucket="lists", StartAfter="m/10", Prefix="m/")
    assert [o["Key"] for o in after["Contents"]] == [f"m/{i:02d}" for i in range(11, 15)]
    v1: list[str] = []
    marker = ""
    while True:
        page = s3.list_objects(Bucket="lists", MaxKeys=5, Marker=marker)
        v1 += [o["Key"] for o in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        marker = v1[-1]
    assert v1 == keys
    versions = s3.list_object_versions(Bucket="lists", Prefix="a/")
    assert [(v["Key"], v["VersionId"], v["IsLatest"]) for v in versions["Versions"]] == [
        ("a/1", "null", True), ("a/2", "null", True), ("a/b/3", "null", True),
    ]  # fmt: skip
    gone = s3.delete_objects(
        Bucket="lists", Delete={"Objects": [{"Key": k} for k in keys[:10]] + [{"Key": "none"}]}
    )
    assert sorted(d["Key"] for d in gone["Deleted"]) == sorted([*keys[:10], "none"])
    quiet = s3.delete_objects(
        Bucket="lists", Delete={"Objects": [{"Key": k} for k in keys[10:]], "Quiet": True}
    )
    assert "Deleted" not in quiet
    assert s3.list_objects_v2(Bucket="lists")["KeyCount"] == 0


def test_copy_object_directives_and_conditions(s3: Any) -> None:
    s3.create_bucket(Bucket="copies")
    data = _data(2, 3 * MIB + 1)
    s3.put_object(Bucket="copies", Key="src", Body=data, Metadata={"a": "1"}, ContentType="x/y")
    etag = hashlib.md5(data).hexdigest()
    s3.copy_object(Bucket="copies", Key="same", CopySource={"Bucket": "copies", "Key": "src"})
    head = s3.head_object(Bucket="copies", Key="same")
    assert (head["Metadata"], head["ContentType"], head["ETag"]) == ({"a": "1"}, "x/y", f'"{etag}"')
    s3.copy_object(
        Bucket="copies", Key="replaced", CopySource="copies/src", MetadataDirective="REPLACE",
        Metadata={"b": "2"}, ContentType="text/plain",
    )  # fmt: skip
    head = s3.head_object(Bucket="copies", Key="replaced")
    assert (head["Metadata"], head["ContentType"]) == ({"b": "2"}, "text/plain")
    assert s3.get_object(Bucket="copies", Key="replaced")["Body"].read() == data
    with pytest.raises(ClientError) as cond:
        s3.copy_object(
            Bucket="copies", Key="c", CopySource="copies/src", CopySourceIfMatch='"nope"'
        )
    assert _code(cond)[1] == 412
    with pytest.raises(ClientError) as self_copy:
        s3.copy_object(Bucket="copies", Key="src", CopySource="copies/src")
    assert _code(self_copy) == ("InvalidRequest", 400)


def test_multipart_100_mib_with_default_checksums_and_part_copy(s3: Any) -> None:
    s3.create_bucket(Bucket="multi")
    data = _data(3, 100 * MIB + 5)
    config = TransferConfig(multipart_threshold=16 * MIB, multipart_chunksize=16 * MIB)
    s3.upload_fileobj(io.BytesIO(data), "multi", "big.bin", Config=config)
    head = s3.head_object(Bucket="multi", Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].endswith('-7"')
    out = io.BytesIO()
    s3.download_fileobj("multi", "big.bin", out, Config=config)
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(data).digest()
    # By hand: parts out of order, a part copied from a range of another object.
    upload = s3.create_multipart_upload(Bucket="multi", Key="hand", ChecksumAlgorithm="CRC32")
    uid = upload["UploadId"]
    p2 = s3.upload_part(
        Bucket="multi", Key="hand", UploadId=uid, PartNumber=2, Body=data[:1000],
        ChecksumAlgorithm="CRC32",
    )  # fmt: skip
    p1 = s3.upload_part_copy(
        Bucket="multi", Key="hand", UploadId=uid, PartNumber=1,
        CopySource={"Bucket": "multi", "Key": "big.bin"}, CopySourceRange=f"bytes=0-{5 * MIB - 1}",
    )  # fmt: skip
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket="multi")["Uploads"]] == [uid]
    parts = s3.list_parts(Bucket="multi", Key="hand", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 5 * MIB), (2, 1000)]
    with pytest.raises(ClientError) as small:
        s3.complete_multipart_upload(
            Bucket="multi", Key="hand", UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": p2["ETag"]},
                                       {"PartNumber": 3, "ETag": p2["ETag"]}]},
        )  # fmt: skip
    assert _code(small)[0] in ("InvalidPart", "EntityTooSmall")
    with pytest.raises(ClientError) as order:
        s3.complete_multipart_upload(
            Bucket="multi", Key="hand", UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": p2["ETag"]},
                                       {"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]}]},
        )  # fmt: skip
    assert _code(order) == ("InvalidPartOrder", 400)
    done = s3.complete_multipart_upload(
        Bucket="multi", Key="hand", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]},
                                   {"PartNumber": 2, "ETag": p2["ETag"]}]},
    )  # fmt: skip
    assert done["ETag"].endswith('-2"')
    assert s3.get_object(Bucket="multi", Key="hand")["Body"].read() == data[: 5 * MIB] + data[:1000]
    aborted = s3.create_multipart_upload(Bucket="multi", Key="abort-me")["UploadId"]
    s3.upload_part(Bucket="multi", Key="abort-me", UploadId=aborted, PartNumber=1, Body=b"x" * 100)
    s3.abort_multipart_upload(Bucket="multi", Key="abort-me", UploadId=aborted)
    with pytest.raises(ClientError) as no_upload:
        s3.list_parts(Bucket="multi", Key="abort-me", UploadId=aborted)
    assert _code(no_upload) == ("NoSuchUpload", 404)


def test_presigned_urls_v4_and_v2(s3: Any, s3_cluster_fixture: dict[str, Any]) -> None:  # noqa: F811
    s3.create_bucket(Bucket="presign")
    data = _data(4, 2 * MIB + 3)
    s3.put_object(Bucket="presign", Key="a b/ü.bin", Body=data)
    v4 = s3_cluster.client(s3_cluster_fixture, signature_version="s3v4")
    tls = s3_cluster.tls_context(s3_cluster_fixture)  # the URLs are https://, the CA ours
    for signer in (s3, v4):
        url = signer.generate_presigned_url(
            "get_object", Params={"Bucket": "presign", "Key": "a b/ü.bin"}, ExpiresIn=60
        )
        assert url.startswith("https://")
        with urllib.request.urlopen(url, context=tls) as response:
            assert response.read() == data
    expired = v4.generate_presigned_url(
        "get_object", Params={"Bucket": "presign", "Key": "a b/ü.bin"}, ExpiresIn=1
    )
    time.sleep(2.2)
    with pytest.raises(urllib.error.HTTPError) as old:
        urllib.request.urlopen(expired, context=tls)
    assert old.value.code == 403
    assert b"<Code>AccessDenied</Code>" in old.value.read()


def test_every_request_has_an_access_log_line(
    s3: Any,
    s3_cluster_fixture: dict[str, Any],  # noqa: F811
) -> None:
    """`kvtier up` writes the gateway's S3 access log to logs/s3-access.log: one JSON line per
    request, found by the request id the client saw, with no secret in it."""
    s3.create_bucket(Bucket="access-log")
    put = s3.put_object(Bucket="access-log", Key="a/b.bin", Body=b"x" * 1000)
    got = s3.get_object(Bucket="access-log", Key="a/b.bin")
    assert got["Body"].read() == b"x" * 1000
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="access-log", Key="absent")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "access-log", "Key": "a/b.bin"}, ExpiresIn=60
    )
    anonymous = urllib.request.Request(url.split("?", 1)[0])  # the same URL, unsigned
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, context=s3_cluster.tls_context(s3_cluster_fixture))
    ids = {
        "put": put["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"],
        "get": got["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"],
        "missing": missing.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"],
        "anonymous": refused.value.headers["x-amz-request-id"],
    }
    path = s3_cluster_fixture["state"] / "logs" / "s3-access.log"
    lines: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 10
    while set(ids.values()) - set(lines) and time.monotonic() < deadline:
        time.sleep(0.1)
        text = path.read_text() if path.exists() else ""
        lines = {entry["request_id"]: entry for entry in map(json.loads, text.splitlines())}
    assert set(ids.values()) <= set(lines), "no access line for some requests"
    access_key = s3_cluster_fixture["s3_access_key"]
    line = lines[ids["put"]]
    assert (line["op"], line["status"], line["bytes_in"], line["principal"]) == (
        "PutObject", 200, 1000, access_key,
    )  # fmt: skip
    assert (line["bucket"], line["key"], line["error"]) == ("access-log", "a/b.bin", "")
    line = lines[ids["get"]]
    assert (line["op"], line["status"], line["bytes_out"]) == ("GetObject", 200, 1000)
    assert line["latency_ms"] >= 0
    line = lines[ids["missing"]]
    assert (line["status"], line["error"]) == (404, "NoSuchKey")
    line = lines[ids["anonymous"]]
    assert (line["principal"], line["status"], line["error"]) == ("anonymous", 403, "AccessDenied")
    text = path.read_text()
    assert s3_cluster_fixture["s3_secret_key"] not in text
    assert "X-Amz-Signature" not in text  # no query strings: presigned URLs carry signatures
