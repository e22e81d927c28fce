"""S3 bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation,
GetBucketVersioning, PutBucketVersioning, ListObjects (v1 and v2) and ListObjectVersions."""

from __future__ import annotations

import base64
import binascii
import hashlib

from aiohttp import web

from kvtier import errors, names
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway.s3 import (
    acl,
    object_ops,
    ownership,
    params,
    s3errors,
    s3request,
    versioning_ops,
    xmlio,
)

XML = "application/xml"
#: CreateBucket header choosing the tier that serves the bucket: "objects" (default) or "kv";
#: HeadBucket answers it.
BUCKET_KIND_HEADER = "x-kvtier-bucket-kind"
#: The header's values.
KINDS = {"objects": metadata_pb2.BUCKET_KIND_OBJECTS, "kv": metadata_pb2.BUCKET_KIND_KV}
#: ListBuckets' max-buckets, as S3 bounds it.
MAX_BUCKETS = 10000
#: ListBuckets' parameters: with any of them, S3 lists each bucket's region.
_LIST_BUCKETS_PARAMS = frozenset({"max-buckets", "continuation-token", "prefix", "bucket-region"})


def _kind(text: str) -> metadata_pb2.BucketKind.ValueType:
    if text.lower() not in KINDS:
        raise s3errors.S3Error("InvalidArgument", f"{BUCKET_KIND_HEADER}: objects or kv")
    return KINDS[text.lower()]


def kind_name(kind: metadata_pb2.BucketKind.ValueType) -> str:
    """The header value of a bucket kind."""
    return next((name for name, value in KINDS.items() if value == kind), "objects")


def _xml(data: bytes, status: int = 200) -> web.Response:
    return web.Response(body=data, status=status, content_type=XML)


def _max_buckets(text: str) -> int:
    value = params.uint(text)
    if value is None or not 1 <= value <= MAX_BUCKETS:
        raise s3errors.S3Error(
            "InvalidArgument", f"max-buckets must be an integer between 1 and {MAX_BUCKETS}"
        )
    return value


def _bucket_token(name: str) -> str:
    """ListBuckets' continuation token after the bucket name (opaque to clients)."""
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _after_token(token: str) -> str:
    """The bucket name a continuation token continues after; InvalidArgument when it is not
    one of ours (an empty one included)."""
    try:
        name = base64.b64decode(token + "=" * (-len(token) % 4), b"-_", validate=True).decode()
        names.check_bucket(name)
    except (binascii.Error, UnicodeError, ValueError, errors.InvalidArgument):
        raise s3errors.S3Error(
            "InvalidArgument", "The continuation token provided is incorrect"
        ) from None
    return name


async def list_buckets(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """The principal's tenant's buckets (an admin's: every bucket), by name: those starting
    with `prefix`, in pages of `max-buckets` (1-10000; absent: all) continued by
    `continuation-token`; none for a `bucket-region` other than ours."""
    query = req.query
    most = _max_buckets(query.get("max-buckets", str(MAX_BUCKETS)))
    after = _after_token(query["continuation-token"]) if "continuation-token" in query else ""
    prefix = query.get("prefix", "")
    infos = [
        b for b in await s3.front.list_buckets() if b.name > after and b.name.startswith(prefix)
    ]
    if query.get("bucket-region", s3.region) != s3.region:
        infos = []
    page = infos[:most]
    token = _bucket_token(page[-1].name) if len(infos) > most else ""
    asked = bool(_LIST_BUCKETS_PARAMS & set(query))
    return _xml(
        xmlio.list_buckets(
            ((b.name, b.created_at_unix_ms) for b in page), *req.principal.owner,
            region=s3.region if asked else "", prefix=prefix if "prefix" in query else None,
            continuation_token=token,
        )
    )  # fmt: skip


async def create_bucket(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Create a bucket owned by the principal's tenant; again by its owner: 200 (us-east-1)."""
    try:
        names.check_bucket(req.bucket)
    except errors.InvalidArgument as exc:
        raise s3errors.S3Error("InvalidBucketName", exc.message) from None
    constraint = xmlio.parse_location(await req.payload.read_all(64 << 10))
    if constraint and constraint != s3.region:
        raise s3errors.S3Error(
            "InvalidLocationConstraint", f"this endpoint serves region {s3.region}"
        )
    kind = _kind(req.header(BUCKET_KIND_HEADER) or "objects")
    wanted = acl.from_headers(req.http.headers, req.principal.tenant)  # checked before creating
    kv = kind == metadata_pb2.BUCKET_KIND_KV
    if wanted is not None and kv and not acl.is_private(wanted, req.principal.tenant):
        raise s3errors.S3Error("NotImplemented", "KV buckets have no ACLs: they are private")
    setting = ownership.from_header(req.http.headers.get(ownership.HEADER), kv)
    if wanted is not None:
        ownership.check_bucket_acl(setting, wanted, req.principal.tenant)
    try:
        await s3.front.create_bucket(req.bucket, req.principal.tenant, kind)
    except errors.AlreadyExists:
        info = await s3.front.bucket_info(req.bucket)
        if info.tenant != req.principal.tenant or info.kind != kind:
            raise s3errors.S3Error(
                "BucketAlreadyExists", "The requested bucket name is not available."
            ) from None
        if s3.region != "us-east-1":
            raise s3errors.S3Error(
                "BucketAlreadyOwnedByYou", "Your previous request to create it succeeded."
            ) from None
    if wanted is not None:  # made private: a failure here leaves it so
        config = metadata_pb2.SetBucketConfigRequest(acl=wanted)
        await s3.front.set_bucket_config(req.bucket, config)
    if setting != ownership.UNSPECIFIED:  # after the ACL: a failure leaves ACLs in force
        await s3.front.set_bucket_config(req.bucket, ownership.config(setting))
    response = web.Response(status=200)
    response.headers["Location"] = f"/{req.bucket}"
    return response


async def head_bucket(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """200 with the region and the bucket's kind (BUCKET_KIND_HEADER), 404 or 403."""
    info = await s3.owned_bucket(req)
    response = web.Response(status=200)
    response.headers["x-amz-bucket-region"] = s3.region
    response.headers[BUCKET_KIND_HEADER] = kind_name(info.kind)
    return response


async def delete_bucket(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Delete a bucket without objects (BucketNotEmpty); its multipart uploads in progress
    are aborted with it, as in S3, on either kind of bucket (its object layer's
    `delete_bucket`)."""
    await (await s3.layer(req)).delete_bucket(req.bucket)
    return web.Response(status=204)


async def get_location(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """The region (empty for us-east-1)."""
    await s3.owned_bucket(req)
    return _xml(xmlio.location(s3.region))


async def get_versioning(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """The bucket's status: an empty configuration when never enabled."""
    info = await s3.owned_bucket(req)
    root = xmlio._root("VersioningConfiguration")
    if info.versioning.status in versioning_ops.NAMES:
        xmlio._add(root, "Status", versioning_ops.NAMES[info.versioning.status])
    return web.Response(body=xmlio._doc(root), content_type="application/xml")


async def put_versioning(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """Enabled or Suspended, in the bucket's record (other gateways see it within
    bucket_cache_s). MFA delete (MfaDelete Enabled, an x-amz-mfa header): 501 NotImplemented;
    where the bucket's object layer has one version per object (a KV bucket's DRAM blocks):
    501 NotImplemented. Suspended on a never-versioned bucket is recorded (GetBucketVersioning
    then answers Suspended, as S3 does: its writes make the null version, as before), except on
    a KV bucket, which is never versioned: 200, nothing stored."""
    info = await s3.owned_bucket(req)
    raw = await req.payload.read_all(64 << 10)
    md5 = object_ops.content_md5(req)
    if md5 and hashlib.md5(raw).hexdigest() != md5:
        raise s3errors.S3Error("BadDigest", "The Content-MD5 you specified did not match.")
    wanted, mfa_delete = xmlio.parse_versioning(raw)
    if mfa_delete == "Enabled" or req.header("x-amz-mfa"):
        raise s3errors.S3Error("NotImplemented", "MFA delete is not supported")
    if not wanted:
        raise s3errors.S3Error("MalformedXML", "The XML you provided was not well-formed.")
    kv = info.kind == metadata_pb2.BUCKET_KIND_KV
    if wanted == "Suspended" and not info.versioning.status and kv:
        return web.Response(status=200)
    await (await s3.layer(req)).set_versioning(req.bucket, versioning_ops.STATUS[wanted])
    return web.Response(status=200)


def check_continuation_token(req: s3request.S3Request) -> None:
    """ListObjectsV2: a continuation-token that is present must not be empty (InvalidArgument,
    as S3 answers; a client sending one has lost its place)."""
    if req.query.get("continuation-token") == "":
        raise s3errors.S3Error("InvalidArgument", "The continuation token provided is incorrect")


def _max_keys(req: s3request.S3Request, name: str = "max-keys") -> int:
    value = params.uint(req.query.get(name, "1000"))
    if value is None:
        raise s3errors.S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return min(value, 1000)


async def _page(
    s3: s3request.Door, req: s3request.S3Request, *, after: str, token: str, max_keys: int
) -> pb.ListObjectsResponse:
    if max_keys == 0:
        return pb.ListObjectsResponse()
    layer = await s3.layer(req)  # either bucket kind
    return await layer.list(
        pb.ListObjectsRequest(
            bucket=req.bucket, prefix=req.query.get("prefix", ""),
            delimiter=req.query.get("delimiter", ""), start_after=after,
            continuation_token=token, max_keys=max_keys,
        )
    )  # fmt: skip


async def list_objects(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListObjectsV2 (list-type=2) or ListObjects (v1), on either bucket kind."""
    await s3.owned_bucket(req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    max_keys = _max_keys(req)
    if req.query.get("list-type") == "2":
        check_continuation_token(req)
        token = req.query.get("continuation-token", "")
        page = await _page(
            s3, req, after=req.query.get("start-after", ""), token=token, max_keys=max_keys
        )
        owner = _owners(req) if req.query.get("fetch-owner") == "true" else None
        return _xml(
            xmlio.list_objects(
                version=2, bucket=req.bucket, page=page, params=req.query, enc=enc, owner=owner
            )
        )
    page = await _page(s3, req, after=req.query.get("marker", ""), token="", max_keys=max_keys)
    next_marker = ""
    if page.is_truncated and req.query.get("delimiter"):
        last = [o.key for o in page.objects] + list(page.common_prefixes)
        next_marker = max(last, key=str.encode) if last else ""
    return _xml(
        xmlio.list_objects(
            version=1, bucket=req.bucket, page=page, params=req.query, enc=enc,
            owner=_owners(req), next_marker=next_marker,
        )
    )  # fmt: skip


async def list_versions(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListObjectVersions of an unversioned bucket: every object once, version "null"."""
    await s3.owned_bucket(req)
    enc = xmlio.Encoder(req.query.get("encoding-type", ""))
    page = await _page(
        s3, req, after=req.query.get("key-marker", ""), token="", max_keys=_max_keys(req)
    )
    return _xml(
        xmlio.list_versions(
            bucket=req.bucket, page=page, params=req.query, enc=enc, owner=_owners(req)
        )
    )


def _owners(req: s3request.S3Request) -> xmlio.Owners:
    """Each listed object's Owner: its writer's tenant, or the bucket's (`ownership.listed`;
    a KV bucket's objects record none: its tenant)."""
    return ownership.listed_owners(req.object_ownership, req.owner[0])
