"""S3 Object Ownership of a bucket: its document, CreateBucket's x-amz-object-ownership header,
and what each setting does. Pure: no I/O (the `?ownershipControls` operations,
PutBucketOwnershipControls, GetBucketOwnershipControls and DeleteBucketOwnershipControls, are
`ownership_ops`).

The setting is bucket configuration (`BucketInfo.ownership_controls`, set through the object
front as the Public Access Block is); only the bucket's tenant may read or change it (the ACL
gate admits no one else to these operations). The three settings, as AWS documents them:

- ObjectWriter (and no setting at all, kvtier's behaviour before it had the setting): the
  writer's tenant owns what it writes into another tenant's bucket (`acl.writer`).
- BucketOwnerPreferred: as ObjectWriter, but a write carrying the canned ACL
  bucket-owner-full-control (PutObject, CopyObject, CreateMultipartUpload) is owned by the
  bucket's tenant (`object_owner`).
- BucketOwnerEnforced: ACLs are disabled. The bucket's tenant owns every object, written
  before or after (`holder`); ACLs grant nothing to anyone (`acl_ops` evaluates none: only the
  bucket policy and the owner's own rights decide); setting an ACL other than
  bucket-owner-full-control or an owner-only equivalent is 400 AccessControlListNotSupported
  (`check_write`, `check_acl`), and enforcing it on a bucket whose ACL grants anyone else is
  400 InvalidBucketAclWithObjectOwnership.
  Reading ACLs still works (GetObjectAcl lists the bucket's tenant alone).

KV buckets have no ACLs and their tenant owns every object: BucketOwnerEnforced is what they
do, and is accepted; the two others are NotImplemented there.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import TypeAlias

from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import acl, s3errors, xmlio

Mode: TypeAlias = metadata_pb2.ObjectOwnership.ValueType

UNSPECIFIED: Mode = metadata_pb2.OBJECT_OWNERSHIP_UNSPECIFIED
OBJECT_WRITER: Mode = metadata_pb2.OBJECT_OWNERSHIP_OBJECT_WRITER
PREFERRED: Mode = metadata_pb2.OBJECT_OWNERSHIP_BUCKET_OWNER_PREFERRED
ENFORCED: Mode = metadata_pb2.OBJECT_OWNERSHIP_BUCKET_OWNER_ENFORCED
#: S3's names of the settings.
NAMES: dict[str, Mode] = {
    "ObjectWriter": OBJECT_WRITER,
    "BucketOwnerPreferred": PREFERRED,
    "BucketOwnerEnforced": ENFORCED,
}
_BY_MODE = {mode: name for name, mode in NAMES.items()}
#: The canned ACL that gives the bucket's tenant an object (BucketOwnerPreferred) and the one
#: an ACL-disabled bucket accepts.
OWNER_FULL_CONTROL = "bucket-owner-full-control"
#: CreateBucket's header naming the setting.
HEADER = "x-amz-object-ownership"


def mode(info: metadata_pb2.BucketInfo) -> Mode:
    """The bucket's setting (UNSPECIFIED: none)."""
    return info.ownership_controls.object_ownership


def enforced(info: metadata_pb2.BucketInfo) -> bool:
    """Whether the bucket's ACLs are disabled (BucketOwnerEnforced)."""
    return mode(info) == ENFORCED


def _not_supported() -> s3errors.S3Error:
    return s3errors.S3Error("AccessControlListNotSupported", "The bucket does not allow ACLs")


def object_owner(setting: Mode, headers: Mapping[str, str], writer: str, bucket_owner: str) -> str:
    """The tenant owning an object writer (`acl.writer`) writes with these headers into a
    bucket of bucket_owner with this setting."""
    if setting == ENFORCED:
        return bucket_owner
    if setting == PREFERRED and headers.get("x-amz-acl", "").strip() == OWNER_FULL_CONTROL:
        return bucket_owner
    return writer


def check_write(setting: Mode, headers: Mapping[str, str], bucket_owner: str) -> None:
    """AccessControlListNotSupported when a request's ACL headers set an ACL that a bucket with
    this setting refuses (BucketOwnerEnforced: anything but bucket-owner-full-control or grant
    headers naming the bucket's tenant alone). Malformed headers are left to the handler."""
    if setting != ENFORCED or not acl.has_acl_headers(headers):
        return
    if "x-amz-acl" in headers:
        if headers["x-amz-acl"].strip() != OWNER_FULL_CONTROL:
            raise _not_supported()
        return
    try:
        wanted = acl.from_headers(headers, bucket_owner)
    except s3errors.S3Error:
        return
    check_acl(setting, wanted, bucket_owner)


def check_acl(setting: Mode, wanted: acl_pb2.Acl | None, bucket_owner: str) -> None:
    """AccessControlListNotSupported when an ACL to set (None: none) grants anyone but the
    bucket's tenant in a bucket with this setting that disables ACLs."""
    if setting == ENFORCED and wanted is not None and not acl.is_private(wanted, bucket_owner):
        raise _not_supported()


def holder(info: metadata_pb2.BucketInfo, object_acl: acl_pb2.Acl) -> str:
    """The owner of an object with this ACL in the bucket (`owner_for`)."""
    return owner_for(mode(info), object_acl, info.tenant)


def owner_for(setting: Mode, object_acl: acl_pb2.Acl, bucket_owner: str) -> str:
    """The owner of an object (or upload) with this ACL in a bucket of bucket_owner with this
    setting: the bucket's tenant where ACLs are disabled (whoever wrote it), else
    `acl.owner_of`'s."""
    if setting == ENFORCED:
        return bucket_owner
    return acl.owner_of(object_acl, bucket_owner)


def listed(setting: Mode, recorded: str, bucket_owner: str) -> str:
    """The owner a listing shows of an entry whose ACL records `recorded` as its owner (the
    listing's `owner`, "" when unset): `owner_for` without the ACL (listings carry the
    recorded owner alone, from the drives' index)."""
    return bucket_owner if setting == ENFORCED else recorded or bucket_owner


def listed_owners(setting: Mode, bucket_owner: str) -> Callable[[str], tuple[str, str]]:
    """(canonical id, display name) of a listed entry's owner (`listed`) from its recorded
    owner, as S3 lists owners: the tenant's name both (`auth.Principal.owner`)."""

    def owner(recorded: str) -> tuple[str, str]:
        tenant = listed(setting, recorded, bucket_owner)
        return tenant, tenant

    return owner


def shown_acl(info: metadata_pb2.BucketInfo, object_acl: acl_pb2.Acl) -> acl_pb2.Acl:
    """The ACL GetObjectAcl lists: the stored one, or none where ACLs are disabled."""
    return acl_pb2.Acl() if enforced(info) else object_acl


def from_header(value: str | None, kv: bool) -> Mode:
    """CreateBucket's x-amz-object-ownership (None: absent, UNSPECIFIED); InvalidArgument for
    an unknown value, NotImplemented for a setting other than BucketOwnerEnforced on a KV
    bucket."""
    if value is None:
        return UNSPECIFIED
    setting = NAMES.get(value.strip())
    if setting is None:
        raise s3errors.S3Error("InvalidArgument", f"Invalid x-amz-object-ownership: {value!r}")
    check_kind(setting, kv)
    return setting


def check_kind(setting: Mode, kv: bool) -> None:
    if kv and setting != ENFORCED:
        raise s3errors.S3Error(
            "NotImplemented", "KV buckets have no ACLs: BucketOwnerEnforced only"
        )


def check_bucket_acl(setting: Mode, bucket_acl: acl_pb2.Acl, bucket_owner: str) -> None:
    """InvalidBucketAclWithObjectOwnership when this setting disables ACLs and the bucket's
    ACL grants anyone but its tenant."""
    if setting == ENFORCED and not acl.is_private(bucket_acl, bucket_owner):
        raise s3errors.S3Error(
            "InvalidBucketAclWithObjectOwnership",
            "Bucket cannot have ACLs set with ObjectOwnership's BucketOwnerEnforced setting",
        )


def parse(body: bytes) -> Mode:
    """An OwnershipControls document: exactly one Rule holding exactly one ObjectOwnership of
    the three names. MalformedXML otherwise."""
    found: list[Mode] = []

    def take(child: ET.Element) -> None:
        if child.tag != "Rule" or len(child) != 1 or child[0].tag != "ObjectOwnership":
            raise s3errors.S3Error("MalformedXML", f"unexpected {child.tag} in the document")
        setting = NAMES.get((child[0].text or "").strip())
        if setting is None or len(child[0]):
            raise s3errors.S3Error("MalformedXML", "ObjectOwnership: an unknown value")
        found.append(setting)

    root = xmlio.parse_children(body, take, max_children=1, max_child_elements=2)
    if root != "OwnershipControls" or len(found) != 1:
        raise s3errors.S3Error("MalformedXML", "expected OwnershipControls with one Rule")
    return found[0]


def render(setting: Mode) -> bytes:
    """GetBucketOwnershipControls' document."""
    root = ET.Element("OwnershipControls", {"xmlns": xmlio.NS})
    rule = ET.SubElement(root, "Rule")
    ET.SubElement(rule, "ObjectOwnership").text = _BY_MODE[setting]
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def config(setting: Mode) -> metadata_pb2.SetBucketConfigRequest:
    """The SetBucketConfigRequest storing the setting (UNSPECIFIED: removing it)."""
    return metadata_pb2.SetBucketConfigRequest(
        ownership_controls=metadata_pb2.OwnershipControls(object_ownership=setting)
    )
