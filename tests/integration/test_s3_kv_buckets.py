"""KV buckets (`x-kvtier-bucket-kind: kv`) at their limits, against a real dev cluster: a PUT of
exactly the documented 64 MiB maximum (and one byte more), multipart uploads through awscli and
boto3 (S3's errors, ETags and ranged reads across parts), and another tenant kept out of an
upload. Every read compares bytes."""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
#: The documented largest KV object (services/gateway/s3/kv_layout.py MAX_KV_OBJECT_BYTES).
MAX_KV_OBJECT = 64 * MIB
Info = dict[str, Any]
#: The ETag of a KV object PUT with a trailing checksum and no Content-MD5 (docs/s3.md).
VERSION_ETAG = re.compile(r'"[0-9a-f]{32}-1"')


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def _kv_bucket(s3: Any, name: str) -> None:
    """Create a KV bucket (CreateBucket with x-kvtier-bucket-kind: kv)."""

    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket=name)
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)


def _multipart_etag(parts: list[bytes]) -> str:
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """The admin's boto3 client (no retries: a 503 shows as an error, not a slow success)."""
    return s3_cluster.client(s3_cluster_fixture)


def test_put_of_exactly_the_maximum_is_stored_and_one_byte_more_is_too_large(s3: Any) -> None:
    _kv_bucket(s3, "kv-max")
    data = _data(1, MAX_KV_OBJECT)
    put = s3.put_object(Bucket="kv-max", Key="max.bin", Body=data)
    assert VERSION_ETAG.fullmatch(put["ETag"])  # boto3's trailing CRC32 vouched for the bytes
    assert s3.head_object(Bucket="kv-max", Key="max.bin")["ContentLength"] == MAX_KV_OBJECT
    back = s3.get_object(Bucket="kv-max", Key="max.bin")["Body"].read()
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # The last bytes live in a second block (the first holds the version id too): a range
    # across the two is exact.
    first, last = MAX_KV_OBJECT - 100, MAX_KV_OBJECT - 1
    ranged = s3.get_object(Bucket="kv-max", Key="max.bin", Range=f"bytes={first}-{last}")
    assert ranged["Body"].read() == data[first:]
    assert ranged["ContentRange"] == f"bytes {first}-{last}/{MAX_KV_OBJECT}"
    with pytest.raises(ClientError) as too_large:
        s3.put_object(Bucket="kv-max", Key="over.bin", Body=data + b"!")
    assert _code(too_large) == ("EntityTooLarge", 400)
    with pytest.raises(ClientError) as absent:
        s3.head_object(Bucket="kv-max", Key="over.bin")
    assert _code(absent)[1] == 404
    with pytest.raises(ClientError) as not_replaced:
        s3.put_object(Bucket="kv-max", Key="max.bin", Body=data + b"!")
    assert _code(not_replaced) == ("EntityTooLarge", 400)
    again = s3.get_object(Bucket="kv-max", Key="max.bin", Range=f"bytes={first}-{last}")
    assert again["Body"].read() == data[first:]
    # Overwritten by a small object: the old tail never shows through.
    s3.put_object(Bucket="kv-max", Key="max.bin", Body=b"small")
    assert s3.get_object(Bucket="kv-max", Key="max.bin")["Body"].read() == b"small"
    s3.delete_object(Bucket="kv-max", Key="max.bin")
    assert "Contents" not in s3.list_objects_v2(Bucket="kv-max")
    s3.delete_bucket(Bucket="kv-max")  # no block left behind (the tail included)


def test_keys_of_the_longest_length_s3_allows(s3: Any) -> None:
    """S3 keys of 1024 bytes are stored, listed and deleted (a KV bucket's block keys carry a
    3-byte prefix on top), and multipart works for them; 1025 bytes is KeyTooLongError."""
    _kv_bucket(s3, "kv-long-keys")
    longest = "k" * 1022 + "é"  # 1024 bytes of UTF-8
    assert len(longest.encode()) == 1024
    s3.put_object(Bucket="kv-long-keys", Key=longest, Body=b"long key")
    assert s3.head_object(Bucket="kv-long-keys", Key=longest)["ContentLength"] == 8
    assert s3.get_object(Bucket="kv-long-keys", Key=longest)["Body"].read() == b"long key"
    listed = s3.list_objects_v2(Bucket="kv-long-keys")["Contents"]
    assert [o["Key"] for o in listed] == [longest]
    upload = s3.create_multipart_upload(Bucket="kv-long-keys", Key=longest)["UploadId"]
    part = s3.upload_part(
        Bucket="kv-long-keys", Key=longest, UploadId=upload, PartNumber=1, Body=b"in parts"
    )
    s3.complete_multipart_upload(
        Bucket="kv-long-keys", Key=longest, UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    assert s3.get_object(Bucket="kv-long-keys", Key=longest)["Body"].read() == b"in parts"
    with pytest.raises(ClientError) as too_long:
        s3.put_object(Bucket="kv-long-keys", Key=longest + "k", Body=b"x")
    assert _code(too_long) == ("KeyTooLongError", 400)
    s3.delete_object(Bucket="kv-long-keys", Key=longest)
    s3.delete_bucket(Bucket="kv-long-keys")


def test_awscli_copies_a_file_in_parts_into_a_kv_bucket(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
    tmp_path: Path,
) -> None:
    info = s3_cluster_fixture
    _kv_bucket(s3, "kv-cli")
    src = tmp_path / "big.bin"
    data = _data(2, 20 * MIB + 3)  # > 8 MiB: awscli uploads 8 MiB parts
    src.write_bytes(data)
    s3_cluster.aws_cli(info, "s3", "cp", "--only-show-errors", str(src), "s3://kv-cli/big.bin")
    back = tmp_path / "back.bin"
    s3_cluster.aws_cli(info, "s3", "cp", "--only-show-errors", "s3://kv-cli/big.bin", str(back))
    assert back.read_bytes() == data
    head = s3.head_object(Bucket="kv-cli", Key="big.bin")
    assert head["ContentLength"] == len(data)
    parts = [data[i : i + 8 * MIB] for i in range(0, len(data), 8 * MIB)]
    assert head["ETag"] == _multipart_etag(parts)
    # Ranges across the part boundaries of the assembled object.
    for first, last in ((8 * MIB - 5, 8 * MIB + 5), (0, 16 * MIB), (16 * MIB - 1, len(data) - 1)):
        got = s3.get_object(Bucket="kv-cli", Key="big.bin", Range=f"bytes={first}-{last}")
        assert got["Body"].read() == data[first : last + 1]
    assert s3.list_multipart_uploads(Bucket="kv-cli").get("Uploads", []) == []
    s3_cluster.aws_cli(info, "s3", "rm", "--only-show-errors", "s3://kv-cli/big.bin")
    s3.delete_bucket(Bucket="kv-cli")  # the staged parts are gone too


def test_boto3_upload_file_in_parts_with_default_checksums(s3: Any, tmp_path: Path) -> None:
    _kv_bucket(s3, "kv-transfer")
    src = tmp_path / "big.bin"
    data = _data(3, 20 * MIB + 7)
    src.write_bytes(data)
    config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    s3.upload_file(str(src), "kv-transfer", "model/big.bin", Config=config)
    back = tmp_path / "back.bin"
    s3.download_file("kv-transfer", "model/big.bin", str(back), Config=config)
    assert back.read_bytes() == data
    listed = s3.list_objects_v2(Bucket="kv-transfer")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("model/big.bin", len(data))]
    s3.delete_object(Bucket="kv-transfer", Key="model/big.bin")
    s3.delete_bucket(Bucket="kv-transfer")


def test_multipart_api_on_a_kv_bucket_behaves_as_s3(s3: Any) -> None:
    _kv_bucket(s3, "kv-parts")
    bucket, key = "kv-parts", "shards/obj.bin"
    one, two, three = _data(4, 5 * MIB), _data(5, 3 * MIB), _data(6, MIB + 11)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/x-kv")
    uid = upload["UploadId"]
    etags = {}
    for number, body in ((1, one), (2, two), (3, three)):
        reply = s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=number, Body=body)
        assert reply["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        etags[number] = reply["ETag"]
    listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid)
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed["Parts"]] == [
        (1, len(one), etags[1]), (2, len(two), etags[2]), (3, len(three), etags[3]),
    ]  # fmt: skip
    page = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid, MaxParts=2)
    assert [p["PartNumber"] for p in page["Parts"]] == [1, 2]
    assert page["IsTruncated"]
    assert page["NextPartNumberMarker"] == 2
    rest = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid, PartNumberMarker=2)
    assert [p["PartNumber"] for p in rest["Parts"]] == [3]
    uploads = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(key, uid)]

    def complete(parts: list[tuple[int, str]]) -> Any:
        return s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
        )  # fmt: skip

    failures = {
        "InvalidPart": [(1, etags[1]), (3, etags[2])],  # wrong ETag
        "InvalidPartOrder": [(3, etags[3]), (1, etags[1])],
        "EntityTooSmall": [(1, etags[1]), (2, etags[2]), (3, etags[3])],  # part 2 < 5 MiB
    }
    for code, parts in failures.items():
        with pytest.raises(ClientError) as refused:
            complete(parts)
        assert _code(refused) == (code, 400)
    with pytest.raises(ClientError) as missing_part:
        complete([(1, etags[1]), (4, etags[3])])
    assert _code(missing_part) == ("InvalidPart", 400)
    with pytest.raises(ClientError) as absent:
        s3.head_object(Bucket=bucket, Key=key)
    assert _code(absent)[1] == 404  # nothing completed half-way

    done = complete([(1, etags[1]), (3, etags[3])])
    assert done["ETag"] == _multipart_etag([one, three])
    whole = one + three
    got = s3.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == whole
    assert got["ContentType"] == "application/x-kv"
    assert got["ETag"] == done["ETag"]
    boundary = len(one)
    ranged = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={boundary - 9}-{boundary + 9}")
    assert ranged["Body"].read() == whole[boundary - 9 : boundary + 10]
    suffix = s3.get_object(Bucket=bucket, Key=key, Range="bytes=-1000")
    assert suffix["Body"].read() == whole[-1000:]
    # The upload is gone with its parts (part 2 too, which was not used); Complete sent again
    # answers the object it made, as S3 does (test_s3_multipart_conformance).
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert complete([(1, etags[1])])["ETag"] == done["ETag"]
    gone_calls: list[Callable[[], Any]] = [
        lambda: s3.list_parts(Bucket=bucket, Key=key, UploadId=uid),
        lambda: s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid),
        lambda: s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=b"x"),
    ]
    for call in gone_calls:
        with pytest.raises(ClientError) as gone:
            call()
        assert _code(gone) == ("NoSuchUpload", 404)
    s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)  # no staged block left: the bucket is empty


def test_kv_uploads_abort_unknown_ids_and_the_size_limit(s3: Any) -> None:
    _kv_bucket(s3, "kv-abort")
    bucket = "kv-abort"
    uid = s3.create_multipart_upload(Bucket=bucket, Key="a")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="a", UploadId=uid, PartNumber=1, Body=b"part")
    for wrong_key, wrong_id in (("b", uid), ("a", "0" * 32), ("a", "../x\u0000")):
        with pytest.raises(ClientError) as unknown:
            s3.upload_part(Bucket=bucket, Key=wrong_key, UploadId=wrong_id, PartNumber=1, Body=b"x")
        assert _code(unknown) == ("NoSuchUpload", 404)
    s3.abort_multipart_upload(Bucket=bucket, Key="a", UploadId=uid)
    with pytest.raises(ClientError) as aborted:
        s3.list_parts(Bucket=bucket, Key="a", UploadId=uid)
    assert _code(aborted) == ("NoSuchUpload", 404)

    # Parts adding up to more than a KV object may hold: EntityTooLarge at Complete.
    big = s3.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    sizes = (60 * MIB, 5 * MIB)
    parts = []
    for number, size in enumerate(sizes, start=1):
        body = _data(10 + number, size)
        reply = s3.upload_part(Bucket=bucket, Key="big", UploadId=big, PartNumber=number, Body=body)
        parts.append({"PartNumber": number, "ETag": reply["ETag"]})
    with pytest.raises(ClientError) as too_large:
        s3.complete_multipart_upload(
            Bucket=bucket, Key="big", UploadId=big, MultipartUpload={"Parts": parts}
        )
    assert _code(too_large) == ("EntityTooLarge", 400)
    with pytest.raises(ClientError) as absent:
        s3.head_object(Bucket=bucket, Key="big")
    assert _code(absent)[1] == 404
    s3.abort_multipart_upload(Bucket=bucket, Key="big", UploadId=big)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    s3.delete_bucket(Bucket=bucket)  # aborted uploads leave no block behind


def test_kv_upload_with_a_checksum_algorithm(s3: Any) -> None:
    _kv_bucket(s3, "kv-sums")
    bucket, key = "kv-sums", "summed"
    uid = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
    with pytest.raises(ClientError) as bad:
        s3.upload_part(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=b"abc",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(b"abd").digest()).decode(),
        )  # fmt: skip
    assert _code(bad) == ("BadDigest", 400)
    bodies = (_data(30, 5 * MIB), _data(31, 1000))
    parts, digests = [], []
    for number, body in enumerate(bodies, start=1):
        reply = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=number, Body=body,
            ChecksumAlgorithm="SHA256",
        )  # fmt: skip
        digest = hashlib.sha256(body).digest()
        assert reply["ChecksumSHA256"] == base64.b64encode(digest).decode()
        digests.append(digest)
        parts.append(
            {"PartNumber": number, "ETag": reply["ETag"], "ChecksumSHA256": reply["ChecksumSHA256"]}
        )
    listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid)
    assert listed["ChecksumAlgorithm"] == "SHA256"
    assert [p["ChecksumSHA256"] for p in listed["Parts"]] == [p["ChecksumSHA256"] for p in parts]
    wrong = [dict(parts[0], ChecksumSHA256=parts[1]["ChecksumSHA256"]), parts[1]]
    with pytest.raises(ClientError) as mismatch:
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": wrong}
        )
    assert _code(mismatch) == ("InvalidPart", 400)
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
    )
    composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    assert done["ChecksumSHA256"] == f"{composite}-2"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(bodies)
    s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)


def test_another_tenant_cannot_touch_a_kv_upload(s3: Any, s3_cluster_fixture: Info) -> None:  # noqa: F811
    _kv_bucket(s3, "kv-private")
    bucket, key = "kv-private", "k"
    uid = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    mine = _data(20, 5 * MIB)
    etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=mine)["ETag"]
    info = s3_cluster_fixture
    other = s3_cluster.client(info, *s3_cluster.add_user(info, "kv-intruder"))
    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    denied_calls: list[Callable[[], Any]] = [
        lambda: other.create_multipart_upload(Bucket=bucket, Key=key),
        lambda: other.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=b"x"),
        lambda: other.list_parts(Bucket=bucket, Key=key, UploadId=uid),
        lambda: other.list_multipart_uploads(Bucket=bucket),
        lambda: other.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=uid, MultipartUpload=parts
        ),
        lambda: other.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid),
        lambda: other.upload_part_copy(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=2, CopySource=f"{bucket}/{key}"
        ),
    ]
    for call in denied_calls:
        with pytest.raises(ClientError) as denied:
            call()
        assert _code(denied) == ("AccessDenied", 403)
    # The owner's UploadPartCopy: NotImplemented, as CopyObject (the source never looked at).
    with pytest.raises(ClientError) as copy:
        s3.upload_part_copy(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=2, CopySource="nowhere/at-all"
        )
    assert _code(copy) == ("NotImplemented", 501)
    listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["ETag"]) for p in listed] == [(1, etag)]  # untouched
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid, MultipartUpload=parts)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == mine
    s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)


def test_put_etag_is_the_md5_unless_a_trailing_checksum_vouches_for_the_body(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    _kv_bucket(s3, "kv-etags")
    data = _data(21, 2 * MIB + 5)
    md5 = f'"{hashlib.md5(data).hexdigest()}"'
    # boto3's default over HTTPS: aws-chunked with a trailing x-amz-checksum-crc32, no MD5.
    first = s3.put_object(Bucket="kv-etags", Key="trailer", Body=data)["ETag"]
    second = s3.put_object(Bucket="kv-etags", Key="trailer", Body=data)["ETag"]
    assert VERSION_ETAG.fullmatch(first)
    assert VERSION_ETAG.fullmatch(second)
    assert first != second  # a new entity tag for every write, even of the same bytes
    got = s3.get_object(Bucket="kv-etags", Key="trailer")
    assert (got["ETag"], hashlib.sha256(got["Body"].read()).digest()) == (
        second, hashlib.sha256(data).digest(),
    )  # fmt: skip
    assert s3.head_object(Bucket="kv-etags", Key="trailer")["ETag"] == second
    listed = s3.list_objects_v2(Bucket="kv-etags")["Contents"]
    assert [(o["Key"], o["ETag"]) for o in listed] == [("trailer", second)]
    with pytest.raises(ClientError) as stale:
        s3.get_object(Bucket="kv-etags", Key="trailer", IfMatch=first)
    assert _code(stale) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as same:
        s3.get_object(Bucket="kv-etags", Key="trailer", IfNoneMatch=second)
    assert _code(same)[1] == 304
    # No trailing checksum, or a Content-MD5 beside it: the ETag is the MD5, as in S3.
    plain = s3_cluster.client(s3_cluster_fixture, request_checksum_calculation="when_required")
    assert plain.put_object(Bucket="kv-etags", Key="plain", Body=data)["ETag"] == md5
    content_md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    sent = s3.put_object(Bucket="kv-etags", Key="md5", Body=data, ContentMD5=content_md5)
    assert sent["ETag"] == md5
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as bad:
        s3.put_object(Bucket="kv-etags", Key="bad", Body=data, ContentMD5=wrong)
    assert _code(bad) == ("BadDigest", 400)
    with pytest.raises(ClientError) as absent:
        s3.head_object(Bucket="kv-etags", Key="bad")
    assert _code(absent)[1] == 404


def _trailer_put(info: Info, path: str, data: bytes, crc32: bytes) -> tuple[int, bytes]:
    """A PUT as the AWS SDKs send one with a flexible checksum: aws-chunked, unsigned, and
    x-amz-checksum-crc32 (here: crc32, right or wrong) in the trailer."""
    trailer = f"x-amz-checksum-crc32:{base64.b64encode(crc32).decode()}"
    body = f"{len(data):x}\r\n".encode() + data + f"\r\n0\r\n{trailer}\r\n\r\n".encode()
    url = info["gateway_s3"].rstrip("/") + path
    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Content-Encoding": "aws-chunked", "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-decoded-content-length": str(len(data)), "Content-Length": str(len(body)),
    }  # fmt: skip
    request = AWSRequest(method="PUT", url=url, headers=headers)
    SigV4Auth(
        Credentials(info["s3_access_key"], info["s3_secret_key"]), "s3", "us-east-1"
    ).add_auth(request)
    split = urllib.parse.urlsplit(url)
    assert split.hostname
    conn = http.client.HTTPSConnection(
        split.hostname, split.port, context=s3_cluster.tls_context(info), timeout=60
    )
    try:
        conn.request("PUT", path, body=body, headers=dict(request.headers.items()))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_wrong_trailing_checksum_stores_nothing_in_a_kv_bucket(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    """Without an MD5, the trailing checksum is what vouches for a KV PUT's bytes."""
    _kv_bucket(s3, "kv-trailer")
    data = _data(22, MIB + 3)
    right = zlib.crc32(data).to_bytes(4, "big")
    status, body = _trailer_put(s3_cluster_fixture, "/kv-trailer/k", data, right)
    assert status == 200, body
    stored = s3.get_object(Bucket="kv-trailer", Key="k")
    assert VERSION_ETAG.fullmatch(stored["ETag"])
    assert stored["Body"].read() == data
    wrong = zlib.crc32(b"other").to_bytes(4, "big")
    status, body = _trailer_put(s3_cluster_fixture, "/kv-trailer/k", _data(23, MIB + 3), wrong)
    assert status == 400
    assert b"<Code>BadDigest</Code>" in body
    assert s3.get_object(Bucket="kv-trailer", Key="k")["Body"].read() == data  # untouched
