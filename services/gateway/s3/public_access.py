"""S3 Block Public Access on a bucket: PutPublicAccessBlock, GetPublicAccessBlock and
DeletePublicAccessBlock (`?publicAccessBlock`), and what its four flags do.

The configuration is bucket configuration (`BucketInfo.public_access_block`, set through the
object front as CORS is); only the bucket's tenant may read or change it (the ACL gate admits
no one else to these operations). The flags only ever narrow access:

- BlockPublicAcls: setting a public ACL (a grant to AllUsers or AuthenticatedUsers: canned
  public-read, public-read-write, authenticated-read or such grants) on the bucket or an
  object of it is AccessDenied: PutBucketAcl, PutObjectAcl, and PutObject (copies too),
  CreateMultipartUpload and POST forms that carry one. ACLs already set stay as they are.
- IgnorePublicAcls: public grants admit no one (`acl_ops` evaluates ACLs without them); the
  grants stay stored and listed.
- BlockPublicPolicy and RestrictPublicBuckets: for bucket policies (`blocks_public_policy`,
  `restricts_public_buckets`: their evaluation asks).

There is no account-level configuration: a bucket without one has no block (S3's default for
new buckets since 2023 is all four on at the account, which kvtier does not have).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from aiohttp import web

from kvtier.proto.common.v1 import acl_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import object_ops, s3errors, s3request, xmlio

#: The document's elements and the field each sets.
FIELDS = {
    "BlockPublicAcls": "block_public_acls",
    "IgnorePublicAcls": "ignore_public_acls",
    "BlockPublicPolicy": "block_public_policy",
    "RestrictPublicBuckets": "restrict_public_buckets",
}
#: The largest PutPublicAccessBlock body read (the document is a few hundred bytes).
MAX_BODY_BYTES = 16 << 10
#: The grantees that make a grant public.
_PUBLIC = frozenset({acl_pb2.GRANTEE_TYPE_ALL_USERS, acl_pb2.GRANTEE_TYPE_AUTHENTICATED_USERS})


def _config(info: metadata_pb2.BucketInfo) -> metadata_pb2.PublicAccessBlock | None:
    block = info.public_access_block
    return block if block.configured else None


def blocks_public_acls(info: metadata_pb2.BucketInfo) -> bool:
    """Whether setting a public ACL on the bucket or its objects is refused."""
    block = _config(info)
    return block is not None and block.block_public_acls


def ignores_public_acls(info: metadata_pb2.BucketInfo) -> bool:
    """Whether public grants of the bucket's and its objects' ACLs admit no one."""
    block = _config(info)
    return block is not None and block.ignore_public_acls


def blocks_public_policy(info: metadata_pb2.BucketInfo) -> bool:
    """Whether a PutBucketPolicy of a public policy is refused (AccessDenied)."""
    block = _config(info)
    return block is not None and block.block_public_policy


def restricts_public_buckets(info: metadata_pb2.BucketInfo) -> bool:
    """Whether a public bucket policy admits only the bucket's own tenant."""
    block = _config(info)
    return block is not None and block.restrict_public_buckets


def is_public(acl: acl_pb2.Acl) -> bool:
    """Whether an ACL grants anything to AllUsers or AuthenticatedUsers (S3's "public")."""
    return any(grant.grantee_type in _PUBLIC for grant in acl.grants)


def effective(info: metadata_pb2.BucketInfo, acl: acl_pb2.Acl) -> acl_pb2.Acl:
    """The ACL (the bucket's or one of its objects') the gate evaluates: without its public
    grants when the bucket ignores them."""
    if not ignores_public_acls(info) or not is_public(acl):
        return acl
    return acl_pb2.Acl(grants=[g for g in acl.grants if g.grantee_type not in _PUBLIC])


def check_acl(info: metadata_pb2.BucketInfo, acl: acl_pb2.Acl | None) -> None:
    """AccessDenied when the ACL to set (None: none) is public and the bucket blocks those."""
    if acl is not None and blocks_public_acls(info) and is_public(acl):
        raise s3errors.S3Error(
            "AccessDenied", "Access Denied: the bucket's PublicAccessBlock blocks public ACLs"
        )


def parse(body: bytes) -> metadata_pb2.PublicAccessBlock:
    """A PublicAccessBlockConfiguration document: each flag at most once, true or false (an
    absent one: false). MalformedXML otherwise."""
    out = metadata_pb2.PublicAccessBlock(configured=True)
    seen: set[str] = set()

    def take(child: ET.Element) -> None:
        field = FIELDS.get(child.tag)
        value = (child.text or "").strip().lower()
        if field is None or child.tag in seen or len(child) or value not in ("true", "false"):
            raise s3errors.S3Error("MalformedXML", f"unexpected {child.tag} in the document")
        seen.add(child.tag)
        setattr(out, field, value == "true")

    root = xmlio.parse_children(body, take, max_children=len(FIELDS), max_child_elements=1)
    if root != "PublicAccessBlockConfiguration":
        raise s3errors.S3Error("MalformedXML", "expected PublicAccessBlockConfiguration")
    return out


def render(block: metadata_pb2.PublicAccessBlock) -> bytes:
    """GetPublicAccessBlock's document: the four flags in S3's order."""
    root = ET.Element("PublicAccessBlockConfiguration", {"xmlns": xmlio.NS})
    for tag, field in FIELDS.items():
        ET.SubElement(root, tag).text = "true" if getattr(block, field) else "false"
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


async def put_public_access_block(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """PutPublicAccessBlock: replace the configuration (nothing stored on any error)."""
    await s3.owned_bucket(req)
    raw = await req.payload.read_all(MAX_BODY_BYTES)
    object_ops.check_body_digest(req, raw)
    config = parse(raw)
    request = metadata_pb2.SetBucketConfigRequest(public_access_block=config)
    await s3.front.set_bucket_config(req.bucket, request)
    return web.Response(status=200)


async def get_public_access_block(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """GetPublicAccessBlock: the configuration (a fresh record), or 404
    NoSuchPublicAccessBlockConfiguration."""
    info = await s3.front.bucket_for(req.bucket, fresh=True)
    block = _config(info)
    if block is None:
        raise s3errors.S3Error(
            "NoSuchPublicAccessBlockConfiguration",
            "The public access block configuration was not found",
            status=404,
        )
    return web.Response(body=render(block), content_type="application/xml")


async def delete_public_access_block(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """DeletePublicAccessBlock: 204, whether or not there was a configuration."""
    await s3.owned_bucket(req)
    request = metadata_pb2.SetBucketConfigRequest(
        public_access_block=metadata_pb2.PublicAccessBlock()
    )
    await s3.front.set_bucket_config(req.bucket, request)
    return web.Response(status=204)


ROUTES: list[tuple[str, str, tuple[str, ...], str, s3request.Handler]] = [
    ("GET", "bucket", ("publicAccessBlock",), "GetPublicAccessBlock", get_public_access_block),
    ("PUT", "bucket", ("publicAccessBlock",), "PutPublicAccessBlock", put_public_access_block),
    (
        "DELETE",
        "bucket",
        ("publicAccessBlock",),
        "DeletePublicAccessBlock",
        delete_public_access_block,
    ),
]
