"""S3 bucket policies against the shared secure dev cluster, as AWS S3 documents them:
Put/Get/DeleteBucketPolicy and GetBucketPolicyStatus by the owner alone, malformed policies
refused, an Allow opening another tenant's and anonymous reads the ACLs do not, an explicit
Deny closing what the owner and an ACL grant could do (but managing the policy), an
s3:prefix condition on ListBucket, s3:ExistingObjectTag and s3:RequestObjectTag conditions,
and object tagging opened to other tenants by a policy alone."""

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
OWNER, OTHER = "pol-a", "pol-b"


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    error = failed.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


def _denied(call: Callable[[], Any]) -> None:
    code, status = _fails(call)
    assert status == 403, code
    assert code in ("AccessDenied", "403"), code


def _policy(bucket: str, *statements: dict[str, Any]) -> str:
    for statement in statements:
        statement.setdefault("Principal", "*")
        statement.setdefault("Resource", [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"])
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


@pytest.fixture(scope="module")
def users(s3_cluster_fixture: Info) -> dict[str, Any]:  # noqa: F811
    """Clients of tenant pol-a (owns every bucket here), of pol-b, and an unsigned one."""
    info = s3_cluster_fixture
    return {
        "owner": s3_cluster.client(info, *s3_cluster.add_user(info, OWNER)),
        "other": s3_cluster.client(info, *s3_cluster.add_user(info, OTHER)),
        "anon": s3_cluster.anonymous(info),
    }


def _bucket(owner: Any, name: str) -> str:
    owner.create_bucket(Bucket=name)
    for key in ("pub/a", "priv/b"):
        owner.put_object(Bucket=name, Key=key, Body=key.encode())
    return name


def test_only_the_owner_manages_the_policy(users: dict[str, Any]) -> None:
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-manage")
    assert _fails(lambda: owner.get_bucket_policy(Bucket=bucket)) == ("NoSuchBucketPolicy", 404)
    doc = _policy(bucket, {"Effect": "Allow", "Action": "s3:ListBucket"})
    # Another tenant may not set, read or delete it, even where the policy allows it all.
    _denied(lambda: other.put_bucket_policy(Bucket=bucket, Policy=doc))
    owner.put_bucket_policy(
        Bucket=bucket, Policy=_policy(bucket, {"Effect": "Allow", "Action": "s3:*"})
    )
    _denied(lambda: other.put_bucket_policy(Bucket=bucket, Policy=doc))
    _denied(lambda: other.get_bucket_policy(Bucket=bucket))
    _denied(lambda: other.delete_bucket_policy(Bucket=bucket))
    _denied(lambda: users["anon"].get_bucket_policy(Bucket=bucket))
    owner.put_bucket_policy(Bucket=bucket, Policy=doc)
    assert owner.get_bucket_policy(Bucket=bucket)["Policy"] == doc
    assert owner.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"] is True
    owner.delete_bucket_policy(Bucket=bucket)
    assert _fails(lambda: owner.get_bucket_policy(Bucket=bucket)) == ("NoSuchBucketPolicy", 404)


def test_malformed_policies_are_refused(users: dict[str, Any]) -> None:
    owner = users["owner"]
    bucket = _bucket(owner, "pol-malformed")
    allow = {"Effect": "Allow", "Action": "s3:GetObject"}
    for document in (
        "{not json",
        _policy(bucket, {**allow, "NotPrincipal": {"AWS": OTHER}}),
        _policy(bucket, {**allow, "Condition": {"NumericLessThan": {"s3:prefix": "1"}}}),
        _policy(bucket, {**allow, "Condition": {"StringEquals": {"s3:RequestObjectTagKeys": "t"}}}),
        _policy(bucket, {**allow, "Resource": "arn:aws:s3:::pol-elsewhere/*"}),
    ):
        code, status = _fails(
            functools.partial(owner.put_bucket_policy, Bucket=bucket, Policy=document)
        )
        assert (code, status) == ("MalformedPolicy", 400), document
    assert _fails(lambda: owner.get_bucket_policy(Bucket=bucket)) == ("NoSuchBucketPolicy", 404)


def test_allow_opens_reads_the_acls_do_not(users: dict[str, Any]) -> None:
    owner, other, anon = users["owner"], users["other"], users["anon"]
    bucket = _bucket(owner, "pol-allow")
    _denied(lambda: other.get_object(Bucket=bucket, Key="pub/a"))
    allow_other = {
        "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{OTHER}:root"},
        "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/pub/*",
    }  # fmt: skip
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, allow_other))
    assert other.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    _denied(lambda: other.get_object(Bucket=bucket, Key="priv/b"))  # resource
    _denied(lambda: other.put_object(Bucket=bucket, Key="pub/c", Body=b"x"))  # action
    _denied(lambda: other.list_objects_v2(Bucket=bucket))
    _denied(lambda: anon.get_object(Bucket=bucket, Key="pub/a"))  # principal
    anyone = {
        "Effect": "Allow",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/pub/*",
    }
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, anyone))
    assert anon.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    _denied(lambda: anon.get_object(Bucket=bucket, Key="priv/b"))
    _denied(lambda: anon.delete_object(Bucket=bucket, Key="pub/a"))


def test_explicit_deny_beats_the_owner_and_an_acl_grant(users: dict[str, Any]) -> None:
    owner, other, anon = users["owner"], users["other"], users["anon"]
    bucket = _bucket(owner, "pol-deny")
    owner.put_bucket_acl(Bucket=bucket, ACL="public-read")
    owner.put_object_acl(Bucket=bucket, Key="priv/b", ACL="public-read")
    assert other.get_object(Bucket=bucket, Key="priv/b")["Body"].read() == b"priv/b"
    deny = {
        "Effect": "Deny", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/priv/*"],
    }  # fmt: skip
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, deny))
    for client in (owner, other, anon):
        _denied(functools.partial(client.get_object, Bucket=bucket, Key="priv/b"))
        _denied(functools.partial(client.list_objects_v2, Bucket=bucket))
    assert owner.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    # A copy reads its source: denied there, denied here.
    _denied(lambda: owner.copy_object(Bucket=bucket, Key="c", CopySource=f"{bucket}/priv/b"))
    # Everything denied: the owner still manages the policy (as in S3).
    everything = {"Effect": "Deny", "Action": "s3:*"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, everything))
    _denied(lambda: owner.put_bucket_acl(Bucket=bucket, ACL="private"))
    _denied(lambda: owner.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "pub/a"}]}))
    assert json.loads(owner.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]
    owner.delete_bucket_policy(Bucket=bucket)
    assert owner.get_object(Bucket=bucket, Key="priv/b")["Body"].read() == b"priv/b"


def test_a_deny_of_deleting_versions_covers_delete_objects(users: dict[str, Any]) -> None:
    """A Deny of s3:DeleteObjectVersion (keep every version) refuses a version's deletion
    through DeleteObjects too, per entry as S3 does (its body names the versions: the gate
    cannot see them); a plain delete in the same request (a delete marker: s3:DeleteObject)
    goes ahead."""
    owner = users["owner"]
    bucket = _bucket(owner, "pol-keep-versions")
    owner.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    version = owner.put_object(Bucket=bucket, Key="pub/a", Body=b"kept")["VersionId"]
    deny = {"Effect": "Deny", "Action": "s3:DeleteObjectVersion"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, deny))
    _denied(lambda: owner.delete_object(Bucket=bucket, Key="pub/a", VersionId=version))
    both = [{"Key": "pub/a", "VersionId": version}, {"Key": "priv/b"}]
    done = owner.delete_objects(Bucket=bucket, Delete={"Objects": both})
    assert [(e["Key"], e["Code"]) for e in done.get("Errors", [])] == [("pub/a", "AccessDenied")]
    assert [d["Key"] for d in done["Deleted"]] == ["priv/b"]
    assert done["Deleted"][0]["DeleteMarker"]
    kept = owner.get_object(Bucket=bucket, Key="pub/a", VersionId=version)
    assert kept["Body"].read() == b"kept"


def test_a_deny_of_listing_hides_which_keys_exist(users: dict[str, Any]) -> None:
    """S3 tells a missing key (404) from a refused one (403) only to a caller with
    s3:ListBucket: a Deny of it takes that away from a bucket's READ grantees too (another
    tenant, anonymous), and from a caller a policy's Allow lets read objects."""
    owner, other, anon = users["owner"], users["other"], users["anon"]
    bucket = _bucket(owner, "pol-unlisted")
    owner.put_bucket_acl(Bucket=bucket, ACL="public-read")
    owner.put_object_acl(Bucket=bucket, Key="pub/a", ACL="public-read")
    assert _fails(lambda: anon.get_object(Bucket=bucket, Key="missing")) == ("NoSuchKey", 404)
    allow = {"Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:GetObject"}
    deny = {"Effect": "Deny", "Action": "s3:ListBucket"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, allow, deny))
    for client in (other, anon):
        _denied(functools.partial(client.list_objects_v2, Bucket=bucket))
        _denied(functools.partial(client.get_object, Bucket=bucket, Key="missing"))
        _denied(functools.partial(client.head_object, Bucket=bucket, Key="missing"))
        assert client.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"


def test_prefix_condition_on_list_bucket(users: dict[str, Any]) -> None:
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-prefix")
    listing = {
        "Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:ListBucket",
        "Resource": f"arn:aws:s3:::{bucket}", "Condition": {"StringLike": {"s3:prefix": "pub/*"}},
    }  # fmt: skip
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, listing))
    found = other.list_objects_v2(Bucket=bucket, Prefix="pub/")
    assert [o["Key"] for o in found["Contents"]] == ["pub/a"]
    _denied(lambda: other.list_objects_v2(Bucket=bucket, Prefix="priv/"))
    _denied(lambda: other.list_objects_v2(Bucket=bucket))
    public = owner.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"]
    assert public is False


def test_public_access_block_and_public_policies(users: dict[str, Any]) -> None:
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-block")
    public = _policy(bucket, {"Effect": "Allow", "Action": "s3:GetObject"})
    owner.put_bucket_policy(Bucket=bucket, Policy=public)
    assert other.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    flags = {"BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    owner.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=flags)
    _denied(lambda: other.get_object(Bucket=bucket, Key="pub/a"))  # restricted
    _denied(lambda: owner.put_bucket_policy(Bucket=bucket, Policy=public))  # blocked
    only_other = _policy(
        bucket, {"Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:GetObject"}
    )
    owner.put_bucket_policy(Bucket=bucket, Policy=only_other)  # not public: accepted
    assert other.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"


def _tag(client: Any, bucket: str, key: str, **tags: str) -> None:
    tag_set = [{"Key": k, "Value": v} for k, v in tags.items()]
    client.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": tag_set})


def test_existing_object_tag_conditions(users: dict[str, Any]) -> None:
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-tags")
    _tag(owner, bucket, "pub/a", security="public", foo="bar")
    _tag(owner, bucket, "priv/b", security="private")
    owner.put_object(Bucket=bucket, Key="untagged", Body=b"u")
    on_public = {"StringEquals": {"s3:ExistingObjectTag/security": "public"}}
    reads = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObjectTagging"]}
    owner.put_bucket_policy(
        Bucket=bucket, Policy=_policy(bucket, {**reads, "Condition": on_public})
    )
    assert other.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    _denied(lambda: other.get_object(Bucket=bucket, Key="priv/b"))  # another value
    _denied(lambda: other.get_object(Bucket=bucket, Key="untagged"))  # no such tag
    _denied(lambda: other.get_object_tagging(Bucket=bucket, Key="pub/a"))  # another action
    # The object's existing tags decide, not the request's.
    _tag(other, bucket, "pub/a", security="private")
    _denied(lambda: _tag(other, bucket, "pub/a", security="public"))
    _denied(lambda: _tag(other, bucket, "priv/b", security="public"))
    _denied(lambda: other.get_object(Bucket=bucket, Key="pub/a"))
    assert owner.get_object(Bucket=bucket, Key="pub/a")["Body"].read() == b"pub/a"
    # A Deny on the tags refuses the owner too, only where they match.
    deny = {"Effect": "Deny", "Action": "s3:GetObject", "Condition": on_public}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, deny))
    _tag(owner, bucket, "untagged", security="public")
    _denied(lambda: owner.get_object(Bucket=bucket, Key="untagged"))
    assert owner.get_object(Bucket=bucket, Key="priv/b")["Body"].read() == b"priv/b"


def test_a_policy_alone_opens_object_tagging(users: dict[str, Any]) -> None:
    owner, other, anon = users["owner"], users["other"], users["anon"]
    bucket = _bucket(owner, "pol-tagging")
    owner.put_bucket_acl(Bucket=bucket, ACL="public-read-write")
    owner.put_object_acl(Bucket=bucket, Key="pub/a", ACL="public-read-write")
    _tag(owner, bucket, "pub/a", t="1")
    for client in (other, anon):  # no ACL grant reaches object tagging
        _denied(functools.partial(client.get_object_tagging, Bucket=bucket, Key="pub/a"))
        _denied(functools.partial(client.delete_object_tagging, Bucket=bucket, Key="pub/a"))
    get_only = {"Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:GetObjectTagging"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, get_only))
    assert other.get_object_tagging(Bucket=bucket, Key="pub/a")["TagSet"] == [
        {"Key": "t", "Value": "1"}
    ]
    _denied(lambda: anon.get_object_tagging(Bucket=bucket, Key="pub/a"))  # another principal
    _denied(lambda: _tag(other, bucket, "pub/a", t="2"))  # another action
    _denied(lambda: other.delete_object_tagging(Bucket=bucket, Key="pub/a"))
    missing = functools.partial(other.get_object_tagging, Bucket=bucket, Key="missing")
    assert _fails(missing) == ("NoSuchKey", 404)  # the bucket's ACL lets anyone list it
    change = {"Effect": "Allow", "Action": ["s3:PutObjectTagging", "s3:DeleteObjectTagging"]}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, change))
    _tag(anon, bucket, "pub/a", t="3")
    assert owner.get_object_tagging(Bucket=bucket, Key="pub/a")["TagSet"][0]["Value"] == "3"
    other.delete_object_tagging(Bucket=bucket, Key="pub/a")
    assert owner.get_object_tagging(Bucket=bucket, Key="pub/a")["TagSet"] == []
    _denied(lambda: other.get_object_tagging(Bucket=bucket, Key="pub/a"))
    deny = {"Effect": "Deny", "Principal": {"AWS": OTHER}, "Action": "s3:PutObjectTagging"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, change, deny))
    _denied(lambda: _tag(other, bucket, "pub/a", t="4"))
    _tag(anon, bucket, "pub/a", t="5")


def _tags(client: Any, bucket: str, key: str) -> dict[str, str]:
    got = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in got}


def test_request_object_tag_allows_put_object(users: dict[str, Any]) -> None:
    """An Allow of s3:PutObject on x-amz-tagging security=public: another tenant's PutObject
    and CreateMultipartUpload without the tag (or with another value) denied, nothing stored."""
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-reqtag-put")
    public = {"StringEquals": {"s3:RequestObjectTag/security": "public"}}
    allow = {"Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:PutObject"}
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, {**allow, "Condition": public}))
    for tagging in (None, "security=private", "Security=public", "a=1"):
        extra = {"Tagging": tagging} if tagging else {}
        _denied(functools.partial(other.put_object, Bucket=bucket, Key="t", Body=b"x", **extra))
        _denied(functools.partial(other.create_multipart_upload, Bucket=bucket, Key="t", **extra))
    assert _fails(lambda: owner.head_object(Bucket=bucket, Key="t"))[1] == 404
    other.put_object(Bucket=bucket, Key="t", Body=b"x", Tagging="a=1&security=public")
    assert _tags(owner, bucket, "t") == {"a": "1", "security": "public"}
    other.create_multipart_upload(Bucket=bucket, Key="m", Tagging="security=public")


def test_request_object_tag_denies_put_object_tagging(users: dict[str, Any]) -> None:
    """A Deny of s3:PutObjectTagging on tag security=public (the tags in the body): the owner
    and another tenant with a broad Allow denied with that tag, nothing changed, and allowed
    with others; a set operator on s3:RequestObjectTagKeys alike."""
    owner, other = users["owner"], users["other"]
    bucket = _bucket(owner, "pol-reqtag-tagging")
    _tag(owner, bucket, "pub/a", before="1")
    broad = {"Effect": "Allow", "Principal": {"AWS": OTHER}, "Action": "s3:*"}
    deny = {
        "Effect": "Deny", "Action": "s3:PutObjectTagging",
        "Condition": {"StringEquals": {"s3:RequestObjectTag/security": "public"}},
    }  # fmt: skip
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, broad, deny))
    for client in (owner, other):
        _denied(functools.partial(_tag, client, bucket, "pub/a", security="public", a="b"))
        assert _tags(owner, bucket, "pub/a") == {"before": "1"}
    _tag(other, bucket, "pub/a", security="private")
    assert _tags(owner, bucket, "pub/a") == {"security": "private"}
    _tag(owner, bucket, "pub/a", team="x")
    # Malformed tags: the same error as without the policy.
    assert _fails(lambda: _tag(other, bucket, "pub/a", **{"aws:x": "1"}))[0] == "InvalidTag"
    keys = {
        "Effect": "Deny", "Action": "s3:PutObjectTagging",
        "Condition": {"ForAnyValue:StringEquals": {"s3:RequestObjectTagKeys": ["secret"]}},
    }  # fmt: skip
    owner.put_bucket_policy(Bucket=bucket, Policy=_policy(bucket, broad, keys))
    _denied(lambda: _tag(other, bucket, "pub/a", secret="1", team="y"))
    assert _tags(owner, bucket, "pub/a") == {"team": "x"}
    _tag(other, bucket, "pub/a", team="y")
    assert _tags(owner, bucket, "pub/a") == {"team": "y"}
