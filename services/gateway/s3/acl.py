"""S3 access control lists: canned ACLs and grant headers, the AccessControlPolicy XML, and who
an ACL lets do what. Pure: no I/O (the access gate and the ?acl operations are `acl_ops`).

kvtier's model (`kvtier.common.v1.Acl`): the owner of a bucket is its tenant, whose canonical
user id is the tenant name; so is the owner of an object, but for one written by a user of
another tenant (through a WRITE grant or a bucket policy): that tenant owns it (S3's
ObjectWriter ownership; `object_acl`, the ACL's `owner`). The owner always has full control,
whatever the list says. Grantees are a tenant (CanonicalUser, `id="tenant"`), everyone
(AllUsers: signed or not) or every signed user of any tenant (AuthenticatedUsers). An empty
list is `private`. Grants by e-mail address (UnresolvableGrantByEmailAddress) and the
LogDelivery group (NotImplemented) are refused, as are ACLs of more than MAX_GRANTS grants.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import TypeAlias

from kvtier import errors, principal
from kvtier.proto.common.v1 import acl_pb2
from services.gateway.s3 import auth, s3errors, xmlio

ALL_USERS_URI = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTHENTICATED_USERS_URI = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
LOG_DELIVERY_URI = "http://acs.amazonaws.com/groups/s3/LogDelivery"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
#: S3 refuses ACLs of more grants.
MAX_GRANTS = 100

READ = acl_pb2.ACL_PERMISSION_READ
WRITE = acl_pb2.ACL_PERMISSION_WRITE
READ_ACP = acl_pb2.ACL_PERMISSION_READ_ACP
WRITE_ACP = acl_pb2.ACL_PERMISSION_WRITE_ACP
FULL_CONTROL = acl_pb2.ACL_PERMISSION_FULL_CONTROL
Permission: TypeAlias = acl_pb2.AclPermission.ValueType

#: S3's permission names.
PERMISSIONS: dict[str, Permission] = {
    "READ": READ, "WRITE": WRITE, "READ_ACP": READ_ACP, "WRITE_ACP": WRITE_ACP,
    "FULL_CONTROL": FULL_CONTROL,
}  # fmt: skip
PERMISSION_NAMES = {value: name for name, value in PERMISSIONS.items()}
#: The grant headers and the permission each grants.
GRANT_HEADERS: dict[str, Permission] = {
    "x-amz-grant-read": READ, "x-amz-grant-write": WRITE, "x-amz-grant-read-acp": READ_ACP,
    "x-amz-grant-write-acp": WRITE_ACP, "x-amz-grant-full-control": FULL_CONTROL,
}  # fmt: skip
_GROUPS = {
    ALL_USERS_URI: acl_pb2.GRANTEE_TYPE_ALL_USERS,
    AUTHENTICATED_USERS_URI: acl_pb2.GRANTEE_TYPE_AUTHENTICATED_USERS,
}
_URIS = {value: uri for uri, value in _GROUPS.items()}
#: The canned ACLs: the grants besides the owner's full control (the bucket-owner-* ones grant
#: the bucket's owner, when it is not the object's: `_BUCKET_OWNER`).
CANNED: dict[str, tuple[tuple[acl_pb2.GranteeType.ValueType, Permission], ...]] = {
    "private": (),
    "public-read": ((acl_pb2.GRANTEE_TYPE_ALL_USERS, READ),),
    "public-read-write": (
        (acl_pb2.GRANTEE_TYPE_ALL_USERS, READ),
        (acl_pb2.GRANTEE_TYPE_ALL_USERS, WRITE),
    ),
    "authenticated-read": ((acl_pb2.GRANTEE_TYPE_AUTHENTICATED_USERS, READ),),
    "bucket-owner-read": (),
    "bucket-owner-full-control": (),
}
#: What the bucket-owner-* canned ACLs grant the bucket's tenant on an object it does not own.
_BUCKET_OWNER: dict[str, Permission] = {
    "bucket-owner-read": READ,
    "bucket-owner-full-control": FULL_CONTROL,
}
#: Canned ACLs of S3 that name grantees kvtier does not have.
_UNSUPPORTED_CANNED = frozenset({"log-delivery-write", "aws-exec-read"})
#: Elements of an AccessControlList of MAX_GRANTS grants (Grant, Grantee, ID, DisplayName,
#: Permission each, and itself).
_MAX_ELEMENTS = 1 + 6 * MAX_GRANTS
#: One grantee of a grant header: `id="..."`, `uri="..."` or `emailAddress="..."`, the value
#: quoted or not (`id=...`, as the AWS CLI documents its --grant-* values, sent as they are).
_GRANTEE = re.compile(
    r'\s*(id|uri|emailAddress)\s*=\s*(?:"([^"]*)"|([^",\s][^",]*?))\s*(?:,|$)', re.IGNORECASE
)


def _invalid(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidArgument", message)


def _malformed() -> s3errors.S3Error:
    return s3errors.S3Error(
        "MalformedACLError",
        "The XML you provided was not well-formed or did not validate against our published schema",
    )


def _tenant_grant(tenant: str, permission: Permission) -> acl_pb2.AclGrant:
    try:
        principal.check_tenant(tenant)
    except errors.InvalidArgument:
        raise _invalid(f"Invalid id: {tenant!r} is not a tenant") from None
    return acl_pb2.AclGrant(
        grantee_type=acl_pb2.GRANTEE_TYPE_TENANT, tenant=tenant, permission=permission
    )


def _group_grant(uri: str, permission: Permission) -> acl_pb2.AclGrant:
    if uri == LOG_DELIVERY_URI:
        raise s3errors.S3Error("NotImplemented", "the LogDelivery group is not supported")
    if uri not in _GROUPS:
        raise _invalid(f"Invalid group uri: {uri}")
    return acl_pb2.AclGrant(grantee_type=_GROUPS[uri], permission=permission)


def _by_email() -> s3errors.S3Error:
    return s3errors.S3Error(
        "UnresolvableGrantByEmailAddress",
        "The e-mail address you provided does not match any account on record.",
    )


def canned(name: str, owner: str, bucket_owner: str = "") -> acl_pb2.Acl:
    """The ACL of a canned ACL name for a resource of tenant owner (its full control listed
    first, as S3 lists it) in a bucket of tenant bucket_owner (bucket-owner-read and
    bucket-owner-full-control grant it READ or FULL_CONTROL when it is not owner);
    InvalidArgument for an unknown name, NotImplemented for S3's log-delivery-write and
    aws-exec-read."""
    if name in _UNSUPPORTED_CANNED:
        raise s3errors.S3Error("NotImplemented", f"the canned ACL {name} is not supported")
    if name not in CANNED:
        raise _invalid(f"Invalid canned ACL: {name!r}")
    out = acl_pb2.Acl(grants=[_tenant_grant(owner, FULL_CONTROL)])
    for grantee, permission in CANNED[name]:
        out.grants.append(acl_pb2.AclGrant(grantee_type=grantee, permission=permission))
    if name in _BUCKET_OWNER and bucket_owner and bucket_owner != owner:
        out.grants.append(_tenant_grant(bucket_owner, _BUCKET_OWNER[name]))
    return out


def parse_grantees(value: str, permission: Permission) -> list[acl_pb2.AclGrant]:
    """The grants of one x-amz-grant-* header (`id="t", uri="..."`, comma-separated):
    InvalidArgument when malformed, UnresolvableGrantByEmailAddress for e-mail grantees."""
    grants: list[acl_pb2.AclGrant] = []
    pos, text = 0, value.strip()
    while pos < len(text):
        found = _GRANTEE.match(text, pos)
        if found is None:
            raise _invalid(f"Invalid grant header value: {value!r}")
        kind, who = found[1].lower(), found[2] if found[2] is not None else found[3]
        if kind == "emailaddress":
            raise _by_email()
        grants.append(
            _tenant_grant(who, permission) if kind == "id" else _group_grant(who, permission)
        )
        pos = found.end()
    if not grants:
        raise _invalid(f"Invalid grant header value: {value!r}")
    return grants


def has_acl_headers(headers: Mapping[str, str]) -> bool:
    """Whether a request sets an ACL with headers (x-amz-acl or x-amz-grant-*)."""
    return "x-amz-acl" in headers or any(name in headers for name in GRANT_HEADERS)


def from_headers(
    headers: Mapping[str, str], owner: str, bucket_owner: str = ""
) -> acl_pb2.Acl | None:
    """The ACL a request's headers set (None: none set) on a resource of owner in a bucket of
    bucket_owner (`canned`): x-amz-acl, or the x-amz-grant-* headers (InvalidRequest for both
    at once). headers: case-insensitive (aiohttp's)."""
    grant_headers = [(name, headers[name]) for name in GRANT_HEADERS if name in headers]
    if "x-amz-acl" in headers:
        if grant_headers:
            raise s3errors.S3Error(
                "InvalidRequest", "Specifying both Canned ACLs and Header Grants is not allowed"
            )
        return canned(headers["x-amz-acl"].strip(), owner, bucket_owner)
    if not grant_headers:
        return None
    out = acl_pb2.Acl()
    for name, value in grant_headers:
        out.grants.extend(parse_grantees(value, GRANT_HEADERS[name]))
    return _bounded(out)


def writer(who: auth.Principal, bucket_owner: str) -> str:
    """The tenant owning an object who writes into a bucket of bucket_owner: who's own tenant
    when it is a signed user who may not use the bucket (admitted by a WRITE grant or a
    bucket policy: S3's ObjectWriter ownership); else the bucket's tenant (its users and
    admins, and anonymous writers, whom kvtier has no owner for)."""
    if who.anonymous or who.may_use(bucket_owner):
        return bucket_owner
    return who.tenant


def object_acl(headers: Mapping[str, str], bucket_owner: str, owner: str) -> acl_pb2.Acl | None:
    """The ACL of an object a request writes, owned by owner (`writer`), in a bucket of
    bucket_owner: from_headers relative to owner, recorded in the ACL's `owner` when it is
    not the bucket's tenant (then an ACL even without headers: private, owner's)."""
    wanted = from_headers(headers, owner, bucket_owner)
    if owner == bucket_owner:
        return wanted
    out = wanted if wanted is not None else acl_pb2.Acl()
    out.owner = owner
    return out


def owner_of(acl: acl_pb2.Acl, bucket_owner: str) -> str:
    """The owner of a resource with this ACL in a bucket of bucket_owner."""
    return acl.owner or bucket_owner


def _bounded(acl: acl_pb2.Acl) -> acl_pb2.Acl:
    if len(acl.grants) > MAX_GRANTS:
        raise _invalid(f"An ACL may hold {MAX_GRANTS} grants at most")
    return acl


def is_private(acl: acl_pb2.Acl, owner: str) -> bool:
    """Whether an ACL grants nothing to anyone but the owner."""
    return all(
        g.grantee_type == acl_pb2.GRANTEE_TYPE_TENANT and g.tenant == owner for g in acl.grants
    )


def allows(acl: acl_pb2.Acl, owner: str, who: auth.Principal, permission: Permission) -> bool:
    """Whether who may do what permission names on a resource of tenant owner with this ACL:
    the owner's users and admins always; others when a grant to them (their tenant, every
    signed user, everyone) names the permission or FULL_CONTROL."""
    if not who.anonymous and who.may_use(owner):
        return True
    for grant in acl.grants:
        if grant.permission not in (permission, FULL_CONTROL):
            continue
        kind = grant.grantee_type
        if kind == acl_pb2.GRANTEE_TYPE_ALL_USERS:
            return True
        if who.anonymous:
            continue
        if kind == acl_pb2.GRANTEE_TYPE_AUTHENTICATED_USERS:
            return True
        if kind == acl_pb2.GRANTEE_TYPE_TENANT and grant.tenant == who.tenant:
            return True
    return False


# The AccessControlPolicy document.


def shown_grants(acl: acl_pb2.Acl, owner: str) -> list[acl_pb2.AclGrant]:
    """The grants GetBucketAcl / GetObjectAcl list: group grants first, then the tenants', each
    kind in the order set (as Ceph RGW lists them and s3-tests expects; S3 documents no order,
    an ACL being a set). An unset ACL lists the owner's full control, which it always has; one
    set with no grant at all (`no_grants`) lists none, as S3 does."""
    if not acl.grants:
        return [] if acl.no_grants else [_tenant_grant(owner, FULL_CONTROL)]
    groups = [g for g in acl.grants if g.grantee_type != acl_pb2.GRANTEE_TYPE_TENANT]
    return groups + [g for g in acl.grants if g.grantee_type == acl_pb2.GRANTEE_TYPE_TENANT]


def policy_xml(acl: acl_pb2.Acl, owner: str) -> bytes:
    """GetBucketAcl / GetObjectAcl: the owner (id and display name: the tenant) and the grants
    (`shown_grants`)."""
    root = ET.Element("AccessControlPolicy", {"xmlns": xmlio.NS, "xmlns:xsi": _XSI})
    holder = ET.SubElement(root, "Owner")
    ET.SubElement(holder, "ID").text = owner
    ET.SubElement(holder, "DisplayName").text = owner
    listed = ET.SubElement(root, "AccessControlList")
    for grant in shown_grants(acl, owner):
        element = ET.SubElement(listed, "Grant")
        if grant.grantee_type == acl_pb2.GRANTEE_TYPE_TENANT:
            grantee = ET.SubElement(element, "Grantee", {"xsi:type": "CanonicalUser"})
            ET.SubElement(grantee, "ID").text = grant.tenant
            ET.SubElement(grantee, "DisplayName").text = grant.tenant
        else:
            grantee = ET.SubElement(element, "Grantee", {"xsi:type": "Group"})
            ET.SubElement(grantee, "URI").text = _URIS[grant.grantee_type]
        ET.SubElement(element, "Permission").text = PERMISSION_NAMES[grant.permission]
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def parse_policy(body: bytes, owner: str) -> acl_pb2.Acl:
    """PutBucketAcl / PutObjectAcl's AccessControlPolicy: MalformedACLError when it is not one
    (no Owner, a grant without grantee or permission), AccessDenied when its Owner is not the
    resource's owner, InvalidArgument for an unknown id or group. The grantee's kind follows
    what it holds (ID, URI or EmailAddress), the xsi:type attribute aside."""
    owners: list[str] = []
    grants: list[acl_pb2.AclGrant] = []

    def take(child: ET.Element) -> None:
        if child.tag == "Owner":
            owners.append((child.findtext("ID") or "").strip())
        elif child.tag == "AccessControlList":
            for grant in child:
                if grant.tag != "Grant":
                    raise _malformed()
                grants.append(_grant(grant))
                if len(grants) > MAX_GRANTS:
                    raise _invalid(f"An ACL may hold {MAX_GRANTS} grants at most")
        else:
            raise _malformed()

    try:
        root = xmlio.parse_children(body, take, max_children=2, max_child_elements=_MAX_ELEMENTS)
    except s3errors.S3Error as exc:
        if exc.code == "MalformedXML":
            raise _malformed() from None
        raise
    if root != "AccessControlPolicy" or len(owners) != 1:
        raise _malformed()
    if owners[0] != owner:
        raise s3errors.S3Error("AccessDenied", "The owner of an ACL cannot be changed")
    return acl_pb2.Acl(grants=grants, no_grants=not grants)


def _grant(element: ET.Element) -> acl_pb2.AclGrant:
    grantee, name = element.find("Grantee"), (element.findtext("Permission") or "").strip()
    if grantee is None or name not in PERMISSIONS:
        raise _malformed()
    permission = PERMISSIONS[name]
    tenant, uri = grantee.findtext("ID"), grantee.findtext("URI")
    if grantee.find("EmailAddress") is not None:
        raise _by_email()
    if tenant is not None and uri is None:
        return _tenant_grant(tenant.strip(), permission)
    if uri is not None and tenant is None:
        return _group_grant(uri.strip(), permission)
    raise _malformed()
