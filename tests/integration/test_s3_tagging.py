"""S3 object tagging against a real secure dev cluster, as AWS S3 documents and answers it:
Put/Get/DeleteObjectTagging with boto3, awscli and minio-py; x-amz-tagging on PutObject,
CreateMultipartUpload, CopyObject (x-amz-tagging-directive) and POST Object; x-amz-tagging-count
on GET and HEAD; the tag sets S3 refuses (with nothing changed); another tenant's user refused;
KV buckets (the PUT's tags, changes NotImplemented) and bucket tagging. Tagging changes no ETag
and no Last-Modified, and every read compares bytes."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError
from minio import Minio
from minio.commonconfig import Tags

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
MIB = 1024 * 1024
BUCKET = "tagging-a"


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    return _code(failed)


def _tag_set(tags: dict[str, str]) -> dict[str, Any]:
    return {"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}


def _tags(s3: Any, key: str, bucket: str = BUCKET) -> dict[str, str]:
    reply = s3.get_object_tagging(Bucket=bucket, Key=key)
    return {t["Key"]: t["Value"] for t in reply["TagSet"]}


def _count(s3: Any, key: str) -> str | None:
    """x-amz-tagging-count of a HEAD (and the same of a GET, whose body is checked by callers)."""
    head = s3.head_object(Bucket=BUCKET, Key=key)["ResponseMetadata"]["HTTPHeaders"]
    got = s3.get_object(Bucket=BUCKET, Key=key)
    got["Body"].read()
    assert got["ResponseMetadata"]["HTTPHeaders"].get("x-amz-tagging-count") == head.get(
        "x-amz-tagging-count"
    )
    count: str | None = head.get("x-amz-tagging-count")
    return count


@pytest.fixture(scope="module")
def info(s3_cluster_fixture: Info) -> Info:  # noqa: F811
    return s3_cluster_fixture


@pytest.fixture(scope="module")
def users(info: Info) -> dict[str, tuple[str, str]]:
    """Two tenants' plain users: the bucket's owner and a stranger."""
    return {
        "owner": s3_cluster.add_user(info, "tag-a"),
        "other": s3_cluster.add_user(info, "tag-b"),
    }


@pytest.fixture(scope="module")
def s3(info: Info, users: dict[str, tuple[str, str]]) -> Any:
    client = s3_cluster.client(info, *users["owner"])
    client.create_bucket(Bucket=BUCKET)
    return client


def test_put_get_delete_object_tagging_change_no_etag_nor_last_modified(s3: Any) -> None:
    for i, size in enumerate((5, 3 * MIB + 1)):  # inline in the meta / in part files
        key, data = f"obj-{size}", _data(i, size)
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        before = s3.head_object(Bucket=BUCKET, Key=key)
        assert _tags(s3, key) == {}
        assert _count(s3, key) is None
        tags = {"project": "kv tier", "owner": "ops@example.com", "empty": "", "ü": "v" * 256}
        put = s3.put_object_tagging(Bucket=BUCKET, Key=key, Tagging=_tag_set(tags))
        assert put["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert _tags(s3, key) == tags
        assert _count(s3, key) == "4"
        after = s3.head_object(Bucket=BUCKET, Key=key)
        assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
        assert s3.get_object(Bucket=BUCKET, Key=key)["TagCount"] == 4
        s3.put_object_tagging(Bucket=BUCKET, Key=key, Tagging=_tag_set({"only": "one"}))
        assert _tags(s3, key) == {"only": "one"}  # replaced, not merged
        deleted = s3.delete_object_tagging(Bucket=BUCKET, Key=key)
        assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
        assert _tags(s3, key) == {}
        assert _count(s3, key) is None
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key)["Contents"]
        assert [(o["Key"], o["ETag"]) for o in listed] == [(key, before["ETag"])]
        hashed = hashlib.sha256(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert hashed.hexdigest() == hashlib.sha256(data).hexdigest()


def test_x_amz_tagging_on_put_multipart_and_copy(s3: Any) -> None:
    data = _data(3, 1000)
    s3.put_object(Bucket=BUCKET, Key="put", Body=data, Tagging="a=1&b=x%20y")
    assert _tags(s3, "put") == {"a": "1", "b": "x y"}
    s3.put_object(Bucket=BUCKET, Key="put", Body=data)  # a new PUT replaces them: none
    assert _tags(s3, "put") == {}
    s3.put_object(Bucket=BUCKET, Key="put", Body=data, Tagging="src=yes")
    # CopyObject: the source's tags by default, x-amz-tagging's with REPLACE.
    s3.copy_object(Bucket=BUCKET, Key="copied", CopySource=f"{BUCKET}/put")
    assert _tags(s3, "copied") == {"src": "yes"}
    s3.copy_object(
        Bucket=BUCKET, Key="replaced", CopySource=f"{BUCKET}/put",
        TaggingDirective="REPLACE", Tagging="new=1",
    )  # fmt: skip
    assert _tags(s3, "replaced") == {"new": "1"}
    s3.copy_object(
        Bucket=BUCKET, Key="meta-replaced", CopySource=f"{BUCKET}/put",
        MetadataDirective="REPLACE", Metadata={"m": "1"}, Tagging="ignored=1",
    )  # fmt: skip
    assert _tags(s3, "meta-replaced") == {"src": "yes"}  # tagging directive COPY
    assert s3.head_object(Bucket=BUCKET, Key="meta-replaced")["Metadata"] == {"m": "1"}
    assert s3.get_object(Bucket=BUCKET, Key="replaced")["Body"].read() == data
    code = _fails(
        lambda: s3.copy_object(
            Bucket=BUCKET, Key="x", CopySource=f"{BUCKET}/put", TaggingDirective="MOVE"
        )
    )
    assert code == ("InvalidArgument", 400)
    # CreateMultipartUpload: the completed object has the upload's tags.
    big = _data(4, 6 * MIB)
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="mp", Tagging="mp=1&k=v")
    parts = []
    for number, at in enumerate(range(0, len(big), 5 * MIB), start=1):
        part = s3.upload_part(
            Bucket=BUCKET, Key="mp", UploadId=up["UploadId"], PartNumber=number,
            Body=big[at : at + 5 * MIB],
        )  # fmt: skip
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    s3.complete_multipart_upload(
        Bucket=BUCKET, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert _tags(s3, "mp") == {"mp": "1", "k": "v"}
    assert s3.get_object(Bucket=BUCKET, Key="mp")["Body"].read() == big


def test_tag_sets_s3_refuses_change_nothing(s3: Any) -> None:
    data = _data(5, 64)
    s3.put_object(Bucket=BUCKET, Key="strict", Body=data, Tagging="keep=1")
    refused = {
        "BadRequest": {f"k{i}": "v" for i in range(11)},
        "InvalidTag": {"k" * 129: "v"},
    }
    for code, tags in refused.items():
        put = functools.partial(
            s3.put_object_tagging, Bucket=BUCKET, Key="strict", Tagging=_tag_set(tags)
        )
        assert _fails(put) == (code, 400)
    for tag_set in (
        [{"Key": "k", "Value": "v" * 257}],
        [{"Key": "aws:reserved", "Value": "v"}],
        [{"Key": "dup", "Value": "1"}, {"Key": "dup", "Value": "2"}],
        [{"Key": "a<b", "Value": "v"}],  # outside S3's characters
    ):
        put = functools.partial(
            s3.put_object_tagging, Bucket=BUCKET, Key="strict", Tagging={"TagSet": tag_set}
        )
        assert _fails(put) == ("InvalidTag", 400)
    assert _tags(s3, "strict") == {"keep": "1"}
    # The header of a PUT: refused, nothing stored.
    for header in ("a=1&a=2", "aws:x=1", "&".join(f"k{i}=v" for i in range(11))):
        put = functools.partial(s3.put_object, Bucket=BUCKET, Key="nope", Body=b"x", Tagging=header)
        error, status = _fails(put)
        assert status == 400
        assert error in ("InvalidTag", "BadRequest")
    assert _fails(lambda: s3.head_object(Bucket=BUCKET, Key="nope")) == ("404", 404)
    # Absent objects and buckets.
    assert _fails(
        lambda: s3.put_object_tagging(Bucket=BUCKET, Key="absent", Tagging=_tag_set({"a": "b"}))
    ) == ("NoSuchKey", 404)
    assert _fails(lambda: s3.get_object_tagging(Bucket=BUCKET, Key="absent")) == ("NoSuchKey", 404)
    assert _fails(lambda: s3.delete_object_tagging(Bucket=BUCKET, Key="absent")) == (
        "NoSuchKey", 404,
    )  # fmt: skip
    assert _fails(lambda: s3.get_object_tagging(Bucket="tagging-none", Key="k")) == (
        "NoSuchBucket", 404,
    )  # fmt: skip
    assert s3.get_object(Bucket=BUCKET, Key="strict")["Body"].read() == data


def test_malformed_tagging_documents_and_a_missing_digest(info: Info, s3: Any) -> None:
    """Raw bodies, signed with SigV4 by botocore's signer (no SDK checksum added)."""
    s3.put_object(Bucket=BUCKET, Key="raw", Body=b"raw", Tagging="keep=1")
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    url = f"{info['gateway_s3'].rstrip('/')}/{BUCKET}/raw?tagging="
    keys = s3._request_signer._credentials  # the owner's, as boto3 holds them

    def put(body: bytes, *, digest: bool = True) -> tuple[int, bytes]:
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        request = AWSRequest(
            method="PUT", url=url, data=body, headers={"Content-MD5": md5} if digest else {}
        )
        S3SigV4Auth(keys, "s3", "us-east-1").add_auth(request)
        reply = http.request("PUT", url, body=body, headers=dict(request.headers.items()))
        return reply.status, reply.data

    for body in (
        b"<Tagging><TagSet><Tag><Key>k</Key></Tag></TagSet></Tagging>",
        b"<Tagging><TagSet><Tag><Key>k</Key><Value/><Extra/></Tag></TagSet></Tagging>",
        b"<Tagging/>",
        b"<NotTagging><TagSet/></NotTagging>",
        b"not xml",
    ):
        status, reply = put(body)
        assert status == 400, reply
        assert b"<Code>MalformedXML</Code>" in reply, body
    status, reply = put(
        b"<Tagging><TagSet><Tag><Key></Key><Value>v</Value></Tag></TagSet></Tagging>"
    )
    assert status == 400
    assert b"<Code>InvalidTag</Code>" in reply  # an empty key (boto3 refuses to send one)
    valid = b"<Tagging><TagSet><Tag><Key>a</Key><Value>b</Value></Tag></TagSet></Tagging>"
    status, reply = put(valid, digest=False)  # S3 requires Content-MD5 or a checksum
    assert status == 400
    assert b"<Code>InvalidRequest</Code>" in reply
    assert _tags(s3, "raw") == {"keep": "1"}
    assert put(b"<Tagging><TagSet/></Tagging>")[0] == 200  # an empty set: no tags
    assert _tags(s3, "raw") == {}


def test_another_tenants_user_is_refused(info: Info, s3: Any, users: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="mine", Body=b"mine", Tagging="secret=1")
    other = s3_cluster.client(info, *users["other"])
    calls: list[Callable[[], Any]] = [
        lambda: other.get_object_tagging(Bucket=BUCKET, Key="mine"),
        lambda: other.put_object_tagging(Bucket=BUCKET, Key="mine", Tagging=_tag_set({"x": "1"})),
        lambda: other.delete_object_tagging(Bucket=BUCKET, Key="mine"),
        lambda: other.put_object_tagging(Bucket=BUCKET, Key="absent", Tagging=_tag_set({})),
    ]
    for call in calls:
        assert _fails(call) == ("AccessDenied", 403)
    assert _tags(s3, "mine") == {"secret": "1"}


def test_awscli_s3api_object_tagging(info: Info, s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="cli", Body=b"cli")
    s3_cluster.aws_cli(
        info, "s3api", "put-object-tagging", "--bucket", BUCKET, "--key", "cli",
        "--tagging", "TagSet=[{Key=env,Value=prod},{Key=team,Value=kv}]",
    )  # fmt: skip
    got = s3_cluster.aws_cli(
        info, "s3api", "get-object-tagging", "--bucket", BUCKET, "--key", "cli"
    )
    assert '"env"' in got.stdout
    assert '"prod"' in got.stdout
    assert _tags(s3, "cli") == {"env": "prod", "team": "kv"}
    s3_cluster.aws_cli(info, "s3api", "delete-object-tagging", "--bucket", BUCKET, "--key", "cli")
    assert _tags(s3, "cli") == {}


def test_minio_object_tags(info: Info, s3: Any) -> None:
    url = urllib.parse.urlparse(info["gateway_s3"])
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    owner = s3._request_signer._credentials  # the owner's keys, as boto3 holds them
    mc = Minio(
        url.netloc, access_key=owner.access_key, secret_key=owner.secret_key,
        secure=True, region="us-east-1", http_client=pool,
    )  # fmt: skip
    data = _data(6, 2048)
    mc.put_object(BUCKET, "minio", io.BytesIO(data), len(data))
    tags = Tags.new_object_tags()
    tags["color"] = "blue"
    tags["size"] = "2k"
    mc.set_object_tags(BUCKET, "minio", tags)
    got = mc.get_object_tags(BUCKET, "minio")
    assert dict(got or {}) == {"color": "blue", "size": "2k"}
    mc.delete_object_tags(BUCKET, "minio")
    assert not mc.get_object_tags(BUCKET, "minio")
    response = mc.get_object(BUCKET, "minio")
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()


def test_post_object_tagging_field(info: Info, s3: Any) -> None:
    document = "<Tagging><TagSet><Tag><Key>form</Key><Value>1</Value></Tag></TagSet></Tagging>"
    post = s3.generate_presigned_post(
        BUCKET, "posted", Fields={"tagging": document}, Conditions=[{"tagging": document}]
    )
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    form = [*post["fields"].items(), ("file", ("f.bin", b"posted bytes"))]
    body, content_type = urllib3.encode_multipart_formdata(form)
    reply = http.request("POST", post["url"], body=body, headers={"Content-Type": content_type})
    assert reply.status == 204, reply.data
    assert _tags(s3, "posted") == {"form": "1"}
    assert s3.get_object(Bucket=BUCKET, Key="posted")["Body"].read() == b"posted bytes"


def test_kv_buckets_keep_the_tags_of_the_put(s3: Any) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket="tagging-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    s3.put_object(Bucket="tagging-kv", Key="k", Body=b"kv", Tagging="at=put")
    assert _fails(
        lambda: s3.put_object_tagging(Bucket="tagging-kv", Key="k", Tagging=_tag_set({"a": "b"}))
    ) == ("NotImplemented", 501)
    assert _fails(lambda: s3.delete_object_tagging(Bucket="tagging-kv", Key="k")) == (
        "NotImplemented", 501,
    )  # fmt: skip
    assert _tags(s3, "k", bucket="tagging-kv") == {"at": "put"}  # unchanged
    assert _fails(lambda: s3.get_object_tagging(Bucket="tagging-kv", Key="absent")) == (
        "NoSuchKey", 404,
    )  # fmt: skip
    # Bucket tags are the bucket's configuration: a KV bucket has them too.
    s3.put_bucket_tagging(Bucket="tagging-kv", Tagging=_tag_set({"tier": "dram"}))
    assert s3.get_bucket_tagging(Bucket="tagging-kv")["TagSet"] == [
        {"Key": "tier", "Value": "dram"}
    ]
    assert s3.get_object(Bucket="tagging-kv", Key="k")["Body"].read() == b"kv"


def test_bucket_tagging(info: Info, s3: Any, users: Any) -> None:
    assert _fails(lambda: s3.get_bucket_tagging(Bucket=BUCKET)) == ("NoSuchTagSet", 404)
    fifty = {f"k{i:02}": f"v{i}" for i in range(50)}
    s3.put_bucket_tagging(Bucket=BUCKET, Tagging=_tag_set(fifty))
    got = s3.get_bucket_tagging(Bucket=BUCKET)["TagSet"]
    assert {t["Key"]: t["Value"] for t in got} == fifty
    # Refused sets change nothing: 51 tags, an aws: key, a duplicate key.
    refused: list[dict[str, Any]] = [
        _tag_set({f"k{i}": "v" for i in range(51)}),
        _tag_set({"aws:cost": "1"}),
        {"TagSet": [{"Key": "a", "Value": "1"}, {"Key": "a", "Value": "2"}]},
    ]
    for bad in refused:
        put = functools.partial(s3.put_bucket_tagging, Bucket=BUCKET, Tagging=bad)
        assert _fails(put) == ("InvalidTag", 400)
    assert len(s3.get_bucket_tagging(Bucket=BUCKET)["TagSet"]) == 50
    # Another tenant's user may neither read nor change them.
    other = s3_cluster.client(info, *users["other"])
    for call in (
        lambda: other.get_bucket_tagging(Bucket=BUCKET),
        lambda: other.put_bucket_tagging(Bucket=BUCKET, Tagging=_tag_set({"x": "1"})),
        lambda: other.delete_bucket_tagging(Bucket=BUCKET),
    ):
        assert _fails(call) == ("AccessDenied", 403)
    assert len(s3.get_bucket_tagging(Bucket=BUCKET)["TagSet"]) == 50
    # awscli reads them; DeleteBucketTagging removes them and keeps the bucket.
    got_cli = s3_cluster.aws_cli(info, "s3api", "get-bucket-tagging", "--bucket", BUCKET)
    assert '"k49"' in got_cli.stdout
    s3.delete_bucket_tagging(Bucket=BUCKET)
    assert _fails(lambda: s3.get_bucket_tagging(Bucket=BUCKET)) == ("NoSuchTagSet", 404)
    s3.head_bucket(Bucket=BUCKET)
