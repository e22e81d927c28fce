"""S3 Block Public Access, the pure parts: the PublicAccessBlockConfiguration document (both
ways), what each flag does in the ACL gate's decision (`_decide`) and to ACLs being set,
and that only the bucket's tenant reaches the ?publicAccessBlock operations (the operations on
a real cluster: tests/integration/test_s3_public_access.py)."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier import errors
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front
from services.gateway.s3 import acl, acl_ops, auth, public_access, s3errors, server

OWNER = "acme"
OWNER_USER = auth.Principal("AKOWNER", OWNER, "owner")
OTHER = auth.Principal("AKOTHER", "globex", "other")
ANON = auth.ANONYMOUS
NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _bucket(bucket_acl: str = "private", **flags: bool) -> metadata_pb2.BucketInfo:
    info = metadata_pb2.BucketInfo(name="b", tenant=OWNER, acl=acl.canned(bucket_acl, OWNER))
    if flags:
        info.public_access_block.CopyFrom(metadata_pb2.PublicAccessBlock(configured=True, **flags))
    return info


def _decide(
    op: str, who: auth.Principal, headers: CIMultiDictProxy[str], info: metadata_pb2.BucketInfo
) -> front.Admission | None:
    """The gate's decision on a request of no key nor query, from no address in particular."""
    return acl_ops._decide(op, who, headers, info, acl_ops._Seen("", {}, ""))


def _code(call: object) -> str:
    assert callable(call)
    with pytest.raises(s3errors.S3Error) as failed:
        call()
    return failed.value.code


def test_parse_and_render() -> None:
    body = (
        b'<PublicAccessBlockConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<BlockPublicAcls>true</BlockPublicAcls><IgnorePublicAcls>TRUE</IgnorePublicAcls>"
        b"<BlockPublicPolicy>false</BlockPublicPolicy></PublicAccessBlockConfiguration>"
    )
    got = public_access.parse(body)
    assert (got.configured, got.block_public_acls, got.ignore_public_acls) == (True, True, True)
    assert (got.block_public_policy, got.restrict_public_buckets) == (False, False)
    again = public_access.parse(public_access.render(got))
    assert again == got
    assert b"<RestrictPublicBuckets>false</RestrictPublicBuckets>" in public_access.render(got)
    # An empty document is a configuration of four false flags, not none.
    assert public_access.parse(b"<PublicAccessBlockConfiguration/>").configured


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<PublicAccessBlockConfiguration><BlockPublicAcls>yes</BlockPublicAcls>"
        b"</PublicAccessBlockConfiguration>",
        b"<PublicAccessBlockConfiguration><BlockPublicAcl>true</BlockPublicAcl>"
        b"</PublicAccessBlockConfiguration>",
        b"<PublicAccessBlockConfiguration><BlockPublicAcls>true</BlockPublicAcls>"
        b"<BlockPublicAcls>false</BlockPublicAcls></PublicAccessBlockConfiguration>",
        b"<PublicAccessBlock><BlockPublicAcls>true</BlockPublicAcls></PublicAccessBlock>",
        b"<PublicAccessBlockConfiguration><BlockPublicAcls>true",
    ],
)
def test_malformed_documents(body: bytes) -> None:
    assert _code(lambda: public_access.parse(body)) == "MalformedXML"


def test_flags_of_a_bucket_without_a_configuration_are_off() -> None:
    deleted = _bucket()
    deleted.public_access_block.CopyFrom(
        metadata_pb2.PublicAccessBlock(configured=False, block_public_policy=True)
    )
    for info in (_bucket(), deleted):
        assert not public_access.blocks_public_policy(info)
        assert not public_access.restricts_public_buckets(info)
    assert public_access.blocks_public_policy(_bucket(block_public_policy=True))
    assert public_access.restricts_public_buckets(_bucket(restrict_public_buckets=True))


def test_ignore_public_acls_denies_anonymous_reads_of_a_public_read_bucket() -> None:
    open_info, ignoring = _bucket("public-read"), _bucket("public-read", ignore_public_acls=True)
    assert _decide("ListObjects", ANON, NO_HEADERS, open_info) is not None
    assert _decide("ListObjects", OTHER, NO_HEADERS, open_info) is not None
    for who in (ANON, OTHER):
        assert _code(functools.partial(_decide, "ListObjects", who, NO_HEADERS, ignoring)) == (
            "AccessDenied"
        )
    # The owner is not admitted through ACLs: unaffected.
    assert _decide("ListObjects", OWNER_USER, NO_HEADERS, ignoring) is None


def test_ignore_public_acls_on_objects_keeps_tenant_grants() -> None:
    info = _bucket("public-read", ignore_public_acls=True)
    admission = _decide("GetObject", ANON, NO_HEADERS, info)
    assert admission is not None
    assert admission.check_object is not None
    assert not admission.may_list
    with pytest.raises(errors.PermissionDenied):
        admission.check_object(acl.canned("public-read", OWNER))
    granted = acl.canned("public-read", OWNER)
    granted.grants.append(
        acl_pb2.AclGrant(
            grantee_type=acl_pb2.GRANTEE_TYPE_TENANT, tenant=OTHER.tenant, permission=acl.READ
        )
    )
    other = _decide("GetObject", OTHER, NO_HEADERS, info)
    assert other is not None
    assert other.check_object is not None
    other.check_object(granted)  # a grant to a tenant is not public: still honoured
    with pytest.raises(errors.PermissionDenied):
        other.check_object(acl.canned("authenticated-read", OWNER))
    # The stored ACL itself is left alone.
    assert public_access.is_public(info.acl)


@pytest.mark.parametrize("op", ["PutObject", "CreateMultipartUpload", "PutBucketAcl"])
def test_block_public_acls_refuses_public_acl_headers(op: str) -> None:
    info = _bucket(block_public_acls=True)
    for canned in ("public-read", "public-read-write", "authenticated-read"):
        headers = CIMultiDictProxy(CIMultiDict({"x-amz-acl": canned}))
        decide = functools.partial(_decide, op, OWNER_USER, headers, info)
        assert _code(decide) == "AccessDenied"
    grant = CIMultiDictProxy(CIMultiDict({"x-amz-grant-read": f'uri="{acl.ALL_USERS_URI}"'}))
    assert _code(lambda: _decide(op, OWNER_USER, grant, info)) == "AccessDenied"
    private = CIMultiDictProxy(CIMultiDict({"x-amz-acl": "private"}))
    tenant = CIMultiDictProxy(CIMultiDict({"x-amz-grant-read": 'id="globex"'}))
    assert _decide(op, OWNER_USER, private, info) is None
    assert _decide(op, OWNER_USER, tenant, info) is None
    # Without the flag, as before.
    public = CIMultiDictProxy(CIMultiDict({"x-amz-acl": "public-read"}))
    assert _decide(op, OWNER_USER, public, _bucket(ignore_public_acls=True)) is None


def test_check_acl_of_bodies_and_forms() -> None:
    blocking = _bucket(block_public_acls=True)
    public = acl.parse_policy(
        b"<AccessControlPolicy><Owner><ID>acme</ID></Owner><AccessControlList><Grant>"
        b'<Grantee xsi:type="Group" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        b"<URI>http://acs.amazonaws.com/groups/global/AuthenticatedUsers</URI></Grantee>"
        b"<Permission>READ</Permission></Grant></AccessControlList></AccessControlPolicy>",
        OWNER,
    )
    assert _code(lambda: public_access.check_acl(blocking, public)) == "AccessDenied"
    public_access.check_acl(blocking, acl.canned("private", OWNER))
    public_access.check_acl(blocking, acl_pb2.Acl())  # a form without an acl field
    public_access.check_acl(blocking, None)
    public_access.check_acl(_bucket(), public)


@pytest.mark.parametrize(
    ("method", "op"),
    [
        ("GET", "GetPublicAccessBlock"),
        ("PUT", "PutPublicAccessBlock"),
        ("DELETE", "DeletePublicAccessBlock"),
    ],
)
def test_only_the_owner_reaches_the_configuration(method: str, op: str) -> None:
    s3 = server.S3Server(mock.Mock(), mock.Mock())
    assert s3.route(method, "b", "", {"publicAccessBlock": ""})[0] == op
    # Not even FULL_CONTROL granted to everyone opens it to another tenant or anonymous.
    info = _bucket()
    info.acl.grants.append(
        acl_pb2.AclGrant(grantee_type=acl_pb2.GRANTEE_TYPE_ALL_USERS, permission=acl.FULL_CONTROL)
    )
    for who in (OTHER, ANON):
        assert _code(functools.partial(_decide, op, who, NO_HEADERS, info)) == "AccessDenied"
    assert _decide(op, OWNER_USER, NO_HEADERS, info) is None
