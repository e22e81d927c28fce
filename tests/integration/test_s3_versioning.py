"""S3 bucket versioning on ordinary (erasure-coded) buckets against a real secure dev cluster,
as AWS S3 documents and answers it: Put/GetBucketVersioning (Enabled, Suspended, MFA delete
refused, KV buckets refused); version ids on PUT, multipart Complete and CopyObject; GET, HEAD,
DELETE, tagging and ACLs by versionId; delete markers; ListObjectVersions pages, prefixes and
delimiters; the null version of Suspended buckets and of objects written before versioning;
DeleteObjects with VersionId; DeleteBucket refused while versions or markers remain; another
tenant refused. boto3, awscli and minio-py; every read compares bytes."""

from __future__ import annotations

import functools
import hashlib
import io
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import urllib3
from botocore.exceptions import ClientError
from minio import Minio

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
MIB = 1024 * 1024
ENABLED = {"Status": "Enabled"}
SUSPENDED = {"Status": "Suspended"}


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _error(call: Callable[[], Any]) -> tuple[str, int, dict[str, str]]:
    with pytest.raises(ClientError) as failed:
        call()
    error = failed.value.response
    meta = error["ResponseMetadata"]
    return error["Error"].get("Code", ""), meta["HTTPStatusCode"], meta.get("HTTPHeaders", {})


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    code, status, _ = _error(call)
    return code, status


def _read(s3: Any, bucket: str, key: str, **kw: Any) -> bytes:
    body: bytes = s3.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
    return body


def _versions(s3: Any, bucket: str, **kw: Any) -> list[tuple[str, str, bool, bool]]:
    """(key, version id, is latest, is a delete marker) of every version: by key, newest
    first (boto3 hands versions and markers in two lists)."""
    out: list[tuple[str, str, bool, bool, Any]] = []
    reply = s3.list_object_versions(Bucket=bucket, **kw)
    for v in reply.get("Versions", []):
        out.append((v["Key"], v["VersionId"], v["IsLatest"], False, v["LastModified"]))
    for m in reply.get("DeleteMarkers", []):
        out.append((m["Key"], m["VersionId"], m["IsLatest"], True, m["LastModified"]))
    ordered = sorted(out, key=lambda e: (e[0].encode(), -e[4].timestamp()))
    return [e[:4] for e in ordered]


def _empty(s3: Any, bucket: str) -> None:
    reply = s3.list_object_versions(Bucket=bucket)
    for v in reply.get("Versions", []) + reply.get("DeleteMarkers", []):
        s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    s3.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def info(s3_cluster_fixture: Info) -> Info:  # noqa: F811
    return s3_cluster_fixture


@pytest.fixture(scope="module")
def users(info: Info) -> dict[str, tuple[str, str]]:
    return {
        "owner": s3_cluster.add_user(info, "ver-a"),
        "other": s3_cluster.add_user(info, "ver-b"),
    }


@pytest.fixture(scope="module")
def s3(info: Info, users: dict[str, tuple[str, str]]) -> Any:
    return s3_cluster.client(info, *users["owner"])


@pytest.fixture(scope="module")
def other(info: Info, users: dict[str, tuple[str, str]]) -> Any:
    return s3_cluster.client(info, *users["other"])


def _bucket(s3: Any, name: str, status: dict[str, str] | None = ENABLED) -> str:
    s3.create_bucket(Bucket=name)
    if status is not None:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=status)
    return name


def test_bucket_versioning_state(s3: Any) -> None:
    bucket = _bucket(s3, "ver-state", None)
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)  # never enabled
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=SUSPENDED)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"  # as S3 records it
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=ENABLED)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=SUSPENDED)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"
    mfa = {"Status": "Enabled", "MFADelete": "Enabled"}
    assert _fails(lambda: s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=mfa)) == (
        "NotImplemented",
        501,
    )
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"  # unchanged
    s3.delete_bucket(Bucket=bucket)


def test_kv_buckets_are_never_versioned(s3: Any) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    s3.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        s3.create_bucket(Bucket="ver-kv")
    finally:
        s3.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    assert _fails(
        lambda: s3.put_bucket_versioning(Bucket="ver-kv", VersioningConfiguration=ENABLED)
    ) == ("NotImplemented", 501)
    assert "Status" not in s3.get_bucket_versioning(Bucket="ver-kv")
    s3.put_object(Bucket="ver-kv", Key="k", Body=b"kv bytes")
    assert _read(s3, "ver-kv", "k", VersionId="null") == b"kv bytes"  # its one version
    assert _fails(lambda: _read(s3, "ver-kv", "k", VersionId="0" * 32)) == ("NoSuchVersion", 404)
    s3.delete_object(Bucket="ver-kv", Key="k")
    s3.delete_bucket(Bucket="ver-kv")


def test_versions_reads_deletes_and_markers(s3: Any) -> None:
    bucket = _bucket(s3, "ver-objects")
    key = "dir/obj"
    small, large = _data(1, 100), _data(2, 3 * MIB + 7)  # inline in metas / in part files
    v1 = s3.put_object(Bucket=bucket, Key=key, Body=small)["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key=key, Body=large)["VersionId"]
    assert v1
    assert v2
    assert v1 != v2
    assert "null" not in (v1, v2)
    assert _read(s3, bucket, key) == large
    got = s3.get_object(Bucket=bucket, Key=key)
    assert got["VersionId"] == v2
    assert got["Body"].read() == large
    assert _read(s3, bucket, key, VersionId=v1) == small
    assert _read(s3, bucket, key, VersionId=v2, Range="bytes=5-9") == large[5:10]
    head = s3.head_object(Bucket=bucket, Key=key, VersionId=v1)
    assert (head["ContentLength"], head["VersionId"]) == (100, v1)
    assert head["ETag"] == f'"{hashlib.md5(small).hexdigest()}"'
    assert _fails(lambda: _read(s3, bucket, key, VersionId="0" * 32)) == ("NoSuchVersion", 404)
    assert _fails(lambda: _read(s3, bucket, key, VersionId="../x")) == ("InvalidArgument", 400)
    # DELETE without versionId: a delete marker; the key reads as absent, its versions stay
    deleted = s3.delete_object(Bucket=bucket, Key=key)
    marker = deleted["VersionId"]
    assert deleted["DeleteMarker"] is True
    assert marker not in (v1, v2)
    code, status, headers = _error(lambda: s3.get_object(Bucket=bucket, Key=key))
    assert (code, status) == ("NoSuchKey", 404)
    assert headers["x-amz-delete-marker"] == "true"
    assert headers["x-amz-version-id"] == marker
    assert _fails(lambda: s3.head_object(Bucket=bucket, Key=key))[1] == 404
    code, status, headers = _error(lambda: s3.get_object(Bucket=bucket, Key=key, VersionId=marker))
    assert (code, status, headers["x-amz-delete-marker"]) == ("MethodNotAllowed", 405, "true")
    assert _read(s3, bucket, key, VersionId=v2) == large
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert "Contents" not in s3.list_objects(Bucket=bucket)
    assert _versions(s3, bucket) == [
        (key, marker, True, True),
        (key, v2, False, False),
        (key, v1, False, False),
    ]
    # DELETE of the marker by its id: v2 is current again
    gone = s3.delete_object(Bucket=bucket, Key=key, VersionId=marker)
    assert (gone["VersionId"], gone["DeleteMarker"]) == (marker, True)
    assert _read(s3, bucket, key) == large
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [key]
    # DELETE of the current version by id: the previous one becomes current, for good
    assert s3.delete_object(Bucket=bucket, Key=key, VersionId=v2)["VersionId"] == v2
    assert _read(s3, bucket, key) == small
    assert _fails(lambda: _read(s3, bucket, key, VersionId=v2)) == ("NoSuchVersion", 404)
    assert _versions(s3, bucket) == [(key, v1, True, False)]
    _empty(s3, bucket)


def test_multipart_copy_tagging_and_acl_by_version(s3: Any) -> None:
    bucket = _bucket(s3, "ver-mp")
    parts = [_data(10, 5 * MIB), _data(11, 1000)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    etags = [
        s3.upload_part(Bucket=bucket, Key="mp", UploadId=upload, PartNumber=n, Body=p)["ETag"]
        for n, p in enumerate(parts, 1)
    ]
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )  # fmt: skip
    v_mp = done["VersionId"]
    assert v_mp
    v_put = s3.put_object(Bucket=bucket, Key="mp", Body=b"overwritten", Tagging="k=new")[
        "VersionId"
    ]
    assert _read(s3, bucket, "mp", VersionId=v_mp) == b"".join(parts)
    # CopyObject from an old version: a new version of the destination
    copied = s3.copy_object(
        Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "mp", "VersionId": v_mp}
    )
    assert copied["CopySourceVersionId"] == v_mp
    assert copied["VersionId"]
    assert copied["VersionId"] != v_mp
    assert _read(s3, bucket, "copy") == b"".join(parts)
    # UploadPartCopy from versions: a range of the old multipart one, all of the current one
    upload = s3.create_multipart_upload(Bucket=bucket, Key="parts")["UploadId"]
    sources = [({"VersionId": v_mp}, {"CopySourceRange": f"bytes=0-{5 * MIB - 1}"}), ({}, {})]
    copies = []
    for n, (version, ranged) in enumerate(sources, 1):
        source = {"Bucket": bucket, "Key": "mp", **version}
        copied = s3.upload_part_copy(
            Bucket=bucket, Key="parts", UploadId=upload, PartNumber=n, CopySource=source, **ranged
        )
        copies.append(copied)
    assert [c["CopySourceVersionId"] for c in copies] == [v_mp, v_put]
    s3.complete_multipart_upload(
        Bucket=bucket, Key="parts", UploadId=upload,
        MultipartUpload={"Parts": [
            {"PartNumber": n, "ETag": c["CopyPartResult"]["ETag"]} for n, c in enumerate(copies, 1)
        ]},
    )  # fmt: skip
    assert _read(s3, bucket, "parts") == parts[0] + b"overwritten"
    # tags and ACLs of one version, current or not, changed in place on that version alone
    assert s3.get_object_tagging(Bucket=bucket, Key="mp", VersionId=v_put)["TagSet"] == [
        {"Key": "k", "Value": "new"}
    ]
    old = s3.get_object_tagging(Bucket=bucket, Key="mp", VersionId=v_mp)
    assert (old["TagSet"], old["VersionId"]) == ([], v_mp)
    tag_set = {"TagSet": [{"Key": "a", "Value": "b"}]}
    put = s3.put_object_tagging(Bucket=bucket, Key="mp", VersionId=v_mp, Tagging=tag_set)
    assert put["VersionId"] == v_mp
    assert s3.get_object_tagging(Bucket=bucket, Key="mp", VersionId=v_mp)["TagSet"] == [
        {"Key": "a", "Value": "b"}
    ]
    assert _read(s3, bucket, "mp", VersionId=v_mp) == b"".join(parts)  # its parts unchanged
    assert s3.get_object_tagging(Bucket=bucket, Key="mp")["TagSet"] == [
        {"Key": "k", "Value": "new"}
    ]
    s3.put_object_tagging(Bucket=bucket, Key="mp", VersionId=v_put, Tagging=tag_set)
    assert s3.get_object_tagging(Bucket=bucket, Key="mp")["TagSet"] == tag_set["TagSet"]
    assert s3.get_object_acl(Bucket=bucket, Key="mp", VersionId=v_mp)["Grants"]
    _empty(s3, bucket)


def test_list_object_versions_pages_prefixes_and_delimiters(s3: Any) -> None:
    bucket = _bucket(s3, "ver-list")
    written: dict[str, list[str]] = {}
    for key, count in (("a", 3), ("b/c", 2), ("b/d", 1), ("e", 2)):
        for i in range(count):
            put = s3.put_object(Bucket=bucket, Key=key, Body=f"{key}{i}".encode())
            written.setdefault(key, []).insert(0, put["VersionId"])  # newest first
    s3.delete_object(Bucket=bucket, Key="e")
    everything = _versions(s3, bucket)
    assert [(k, v) for k, v, _, _ in everything if k != "e"] == [
        (k, v) for k in ("a", "b/c", "b/d") for v in written[k]
    ]
    assert [latest for k, _, latest, _ in everything if k == "a"] == [True, False, False]
    # pages of 2 by key-marker / version-id-marker give the same versions once each
    paged: list[tuple[str, str]] = []
    markers: dict[str, str] = {}
    while True:
        reply = s3.list_object_versions(Bucket=bucket, MaxKeys=2, **markers)
        page = reply.get("Versions", []) + reply.get("DeleteMarkers", [])
        assert len(page) <= 2
        paged.extend((v["Key"], v["VersionId"]) for v in page)
        if not reply["IsTruncated"]:
            break
        markers = {"KeyMarker": reply["NextKeyMarker"]}
        markers["VersionIdMarker"] = reply["NextVersionIdMarker"]
    assert sorted(paged) == sorted((k, v) for k, v, _, _ in everything)
    assert len(paged) == len(everything) == 9
    # prefix and delimiter
    folded = s3.list_object_versions(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in folded["CommonPrefixes"]] == ["b/"]
    assert {v["Key"] for v in folded["Versions"]} == {"a", "e"}
    resumed = s3.list_object_versions(Bucket=bucket, Delimiter="/", KeyMarker="b/")
    assert ("CommonPrefixes" not in resumed, {v["Key"] for v in resumed["Versions"]}) == (
        True, {"e"},
    )  # fmt: skip  # a key-marker that is a common prefix resumes after it
    under = s3.list_object_versions(Bucket=bucket, Prefix="b/")
    assert [(v["Key"], v["VersionId"]) for v in under["Versions"]] == [
        ("b/c", written["b/c"][0]), ("b/c", written["b/c"][1]), ("b/d", written["b/d"][0]),
    ]  # fmt: skip
    # ListObjects: current versions that are not markers
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a", "b/c", "b/d"]
    # DeleteBucket refuses while versions or markers remain
    assert _fails(lambda: s3.delete_bucket(Bucket=bucket)) == ("BucketNotEmpty", 409)
    _empty(s3, bucket)


def test_suspended_buckets_write_the_null_version(s3: Any) -> None:
    bucket = _bucket(s3, "ver-null", None)
    s3.put_object(Bucket=bucket, Key="k", Body=b"before versioning")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=ENABLED)
    head = s3.head_object(Bucket=bucket, Key="k")
    assert head["VersionId"] == "null"  # written before versioning: the null version
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"enabled")["VersionId"]
    assert _read(s3, bucket, "k", VersionId="null") == b"before versioning"
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=SUSPENDED)
    # The null version's PUT answers no x-amz-version-id, as S3's (its DELETE does: below).
    assert "VersionId" not in s3.put_object(Bucket=bucket, Key="k", Body=b"suspended 1")
    assert _versions(s3, bucket) == [("k", "null", True, False), ("k", v1, False, False)]
    s3.put_object(Bucket=bucket, Key="k", Body=b"suspended 2")  # replaces the null version
    assert _versions(s3, bucket) == [("k", "null", True, False), ("k", v1, False, False)]
    assert _read(s3, bucket, "k", VersionId="null") == b"suspended 2"
    assert _read(s3, bucket, "k", VersionId=v1) == b"enabled"
    deleted = s3.delete_object(Bucket=bucket, Key="k")  # a null delete marker replaces it
    assert (deleted["DeleteMarker"], deleted["VersionId"]) == (True, "null")
    assert _versions(s3, bucket) == [("k", "null", True, True), ("k", v1, False, False)]
    assert _fails(lambda: _read(s3, bucket, "k"))[1] == 404
    _empty(s3, bucket)


def test_delete_objects_with_version_ids(s3: Any) -> None:
    bucket = _bucket(s3, "ver-multi")
    v = {k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode())["VersionId"] for k in "xyz"}
    v_x2 = s3.put_object(Bucket=bucket, Key="x", Body=b"x2")["VersionId"]
    reply = s3.delete_objects(
        Bucket=bucket,
        Delete={
            "Objects": [
                {"Key": "x", "VersionId": v["x"]},  # a non-current version, for good
                {"Key": "y"},  # a delete marker
                {"Key": "z", "VersionId": v["z"]},  # the current one: z is gone
            ]
        },
    )
    deleted = {d["Key"]: d for d in reply["Deleted"]}
    assert deleted["x"]["VersionId"] == v["x"]
    assert deleted["y"]["DeleteMarker"] is True
    assert deleted["y"]["DeleteMarkerVersionId"]
    assert deleted["z"]["VersionId"] == v["z"]
    assert "Errors" not in reply
    assert _read(s3, bucket, "x") == b"x2"
    assert _read(s3, bucket, "y", VersionId=v["y"]) == b"y"
    assert [k for k, *_ in _versions(s3, bucket)] == ["x", "y", "y"]
    marker = deleted["y"]["DeleteMarkerVersionId"]
    again = s3.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": "y", "VersionId": marker}, {"Key": "x", "VersionId": v_x2}]},
    )
    assert {d["Key"]: d.get("DeleteMarker", False) for d in again["Deleted"]} == {
        "y": True,
        "x": False,
    }
    assert _read(s3, bucket, "y") == b"y"
    _empty(s3, bucket)


def test_another_tenant_is_refused(s3: Any, other: Any) -> None:
    bucket = _bucket(s3, "ver-private")
    version = s3.put_object(Bucket=bucket, Key="secret", Body=b"s3cret")["VersionId"]
    calls = [
        lambda: other.get_bucket_versioning(Bucket=bucket),
        lambda: other.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=SUSPENDED),
        lambda: other.get_object(Bucket=bucket, Key="secret", VersionId=version),
        lambda: other.head_object(Bucket=bucket, Key="secret", VersionId=version),
        lambda: other.list_object_versions(Bucket=bucket),
        lambda: other.delete_object(Bucket=bucket, Key="secret", VersionId=version),
        lambda: other.get_object_tagging(Bucket=bucket, Key="secret", VersionId=version),
    ]
    # UploadPartCopy of the version into an upload of other's own bucket
    other.create_bucket(Bucket="ver-private-other")
    upload = other.create_multipart_upload(Bucket="ver-private-other", Key="k")["UploadId"]
    source = {"Bucket": bucket, "Key": "secret", "VersionId": version}
    calls.append(
        lambda: other.upload_part_copy(
            Bucket="ver-private-other", Key="k", UploadId=upload, PartNumber=1, CopySource=source
        )
    )
    for call in calls:
        assert _fails(call)[1] == 403
    other.abort_multipart_upload(Bucket="ver-private-other", Key="k", UploadId=upload)
    other.delete_bucket(Bucket="ver-private-other")
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert _read(s3, bucket, "secret", VersionId=version) == b"s3cret"
    _empty(s3, bucket)


def _tags(s3: Any, bucket: str, key: str, **kw: Any) -> tuple[dict[str, str], str]:
    reply = s3.get_object_tagging(Bucket=bucket, Key=key, **kw)
    return {t["Key"]: t["Value"] for t in reply["TagSet"]}, reply.get("VersionId", "")


def _grants(s3: Any, bucket: str, key: str, **kw: Any) -> list[tuple[str, str]]:
    reply = s3.get_object_acl(Bucket=bucket, Key=key, **kw)
    grantees = [
        (g["Grantee"].get("URI") or g["Grantee"]["ID"], g["Permission"]) for g in reply["Grants"]
    ]
    return sorted(grantees)


def test_tags_and_acl_of_a_non_current_version(s3: Any, other: Any) -> None:
    bucket = _bucket(s3, "ver-meta")
    old_bytes = _data(20, 300 * 1024)  # erasure-coded in blocks (not inline)
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=old_bytes, Tagging="gen=1")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"current", Tagging="gen=2")["VersionId"]
    before = s3.head_object(Bucket=bucket, Key="k", VersionId=v1)
    put = s3.put_object_tagging(
        Bucket=bucket, Key="k", VersionId=v1, Tagging={"TagSet": [{"Key": "old", "Value": "x"}]}
    )
    assert put["VersionId"] == v1
    assert _tags(s3, bucket, "k", VersionId=v1) == ({"old": "x"}, v1)
    assert _tags(s3, bucket, "k") == ({"gen": "2"}, v2)  # the current version unaffected
    acl_put = s3.put_object_acl(Bucket=bucket, Key="k", VersionId=v1, ACL="public-read")
    assert acl_put["ResponseMetadata"]["HTTPHeaders"]["x-amz-version-id"] == v1
    public = ("http://acs.amazonaws.com/groups/global/AllUsers", "READ")
    assert public in _grants(s3, bucket, "k", VersionId=v1)
    assert public not in _grants(s3, bucket, "k")
    assert _grants(s3, bucket, "k", VersionId=v2) == _grants(s3, bucket, "k")
    # In place: the same ETag, time and bytes; the versions as they were.
    after = s3.head_object(Bucket=bucket, Key="k", VersionId=v1)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    assert _read(s3, bucket, "k", VersionId=v1) == old_bytes
    assert _read(s3, bucket, "k") == b"current"
    assert _versions(s3, bucket) == [("k", v2, True, False), ("k", v1, False, False)]
    assert s3.delete_object_tagging(Bucket=bucket, Key="k", VersionId=v1)["VersionId"] == v1
    assert _tags(s3, bucket, "k", VersionId=v1) == ({}, v1)
    assert _tags(s3, bucket, "k") == ({"gen": "2"}, v2)
    # A version that does not exist; a delete marker's id (S3: 405, x-amz-delete-marker).
    missing = "0" * 32
    tag_set = {"TagSet": [{"Key": "a", "Value": "b"}]}
    for call in (
        lambda v: s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=v),
        lambda v: s3.put_object_tagging(Bucket=bucket, Key="k", VersionId=v, Tagging=tag_set),
        lambda v: s3.delete_object_tagging(Bucket=bucket, Key="k", VersionId=v),
        lambda v: s3.get_object_acl(Bucket=bucket, Key="k", VersionId=v),
        lambda v: s3.put_object_acl(Bucket=bucket, Key="k", VersionId=v, ACL="private"),
    ):
        assert _fails(functools.partial(call, missing)) == ("NoSuchVersion", 404)
    marker = s3.delete_object(Bucket=bucket, Key="k")["VersionId"]
    for call in (
        lambda v: s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=v),
        lambda v: s3.put_object_tagging(Bucket=bucket, Key="k", VersionId=v, Tagging=tag_set),
        lambda v: s3.get_object_acl(Bucket=bucket, Key="k", VersionId=v),
    ):
        code, status, headers = _error(functools.partial(call, marker))
        assert (code, status, headers.get("x-amz-delete-marker")) == (
            "MethodNotAllowed", 405, "true",
        )  # fmt: skip
    # Both versions non-current now: still changed by id.
    s3.put_object_tagging(Bucket=bucket, Key="k", VersionId=v2, Tagging=tag_set)
    assert _tags(s3, bucket, "k", VersionId=v2) == ({"a": "b"}, v2)
    # Another tenant's user: refused by version id, and nothing changed.
    for refused in (
        lambda: other.get_object_tagging(Bucket=bucket, Key="k", VersionId=v1),
        lambda: other.put_object_tagging(Bucket=bucket, Key="k", VersionId=v1, Tagging=tag_set),
        lambda: other.delete_object_tagging(Bucket=bucket, Key="k", VersionId=v2),
        lambda: other.get_object_acl(Bucket=bucket, Key="k", VersionId=v2),
        lambda: other.put_object_acl(Bucket=bucket, Key="k", VersionId=v1, ACL="public-read-write"),
    ):
        assert _fails(refused) == ("AccessDenied", 403)
    assert _tags(s3, bucket, "k", VersionId=v1) == ({}, v1)
    assert _tags(s3, bucket, "k", VersionId=v2) == ({"a": "b"}, v2)
    assert ("http://acs.amazonaws.com/groups/global/AllUsers", "WRITE") not in _grants(
        s3, bucket, "k", VersionId=v1
    )
    _empty(s3, bucket)


def test_a_version_acl_admits_another_tenant_to_that_version_only(s3: Any, other: Any) -> None:
    bucket = _bucket(s3, "ver-grant")
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"one")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"two")["VersionId"]
    s3.put_object_acl(
        Bucket=bucket, Key="k", VersionId=v1, GrantReadACP='id="ver-b"', GrantWriteACP='id="ver-b"'
    )
    assert ("ver-b", "READ_ACP") in _grants(other, bucket, "k", VersionId=v1)
    assert _fails(lambda: other.get_object_acl(Bucket=bucket, Key="k")) == ("AccessDenied", 403)
    assert _fails(lambda: other.get_object_acl(Bucket=bucket, Key="k", VersionId=v2)) == (
        "AccessDenied", 403,
    )  # fmt: skip
    # WRITE_ACP on v1: other may replace v1's ACL (and so read its bytes), not v2's.
    other.put_object_acl(Bucket=bucket, Key="k", VersionId=v1, GrantRead='id="ver-b"')
    assert _read(other, bucket, "k", VersionId=v1) == b"one"
    assert _fails(
        lambda: other.put_object_acl(Bucket=bucket, Key="k", VersionId=v2, GrantRead='id="ver-b"')
    ) == ("AccessDenied", 403)
    assert _fails(lambda: _read(other, bucket, "k", VersionId=v2)) == ("AccessDenied", 403)
    _empty(s3, bucket)


def test_awscli_and_minio(info: Info, s3: Any) -> None:
    bucket = _bucket(s3, "ver-tools", None)
    s3_cluster.aws_cli(
        info, "s3api", "put-bucket-versioning", "--bucket", bucket,
        "--versioning-configuration", "Status=Enabled",
    )  # fmt: skip
    got = s3_cluster.aws_cli(info, "s3api", "get-bucket-versioning", "--bucket", bucket)
    assert '"Enabled"' in got.stdout
    first = s3.put_object(Bucket=bucket, Key="tool", Body=b"one")["VersionId"]
    s3.put_object(Bucket=bucket, Key="tool", Body=b"two")
    listed = s3_cluster.aws_cli(info, "s3api", "list-object-versions", "--bucket", bucket)
    assert first in listed.stdout
    url = urllib.parse.urlparse(info["gateway_s3"])
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    owner = s3._request_signer._credentials
    mc = Minio(
        url.netloc, access_key=owner.access_key, secret_key=owner.secret_key,
        secure=True, region="us-east-1", http_client=pool,
    )  # fmt: skip
    assert mc.get_bucket_versioning(bucket).status == "Enabled"
    response = mc.get_object(bucket, "tool", version_id=first)
    try:
        assert response.read() == b"one"
    finally:
        response.close()
        response.release_conn()
    objects = list(mc.list_objects(bucket, include_version=True))
    assert sorted(o.version_id for o in objects if o.version_id == first) == [first]
    mc.put_object(bucket, "tool", io.BytesIO(b"three"), 5)
    assert _read(s3, bucket, "tool") == b"three"
    _empty(s3, bucket)
