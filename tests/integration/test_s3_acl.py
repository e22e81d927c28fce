"""S3 ACLs against a real secure dev cluster, as AWS S3 documents them: canned ACLs and grant
headers at CreateBucket, PutObject, CreateMultipartUpload and CopyObject; Get/Put Bucket/Object
Acl with boto3 and awscli; anonymous reads of public-read buckets and objects (an UNSIGNED
boto3 client, minio-py without credentials, raw HTTPS); x-amz-expected-bucket-owner; and the
denials: anonymous on private buckets and objects, another tenant without a grant, a READ grant
that opens no write and no ACL change, anonymous bucket deletion and CORS changes, KV buckets.
Every read compares bytes."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from botocore.exceptions import ClientError
from minio import Minio
from minio.error import S3Error as MinioError

from services.gateway.s3 import acl
from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
OWNER, OTHER, THIRD = "acl-a", "acl-b", "acl-c"
ALL = acl.ALL_USERS_URI
SIGNED = acl.AUTHENTICATED_USERS_URI


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    error = failed.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _denied(call: Callable[[], Any]) -> None:
    code, status = _fails(call)
    assert status == 403, code
    assert code in ("AccessDenied", "403"), code  # HEAD answers carry no body


@pytest.fixture(scope="module")
def owner(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A plain (not admin) user of tenant acl-a: owns every bucket here."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OWNER))


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of tenant acl-b (the grantee of some grants)."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OTHER))


@pytest.fixture(scope="module")
def third(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of tenant acl-c (granted nothing by name)."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, THIRD))


@pytest.fixture(scope="module")
def anon(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """An unsigned boto3 client (no credentials at all)."""
    return s3_cluster.anonymous(s3_cluster_fixture)


def _grants(policy: dict[str, Any]) -> set[tuple[str, str]]:
    """(grantee: tenant id or group URI, permission) of a Get*Acl answer."""
    out = set()
    for grant in policy["Grants"]:
        grantee = grant["Grantee"]
        out.add((grantee.get("ID") or grantee.get("URI", ""), grant["Permission"]))
    return out


def _body(s3: Any, bucket: str, key: str) -> bytes:
    data: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def _connection(info: Info) -> http.client.HTTPSConnection:
    url = urllib.parse.urlsplit(info["gateway_s3"])
    assert url.hostname
    assert url.port
    return http.client.HTTPSConnection(
        url.hostname, url.port, context=s3_cluster.tls_context(info), timeout=60
    )


def _raw(info: Info, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """An unsigned request over HTTPS: (status, body)."""
    conn = _connection(info)
    try:
        conn.request(method, path, body=body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _code(body: bytes) -> str:
    return body.partition(b"<Code>")[2].partition(b"</Code>")[0].decode()


def test_canned_and_explicit_bucket_acls(owner: Any, other: Any, third: Any) -> None:
    """(other and third: their tenants have users, as a grant to them needs.)"""
    owner.create_bucket(Bucket="acl-canned", ACL="public-read")
    policy = owner.get_bucket_acl(Bucket="acl-canned")
    assert policy["Owner"] == {"ID": OWNER, "DisplayName": OWNER}
    assert _grants(policy) == {(OWNER, "FULL_CONTROL"), (ALL, "READ")}
    owner.put_bucket_acl(Bucket="acl-canned", ACL="authenticated-read")
    assert _grants(owner.get_bucket_acl(Bucket="acl-canned")) == {
        (OWNER, "FULL_CONTROL"),
        (SIGNED, "READ"),
    }
    owner.put_bucket_acl(
        Bucket="acl-canned", GrantRead=f'id="{OTHER}", uri="{ALL}"', GrantWriteACP=f'id="{THIRD}"'
    )
    assert _grants(owner.get_bucket_acl(Bucket="acl-canned")) == {
        (OTHER, "READ"),
        (ALL, "READ"),
        (THIRD, "WRITE_ACP"),
    }
    # The document form, read back as sent.
    owner.put_bucket_acl(
        Bucket="acl-canned",
        AccessControlPolicy={
            "Owner": {"ID": OWNER},
            "Grants": [
                {"Grantee": {"Type": "CanonicalUser", "ID": OWNER}, "Permission": "FULL_CONTROL"},
                {"Grantee": {"Type": "Group", "URI": SIGNED}, "Permission": "READ_ACP"},
            ],
        },
    )
    assert _grants(owner.get_bucket_acl(Bucket="acl-canned")) == {
        (OWNER, "FULL_CONTROL"),
        (SIGNED, "READ_ACP"),
    }


def test_grants_list_groups_first_and_an_acl_of_no_grants_lists_none(owner: Any, anon: Any) -> None:
    """Group grants are listed before the tenants' (as Ceph RGW and s3-tests have it); an
    AccessControlPolicy of no grants is kept as such (bucket and object: GetAcl lists none,
    as S3 does) and the owner keeps every right."""
    owner.create_bucket(Bucket="acl-order", ACL="public-read-write")
    kinds = [g["Grantee"]["Type"] for g in owner.get_bucket_acl(Bucket="acl-order")["Grants"]]
    assert kinds == ["Group", "Group", "CanonicalUser"]
    owner.put_object(Bucket="acl-order", Key="k", Body=b"v", ACL="public-read")
    kinds = [
        g["Grantee"]["Type"] for g in owner.get_object_acl(Bucket="acl-order", Key="k")["Grants"]
    ]
    assert kinds == ["Group", "CanonicalUser"]
    none = {"Owner": {"ID": OWNER}, "Grants": []}
    owner.put_bucket_acl(Bucket="acl-order", AccessControlPolicy=none)
    owner.put_object_acl(Bucket="acl-order", Key="k", AccessControlPolicy=none)
    assert owner.get_bucket_acl(Bucket="acl-order")["Grants"] == []
    assert owner.get_object_acl(Bucket="acl-order", Key="k")["Grants"] == []
    assert _body(owner, "acl-order", "k") == b"v"
    _denied(lambda: anon.get_object(Bucket="acl-order", Key="k"))
    _denied(lambda: anon.put_object(Bucket="acl-order", Key="a", Body=b"x"))


def test_bad_acls_are_refused_and_change_nothing(owner: Any) -> None:
    owner.create_bucket(Bucket="acl-bad", ACL="public-read")
    before = _grants(owner.get_bucket_acl(Bucket="acl-bad"))
    assert _fails(lambda: owner.put_bucket_acl(Bucket="acl-bad", ACL="wide-open")) == (
        "InvalidArgument",
        400,
    )
    assert _fails(
        lambda: owner.put_bucket_acl(Bucket="acl-bad", GrantRead='emailAddress="a@example.com"')
    ) == ("UnresolvableGrantByEmailAddress", 400)
    assert _fails(
        lambda: owner.put_bucket_acl(Bucket="acl-bad", ACL="private", GrantRead=f'uri="{ALL}"')
    ) == ("InvalidRequest", 400)
    assert _fails(
        lambda: owner.put_bucket_acl(
            Bucket="acl-bad",
            AccessControlPolicy={
                "Owner": {"ID": OTHER},
                "Grants": [{"Grantee": {"Type": "Group", "URI": ALL}, "Permission": "WRITE"}],
            },
        )
    ) == ("AccessDenied", 403)
    assert _fails(
        lambda: owner.put_bucket_acl(
            Bucket="acl-bad",
            AccessControlPolicy={
                "Owner": {"ID": OWNER},
                "Grants": [{"Grantee": {"Type": "Group", "URI": ALL}, "Permission": "ALL"}],
            },
        )
    ) == ("MalformedACLError", 400)
    assert _grants(owner.get_bucket_acl(Bucket="acl-bad")) == before
    # A bad ACL at CreateBucket creates nothing.
    assert _fails(lambda: owner.create_bucket(Bucket="acl-never", ACL="nope"))[1] == 400
    assert _fails(lambda: owner.head_bucket(Bucket="acl-never"))[1] == 404


def test_anonymous_reads_of_public_buckets_and_objects(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
    anon: Any,
) -> None:
    info = s3_cluster_fixture
    owner.create_bucket(Bucket="acl-public", ACL="public-read")
    public, secret = b"for everyone " * 999, b"not for anyone " * 77
    owner.put_object(Bucket="acl-public", Key="open", Body=public, ACL="public-read")
    owner.put_object(Bucket="acl-public", Key="closed", Body=secret)
    listed = anon.list_objects_v2(Bucket="acl-public")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["closed", "open"]
    assert all(
        o["Owner"]["ID"] == OWNER for o in anon.list_objects(Bucket="acl-public")["Contents"]
    )
    assert _body(anon, "acl-public", "open") == public
    assert anon.head_object(Bucket="acl-public", Key="open")["ContentLength"] == len(public)
    # The object's own ACL decides its reads: a private object of a public bucket is closed.
    _denied(lambda: anon.get_object(Bucket="acl-public", Key="closed"))
    _denied(lambda: anon.head_object(Bucket="acl-public", Key="closed"))
    # Listing is granted, so a missing key may be told apart.
    assert _fails(lambda: anon.get_object(Bucket="acl-public", Key="nothing")) == ("NoSuchKey", 404)
    # Raw HTTPS, no SDK.
    status, body = _raw(info, "GET", "/acl-public/open")
    assert (status, hashlib.sha256(body).digest()) == (200, hashlib.sha256(public).digest())
    status, body = _raw(info, "GET", "/acl-public/closed")
    assert (status, _code(body)) == (403, "AccessDenied")
    assert secret not in body
    # minio-py without credentials.
    url = urllib.parse.urlparse(info["gateway_s3"])
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
    mc = Minio(url.netloc, secure=True, region="us-east-1", http_client=pool)
    response = mc.get_object("acl-public", "open")
    try:
        assert response.read() == public
    finally:
        response.close()
        response.release_conn()
    with pytest.raises(MinioError) as refused:
        mc.get_object("acl-public", "closed")
    assert refused.value.code == "AccessDenied"


def test_anonymous_may_do_nothing_else(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
    anon: Any,
) -> None:
    info = s3_cluster_fixture
    owner.create_bucket(Bucket="acl-readonly", ACL="public-read")
    data = b"stays " * 100
    owner.put_object(Bucket="acl-readonly", Key="k", Body=data, ACL="public-read")
    _denied(lambda: anon.put_object(Bucket="acl-readonly", Key="k", Body=b"overwritten"))
    _denied(lambda: anon.put_object(Bucket="acl-readonly", Key="new", Body=b"x"))
    _denied(lambda: anon.delete_object(Bucket="acl-readonly", Key="k"))
    _denied(lambda: anon.delete_bucket(Bucket="acl-readonly"))
    _denied(lambda: anon.get_bucket_acl(Bucket="acl-readonly"))
    _denied(lambda: anon.get_object_acl(Bucket="acl-readonly", Key="k"))
    _denied(lambda: anon.put_bucket_acl(Bucket="acl-readonly", ACL="public-read-write"))
    _denied(lambda: anon.put_object_acl(Bucket="acl-readonly", Key="k", ACL="public-read-write"))
    _denied(lambda: anon.create_multipart_upload(Bucket="acl-readonly", Key="mp"))
    # READ lists uploads and versions too (S3's s3:ListBucketMultipartUploads, ...Versions).
    assert "Uploads" not in anon.list_multipart_uploads(Bucket="acl-readonly")
    assert [v["Key"] for v in anon.list_object_versions(Bucket="acl-readonly")["Versions"]] == ["k"]
    _denied(lambda: anon.get_bucket_location(Bucket="acl-readonly"))
    _denied(
        lambda: anon.put_bucket_cors(
            Bucket="acl-readonly",
            CORSConfiguration={"CORSRules": [{"AllowedMethods": ["GET"], "AllowedOrigins": ["*"]}]},
        )
    )
    _denied(lambda: anon.list_buckets())
    _denied(lambda: anon.create_bucket(Bucket="acl-anon-made"))
    status, body = _raw(info, "DELETE", "/acl-readonly")
    assert (status, _code(body)) == (403, "AccessDenied")
    # Nothing changed.
    assert _body(owner, "acl-readonly", "k") == data
    assert [o["Key"] for o in owner.list_objects_v2(Bucket="acl-readonly")["Contents"]] == ["k"]
    assert _grants(owner.get_bucket_acl(Bucket="acl-readonly")) == {
        (OWNER, "FULL_CONTROL"),
        (ALL, "READ"),
    }
    assert _fails(lambda: owner.get_bucket_cors(Bucket="acl-readonly"))[1] == 404


def test_private_buckets_refuse_anonymous_and_other_tenants(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
    other: Any,
    anon: Any,
) -> None:
    owner.create_bucket(Bucket="acl-private")
    data = b"private " * 100
    owner.put_object(Bucket="acl-private", Key="k", Body=data)
    for client in (anon, other):
        _denied(functools.partial(client.list_objects_v2, Bucket="acl-private"))
        _denied(functools.partial(client.get_object, Bucket="acl-private", Key="k"))
        _denied(functools.partial(client.head_object, Bucket="acl-private", Key="k"))
        _denied(functools.partial(client.head_bucket, Bucket="acl-private"))
        # A missing key is not told apart from a refused one without a listing grant.
        _denied(functools.partial(client.get_object, Bucket="acl-private", Key="missing"))
        _denied(functools.partial(client.put_object, Bucket="acl-private", Key="k", Body=b"x"))
        _denied(functools.partial(client.delete_object, Bucket="acl-private", Key="k"))
        _denied(functools.partial(client.get_bucket_acl, Bucket="acl-private"))
        _denied(functools.partial(client.put_bucket_acl, Bucket="acl-private", ACL="public-read"))
        _denied(functools.partial(client.get_object_acl, Bucket="acl-private", Key="k"))
    # Another tenant may not copy from it either.
    other.create_bucket(Bucket="acl-other-own")
    _denied(
        lambda: other.copy_object(
            Bucket="acl-other-own", Key="stolen", CopySource={"Bucket": "acl-private", "Key": "k"}
        )
    )
    assert _body(owner, "acl-private", "k") == data
    assert "Contents" not in other.list_objects_v2(Bucket="acl-other-own")
    # A public object of a private bucket is readable, as in S3 (its own ACL decides).
    owner.put_object(Bucket="acl-private", Key="shared", Body=b"shared", ACL="public-read")
    assert _body(anon, "acl-private", "shared") == b"shared"
    _denied(lambda: anon.list_objects_v2(Bucket="acl-private"))


def test_a_read_grant_opens_no_write_and_no_acl_change(
    owner: Any, other: Any, third: Any, anon: Any
) -> None:
    owner.create_bucket(Bucket="acl-granted", GrantRead=f'id="{OTHER}"')
    data = b"granted " * 50
    owner.put_object(Bucket="acl-granted", Key="k", Body=data, GrantRead=f'id="{OTHER}"')
    assert [o["Key"] for o in other.list_objects_v2(Bucket="acl-granted")["Contents"]] == ["k"]
    assert _body(other, "acl-granted", "k") == data
    other.head_bucket(Bucket="acl-granted")
    _denied(lambda: other.put_object(Bucket="acl-granted", Key="k", Body=b"overwritten"))
    _denied(lambda: other.delete_object(Bucket="acl-granted", Key="k"))
    _denied(lambda: other.delete_objects(Bucket="acl-granted", Delete={"Objects": [{"Key": "k"}]}))
    _denied(lambda: other.put_bucket_acl(Bucket="acl-granted", ACL="public-read-write"))
    _denied(lambda: other.put_object_acl(Bucket="acl-granted", Key="k", ACL="public-read"))
    _denied(lambda: other.get_bucket_acl(Bucket="acl-granted"))
    _denied(lambda: other.get_object_acl(Bucket="acl-granted", Key="k"))
    _denied(lambda: other.delete_bucket(Bucket="acl-granted"))
    assert "Uploads" not in other.list_multipart_uploads(Bucket="acl-granted")  # READ: listed
    for stranger in (third, anon):
        _denied(functools.partial(stranger.list_objects_v2, Bucket="acl-granted"))
        _denied(functools.partial(stranger.list_multipart_uploads, Bucket="acl-granted"))
        _denied(functools.partial(stranger.list_object_versions, Bucket="acl-granted"))
        _denied(functools.partial(stranger.get_object, Bucket="acl-granted", Key="k"))
    assert _body(owner, "acl-granted", "k") == data
    # READ_ACP and WRITE_ACP grants open the ACL, nothing else.
    owner.put_bucket_acl(
        Bucket="acl-granted", GrantReadACP=f'id="{OTHER}"', GrantWriteACP=f'id="{THIRD}"'
    )
    assert _grants(other.get_bucket_acl(Bucket="acl-granted")) == {
        (OTHER, "READ_ACP"),
        (THIRD, "WRITE_ACP"),
    }
    _denied(lambda: other.list_objects_v2(Bucket="acl-granted"))
    _denied(lambda: third.get_bucket_acl(Bucket="acl-granted"))
    third.put_bucket_acl(Bucket="acl-granted", GrantRead=f'id="{THIRD}"')
    assert [o["Key"] for o in third.list_objects_v2(Bucket="acl-granted")["Contents"]] == ["k"]
    _denied(lambda: third.put_bucket_acl(Bucket="acl-granted", ACL="public-read"))  # WRITE_ACP gone
    _denied(lambda: third.delete_bucket(Bucket="acl-granted"))


def test_write_grants_and_object_ownership(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
    other: Any,
    anon: Any,
) -> None:
    owner.create_bucket(Bucket="acl-dropbox", ACL="public-read-write")
    data = b"dropped " * 4000
    anon.put_object(Bucket="acl-dropbox", Key="from-anon", Body=data)
    other.put_object(Bucket="acl-dropbox", Key="from-b", Body=data[::-1])
    # An anonymous writer's object belongs to the bucket's owner, private.
    assert _body(owner, "acl-dropbox", "from-anon") == data
    assert owner.get_object_acl(Bucket="acl-dropbox", Key="from-anon")["Owner"]["ID"] == OWNER
    _denied(lambda: anon.get_object(Bucket="acl-dropbox", Key="from-anon"))
    anon.put_object(Bucket="acl-dropbox", Key="open", Body=b"open", ACL="public-read")
    assert _body(anon, "acl-dropbox", "open") == b"open"
    # Multipart through the grant.
    upload = anon.create_multipart_upload(Bucket="acl-dropbox", Key="mp", ACL="public-read")
    part = anon.upload_part(
        Bucket="acl-dropbox", Key="mp", UploadId=upload["UploadId"], PartNumber=1, Body=data
    )
    anon.complete_multipart_upload(
        Bucket="acl-dropbox", Key="mp", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    assert _body(anon, "acl-dropbox", "mp") == data
    anon.delete_object(Bucket="acl-dropbox", Key="from-anon")
    assert _fails(lambda: owner.head_object(Bucket="acl-dropbox", Key="from-anon"))[1] == 404
    # WRITE opens no bucket administration.
    _denied(lambda: anon.delete_bucket(Bucket="acl-dropbox"))
    _denied(lambda: other.delete_bucket(Bucket="acl-dropbox"))
    _denied(lambda: anon.put_bucket_acl(Bucket="acl-dropbox", ACL="private"))
    assert "Uploads" not in anon.list_multipart_uploads(Bucket="acl-dropbox")  # READ too
    _denied(
        lambda: other.put_bucket_cors(
            Bucket="acl-dropbox",
            CORSConfiguration={"CORSRules": [{"AllowedMethods": ["GET"], "AllowedOrigins": ["*"]}]},
        )
    )
    # Copying *from* a bucket one does not own is refused, even through a write grant.
    owner.put_object(Bucket="acl-dropbox", Key="private-src", Body=b"private")
    _denied(
        lambda: other.copy_object(
            Bucket="acl-dropbox", Key="copied",
            CopySource={"Bucket": "acl-dropbox", "Key": "private-src"}, ACL="public-read",
        )
    )  # fmt: skip
    assert _fails(lambda: owner.head_object(Bucket="acl-dropbox", Key="copied"))[1] == 404


def test_a_write_grant_deletes_no_version_for_good(owner: Any, other: Any, anon: Any) -> None:
    """A bucket's WRITE grant lets others delete its objects (a delete marker in a versioned
    bucket), never a version for good: S3 grants s3:DeleteObjectVersion through WRITE to the
    bucket's owner alone; DeleteObjects answers AccessDenied for such an entry."""
    owner.create_bucket(Bucket="acl-versions", ACL="public-read-write")
    owner.put_bucket_versioning(
        Bucket="acl-versions", VersioningConfiguration={"Status": "Enabled"}
    )
    version = owner.put_object(Bucket="acl-versions", Key="k", Body=b"kept")["VersionId"]
    for client in (anon, other):
        delete = functools.partial(client.delete_object, Bucket="acl-versions", Key="k")
        _denied(functools.partial(delete, VersionId=version))
        entry = {"Key": "k", "VersionId": version}
        done = client.delete_objects(Bucket="acl-versions", Delete={"Objects": [entry]})
        assert [(e["Key"], e["Code"]) for e in done.get("Errors", [])] == [("k", "AccessDenied")]
    assert anon.delete_object(Bucket="acl-versions", Key="k")["DeleteMarker"]
    kept = owner.get_object(Bucket="acl-versions", Key="k", VersionId=version)
    assert kept["Body"].read() == b"kept"
    owner.delete_object(Bucket="acl-versions", Key="k", VersionId=version)  # the owner may


def test_a_write_grant_aborts_only_ones_own_uploads(owner: Any, other: Any, anon: Any) -> None:
    """S3 lets the bucket's owner and an upload's initiator abort it (others: a policy's
    Allow); a bucket's WRITE grant aborts no one else's upload in progress."""
    owner.create_bucket(Bucket="acl-aborts", ACL="public-read-write")
    mine = owner.create_multipart_upload(Bucket="acl-aborts", Key="k")["UploadId"]
    others = other.create_multipart_upload(Bucket="acl-aborts", Key="k")["UploadId"]
    for client, upload in ((anon, mine), (other, mine), (anon, others)):
        abort = functools.partial(client.abort_multipart_upload, Bucket="acl-aborts", Key="k")
        _denied(functools.partial(abort, UploadId=upload))
    listed = {u["UploadId"] for u in owner.list_multipart_uploads(Bucket="acl-aborts")["Uploads"]}
    assert listed == {mine, others}
    other.abort_multipart_upload(Bucket="acl-aborts", Key="k", UploadId=others)  # its own
    owner.abort_multipart_upload(Bucket="acl-aborts", Key="k", UploadId=mine)
    assert "Uploads" not in owner.list_multipart_uploads(Bucket="acl-aborts")


def test_objects_written_through_a_grant_belong_to_their_writer(
    owner: Any, other: Any, third: Any, anon: Any
) -> None:
    """S3's ObjectWriter ownership: another tenant's object is its own, its ACL relative to it;
    the bucket's owner has no right on it but what that ACL grants (and deleting it)."""
    owner.create_bucket(Bucket="acl-writers", ACL="public-read-write")
    data = b"written by b " * 500
    other.put_object(Bucket="acl-writers", Key="b", Body=data)
    policy = other.get_object_acl(Bucket="acl-writers", Key="b")
    assert policy["Owner"]["ID"] == OTHER
    assert _grants(policy) == {(OTHER, "FULL_CONTROL")}
    assert _body(other, "acl-writers", "b") == data
    for stranger in (owner, third, anon):  # the bucket's owner included
        _denied(functools.partial(stranger.get_object, Bucket="acl-writers", Key="b"))
        _denied(functools.partial(stranger.head_object, Bucket="acl-writers", Key="b"))
        _denied(functools.partial(stranger.get_object_acl, Bucket="acl-writers", Key="b"))
        _denied(
            functools.partial(
                stranger.put_object_acl, Bucket="acl-writers", Key="b", ACL="public-read"
            )
        )
    # The bucket-owner-* canned ACLs grant the bucket's owner, the writer keeping ownership.
    other.put_object(Bucket="acl-writers", Key="bor", Body=data, ACL="bucket-owner-read")
    policy = other.get_object_acl(Bucket="acl-writers", Key="bor")
    assert policy["Owner"]["ID"] == OTHER
    assert _grants(policy) == {(OTHER, "FULL_CONTROL"), (OWNER, "READ")}
    assert _body(owner, "acl-writers", "bor") == data
    _denied(lambda: owner.get_object_acl(Bucket="acl-writers", Key="bor"))  # READ only
    _denied(lambda: third.get_object(Bucket="acl-writers", Key="bor"))
    other.put_object(Bucket="acl-writers", Key="bofc", Body=data, ACL="bucket-owner-full-control")
    policy = owner.get_object_acl(Bucket="acl-writers", Key="bofc")
    assert policy["Owner"]["ID"] == OTHER
    assert _grants(policy) == {(OTHER, "FULL_CONTROL"), (OWNER, "FULL_CONTROL")}
    # The writer may change its object's ACL, which stays relative to it (its owner unchanged).
    other.put_object_acl(Bucket="acl-writers", Key="b", GrantRead=f'id="{OWNER}"')
    assert _body(owner, "acl-writers", "b") == data
    assert owner.head_object(Bucket="acl-writers", Key="b")["ContentLength"] == len(data)
    assert other.get_object_acl(Bucket="acl-writers", Key="b")["Owner"]["ID"] == OTHER
    _denied(lambda: owner.get_object_acl(Bucket="acl-writers", Key="b"))
    _denied(lambda: third.get_object(Bucket="acl-writers", Key="b"))
    # A grant header's id may come unquoted (as the AWS CLI sends its --grant-* values).
    other.put_object(Bucket="acl-writers", Key="uq", Body=data, GrantRead=f"id={THIRD}")
    assert _body(third, "acl-writers", "uq") == data
    # The bucket's owner still lists and deletes them; its own write takes the key back.
    listed = owner.list_objects_v2(Bucket="acl-writers")["Contents"]
    assert {o["Key"] for o in listed} == {"b", "bor", "bofc", "uq"}
    owner.delete_object(Bucket="acl-writers", Key="bor")
    owner.put_object(Bucket="acl-writers", Key="uq", Body=b"mine")
    assert owner.get_object_acl(Bucket="acl-writers", Key="uq")["Owner"]["ID"] == OWNER
    _denied(lambda: other.get_object(Bucket="acl-writers", Key="uq"))
    _denied(lambda: third.get_object(Bucket="acl-writers", Key="uq"))


def test_copies_read_their_source_as_a_get_would(
    owner: Any, other: Any, third: Any, anon: Any
) -> None:
    """CopyObject and UploadPartCopy need a READ of the source (its version's ACL, or the
    source bucket's policy) and a write of the destination; refused without either."""
    owner.create_bucket(Bucket="acl-copy-src")
    data = b"copy me " * 700
    owner.put_object(Bucket="acl-copy-src", Key="granted", Body=data, GrantRead=f'id="{OTHER}"')
    owner.put_object(Bucket="acl-copy-src", Key="private", Body=data)
    owner.put_object(Bucket="acl-copy-src", Key="acp", Body=data, GrantReadACP=f'id="{OTHER}"')
    other.create_bucket(Bucket="acl-copy-dst")
    src = {"Bucket": "acl-copy-src", "Key": "granted"}
    other.copy_object(Bucket="acl-copy-dst", Key="c", CopySource=src)
    assert _body(other, "acl-copy-dst", "c") == data
    # Refused: no grant, a grant of another permission, another tenant, an unsigned caller,
    # a missing key without a listing grant, another expected source owner.
    for key in ("private", "acp", "missing"):
        _denied(
            functools.partial(
                other.copy_object, Bucket="acl-copy-dst", Key=key,
                CopySource={"Bucket": "acl-copy-src", "Key": key},
            )
        )  # fmt: skip
    third.create_bucket(Bucket="acl-copy-dst-c")
    _denied(lambda: third.copy_object(Bucket="acl-copy-dst-c", Key="c", CopySource=src))
    owner.create_bucket(Bucket="acl-copy-open", ACL="public-read-write")
    _denied(lambda: anon.copy_object(Bucket="acl-copy-open", Key="c", CopySource=src))
    _denied(
        lambda: other.copy_object(
            Bucket="acl-copy-dst", Key="c2", CopySource=src, ExpectedSourceBucketOwner=THIRD
        )
    )
    other.copy_object(
        Bucket="acl-copy-dst", Key="c2", CopySource=src, ExpectedSourceBucketOwner=OWNER
    )
    for key in ("private", "acp", "missing"):
        head = functools.partial(other.head_object, Bucket="acl-copy-dst", Key=key)
        assert _fails(head)[1] == 404
    # Into the source's bucket itself, where a grant lets it write: the copy is the writer's.
    owner.put_bucket_acl(Bucket="acl-copy-src", GrantWrite=f'id="{OTHER}"')
    other.copy_object(Bucket="acl-copy-src", Key="mine", CopySource=src)
    assert other.get_object_acl(Bucket="acl-copy-src", Key="mine")["Owner"]["ID"] == OTHER
    _denied(
        lambda: other.copy_object(
            Bucket="acl-copy-src", Key="p", CopySource={"Bucket": "acl-copy-src", "Key": "private"}
        )
    )
    # The source's version is checked as copied: its ACL changed, the copy is refused.
    owner.put_object_acl(Bucket="acl-copy-src", Key="granted", ACL="private")
    _denied(lambda: other.copy_object(Bucket="acl-copy-dst", Key="c3", CopySource=src))
    # UploadPartCopy alike.
    owner.put_object_acl(Bucket="acl-copy-src", Key="granted", GrantRead=f'id="{OTHER}"')
    upload = other.create_multipart_upload(Bucket="acl-copy-dst", Key="mp")["UploadId"]
    part = other.upload_part_copy(
        Bucket="acl-copy-dst", Key="mp", UploadId=upload, PartNumber=1, CopySource=src
    )
    _denied(
        lambda: other.upload_part_copy(
            Bucket="acl-copy-dst", Key="mp", UploadId=upload, PartNumber=2,
            CopySource={"Bucket": "acl-copy-src", "Key": "private"},
        )
    )  # fmt: skip
    other.complete_multipart_upload(
        Bucket="acl-copy-dst", Key="mp", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["CopyPartResult"]["ETag"]}]},
    )  # fmt: skip
    assert _body(other, "acl-copy-dst", "mp") == data
    # The source bucket's owner copies another tenant's object only as its ACL lets it read.
    _denied(
        lambda: owner.copy_object(
            Bucket="acl-copy-src", Key="back", CopySource={"Bucket": "acl-copy-src", "Key": "mine"}
        )
    )


def test_bucket_policies_admit_copies_and_cover_the_owners_objects_only(
    owner: Any, other: Any, third: Any, anon: Any
) -> None:
    """A source bucket's policy allowing s3:GetObject admits copies from it (its Deny refuses
    them, the owner's too); a destination's s3:PutObject Allow with an s3:x-amz-copy-source
    condition admits only the copies it names; neither policy reaches an object that another
    tenant wrote."""

    def policy(*statements: dict[str, Any]) -> str:
        for statement in statements:
            statement.setdefault("Principal", "*")
        return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})

    owner.create_bucket(Bucket="acl-pol-src", GrantWrite=f'id="{OTHER}"')
    for key in ("mine", "kept", "secret"):
        owner.put_object(Bucket="acl-pol-src", Key=key, Body=key.encode() * 100)
    other.put_object(Bucket="acl-pol-src", Key="theirs", Body=b"theirs")
    owner.put_bucket_policy(
        Bucket="acl-pol-src",
        Policy=policy(
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::acl-pol-src/*"},
            {
                "Effect": "Deny", "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::acl-pol-src/secret",
            },
        ),
    )  # fmt: skip
    assert _body(third, "acl-pol-src", "mine") == b"mine" * 100
    for stranger in (third, anon, owner):  # the policy does not reach the writer's object
        _denied(functools.partial(stranger.get_object, Bucket="acl-pol-src", Key="theirs"))
    assert _body(other, "acl-pol-src", "theirs") == b"theirs"
    third.create_bucket(Bucket="acl-pol-c")
    third.copy_object(
        Bucket="acl-pol-c", Key="m", CopySource={"Bucket": "acl-pol-src", "Key": "mine"}
    )
    assert _body(third, "acl-pol-c", "m") == b"mine" * 100
    for key in ("theirs", "secret"):
        _denied(
            functools.partial(
                third.copy_object, Bucket="acl-pol-c", Key=key,
                CopySource={"Bucket": "acl-pol-src", "Key": key},
            )
        )  # fmt: skip
    _denied(
        lambda: owner.copy_object(
            Bucket="acl-pol-src", Key="s2", CopySource={"Bucket": "acl-pol-src", "Key": "secret"}
        )
    )
    # The destination's Allow with a copy-source condition.
    owner.create_bucket(Bucket="acl-pol-dst")
    owner.put_bucket_policy(
        Bucket="acl-pol-dst",
        Policy=policy(
            {
                "Effect": "Allow", "Action": "s3:PutObject",
                "Resource": "arn:aws:s3:::acl-pol-dst/*",
                "Condition": {"StringLike": {"s3:x-amz-copy-source": "acl-pol-src/m*"}},
            },
        ),
    )  # fmt: skip
    third.copy_object(
        Bucket="acl-pol-dst", Key="m", CopySource={"Bucket": "acl-pol-src", "Key": "mine"}
    )
    assert _body(third, "acl-pol-dst", "m") == b"mine" * 100  # the copy is third's own
    assert third.get_object_acl(Bucket="acl-pol-dst", Key="m")["Owner"]["ID"] == THIRD
    _denied(
        lambda: third.copy_object(
            Bucket="acl-pol-dst", Key="k", CopySource={"Bucket": "acl-pol-src", "Key": "kept"}
        )
    )
    _denied(lambda: third.put_object(Bucket="acl-pol-dst", Key="p", Body=b"plain"))
    _denied(
        lambda: anon.copy_object(
            Bucket="acl-pol-dst", Key="a", CopySource={"Bucket": "acl-pol-src", "Key": "kept"}
        )
    )
    # Both policies allow "*": an unsigned copy of a source the condition names passes, as in S3.
    anon.copy_object(
        Bucket="acl-pol-dst", Key="a", CopySource={"Bucket": "acl-pol-src", "Key": "mine"}
    )
    assert _body(owner, "acl-pol-dst", "a") == b"mine" * 100  # an anonymous write: the owner's


def test_grants_to_a_tenant_without_users_are_refused(owner: Any, other: Any) -> None:
    """S3 refuses a grant to an unknown id (400 InvalidArgument "Invalid id"): here a tenant
    that no user belongs to; nothing is stored."""
    owner.create_bucket(Bucket="acl-unknown")
    nobody = 'id="acl-nobody"'
    assert _fails(lambda: owner.put_bucket_acl(Bucket="acl-unknown", GrantRead=nobody)) == (
        "InvalidArgument",
        400,
    )
    document = owner.get_bucket_acl(Bucket="acl-unknown")
    body = {
        "Owner": document["Owner"],
        "Grants": [
            {"Grantee": {"ID": "acl-nobody", "Type": "CanonicalUser"}, "Permission": "READ"}
        ],
    }
    refused = _fails(lambda: owner.put_bucket_acl(Bucket="acl-unknown", AccessControlPolicy=body))
    assert refused == ("InvalidArgument", 400)
    assert _grants(owner.get_bucket_acl(Bucket="acl-unknown")) == {(OWNER, "FULL_CONTROL")}
    put = functools.partial(
        owner.put_object, Bucket="acl-unknown", Key="k", Body=b"x", GrantRead=nobody
    )
    assert _fails(put) == ("InvalidArgument", 400)
    assert _fails(lambda: owner.head_object(Bucket="acl-unknown", Key="k"))[1] == 404
    make = functools.partial(owner.create_bucket, Bucket="acl-unknown-2", GrantRead=nobody)
    assert _fails(make) == ("InvalidArgument", 400)
    assert _fails(lambda: owner.head_bucket(Bucket="acl-unknown-2"))[1] == 404
    # A tenant with a user may be granted, by PutObject and CopyObject alike.
    owner.put_object(Bucket="acl-unknown", Key="k", Body=b"x", GrantRead=f'id="{OTHER}"')
    assert _body(other, "acl-unknown", "k") == b"x"
    copy = functools.partial(
        owner.copy_object, Bucket="acl-unknown", Key="c", GrantRead=nobody,
        CopySource={"Bucket": "acl-unknown", "Key": "k"},
    )  # fmt: skip
    assert _fails(copy) == ("InvalidArgument", 400)


def test_object_acls(owner: Any, other: Any, anon: Any) -> None:
    owner.create_bucket(Bucket="acl-objects")
    data = b"object acl " * 300
    put = owner.put_object(Bucket="acl-objects", Key="k", Body=data, ACL="public-read")
    assert _grants(owner.get_object_acl(Bucket="acl-objects", Key="k")) == {
        (OWNER, "FULL_CONTROL"),
        (ALL, "READ"),
    }
    assert _body(anon, "acl-objects", "k") == data
    # Replaced in place: same ETag, no longer public.
    owner.put_object_acl(Bucket="acl-objects", Key="k", ACL="private")
    _denied(lambda: anon.get_object(Bucket="acl-objects", Key="k"))
    assert owner.head_object(Bucket="acl-objects", Key="k")["ETag"] == put["ETag"]
    assert _body(owner, "acl-objects", "k") == data
    owner.put_object_acl(
        Bucket="acl-objects", Key="k", GrantRead=f'id="{OTHER}"', GrantReadACP=f'id="{OTHER}"'
    )
    assert _body(other, "acl-objects", "k") == data
    assert _grants(other.get_object_acl(Bucket="acl-objects", Key="k")) == {
        (OTHER, "READ"),
        (OTHER, "READ_ACP"),
    }
    _denied(lambda: other.put_object_acl(Bucket="acl-objects", Key="k", ACL="public-read"))
    _denied(lambda: other.put_object(Bucket="acl-objects", Key="k", Body=b"x"))
    _denied(lambda: anon.get_object(Bucket="acl-objects", Key="k"))
    assert _fails(lambda: owner.get_object_acl(Bucket="acl-objects", Key="none")) == (
        "NoSuchKey",
        404,
    )
    # A copy gets the request's ACL, never the source's.
    owner.put_object(Bucket="acl-objects", Key="pub", Body=b"pub", ACL="public-read")
    owner.copy_object(
        Bucket="acl-objects", Key="copy", CopySource={"Bucket": "acl-objects", "Key": "pub"}
    )
    _denied(lambda: anon.get_object(Bucket="acl-objects", Key="copy"))
    owner.copy_object(
        Bucket="acl-objects", Key="copy2", CopySource={"Bucket": "acl-objects", "Key": "k"},
        ACL="public-read",
    )  # fmt: skip
    assert _body(anon, "acl-objects", "copy2") == data
    # CreateMultipartUpload's ACL is the completed object's.
    upload = owner.create_multipart_upload(
        Bucket="acl-objects", Key="mp", GrantRead=f'uri="{SIGNED}"'
    )
    part = owner.upload_part(
        Bucket="acl-objects", Key="mp", UploadId=upload["UploadId"], PartNumber=1, Body=data
    )
    owner.complete_multipart_upload(
        Bucket="acl-objects", Key="mp", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    assert _body(other, "acl-objects", "mp") == data
    _denied(lambda: anon.get_object(Bucket="acl-objects", Key="mp"))


def test_expected_bucket_owner(owner: Any) -> None:
    owner.create_bucket(Bucket="acl-expected")
    owner.put_object(Bucket="acl-expected", Key="k", Body=b"v", ExpectedBucketOwner=OWNER)
    assert (
        owner.get_object(Bucket="acl-expected", Key="k", ExpectedBucketOwner=OWNER)["Body"].read()
        == b"v"
    )
    owner.list_objects_v2(Bucket="acl-expected", ExpectedBucketOwner=OWNER)
    for call in (
        lambda: owner.get_object(Bucket="acl-expected", Key="k", ExpectedBucketOwner=OTHER),
        lambda: owner.put_object(
            Bucket="acl-expected", Key="k", Body=b"w", ExpectedBucketOwner=OTHER
        ),
        lambda: owner.list_objects_v2(Bucket="acl-expected", ExpectedBucketOwner=OTHER),
        lambda: owner.get_bucket_acl(Bucket="acl-expected", ExpectedBucketOwner=OTHER),
        lambda: owner.delete_bucket(Bucket="acl-expected", ExpectedBucketOwner=OTHER),
    ):
        _denied(call)
    assert _body(owner, "acl-expected", "k") == b"v"


def test_awscli_put_bucket_acl_and_get_object_acl(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
    anon: Any,
) -> None:
    info = s3_cluster_fixture
    owner.create_bucket(Bucket="acl-cli")
    owner.put_object(Bucket="acl-cli", Key="k", Body=b"cli", ACL="authenticated-read")
    # awscli runs as the cluster's admin, who may manage every tenant's bucket.
    s3_cluster.aws_cli(
        info, "s3api", "put-bucket-acl", "--bucket", "acl-cli", "--acl", "public-read"
    )
    got = json.loads(
        s3_cluster.aws_cli(info, "s3api", "get-bucket-acl", "--bucket", "acl-cli").stdout
    )
    assert _grants(got) == {(OWNER, "FULL_CONTROL"), (ALL, "READ")}
    assert [o["Key"] for o in anon.list_objects_v2(Bucket="acl-cli")["Contents"]] == ["k"]
    got = json.loads(
        s3_cluster.aws_cli(
            info, "s3api", "get-object-acl", "--bucket", "acl-cli", "--key", "k"
        ).stdout
    )
    assert got["Owner"]["ID"] == OWNER
    assert _grants(got) == {(OWNER, "FULL_CONTROL"), (SIGNED, "READ")}
    _denied(lambda: anon.get_object(Bucket="acl-cli", Key="k"))


def test_kv_buckets_have_no_acls(owner: Any, anon: Any) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    owner.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        assert _fails(lambda: owner.create_bucket(Bucket="acl-kv", ACL="public-read"))[1] == 501
        owner.create_bucket(Bucket="acl-kv")
    finally:
        owner.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    owner.put_object(Bucket="acl-kv", Key="k", Body=b"kv")
    assert (
        _fails(lambda: owner.put_object(Bucket="acl-kv", Key="p", Body=b"x", ACL="public-read"))[1]
        == 501
    )
    _denied(lambda: anon.get_object(Bucket="acl-kv", Key="k"))
    _denied(lambda: anon.list_objects_v2(Bucket="acl-kv"))
    _denied(lambda: anon.put_object(Bucket="acl-kv", Key="n", Body=b"x"))
    assert _body(owner, "acl-kv", "k") == b"kv"
    # A KV object's ACL is private, always: shown, set again as it is, never another one.
    assert _grants(owner.get_object_acl(Bucket="acl-kv", Key="k")) == {(OWNER, "FULL_CONTROL")}
    owner.put_object_acl(Bucket="acl-kv", Key="k", ACL="private")
    public = {
        "Owner": {"ID": OWNER},
        "Grants": [{"Grantee": {"Type": "Group", "URI": ALL}, "Permission": "READ"}],
    }
    assert _fails(
        lambda: owner.put_object_acl(Bucket="acl-kv", Key="k", AccessControlPolicy=public)
    ) == ("NotImplemented", 501)
    assert _fails(lambda: owner.get_object_acl(Bucket="acl-kv", Key="no")) == ("NoSuchKey", 404)
    _denied(lambda: anon.get_object_acl(Bucket="acl-kv", Key="k"))
    _denied(lambda: anon.put_object_acl(Bucket="acl-kv", Key="k", ACL="private"))
    assert _body(owner, "acl-kv", "k") == b"kv"


def _expect_continue(info: Info, path: str, length: int) -> bytes:
    """The first answer to an unsigned PUT's headers sent with Expect: 100-continue."""
    url = urllib.parse.urlsplit(info["gateway_s3"])
    assert url.hostname
    context = s3_cluster.tls_context(info)
    with (
        socket.create_connection((url.hostname, url.port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        tls.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        return _first_line(tls)


def _first_line(tls: ssl.SSLSocket) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = tls.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def test_expect_100_continue_follows_the_acl(
    s3_cluster_fixture: Info,  # noqa: F811
    owner: Any,
) -> None:
    info = s3_cluster_fixture
    owner.create_bucket(Bucket="acl-expect-private")
    owner.create_bucket(Bucket="acl-expect-open", ACL="public-read-write")
    assert _expect_continue(info, "/acl-expect-private/k", 10).startswith(b"HTTP/1.1 403")
    assert _expect_continue(info, "/acl-expect-open/k", 10).startswith(b"HTTP/1.1 100")
