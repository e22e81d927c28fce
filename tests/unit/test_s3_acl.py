"""S3 ACLs, the pure parts: canned ACLs and grant headers, the AccessControlPolicy document (both
ways), who an ACL lets do what, and which operations a grant can ever open (the gate itself,
on a real cluster: tests/integration/test_s3_acl.py)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier.proto.common.v1 import acl_pb2
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
    configuration, multipart listings, ListBuckets and CreateBucket stay the owner's."""
    grantable = set(acl_ops.GRANTED)
    owner_only = {
        "DeleteBucket", "PutBucketCors", "DeleteBucketCors", "GetBucketCors",
        "PutBucketVersioning", "GetBucketVersioning", "ListMultipartUploads", "ListParts",
        "ListBuckets", "CreateBucket", "GetBucketLocation", "PutBucketLifecycleConfiguration",
    }  # fmt: skip
    assert not grantable & owner_only
    routed = {op for _, (op, _) in server._routes()}
    assert grantable <= routed  # no stale names
