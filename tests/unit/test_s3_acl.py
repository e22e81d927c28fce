"""S3 ACLs, the pure parts: canned ACLs and grant headers, the AccessControlPolicy document (both
ways), who an ACL lets do what, and which operations a grant can ever open (the gate itself,
on a real cluster: tests/integration/test_s3_acl.py)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier import errors
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway.s3 import acl, acl_ops, auth, s3errors, server

OWNER = "acme"
OWNER_USER = auth.Principal("AKOWNER", OWNER, "owner")
OTHER = auth.Principal("AKOTHER", "globex", "other")
THIRD = auth.Principal("AKTHIRD", "initech", "third")
ADMIN = auth.Principal("AKADMIN", "ops", "admin", is_admin=True)
ANON = auth.ANONYMOUS
GROUP = acl_pb2.GRANTEE_TYPE_ALL_USERS
SIGNED = acl_pb2.GRANTEE_TYPE_AUTHENTICATED_USERS
TENANT = acl_pb2.GRANTEE_TYPE_TENANT


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def _grants(a: acl_pb2.Acl) -> list[tuple[int, str, str]]:
    return [(g.grantee_type, g.tenant, acl.PERMISSION_NAMES[g.permission]) for g in a.grants]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("private", []),
        ("public-read", [(GROUP, "", "READ")]),
        ("public-read-write", [(GROUP, "", "READ"), (GROUP, "", "WRITE")]),
        ("authenticated-read", [(SIGNED, "", "READ")]),
        ("bucket-owner-read", []),
        ("bucket-owner-full-control", []),
    ],
)
def test_canned_acls_list_the_owner_first(name: str, expected: list[tuple[int, str, str]]) -> None:
    assert _grants(acl.canned(name, OWNER)) == [(TENANT, OWNER, "FULL_CONTROL"), *expected]


def test_unknown_and_unsupported_canned_acls() -> None:
    with pytest.raises(s3errors.S3Error) as unknown:
        acl.canned("public", OWNER)
    assert (unknown.value.code, unknown.value.status) == ("InvalidArgument", 400)
    for name in ("log-delivery-write", "aws-exec-read"):
        with pytest.raises(s3errors.S3Error) as unsupported:
            acl.canned(name, OWNER)
        assert unsupported.value.status == 501


def test_grant_headers() -> None:
    got = acl.from_headers(
        _headers(
            x_amz_grant_read=f'id="globex", uri="{acl.ALL_USERS_URI}"',
            x_amz_grant_write_acp=f'uri="{acl.AUTHENTICATED_USERS_URI}"',
            x_amz_grant_full_control='ID="initech"',
        ),
        OWNER,
    )
    assert got is not None
    assert _grants(got) == [
        (TENANT, "globex", "READ"),
        (GROUP, "", "READ"),
        (SIGNED, "", "WRITE_ACP"),
        (TENANT, "initech", "FULL_CONTROL"),
    ]
    assert acl.from_headers(_headers(content_type="x/y"), OWNER) is None


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"x_amz_acl": "public-read", "x_amz_grant_read": 'id="globex"'}, "InvalidRequest"),
        ({"x_amz_grant_read": 'emailAddress="a@example.com"'}, "UnresolvableGrantByEmailAddress"),
        ({"x_amz_grant_read": "globex"}, "InvalidArgument"),
        ({"x_amz_grant_read": 'id="globex" uri="x"'}, "InvalidArgument"),
        ({"x_amz_grant_read": 'uri="http://example.com/everyone"'}, "InvalidArgument"),
        ({"x_amz_grant_read": 'id="not a tenant!"'}, "InvalidArgument"),
        ({"x_amz_grant_read": ""}, "InvalidArgument"),
        ({"x_amz_grant_read": f'uri="{acl.LOG_DELIVERY_URI}"'}, "NotImplemented"),
        ({"x_amz_acl": "nope"}, "InvalidArgument"),
    ],
)
def test_bad_acl_headers(headers: dict[str, str], code: str) -> None:
    with pytest.raises(s3errors.S3Error) as refused:
        acl.from_headers(_headers(**headers), OWNER)
    assert refused.value.code == code
    assert refused.value.status in (400, 501)


def test_too_many_grants() -> None:
    many = ", ".join(f'id="t{i}"' for i in range(acl.MAX_GRANTS + 1))
    with pytest.raises(s3errors.S3Error, match="grants at most"):
        acl.from_headers(_headers(x_amz_grant_read=many), OWNER)


def test_policy_document_round_trip() -> None:
    original = acl.canned("public-read-write", OWNER)
    original.grants.append(
        acl_pb2.AclGrant(grantee_type=TENANT, tenant="globex", permission=acl.READ)
    )
    original.grants.append(acl_pb2.AclGrant(grantee_type=SIGNED, permission=acl.READ_ACP))
    document = acl.policy_xml(original, OWNER)
    assert b"<Owner><ID>acme</ID><DisplayName>acme</DisplayName></Owner>" in document
    assert b'xsi:type="Group"' in document
    assert b'xsi:type="CanonicalUser"' in document
    assert acl.parse_policy(document, OWNER) == acl_pb2.Acl(
        grants=acl.shown_grants(original, OWNER)
    )


def test_grants_list_groups_first_then_tenants_each_in_order() -> None:
    """As Ceph RGW lists them (s3-tests' check_grants sorts by DisplayName when the first
    grant has one, which a group grant lacks: groups first, in the order set)."""
    original = acl.canned("public-read-write", OWNER)
    original.grants.append(
        acl_pb2.AclGrant(grantee_type=TENANT, tenant="globex", permission=acl.READ)
    )
    original.grants.append(acl_pb2.AclGrant(grantee_type=SIGNED, permission=acl.READ_ACP))
    shown = acl.parse_policy(acl.policy_xml(original, OWNER), OWNER)
    assert _grants(shown) == [
        (GROUP, "", "READ"),
        (GROUP, "", "WRITE"),
        (SIGNED, "", "READ_ACP"),
        (TENANT, OWNER, "FULL_CONTROL"),
        (TENANT, "globex", "READ"),
    ]


def test_an_empty_acl_shows_the_owners_full_control() -> None:
    document = acl.policy_xml(acl_pb2.Acl(), OWNER)
    parsed = acl.parse_policy(document, OWNER)
    assert _grants(parsed) == [(TENANT, OWNER, "FULL_CONTROL")]


def test_a_policy_of_no_grants_lists_none_and_keeps_the_owner_in() -> None:
    """S3 lists no grant once an AccessControlPolicy revoked them all (s3-tests'
    test_bucket_acl_revoke_all); the owner keeps full control all the same."""
    revoked = acl.parse_policy(_policy(OWNER, ""), OWNER)
    assert revoked.no_grants
    assert not revoked.grants
    assert b"<AccessControlList />" in acl.policy_xml(revoked, OWNER)
    assert acl.allows(revoked, OWNER, OWNER_USER, acl.FULL_CONTROL)
    assert not acl.allows(revoked, OWNER, ANON, acl.READ)
    assert acl.is_private(revoked, OWNER)


def _policy(owner: str, grants: str) -> bytes:
    return (
        '<AccessControlPolicy xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Owner><ID>{owner}</ID></Owner><AccessControlList>{grants}</AccessControlList>"
        "</AccessControlPolicy>"
    ).encode()


def _grant(grantee: str, permission: str) -> str:
    return f"<Grant><Grantee>{grantee}</Grantee><Permission>{permission}</Permission></Grant>"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "MalformedACLError"),
        (b"<AccessControlPolicy>", "MalformedACLError"),
        (b"<Other/>", "MalformedACLError"),
        (
            b"<AccessControlPolicy><AccessControlList/></AccessControlPolicy>",
            "MalformedACLError",
        ),  # no Owner
        (_policy(OWNER, _grant("<ID>globex</ID>", "SOMETIMES")), "MalformedACLError"),
        (_policy(OWNER, "<Grant><Permission>READ</Permission></Grant>"), "MalformedACLError"),
        (_policy(OWNER, _grant("<ID>x</ID><URI>y</URI>", "READ")), "MalformedACLError"),
        (_policy("globex", ""), "AccessDenied"),  # the owner cannot be changed
        (_policy(OWNER, _grant("<URI>http://example.com/g</URI>", "READ")), "InvalidArgument"),
        (
            _policy(OWNER, _grant("<EmailAddress>a@b.c</EmailAddress>", "READ")),
            "UnresolvableGrantByEmailAddress",
        ),
        (
            b'<!DOCTYPE x [<!ENTITY e "e">]><AccessControlPolicy/>',
            "MalformedACLError",
        ),
    ],
)
def test_bad_policy_documents(body: bytes, code: str) -> None:
    with pytest.raises(s3errors.S3Error) as refused:
        acl.parse_policy(body, OWNER)
    assert refused.value.code == code


def test_policy_grant_bound() -> None:
    grants = "".join(_grant(f"<ID>t{i}</ID>", "READ") for i in range(acl.MAX_GRANTS + 1))
    with pytest.raises(s3errors.S3Error) as refused:
        acl.parse_policy(_policy(OWNER, grants), OWNER)
    assert refused.value.code in ("InvalidArgument", "MalformedACLError")
    fits = "".join(_grant(f"<ID>t{i}</ID>", "READ") for i in range(acl.MAX_GRANTS))
    assert len(acl.parse_policy(_policy(OWNER, fits), OWNER).grants) == acl.MAX_GRANTS


def test_grantee_kind_follows_content_not_xsi_type() -> None:
    body = _policy(
        OWNER,
        '<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:type="CanonicalUser"><URI>{acl.ALL_USERS_URI}</URI></Grantee>'
        "<Permission>READ</Permission></Grant>",
    )
    assert _grants(acl.parse_policy(body, OWNER)) == [(GROUP, "", "READ")]


def test_evaluation() -> None:
    private = acl_pb2.Acl()
    for who in (OWNER_USER, ADMIN):
        for permission in acl.PERMISSIONS.values():
            assert acl.allows(private, OWNER, who, permission)
    for who in (OTHER, ANON):
        for permission in acl.PERMISSIONS.values():
            assert not acl.allows(private, OWNER, who, permission)
    public = acl.canned("public-read", OWNER)
    assert acl.allows(public, OWNER, ANON, acl.READ)
    assert acl.allows(public, OWNER, OTHER, acl.READ)
    assert not acl.allows(public, OWNER, ANON, acl.WRITE)
    assert not acl.allows(public, OWNER, OTHER, acl.READ_ACP)
    signed = acl.canned("authenticated-read", OWNER)
    assert acl.allows(signed, OWNER, OTHER, acl.READ)
    assert not acl.allows(signed, OWNER, ANON, acl.READ)
    # The owner's own grant (canned ACLs list it) gives nobody else anything.
    assert not acl.allows(acl.canned("private", OWNER), OWNER, OTHER, acl.READ)


def test_tenant_grants_and_full_control() -> None:
    granted = acl.from_headers(_headers(x_amz_grant_full_control='id="globex"'), OWNER)
    assert granted is not None
    for permission in acl.PERMISSIONS.values():
        assert acl.allows(granted, OWNER, OTHER, permission)
        assert not acl.allows(granted, OWNER, THIRD, permission)
        assert not acl.allows(granted, OWNER, ANON, permission)
    write_acp = acl.from_headers(_headers(x_amz_grant_write_acp='id="globex"'), OWNER)
    assert write_acp is not None
    assert acl.allows(write_acp, OWNER, OTHER, acl.WRITE_ACP)
    assert not acl.allows(write_acp, OWNER, OTHER, acl.READ)


def test_anonymous_principal_uses_nothing() -> None:
    assert ANON.anonymous
    assert not ANON.may_use("")
    assert not ANON.may_use(OWNER)
    assert server.kvtier_principal(ANON).authenticated is False


def test_is_private() -> None:
    assert acl.is_private(acl.canned("bucket-owner-full-control", OWNER), OWNER)
    assert not acl.is_private(acl.canned("authenticated-read", OWNER), OWNER)


def test_no_grant_ever_opens_configuration_or_deletion() -> None:
    """Only data, listing and ACL operations are grantable: the bucket's deletion, its
    configuration, an upload's parts, ListBuckets and CreateBucket stay the owner's. The
    bucket's READ lists uploads and versions too (S3 maps it to s3:ListBucketVersions and
    s3:ListBucketMultipartUploads besides s3:ListBucket)."""
    grantable = set(acl_ops.GRANTED)
    owner_only = {
        "DeleteBucket", "PutBucketCors", "DeleteBucketCors", "GetBucketCors",
        "PutBucketVersioning", "GetBucketVersioning", "ListParts",
        "ListBuckets", "CreateBucket", "GetBucketLocation", "PutBucketLifecycleConfiguration",
    }  # fmt: skip
    assert not grantable & owner_only
    for listing in ("ListObjects", "ListObjectVersions", "ListMultipartUploads"):
        assert acl_ops.GRANTED[listing] == ("read", acl.READ)
    routed = {op for _, (op, _) in server._routes()}
    assert grantable <= routed  # no stale names


def test_bucket_owner_canned_acls_grant_the_bucket_owner() -> None:
    """On an object another tenant wrote, bucket-owner-read / -full-control grant the bucket's
    owner (S3); on the bucket owner's own object they are `private`."""
    read = acl.canned("bucket-owner-read", "globex", OWNER)
    assert _grants(read) == [(TENANT, "globex", "FULL_CONTROL"), (TENANT, OWNER, "READ")]
    full = acl.canned("bucket-owner-full-control", "globex", OWNER)
    assert _grants(full) == [(TENANT, "globex", "FULL_CONTROL"), (TENANT, OWNER, "FULL_CONTROL")]
    assert _grants(acl.canned("bucket-owner-read", OWNER, OWNER)) == [
        (TENANT, OWNER, "FULL_CONTROL")
    ]
    assert _grants(acl.canned("public-read", "globex", OWNER)) == [
        (TENANT, "globex", "FULL_CONTROL"),
        (GROUP, "", "READ"),
    ]


def test_objects_belong_to_a_writer_of_another_tenant() -> None:
    assert acl.writer(OTHER, OWNER) == "globex"
    for who in (OWNER_USER, ADMIN, ANON):  # admins and anonymous writers: the bucket's
        assert acl.writer(who, OWNER) == OWNER
    assert acl.object_acl(_headers(), OWNER, OWNER) is None
    written = acl.object_acl(_headers(), OWNER, "globex")
    assert written is not None
    assert written.owner == "globex"
    assert not written.grants
    assert acl.owner_of(written, OWNER) == "globex"
    assert acl.allows(written, acl.owner_of(written, OWNER), OTHER, acl.FULL_CONTROL)
    assert not acl.allows(written, acl.owner_of(written, OWNER), OWNER_USER, acl.READ)
    assert acl.policy_xml(written, "globex").count(b"<ID>globex</ID>") == 2  # owner, its grant
    read = acl.object_acl(_headers(x_amz_acl="bucket-owner-read"), OWNER, "globex")
    assert read is not None
    assert read.owner == "globex"
    assert acl.allows(read, "globex", OWNER_USER, acl.READ)
    assert not acl.allows(read, "globex", OWNER_USER, acl.READ_ACP)


def test_grant_header_ids_may_be_unquoted() -> None:
    got = acl.from_headers(
        _headers(x_amz_grant_read=f"id=globex, uri={acl.ALL_USERS_URI},id = initech"), OWNER
    )
    assert got is not None
    assert _grants(got) == [
        (TENANT, "globex", "READ"),
        (GROUP, "", "READ"),
        (TENANT, "initech", "READ"),
    ]
    for bad in ("id=", "id=a b", 'id="a', "id=a,,"):
        with pytest.raises(s3errors.S3Error):
            acl.from_headers(_headers(x_amz_grant_read=bad), OWNER)


def test_a_writers_object_is_decided_by_its_acl_alone() -> None:
    """`acl_ops._writer_owned`: for the bucket's owner and through a policy's Allow alike, an
    object another tenant wrote admits only whom its own ACL grants, relative to its writer."""
    info = metadata_pb2.BucketInfo(name="b", tenant=OWNER)
    by_other = acl_pb2.Acl(owner="globex")
    owned = acl_pb2.Acl()

    def anything(object_acl: acl_pb2.Acl) -> None:
        pass  # a policy's Allow: the object's ACL adds nothing

    for who in (OWNER_USER, THIRD, ANON):
        base = front_mod.Admission("b", "object", check_object=anything, may_list=True)
        check = acl_ops._writer_owned(base, info, who, acl.READ).check_object
        assert check is not None
        check(owned)  # the bucket owner's object: the inner check (here: admit)
        with pytest.raises(errors.PermissionDenied):
            check(by_other)
    for who in (OTHER, ADMIN):
        check = acl_ops._writer_owned(
            front_mod.Admission("b", "object"), info, who, acl.WRITE_ACP
        ).check_object
        assert check is not None
        check(by_other)
    granted = acl_pb2.Acl(owner="globex", grants=[acl._tenant_grant(OWNER, acl.READ)])
    check = acl_ops._writer_owned(
        front_mod.Admission("b", "object"), info, OWNER_USER, acl.READ
    ).check_object
    assert check is not None
    check(granted)
    wrong = acl_ops._writer_owned(
        front_mod.Admission("b", "object"), info, OWNER_USER, acl.READ_ACP
    ).check_object
    assert wrong is not None
    with pytest.raises(errors.PermissionDenied):
        wrong(granted)


async def _no_user(access_key: str) -> tuple[auth.Principal, str] | None:
    return None


async def test_grants_to_tenants_without_users_are_invalid() -> None:
    known = frozenset({OWNER, "globex"})

    async def has_tenant(tenant: str) -> bool | None:
        return tenant in known

    async def unsure_tenant(tenant: str) -> bool | None:
        return None

    authenticator = auth.Authenticator(_no_user, tenants=has_tenant)
    grants = acl.from_headers(_headers(x_amz_grant_read='id="globex", id="nobody"'), OWNER)
    assert grants is not None
    with pytest.raises(s3errors.S3Error) as refused:
        await acl_ops.check_grantees(authenticator, grants, OWNER)
    assert (refused.value.code, refused.value.status) == ("InvalidArgument", 400)
    await acl_ops.check_grantees(authenticator, grants, OWNER, "nobody")  # owners need no user
    for unsure in (
        auth.Authenticator(_no_user),
        auth.Authenticator(_no_user, tenants=unsure_tenant),
    ):
        await acl_ops.check_grantees(unsure, grants, OWNER)  # no user watch (yet): not refused
    # Header grants of the operations that set an ACL; malformed ones left to the handler.
    headers = _headers(x_amz_grant_full_control='id="nobody"')
    for op in ("CreateBucket", "PutObject", "CreateMultipartUpload", "PutBucketAcl"):
        with pytest.raises(s3errors.S3Error):
            await acl_ops.check_header_grantees(authenticator, op, OWNER_USER, headers, OWNER)
    await acl_ops.check_header_grantees(authenticator, "GetObject", OWNER_USER, headers, OWNER)
    bad = _headers(x_amz_grant_read="nobody")
    await acl_ops.check_header_grantees(authenticator, "PutObject", OWNER_USER, bad, OWNER)
