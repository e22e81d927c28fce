"""S3 Object Ownership against the shared secure dev cluster, as AWS S3 documents it: the
`?ownershipControls` operations and CreateBucket's x-amz-object-ownership header (theirs alone
to the bucket's tenant: unsigned requests and other tenants are refused, a public bucket policy
notwithstanding); who owns what another tenant writes under each setting (GetObjectAcl,
ListParts); BucketOwnerEnforced refusing ACLs and counting none (an object's grant set before
opens nothing once ACLs are disabled); KV buckets (BucketOwnerEnforced only)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
OWNER, OTHER, THIRD = "own-a", "own-b", "own-c"
ENFORCED = {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
PREFERRED = {"Rules": [{"ObjectOwnership": "BucketOwnerPreferred"}]}
WRITER = {"Rules": [{"ObjectOwnership": "ObjectWriter"}]}


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    error = failed.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _denied(call: Callable[[], Any]) -> None:
    assert _fails(call) == ("AccessDenied", 403)


def _no_acls(call: Callable[[], Any]) -> None:
    assert _fails(call) == ("AccessControlListNotSupported", 400)


@pytest.fixture(scope="module")
def owner(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A plain user of tenant own-a: owns every bucket here."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OWNER))


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of tenant own-b: writes into own-a's buckets through their policy."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OTHER))


@pytest.fixture(scope="module")
def third(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of tenant own-c (granted by some ACLs)."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, THIRD))


@pytest.fixture(scope="module")
def anon(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """An unsigned boto3 client."""
    return s3_cluster.anonymous(s3_cluster_fixture)


def _setting(s3: Any, bucket: str) -> str:
    rules = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert len(rules) == 1
    return str(rules[0]["ObjectOwnership"])


def _owner_of(s3: Any, bucket: str, key: str) -> str:
    return str(s3.get_object_acl(Bucket=bucket, Key=key)["Owner"]["ID"])


def _public_policy(s3: Any, bucket: str) -> None:
    """Let anyone do anything (what Ceph's s3-tests give their 'alt' user)."""
    s3.put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": "*"},
                        "Action": "*",
                        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                    }
                ],
            }
        ),
    )


def test_ownership_controls_are_the_bucket_owners_alone(owner: Any, other: Any, anon: Any) -> None:
    owner.create_bucket(Bucket="own-ctl")
    assert _fails(lambda: owner.get_bucket_ownership_controls(Bucket="own-ctl")) == (
        "OwnershipControlsNotFoundError",
        404,
    )
    owner.put_bucket_ownership_controls(Bucket="own-ctl", OwnershipControls=ENFORCED)
    assert _setting(owner, "own-ctl") == "BucketOwnerEnforced"
    # Unsigned requests and other tenants: refused, even where a policy allows them anything.
    _public_policy(owner, "own-ctl")
    for stranger in (anon, other):
        bucket = {"Bucket": "own-ctl"}
        _denied(functools.partial(stranger.get_bucket_ownership_controls, **bucket))
        put = stranger.put_bucket_ownership_controls
        _denied(functools.partial(put, OwnershipControls=WRITER, **bucket))
        _denied(functools.partial(stranger.delete_bucket_ownership_controls, **bucket))
    assert _setting(owner, "own-ctl") == "BucketOwnerEnforced"
    bad = {"Rules": [{"ObjectOwnership": "BucketOwnerSometimes"}]}
    assert _fails(
        lambda: owner.put_bucket_ownership_controls(Bucket="own-ctl", OwnershipControls=bad)
    ) == ("MalformedXML", 400)
    owner.delete_bucket_ownership_controls(Bucket="own-ctl")
    assert _fails(lambda: owner.get_bucket_ownership_controls(Bucket="own-ctl"))[1] == 404
    owner.delete_bucket_ownership_controls(Bucket="own-ctl")  # none: still 204
    # CreateBucket's header; enforcing refuses a bucket whose ACL grants others.
    owner.create_bucket(Bucket="own-hdr", ObjectOwnership="BucketOwnerPreferred")
    assert _setting(owner, "own-hdr") == "BucketOwnerPreferred"
    assert _fails(
        lambda: owner.create_bucket(
            Bucket="own-pub", ACL="public-read", ObjectOwnership="BucketOwnerEnforced"
        )
    ) == ("InvalidBucketAclWithObjectOwnership", 400)
    assert _fails(lambda: owner.head_bucket(Bucket="own-pub"))[1] == 404  # not created
    owner.create_bucket(Bucket="own-pub", GrantRead=f'id="{OTHER}"')
    assert _fails(
        lambda: owner.put_bucket_ownership_controls(Bucket="own-pub", OwnershipControls=ENFORCED)
    ) == ("InvalidBucketAclWithObjectOwnership", 400)
    assert _fails(lambda: owner.get_bucket_ownership_controls(Bucket="own-pub"))[1] == 404


def test_who_owns_what_another_tenant_writes(owner: Any, other: Any) -> None:
    for bucket, setting in (("own-pref", PREFERRED), ("own-writer", WRITER)):
        owner.create_bucket(Bucket=bucket)
        owner.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=setting)
        _public_policy(owner, bucket)
        other.put_object(Bucket=bucket, Key="plain", Body=b"x")
        other.put_object(Bucket=bucket, Key="full", Body=b"x", ACL="bucket-owner-full-control")
        other.copy_object(
            Bucket=bucket,
            Key="copy",
            CopySource={"Bucket": bucket, "Key": "plain"},
            ACL="bucket-owner-full-control",
        )
        upload = other.create_multipart_upload(
            Bucket=bucket, Key="mp", ACL="bucket-owner-full-control"
        )["UploadId"]
        parts = other.list_parts(Bucket=bucket, Key="mp", UploadId=upload)
        uploads = owner.list_multipart_uploads(Bucket=bucket)["Uploads"]
        preferred = setting is PREFERRED
        full_owner = OWNER if preferred else OTHER
        assert _owner_of(other, bucket, "plain") == OTHER
        assert _owner_of(owner, bucket, "full") == full_owner
        assert _owner_of(owner, bucket, "copy") == full_owner
        assert parts["Owner"]["ID"] == full_owner
        # Its initiator stays the other tenant whoever owns what it makes (as S3 lists them).
        assert parts["Initiator"]["ID"] == OTHER
        assert _owners(uploads, "Initiator", "Owner") == {"mp": (OTHER, full_owner)}
        # ACLs still work there.
        owner.put_bucket_acl(Bucket=bucket, ACL="private")
        other.put_object_acl(Bucket=bucket, Key="plain", ACL="private")


def test_list_parts_by_another_tenant_needs_a_policy(owner: Any, other: Any) -> None:
    owner.create_bucket(Bucket="own-parts", ACL="public-read-write")
    upload = other.create_multipart_upload(Bucket="own-parts", Key="mp")["UploadId"]
    _denied(lambda: other.list_parts(Bucket="own-parts", Key="mp", UploadId=upload))
    _public_policy(owner, "own-parts")
    assert other.list_parts(Bucket="own-parts", Key="mp", UploadId=upload)["Owner"]["ID"] == OTHER


def test_enforced_buckets_refuse_acls_and_count_none(
    owner: Any, other: Any, third: Any, anon: Any
) -> None:
    owner.create_bucket(Bucket="own-enf")
    _public_policy(owner, "own-enf")
    # Before: objects of the owner's readable through their ACL, one another tenant owns.
    owner.put_object(Bucket="own-enf", Key="granted", Body=b"g", GrantRead=f'id="{THIRD}"')
    owner.put_object(Bucket="own-enf", Key="public", Body=b"p", ACL="public-read")
    other.put_object(Bucket="own-enf", Key="theirs", Body=b"t")
    assert third.get_object(Bucket="own-enf", Key="granted")["Body"].read() == b"g"
    _denied(lambda: owner.get_object(Bucket="own-enf", Key="theirs"))
    owner.delete_bucket_policy(Bucket="own-enf")
    owner.put_bucket_ownership_controls(Bucket="own-enf", OwnershipControls=ENFORCED)
    # The grants admit no one any more; the owner owns (and reads) every object.
    _denied(lambda: third.get_object(Bucket="own-enf", Key="granted"))
    _denied(lambda: anon.get_object(Bucket="own-enf", Key="public"))
    _denied(lambda: other.get_object(Bucket="own-enf", Key="theirs"))
    _denied(lambda: other.get_object_acl(Bucket="own-enf", Key="theirs"))
    assert owner.get_object(Bucket="own-enf", Key="theirs")["Body"].read() == b"t"
    for key in ("granted", "public", "theirs"):
        policy = owner.get_object_acl(Bucket="own-enf", Key=key)
        assert policy["Owner"]["ID"] == OWNER
        assert [(g["Grantee"].get("ID"), g["Permission"]) for g in policy["Grants"]] == [
            (OWNER, "FULL_CONTROL")
        ]
    # Setting ACLs: refused but the bucket-owner-full-control one, for everyone.
    _public_policy(owner, "own-enf")
    for writer in (owner, other):
        put = functools.partial(writer.put_object, Bucket="own-enf", Body=b"x")
        _no_acls(functools.partial(put, Key="n1", ACL="private"))
        _no_acls(functools.partial(put, Key="n2", GrantRead=f'id="{THIRD}"'))
        begin = writer.create_multipart_upload
        _no_acls(functools.partial(begin, Bucket="own-enf", Key="n3", ACL="private"))
        set_acl = writer.put_object_acl
        _no_acls(functools.partial(set_acl, Bucket="own-enf", Key="granted", ACL="public-read"))
        put(Key="w", ACL="bucket-owner-full-control")
        assert _owner_of(owner, "own-enf", "w") == OWNER
    _no_acls(lambda: owner.put_bucket_acl(Bucket="own-enf", ACL="private"))
    _no_acls(lambda: owner.put_bucket_acl(Bucket="own-enf", GrantRead=f'id="{THIRD}"'))
    assert _fails(lambda: owner.head_object(Bucket="own-enf", Key="n2"))[1] == 404  # not stored
    # Deleting the setting brings the stored grants back (nothing was rewritten).
    owner.delete_bucket_ownership_controls(Bucket="own-enf")
    assert third.get_object(Bucket="own-enf", Key="granted")["Body"].read() == b"g"


def test_kv_buckets_take_bucket_owner_enforced_only(owner: Any, other: Any) -> None:
    def kv_kind(request: Any, **_: Any) -> None:
        request.headers["x-kvtier-bucket-kind"] = "kv"

    owner.meta.events.register("before-sign.s3.CreateBucket", kv_kind)
    try:
        assert _fails(
            lambda: owner.create_bucket(Bucket="own-kv", ObjectOwnership="ObjectWriter")
        ) == ("NotImplemented", 501)
        owner.create_bucket(Bucket="own-kv", ObjectOwnership="BucketOwnerEnforced")
    finally:
        owner.meta.events.unregister("before-sign.s3.CreateBucket", kv_kind)
    assert _setting(owner, "own-kv") == "BucketOwnerEnforced"
    assert _fails(
        lambda: owner.put_bucket_ownership_controls(Bucket="own-kv", OwnershipControls=PREFERRED)
    ) == ("NotImplemented", 501)
    _denied(lambda: other.get_bucket_ownership_controls(Bucket="own-kv"))
    owner.put_object(Bucket="own-kv", Key="k", Body=b"kv")
    assert _owner_of(owner, "own-kv", "k") == OWNER


def _owners(entries: list[Info], *tags: str) -> dict[str, tuple[str, ...]]:
    return {e["Key"]: tuple(e[t]["ID"] for t in tags) for e in entries}


def test_listings_show_each_entrys_owner(owner: Any, other: Any) -> None:
    """ListObjects (V1, V2 with fetch-owner), ListObjectVersions and ListMultipartUploads show
    the writer's tenant as the Owner of what another tenant wrote (ObjectWriter), the bucket's
    for its own; once BucketOwnerEnforced, the bucket's for every entry."""
    bucket = "own-lists"
    owner.create_bucket(Bucket=bucket, ACL="public-read-write")
    owner.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    owner.put_object(Bucket=bucket, Key="a-mine", Body=b"a")
    other.put_object(Bucket=bucket, Key="b-theirs", Body=b"b")
    owner.delete_object(Bucket=bucket, Key="c-gone")  # a delete marker of the owner's
    other.delete_object(Bucket=bucket, Key="d-gone")  # one of the other tenant's (its deleter)
    owner.create_multipart_upload(Bucket=bucket, Key="up-mine")
    other.create_multipart_upload(Bucket=bucket, Key="up-theirs")

    def listed() -> list[dict[str, tuple[str, ...]]]:
        versions = owner.list_object_versions(Bucket=bucket)
        return [
            _owners(owner.list_objects(Bucket=bucket)["Contents"], "Owner"),
            _owners(owner.list_objects_v2(Bucket=bucket, FetchOwner=True)["Contents"], "Owner"),
            _owners(versions["Versions"] + versions["DeleteMarkers"], "Owner"),
            _owners(owner.list_multipart_uploads(Bucket=bucket)["Uploads"], "Initiator", "Owner"),
        ]

    mine, theirs = (OWNER,), (OTHER,)
    objects = {"a-mine": mine, "b-theirs": theirs}
    uploads = {"up-mine": (OWNER, OWNER), "up-theirs": (OTHER, OTHER)}
    markers = {"c-gone": mine, "d-gone": theirs}
    assert listed() == [objects, objects, {**objects, **markers}, uploads]
    assert "Owner" not in owner.list_objects_v2(Bucket=bucket)["Contents"][0]
    # The bucket's READ grant lets another tenant list versions and uploads too (as S3 maps
    # READ to s3:ListBucketVersions and s3:ListBucketMultipartUploads): the same owners.
    assert _owners(other.list_multipart_uploads(Bucket=bucket)["Uploads"], "Owner") == {
        "up-mine": mine,
        "up-theirs": theirs,
    }
    assert _owners(other.list_object_versions(Bucket=bucket)["Versions"], "Owner") == objects
    owner.put_bucket_acl(Bucket=bucket, ACL="private")
    _denied(lambda: other.list_multipart_uploads(Bucket=bucket))
    _denied(lambda: other.list_object_versions(Bucket=bucket))
    owner.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=ENFORCED)
    _public_policy(owner, bucket)  # no ACLs now: a policy admits the other tenant
    other.create_multipart_upload(Bucket=bucket, Key="up-enforced")  # records no writer
    objects["b-theirs"] = mine
    uploads["up-theirs"] = (OTHER, OWNER)  # initiated by the other tenant, owned by the bucket's
    uploads["up-enforced"] = (OTHER, OWNER)
    markers["d-gone"] = mine
    assert listed() == [objects, objects, {**objects, **markers}, uploads]
