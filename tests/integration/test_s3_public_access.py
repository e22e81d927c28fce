"""S3 Block Public Access against the shared dev cluster, with boto3: Put/Get/Delete
PublicAccessBlock (404 NoSuchPublicAccessBlockConfiguration without one, MalformedXML), only
the bucket's tenant reaching it, BlockPublicAcls refusing public ACLs (canned, grant headers,
an AccessControlPolicy body) and IgnorePublicAcls closing a public-read bucket and object to
anonymous and other tenants' reads. The flags' decisions in detail: tests/unit/
test_s3_public_access.py."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from botocore.exceptions import ClientError

from services.gateway.s3 import acl
from tests.integration import s3_cluster
from tests.integration.s3_cluster import s3_cluster as s3_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration

Info = dict[str, Any]
OWNER, OTHER = "pab-a", "pab-b"
ALL_ON = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": False,
}


def _fails(call: Callable[[], Any]) -> tuple[str, int]:
    with pytest.raises(ClientError) as failed:
        call()
    error = failed.value.response
    return error["Error"].get("Code", ""), error["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture(scope="module")
def owner(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A plain user of tenant pab-a: owns every bucket here."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OWNER))


@pytest.fixture(scope="module")
def other(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """A user of another tenant."""
    return s3_cluster.client(s3_cluster_fixture, *s3_cluster.add_user(s3_cluster_fixture, OTHER))


@pytest.fixture(scope="module")
def anon(s3_cluster_fixture: Info) -> Any:  # noqa: F811
    """An unsigned boto3 client."""
    return s3_cluster.anonymous(s3_cluster_fixture)


def test_put_get_delete_and_only_the_owner(owner: Any, other: Any, anon: Any) -> None:
    owner.create_bucket(Bucket="pab-conf", ACL="public-read-write")
    missing = ("NoSuchPublicAccessBlockConfiguration", 404)
    assert _fails(lambda: owner.get_public_access_block(Bucket="pab-conf")) == missing
    owner.put_public_access_block(Bucket="pab-conf", PublicAccessBlockConfiguration=ALL_ON)
    got = owner.get_public_access_block(Bucket="pab-conf")["PublicAccessBlockConfiguration"]
    assert got == ALL_ON
    # Another tenant and anonymous requests may not read, change or delete it, though the
    # bucket's ACL grants everyone read and write.
    for who in (other, anon):
        get, put = who.get_public_access_block, who.put_public_access_block
        assert _fails(functools.partial(get, Bucket="pab-conf"))[1] == 403
        assert (
            _fails(functools.partial(put, Bucket="pab-conf", PublicAccessBlockConfiguration={}))[1]
            == 403
        )
        assert (
            _fails(functools.partial(who.delete_public_access_block, Bucket="pab-conf"))[1] == 403
        )
    got = owner.get_public_access_block(Bucket="pab-conf")["PublicAccessBlockConfiguration"]
    assert got == ALL_ON
    deleted = owner.delete_public_access_block(Bucket="pab-conf")
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert _fails(lambda: owner.get_public_access_block(Bucket="pab-conf")) == missing

    # A malformed document stores nothing.
    def bad_body(request: Any, **_: Any) -> None:
        # Replaced after botocore computed its checksum: replace that too (else BadDigest).
        request.data = b"<PublicAccessBlockConfiguration><BlockPublicAcls>maybe"
        for name in ("Content-MD5", "x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm"):
            if name in request.headers:
                del request.headers[name]
        request.headers["Content-MD5"] = base64.b64encode(
            hashlib.md5(request.data).digest()
        ).decode()

    owner.meta.events.register_first("before-sign.s3.PutPublicAccessBlock", bad_body)
    try:
        call = owner.put_public_access_block
        conf = {"BlockPublicAcls": True}
        assert _fails(lambda: call(Bucket="pab-conf", PublicAccessBlockConfiguration=conf)) == (
            "MalformedXML",
            400,
        )
    finally:
        owner.meta.events.unregister("before-sign.s3.PutPublicAccessBlock", bad_body)
    assert _fails(lambda: owner.get_public_access_block(Bucket="pab-conf")) == missing


def test_block_public_acls(owner: Any, s3_cluster_fixture: Info) -> None:  # noqa: F811
    info = s3_cluster_fixture
    owner.create_bucket(Bucket="pab-block")
    conf = {"BlockPublicAcls": True}
    owner.put_public_access_block(Bucket="pab-block", PublicAccessBlockConfiguration=conf)
    denied = ("AccessDenied", 403)
    for canned in ("public-read", "public-read-write", "authenticated-read"):
        put_acl = functools.partial(owner.put_bucket_acl, Bucket="pab-block", ACL=canned)
        assert _fails(put_acl) == denied
        put = functools.partial(owner.put_object, Bucket="pab-block", Key="k", Body=b"x")
        assert _fails(functools.partial(put, ACL=canned)) == denied
    everyone = f'uri="{acl.ALL_USERS_URI}"'
    assert _fails(lambda: owner.put_bucket_acl(Bucket="pab-block", GrantRead=everyone)) == denied
    owner.put_object(Bucket="pab-block", Key="k", Body=b"x", ACL="private")
    policy = owner.get_object_acl(Bucket="pab-block", Key="k")
    public_body = {
        "Owner": policy["Owner"],
        "Grants": [
            {"Grantee": {"Type": "Group", "URI": acl.AUTHENTICATED_USERS_URI}, "Permission": "READ"}
        ],
    }
    call = owner.put_object_acl
    assert _fails(lambda: call(Bucket="pab-block", Key="k", AccessControlPolicy=public_body)) == (
        denied
    )
    # A POST form's acl field too (and its private one is stored).
    for canned, status in (("public-read", 403), ("private", 204)):
        post = owner.generate_presigned_post(
            "pab-block", "form", Fields={"acl": canned}, Conditions=[{"acl": canned}]
        )
        form = [*post["fields"].items(), ("file", ("f", b"form"))]
        body, content_type = urllib3.encode_multipart_formdata(form)
        pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=info["ca_file"])
        sent = pool.request("POST", post["url"], body=body, headers={"Content-Type": content_type})
        assert sent.status == status, sent.data
        if status == 403:
            assert _fails(lambda: owner.head_object(Bucket="pab-block", Key="form"))[1] == 404
    # Nothing public was set; private ACLs and grants to a tenant still are.
    assert owner.get_object_acl(Bucket="pab-block", Key="k")["Grants"] == policy["Grants"]
    owner.put_bucket_acl(Bucket="pab-block", GrantRead=f'id="{OTHER}"')
    owner.put_bucket_acl(Bucket="pab-block", ACL="private")


def test_ignore_public_acls_closes_a_public_read_bucket(owner: Any, other: Any, anon: Any) -> None:
    owner.create_bucket(Bucket="pab-ignore", ACL="public-read")
    owner.put_object(Bucket="pab-ignore", Key="k", Body=b"public", ACL="public-read")
    for who in (anon, other):
        assert [o["Key"] for o in who.list_objects_v2(Bucket="pab-ignore")["Contents"]] == ["k"]
        assert who.get_object(Bucket="pab-ignore", Key="k")["Body"].read() == b"public"
    conf = {"IgnorePublicAcls": True}
    owner.put_public_access_block(Bucket="pab-ignore", PublicAccessBlockConfiguration=conf)
    for who in (anon, other):
        assert _fails(functools.partial(who.list_objects_v2, Bucket="pab-ignore"))[1] == 403
        get = functools.partial(who.get_object, Bucket="pab-ignore", Key="k")
        assert _fails(get) == ("AccessDenied", 403)
    # Setting a public ACL is still allowed (not blocked), and still ignored.
    owner.put_bucket_acl(Bucket="pab-ignore", ACL="public-read")
    assert _fails(lambda: anon.get_object(Bucket="pab-ignore", Key="k"))[1] == 403
    assert owner.get_object(Bucket="pab-ignore", Key="k")["Body"].read() == b"public"
    # Deleting the configuration opens the bucket again.
    owner.delete_public_access_block(Bucket="pab-ignore")
    assert anon.get_object(Bucket="pab-ignore", Key="k")["Body"].read() == b"public"
