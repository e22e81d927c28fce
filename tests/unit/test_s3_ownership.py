"""S3 Object Ownership (services/gateway/s3/ownership.py): the OwnershipControls document, the
x-amz-object-ownership header, who owns what a write stores, which ACLs a BucketOwnerEnforced
bucket refuses, and that the ACL gate counts no ACL grant there (acl_ops)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvtier import errors, principal
from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import access
from services.gateway.s3 import acl, acl_ops, auth, ownership, s3errors, xmlio

ALICE = auth.Principal("AKALICE", "acme", "alice")
EVE = auth.Principal("AKEVE", "evil", "eve")
DOC = (
    b'<OwnershipControls xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Rule><ObjectOwnership>%s</ObjectOwnership></Rule></OwnershipControls>"
)


def _code(call: object, *args: object) -> str:
    with pytest.raises(s3errors.S3Error) as failed:
        call(*args)  # type: ignore[operator]
    return failed.value.code


def test_document_round_trips_and_malformed_ones_are_refused() -> None:
    for name, setting in ownership.NAMES.items():
        assert ownership.parse(DOC % name.encode()) == setting
        assert ownership.parse(ownership.render(setting)) == setting
        assert f"<ObjectOwnership>{name}</ObjectOwnership>".encode() in ownership.render(setting)
    two_rules = (
        b"<OwnershipControls><Rule><ObjectOwnership>ObjectWriter</ObjectOwnership></Rule>"
        b"<Rule><ObjectOwnership>ObjectWriter</ObjectOwnership></Rule></OwnershipControls>"
    )
    for bad in (
        DOC % b"BucketOwnerSometimes",
        DOC % b"",
        b"<OwnershipControls></OwnershipControls>",
        b"<OwnershipControls><Rule></Rule></OwnershipControls>",
        b"<Other><Rule><ObjectOwnership>ObjectWriter</ObjectOwnership></Rule></Other>",
        two_rules,
        b"not xml",
    ):
        assert _code(ownership.parse, bad) == "MalformedXML", bad


def test_create_bucket_header() -> None:
    assert ownership.from_header(None, False) == ownership.UNSPECIFIED
    assert ownership.from_header("BucketOwnerPreferred", False) == ownership.PREFERRED
    assert ownership.from_header("BucketOwnerEnforced", True) == ownership.ENFORCED
    assert _code(ownership.from_header, "bucketownerenforced", False) == "InvalidArgument"
    # KV buckets have no ACLs: only the setting that says so.
    assert _code(ownership.from_header, "ObjectWriter", True) == "NotImplemented"
    assert _code(ownership.from_header, "BucketOwnerPreferred", True) == "NotImplemented"


def test_who_owns_what_a_write_stores() -> None:
    full = {"x-amz-acl": "bucket-owner-full-control"}
    private = {"x-amz-acl": "private"}
    for setting in (ownership.UNSPECIFIED, ownership.OBJECT_WRITER):
        assert ownership.object_owner(setting, full, "evil", "acme") == "evil"
    assert ownership.object_owner(ownership.PREFERRED, full, "evil", "acme") == "acme"
    assert ownership.object_owner(ownership.PREFERRED, private, "evil", "acme") == "evil"
    assert ownership.object_owner(ownership.PREFERRED, {}, "evil", "acme") == "evil"
    assert ownership.object_owner(ownership.ENFORCED, {}, "evil", "acme") == "acme"
    # What an object stored by another tenant's writer shows as its owner.
    written = acl_pb2.Acl(owner="evil")
    assert ownership.owner_for(ownership.OBJECT_WRITER, written, "acme") == "evil"
    assert ownership.owner_for(ownership.ENFORCED, written, "acme") == "acme"
    # Listings show the same from the recorded owner alone (the drives' index carries it).
    for setting in (ownership.UNSPECIFIED, ownership.OBJECT_WRITER, ownership.PREFERRED):
        shown = ownership.listed_owners(setting, "acme")
        assert (shown("evil"), shown("")) == (("evil", "evil"), ("acme", "acme"))
    assert ownership.listed_owners(ownership.ENFORCED, "acme")("evil") == ("acme", "acme")


def test_initiators_and_deleters_are_recorded_and_listed() -> None:
    """An upload's record names its initiator, a delete marker's ACL its deleter, when of
    another tenant than the bucket's (`access.writer_of`); ListMultipartUploads shows the
    initiator beside the owner, and an upload of older code (no initiator) by its owner."""
    user = principal.Principal(principal.Kind.USER, "AKEVE", tenant="evil")
    assert access.writer_of(user, "acme") == "evil"
    for own in (
        principal.Principal(principal.Kind.USER, "AKALICE", tenant="acme"),
        principal.Principal(principal.Kind.USER, "AKROOT", tenant="evil", is_admin=True),
        principal.Principal(principal.Kind.ANONYMOUS),
        principal.Principal(principal.Kind.SERVICE, "gw", role="gateway"),
    ):
        assert access.writer_of(own, "acme") == ""
    info = metadata_pb2.BucketInfo(name="b", tenant="acme")
    assert access.marker_owner(user, info) == "evil"
    info.ownership_controls.object_ownership = ownership.ENFORCED
    assert access.marker_owner(user, info) == ""
    page = pb.ListMultipartUploadsResponse()
    page.uploads.add(key="bfc", upload_id="1", owner="", initiator="evil")
    page.uploads.add(key="old", upload_id="2", owner="evil")
    page.uploads.add(key="own", upload_id="3")
    body = xmlio.list_uploads(
        bucket="b", page=page, params={}, enc=xmlio.Encoder(""),
        initiator=ownership.listed_owners(ownership.OBJECT_WRITER, "acme"),
        owner=ownership.listed_owners(ownership.PREFERRED, "acme"),
    )  # fmt: skip
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    shown = {
        u.findtext(f"{ns}Key"): (
            u.findtext(f"{ns}Initiator/{ns}ID"),
            u.findtext(f"{ns}Owner/{ns}ID"),
        )
        for u in ET.fromstring(body).iter(f"{ns}Upload")
    }
    assert shown == {"bfc": ("evil", "acme"), "old": ("evil", "evil"), "own": ("acme", "acme")}


def test_enforced_buckets_refuse_acls_but_the_owner_only_ones() -> None:
    enforced = ownership.ENFORCED
    ok: list[dict[str, str]] = [
        {},
        {"x-amz-acl": "bucket-owner-full-control"},
        {"x-amz-grant-full-control": 'id="acme"'},
    ]
    for headers in ok:
        ownership.check_write(enforced, CIMultiDict(headers), "acme")
    refused: list[dict[str, str]] = [
        {"x-amz-acl": "private"},
        {"x-amz-acl": "public-read"},
        {"x-amz-grant-read": 'id="evil"'},
        {"x-amz-grant-read": 'uri="http://acs.amazonaws.com/groups/global/AllUsers"'},
    ]
    for headers in refused:
        code = _code(ownership.check_write, enforced, CIMultiDict(headers), "acme")
        assert code == "AccessControlListNotSupported", headers
        for other in (ownership.UNSPECIFIED, ownership.OBJECT_WRITER, ownership.PREFERRED):
            ownership.check_write(other, CIMultiDict(headers), "acme")  # ACLs allowed there
    # A Put*Acl body: only an owner-only one.
    ownership.check_acl(enforced, acl.canned("private", "acme"), "acme")
    public = acl.canned("public-read", "acme")
    assert _code(ownership.check_acl, enforced, public, "acme") == "AccessControlListNotSupported"
    ownership.check_acl(ownership.PREFERRED, public, "acme")
    # Enforcing it on a bucket whose ACL grants others.
    for grants in (public, acl.canned("authenticated-read", "acme")):
        code = _code(ownership.check_bucket_acl, enforced, grants, "acme")
        assert code == "InvalidBucketAclWithObjectOwnership"
        ownership.check_bucket_acl(ownership.OBJECT_WRITER, grants, "acme")
    ownership.check_bucket_acl(enforced, acl.canned("private", "acme"), "acme")


NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _info(setting: metadata_pb2.ObjectOwnership.ValueType) -> metadata_pb2.BucketInfo:
    """A bucket of ALICE's tenant whose ACL lets anyone read and write."""
    info = metadata_pb2.BucketInfo(
        name="b", tenant="acme", acl=acl.canned("public-read-write", "acme")
    )
    info.ownership_controls.object_ownership = setting
    return info


def test_the_gate_counts_no_acl_grant_where_acls_are_disabled() -> None:
    seen = acl_ops._Seen("k", {}, "10.1.2.3")
    for op in ("PutObject", "ListObjects", "GetObject"):
        assert acl_ops._decide(op, EVE, NO_HEADERS, _info(ownership.OBJECT_WRITER), seen)
        with pytest.raises(s3errors.S3Error) as failed:
            acl_ops._decide(op, EVE, NO_HEADERS, _info(ownership.ENFORCED), seen)
        assert failed.value.code == "AccessDenied"
        assert acl_ops._decide(op, ALICE, NO_HEADERS, _info(ownership.ENFORCED), seen) is None
    # A version's own ACL granting READ counts no more, nor does its writer own it.
    readable = acl.canned("public-read", "evil")
    readable.owner = "evil"
    written = acl_ops._writer_owned(
        acl_ops._policy_admission(_info(ownership.ENFORCED), ALICE, "object", True),
        _info(ownership.ENFORCED),
        ALICE,
        acl.READ,
    )
    assert written.check_object is not None
    written.check_object(readable)  # the bucket's tenant owns it: no check refuses it
    mine = acl_ops._object_admission(_info(ownership.ENFORCED), EVE, acl.READ)
    assert mine.check_object is not None
    assert not mine.may_list
    with pytest.raises(errors.PermissionDenied):
        mine.check_object(readable)
    opened = acl_ops._object_admission(_info(ownership.OBJECT_WRITER), EVE, acl.READ)
    assert opened.check_object is not None
    assert opened.may_list
    opened.check_object(readable)
    # Preferred and ObjectWriter buckets: the writer still owns it, its ACL decides.
    owned = acl_ops._writer_owned(
        acl_ops._policy_admission(_info(ownership.PREFERRED), ALICE, "object", True),
        _info(ownership.PREFERRED),
        ALICE,
        acl.WRITE_ACP,
    )
    assert owned.check_object is not None
    with pytest.raises(errors.PermissionDenied):
        owned.check_object(readable)


def test_list_parts_needs_a_policy_allow() -> None:
    seen = acl_ops._Seen("k", {"uploadId": "u"}, "10.1.2.3")
    info = _info(ownership.UNSPECIFIED)
    with pytest.raises(s3errors.S3Error) as failed:  # a WRITE grant is not enough
        acl_ops._decide("ListParts", EVE, NO_HEADERS, info, seen)
    assert failed.value.code == "AccessDenied"
    info.policy.document = (
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",'
        ' "Action": "s3:ListMultipartUploadParts", "Resource": "arn:aws:s3:::b/*"}]}'
    )
    admitted = acl_ops._decide("ListParts", EVE, NO_HEADERS, info, seen)
    assert admitted is not None
    assert admitted.scope == "write"
