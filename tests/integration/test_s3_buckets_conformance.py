"""Bucket-level S3 behaviours with boto3, unmodified, against a real secure dev cluster:
DeleteBucket with multipart uploads in progress, a deleted bucket seen through a gateway's stale
record, CreateBucket's LocationConstraint, ListBuckets pages, ListObjectsV2's empty continuation
token, PutBucketVersioning, HeadBucket's bucket kind and KV buckets made with `kvtier admin
bucket`. Every operation has its other-tenant denial next to it; every read compares bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kvtier import kv, names
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import multipart
from tests.integration import s3_cluster
from tests.integration.conftest import cli_env, cluster_security, kvtier_cmd, user_security
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
KIND_HEADER = "x-kvtier-bucket-kind"


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    error = exc.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    return _code(failed)


def _data(seed: int, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])


def _kv_kind(request: Any, **_: Any) -> None:
    request.headers[KIND_HEADER] = "kv"


def _stored(state: Path, internal_key: str) -> list[Path]:
    """The shard directories of a key of the internal multipart bucket on every drive (where
    the datanodes keep it: objects/<bucket>/<h[:2]>/<h>, h the key's SHA-256)."""
    h = hashlib.sha256(internal_key.encode()).hexdigest()
    return sorted(state.glob(f"nodes/*/*/objects/{names.MULTIPART_BUCKET}/{h[:2]}/{h}"))


@pytest.fixture(scope="module")
def s3(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """The dev cluster's admin (tenant default)."""
    return s3_cluster.client(s3_cluster_fixture)


@pytest.fixture(scope="module")
def other_keys(s3_cluster_fixture: Info) -> tuple[str, str]:  # noqa: F811
    """A user of another tenant."""
    return s3_cluster.add_user(s3_cluster_fixture, "t-other")


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: Info, other_keys: tuple[str, str]) -> Any:  # noqa: F811
    return s3_cluster.client(s3_cluster_fixture, *other_keys)


def test_delete_bucket_aborts_its_uploads_in_progress(
    s3: Any,
    other: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    state = Path(s3_cluster_fixture["state"])
    s3.create_bucket(Bucket="mpu-gone")
    uploads = {
        key: s3.create_multipart_upload(Bucket="mpu-gone", Key=key)["UploadId"]
        for key in ("a", "dir/b")
    }
    for n, (key, upload_id) in enumerate(uploads.items()):
        s3.upload_part(
            Bucket="mpu-gone", Key=key, UploadId=upload_id, PartNumber=1, Body=_data(n, 300_000)
        )
    parts = [p for u in uploads.values() for p in _stored(state, multipart.part_key(u, 1))]
    assert parts, "the parts are on the drives"
    # Another tenant may not delete it (nor see its uploads).
    assert _fails(lambda: other.delete_bucket(Bucket="mpu-gone")) == ("AccessDenied", 403)
    listed = s3.list_multipart_uploads(Bucket="mpu-gone")["Uploads"]
    assert sorted(u["UploadId"] for u in listed) == sorted(uploads.values())

    deleted = s3.delete_bucket(Bucket="mpu-gone")
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert _fails(lambda: s3.list_multipart_uploads(Bucket="mpu-gone")) == ("NoSuchBucket", 404)
    assert [p for p in parts if p.exists()] == [], "the parts' storage is reclaimed"
    s3.create_bucket(Bucket="mpu-gone")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="mpu-gone")
    with pytest.raises(ClientError) as old:
        s3.list_parts(Bucket="mpu-gone", Key="a", UploadId=uploads["a"])
    assert _code(old) == ("NoSuchUpload", 404)
    s3.delete_bucket(Bucket="mpu-gone")


def test_delete_bucket_with_objects_keeps_everything(s3: Any) -> None:
    s3.create_bucket(Bucket="mpu-full")
    s3.put_object(Bucket="mpu-full", Key="obj", Body=b"kept")
    upload_id = s3.create_multipart_upload(Bucket="mpu-full", Key="big")["UploadId"]
    assert _fails(lambda: s3.delete_bucket(Bucket="mpu-full")) == ("BucketNotEmpty", 409)
    listed = s3.list_multipart_uploads(Bucket="mpu-full")["Uploads"]
    assert [u["UploadId"] for u in listed] == [upload_id], "nothing aborted half-way"
    assert s3.get_object(Bucket="mpu-full", Key="obj")["Body"].read() == b"kept"
    s3.delete_object(Bucket="mpu-full", Key="obj")
    s3.delete_bucket(Bucket="mpu-full")
    assert _fails(lambda: s3.head_bucket(Bucket="mpu-full"))[1] == 404


def test_delete_kv_bucket_aborts_uploads_begun_over_grpc(
    s3: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    """S3 refuses multipart uploads on KV buckets, but the gRPC object API can begin one; the
    bucket's deletion takes it along too."""
    info = s3_cluster_fixture
    state = Path(info["state"])
    s3.meta.events.register("before-sign.s3.CreateBucket", _kv_kind)
    try:
        s3.create_bucket(Bucket="kv-mpu")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", _kv_kind)

    async def begin() -> tuple[str, str]:
        async with metadata_client.MetadataClient(
            info["metadata"], security=cluster_security(state)
        ) as meta:
            record = await meta.get_bucket("kv-mpu")
        async with gateway_client.ObjectServiceClient(
            info["gateway_grpc"], security=user_security(state)
        ) as grpc_api:
            upload_id = await grpc_api.create_multipart_upload(
                pb.CreateMultipartUploadRequest(bucket="kv-mpu", key="blk")
            )
        stored = names.storage_name(record.name, record.storage_id)
        return upload_id, multipart.record_key(stored, upload_id, "blk")

    upload_id, record_key = asyncio.run(begin())
    assert _stored(state, record_key), "the upload's record is on the drives"
    assert s3.delete_bucket(Bucket="kv-mpu")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert _stored(state, record_key) == [], f"upload {upload_id} is aborted"
    assert _fails(lambda: s3.head_bucket(Bucket="kv-mpu"))[1] == 404


def test_delete_kv_bucket_discards_its_staged_upload_blocks(
    s3: Any,
    other: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    """A KV bucket's uploads are blocks in its namespace: they do not make it BucketNotEmpty,
    and its deletion removes them from DRAM (read back with the KV SDK)."""
    info = s3_cluster_fixture
    state = Path(info["state"])
    s3.meta.events.register("before-sign.s3.CreateBucket", _kv_kind)
    try:
        s3.create_bucket(Bucket="kv-staged")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", _kv_kind)
    upload_id = s3.create_multipart_upload(Bucket="kv-staged", Key="blk")["UploadId"]
    s3.upload_part(
        Bucket="kv-staged", Key="blk", UploadId=upload_id, PartNumber=1, Body=_data(3, 100_000)
    )

    async def namespace() -> tuple[str, str]:
        async with metadata_client.MetadataClient(
            info["metadata"], security=cluster_security(state)
        ) as meta:
            record = await meta.get_bucket("kv-staged")
        return f"s3:{names.storage_name(record.name, record.storage_id)}", record.tenant

    async def blocks(ns: str, tenant: str) -> list[bytes]:
        client = await kv.AsyncKVClient.connect(
            namespace=ns, tenant=tenant, metadata=info["metadata_client"], replicas=1,
            timeout_s=10.0, security=user_security(state),
        )  # fmt: skip
        try:
            return [key for key, _ in (await client.list_keys())[0]]
        finally:
            await client.close()

    ns, tenant = asyncio.run(namespace())
    assert asyncio.run(blocks(ns, tenant)), "the upload's record and part are in DRAM"
    put = s3.put_object(Bucket="kv-staged", Key="obj", Body=b"an object")
    assert put["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert _fails(lambda: s3.delete_bucket(Bucket="kv-staged")) == ("BucketNotEmpty", 409)
    listed = s3.list_multipart_uploads(Bucket="kv-staged")["Uploads"]
    assert [u["UploadId"] for u in listed] == [upload_id], "nothing aborted half-way"
    assert _fails(lambda: other.delete_bucket(Bucket="kv-staged")) == ("AccessDenied", 403)
    s3.delete_object(Bucket="kv-staged", Key="obj")
    assert asyncio.run(blocks(ns, tenant)), "only the upload's blocks are left"
    assert s3.delete_bucket(Bucket="kv-staged")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert asyncio.run(blocks(ns, tenant)) == [], "the staged blocks are deleted"
    assert _fails(lambda: s3.list_multipart_uploads(Bucket="kv-staged")) == ("NoSuchBucket", 404)
    s3.meta.events.register("before-sign.s3.CreateBucket", _kv_kind)
    try:
        s3.create_bucket(Bucket="kv-staged")  # a new namespace: its own blocks only
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", _kv_kind)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="kv-staged")
    s3.delete_bucket(Bucket="kv-staged")


def test_deleted_bucket_behind_a_stale_record_is_no_such_bucket(
    s3: Any,
    other: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    """The gateway caches bucket records (2 s); a bucket deleted through another gateway (here:
    at the metadata service) must not answer 403 from the cached record of its old owner."""
    info = s3_cluster_fixture
    state = Path(info["state"])
    s3.create_bucket(Bucket="stale-one")

    async def remove_then_create(tenant: str = "") -> None:
        async with metadata_client.MetadataClient(
            info["metadata"], security=cluster_security(state)
        ) as meta:
            await meta.get_bucket("stale-one")  # connected before the clock starts
            assert _fails(lambda: other.list_objects_v2(Bucket="stale-one")) == (
                "AccessDenied", 403,
            )  # fmt: skip
            await meta.delete_bucket("stale-one")
            if tenant:
                await meta.create_bucket("stale-one", tenant)

    asyncio.run(remove_then_create())
    assert _fails(lambda: other.list_objects_v2(Bucket="stale-one")) == ("NoSuchBucket", 404)
    assert _fails(lambda: other.head_bucket(Bucket="stale-one"))[1] == 404
    assert _fails(lambda: other.put_object(Bucket="stale-one", Key="k", Body=b"x")) == (
        "NoSuchBucket", 404,
    )  # fmt: skip
    # Created again for the other tenant meanwhile: theirs at once; a live bucket of another
    # tenant is still AccessDenied.
    s3.create_bucket(Bucket="stale-one")
    asyncio.run(remove_then_create("t-other"))
    other.put_object(Bucket="stale-one", Key="k", Body=b"mine")
    assert other.get_object(Bucket="stale-one", Key="k")["Body"].read() == b"mine"
    s3.create_bucket(Bucket="someone-elses")
    assert _fails(lambda: other.list_objects_v2(Bucket="someone-elses")) == ("AccessDenied", 403)
    assert _fails(lambda: other.head_bucket(Bucket="someone-elses"))[1] == 403
    other.delete_object(Bucket="stale-one", Key="k")
    other.delete_bucket(Bucket="stale-one")
    s3.delete_bucket(Bucket="someone-elses")


def test_create_bucket_location_constraint(s3: Any) -> None:
    served = {"LocationConstraint": "us-east-1"}
    made = s3.create_bucket(Bucket="loc-served", CreateBucketConfiguration=served)
    assert made["ResponseMetadata"]["HTTPStatusCode"] == 200
    s3.create_bucket(Bucket="loc-served", CreateBucketConfiguration=served)  # the owner again
    s3.head_bucket(Bucket="loc-served")
    elsewhere = {"LocationConstraint": "eu-west-1"}
    assert _fails(
        lambda: s3.create_bucket(Bucket="loc-elsewhere", CreateBucketConfiguration=elsewhere)
    ) == ("InvalidLocationConstraint", 400)
    assert _fails(lambda: s3.head_bucket(Bucket="loc-elsewhere"))[1] == 404, "nothing created"
    s3.delete_bucket(Bucket="loc-served")


def test_list_buckets_pages_and_prefix(
    s3: Any,
    other: Any,
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    mine = [f"lb-page-{i}" for i in range(5)]
    for name in [*mine, "lb-other"]:
        s3.create_bucket(Bucket=name)
    first = s3.list_buckets(Prefix="lb-page-", MaxBuckets=2)
    assert [b["Name"] for b in first["Buckets"]] == mine[:2]
    assert first["Prefix"] == "lb-page-"
    assert {b["BucketRegion"] for b in first["Buckets"]} == {"us-east-1"}
    token = first["ContinuationToken"]
    second = s3.list_buckets(Prefix="lb-page-", MaxBuckets=2, ContinuationToken=token)
    assert [b["Name"] for b in second["Buckets"]] == mine[2:4]
    third = s3.list_buckets(
        Prefix="lb-page-", MaxBuckets=2, ContinuationToken=second["ContinuationToken"]
    )
    assert [b["Name"] for b in third["Buckets"]] == mine[4:]
    assert "ContinuationToken" not in third
    pages = s3.get_paginator("list_buckets").paginate(
        Prefix="lb-", PaginationConfig={"PageSize": 2}
    )
    assert [b["Name"] for p in pages for b in p["Buckets"]] == ["lb-other", *mine]
    everything = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert set(mine) <= set(everything)
    assert "ContinuationToken" not in s3.list_buckets()
    assert s3.list_buckets(Prefix="lb-", BucketRegion="eu-west-1")["Buckets"] == []
    unchecked = s3_cluster.client(s3_cluster_fixture, parameter_validation=False)
    for bad in (0, 10001):
        assert _fails(lambda: unchecked.list_buckets(MaxBuckets=bad)) == ("InvalidArgument", 400)  # noqa: B023
    for token in ("", "!!", "bm8"):  # empty, not base64, not a bucket name ("no")
        assert _fails(lambda: s3.list_buckets(ContinuationToken=token)) == (  # noqa: B023
            "InvalidArgument", 400,
        )  # fmt: skip
    # Another tenant's user lists none of them, with or without our token.
    assert other.list_buckets(Prefix="lb-page-")["Buckets"] == []
    after_ours = other.list_buckets(Prefix="lb-", ContinuationToken=first["ContinuationToken"])
    assert after_ours["Buckets"] == []
    for name in [*mine, "lb-other"]:
        s3.delete_bucket(Bucket=name)


def test_list_objects_v2_empty_continuation_token(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="tok-empty")
    s3.meta.events.register("before-sign.s3.CreateBucket", _kv_kind)
    try:
        s3.create_bucket(Bucket="tok-empty-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", _kv_kind)
    for bucket in ("tok-empty", "tok-empty-kv"):
        s3.put_object(Bucket=bucket, Key="k", Body=b"v")
        assert _fails(lambda: s3.list_objects_v2(Bucket=bucket, ContinuationToken="")) == (  # noqa: B023
            "InvalidArgument", 400,
        )  # fmt: skip
        listed = s3.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in listed["Contents"]] == ["k"]
        assert _fails(lambda: other.list_objects_v2(Bucket=bucket)) == ("AccessDenied", 403)  # noqa: B023
        s3.delete_object(Bucket=bucket, Key="k")
        s3.delete_bucket(Bucket=bucket)


def test_list_objects_v1_delimiter_pages(s3: Any, other: Any) -> None:
    """ListObjects (v1) pages by a delimiter: the NextMarker of a page that ends at a common
    prefix resumes after that prefix (not into it), and the last page is not truncated."""
    keys = ["asdf", "boo/bar", "boo/baz/xyzzy", "cquux/bla", "cquux/thud"]
    s3.create_bucket(Bucket="v1-delim")
    for key in keys:
        s3.put_object(Bucket="v1-delim", Key=key, Body=b"v")

    def page(marker: str, max_keys: int, prefix: str = "") -> tuple[Any, ...]:
        got = s3.list_objects(
            Bucket="v1-delim", Delimiter="/", Marker=marker, MaxKeys=max_keys, Prefix=prefix
        )
        return (
            [o["Key"] for o in got.get("Contents", [])],
            [p["Prefix"] for p in got.get("CommonPrefixes", [])],
            got["IsTruncated"], got.get("NextMarker"),
        )  # fmt: skip

    assert page("", 1) == (["asdf"], [], True, "asdf")
    assert page("asdf", 1) == ([], ["boo/"], True, "boo/")
    assert page("boo/", 1) == ([], ["cquux/"], False, None)
    assert page("", 2) == (["asdf"], ["boo/"], True, "boo/")
    assert page("boo/", 2) == ([], ["cquux/"], False, None)
    assert page("boo/bar", 1000) == ([], ["cquux/"], False, None), "a key under a prefix"
    assert page("boo/bar", 1, "boo/") == ([], ["boo/baz/"], False, None)
    v2 = s3.list_objects_v2(Bucket="v1-delim", Delimiter="/", StartAfter="boo/")
    assert [p["Prefix"] for p in v2["CommonPrefixes"]] == ["cquux/"]
    assert _fails(lambda: other.list_objects(Bucket="v1-delim", Marker="boo/")) == (
        "AccessDenied", 403,
    )  # fmt: skip
    for key in keys:
        s3.delete_object(Bucket="v1-delim", Key=key)
    s3.delete_bucket(Bucket="v1-delim")


def test_put_bucket_versioning(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="ver-put")
    suspended = s3.put_bucket_versioning(
        Bucket="ver-put", VersioningConfiguration={"Status": "Suspended"}
    )
    assert suspended["ResponseMetadata"]["HTTPStatusCode"] == 200
    # Recorded on a never-versioned bucket too, as S3 does.
    assert s3.get_bucket_versioning(Bucket="ver-put")["Status"] == "Suspended"
    # Enabled (and Suspended after it): tests/integration/test_s3_versioning.py.
    mfa = {"Status": "Suspended", "MFADelete": "Enabled"}
    assert _fails(
        lambda: s3.put_bucket_versioning(Bucket="ver-put", VersioningConfiguration=mfa)
    ) == ("NotImplemented", 501)
    bogus = {"Status": "Sometimes"}
    assert _fails(
        lambda: s3.put_bucket_versioning(Bucket="ver-put", VersioningConfiguration=bogus)
    ) == ("MalformedXML", 400)
    assert _fails(
        lambda: other.put_bucket_versioning(
            Bucket="ver-put", VersioningConfiguration={"Status": "Suspended"}
        )
    ) == ("AccessDenied", 403)
    assert _fails(
        lambda: s3.put_bucket_versioning(
            Bucket="ver-missing", VersioningConfiguration={"Status": "Suspended"}
        )
    ) == ("NoSuchBucket", 404)
    # Its writes make the null version (the PUT answers no version id, as S3's); its delete
    # leaves a null delete marker, which DeleteBucket counts until it is removed.
    assert "VersionId" not in s3.put_object(Bucket="ver-put", Key="k", Body=b"one")
    assert s3.get_object(Bucket="ver-put", Key="k")["Body"].read() == b"one"
    deleted = s3.delete_object(Bucket="ver-put", Key="k")
    assert (deleted["DeleteMarker"], deleted["VersionId"]) == (True, "null")
    s3.delete_object(Bucket="ver-put", Key="k", VersionId="null")
    s3.delete_bucket(Bucket="ver-put")


def test_unknown_sub_resources_never_fall_through_to_the_plain_operation(s3: Any) -> None:
    """Sub-resources newer than our routes were once served as the plain operation: DELETE
    ?metadataConfiguration deleted the bucket, PUT ?annotation or ?renameObject overwrote the
    object, DELETE ?annotation deleted it. Now NotImplemented, nothing touched."""
    s3.create_bucket(Bucket="sub-res")
    s3.put_object(Bucket="sub-res", Key="k", Body=b"kept")
    calls = [
        lambda: s3.delete_bucket_metadata_configuration(Bucket="sub-res"),
        lambda: s3.delete_bucket_metadata_table_configuration(Bucket="sub-res"),
        lambda: s3.rename_object(Bucket="sub-res", Key="k", RenameSource="sub-res/other"),
        lambda: s3.put_object_annotation(
            Bucket="sub-res", Key="k", AnnotationName="a", AnnotationPayload=b"over"
        ),
        lambda: s3.delete_object_annotation(Bucket="sub-res", Key="k", AnnotationName="a"),
    ]
    for call in calls:
        assert _fails(call) == ("NotImplemented", 501)
    assert s3.get_object(Bucket="sub-res", Key="k")["Body"].read() == b"kept"
    s3.delete_object(Bucket="sub-res", Key="k")
    s3.delete_bucket(Bucket="sub-res")


def test_head_bucket_says_its_kind(s3: Any, other: Any) -> None:
    s3.create_bucket(Bucket="kind-objects")
    s3.meta.events.register("before-sign.s3.CreateBucket", _kv_kind)
    try:
        s3.create_bucket(Bucket="kind-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", _kv_kind)
    for bucket, kind in (("kind-objects", "objects"), ("kind-kv", "kv")):
        headers = s3.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]
        assert headers[KIND_HEADER] == kind
        assert headers["x-amz-bucket-region"] == "us-east-1"
        assert _fails(lambda: other.head_bucket(Bucket=bucket))[1] == 403  # noqa: B023
        # Suspending versioning: recorded on an objects bucket, a no-op on a KV one.
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
        status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
        assert status == ("Suspended" if kind == "objects" else None)
        s3.delete_bucket(Bucket=bucket)


def test_admin_bucket_create_makes_a_kv_bucket(
    s3: Any,
    other: Any,
    other_keys: tuple[str, str],
    s3_cluster_fixture: Info,  # noqa: F811
) -> None:
    """`kvtier admin bucket create NAME --kind kv`: the way to a KV bucket for S3 tools that
    cannot add x-kvtier-bucket-kind (awscli, minio-py)."""
    state = str(s3_cluster_fixture["state"])
    made = kvtier_cmd(
        "admin", "bucket", "create", "cli-kv", "--kind", "kv", "--state-dir", state, "--json"
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert json.loads(made.stdout)["kind"] == "kv"
    assert json.loads(made.stdout)["tenant"] == "default"
    headers = s3.head_bucket(Bucket="cli-kv")["ResponseMetadata"]["HTTPHeaders"]
    assert headers[KIND_HEADER] == "kv"
    block = _data(7, 3 << 20)
    s3.put_object(Bucket="cli-kv", Key="blk/0", Body=block)
    assert s3.get_object(Bucket="cli-kv", Key="blk/0")["Body"].read() == block
    assert _fails(  # served by the KV tier: no copies there
        lambda: s3.copy_object(Bucket="cli-kv", Key="blk/1", CopySource="cli-kv/blk/0")
    ) == ("NotImplemented", 501)
    assert _fails(lambda: other.get_object(Bucket="cli-kv", Key="blk/0")) == ("AccessDenied", 403)
    # For another tenant: theirs, listed with its kind.
    theirs = kvtier_cmd(
        "admin", "bucket", "create", "cli-kv-theirs", "--kind", "kv", "--tenant", "t-other",
        "--state-dir", state,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    assert "created kv bucket cli-kv-theirs for tenant t-other" in theirs.stdout
    other.put_object(Bucket="cli-kv-theirs", Key="k", Body=b"theirs")
    assert other.get_object(Bucket="cli-kv-theirs", Key="k")["Body"].read() == b"theirs"
    listed = kvtier_cmd(
        "admin", "bucket", "list", "--tenant", "t-other", "--state-dir", state, "--json"
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [(b["name"], b["kind"]) for b in json.loads(listed.stdout)] == [("cli-kv-theirs", "kv")]
    taken = kvtier_cmd("admin", "bucket", "create", "cli-kv", "--state-dir", state)
    assert taken.returncode == 1, taken.stdout + taken.stderr
    assert "already" in taken.stderr.lower(), taken.stderr
    # A user (not an admin) may not create buckets through the CLI's metadata path.
    as_user = cli_env(
        KVTIER_CLUSTER_FILE=str(Path(state) / "cluster.json"),
        KVTIER_ACCESS_KEY=other_keys[0],
        KVTIER_SECRET_KEY=other_keys[1],
    )
    refused = kvtier_cmd(
        "admin", "bucket", "create", "cli-kv-user", "--kind", "kv", "--state-dir", state,
        env=as_user,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "may not call" in refused.stderr, refused.stderr
    assert _fails(lambda: s3.head_bucket(Bucket="cli-kv-user"))[1] == 404
    for client, bucket, key in ((s3, "cli-kv", "blk/0"), (other, "cli-kv-theirs", "k")):
        client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)
